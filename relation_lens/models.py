"""Loading models as :class:`transformer_lens.HookedTransformer`.

Three kinds of names, one function:

* ``None`` or ``"default"``: the small GPT-2-architecture model that ships inside the
  package (Hugging Face format in ``relation_lens/data/default_model``), trained by this
  project on real relational facts (see ``docs/default_model.md``). Fully offline.
* a path to a local folder holding a Hugging Face GPT-2-family model (``config.json`` with
  ``model_type: gpt2``, weights, tokenizer files): converted offline.
* any TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/pythia-410m"``, ...): loaded with
  ``HookedTransformer.from_pretrained``. When the weights are not in the local Hugging Face
  cache and the hub cannot be reached, a :class:`HubUnreachableError` is raised at once.

Weights are processed as ``from_pretrained`` does by default (LayerNorm folded, writing weights
centred), so the default model and real pretrained models look the same to tracing and editing.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
from importlib import resources
from pathlib import Path

import torch

from relation_lens.errors import HubUnreachableError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "relation-lens-default"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def default_model_path() -> Path:
    """The folder of the embedded default model (Hugging Face layout)."""
    return Path(str(resources.files("relation_lens") / "data" / "default_model"))


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
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not supported (use one of {sorted(_DTYPES)})")


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Load a model as a ``HookedTransformer``.

    Args:
        name: ``None``/``"default"`` for the embedded model, a local Hugging Face GPT-2-family
            folder, or a TransformerLens model name.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: ``torch.float32`` (default), ``float16``, ``bfloat16`` (or their names).

    Returns:
        HookedTransformer in eval mode.

    Raises:
        ModelLoadError: unknown name, a folder that is not a GPT-2-family model, a device that
            does not exist. HubUnreachableError: a hub model that is not cached, offline.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if name is None or name == "default" or name == DEFAULT_MODEL_NAME:
        return _load_local(default_model_path(), dev, dt, model_name=DEFAULT_MODEL_NAME)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model folder (expected a folder with config.json)")
        return _load_local(path, dev, dt, model_name=path.name)
    if isinstance(name, Path) or str(name).startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {str(name)!r} does not exist")
    return _load_hub(str(name), dev, dt)


def _load_local(path: Path, device: torch.device, dtype: torch.dtype, *, model_name: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json")
    try:
        hf_cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not valid JSON ({exc})") from None
    if hf_cfg.get("model_type") != "gpt2":
        raise ModelLoadError(
            f"{str(path)!r} holds a {hf_cfg.get('model_type')!r} model; local folders must hold a Hugging Face "
            "GPT-2-family model (model_type 'gpt2'). Load other architectures by their TransformerLens name.")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ModelLoadError(f"{str(path)!r} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the model in {str(path)!r}: {exc}") from None
    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        model_name=model_name, tokenizer_name=str(path), default_prepend_bos=True, device=str(device), dtype=dtype,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = convert_gpt2_weights(hf_model, cfg)
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    model.to(device, print_details=False)
    if dtype != torch.float32:
        model.to(dtype, print_details=False)
    model.eval()
    logger.info("loaded %s from %s", model_name, path)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, device: torch.device, dtype: torch.dtype):
    from transformer_lens import HookedTransformer, loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        close = difflib.get_close_matches(name, loading.OFFICIAL_MODEL_NAMES, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(
            f"unknown model name {name!r}: not 'default', not an existing folder, and not a TransformerLens "
            f"model name.{hint}") from None
    cached = _is_cached(official)
    if not cached and not _hub_reachable():
        raise HubUnreachableError(
            f"model {name!r} ({official}) is not in the local Hugging Face cache and the hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE=1). Download it on a machine with a network, or pass a local folder.")
    model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype)
    model.eval()
    return model


def _is_cached(official: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    hit = try_to_load_from_cache(official, "config.json")
    return isinstance(hit, str)
