import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def all_hooks(model) -> int:
    """Hooks registered on any HookPoint of the model (forward and backward)."""
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) + len(hp._forward_pre_hooks)
               for hp in model.hook_dict.values())


def checksum(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, saved) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from relation_lens.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A deterministic random 4-layer GPT-2-style HookedTransformer with the default tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64,
                                  d_vocab=len(tokenizer), act_fn="gelu_new", normalization_type="LN", seed=0,
                                  model_name="tiny-random", default_prepend_bos=True)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


@pytest.fixture(scope="session")
def default_model():
    import relation_lens as rl

    return rl.load_model()
