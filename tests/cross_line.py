"""What the cross-line tests compute, on either line of TransformerLens: seeded random Hugging Face
folders of several architectures, loaded by ``rl.load_model`` (a HookedTransformer under 3.x, a
TransformerBridge under 4.x), traced, attribution-patched and edited. ``tests/data/make_cross_line_reference.py``
writes these numbers under TransformerLens 3.9 into ``tests/data/cross_line_reference.json``;
``tests/test_cross_line.py`` recomputes them on the installed line and compares."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("gpt2", "llama", "gpt_neox", "gptj", "qwen2")
# families only TransformerLens 4 adapts (no 3.9 reference: held to the naive oracle on the bridge)
BRIDGE_ONLY = ("cohere", "granite")
PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
EDIT_LAYER = 1


def make_folder(tokenizer, arch: str, root: Path) -> Path:
    """A small random model of ``arch`` saved by transformers (seed 0; the output head sharpened
    10x so that the probabilities a trace moves are far from 0)."""
    import transformers as T

    V = len(tokenizer)
    cfg = {"gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                        tie_word_embeddings=False),
           "llama": lambda: T.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64),
           "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25,
                                               tie_word_embeddings=False),
           "gptj": lambda: T.GPTJConfig(vocab_size=V, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=64,
                                        tie_word_embeddings=False),
           "qwen2": lambda: T.Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                          tie_word_embeddings=False),
           # parallel attention and MLP, LayerNorm without bias, logit_scale
           "cohere": lambda: T.CohereConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                            logit_scale=0.5, tie_word_embeddings=False),
           # embedding, residual and attention multipliers, logits divided by logits_scaling
           "granite": lambda: T.GraniteConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                              embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                                              attention_multiplier=0.2, tie_word_embeddings=False),
           }[arch]()
    return save_random_folder(cfg, tokenizer, root / f"random-{arch}")


def save_random_folder(cfg, tokenizer, folder: Path, *, sharpen: float = 10.0, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Path:
    """A seeded random Hugging Face model of ``cfg`` (its output head multiplied by ``sharpen``) and
    ``tokenizer``, saved to ``folder`` in ``dtype``."""
    import transformers as T

    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(sharpen)
    hf.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compute(model) -> dict:
    """The numbers compared across lines: exact trace grids (noise, and one head's patch), attribution
    grids, and relation-ROME's update at ``EDIT_LAYER``."""
    import relation_lens as rl
    from relation_lens.tracing.patch import Site

    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=3, seed=0, window=3)
    att = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=3, seed=0, window=3, method="attribution")
    T = len(res.tokens)
    patched = rl.patch(model, PROMPT, subject=SUBJECT, n_samples=3, seed=0,
                       sites=[Site("head", 1, T - 1, head=1), Site("mlp", 0, 4), [Site("resid", 1, 5), Site("attn", 2, T - 1)]])
    stats = rl.KeyStatistics.compute(model, EDIT_LAYER, n_texts=200, progress=False, cache=False)
    request = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    upd = rl.compute_edit(model, request, method="relation_rome", layer=EDIT_LAYER, stats=stats,
                          config=rl.EditConfig(v_steps=5))
    return {"target_token": res.target_token, "clean_prob": res.clean_prob, "corrupted_prob": res.corrupted_prob,
            "grids": {k: v.tolist() for k, v in res.scores.items()},
            "attribution": {k: v.tolist() for k, v in att.scores.items()},
            "patch": list(patched.values),
            "key_count": stats.count,
            "left": upd.left.tolist(), "right": upd.right.tolist()}
