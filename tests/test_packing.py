"""Cross-prompt batching: sites of several prompts (of different lengths) share engine batches,
padded and masked, and give the per-prompt ``trace()`` grids."""

from __future__ import annotations

import pytest
import torch

import relation_lens as rl
from relation_lens.tracing.api import trace_packed
from relation_lens.tracing.config import TraceConfig

FACTS = [("The Space Needle is located in the city of", "The Space Needle", None),
         ("Paris is the capital of", "Paris", None),
         ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", None),
         ("Toko Yasuda, who plays the instrument", "Toko Yasuda", None)]
TOL = 5e-6  # padded attention sums the same terms in another order: float32 rounding (ulp at 1 is 1.2e-7)


def _worst_gap(model, cfg, batch_size):
    items = [(p, s, t, cfg.replace(seed=i)) for i, (p, s, t) in enumerate(FACTS)]
    got = trace_packed(model, items, batch_size=batch_size)
    worst = 0.0
    for (p, s, t, c), g in zip(items, got):
        ref = rl.trace(model, p, subject=s, target=t, config=c)
        assert g.target_token == ref.target_token and g.corrupted_prob == ref.corrupted_prob
        for k in ref.scores:
            worst = max(worst, (ref.scores[k] - g.scores[k]).abs().max().item())
    return worst


@pytest.mark.parametrize("corrupt", ["relation", "subject"])
def test_packed_batches_equal_per_prompt_traces(tiny_model, corrupt):
    # 48 rows = 16 cells of 3 samples: batches mix prompts, positions and start layers
    cfg = TraceConfig(n_samples=3, window=3, corrupt=corrupt)
    assert _worst_gap(tiny_model, cfg, batch_size=48) <= TOL


def test_packed_batches_on_a_rotary_model(tmp_path, tokenizer):
    """Left-padded cached prefixes must keep each row's rotary positions (from the attention mask)."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = rl.load_model(tmp_path / "llama")
    assert _worst_gap(model, TraceConfig(n_samples=2, window=2), batch_size=40) <= TOL


def test_trace_dataset_packed_and_unpacked_agree(tiny_model):
    facts = [(p, s) for p, s, _ in FACTS]
    packed = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2, exclude_incorrect=False, pack=3)
    single = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2, exclude_incorrect=False, pack=1)
    for a, b in zip(packed.results, single.results):
        for k in a.scores:
            assert (a.scores[k] - b.scores[k]).abs().max() <= TOL
    for k in packed.mean:
        assert torch.allclose(packed.mean[k], single.mean[k], atol=TOL, equal_nan=True)


def test_a_bad_prompt_in_a_pack_is_skipped_alone(tiny_model):
    facts = [FACTS[0][:2], ("I visited the Louvre", "the Louvre"), FACTS[1][:2]]  # the 2nd has no relation words
    res = rl.trace_dataset(tiny_model, facts, n_samples=2, window=2, kinds="resid", pack=3)
    assert [i for i, _ in res.skipped] == [1] and res.n_total == 2


@pytest.mark.parametrize("pack", [0, -2])
def test_pack_is_checked(tiny_model, pack):
    with pytest.raises(rl.ConfigError, match="pack must be a positive whole number"):
        rl.trace_dataset(tiny_model, [FACTS[0][:2]], pack=pack)
