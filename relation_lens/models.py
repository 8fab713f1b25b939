"""Loading models as :class:`transformer_lens.HookedTransformer`.

Three kinds of names, one function:

* ``None`` or ``"default"``: the small GPT-2-architecture model that ships inside the
  package (Hugging Face format in ``relation_lens/data/default_model``), trained by this
  project on real relational facts (see ``docs/default_model.md``). Fully offline.
* a path to a local folder holding a Hugging Face causal language model that TransformerLens
  converts (GPT-2, GPT-NeoX/Pythia, GPT-J, LLaMA, ...; ``config.json``, weights, tokenizer files, as
  ``save_pretrained`` writes them): converted offline, and refused unless its log-probs match the
  Hugging Face model's on a check text (the check runs on the model cut to its first
  ``PARITY_LAYERS`` blocks). Safetensors weights are read, converted and processed tensor by tensor,
  so loading peaks under twice the weights' size (``benchmarks/bench_load_memory.py``).
* any TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/pythia-410m"``, ...): loaded with
  ``HookedTransformer.from_pretrained``. When the weights are not in the local Hugging Face
  cache and the hub cannot be reached, a :class:`HubUnreachableError` is raised at once.

Weights are processed as ``from_pretrained`` does by default (LayerNorm folded, writing weights
centred), so the default model and real pretrained models look the same to tracing and editing.
"""

from __future__ import annotations

import difflib
import gc
import math
import json
import logging
import os
import socket
from importlib import resources
from pathlib import Path

import torch

from relation_lens.errors import HubUnreachableError, ModelLoadError
from relation_lens.presets import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

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
               dtype: str | torch.dtype | None = None, center_writing_weights: bool = True, n_devices: int = 1):
    """Load a model as a ``HookedTransformer``.

    Args:
        name: ``None``/``"default"`` for the embedded model, a local Hugging Face causal-LM
            folder, or a TransformerLens model name.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: ``torch.float32`` (default), ``float16``, ``bfloat16``, ``float64`` (or their names).
            ``float64`` from the embedded model or a local folder is float64 through and through: read,
            converted and processed (LayerNorm folding, centring) in float64, log-probs equal to the
            Hugging Face model's in float64 to 1e-12 (tested); TransformerLens' own processing would
            round it through float32. A hub name goes through TransformerLens' ``from_pretrained``,
            whose processing does round a float64 load through float32.
        center_writing_weights: TransformerLens' default processing subtracts the mean over ``d_model``
            from every weight that writes to the residual stream (invisible to the model's outputs,
            which normalise the stream). ``False`` keeps the Hugging Face weights' MLP outputs as
            they are, so that norms of MLP outputs (ROME's weight decay and clamp radius) are the
            original implementation's exactly.
        n_devices: split the blocks over this many CUDA devices (``device="cuda"``), as TransformerLens'
            ``n_devices`` does: block ``i`` on device ``i * n_devices // n_layers``, the embeddings with
            the first block, the final norm and unembedding with the last. Tracing and editing move
            activations to each block's device.

    Returns:
        HookedTransformer in eval mode.

    Raises:
        ModelLoadError: unknown name, a folder that is not a convertible causal-LM model (named setting or
            file), a conversion whose log-probs drift from the Hugging Face model's, a device that
            does not exist. HubUnreachableError: a hub model that is not cached, offline.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    _check_n_devices(n_devices, dev)
    if name is None or name == "default" or name == DEFAULT_MODEL_NAME:
        return _load_local(default_model_path(), dev, dt, model_name=DEFAULT_MODEL_NAME, center=center_writing_weights,
                           n_devices=n_devices)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model folder (expected a folder with config.json)")
        return _load_local(path, dev, dt, model_name=path.name, center=center_writing_weights, n_devices=n_devices)
    if isinstance(name, Path) or str(name).startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {str(name)!r} does not exist")
    return _load_hub(str(name), dev, dt, center_writing_weights, n_devices)


PARITY_TEXT = "The Space Needle is located in the city of Seattle, and Paris is the capital of France."
PARITY_TOL = 1e-3  # max |log-prob difference| between the Hugging Face model and the HookedTransformer
_ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "t5", "xlm-roberta", "deberta", "deberta-v2")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")


def _load_local(path: Path, device: torch.device, dtype: torch.dtype, *, model_name: str, center: bool = True,
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
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not read the tokenizer in {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if len(tokenizer) < 2:
        raise ModelLoadError(f"the tokenizer in {str(path)!r} has {len(tokenizer)} token(s); its files are missing "
                             "or empty")
    # converted in float64 when float64 is asked for (so no float32 rounding enters the folded weights),
    # in float32 otherwise (half precisions are cast after the conversion)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    _check_parity(path, weights[0], tokenizer, model_name, work, center)
    hf_model = _read_hf_model(path, weights[0], work)
    cfg, state = _to_hooked_state(hf_model, tokenizer, path, model_name, work)
    del hf_model  # the state dict holds the only references to the weights from here on
    gc.collect()  # a Hugging Face model sits in reference cycles: free its tensors now, not at some later collection
    _trim()
    model = _hooked(cfg, tokenizer, state, center)
    _place(model, device, dtype if dtype != work else None, n_devices)
    logger.info("loaded %s from %s", model_name, path)
    return model


def _from_pretrained(path: Path, weights_file: str, work: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=work, **kwargs).eval()
    except Exception as exc:  # safetensors, pickle, shape or config errors: name the file
        raise ModelLoadError(f"could not read the weights in {str(path / weights_file)!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _read_hf_model(path: Path, weights_file: str, work: torch.dtype):
    """The Hugging Face model with its weights read into ordinary memory tensor by tensor (safetensors
    files; no memory map, so a tensor's memory is freed as soon as the conversion drops it), or
    ``from_pretrained``'s model where the folder holds pickled weights or names the model's
    parameters in a way its module tree does not (those load through a memory map)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = _safetensors_files(path)
    if files is None:
        return _from_pretrained(path, weights_file, work)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=work)
    state = {}
    try:
        for file in files:
            state.update(read_safetensors(file, work))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not read the weights in {str(file)!r} ({type(exc).__name__}: {exc})") from None
    hf_model.load_state_dict(state, strict=False, assign=True)
    del state
    hf_model.tie_weights()
    if any(p.is_meta for p in hf_model.parameters()):  # names differ from the module tree: let transformers map them
        del hf_model
        return _from_pretrained(path, weights_file, work)
    return hf_model.eval()


def _safetensors_files(path: Path) -> list[Path] | None:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{str(index)!r} is not a safetensors index ({type(exc).__name__}: {exc})") from None
        return [path / s for s in shards]
    return None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(file: str | os.PathLike, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read with plain file reads into fresh tensors (no memory
    map: a tensor's pages belong to it alone and go when it goes); floating tensors cast to
    ``float_dtype`` one at a time when it is given."""
    out = {}
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']!r}, which is not supported")
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            if t.numel() * t.element_size() != end - begin:
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
            f.seek(8 + n + begin)
            if t.numel() and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise ValueError(f"the file ends inside tensor {name!r}")
            out[name] = t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
    return out


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


PARITY_LAYERS = 2  # the parity check converts the embeddings and this many first blocks


def _to_hooked_state(hf_model, tokenizer, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
    """TransformerLens' config and (unprocessed) state dict for ``hf_model``, by TransformerLens' own
    conversion; ``n_layers`` follows ``hf_model``'s config (a truncated model gives a truncated one)."""
    if hf_model.config.model_type == "gpt2":
        return _gpt2_state(hf_model, path, model_name, dtype)
    return _any_state(hf_model, path, model_name, dtype)


def _gpt2_state(hf_model, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
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
    return cfg, convert_gpt2_weights(hf_model, cfg)


def _any_state(hf_model, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
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
            n_full, n = d["n_layers"], hf_model.config.num_hidden_layers
            # per-layer settings (attention types, windows) follow the layers kept
            d = {k: (v[:n] if isinstance(v, list) and len(v) == n_full and n < n_full else v) for k, v in d.items()}
            d.update(n_layers=n, model_name=model_name, tokenizer_name=str(path), device="cpu", dtype=dtype)
            cfg = HookedTransformerConfig(**d)
            state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model)
        except Exception as exc:
            arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
            raise ModelLoadError(f"TransformerLens cannot convert the {arch} model in {str(path)!r} "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return cfg, state


# the non-block tensors a block's processing reads but does not change, cut to one row / column
# (copies: a step may change its inputs in place)
_PLACEHOLDERS = {"embed.W_E": lambda v: v[:1], "pos_embed.W_pos": lambda v: v[:1],
                 "unembed.W_U": lambda v: v[:, :1], "unembed.b_U": lambda v: v[:1]}


def _trim() -> None:
    """Hand memory freed by the C allocator back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Freed tensors otherwise stay in the allocator's arenas and count as resident."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


@torch.no_grad()  # the converted tensors may be Parameters: no autograd graph may keep the inputs alive
def process_state_layerwise(state: dict, cfg, *, fold_ln: bool = True, center_writing_weights: bool = True,
                            center_unembed: bool = True, fold_value_biases: bool = True) -> dict:
    """TransformerLens' weight processing (``ProcessWeights.process_weights``, as
    ``load_and_process_state_dict`` applies it) run one block at a time and then on the embeddings,
    so that at most one block's copies exist beside the state dict; ``state`` is emptied as it goes.
    Every processing step acts within one block or on the embeddings alone, so the result is
    TransformerLens' whole-dict result bit for bit (tested)."""
    import copy

    from transformer_lens.weight_processing import ProcessWeights

    kw = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
              fold_value_biases=fold_value_biases)
    for k, v in state.items():
        state[k] = v.detach()
    float64 = any(v.dtype == torch.float64 for v in state.values() if v.is_floating_point())
    process = _process_weights_float64 if float64 else ProcessWeights.process_weights
    out = {}
    one = copy.copy(cfg)
    one.n_layers = 1
    small = {k: _PLACEHOLDERS.get(k, lambda v: v)(v).clone() for k, v in state.items() if not k.startswith("blocks.")}
    # each piece is handed over in a dict nothing else holds, so that its inputs are freed as soon as
    # TransformerLens' first step has copied them
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}."
        done = process(
            {**small, **{k.replace(prefix, "blocks.0.", 1): state.pop(k) for k in [k for k in state if k.startswith(prefix)]}},
            one, **{**kw, "center_unembed": False})
        out.update({k.replace("blocks.0.", prefix, 1): v for k, v in done.items() if k.startswith("blocks.0.")})
        del done
        _trim()
    rest = copy.copy(cfg)
    rest.n_layers = 0
    # the embeddings, then the unembedding (each with the other's placeholders)
    unembed = {k for k in state if k.startswith(("unembed.", "ln_final."))}
    for keys in ([k for k in state if k not in unembed], sorted(unembed)):
        others = {k: v for k, v in small.items() if k not in keys}
        done = process({**others, **{k: state.pop(k) for k in keys}}, rest, **kw)
        out.update({k: v for k, v in done.items() if k in keys})
        del done
        _trim()
    state.clear()
    return out


def _process_weights_float64(state: dict, cfg, *, fold_ln: bool, center_writing_weights: bool,
                             center_unembed: bool, fold_value_biases: bool) -> dict:
    """``ProcessWeights.process_weights``'s steps in its order (TransformerLens 3.9, no adapter, no
    refactoring of attention matrices), in float64: TransformerLens' own function casts every tensor
    that is not float32 to float32 before processing and back after, which rounds a float64 model's
    folded weights to float32 (W_in and W_Q moved by up to 3e-8, log-probs by 1e-6)."""
    from transformer_lens.weight_processing import ProcessWeights

    norm = getattr(cfg, "normalization_type", "LN")
    if fold_ln and norm in ("LN", "LNPre"):
        state = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=True, center_weights=True)
    elif fold_ln and norm in ("RMS", "RMSPre"):
        state = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=False, center_weights=False)
    if center_writing_weights and norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False):
        state = ProcessWeights.center_writing_weights(state, cfg)
    if center_unembed:
        state = ProcessWeights.center_unembed(state, cfg=cfg)
    if fold_value_biases:
        state = ProcessWeights.fold_value_biases(state, cfg)
        if center_writing_weights and norm in ("LN", "LNPre"):
            for layer in range(cfg.n_layers):
                key = f"blocks.{layer}.attn.b_O"
                if key in state:
                    state[key] = state[key] - state[key].mean()
    return state


def _hooked(cfg, tokenizer, state: dict, center: bool):
    """A HookedTransformer of ``cfg`` with ``state`` processed as ``from_pretrained`` does by default
    (LayerNorm folded, unembedding centred, value biases folded; writing weights centred if ``center``).
    The weights are processed block by block and the model is built with uninitialised (untouched)
    parameters that the state dict then fills tensor by tensor, so no second copy of the weights
    exists at any time."""
    import dataclasses

    from transformer_lens import HookedTransformer

    from transformer_lens import loading_from_pretrained as loading

    fold = cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre")
    norm = {"LN": "LNPre", "RMS": "RMSPre"}.get(cfg.normalization_type, cfg.normalization_type) if fold else \
        cfg.normalization_type
    model = HookedTransformer(dataclasses.replace(cfg, normalization_type=norm, init_weights=False),
                              tokenizer=tokenizer, move_to_device=False)
    # as load_and_process_state_dict does first (zero biases); in place, since the processing empties
    # the caller's dict as it goes and no other reference may keep the inputs alive
    filled = loading.fill_missing_keys(model, state)
    state.update({k: v for k, v in filled.items() if k not in state})
    del filled
    state = process_state_layerwise(state, cfg, fold_ln=fold, center_writing_weights=center, center_unembed=True,
                                    fold_value_biases=True)
    # the processed tensors become the parameters (no copy); keys of folded norms are left over
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False, assign=True)
    del state
    return model.eval()


def _place(model, device: torch.device, cast: torch.dtype | None, n_devices: int = 1) -> None:
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


@torch.no_grad()
def _check_parity(path: Path, weights_file: str, tokenizer, model_name: str, work: torch.dtype, center: bool) -> None:
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
        hf_model = _from_pretrained(path, weights_file, work, config=config)
    finally:
        transformers.logging.set_verbosity(level)
    cfg, state = _to_hooked_state(hf_model, tokenizer, path, model_name, work)
    model = _hooked(cfg, tokenizer, state, center)
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


def _check_n_devices(n_devices, device: torch.device) -> None:
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


def _load_hub(name: str, device: torch.device, dtype: torch.dtype, center: bool = True, n_devices: int = 1):
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
    model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype, center_writing_weights=center,
                                              n_devices=n_devices)
    _place(model, device, None, n_devices)
    return model


def _is_cached(official: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    hit = try_to_load_from_cache(official, "config.json")
    return isinstance(hit, str)
