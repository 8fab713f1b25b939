"""What a new user and a reviewer hit (issue on fixes): each bad input gets a RelationLensError that names
it and leaves the model as it was; results are strict JSON; plotting leaves matplotlib's global state
alone; concurrent calls on one model are safe; noise='rome' is ROME's rule."""

import json
import math
import threading

import pytest
import torch
from conftest import all_hooks, checksum, same_weights

import relation_lens as rl

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


def test_json_is_strict_and_reads_back_nan_and_newer_fields(tiny_model):
    res = rl.trace_dataset(tiny_model, [(PROMPT, SUBJECT, " Paris")], n_samples=2, kinds="resid", window=2)
    assert res.n_used == 0 and math.isnan(res.clean_prob)  # the model does not answer Paris: nothing averaged
    assert "nothing averaged" in repr(res)
    text = res.to_json()
    assert "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert data["schema_version"] == 1 and data["relation_lens_version"] == rl.__version__
    data["a_field_from_a_newer_version"] = 1
    back = rl.DatasetTraceResult.from_dict(data)
    assert back == res  # NaN came back as NaN
    old_style = json.dumps(res.to_dict())  # older versions wrote bare NaN: still read
    assert "NaN" in old_style and rl.DatasetTraceResult.from_json(old_style) == res


def test_plot_leaves_matplotlib_backend_alone(tiny_model, tmp_path):
    import matplotlib

    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds="resid")
    before = matplotlib.get_backend()
    import matplotlib.pyplot as plt

    n_figures = len(plt.get_fignums())
    fig = res.plot(tmp_path / "t.png")
    assert matplotlib.get_backend() == before
    assert len(plt.get_fignums()) == n_figures  # not registered with pyplot: nothing to close, no leak
    assert (tmp_path / "t.png").stat().st_size > 1000 and fig.axes


def test_concurrent_traces_on_one_model(tiny_model):
    prompts = [PROMPT, "The Space Needle is a tower in the city of"]
    expected = [rl.trace(tiny_model, p, subject=SUBJECT, n_samples=3, window=2) for p in prompts]
    got, errors = [None] * 4, []

    def work(i):
        try:
            got[i] = rl.trace(tiny_model, prompts[i % 2], subject=SUBJECT, n_samples=3, window=2)
        except Exception as exc:  # pragma: no cover - the failure this test guards against
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(got[i] == expected[i % 2] for i in range(4))
    assert all_hooks(tiny_model) == 0


def test_rome_noise_rule_matches_an_independent_computation(default_model):
    from relation_lens.data import known_1000_subjects
    from relation_lens.tracing import rome_noise_std

    tok = default_model.tokenizer
    subjects = known_1000_subjects()
    assert len(subjects) == 1209
    rows = torch.cat([torch.tensor(tok.encode(s, add_special_tokens=False)) for s in subjects])
    expected = 3 * default_model.W_E[rows].detach().std().item()
    assert rome_noise_std(default_model, subjects) == pytest.approx(expected, rel=1e-6)
    assert rome_noise_std(default_model, subjects) != pytest.approx(rl.tracing.noise_std(default_model), rel=1e-2)
    res = rl.trace(default_model, "Germany is located in the continent of", subject="Germany", n_samples=2,
                   kinds="resid", noise="rome", noise_subjects=subjects)
    assert res.noise_std == pytest.approx(expected, rel=1e-6)


def test_trace_without_bos(default_model):
    res = rl.trace(default_model, "Germany is located in the continent of", subject="Germany", n_samples=2,
                   kinds="resid", prepend_bos=False)
    with_bos = rl.trace(default_model, "Germany is located in the continent of", subject="Germany", n_samples=2,
                        kinds="resid")
    assert with_bos.tokens[0] == "<|endoftext|>" and res.tokens == with_bos.tokens[1:]
    assert res.subject_span == (with_bos.subject_span[0] - 1, with_bos.subject_span[1] - 1)
    assert res.scores["resid"].shape[1] == with_bos.scores["resid"].shape[1] - 1


def test_edit_bad_inputs_leave_the_model_unchanged(default_model):
    saved = checksum(default_model)
    with pytest.raises(rl.EditError, match="target_new 'Italy' is the same as target_true"):
        rl.EditRequest("{} is located in the country of", "Paris", "Italy", target_true="Italy")
    long = rl.EditRequest("{} " + "is a very long sentence and " * 40 + "is in", "Paris", "Italy")
    with pytest.raises(rl.PromptError, match=r"longer than the model's context of 64") as info:
        rl.compute_edit(default_model, long, layer=4)
    assert len(str(info.value)) < 400
    assert same_weights(default_model, saved) and all_hooks(default_model) == 0


def test_bad_fact_is_a_data_error(tiny_model):
    with pytest.raises(rl.DataError, match="fact 1 .* needs a 'prompt' and a 'subject'"):
        rl.trace_dataset(tiny_model, [(PROMPT, SUBJECT), {"prompt": PROMPT}], n_samples=2)


def test_cli_refuses_bad_window_and_unwritable_out_before_work(tmp_path, capsys):
    from relation_lens.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse checks count arguments: exit 2, the argument named
        main(["trace", "--window", "0", "--quiet", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    assert "argument --window: 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot create the output folder"):
        main(["trace", "--quiet", "--out", str(blocker / "sub")])
