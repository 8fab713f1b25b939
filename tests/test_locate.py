"""rl.locate: the layers each editing method should edit, read off a trace_dataset run. Checked
against trace_dataset run by hand with the test's own reading of the rules, the range rule on
made-up effects, and on the default model against the traces docs/experiments.md reports."""

from __future__ import annotations

import pytest
import torch

import relation_lens as rl
from relation_lens.locate import critical_range, early_layers

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

FACTS = [("The Space Needle is located in the city of", "The Space Needle"),
         ("Germany is located in the continent of", "Germany"),
         ("The Eiffel Tower stands in the city of", "The Eiffel Tower")]


def _by_hand(model, method, fraction=0.5, early=1 / 3):
    corrupt, col = ("subject", 2) if method in ("rome", "memit") else ("relation", 6)  # BUCKETS' indices
    ds = rl.trace_dataset(model, FACTS, corrupt=corrupt, kinds="mlp", n_samples=2, exclude_incorrect=False)
    effect = ds.mean["mlp"][:, col]
    L = model.cfg.n_layers
    top = L if method in ("rome", "memit") else max(1, -(-L // 3) if early == 1 / 3 else int(early * L))
    peak = int(effect[:top].argmax())
    if method in ("rome", "relation_rome"):
        return effect, (peak,)
    chosen = [l for l in range(top) if effect[l] >= fraction * effect[peak]]
    lo = hi = peak  # the contiguous run through the peak
    while lo - 1 in chosen:
        lo -= 1
    while hi + 1 in chosen:
        hi += 1
    return effect, tuple(range(lo, hi + 1))


@pytest.mark.parametrize("method", ["rome", "memit", "relation_rome", "relation_memit"])
def test_locate_reads_the_rule_off_trace_dataset(tiny_model, method, tmp_path):
    res = rl.locate(tiny_model, FACTS, method=method, n_samples=2, exclude_incorrect=False)
    effect, layers = _by_hand(tiny_model, method)
    assert torch.equal(res.effect, effect) and res.layers == layers
    assert res.n_used == len(FACTS) and res.trace is not None
    assert res.peak in res.layers and set(res.layers) <= set(res.allowed)
    assert rl.LocateResult.from_dict(res.to_dict()) == res
    res.plot(tmp_path / "locate.png")
    assert (tmp_path / "locate.png").stat().st_size > 0 and "<table" in res.to_html()


def test_the_range_rule_on_made_up_effects():
    e = torch.tensor([0.1, 0.5, 1.0, 0.6, 0.2, 0.9])
    assert critical_range(e, range(6), 0.5) == (1, 2, 3)        # 5 is over half the peak but not contiguous
    assert critical_range(e, range(6), 0.05) == (0, 1, 2, 3, 4, 5)
    assert critical_range(e, range(6), 1.0) == (2,)
    assert critical_range(e, range(2), 0.5) == (1,)              # the peak among the allowed layers
    assert critical_range(torch.tensor([float("nan"), 0.3, 0.2]), range(3), 0.5) == (1, 2)
    assert early_layers(48, 1 / 3) == range(16) and 4 in early_layers(48, 1 / 3)  # GPT-2 XL's 5th layer
    assert early_layers(6, 1 / 3) == range(2) and early_layers(2, 0.1) == range(1)


@pytest.mark.parametrize("kw, match", [(dict(method="ft"), "rules for"), (dict(fraction=0.0), "fraction=0.0"),
                                        (dict(early=1.5), "early=1.5"), (dict(corrupt="subject"), "sets corrupt")])
def test_bad_settings_are_named(tiny_model, kw, match):
    with pytest.raises(rl.ConfigError, match=match):
        rl.locate(tiny_model, FACTS, **kw)


@pytest.mark.slow
def test_locate_on_the_default_model_agrees_with_its_traces(default_model):
    """docs/experiments.md: with the subject corrupted, the MLP effect at the last subject token is
    early (layer 0, 0.163); with the relation corrupted, almost all of the effect is on the last token
    from layer 0 on."""
    from relation_lens.data import world_trace_facts

    facts = world_trace_facts(limit=24)
    rome = rl.locate(default_model, facts, method="rome", n_samples=3)
    rel = rl.locate(default_model, facts, method="relation_rome", n_samples=3)
    assert rome.layers == (0,) and rel.layers == (0,)
    assert rel.effect[0] > 0.5 and rome.effect[0] > 0.05
    assert rel.allowed == (0, 1)  # early: the first third of 6 layers

