"""Behaviour of the embedded default model: it knows its facts, and edits on it work."""

import json
import random

import pytest
import torch
from conftest import all_hooks, checksum, same_weights

import relation_lens as rl
from relation_lens.data import load_world
from relation_lens.models import default_model_path
from relation_lens.probes import known_mask, predict, target_probs


@pytest.mark.slow
def test_accuracy_on_a_sample_of_facts(default_model):
    facts = random.Random(0).sample(list(load_world()), 400)
    train = known_mask(default_model, [f.prompt(i) for f in facts for i in range(len(f.train_templates))],
                       [f.object for f in facts for _ in f.train_templates])
    assert sum(train) / len(train) >= 0.95
    metrics = json.loads((default_model_path() / "metrics.json").read_text())
    for i, full in enumerate(metrics["heldout_accuracy_by_template"]):
        heldout = known_mask(default_model, [f.prompt(i, heldout=True) for f in facts], [f.object for f in facts])
        # the sample agrees with the model card's full measurement
        assert abs(sum(heldout) / len(heldout) - full) < 0.08
    assert metrics["train_template_accuracy"] >= 0.95


@pytest.fixture(scope="module")
def stats(default_model):
    return {layer: rl.KeyStatistics.compute(default_model, layer, n_texts=3000, progress=False) for layer in (0, 4)}


@pytest.fixture(scope="module")
def stats4(stats):
    return stats[4]


# relation-ROME at its default layer (4); ROME at layer 0, where subject tracing peaks on this model
@pytest.mark.slow
@pytest.mark.parametrize("method,layer", [("relation_rome", 4), ("rome", 0)])
def test_edits_take_effect_and_undo_exactly(default_model, stats, method, layer):
    world = load_world()
    facts = [f for f in world.by_relation("P36")[:40]]
    rng = random.Random(1)
    knows = known_mask(default_model, [f.prompt(0) for f in facts], [f.object for f in facts])
    facts = [f for f, k in zip(facts, knows) if k][:6]
    saved = checksum(default_model)
    hits = 0
    for f in facts:
        new = rng.choice([g.object for g in world.by_relation("P36") if g.object != f.object])
        req = rl.EditRequest(f.train_templates[0], f.subject, new, target_true=f.object)
        upd = rl.compute_edit(default_model, req, method=method, layer=layer, stats=stats[layer])
        assert same_weights(default_model, saved)
        W = default_model.blocks[layer].mlp.W_out.detach().double()
        b = default_model.blocks[layer].mlp.b_out.detach().double()
        assert torch.allclose(upd.key @ (W + upd.delta()) + b, upd.value, atol=1e-5)
        with rl.apply_edit(default_model, upd):
            if method == "relation_rome":  # the top prediction is the new object
                top = predict(default_model, [req.text])[0][0][0]
                hits += top == default_model.tokenizer.decode(default_model.to_tokens(" " + new,
                                                                                     prepend_bos=False)[0, :1])
            else:  # ROME's efficacy criterion, P(new) > P(true): on this model ROME at layer 0 often lands a
                # prefix token of the new object first (docs/experiments.md)
                p_new, p_true = target_probs(default_model, [req.text] * 2, [new, f.object])
                hits += bool(p_new > p_true)
        assert same_weights(default_model, saved) and all_hooks(default_model) == 0
        assert all(p.grad is None for p in default_model.parameters())
    # relation-ROME flips every one; ROME (ES 87% on the tuning split) at least half (unedited: none)
    assert hits == len(facts) if method == "relation_rome" else hits >= len(facts) / 2


def test_target_the_model_already_says_is_refused(default_model, stats4):
    f = next(f for f in load_world().by_relation("P36") if f.subject == "France")
    with pytest.raises(rl.EditError, match="already predicts"):
        rl.compute_edit(default_model, rl.EditRequest(f.train_templates[0], "France", f.object), layer=4, stats=stats4)


def test_rome_default_layer_is_the_subject_tracing_peak(default_model):
    from relation_lens.editing import default_layer

    req = rl.EditRequest("The capital of {} is", "Andorra", "Kabul", target_true="Andorra la Vella")
    layer = default_layer(default_model, "rome", req)
    with pytest.warns(rl.TargetWarning, match="scoring its first token"):  # default_layer keeps it quiet
        res = rl.trace(default_model, req.text, subject="Andorra", target="Andorra la Vella", corrupt="subject",
                       kinds=("mlp",), n_samples=5, window=1)
    assert layer == int(res.scores["mlp"][:, res.subject_span[1] - 1].argmax())


def test_trace_on_default_model_restores_at_last_layer(default_model):
    res = rl.trace(default_model, "Germany is located in the continent of", subject="Germany", n_samples=4)
    assert res.correct and res.target.strip() == "Europe"
    assert res.corrupted_prob < res.clean_prob
    assert res.scores["resid"][-1, -1].item() == pytest.approx(res.clean_prob, abs=1e-5)
