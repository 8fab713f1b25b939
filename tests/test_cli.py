import json
import subprocess
import sys

from relation_lens.cli import build_parser, main
from relation_lens.models.bridge import transformer_lens_major


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "relation_lens.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("trace", "trace-dataset", "edit", "tune", "world", "info"):
        assert cmd in out
    parser = build_parser()
    for cmd in ("trace", "trace-dataset", "edit", "tune", "world", "info"):
        sub = subprocess.run([sys.executable, "-m", "relation_lens.cli", cmd, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "usage: relation-lens " + cmd in sub
    assert parser.prog == "relation-lens"


def test_trace_writes_json_png_html(tmp_path, capsys):
    assert main(["trace", "--out", str(tmp_path), "--samples", "3", "--quiet", "--formats", "png,svg"]) == 0
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["prompt"] == "Germany is located in the continent of" and set(data["scores"]) == {"resid", "mlp", "attn"}
    assert (tmp_path / "trace.png").stat().st_size > 1000 and (tmp_path / "trace.svg").is_file()
    assert "unpkg.com" not in (tmp_path / "trace.html").read_text()
    assert capsys.readouterr().out == ""  # --quiet


def test_trace_bad_subject_is_a_clear_error(tmp_path, capsys):
    code = main(["trace", "--prompt", "The capital of France is", "--subject", "Spain", "--out", str(tmp_path),
                 "--quiet"])
    assert code == 2 and "does not occur" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "gpt2-xxl"]) == 2
    err = capsys.readouterr().err  # TransformerLens 3 knows its names; a bridge takes any hub id (offline here)
    assert "unknown model name" in err if transformer_lens_major() < 4 else "'gpt2-xxl' is not in the local" in err


def test_world_and_info(capsys):
    assert main(["world"]) == 0
    assert "facts" in capsys.readouterr().out
    assert main(["info"]) == 0
    assert "6 layers" in capsys.readouterr().out


def test_edit_shows_before_after_and_saves_only_when_asked(tmp_path, capsys):
    assert main(["edit", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "paraphrase" in out and "unrelated" in out
    assert not any(tmp_path.iterdir())
    assert main(["edit", "--quiet", "--save", str(tmp_path / "edited")]) == 0
    assert (tmp_path / "edited" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "edited" / "edit.json").read_text())["layer"] == 4


def test_trace_dataset_cli(tmp_path):
    assert main(["trace-dataset", "--relation", "P30", "--limit", "3", "--samples", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    data = json.loads((tmp_path / "trace_dataset.json").read_text())
    assert data["n_total"] == 3


def test_saved_edited_model_loads_back_with_equal_logits(tmp_path, default_model):
    """relation_lens.load_model and transformers both read the saved folder, and their logits equal
    the edited HookedTransformer's."""
    import torch
    from transformers import AutoModelForCausalLM

    import relation_lens as rl
    from relation_lens.editing import save_edited

    req = rl.EditRequest("{} is located in the country of", "Paris", "Italy")
    upd = rl.compute_edit(default_model, req, method="relation_rome")
    folder = save_edited("default", [upd], tmp_path / "edited")
    ids = default_model.to_tokens("Paris is located in the country of")
    with torch.no_grad():
        with rl.apply_edit(default_model, upd):
            edited = default_model(ids)[0, -1].log_softmax(-1)
        unedited = default_model(ids)[0, -1].log_softmax(-1)
        back = rl.load_model(folder)(ids)[0, -1].log_softmax(-1)
        hf = AutoModelForCausalLM.from_pretrained(folder)(ids).logits[0, -1].log_softmax(-1)
    assert (back - edited).abs().max() < 1e-4 and (hf - edited).abs().max() < 1e-4
    assert (edited - unedited).abs().max() > 0.1  # the edit is in the saved weights


def test_edit_that_does_not_take_is_not_saved(tmp_path, capsys, monkeypatch):
    import dataclasses

    import relation_lens as rl

    compute = rl.compute_edit

    def no_op_update(*a, **k):  # an update that changes nothing: the edit cannot take
        upd = compute(*a, **k)
        return dataclasses.replace(upd, right=upd.right * 0)

    monkeypatch.setattr(rl, "compute_edit", no_op_update)
    assert main(["edit", "--quiet", "--save", str(tmp_path / "edited")]) == 0
    out = capsys.readouterr().out
    assert "the edit did not take" in out and "not saved" in out
    assert not (tmp_path / "edited" / "model.safetensors").exists()
    assert main(["edit", "--quiet", "--save", str(tmp_path / "edited"), "--save-anyway"]) == 0
    assert (tmp_path / "edited" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "edited" / "edit.json").read_text())["took"] is False


def test_tune_writes_the_trials_and_the_chosen_settings(tmp_path, capsys):
    import relation_lens as rl

    out = tmp_path / "tune"
    argv = ["tune", "--quiet", "--n", "2", "--budget", "2", "--out", str(out),
            "--config", '{"v_steps": 4, "prefix_lengths": [[4, 2]], "stats_n_texts": 100}',
            "--space", '{"layer": [4, 0], "v_weight_decay": [], "clamp_norm_factor": [], "v_steps": []}']
    assert main(argv) == 0
    res = rl.TuneResult.from_json(out / "tune.json")
    assert [t["params"]["layer"] for t in res.trials] == [4, 0] and res.config.v_steps == 4
    assert res.config.prefix_lengths == ((4, 2),)
    assert res.params["layer"] == max(res.trials, key=lambda t: (t["objective"], -t["trial"]))["params"]["layer"]
    text = (out / "tune.md").read_text()
    assert f"chosen: layer={res.params['layer']}" in text and "| chosen |" in text
    assert (out / "tune.png").stat().st_size > 0
    # --start: a search begun where an earlier one ended (its tune.json), or at settings given as JSON
    for start, want in ((str(out / "tune.json"), res.params), ('{"layer": 0}', {**res.start, "layer": 0})):
        again = tmp_path / f"again_{len(want)}_{want['layer']}"
        assert main([*argv[:4], "--out", str(again), *argv[8:], "--budget", "1", "--start", start]) == 0
        assert rl.TuneResult.from_json(again / "tune.json").trials[0]["params"] == want
    # bad JSON and unknown fields are named, before any work
    assert main(["tune", "--quiet", "--out", str(out), "--config", '{"v_stepz": 4}']) == 2
    assert "v_stepz" in capsys.readouterr().err
    assert main(["tune", "--quiet", "--out", str(out), "--space", "[1]"]) == 2
    assert "--space must be a JSON object" in capsys.readouterr().err
