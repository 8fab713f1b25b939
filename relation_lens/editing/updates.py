"""What an edit computes: an update of MLP output matrices, as a value. :class:`Update` is what
applying, saving and AlphaEdit's memory read; :class:`RankOneUpdate` (ROME, relation-ROME) and
:class:`BatchUpdate` (MEMIT, relation-MEMIT) are the library's two shapes of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.editing.requests import EditRequest
from relation_lens.results import ValueEquality


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


@dataclass(frozen=True, repr=False, eq=False)
class RankOneUpdate(ValueEquality):
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
class BatchUpdate(ValueEquality):
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

    def layer_deltas(self) -> dict[int, Tensor]:
        return dict(self.deltas)

    def layer_keys(self) -> dict[int, Tensor]:
        return dict(self.keys)

    def __repr__(self) -> str:
        norms = ", ".join(f"L{l} {self.deltas[l].norm():.3g}" for l in self.layers)
        return f"BatchUpdate({self.method}, {len(self.requests)} request(s); ||delta||_F {norms})"
