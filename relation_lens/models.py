"""Loading models as :class:`transformer_lens.HookedTransformer`.

Three kinds of names, one function:

* ``None`` or ``"default"``: the small GPT-2-architecture model that ships inside the
  package (Hugging Face format in ``relation_lens/data/default_model``), trained by this
  project on real relational facts (see ``docs/default_model.md``). Fully offline.
* a path to a local folder holding a Hugging Face causal language model that TransformerLens
  converts (GPT-2, GPT-NeoX/Pythia, GPT-J, LLaMA, ...; ``config.json``, weights, tokenizer files, as
  ``save_pretrained`` writes them): converted offline, and refused unless its log-probs match the
  Hugging Face model's on a check text.
* any TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/pythia-410m"``, ...): loaded with
  ``HookedTransformer.from_pretrained``. When the weights are not in the local Hugging Face
  cache and the hub cannot be reached, a :class:`HubUnreachableError` is raised at once.

Weights are processed as ``from_pretrained`` does by default (LayerNorm folded, writing weights
centred), so the default model and real pretrained models look the same to tracing and editing.
"""

from __future__ import annotations

import difflib
import math
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
               dtype: str | torch.dtype | None = None, center_writing_weights: bool = True):
    """Load a model as a ``HookedTransformer``.

    Args:
        name: ``None``/``"default"`` for the embedded model, a local Hugging Face causal-LM
            folder, or a TransformerLens model name.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: ``torch.float32`` (default), ``float16``, ``bfloat16``, ``float64`` (or their names).
        center_writing_weights: TransformerLens' default processing subtracts the mean over ``d_model``
            from every weight that writes to the residual stream (invisible to the model's outputs,
            which normalise the stream). ``False`` keeps the Hugging Face weights' MLP outputs as
            they are, so that norms of MLP outputs (ROME's weight decay and clamp radius) are the
            original implementation's exactly.

    Returns:
        HookedTransformer in eval mode.

    Raises:
        ModelLoadError: unknown name, a folder that is not a convertible causal-LM model (named setting or
            file), a conversion whose log-probs drift from the Hugging Face model's, a device that
            does not exist. HubUnreachableError: a hub model that is not cached, offline.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if name is None or name == "default" or name == DEFAULT_MODEL_NAME:
        return _load_local(default_model_path(), dev, dt, model_name=DEFAULT_MODEL_NAME, center=center_writing_weights)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model folder (expected a folder with config.json)")
        return _load_local(path, dev, dt, model_name=path.name, center=center_writing_weights)
    if isinstance(name, Path) or str(name).startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {str(name)!r} does not exist")
    return _load_hub(str(name), dev, dt, center_writing_weights)


PARITY_TEXT = "The Space Needle is located in the city of Seattle, and Paris is the capital of France."
PARITY_TOL = 1e-3  # max |log-prob difference| between the Hugging Face model and the HookedTransformer
_ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "t5", "xlm-roberta", "deberta", "deberta-v2")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")


def _load_local(path: Path, device: torch.device, dtype: torch.dtype, *, model_name: str, center: bool = True):
    """A local Hugging Face folder (``save_pretrained`` layout) of any architecture TransformerLens
    converts, checked for log-prob parity with the Hugging Face model before it is returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json")
    try:
        hf_cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not valid JSON ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hf_cfg.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or hf_cfg.get("model_type") in _ENCODERS:
        raise ModelLoadError(f"{str(path)!r} holds a {hf_cfg.get('model_type')!r} model, not a causal language model "
                             "that Hugging Face and TransformerLens load (GPT-2, GPT-NeoX/Pythia, GPT-J, LLaMA, ...)")
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                           "pytorch_model.bin.index.json") if (path / f).is_file()]
    if not weights:
        raise ModelLoadError(f"{str(path)!r} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{str(path)!r} has no tokenizer files (one of {list(_TOKENIZER_FILES)}); save the "
                             "tokenizer beside the weights (tokenizer.save_pretrained(folder))")
    if hf_cfg.get("model_type") == "gpt2":
        _check_gpt2_settings(hf_cfg, config_file)
    try:
        # converted in float64 when float64 is asked for (so no float32 rounding enters the folded weights),
        # in float32 otherwise (half precisions are cast after the conversion)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=work).eval()
    except Exception as exc:  # safetensors, pickle, shape or config errors: name the file
        raise ModelLoadError(f"could not read the weights in {str(path / weights[0])!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not read the tokenizer in {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if len(tokenizer) < 2:
        raise ModelLoadError(f"the tokenizer in {str(path)!r} has {len(tokenizer)} token(s); its files are missing "
                             "or empty")
    if hf_cfg.get("model_type") == "gpt2":
        model = _gpt2_to_hooked(hf_model, tokenizer, path, model_name, work, center)
    else:
        model = _any_to_hooked(hf_model, tokenizer, path, model_name, work, center)
    _check_parity(hf_model, model, tokenizer, path)
    del hf_model
    model.to(device, print_details=False)
    if dtype != work:
        model.to(dtype, print_details=False)
    model.eval()
    logger.info("loaded %s from %s", model_name, path)
    return model


def _check_gpt2_settings(hf_cfg: dict, config_file: Path) -> None:
    """GPT-2 settings that TransformerLens' conversion does not carry over: refuse them by name
    rather than return a model whose logits are silently wrong."""
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    act = hf_cfg.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(f"{str(config_file)!r}: activation_function={act!r} is not supported by "
                             f"TransformerLens (supported: {sorted(SUPPORTED_ACTIVATIONS)})")
    if hf_cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise ModelLoadError(f"{str(config_file)!r}: scale_attn_by_inverse_layer_idx=True is not supported "
                             "(TransformerLens' GPT-2 attention does not scale by 1 / (layer + 1))")
    if not hf_cfg.get("scale_attn_weights", True):
        raise ModelLoadError(f"{str(config_file)!r}: scale_attn_weights=False is not supported "
                             "(TransformerLens always divides attention scores by sqrt(d_head))")


def _gpt2_to_hooked(hf_model, tokenizer, path: Path, model_name: str, dtype: torch.dtype = torch.float32,
                    center: bool = True):
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        model_name=model_name, tokenizer_name=str(path), default_prepend_bos=True, device="cpu",
        dtype=dtype,
    )
    return _hooked(cfg, tokenizer, convert_gpt2_weights(hf_model, cfg), center)


def _any_to_hooked(hf_model, tokenizer, path: Path, model_name: str, dtype: torch.dtype = torch.float32,
                   center: bool = True):
    """Any architecture TransformerLens converts (GPT-NeoX/Pythia, LLaMA, GPT-J, Mistral, ...), read from
    a local folder through TransformerLens' own config and weight conversion. TransformerLens picks
    some architectures by their name, so it is given the folder under a neutral name (a symlink)."""
    import tempfile

    from transformer_lens import HookedTransformerConfig, loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="rl_model_") as tmp:
        neutral = Path(tmp) / "model"
        neutral.symlink_to(path.resolve(), target_is_directory=True)
        try:
            d = loading.convert_hf_model_config(str(neutral))
            d = {k: v for k, v in d.items() if k in HookedTransformerConfig.__dataclass_fields__}
            d.update(model_name=model_name, tokenizer_name=str(path), device="cpu", dtype=dtype)
            cfg = HookedTransformerConfig(**d)
            state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model)
        except Exception as exc:
            arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
            raise ModelLoadError(f"TransformerLens cannot convert the {arch} model in {str(path)!r} "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return _hooked(cfg, tokenizer, state, center)


def _hooked(cfg, tokenizer, state: dict, center: bool):
    """A HookedTransformer of ``cfg`` with ``state`` processed as ``from_pretrained`` does by default
    (LayerNorm folded, unembedding centred, value biases folded; writing weights centred if ``center``)."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=center, center_unembed=True,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    return model


@torch.no_grad()
def _check_parity(hf_model, model, tokenizer, path: Path) -> None:
    """Refuse a conversion whose log-probs differ from the Hugging Face model's on a short text."""
    ids = model.to_tokens(PARITY_TEXT, prepend_bos=False)[:, : model.cfg.n_ctx]
    ours = model(ids).float().log_softmax(-1)
    theirs = hf_model(ids).logits.float().log_softmax(-1)
    gap = (ours - theirs).abs().max().item()
    if not gap <= PARITY_TOL:
        raise ModelLoadError(
            f"the model in {str(path)!r} converted to TransformerLens gives log-probs up to {gap:.3g} away from the "
            f"Hugging Face model's on a check text (tolerance {PARITY_TOL}); a setting of its config.json is not "
            "carried over by the conversion, so it was not loaded")


def stored_parameter_count(name: str | os.PathLike | None) -> int | None:
    """Parameters of the model as stored in its Hugging Face folder (tied weights counted once, as
    the model card counts them), or ``None`` for a hub name; reads only the weight file's header."""
    from safetensors import safe_open

    folder = default_model_path() if name in (None, "default", DEFAULT_MODEL_NAME) else Path(name).expanduser()
    file = folder / "model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, device: torch.device, dtype: torch.dtype, center: bool = True):
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
    model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype, center_writing_weights=center)
    model.eval()
    return model


def _is_cached(official: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    hit = try_to_load_from_cache(official, "config.json")
    return isinstance(hit, str)
