"""Loading a TransformerLens model name from the Hugging Face hub or its local cache, refusing at
once (:class:`HubUnreachableError`) when the weights are not cached and the hub cannot be reached."""

from __future__ import annotations

import difflib
import os
import socket

import torch

from relation_lens.errors import HubUnreachableError, ModelLoadError
from relation_lens.models.bridge import bridge_from_hf, transformer_lens_major
from relation_lens.models.devices import place


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False

def load_hub(name: str, device: torch.device, dtype: torch.dtype, center: bool = True, n_devices: int = 1):
    if transformer_lens_major() >= 4:
        return _load_hub_bridge(name, device, dtype, center, n_devices)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        close = difflib.get_close_matches(name, loading.OFFICIAL_MODEL_NAMES, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(
            f"unknown model name {name!r}: not 'default', not an existing folder, and not a TransformerLens "
            f"model name.{hint}") from None
    cached = is_cached(official)
    if not cached and not hub_reachable():
        raise HubUnreachableError(
            f"model {name!r} ({official}) is not in the local Hugging Face cache and the hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE=1). Download it on a machine with a network, or pass a local folder.")
    model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype, center_writing_weights=center,
                                              n_devices=n_devices)
    place(model, device, None, n_devices)
    return model

def is_cached(official: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    hit = try_to_load_from_cache(official, "config.json")
    return isinstance(hit, str)


def _load_hub_bridge(name: str, device: torch.device, dtype: torch.dtype, center: bool, n_devices: int):
    """Under TransformerLens 4: a Hugging Face repository id, read with transformers from the cache
    (or the hub), wrapped in a compatibility-mode bridge as local folders are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if n_devices > 1:
        raise ModelLoadError(f"n_devices={n_devices} is not supported under TransformerLens 4 yet (load on one device)")
    if not is_cached(name) and not hub_reachable():
        raise HubUnreachableError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached (no network, or "
            "HF_HUB_OFFLINE=1). Download it on a machine with a network, or pass a local folder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not load {name!r} from the Hugging Face hub or cache "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    model = bridge_from_hf(hf_model, tokenizer, name, name, device, center)
    if dtype != torch.float32:
        model.to(dtype)
    return model
