"""Parity with ROME's own code: reference figures produced by kmeng01/rome's ``execute_rome`` on the
default model's weights (tests/data/make_rome_reference.py, run by hand against a ROME checkout),
with the same requests, context templates and key statistics. ``EditConfig.rome()`` must give
ROME's rank-one update; reverting any one of ROME's three value-optimisation formulas (weight decay,
early stop, KL direction) must break the match."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import relation_lens as rl
from relation_lens.editing import EditConfig, EditRequest, compute_edit
from relation_lens.key_statistics import KeyStatistics

DATA = Path(__file__).parent / "data"
META = json.loads((DATA / "rome_reference.json").read_text())
REF = load_file(DATA / "rome_reference.safetensors")
# Relative Frobenius difference of the rank-one updates (measured: 1e-7 to 5e-7 on every request).
TOL = 1e-4


@pytest.fixture(scope="module")
def model64():
    """The default model in float64 with the Hugging Face MLP outputs uncentred, as the reference was
    made (so neither float32 rounding nor TransformerLens' weight centring, which moves ROME's clamp
    radius by ~3e-6 relative, is part of the comparison)."""
    return rl.load_model(dtype="float64", center_writing_weights=False)


@pytest.fixture(scope="module")
def setup(model64):
    stats = {m: KeyStatistics.compute(model64, s["layer"], n_texts=META["stats_texts"], prepend_bos=False,
                                      cache=False, progress=False) for m, s in META["setups"].items()}
    requests = [EditRequest(r["prompt"], r["subject"], r["target_new"], target_true=r["target_true"])
                for r in META["requests"]]
    return stats, requests


def _relative_difference(model, setup, method, i, config):
    stats, requests = setup
    upd = compute_edit(model, requests[i], method=method, layer=META["setups"][method]["layer"],
                       stats=stats[method], config=config)
    ours = upd.delta()
    ref = torch.outer(REF[f"{method}.{i}.u"].double(), REF[f"{method}.{i}.right"].double())
    return float((ours - ref).norm() / ref.norm()), upd


@pytest.mark.parametrize("method", list(META["setups"]))
def test_rome_update_matches_romes_code(model64, setup, method):
    config = EditConfig.rome(prefixes=tuple(META["prefixes"]))
    assert config == dataclasses.replace(EditConfig(), prepend_bos=False, prefixes=tuple(META["prefixes"]))
    diffs = []
    for i in range(len(META["requests"])):
        diff, upd = _relative_difference(model64, setup, method, i, config)
        diffs.append(diff)
        assert diff <= TOL, (method, i, diff)
        # the left vectors agree in direction (ROME normalises u, we keep C^-1 k*)
        u = upd.left / upd.left.norm()
        assert torch.allclose(u, REF[f"{method}.{i}.u"].double(), atol=1e-5)
        with rl.apply_edit(model64, upd):
            req = upd.request
            ids = model64.to_tokens(req.text, prepend_bos=False)
            new_id = model64.to_tokens(" " + req.target_new, prepend_bos=False)[0, 0]
            p_new = model64(ids)[0, -1].softmax(-1)[new_id].item()
        assert p_new == pytest.approx(META["setups"][method][f"p_new.{i}"], abs=1e-4)


@pytest.mark.parametrize("reverted", [dict(weight_decay_form="squared_ratio"), dict(early_stop_on="nll"),
                                      dict(kl_direction="forward")])
def test_each_romes_formula_matters(model64, setup, reverted):
    """Each of the three formulas, reverted alone, moves the update far beyond the tolerance on at
    least one reference request (so the parity test above can fail)."""
    config = EditConfig.rome(prefixes=tuple(META["prefixes"]), **reverted)
    diffs = []
    for i in range(len(META["requests"])):
        diffs.append(_relative_difference(model64, setup, "rome", i, config)[0])
        if diffs[-1] > 100 * TOL:
            break
    assert max(diffs) > 100 * TOL, (reverted, diffs)


@pytest.mark.parametrize("i", range(len(META["trace"])))
def test_causal_trace_matches_romes_code(default_model, i):
    """ROME's calculate_hidden_flow (experiments/causal_trace.py) on the same weights, the same tokens
    (no BOS, as ROME) and the same noise: every grid cell within 1e-5."""
    ref = META["trace"][i]
    noise = REF[f"trace.{i}.noise"]
    res = rl.trace(default_model, ref["prompt"], subject=ref["subject"], target=ref["answer"], corrupt="subject",
                   noise=noise, n_samples=ref["samples"], window=ref["window"], prepend_bos=False)
    assert default_model.to_tokens(ref["prompt"], prepend_bos=False)[0].tolist() == ref["tokens"]
    assert list(res.corrupt_span) == ref["subject_range"]
    assert res.clean_prob == pytest.approx(ref["clean"], abs=1e-5)
    assert res.corrupted_prob == pytest.approx(ref["corrupted"], abs=1e-5)
    for kind in ("resid", "mlp", "attn"):
        want = REF[f"trace.{i}.{kind}"]
        assert res.scores[kind].shape == want.shape
        assert (res.scores[kind] - want).abs().max() <= 1e-5, (kind, (res.scores[kind] - want).abs().max())
    assert REF[f"trace.{i}.resid"].max() - REF[f"trace.{i}.resid"].min() > 0.1  # the grid is not flat


TEMPLATES = json.loads((DATA / "template_reference.json").read_text())


def test_rome_context_templates_are_romes_code(default_model):
    """ROME's rule (prefix_seeds=None): the templates ROME's own get_context_templates generates on the
    same weights after torch.manual_seed(0) (tests/data/make_template_reference.py), text for text."""
    from relation_lens.editing import generate_prefixes

    ref = TEMPLATES["rome"]
    config = EditConfig.rome()
    assert [list(p) for p in config.prefix_lengths] == ref["prefix_lengths"] and config.prefix_seeds is None
    assert generate_prefixes(default_model, config) == ref["templates"]


def test_memit_context_templates_are_memits_code(default_model):
    """MEMIT's rule (memit_config(): seed words, length counting the word's tokens, the word kept): the
    templates MEMIT's own get_context_templates generates on the same weights, text for text; each
    starts with its seed word, and a batch edit groups them as MEMIT's compute_ks does."""
    from relation_lens.editing import generate_prefixes, key_rows, memit_config

    ref = TEMPLATES["memit"]
    config = memit_config()
    assert list(config.prefix_seeds) == ref["seeds"] and [list(p) for p in config.prefix_lengths] == ref["prefix_lengths"]
    got = generate_prefixes(default_model, config)
    assert got == [t for group in ref["templates"] for t in group]
    assert all(t.startswith(seed) for t, seed in zip(got[1:], ref["seeds"]))
    request = EditRequest("{} is located in the continent of", "Germany", "Asia")
    rows, plain = key_rows(default_model, [request], "subject", got, config)
    assert [g for *_, g in rows] == [0] + [1] * 5 and len(plain) == 1  # [["{}"], [5 templates]]
