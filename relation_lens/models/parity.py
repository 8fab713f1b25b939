"""The parity check on every local load: the converted model's log-probs against the Hugging Face
model's on a short text, on the model cut to its first ``PARITY_LAYERS`` blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.models.conversion import hooked_from_state, to_hooked_state
from relation_lens.models.files import hf_from_pretrained

PARITY_TEXT = "The Space Needle is located in the city of Seattle, and Paris is the capital of France."

PARITY_TOL = 1e-3  # max |log-prob difference| between the Hugging Face model and the HookedTransformer

PARITY_LAYERS = 2  # the parity check converts the embeddings and this many first blocks

@torch.no_grad()
def check_parity(path: Path, weights_file: str, tokenizer, model_name: str, work: torch.dtype, center: bool) -> None:
    """Refuse a conversion whose log-probs differ from the Hugging Face model's on a short text. The
    check runs on the model cut to its first ``PARITY_LAYERS`` blocks (its config's settings, the
    embeddings and the conversion of a block are what it tests), so it never holds a second full copy."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = min(config.num_hidden_layers, PARITY_LAYERS)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the weights of the blocks left out are "unused": expected
    try:
        hf_model = hf_from_pretrained(path, weights_file, work, config=config)
    finally:
        transformers.logging.set_verbosity(level)
    cfg, state = to_hooked_state(hf_model, tokenizer, path, model_name, work)
    model = hooked_from_state(cfg, tokenizer, state, center)
    ids = model.to_tokens(PARITY_TEXT, prepend_bos=False)[:, : model.cfg.n_ctx]
    refuse_drift(model(ids), hf_model(ids).logits, path, "converted to TransformerLens",
                 "; a setting of its config.json is not carried over by the conversion")


def refuse_drift(ours: torch.Tensor, theirs: torch.Tensor, path, how: str, why: str = "") -> None:
    """Refuse a model (``ModelLoadError``) whose logits ``ours`` give log-probs more than ``PARITY_TOL``
    away from the Hugging Face model's ``theirs`` on the check text."""
    gap = (ours.float().log_softmax(-1) - theirs.float().log_softmax(-1).to(ours.device)).abs().max().item()
    if not gap <= PARITY_TOL:
        raise ModelLoadError(
            f"the model in {str(path)!r} {how} gives log-probs up to {gap:.3g} away from the Hugging Face model's "
            f"on a check text (tolerance {PARITY_TOL}){why}, so it was not loaded")
