"""What an edit computes: an update of MLP output matrices, as a value. :class:`Update` is what
applying, saving and AlphaEdit's memory read; :class:`RankOneUpdate` (ROME, relation-ROME) and
:class:`BatchUpdate` (MEMIT, relation-MEMIT) are the library's two shapes of it.

Edits as files: ``update.save(path)`` writes one safetensors file (the update's tensors, exactly, in
their own dtypes) whose header holds the JSON metadata (method, layers, requests, the
:class:`EditConfig`, the fingerprint of the model it was computed on, the update's ``info``);
:func:`load_update` reads it back equal to the saved value, and refuses to load it for a model whose
weights are not the ones it was computed on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from relation_lens.editing.requests import EditRequest
from relation_lens.errors import EditError
from relation_lens.key_statistics import model_fingerprint
from relation_lens.model_interface import Model
from relation_lens.results import ValueEquality, decode, encode, json_safe
from relation_lens.version import __version__

UPDATE_FORMAT = "relation_lens.update/1"


@runtime_checkable
class Update(Protocol):
    """An update of ``W_out`` at some layers: ``W_out[l] += layer_deltas()[l]`` (``[d_mlp, d_model]``,
    TransformerLens' layout), written for ``requests`` by ``method``; ``layer_keys()[l]`` are the
    keys (``[n, d_mlp]``) it was solved for, which AlphaEdit's memory adds up."""

    @property
    def method(self) -> str: ...

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def requests(self) -> tuple[EditRequest, ...]: ...

    def layer_deltas(self) -> dict[int, Tensor]: ...

    def layer_keys(self) -> dict[int, Tensor]: ...


class SavesToFile:
    """``save(path)`` for an update dataclass: its tensor fields (dicts by layer flattened to
    ``name.layer``) into safetensors, everything else as JSON in the file's header."""

    tensor_fields: ClassVar[tuple[str, ...]] = ()
    plain_fields: ClassVar[dict[str, Any]] = {}  # every other field but info, and its type for reading back
    info: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write this update to ``path`` (one ``.safetensors`` file; see :func:`load_update`)."""
        tensors: dict[str, Tensor] = {}
        for name in self.tensor_fields:
            value = getattr(self, name)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for layer, t in items:
                tensors[name if layer is None else f"{name}.{layer}"] = t.detach().cpu().contiguous()
        rest = {name: getattr(self, name) for name in self.plain_fields}
        info = dict(self.info)
        header = {"format": UPDATE_FORMAT, "type": type(self).__name__, "relation_lens_version": __version__,
                  "model_fingerprint": info.pop("model_fingerprint", None), "config": info.pop("config", None),
                  "fields": json_safe(encode(rest)), "info": json_safe(encode(info)),
                  "tensors_sha256": tensors_checksum(tensors)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"relation_lens": json.dumps(header)})
        return path


@dataclass(frozen=True, repr=False, eq=False)
class RankOneUpdate(SavesToFile, ValueEquality):
    """``W_out' = W_out + outer(left, right)`` at ``layer``; a value, applying it is separate."""

    layer: int
    left: Float[Tensor, d_mlp]
    right: Float[Tensor, d_model]
    key: Float[Tensor, d_mlp]  # k*
    value: Float[Tensor, d_model]  # v*
    method: str
    request: EditRequest
    key_positions: tuple[int, ...]  # key token in each prefixed prompt
    info: dict[str, Any] = field(default_factory=dict)
    tensor_fields: ClassVar[tuple[str, ...]] = ("left", "right", "key", "value")
    plain_fields: ClassVar[dict[str, Any]] = {"layer": int, "method": str, "request": EditRequest,
                                              "key_positions": tuple[int, ...]}

    def delta(self) -> Float[Tensor, "d_mlp d_model"]:
        return torch.outer(self.left, self.right)

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def layer_deltas(self) -> dict[int, Tensor]:
        return {self.layer: self.delta()}

    def layer_keys(self) -> dict[int, Tensor]:
        """The key written, per layer (``[1, d_mlp]``), for AlphaEdit's record of edited keys."""
        return {self.layer: self.key[None]}

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return (self.request,)

    def __repr__(self) -> str:  # a summary; the vectors are in .left/.right/.key/.value
        norm = float(self.left.norm() * self.right.norm())  # Frobenius norm of the rank-one delta
        return (f"RankOneUpdate({self.method} at layer {self.layer}: {self.request.text!r} -> "
                f"{self.request.target_new!r}; ||delta||_F {norm:.3g})")


@dataclass(frozen=True, repr=False, eq=False)
class BatchUpdate(SavesToFile, ValueEquality):
    """One MEMIT-style update: ``W_out[l] += deltas[l]`` for each layer ``l``; a value, applying it is
    separate (:func:`relation_lens.apply_edit`)."""

    method: str
    layers: tuple[int, ...]
    deltas: dict[int, Float[Tensor, "d_mlp d_model"]]  # float64
    keys: dict[int, Float[Tensor, "request d_mlp"]]  # K per layer, float64
    residuals: dict[int, Float[Tensor, "request d_model"]]  # R per layer (already divided), float64
    targets: Float[Tensor, "request d_model"]  # z
    requests: tuple[EditRequest, ...]
    info: dict[str, Any] = field(default_factory=dict)
    tensor_fields: ClassVar[tuple[str, ...]] = ("deltas", "keys", "residuals", "targets")
    plain_fields: ClassVar[dict[str, Any]] = {"method": str, "layers": tuple[int, ...],
                                              "requests": tuple[EditRequest, ...]}

    def layer_deltas(self) -> dict[int, Tensor]:
        return dict(self.deltas)

    def layer_keys(self) -> dict[int, Tensor]:
        return dict(self.keys)

    def __repr__(self) -> str:
        norms = ", ".join(f"L{l} {self.deltas[l].norm():.3g}" for l in self.layers)
        return f"BatchUpdate({self.method}, {len(self.requests)} request(s); ||delta||_F {norms})"


UPDATE_TYPES: dict[str, type] = {"RankOneUpdate": RankOneUpdate, "BatchUpdate": BatchUpdate}


def read_update_header(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an update file (what :meth:`SavesToFile.save` wrote), without its tensors."""
    path = Path(path)
    if path.is_dir():
        raise EditError(f"{str(path)!r} is a directory, not an update file (a .safetensors file that update.save() "
                        "wrote)")
    if not path.is_file():
        raise EditError(f"update file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EditError(f"{str(path)!r} is not a safetensors file ({exc})") from None
    try:
        header = json.loads(meta["relation_lens"])
    except (KeyError, json.JSONDecodeError):
        raise EditError(f"{str(path)!r} is a safetensors file but not a relation_lens update (no relation_lens "
                        "metadata in its header)") from None
    if header.get("format") != UPDATE_FORMAT or header.get("type") not in UPDATE_TYPES:
        raise EditError(f"{str(path)!r} holds update format {header.get('format')!r} / type {header.get('type')!r}; "
                        f"this relation_lens reads {UPDATE_FORMAT!r} ({', '.join(UPDATE_TYPES)})")
    return header


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order: what an update file
    records of its own tensors, so that a changed byte is refused on load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_update(path: str | Path, model: Model | None = None, *, verify: bool = True) -> Update:
    """The update saved at ``path`` by ``update.save(path)``, equal to it (tensors bit for bit).

    With ``model``, the file's model fingerprint (of the weights the update was computed on) must be
    ``model``'s: an update is a change to particular weights, and written into other weights it does
    something nobody measured. A sequence of edits, each computed on the model as the earlier ones left
    it, therefore loads in order, each after the one before is applied. ``verify=False`` skips the check
    (e.g. to study what an edit does to another checkpoint).

    Raises:
        EditError: no such file, not an update file, tensors that do not match the checksum saved with them
            (files written before checksums were recorded load unchecked), or (with ``model``) another
            model's update.
    """
    header = read_update_header(path)
    if model is not None and verify:
        saved, now = header.get("model_fingerprint"), model_fingerprint(model)
        if saved is None:
            raise EditError(f"{str(path)!r} records no model fingerprint (the update was not made by compute_edit), "
                            "so it cannot be checked against this model; pass verify=False to load it anyway")
        if saved != now:
            raise EditError(f"{str(path)!r} was computed on other weights (model fingerprint {saved}) than this "
                            f"model's ({now}, {model.cfg.model_name!r}); an update only means something on the weights "
                            "it was computed for (pass verify=False to load it anyway)")
    cls = UPDATE_TYPES[header["type"]]
    kwargs: dict[str, Any] = {k: decode(tp, header["fields"][k]) for k, tp in cls.plain_fields.items()}  # type: ignore[attr-defined]
    tensors = load_file(str(path))
    recorded = header.get("tensors_sha256")
    if recorded is not None and recorded != tensors_checksum(tensors):
        raise EditError(f"{str(path)!r}: its tensors do not match the checksum recorded when it was saved (the file "
                        "was changed or damaged); refusing to load it")
    for name in cls.tensor_fields:  # type: ignore[attr-defined]
        kwargs[name] = tensors[name] if name in tensors else \
            {int(k.split(".")[1]): t for k, t in tensors.items() if k.split(".")[0] == name}
    info = dict(header["info"])
    for key in ("model_fingerprint", "config"):
        if header.get(key) is not None:
            info[key] = header[key]
    return cls(**kwargs, info=info)
