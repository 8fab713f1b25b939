"""MEMIT / relation-MEMIT batch edits and AlphaEdit's projection.

Oracle: every layer's update is recomputed here from MEMIT's objective with independent code (keys
and residual streams read by hooks on the model with the earlier layers' updates written, subject
positions from find_spans), and solved in float64 with an explicit inverse."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EPS32

import relation_lens as rl
from relation_lens.batch_editing import BatchUpdate, Preserve, memit_config

REQUESTS = [rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
            rl.EditRequest("{} is the capital of", "Paris", "Italy"),
            rl.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")]
CONFIG = memit_config(v_steps=3, prefix_lengths=((4, 5),), stats_n_texts=60)  # one prefix per seed word


@pytest.fixture(scope="module")
def stats(tiny_model):
    return {l: rl.KeyStatistics.compute(tiny_model, l, n_texts=60) for l in range(tiny_model.cfg.n_layers)}


@pytest.fixture(scope="module")
def stats64(tiny_model64):
    return {l: rl.KeyStatistics.compute(tiny_model64, l, n_texts=60, precision="float64")
            for l in range(tiny_model64.cfg.n_layers)}


def _key_pos(model, text, subject, method):
    spans = rl.find_spans(model, text, subject, require_relation=False)
    return spans.subject_span[1] - 1 if method == "memit" else len(spans.tokens) - 1


@torch.no_grad()
def _oracle(model, update: BatchUpdate, stats, lam):
    """Per layer: (R, dW) from MEMIT's objective, computed independently."""
    method, layers = update.method, update.layers
    z_layer = layers[-1]
    prefixes = update.info["prefixes"]
    saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in layers}
    out = {}
    try:
        for i, layer in enumerate(layers):
            K, H = [], []
            for r in update.requests:
                groups = [[prefixes[0]], list(prefixes[1:])]
                means = []
                for group in groups:
                    ks = []
                    for prefix in group:
                        text = prefix.format(r.text)
                        pos = _key_pos(model, text, r.subject, method)
                        _, cache = model.run_with_cache(model.to_tokens(text))
                        ks.append(cache[f"blocks.{layer}.mlp.hook_post"][0, pos].double())
                    means.append(torch.stack(ks).mean(0))
                K.append(torch.stack(means).mean(0))
                _, cache = model.run_with_cache(model.to_tokens(r.text))
                H.append(cache[f"blocks.{z_layer}.hook_resid_post"][0, _key_pos(model, r.text, r.subject, method)].double())
            K, H = torch.stack(K), torch.stack(H)
            R = (update.targets - H) / (len(layers) - i)
            C = stats[layer].moment.double()
            dW = torch.inverse(lam * C + K.T @ K) @ K.T @ R
            out[layer] = (K, R, dW)
            W = model.blocks[layer].mlp.W_out
            W.copy_(saved[layer] + update.deltas[layer].to(W.dtype))
    finally:
        for l, W0 in saved.items():
            model.blocks[l].mlp.W_out.copy_(W0)
    return out


@pytest.mark.parametrize("method", ["memit", "relation_memit"])
def test_each_layer_update_is_the_float64_solve_of_memits_objective(tiny_model64, stats64, method):
    """In float64 throughout (model, keys, solve): the library reads keys and residuals in right-padded
    batches, the oracle one sequence per forward, so in float32 the two differ by the kernels' rounding
    (1.7e-6 seen on one host); in float64 the forward passes agree to ~1e-15 relative, and the
    remaining difference is the two solves' (explicit inverse vs LU) on a matrix of condition number
    ``cond``: tolerances 1e-12 on K and R, ``cond * 1e-14`` of scale on dW."""
    model, stats = tiny_model64, stats64
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam = 50.0
    update = rl.compute_edit(model, REQUESTS, method=method, layers=(1, 2), stats=stats, config=CONFIG,
                             mom2_update_weight=lam)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # compute_edit is pure
    assert update.layers == (1, 2) and update.targets.shape == (3, model.cfg.d_model)
    oracle = _oracle(model, update, stats, lam)
    for layer, (K, R, dW) in oracle.items():
        assert (update.keys[layer] - K).abs().max() <= 1e-12 * K.abs().max(), layer
        assert (update.residuals[layer] - R).abs().max() <= 1e-12 * R.abs().max(), layer  # the spread over layers
        cond = torch.linalg.cond(lam * stats[layer].moment.double() + K.T @ K).item()
        assert (update.deltas[layer] - dW).abs().max() <= max(1e-12, cond * 1e-14) * dW.abs().max(), layer
    # the last layer's residual is what is left after the first layer's update: not the first one's halved
    assert not torch.allclose(update.residuals[2], update.residuals[1])


def test_a_batch_edit_takes_and_undoes_bit_exact(default_model):
    model = default_model
    reqs = [rl.EditRequest("{} is located in the continent of", "Germany", "Asia"),
            rl.EditRequest("{} is located in the continent of", "Japan", "Europe")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def p_new(r):
        with torch.no_grad():
            logits = model(r.text)[0, -1]
        return logits.softmax(-1)[model.to_tokens(" " + r.target_new, prepend_bos=False)[0, 0]].item()

    p0 = [p_new(r) for r in reqs]
    # the default model's layers and lambda (DEFAULT_MODEL_MEMIT), MEMIT's value settings
    update = rl.compute_edit(model, reqs, method="relation_memit", config=memit_config(stats_n_texts=300))
    with rl.apply_edit(model, update) as edit:
        p1 = [p_new(r) for r in reqs]
        assert set(edit._saved) == set(update.layers)
    assert all(b > max(0.2, 10 * a) for a, b in zip(p0, p1)), (p0, p1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # undone bit for bit
    # the update's component along d_model's all-ones direction is invisible to the centred model: every
    # reader of the residual stream normalises it away, so the logits are those of the centred update
    centred = dataclasses.replace(update, deltas={l: d - d.mean(-1, keepdim=True) for l, d in update.deltas.items()})
    share = max((d - centred.deltas[l]).norm() / d.norm() for l, d in update.deltas.items())
    assert share > 1e-3  # there is such a component (docs/editing.md: 2.7-5.9% of the norm)
    tokens = model.to_tokens([r.text for r in reqs])
    with torch.no_grad():
        with rl.apply_edit(model, update):
            full = model(tokens)[:, -1]
        with rl.apply_edit(model, centred):
            without_mean = model(tokens)[:, -1]
    tol = 4 * model.cfg.n_layers * model.cfg.d_model ** 0.5 * EPS32 * full.abs().max().item()
    assert (full - without_mean).abs().max() <= tol


def test_alphaedit_projection_leaves_preserved_keys_untouched(tiny_model, stats):
    """For a key in the preserved space (P k = 0: the top eigenvectors of C), k^T dW is 0 to float64
    rounding (1e-10 of ||k|| ||dW||); without the projection it is not."""
    C = stats[2].moment.double()
    eigvals, eigvecs = torch.linalg.eigh(C)
    threshold = float(eigvals.median())
    preserved = eigvecs[:, eigvals >= threshold][:, -5:].T * 3.0  # 5 keys of the preserved space
    pres = Preserve(threshold=threshold, l2=1.0)
    for method, kw in (("relation_memit", dict(layers=(1, 2), config=CONFIG)),
                       ("relation_rome", dict(layer=2, config=rl.EditConfig(v_steps=3, prefix_lengths=((4, 2),),
                                                                              stats_n_texts=60)))):
        st = stats if method.endswith("memit") else stats[2]
        with_p = rl.compute_edit(tiny_model, REQUESTS[:2] if method.endswith("memit") else REQUESTS[0],
                                 method=method, stats=st, preserve=pres, **kw)
        dW = with_p.layer_deltas()[2]
        leak = (preserved @ dW).abs().max() / (preserved.norm(dim=1).max() * dW.norm())
        assert leak <= 1e-10, (method, leak)
        without = rl.compute_edit(tiny_model, REQUESTS[:2] if method.endswith("memit") else REQUESTS[0],
                                  method=method, stats=st, **kw).layer_deltas()[2]
        assert (preserved @ without).abs().max() / (preserved.norm(dim=1).max() * without.norm()) > 1e-4


def test_alphaedit_remembers_edited_keys(tiny_model, stats):
    """In a sequence, the keys of earlier edits enter the solve (C_p): the second update moves an
    earlier edit's key less than it does without that memory."""
    C = stats[2].moment.double()
    threshold = float(torch.linalg.eigvalsh(C).median())
    first = rl.compute_edit(tiny_model, REQUESTS[:1], method="relation_memit", layers=(2,), stats=stats,
                            config=CONFIG, preserve=Preserve(threshold=threshold, l2=1.0))
    remembering = Preserve(threshold=threshold, l2=1.0)
    remembering.remember(first)
    k = first.keys[2]
    with rl.apply_edit(tiny_model, first):
        kw = dict(method="relation_memit", layers=(2,), stats=stats, config=CONFIG)
        forgetful = rl.compute_edit(tiny_model, REQUESTS[1:2], preserve=Preserve(threshold=threshold, l2=1.0), **kw)
        mindful = rl.compute_edit(tiny_model, REQUESTS[1:2], preserve=remembering, **kw)
    # a soft constraint (measured: 0.79 of the forgetful update's effect); without the memory it is 1
    assert (k @ mindful.deltas[2]).norm() < 0.9 * (k @ forgetful.deltas[2]).norm()


def test_alphaedit_memory_is_the_sum_of_every_remembered_edit(tiny_model, stats):
    """After two edits, C_p is K1^T K1 + K2^T K2 (AlphaEdit's cache_c accumulates), and the solve is
    (P (K^T K + C_p) + l2 I)^-1 P K^T R with that sum, written out here (float64)."""
    C = stats[2].moment.double()
    threshold = float(torch.linalg.eigvalsh(C).median())
    kw = dict(method="relation_memit", layers=(2,), stats=stats, config=CONFIG)
    first = rl.compute_edit(tiny_model, REQUESTS[:1], **kw)
    second = rl.compute_edit(tiny_model, REQUESTS[1:2], **kw)
    memory = Preserve(threshold=threshold, l2=1.0)
    memory.remember(first)
    memory.remember(second)
    K1, K2 = first.keys[2], second.keys[2]
    Cp = K1.T @ K1 + K2.T @ K2
    assert torch.allclose(memory.edited[2], Cp, rtol=1e-12, atol=0)
    third = rl.compute_edit(tiny_model, REQUESTS[2:], preserve=memory, **kw)
    eigvals, eigvecs = torch.linalg.eigh((C + C.T) / 2)
    null = eigvecs[:, eigvals < threshold]
    P = null @ null.T
    K, R = third.keys[2], third.residuals[2]
    want = torch.linalg.solve(P @ (K.T @ K + Cp) + torch.eye(P.shape[0], dtype=torch.float64), P @ K.T @ R)
    assert (third.deltas[2] - want).abs().max() <= 1e-9 * want.abs().max()
    only_last = torch.linalg.solve(P @ (K.T @ K + K2.T @ K2) + torch.eye(P.shape[0], dtype=torch.float64),
                                   P @ K.T @ R)
    assert (only_last - want).abs().max() > 1e-4 * want.abs().max()  # the first edit's keys matter


def test_batch_edit_inputs_are_checked(tiny_model, stats):
    with pytest.raises(rl.EditError, match="distinct and ascending"):
        rl.compute_edit(tiny_model, REQUESTS, method="memit", layers=(2, 1), stats=stats, config=CONFIG)
    with pytest.raises(rl.EditError, match="pass layers=, not layer="):
        rl.compute_edit(tiny_model, REQUESTS, method="memit", layer=2)
    with pytest.raises(rl.EditError, match="layers=, mom2_update_weight= and values= are for"):
        rl.compute_edit(tiny_model, REQUESTS[0], method="rome", layers=(1, 2))
    with pytest.raises(rl.EditError, match="out of range"):
        rl.compute_edit(tiny_model, REQUESTS, method="memit", layers=(1, 9), stats=stats, config=CONFIG)
    with pytest.raises(rl.EditError, match="values= takes a ValueCache, got dict"):
        rl.compute_edit(tiny_model, REQUESTS, method="memit", layers=(1, 2), stats=stats, config=CONFIG, values={})


def test_value_cache_reuses_z_on_the_same_weights_only(tiny_model, stats):
    kw = dict(method="relation_memit", layers=(1, 2), stats=stats, config=CONFIG, mom2_update_weight=50.0)
    plain = rl.compute_edit(tiny_model, REQUESTS, **kw)
    cache = rl.ValueCache()
    first = rl.compute_edit(tiny_model, REQUESTS, values=cache, **kw)
    assert len(cache) == 3 and cache.hits == 0 and first == plain  # the cache changes nothing
    again = rl.compute_edit(tiny_model, REQUESTS[::-1], values=cache, **kw)  # another batch of the same requests
    assert cache.hits == 3 and torch.equal(again.targets, plain.targets.flip(0))
    one = rl.compute_edit(tiny_model, REQUESTS[:1], values=cache, **kw)
    assert cache.hits == 4 and torch.equal(one.targets[0], plain.targets[0])
    with rl.apply_edit(tiny_model, one):  # other weights: z is optimised again, not read back
        moved = rl.compute_edit(tiny_model, REQUESTS[1:2], values=cache, **kw)
    assert cache.hits == 4 and len(cache) == 1
    assert not torch.equal(moved.targets[0], plain.targets[1])


def test_evaluate_batch_measures_each_record_with_its_batch_written(default_model):
    from relation_lens.data.counterfact import load_counterfactual

    recs = list(load_counterfactual())[:3]
    res = rl.evaluate_batch(default_model, recs, method="relation_memit", batch_size=2,
                            config=memit_config(stats_n_texts=300))
    assert len(res.records) == 3 and res.settings["batch_size"] == 2 and res.settings["layers"] == [3, 4]
    assert all("ES" in r or "error" in r for r in res.records)
    values = rl.ValueCache()  # batch sizes compared on the same z: the cache changes no number
    cached = rl.evaluate_batch(default_model, recs, method="relation_memit", batch_size=2,
                               config=memit_config(stats_n_texts=300), values=values)
    assert cached.records == res.records and len(values) == 3 and values.hits == 0
    rl.evaluate_batch(default_model, recs, method="relation_memit", batch_size=1, config=memit_config(stats_n_texts=300),
                      values=values)
    assert values.hits == 3
    with pytest.raises(rl.EditError, match="batch_size"):
        rl.evaluate_batch(default_model, recs, batch_size=0)


def test_evaluate_batch_fluency_is_roms_measure_with_the_batch_written(default_model):
    from relation_lens.batch_editing import compute_batch_edit
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.evaluation import ngram_entropy
    from relation_lens.probes import greedy_generate

    recs = list(load_counterfactual())[:2]
    config, values = memit_config(stats_n_texts=300), rl.ValueCache()
    res = rl.evaluate_batch(default_model, recs, method="relation_memit", batch_size=2, config=config,
                            fluency=True, values=values)
    before = {k: v.clone() for k, v in default_model.state_dict().items()}
    # by hand: the same batch written (same z from the cache), then ROME's fluency of each record's generations
    reqs = [rl.EditRequest(r["prompt"], r["subject"], r["target_new"], r["target_true"]) for r in recs]
    update = compute_batch_edit(default_model, reqs, method="relation_memit", layers=[3, 4], config=config,
                                mom2_update_weight=res.settings["mom2_update_weight"], values=values)
    with rl.apply_edit(default_model, update):
        expected = [sum(ngram_entropy(greedy_generate(default_model, g)) for g in r["generation_prompts"])
                    / len(r["generation_prompts"]) for r in recs]
    assert [row["fluency"] for row in res.records] == pytest.approx(expected, abs=1e-12)
    assert res.settings["fluency"] is True
    assert all(torch.equal(before[k], v) for k, v in default_model.state_dict().items())
