import dataclasses

import pytest
import torch
from conftest import ARCHITECTURES, all_hooks, checksum, random_model, same_weights

import relation_lens as rl
from relation_lens.editing import EditConfig, EditRequest, RankOneUpdate, apply_edit, compute_edit
from relation_lens.key_statistics import KeyStatistics
from relation_lens.model_interface import mlp_out, mlp_out_bias

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too


def _w_out_key(model, layer):
    """The state_dict name of block ``layer``'s MLP output matrix (``blocks.l.mlp.W_out`` on
    TransformerLens 3; the wrapped module's weight on a bridge, ``W_out`` itself or its transpose)."""
    ptr = mlp_out(model, layer).data_ptr()
    return next(k for k, v in model.state_dict().items() if v.data_ptr() == ptr)

# r-ROME keys and the scale-free lr (the tests of exactness use k* in every term); 4 generated tokens
FAST = EditConfig(v_steps=12, prefix_lengths=((5, 3),), key_mode="symmetric", v_lr_scale="rms")
TEXTS = [f"{a} is located in the country of {b}." for a in ("Paris", "Lyon", "Berlin", "Rome", "Oslo", "Tokyo")
         for b in ("France", "Germany", "Italy", "Norway", "Japan")] * 4


@pytest.fixture(scope="module")
def tiny_stats(tiny_model, tmp_path_factory):
    return {layer: KeyStatistics.compute(tiny_model, layer, TEXTS, n_texts=None, progress=False,
                                         directory=tmp_path_factory.mktemp("stats"))
            for layer in range(tiny_model.cfg.n_layers)}


def _direct_moment(model, layer, texts):
    """E[k k^T] in float64 from one unbatched forward per text (BOS excluded)."""
    keys = []
    for t in texts:
        _, cache = model.run_with_cache(t, names_filter=f"blocks.{layer}.mlp.hook_post")
        keys.append(cache[f"blocks.{layer}.mlp.hook_post"][0, 1:].double())
    k = torch.cat(keys)
    return k.T @ k / k.shape[0], k.shape[0]


def test_key_statistics_match_direct_computation(tiny_model, tmp_path):
    direct, count = _direct_moment(tiny_model, 1, TEXTS[:10])
    # Batch 1: the activations are the same float32 numbers as the direct run's (same shapes, same
    # kernels), so only the order of the float64 sums differs: agreement to float64 rounding.
    one = KeyStatistics.compute(tiny_model, 1, TEXTS[:10], n_texts=None, progress=False, directory=tmp_path / "a",
                                batch_size=1, precision="float64")
    assert one.count == count
    assert torch.allclose(one.moment, direct, rtol=0, atol=1e-12 * direct.abs().max())
    # Batch 3, the default precision: the float32 activations themselves may differ in the last bits (a
    # padded batch can pick other matmul kernels, e.g. on AVX-512 hosts) and each batch's k^T k is summed
    # in float32 (over at most 3 texts' keys), so the tolerance is float32's: a relative error of a few
    # units of 2**-24 per term, 1e-5 of the largest entry leaves two orders of margin.
    stats = KeyStatistics.compute(tiny_model, 1, TEXTS[:10], n_texts=None, progress=False, directory=tmp_path,
                                  batch_size=3)
    assert stats.count == count
    assert torch.allclose(stats.moment, direct, rtol=0, atol=1e-5 * direct.abs().max())
    assert not torch.allclose(stats.moment, direct * (1 + 1e-3), rtol=0, atol=1e-5 * direct.abs().max())
    again = KeyStatistics.compute(tiny_model, 1, TEXTS[:10], n_texts=None, progress=False, directory=tmp_path)
    assert torch.equal(again.moment, stats.moment) and again == stats  # from the disk cache
    assert [p.suffix for p in tmp_path.iterdir() if p.is_file()] == [".safetensors"]  # no temporary file left


def test_compute_edit_is_pure_and_update_is_exact(tiny_model, tiny_stats):
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    saved = checksum(tiny_model)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    upd = compute_edit(tiny_model, req, method="relation_rome", layer=2, stats=tiny_stats[2], config=FAST)
    assert same_weights(tiny_model, saved) and all_hooks(tiny_model) == 0
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert torch.linalg.matrix_rank(upd.delta()) == 1
    again = compute_edit(tiny_model, req, method="relation_rome", layer=2, stats=tiny_stats[2], config=FAST)
    assert again == upd  # deterministic, and comparable as a value
    assert compute_edit(tiny_model, req, method="relation_rome", layer=1, stats=tiny_stats[1], config=FAST) != upd
    assert f"||delta||_F {upd.delta().norm().item():.3g})" in repr(upd) and "tensor(" not in repr(upd)
    text = repr(tiny_stats[2])
    assert text.startswith("KeyStatistics(layer 2, [128 x 128] from ") and "tensor(" not in text
    W = tiny_model.blocks[2].mlp.W_out.detach().double()
    b = mlp_out_bias(tiny_model, 2).detach().double()
    assert torch.allclose(upd.key @ (W + upd.delta()) + b, upd.value, atol=1e-6)
    # the key is at the prompt's last token for relation-ROME
    for pos, pre in zip(upd.key_positions, upd.info["prefixes"]):
        text = pre.replace("{}", "") + req.text
        assert pos == len(tiny_model.to_tokens(text)[0]) - 1


def test_rome_keys_on_last_subject_token(tiny_model, tiny_stats):
    req = EditRequest("{} is located in the country of", "The Space Needle", "Japan")
    upd = compute_edit(tiny_model, req, method="rome", layer=1, stats=tiny_stats[1], config=FAST)
    toks = tiny_model.to_str_tokens(req.text)
    assert "".join(toks[1:upd.key_positions[0] + 1]) == "The Space Needle"


def test_apply_and_undo_bit_exact_and_sequential(tiny_model, tiny_stats):
    saved = checksum(tiny_model)
    reqs = [EditRequest("{} is located in the country of", s, t) for s, t in
            (("Paris", "Japan"), ("Berlin", "Norway"), ("Rome", "France"))]
    edits = []
    for _i, r in enumerate(reqs):
        upd = compute_edit(tiny_model, r, layer=2, stats=tiny_stats[2], config=FAST)
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        edits.append(apply_edit(tiny_model, upd))
        changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == [_w_out_key(tiny_model, 2)]
    with pytest.raises(rl.EditError, match="changed since"):
        edits[0].undo()  # out of order
    for e in reversed(edits):
        e.undo()
    assert same_weights(tiny_model, saved)
    with pytest.raises(rl.EditError, match="already undone"):
        edits[0].undo()
    upd = compute_edit(tiny_model, reqs[0], layer=2, stats=tiny_stats[2], config=FAST)
    with apply_edit(tiny_model, upd) as e:
        assert not same_weights(tiny_model, saved)
    assert not e.active and same_weights(tiny_model, saved)


def test_asymmetric_keys_differ(tiny_model, tiny_stats):
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    a = compute_edit(tiny_model, req, layer=2, stats=tiny_stats[2], config=FAST)
    b = compute_edit(tiny_model, req, layer=2, stats=tiny_stats[2],
                     config=dataclasses.replace(FAST, key_mode="asymmetric"))
    assert torch.allclose(a.left, b.left) and not torch.allclose(a.right, b.right)


def test_bad_requests():
    with pytest.raises(rl.EditError, match="exactly one"):
        EditRequest("Paris is located in", "Paris", "Rome")
    with pytest.raises(rl.EditError, match="empty or whitespace"):
        EditRequest("{} is in", "Paris", "   ")
    with pytest.raises(rl.EditError, match="subject"):
        EditRequest("{} is in", "", "Rome")
    # EditConfig checks its Literal fields itself; under pytest, jaxtyping's import hook (beartype) may
    # reject the value first with a TypeError naming the same field
    with pytest.raises((rl.EditError, TypeError), match="key_mode"):
        EditConfig(key_mode="sideways")


def test_bad_edits_leave_model_unchanged(tiny_model, tiny_stats):
    saved = checksum(tiny_model)
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    with pytest.raises(rl.EditError, match="out of range"):
        compute_edit(tiny_model, req, layer=7, stats=tiny_stats[2], config=FAST)
    with pytest.raises(rl.EditError, match="statistics are for layer"):
        compute_edit(tiny_model, req, layer=1, stats=tiny_stats[2], config=FAST)
    with pytest.raises(rl.SpanError, match="no relation tokens"):
        compute_edit(tiny_model, EditRequest("I saw {}", "Paris", "Japan"), layer=2, stats=tiny_stats[2], config=FAST)
    nan_stats = KeyStatistics(2, torch.full_like(tiny_stats[2].moment, float("nan")), 1, "", "", 1)
    with pytest.raises(rl.EditError, match="NaN or Inf"):
        compute_edit(tiny_model, req, layer=2, stats=nan_stats, config=FAST)
    upd = compute_edit(tiny_model, req, layer=2, stats=tiny_stats[2], config=FAST)
    bad = RankOneUpdate(2, upd.left * float("inf"), upd.right, upd.key, upd.value, upd.method, req, ())
    with pytest.raises(rl.EditError, match="NaN or Inf"):
        apply_edit(tiny_model, bad)
    assert same_weights(tiny_model, saved) and all_hooks(tiny_model) == 0


def test_half_precision_is_refused(tokenizer):
    model = random_model(tokenizer, "half", n_layers=2, d_model=32, n_heads=2, d_mlp=64, act_fn="gelu",
                         dtype=torch.float16)
    saved = checksum(model)
    with pytest.raises(rl.EditError, match="float16"):
        compute_edit(model, EditRequest("{} is in", "Paris", "Japan"), layer=1)
    assert same_weights(model, saved)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("method", ["relation_rome", "rome"])
def test_edit_on_other_architectures(tokenizer, tmp_path, arch, method):
    """GPT-J / NeoX (parallel attention and MLP, rotary), LLaMA-style (gated MLP: the key is the
    input of W_out, hook_post) and a norm-free model: the update is exact, rank one, touches only
    W_out of the edited layer, and makes the model answer the new target. No prefixes, so k* is the
    prompt's own key and the check does not depend on how well tiny statistics generalise."""
    model = random_model(tokenizer, arch, **ARCHITECTURES[arch])
    stats = KeyStatistics.compute(model, 1, TEXTS, n_texts=None, progress=False, directory=tmp_path)
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    new = model.to_tokens(" Japan", prepend_bos=False)[0, 0]
    p_before = model(req.text)[0, -1].softmax(-1)[new].item()
    # the default model preset's formulas (named options): the thresholds below were measured with them
    config = EditConfig.default_model_preset(prefix_lengths=(), v_weight_decay=0.5, clamp_norm_factor=4.0, v_steps=20)
    upd = compute_edit(model, req, method=method, layer=1, stats=stats, config=config)
    W = model.blocks[1].mlp.W_out.detach().double()
    b = mlp_out_bias(model, 1).detach().double()
    assert torch.allclose(upd.key @ (W + upd.delta()) + b, upd.value, atol=1e-6)
    assert torch.linalg.matrix_rank(upd.delta()) == 1
    before = checksum(model)
    with apply_edit(model, upd):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == [_w_out_key(model, 1)]
        p_after = model(req.text)[0, -1].softmax(-1)[new].item()
    assert same_weights(model, before)
    assert p_after > p_before
    if method == "relation_rome":
        # the key is the last token, so the written update does most of what the value optimisation
        # found (the rest is lost to side effects at other positions, whose keys meet the new W_out too:
        # 0.95 -> 0.77 on the norm-free model, within 0.01 elsewhere). ROME's key
        # is the subject token, whose effect on the answer must pass through random attention: its
        # clamped v* reaches only ~1e-5 on these models, so only the direction is asserted for it.
        assert p_after > 0.5, (p_before, upd.info["history"][-1]["p_new"], p_after)


def test_statistics_cache_writes_atomically_under_concurrency(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from relation_lens.key_statistics import _atomic_save

    file = tmp_path / "stats.safetensors"
    payloads = [{"moment": torch.full((64, 64), float(i), dtype=torch.float64)} for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: _atomic_save(t, file), payloads))
    from safetensors.torch import load_file

    got = load_file(file)["moment"]
    assert any(torch.equal(got, p["moment"]) for p in payloads)  # one whole payload, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary file left


def _synthetic_stats(d: int, g: torch.Generator) -> tuple[torch.Tensor, KeyStatistics]:
    """A well-conditioned second moment at layer 2: eigenvalues 0.1 .. 10, random eigenvectors drawn from ``g``."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    C = q @ torch.diag(torch.logspace(-1, 1, d, dtype=torch.float64)) @ q.T
    return C, KeyStatistics(layer=2, moment=C, count=1000, model_fingerprint="synthetic", corpus_hash="synthetic",
                            n_texts=1)


def test_left_vector_is_the_inverse_second_moment_times_the_key(tiny_model, tiny_stats):
    """u = C^-1 k*: C u is k* (float64 direct solve), and the update leaves alone every key k with
    k . u = 0, i.e. the keys C-orthogonal to k*. Replacing C^-1 by C, or dropping it, fails here."""
    # a well-conditioned second moment (eigenvalues 0.1 .. 10, random eigenvectors): the tiny corpus's own
    # is singular, and the identity to check is exact algebra either way
    g = torch.Generator().manual_seed(0)
    d = tiny_model.cfg.d_mlp
    C, stats = _synthetic_stats(d, g)
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    upd = compute_edit(tiny_model, req, method="relation_rome", layer=2, stats=stats, config=FAST)
    k = upd.key
    assert torch.allclose(C @ upd.left, k, rtol=0, atol=1e-8 * k.abs().max())
    assert torch.allclose(upd.left, torch.linalg.solve(C, k), rtol=1e-9, atol=0)
    # a key C-orthogonal to k*: k_perp^T C^-1 k* = 0
    other = torch.randn(k.shape[0], generator=g, dtype=torch.float64)
    k_perp = other - (other @ upd.left) / (k @ upd.left) * k
    assert abs(float(k_perp @ upd.left)) < 1e-9 * float(other.norm() * upd.left.norm())
    assert (k_perp @ upd.delta()).abs().max() < 1e-9 * float(upd.delta().abs().max() * k_perp.norm())
    # and the update is not the plain-key one that ignores C
    plain = k / k.norm()
    assert (upd.left / upd.left.norm() - plain).norm() > 1e-2


def test_ridge_is_relative_to_the_mean_diagonal_of_c(tiny_model):
    """EditConfig(ridge=r) solves (C + r mean(diag C) I) u = k* (written out here, float64); mean(diag C)
    is 2.15 for this C, so a ridge without that scaling fails; the edited key still maps to v* exactly."""
    g = torch.Generator().manual_seed(1)
    d = tiny_model.cfg.d_mlp
    C, stats = _synthetic_stats(d, g)
    req = EditRequest("{} is located in the country of", "Paris", "Japan")
    upd = compute_edit(tiny_model, req, method="relation_rome", layer=2, stats=stats,
                       config=dataclasses.replace(FAST, ridge=0.5))
    ridged = C + 0.5 * (torch.trace(C) / d) * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(upd.left, torch.linalg.solve(ridged, upd.key), rtol=1e-9, atol=0)
    unscaled = torch.linalg.solve(C + 0.5 * torch.eye(d, dtype=torch.float64), upd.key)
    assert (upd.left - unscaled).norm() > 1e-2 * upd.left.norm()
    W = tiny_model.blocks[2].mlp.W_out.detach().double()
    b = mlp_out_bias(tiny_model, 2).detach().double()
    assert torch.allclose(upd.key @ (W + upd.delta()) + b, upd.value, atol=1e-6)
