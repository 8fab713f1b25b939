"""Loading a local Hugging Face folder (``save_pretrained`` layout): the folder checked file by file,
the parity check, then the whole model converted tensor by tensor."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.key_statistics import record_loaded_weights
from relation_lens.models import parity
from relation_lens.models.bridge import bridge_from_hf, transformer_lens_major
from relation_lens.models.conversion import (
    check_gpt2_settings,
    hooked_from_state,
    to_hooked_state,
    trim_memory,
)
from relation_lens.models.devices import place
from relation_lens.models.files import ENCODERS, TOKENIZER_FILES, hf_from_pretrained, read_hf_model, weights_digest
from relation_lens.models.tokenization import apply_tokenizer_rule
from relation_lens.presets import DEFAULT_MODEL_NAME, record_sources

logger = logging.getLogger(__name__)


def load_local(path: Path, device: torch.device, dtype: torch.dtype, *, model_name: str, center: bool = True,
                n_devices: int = 1):
    """A local Hugging Face folder (``save_pretrained`` layout) of any architecture TransformerLens
    converts, checked for log-prob parity with the Hugging Face model (cut to its first blocks)
    before the whole model is converted tensor by tensor (peak memory under twice the weights)."""
    from transformers import AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json")
    try:
        hf_cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not valid JSON ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hf_cfg.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or hf_cfg.get("model_type") in ENCODERS:
        raise ModelLoadError(f"{str(path)!r} holds a {hf_cfg.get('model_type')!r} model, not a causal language model "
                             "that Hugging Face and TransformerLens load (GPT-2, GPT-NeoX/Pythia, GPT-J, LLaMA, ...)")
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                           "pytorch_model.bin.index.json") if (path / f).is_file()]
    if not weights:
        raise ModelLoadError(f"{str(path)!r} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{str(path)!r} has no tokenizer files (one of {list(TOKENIZER_FILES)}); save the "
                             "tokenizer beside the weights (tokenizer.save_pretrained(folder))")
    if hf_cfg.get("model_type") == "gpt2":
        check_gpt2_settings(hf_cfg, config_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not read the tokenizer in {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if len(tokenizer) < 2:
        raise ModelLoadError(f"the tokenizer in {str(path)!r} has {len(tokenizer)} token(s); its files are missing "
                             "or empty")
    # converted in float64 when float64 is asked for (so no float32 rounding enters the folded weights),
    # in float32 otherwise (half precisions are cast after the conversion)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if transformer_lens_major() >= 4:  # no HookedTransformer: a TransformerBridge around the Hugging Face model
        if n_devices > 1:
            raise ModelLoadError(f"n_devices={n_devices} is not supported under TransformerLens 4 yet (load on one "
                                 "device)")
        hf_model = hf_from_pretrained(path, weights[0], work)  # the bridge keeps the Hugging Face model itself
        model = bridge_from_hf(hf_model, tokenizer, path, model_name, device, center)
        if dtype != work:
            model.to(dtype)
        _follow_tokenizer(model, tokenizer)
        _note_weights(model, path)
        return model
    parity.check_parity(path, weights[0], tokenizer, model_name, work, center)
    hf_model = read_hf_model(path, weights[0], work)
    cfg, state = to_hooked_state(hf_model, tokenizer, path, model_name, work)
    del hf_model  # the state dict holds the only references to the weights from here on
    gc.collect()  # a Hugging Face model sits in reference cycles: free its tensors now, not at some later collection
    trim_memory()
    model = hooked_from_state(cfg, tokenizer, state, center)
    place(model, device, dtype if dtype != work else None, n_devices)
    _follow_tokenizer(model, tokenizer)
    _note_weights(model, path)
    logger.info("loaded %s from %s", model_name, path)
    return model


def _note_weights(model, path: Path) -> None:
    """Let fingerprints name this checkpoint (the same on both TransformerLens lines) while the weights
    are the loaded ones (:func:`relation_lens.key_statistics.record_loaded_weights`)."""
    record_loaded_weights(model, weights_digest(path))


def _follow_tokenizer(model, tokenizer) -> None:
    """Every model but the embedded one tokenises as its Hugging Face tokenizer does (BOS included:
    ``models.tokenization``); the embedded model was trained with a BOS in front of every text."""
    if model.cfg.model_name == DEFAULT_MODEL_NAME:
        model.cfg.default_prepend_bos = True
        record_sources(model, {"prepend_bos": "True: the embedded model was trained with a BOS in front of every "
                                              "text (docs/default_model.md)"})
    else:
        record_sources(model, apply_tokenizer_rule(model, tokenizer))
