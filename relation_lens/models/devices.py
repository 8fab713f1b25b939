"""Devices and dtypes: checking what was asked for against this machine, and placing a model (on one
device, or its blocks split over several CUDA devices as TransformerLens' ``n_devices`` does)."""

from __future__ import annotations

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.model_interface import Model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check that ``device`` names a device this machine has; ``None`` means CPU."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r} is not a valid torch device name ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device!r} is not supported (use 'cpu', 'cuda', 'cuda:N' or 'mps')")
    return dev

def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not supported (use one of {sorted(DTYPES)})")

def check_n_devices(n_devices, device: torch.device) -> None:
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise ModelLoadError(f"n_devices must be a positive whole number, not {n_devices!r}")
    if n_devices > 1:
        if device.type != "cuda":
            raise ModelLoadError(f"n_devices={n_devices} splits the model over CUDA devices; device={str(device)!r} "
                                 "is not one (pass device='cuda')")
        first = device.index or 0
        if first + n_devices > torch.cuda.device_count():
            raise ModelLoadError(f"n_devices={n_devices} from {device} needs CUDA devices {first}..{first + n_devices - 1}; "
                                 f"this machine has {torch.cuda.device_count()}")

def place(model: Model, device: torch.device, cast: torch.dtype | None, n_devices: int = 1) -> None:
    """Move the model to ``device`` (blocks split over ``n_devices`` CUDA devices as TransformerLens'
    forward expects them: ``get_device_for_block_index``; embeddings with the first block, the final
    norm and unembedding with the last) and cast it to ``cast``."""
    if n_devices > 1:
        from transformer_lens.utilities.multi_gpu import get_device_for_block_index

        model.cfg.device, model.cfg.n_devices = str(device), n_devices
        first = get_device_for_block_index(0, model.cfg)
        last = get_device_for_block_index(model.cfg.n_layers - 1, model.cfg)
        for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
            if hasattr(model, name):
                getattr(model, name).to(first)
        for i, block in enumerate(model.blocks):
            block.to(get_device_for_block_index(i, model.cfg))
        for name in ("ln_final", "unembed"):
            if hasattr(model, name):
                getattr(model, name).to(last)
    else:
        model.to(device, print_details=False)
    if cast is not None:
        model.to(cast, print_details=False)
    model.eval()
