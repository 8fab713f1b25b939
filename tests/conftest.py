import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Key statistics are cached on disk: tests use a temporary cache, never the user's ~/.cache.
import tempfile as _tempfile

os.environ["RELATION_LENS_CACHE"] = _tempfile.mkdtemp(prefix="relation_lens_test_cache_")

from pathlib import Path

import pytest
import torch
from cross_line import save_random_folder

from relation_lens.models.bridge import transformer_lens_major

# A subprocess a test starts (an experiment's quick run, torchrun, a notebook's kernel) gets no wall-clock
# limit: its time depends on the host's load, its result does not (an edit quick run with cold statistics
# took 131 s at load 2 and went past a 25-minute limit at load 15-18 on 2 cores, the failure of issue 37's
# item 8). CI's own limit bounds a hang; tests/test_suite_rules.py keeps limits out of the suite.
SUBPROCESS_TIMEOUT_S = None

# float32 tolerances follow from the arithmetic, never tighter (a host's kernels may round and order
# sums differently). EPS32 = 2**-23 = 1.19e-7, the relative spacing of float32 numbers.
EPS32 = torch.finfo(torch.float32).eps


def float32_sum_tolerance(n_terms: int, magnitude: float = 1.0) -> float:
    """Worst-case rounding of a float32 sum (or mean) of ``n_terms`` values of size up to
    ``magnitude``, in any order, plus the final rounding: ``(n_terms + 1) * EPS32 * magnitude``
    (recursive summation, Higham 2002, section 4.2)."""
    return (n_terms + 1) * EPS32 * magnitude


def float32_prob_tolerance(prob: float, logit_absmax: float, d_model: int) -> float:
    """How far a float32 P(target) can move when the same logits are computed by another float32
    path (another batch shape, another kernel): each logit is a ``d_model``-term dot product of
    size up to ``logit_absmax``, rounded with the statistical growth ``sqrt(d_model) * EPS32 *
    logit_absmax`` (Higham 2002, section 2.8); a softmax moves ``P`` by at most ``2 P`` times the
    largest logit change."""
    return 2 * prob * d_model ** 0.5 * EPS32 * logit_absmax


def all_hooks(model) -> int:
    """Hooks registered on any HookPoint of the model (forward and backward)."""
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
               for hp in model.hook_dict.values())


def checksum(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, saved) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# Architectures of the "friends" of GPT-2 XL the tool is meant for: GPT-J (rotary on part of the
# head, attention and MLP in parallel), GPT-NeoX/Pythia (the same with a smaller rotary share),
# LLaMA-style (RMSNorm, gated SiLU MLP, grouped-query attention) and a model without LayerNorm.
ARCHITECTURES = {
    "gptj": dict(positional_embedding_type="rotary", rotary_dim=8, parallel_attn_mlp=True,
                 normalization_type="LN", act_fn="gelu_new"),
    "neox": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True,
                 normalization_type="LN", act_fn="gelu"),
    "llama": dict(positional_embedding_type="rotary", rotary_dim=16, normalization_type="RMS", act_fn="silu",
                  gated_mlp=True, n_key_value_heads=2),
    "no-norm": dict(normalization_type=None, act_fn="relu"),
}


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from relation_lens.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A deterministic random 4-layer GPT-2-style HookedTransformer with the default tokenizer."""
    return random_model(tokenizer, "tiny-random", n_layers=4, d_mlp=128, act_fn="gelu_new",
                        normalization_type="LN")


@pytest.fixture(scope="session")
def tiny_model64(tokenizer):
    """``tiny_model``'s architecture in float64 (HookedTransformer(cfg) keeps the dtype: no weight
    processing casts it): for oracles that read the same numbers through differently batched forward
    passes, where float32's kernels round differently (measured: 1.7e-6 on a residual of norm ~10)."""
    return random_model(tokenizer, "tiny-random-f64", n_layers=4, d_mlp=128, act_fn="gelu_new",
                        normalization_type="LN", dtype=torch.float64)


def random_model(tokenizer, name: str, *, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, d_mlp: int = 96,
                 sharpen: float = 10.0, **cfg_kwargs):
    """A deterministic random HookedTransformer of any architecture TransformerLens describes.

    The unembedding is multiplied by ``sharpen`` so that the model is confident (its top token
    on the tracing prompt has P ~ 0.98 at 10x): then a trace spans most of [0, 1] and an oracle
    tolerance of 1e-5 is tight, where an unscaled random model's probabilities (~1e-3) would make
    it nearly vacuous.
    """
    if transformer_lens_major() >= 4:
        return random_bridge(tokenizer, name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp,
                             sharpen=sharpen, **cfg_kwargs)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                                  d_mlp=d_mlp, n_ctx=64, d_vocab=len(tokenizer), seed=0, model_name=name,
                                  default_prepend_bos=True, **cfg_kwargs)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        model.W_U.mul_(sharpen)
    model.eval()
    return model


_RANDOM_FOLDERS = Path(_tempfile.mkdtemp(prefix="relation_lens_test_models_"))


def hf_config_for(vocab: int, *, n_layers: int, d_model: int, n_heads: int, d_mlp: int, act_fn: str = "relu",
                  normalization_type: str | None = "LN", positional_embedding_type: str = "standard",
                  rotary_dim: int | None = None, parallel_attn_mlp: bool = False, gated_mlp: bool = False,
                  n_key_value_heads: int | None = None, n_ctx: int = 64):
    """The Hugging Face family and config that describe the same architecture as these
    ``HookedTransformerConfig`` settings (what a TransformerBridge wraps): GPT-2 (learned positions,
    LayerNorm), GPT-J (parallel, rotary on ``rotary_dim``, gelu_new), GPT-NeoX (parallel, rotary share,
    gelu), LLaMA (RMSNorm, gated MLP, grouped-query attention). ``None`` where no Hugging Face family has
    it (a model without normalisation)."""
    import transformers as T

    if normalization_type is None:
        return None
    d_head = d_model // n_heads
    if gated_mlp and normalization_type == "RMS" and positional_embedding_type == "rotary":
        assert rotary_dim in (None, d_head), "LLaMA rotates the whole head"
        return T.LlamaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=n_key_value_heads or n_heads, intermediate_size=d_mlp,
                             hidden_act=act_fn, max_position_embeddings=n_ctx, tie_word_embeddings=False)
    assert normalization_type == "LN" and not gated_mlp and n_key_value_heads is None
    if positional_embedding_type == "rotary" and parallel_attn_mlp and act_fn == "gelu_new":
        return T.GPTJConfig(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, rotary_dim=rotary_dim,
                            n_inner=d_mlp, activation_function=act_fn, n_positions=n_ctx, tie_word_embeddings=False)
    if positional_embedding_type == "rotary" and parallel_attn_mlp:
        return T.GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                               num_attention_heads=n_heads, intermediate_size=d_mlp, hidden_act=act_fn,
                               rotary_pct=rotary_dim / d_head, use_parallel_residual=True,
                               max_position_embeddings=n_ctx, tie_word_embeddings=False)
    assert positional_embedding_type == "standard" and not parallel_attn_mlp
    return T.GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
                        activation_function=act_fn, n_positions=n_ctx, tie_word_embeddings=False)


def random_bridge(tokenizer, name: str, *, n_layers: int, d_model: int, n_heads: int, d_mlp: int, sharpen: float,
                  dtype: torch.dtype = torch.float32, seed: int = 0, **cfg_kwargs):
    """``random_model`` under TransformerLens 4 (no ``HookedTransformer``): the same architecture as a
    seeded random Hugging Face model, saved to a folder and loaded by ``rl.load_model`` as a
    TransformerBridge. Its weights are not the 3.x fixture's (another initialisation): tests that hold
    numbers across lines use tests/cross_line.py's folders instead."""
    import relation_lens as rl

    cfg = hf_config_for(len(tokenizer), n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, **cfg_kwargs)
    if cfg is None:
        pytest.skip("no Hugging Face architecture runs without normalisation, so TransformerLens 4 (which wraps "
                    "Hugging Face models only) has no such model; it runs on TransformerLens 3")
    # TransformerLens' own random initialisation (init_mode "gpt2"): std 0.8 / sqrt(d_model), not Hugging
    # Face's 0.02, so that the sharpened head is as confident as the 3.x fixture's
    cfg.initializer_range = 0.8 / d_model ** 0.5
    folder = _RANDOM_FOLDERS / f"{name}-{abs(hash(cfg.to_json_string())) % 10**8}-{str(dtype)[6:]}"
    if not folder.exists():
        save_random_folder(cfg, tokenizer, folder, sharpen=sharpen, seed=seed, dtype=dtype)
    model = rl.load_model(folder, dtype=dtype)
    # the 3.x fixture's tokenisation (its config sets default_prepend_bos=True); a loaded folder follows its
    # tokenizer's own rule, which for the default model's tokenizer is no BOS
    model.cfg.default_prepend_bos = True
    return model


@pytest.fixture(scope="session")
def default_model():
    import relation_lens as rl

    return rl.load_model()
