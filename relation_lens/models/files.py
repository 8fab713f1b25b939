"""Reading a Hugging Face model folder: where the embedded default model lives, the weights read
tensor by tensor from safetensors files (no memory map), ``from_pretrained`` where that cannot be used."""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from relation_lens.errors import ModelLoadError
from relation_lens.presets import DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """The folder of the embedded default model (Hugging Face layout)."""
    return Path(str(resources.files("relation_lens") / "data" / "default_model"))

ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "t5", "xlm-roberta", "deberta", "deberta-v2")

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")

def hf_from_pretrained(path: Path, weights_file: str, work: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=work, **kwargs).eval()
    except Exception as exc:  # safetensors, pickle, shape or config errors: name the file
        raise ModelLoadError(f"could not read the weights in {str(path / weights_file)!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None

def read_hf_model(path: Path, weights_file: str, work: torch.dtype):
    """The Hugging Face model with its weights read into ordinary memory tensor by tensor (safetensors
    files; no memory map, so a tensor's memory is freed as soon as the conversion drops it), or
    ``from_pretrained``'s model where the folder holds pickled weights or names the model's
    parameters in a way its module tree does not (those load through a memory map)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = safetensors_files(path)
    if files is None:
        return hf_from_pretrained(path, weights_file, work)
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
        return hf_from_pretrained(path, weights_file, work)
    return hf_model.eval()

def safetensors_files(path: Path) -> list[Path] | None:
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

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
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
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']!r}, which is not supported")
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            if t.numel() * t.element_size() != end - begin:
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
            f.seek(8 + n + begin)
            buffer = memoryview(t.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy arrays are buffers
            if t.numel() and f.readinto(buffer) != end - begin:
                raise ValueError(f"the file ends inside tensor {name!r}")
            out[name] = t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
    return out

def stored_parameter_count(name: str | os.PathLike | None) -> int | None:
    """Parameters of the model as stored in its Hugging Face folder (tied weights counted once, as
    the model card counts them), or ``None`` for a hub name; reads only the weight file's header."""
    folder = default_model_path() if name in (None, "default", DEFAULT_MODEL_NAME) else Path(name).expanduser()
    file = folder / "model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def weights_digest(folder: Path) -> str:
    """A digest of a folder's weight files (name, size and 64 chunks spread over each file, the first and
    last included): what identifies a checkpoint for caches, read in well under a second even for
    gigabytes of weights."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(64):
                f.seek(max(0, (size - 65536) * i // 63))
                h.update(f.read(65536))
    return h.hexdigest()[:16]
