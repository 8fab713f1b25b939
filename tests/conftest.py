import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Key statistics are cached on disk: tests use a temporary cache, never the user's ~/.cache.
import tempfile as _tempfile

os.environ["RELATION_LENS_CACHE"] = _tempfile.mkdtemp(prefix="relation_lens_test_cache_")

import pytest
import torch

# A subprocess a test starts (an experiment's quick run, torchrun) gets CI's own wall-clock limit
# (25 minutes for the whole run), never a tighter one: a run's time depends on the host's load
# (measured: the edit quick run went past a 600 s limit at load 5-6 on 2 cores), its result does not.
SUBPROCESS_TIMEOUT_S = 25 * 60

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
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                                  d_mlp=d_mlp, n_ctx=64, d_vocab=len(tokenizer), seed=0, model_name=name,
                                  default_prepend_bos=True, **cfg_kwargs)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        model.W_U.mul_(sharpen)
    model.eval()
    return model


@pytest.fixture(scope="session")
def default_model():
    import relation_lens as rl

    return rl.load_model()
