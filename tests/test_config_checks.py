"""Every numeric setting of the public configs is checked at construction, by name: a seeded sweep of
bad values (NaN, infinities, negatives, zero where it must be positive, huge, wrong types, a bool for an
int) over EditConfig, AlphaEditConfig and TraceConfig gives a RelationLensError that names the field
(NaN compares false with everything, so a check written `if x < 0: raise` lets it through)."""

from __future__ import annotations

import math
import random

import pytest

import relation_lens as rl
from relation_lens.editing.requests import _NUMERIC_FIELDS

pytestmark = pytest.mark.transformer_lens_4

BAD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, "0.5", None, True, [1.0]]
BAD_INTS = [math.nan, math.inf, -1, 0.5, 2.0, True, "3", None, -10**30]


def _cases():
    rng = random.Random(0)
    for name, (integer, low, strict) in _NUMERIC_FIELDS.items():
        bad = list(BAD_INTS if integer else BAD_FLOATS)
        if name == "stats_n_texts":
            bad = [b for b in bad if b is not None]  # None means every text
        if strict or (integer and low >= 1):
            bad.append(0)
        rng.shuffle(bad)
        for value in bad:
            yield name, value


def construct(cls, **fields):
    """``cls(**fields)`` as a user's call runs it: the test suite's runtime type checker (jaxtyping +
    beartype on the package) would refuse a wrong type at ``__init__`` before the config's own checks,
    which users get; so the fields are set on a default instance and its checks run on them."""
    inst = cls()
    for k, v in fields.items():
        object.__setattr__(inst, k, v)
    inst.__post_init__()
    return inst


@pytest.mark.parametrize("name,value", list(_cases()))
def test_edit_config_refuses_bad_numbers_by_name(name, value):
    with pytest.raises(rl.RelationLensError, match=f"EditConfig.{name} "):
        construct(rl.EditConfig, **{name: value})


@pytest.mark.parametrize("name", ["threshold", "l2"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, True, "1", None])
def test_alphaedit_config_refuses_bad_numbers_by_name(name, value):
    with pytest.raises(rl.RelationLensError, match=name):
        construct(rl.AlphaEditConfig, **{name: value})


@pytest.mark.parametrize("name,value", [
    ("n_samples", 0), ("n_samples", True), ("n_samples", 2.0), ("n_samples", math.nan),
    ("window", 0), ("window", True), ("window", -3), ("window", math.inf),
    ("batch_size", 0), ("batch_size", False), ("batch_size", 1.5),
    ("seed", 1.5), ("seed", True), ("seed", "0"),
    ("noise", math.nan), ("noise", -1.0), ("noise", math.inf), ("noise", True), ("noise", "loud"),
    ("include_last", 1), ("include_last", "yes"),
])
def test_trace_config_refuses_bad_values_by_name(name, value):
    with pytest.raises(rl.RelationLensError, match=name):
        construct(rl.TraceConfig, **{name: value})


def test_good_values_still_pass():
    rl.EditConfig(v_lr=1e-3, ridge=0.0, stats_n_texts=None, v_steps=1, seed=0)
    rl.AlphaEditConfig(threshold=0.0, l2=0.0)
    rl.TraceConfig(noise=0.0, n_samples=1, window=1, include_last=False)


@pytest.mark.parametrize("argv", [
    ["evaluate", "--n", "0"], ["evaluate", "--n", "-5"], ["evaluate", "--n", "x"], ["trace", "--samples", "0"],
    ["trace", "--window", "-1"], ["trace", "--batch-size", "0"], ["trace-dataset", "--limit", "0"],
    ["trace-dataset", "--pack", "-2"], ["tune", "--budget", "0"], ["tune", "--n", "-1"], ["stats", "--layer", "1",
                                                                                            "--n-texts", "0"],
])
def test_every_count_argument_is_positive(argv, capsys):
    """Count arguments are checked by argparse: exit 2 naming the argument (``--n 0`` printed an IndexError
    traceback, ``--n -5`` evaluated every record through a negative slice)."""
    from relation_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err


def test_trace_prompt_without_subject_exits_2(capsys, tmp_path):
    from relation_lens.cli import main

    assert main(["trace", "--prompt", "The capital of France is", "--out", str(tmp_path / "o")]) == 2
    assert "--subject is required" in capsys.readouterr().err


def test_messages_say_what_was_wrong(tiny_model, tmp_path):
    """Messages that misled: a float or bool target, a token span as the subject of a text prompt, a
    directory given as an update file, a window deeper than the model, AlphaEdit asked for as a method."""
    import subprocess
    import sys

    prompt = "Paris is located in the country of"
    # wrong types, as a user's process sees them (the suite's runtime type checker would refuse them first)
    script = (
        "import relation_lens as rl\n"
        "m = rl.load_model()\n"
        "for kw in (dict(target=3.5), dict(target=True), dict(subject=(1, 4))):\n"
        "    try:\n"
        f"        rl.trace(m, {prompt!r}, **{{'subject': 'Paris', **kw}}, n_samples=2)\n"
        "    except rl.RelationLensError as e:\n"
        "        print(type(e).__name__, '|', e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert len(out) == 3, out
    assert out[0].startswith("TargetError") and "give the answer as a string" in out[0]
    assert out[1].startswith("TargetError") and "is a bool" in out[1]
    assert out[2].startswith("SpanError") and "spans work only with token ids" in out[2]
    with pytest.raises(rl.EditError, match="is a directory"):
        rl.load_update(tmp_path)
    with pytest.warns(UserWarning, match="larger than the model's 4 layers"):
        rl.trace(tiny_model, prompt, subject="Paris", n_samples=2, window=9)
    with pytest.raises(rl.EditError, match="preserve=rl.Preserve"):
        rl.compute_edit(tiny_model, rl.EditRequest("{} is in", "Paris", "Rome"), method="alphaedit")


@pytest.mark.parametrize("where,name,value", [
    ("space", "v_weight_decay", math.nan), ("space", "clamp_norm_factor", -1.0), ("space", "v_steps", 0),
    ("space", "l2", math.inf), ("space", "threshold", math.nan), ("start", "clamp_norm_factor", math.nan),
])
def test_tune_refuses_bad_search_values_by_name(tiny_model, where, name, value):
    """tune's search spaces and start values go through the configs' checks, before any trial runs."""
    from relation_lens.data.counterfact import load_counterfactual

    records = [dict(r) for r in list(load_counterfactual())[:2]]
    kw = {"space": {"layer": [1], name: [value]}} if where == "space" else {"space": {"layer": [1]}, "start": {name: value}}
    with pytest.raises(rl.ConfigError, match=name):
        rl.tune(tiny_model, records, method="relation_rome", alphaedit=name in ("l2", "threshold"), budget=2, **kw)
