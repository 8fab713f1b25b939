"""Loading under TransformerLens 4.x, which has no ``HookedTransformer``: the Hugging Face model is
wrapped in a ``TransformerBridge`` (``boot_transformers(path, hf_model=...)``) and put in
compatibility mode (TransformerLens' hook names, LayerNorm folded, writing weights centred as
``center_writing_weights`` says). The bridge's log-probs are checked against the Hugging Face
model's own, computed before the wrapping, on the same text as the 3.x parity check."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.models import parity

logger = logging.getLogger(__name__)


def transformer_lens_major() -> int:
    """The installed TransformerLens' major version (3 or 4)."""
    try:
        return int(metadata.version("transformer-lens").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 3


def bridge_from_hf(hf_model, tokenizer, path: str | Path, model_name: str, device: torch.device,
                   center: bool = True):
    """A compatibility-mode ``TransformerBridge`` around ``hf_model`` (on ``device``), refused unless its
    log-probs equal the Hugging Face model's within ``parity.PARITY_TOL``."""
    from transformer_lens import TransformerBridge  # type: ignore[attr-defined]  # TransformerLens 4 only

    hf_model = hf_model.to(device).eval()
    with torch.no_grad():
        ids = tokenizer(parity.PARITY_TEXT, return_tensors="pt")["input_ids"].to(device)
        ids = ids[:, : getattr(hf_model.config, "max_position_embeddings", getattr(hf_model.config, "n_positions", 1024))]
        theirs = hf_model(ids).logits
    try:
        model = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                    dtype=next(hf_model.parameters()).dtype)
        model.enable_compatibility_mode(disable_warnings=True, center_writing_weights=center)
    except Exception as exc:
        arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
        raise ModelLoadError(f"TransformerLens 4 cannot wrap the {arch} model in {str(path)!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    model.cfg.model_name = model_name
    with torch.no_grad():
        parity.refuse_drift(model(ids), theirs, path, "wrapped by TransformerLens 4")
    logger.info("loaded %s from %s as a TransformerBridge", model_name, path)
    return model.eval()
