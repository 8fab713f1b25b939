"""Writing an update into a model and taking it back: :func:`apply_edit` returns an :class:`Edit`
whose ``undo()`` restores the saved weights bit for bit; :func:`save_edited` writes an edited copy of
a local Hugging Face folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from relation_lens.editing.requests import check_editable
from relation_lens.editing.updates import Update
from relation_lens.errors import EditError
from relation_lens.model_interface import Model, mlp_out
from relation_lens.models import default_model_path
from relation_lens.presets import DEFAULT_MODEL_NAME


class Edit:
    """A handle on an update written into a model (any :class:`~relation_lens.editing.updates.Update`,
    e.g. a :class:`RankOneUpdate` or a MEMIT-style :class:`BatchUpdate` over several layers); ``undo()``
    restores the saved weights bit for bit.

    Use as a context manager to undo on exit::

        with rl.apply_edit(model, update):
            ...  # the edited model
    """

    def __init__(self, model: Model, update):
        self.model = model
        self.update = update
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}
        new = {}
        for layer, delta in update.layer_deltas().items():
            param = mlp_out(model, layer)
            new[layer] = param.detach() + delta.to(param.device, param.dtype)
            if not torch.isfinite(new[layer]).all():
                raise EditError(f"applying the update would put NaN or Inf into blocks.{layer}.mlp.W_out; the model "
                                "was not changed")
        originals = {layer: mlp_out(model, layer).detach().clone() for layer in new}
        write_all(model, new, originals)  # all layers or none (an interrupt part-way rolls back)
        self._saved = {layer: (originals[layer], mlp_out(model, layer).detach().clone()) for layer in new}
        self.active = True

    def _what(self) -> str:
        requests = self.update.requests
        if len(requests) == 1:
            return f"{requests[0].text!r} -> {requests[0].target_new!r}"
        return f"{len(requests)} requests"

    def undo(self) -> None:
        if not self.active:
            raise EditError(f"this edit (layers {list(self._saved)}, {self._what()}) was already undone")
        for layer, (_, edited) in self._saved.items():
            if not torch.equal(mlp_out(self.model, layer).detach(), edited):
                raise EditError(
                    f"blocks.{layer}.mlp.W_out changed since this edit was applied (another edit or training); "
                    "undo the later changes first (edits are undone in reverse order)")
        # all layers or none: an interrupt part-way leaves the edit applied, and undo() can be called again
        write_all(self.model, {l: o for l, (o, _) in self._saved.items()}, {l: e for l, (_, e) in self._saved.items()})
        self.active = False

    def __enter__(self) -> Edit:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        layers = ", ".join(map(str, self._saved))
        return f"Edit({self.update.method}, layer {layers}: {self._what()}, {'active' if self.active else 'undone'})"


def write_layer(model: Model, layer: int, value: Tensor) -> None:
    """Copy ``value`` into ``blocks.{layer}.mlp.W_out`` (one write; :func:`write_all` makes them atomic)."""
    with torch.no_grad():
        mlp_out(model, layer).copy_(value)


def write_all(model: Model, values: dict[int, Tensor], before: dict[int, Tensor]) -> None:
    """Write ``values`` into the layers' ``W_out``, all or none: if anything stops it part-way (an error,
    a ``KeyboardInterrupt``), the layers already written get ``before`` back, then it propagates."""
    done: list[int] = []
    try:
        for layer, value in values.items():
            write_layer(model, layer, value)
            done.append(layer)
    except BaseException:
        with torch.no_grad():  # the rollback writes directly: it must not fail where the write it undoes did
            for layer in done:
                mlp_out(model, layer).copy_(before[layer])
        raise


def apply_edit(model: Model, update) -> Edit:
    """Write ``update`` (any :class:`~relation_lens.editing.updates.Update`: a :class:`RankOneUpdate`,
    a :class:`BatchUpdate`, or another method's) into the model's MLP output matrices in place;
    returns the undo handle."""
    if not isinstance(update, Update):
        raise EditError(f"expected an Update (e.g. a RankOneUpdate or a BatchUpdate), got {type(update).__name__}")
    for layer, delta in update.layer_deltas().items():
        check_editable(model, layer)
        shape = tuple(mlp_out(model, layer).shape)
        if tuple(delta.shape) != shape:
            raise EditError(f"update of shape {tuple(delta.shape)} does not fit blocks.{layer}.mlp.W_out of shape "
                            f"{shape}")
    return Edit(model, update)


# Where each Hugging Face architecture keeps the matrix TransformerLens calls W_out, and whether it is
# stored as [d_mlp, d_model] (GPT-2's Conv1D, the x @ W layout) or transposed (nn.Linear, [d_model, d_mlp]).
_HF_W_OUT = {
    "gpt2": ("transformer.h.{}.mlp.c_proj.weight", False),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h.weight", True),
    "gptj": ("transformer.h.{}.mlp.fc_out.weight", True),
    "llama": ("model.layers.{}.mlp.down_proj.weight", True),
    "mistral": ("model.layers.{}.mlp.down_proj.weight", True),
}


def save_edited(source: str | Path, updates: Sequence[Update], folder: str | Path) -> Path:
    """Write a Hugging Face folder of the model in ``source`` (the default model's name or a local
    Hugging Face folder) with ``updates`` added to its MLP output matrices: config, tokenizer and
    generation files copied, weights in ``model.safetensors``. The folder loads with
    :func:`relation_lens.load_model` and with ``transformers`` alike.

    The update is added to the stored matrix as it is. TransformerLens centres writing weights on
    load (subtracts their mean over ``d_model``), which changes nothing the model computes because
    every reader of the residual stream normalises it; so the saved model computes what the edited
    HookedTransformer computes (a test checks the logits).
    """
    src = default_model_path() if str(source) in ("default", DEFAULT_MODEL_NAME) else Path(source).expanduser()
    weights_file = src / "model.safetensors"
    if not (src / "config.json").is_file() or not weights_file.is_file():
        raise EditError(f"cannot save an edited copy of {str(source)!r}: it is not a local Hugging Face folder with "
                        "config.json and model.safetensors (hub models: save_pretrained them to a folder first)")
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type not in _HF_W_OUT:
        raise EditError(f"saving edited {model_type!r} models is not supported (supported: {sorted(_HF_W_OUT)})")
    template, transposed = _HF_W_OUT[model_type]
    state = load_file(str(weights_file))
    for upd in updates:
        for layer, layer_delta in upd.layer_deltas().items():
            name = template.format(layer)
            if name not in state:
                raise EditError(f"{str(weights_file)!r} has no tensor {name!r} for the edit at layer {layer}")
            delta = layer_delta.T if transposed else layer_delta
            if tuple(delta.shape) != tuple(state[name].shape):
                raise EditError(f"the update of shape {tuple(delta.shape)} does not fit {name!r} of shape "
                                f"{tuple(state[name].shape)}")
            state[name] = (state[name].double() + delta.double()).to(state[name].dtype)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith((".bin", ".pt")):
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
