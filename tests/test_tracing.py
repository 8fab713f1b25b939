import json
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, all_hooks, checksum, float32_sum_tolerance, random_model, same_weights
from oracle import naive_trace, patched_probability

import relation_lens as rl
from relation_lens.models.bridge import transformer_lens_major
from relation_lens.tracing import TargetWarning, make_noise, window_layers

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


def _oracle_check(model, prompt, subject, target, corrupt, n, window, tol=1e-5):
    res = rl.trace(model, prompt, subject=subject, target=target, corrupt=corrupt, n_samples=n, window=window,
                   seed=3, batch_size=37)
    noise, _ = make_noise(model, n, res.corrupt_span[1] - res.corrupt_span[0], None, 3)
    grids, corrupted = naive_trace(model, model.to_tokens(prompt)[0], res.corrupt_span, noise, res.target_token,
                                   w=window)
    assert res.corrupted_prob == pytest.approx(corrupted, abs=tol)
    for kind in ("resid", "mlp", "attn"):
        assert res.scores[kind].shape == grids[kind].shape
        assert torch.allclose(res.scores[kind], grids[kind], atol=tol), (kind, (res.scores[kind] - grids[kind]).abs().max())
    # the comparison means something only if the grid varies far more than the tolerance
    assert res.scores["resid"].max() - res.scores["resid"].min() > 1000 * tol
    return res


def test_the_first_corrupted_position_is_restored_not_fixed(tiny_model):
    """Cells before the span are filled with the corrupted value without a run; the span's first
    position must be run: with a one-token span, restoring its residual after block 0 undoes most of
    the corruption, and the engine's column equals the naive oracle's (an engine that skipped those
    cells, filling them as it does before the span, fails here)."""
    res = _oracle_check(tiny_model, PROMPT, SUBJECT, None, (2, 3), n=3, window=1)
    first = res.corrupt_span[0]
    # a skipped cell would hold the corrupted value exactly; the oracle's tolerance is 1e-5
    assert abs(res.scores["resid"][0, first] - res.corrupted_prob) > 1e-3


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_engine_matches_naive_oracle_on_other_architectures(tokenizer, arch):
    model = random_model(tokenizer, arch, **ARCHITECTURES[arch])
    _oracle_check(model, PROMPT, SUBJECT, None, "relation", n=3, window=2)


@pytest.mark.parametrize("corrupt,window", [("relation", 3), ("subject", 2), ((1, 3), 10)])
def test_engine_matches_naive_oracle_tiny(tiny_model, corrupt, window):
    _oracle_check(tiny_model, PROMPT, SUBJECT, None, corrupt, n=4, window=window)


@pytest.mark.parametrize("corrupt", ["relation", "subject"])
def test_engine_matches_naive_oracle_default_model(default_model, corrupt):
    from relation_lens.data import load_world

    fact = load_world().by_relation("P30")[0]
    _oracle_check(default_model, fact.prompt(0), fact.subject, fact.object, corrupt, n=3, window=4)


def test_window_is_centred_and_clipped():
    assert list(window_layers(0, 10, 12)) == list(range(0, 5))
    assert list(window_layers(6, 10, 12)) == list(range(1, 11))
    assert list(window_layers(11, 10, 12)) == list(range(6, 12))
    assert list(window_layers(5, 3, 12)) == [4, 5, 6]
    assert list(window_layers(5, 1, 12)) == [5]


def test_invariants(tiny_model):
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=5, seed=1)
    tokens = tiny_model.to_tokens(PROMPT)[0]
    T = len(tokens)
    noise, _ = make_noise(tiny_model, 5, res.corrupt_span[1] - res.corrupt_span[0], None, 1)
    # restoring every position at layer 0 gives the clean probability; restoring nothing, the corrupted one
    everything = patched_probability(tiny_model, tokens, res.corrupt_span, noise, res.target_token,
                                     [("blocks.0.hook_resid_pre", range(T))])
    assert everything == pytest.approx(res.clean_prob, abs=1e-6)
    nothing = patched_probability(tiny_model, tokens, res.corrupt_span, noise, res.target_token)
    assert nothing == pytest.approx(res.corrupted_prob, abs=1e-6)
    # the last residual state at the last position is the whole answer
    assert res.scores["resid"][-1, -1].item() == pytest.approx(res.clean_prob, abs=1e-6)
    # restoring a state before the corrupted span changes nothing
    a = res.corrupt_span[0]
    for kind in res.scores:
        assert torch.allclose(res.scores[kind][:, :a], torch.tensor(res.corrupted_prob), atol=1e-6)
    assert res.target == res.clean_top and res.correct


def test_same_seed_same_numbers_and_batch_size_does_not_matter(tiny_model):
    a = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=3, seed=7, batch_size=512)
    b = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=3, seed=7, batch_size=3)
    c = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=3, seed=8)
    for k in a.scores:
        assert torch.allclose(a.scores[k], b.scores[k], atol=1e-6)
    assert not torch.allclose(a.scores["resid"], c.scores["resid"])


def test_explicit_noise_tensor_is_used_exactly(tiny_model):
    a = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=4, seed=5)
    span_len = a.corrupt_span[1] - a.corrupt_span[0]
    noise, std = make_noise(tiny_model, 4, span_len, None, 5)
    b = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=4, noise=noise)
    for k in a.scores:
        assert torch.equal(a.scores[k], b.scores[k])
    assert b.noise_std is None and a.noise_std == pytest.approx(3 * tiny_model.W_E.std().item())
    zero = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, noise=0.0, kinds=("resid",))
    assert zero.corrupted_prob == pytest.approx(zero.clean_prob, abs=1e-6)


def test_model_left_untouched(tiny_model):
    saved = checksum(tiny_model)
    rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2)
    assert all_hooks(tiny_model) == 0
    assert same_weights(tiny_model, saved)
    with pytest.raises(rl.NoiseError):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, noise=torch.zeros(3, 1, 64))
    assert all_hooks(tiny_model) == 0


def test_no_hook_left_when_engine_raises(tiny_model, monkeypatch):
    import relation_lens.tracing as tr
    import relation_lens.tracing.engine as engine

    real = engine.run_block_cached

    def boom(model, layer, *a, **k):  # block 2 fails in the middle of the engine's patched runs
        if layer == 2 and a and a[0] is not None and len(a) > 1:
            raise RuntimeError("boom")
        return real(model, layer, *a, **k)

    monkeypatch.setattr(engine, "run_block_cached", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tr.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2)
    monkeypatch.undo()
    assert all_hooks(tiny_model) == 0
    rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2)  # and the model traces as before


def test_json_round_trip(tiny_model, tmp_path):
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds=("resid", "mlp"))
    back = rl.TraceResult.from_json(res.to_json(tmp_path / "t.json"))
    assert back.tokens == res.tokens and back.subject_span == res.subject_span
    for k in res.scores:
        assert torch.allclose(back.scores[k], res.scores[k])
    again = rl.TraceResult.from_json(tmp_path / "t.json")
    assert again == back == res  # values compare equal, tensors element by element
    other = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds=("resid", "mlp"), seed=1)
    assert other != res and other.prompt == res.prompt
    json.loads(res.to_json())
    # a one-line summary for notebooks, with the peak site of each kind, not a tensor dump
    layer, pos, value = res.peak("mlp")
    assert value == res.scores["mlp"].max().item() and res.scores["mlp"][layer, pos].item() == value
    text = repr(res)
    assert "\n" not in text and "tensor(" not in text and PROMPT in text
    assert f"mlp L{layer}@{res.tokens[pos]!r}" in text


def test_views(tiny_model, tmp_path):
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2)
    for ext in ("png", "pdf", "svg"):
        res.plot(tmp_path / f"t.{ext}")
        assert (tmp_path / f"t.{ext}").stat().st_size > 1000
    page = res.to_html()
    assert "data:image/png;base64," in page
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page  # inline bundle, works offline
    assert "ColoredTokensMulti" in page and len(page) > 100_000


def test_target_handling(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, target="Seattle", n_samples=2, kinds=("resid",))
    assert res.target == " Seattle" and res.target_n_tokens == 1
    with pytest.warns(TargetWarning, match="first token"):
        long = rl.trace(tiny_model, PROMPT, subject=SUBJECT, target="Seattle Washington rainy town", n_samples=2,
                        kinds=("resid",))
    assert long.target_n_tokens > 1 and long.target_token == tiny_model.to_tokens(" Seattle", prepend_bos=False)[0, 0]
    with pytest.raises(rl.TargetError, match="empty"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, target="  ")


def test_bad_input(tiny_model):
    saved = checksum(tiny_model)
    with pytest.raises(rl.SpanError, match="does not occur"):
        rl.trace(tiny_model, PROMPT, subject="Eiffel Tower")
    with pytest.raises(rl.SpanError, match="relation span is empty"):
        rl.trace(tiny_model, "I visited the Space Needle", subject="the Space Needle")
    # subject tracing does not need relation words
    rl.trace(tiny_model, "I visited the Space Needle", subject="the Space Needle", corrupt="subject",
             n_samples=2, kinds=("resid",))
    with pytest.raises(rl.PromptError, match="longer than the model's context"):
        rl.trace(tiny_model, "The Space Needle " + "is very tall and " * 20 + "in", subject=SUBJECT)
    with pytest.raises(rl.SpanError, match="not a non-empty range"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, corrupt=(3, 99))
    with pytest.raises(rl.SpanError, match="corrupt="):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, corrupt="object")
    with pytest.raises(rl.UnsupportedModelError, match="HookedTransformer"):
        rl.trace(torch.nn.Linear(2, 2), PROMPT, subject=SUBJECT)
    with pytest.raises(rl.ConfigError, match=r"unknown kind\(s\) \['heads'\]"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, kinds=("resid", "heads"))
    with pytest.raises(rl.ConfigError, match="kinds .* is empty"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, kinds=())
    for name, value in (("window", 0), ("window", -1), ("batch_size", 0), ("batch_size", -3)):
        with pytest.raises(rl.ConfigError, match=f"{name} must be a positive int.*, got {value}"):
            rl.trace(tiny_model, PROMPT, subject=SUBJECT, **{name: value})
    with pytest.raises(rl.ConfigError, match=r"unknown tracing setting\(s\) \['windows'\]"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, windows=3)
    with pytest.raises(rl.NoiseError, match="noise std"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, noise=float("nan"))
    with pytest.raises(rl.NoiseError, match="noise='gauss'"):
        rl.trace(tiny_model, PROMPT, subject=SUBJECT, noise="gauss")
    # a long prompt is quoted head ... tail with its length, not whole
    long_prompt = "The Space Needle " + "is very tall and " * 200 + "in"
    with pytest.raises(rl.PromptError, match=rf"\({len(long_prompt)} characters\) is \d+ tokens") as info:
        rl.trace(tiny_model, long_prompt, subject=SUBJECT)
    assert len(str(info.value)) < 300
    assert all_hooks(tiny_model) == 0 and same_weights(tiny_model, saved)


def test_one_kind_as_a_string(tiny_model):
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds="mlp", window=2)
    assert res.kinds == ("mlp",)


def test_default_window_is_depth_scaled_for_every_caller(tiny_model, default_model):
    from relation_lens.tracing import TraceConfig, depth_scaled_window

    assert TraceConfig().window is None
    assert [depth_scaled_window(n) for n in (48, 12, 6, 4)] == [10, 2, 1, 1]
    res = rl.trace(default_model, "Germany is located in the continent of", subject="Germany", n_samples=2,
                   kinds="mlp")
    assert res.window == 1  # 10 of 48 layers scaled to 6, not 10 (which restores every layer)
    res = rl.trace(tiny_model, PROMPT, subject=SUBJECT, n_samples=2, kinds="mlp", window=3)
    assert res.window == 3


def test_attention_only_model_has_no_mlp(tokenizer):
    if transformer_lens_major() >= 4:
        pytest.skip("no Hugging Face architecture is attention-only, so TransformerLens 4 (which wraps Hugging Face "
                    "models only) has no such model; it runs on TransformerLens 3")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=32, d_vocab=len(tokenizer),
                                  attn_only=True, act_fn="gelu", seed=1)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with pytest.raises(rl.UnsupportedModelError, match="attention-only"):
        rl.trace(model, PROMPT, subject=SUBJECT)
    res = rl.trace(model, PROMPT, subject=SUBJECT, kinds=("resid", "attn"), n_samples=2, window=2)
    noise, _ = make_noise(model, 2, res.corrupt_span[1] - res.corrupt_span[0], None, 0)
    grids, _ = naive_trace(model, model.to_tokens(PROMPT)[0], res.corrupt_span, noise, res.target_token,
                           kinds=("resid", "attn"), w=2)
    assert torch.allclose(grids["attn"], res.scores["attn"], atol=1e-5)


def test_trace_dataset(tiny_model, tmp_path):
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "target": "Seattle"},
             ("The capital of France is", "France"),
             {"prompt": "Germany is located in the continent of", "subject": "Germany"}]
    res = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2)
    # targets None are the model's own prediction, hence correct; "Seattle" is likely wrong for a random model
    n_wrong = sum(not r.correct for r in res.results)
    assert res.n_total == 3 and res.n_incorrect == n_wrong and res.n_used == 3 - n_wrong
    kept = [r for r, u in zip(res.results, res.used) if u]
    from relation_lens.tracing import bucketize
    manual = torch.stack([bucketize(r, "mlp") for r in kept]).nanmean(0)
    # float32 means of len(kept) probabilities (<= 1) in another order
    assert torch.allclose(res.mean["mlp"], manual, equal_nan=True, rtol=0, atol=float32_sum_tolerance(len(kept)))
    assert res.mean["resid"].shape == (tiny_model.cfg.n_layers, len(res.buckets))
    everything = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2, exclude_incorrect=False)
    assert everything.n_used == 3
    assert int(everything.count[-1]) == 3  # every prompt has a last token
    with_middle = sum(r.subject_span[1] - r.subject_span[0] > 2 for r in everything.results)
    assert int(everything.count[1]) == with_middle >= 1  # "The Space Needle" has a middle token
    res.plot(tmp_path / "d.png")
    assert "data:image/png" in res.to_html()
    back = rl.DatasetTraceResult.from_json(res.to_json(tmp_path / "d.json"))
    assert rl.DatasetTraceResult.from_json(tmp_path / "d.json").to_json() == back.to_json() == res.to_json()
    assert back == res  # NaN (buckets no prompt has) compares equal to NaN
    assert repr(res).startswith(f"DatasetTraceResult({res.n_used} of {res.n_total} prompts") and "tensor(" not in repr(res)
    assert torch.allclose(back.mean["attn"], res.mean["attn"], equal_nan=True)
    # a fact that cannot be traced is skipped with its reason, or raises when asked to
    bad = facts + [("I visited Paris", "Paris")]
    part = rl.trace_dataset(tiny_model, bad, n_samples=2, window=2, kinds=("resid",))
    assert part.n_total == 3 and part.skipped[0][0] == 3 and "relation span is empty" in part.skipped[0][1]
    with pytest.raises(rl.SpanError):
        rl.trace_dataset(tiny_model, bad, n_samples=2, window=2, kinds=("resid",), skip_invalid=False)


def test_buckets():
    from relation_lens.tracing import bucket_positions

    R = rl.TraceResult(prompt="", tokens=tuple("abcdefghij"), subject="bcd", subject_span=(1, 4),
                       relation_span=(4, 10), corrupt="relation", corrupt_span=(4, 10), target="x", target_token=0,
                       target_requested=None, target_n_tokens=1, clean_top="x", clean_top_token=0, clean_prob=1.0,
                       corrupted_prob=0.0, scores={}, window=1, n_samples=1, noise_std=1.0, seed=0, model_name="m")
    b = bucket_positions(R)
    assert b["first subject"] == [1] and b["middle subject"] == [2] and b["last subject"] == [3]
    assert b["first relation"] == [4] and b["middle relation"] == [5, 6, 7] and b["last relation"] == [8]
    assert b["last token"] == [9]


@pytest.mark.parametrize("pack", [1, 2])
def test_trace_dataset_gives_prompt_i_the_seed_plus_i(tiny_model, pack):
    """Prompt i is traced with noise seed ``seed + i`` (the docstring's promise), packed or not: each
    result is the single trace with that seed, and not the one with the dataset's seed."""
    facts = [(PROMPT, SUBJECT), ("The capital of France is", "France"),
             ("Germany is located in the continent of", "Germany")]
    res = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2, seed=5, pack=pack, exclude_incorrect=False,
                           metric="logprob")
    for i, ((prompt, subject), got) in enumerate(zip(facts, res.results)):
        alone = rl.trace(tiny_model, prompt, subject=subject, n_samples=2, window=2, seed=5 + i,
                         noise=res.results[0].noise_std, metric="logprob")
        assert got.seed == 5 + i
        for kind in alone.scores:  # packed runs pad, so float rounding differs (5e-6 relative to |log P|)
            scale = max(1.0, alone.scores[kind].abs().max().item())
            assert (got.scores[kind] - alone.scores[kind]).abs().max() <= 5e-6 * scale, (i, kind)
        if i:
            other = rl.trace(tiny_model, prompt, subject=subject, n_samples=2, window=2, seed=5,
                             noise=res.results[0].noise_std, metric="logprob")
            assert (got.scores["resid"] - other.scores["resid"]).abs().max() > 1e-3  # the seed shows
