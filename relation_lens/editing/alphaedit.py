"""AlphaEdit (Fang et al., ICLR 2025; jianghoucheng/AlphaEdit ``AlphaEdit_main.py``) replaces the
solve by ``dW = (P (K^T K + C_p) + l2 I)^-1 P K^T R``, where ``P`` projects onto the null space of
the key statistics (the eigenvectors of ``C`` whose eigenvalues are under ``threshold``) and
``C_p = K_p^T K_p`` accumulates the keys of the facts edited earlier in a sequence. Every row of
``dW`` lies in the range of ``P``, so a preserved key ``k`` (``P k = 0``) sees ``k^T dW = 0``.
:class:`AlphaEditConfig` holds the settings (a frozen value); :class:`Preserve` the state of a
sequence of edits on one model: its settings, the projectors computed so far (keyed by layer and by
the fingerprint of the statistics they came from, so other statistics for the same layer get their
own), and the accumulated keys. Pass it as ``preserve=`` to :func:`relation_lens.compute_edit` for
any method: ROME's and relation-ROME's rank-one update then uses the same projected solve with their
one key and full residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens import presets
from relation_lens.errors import ConfigError
from relation_lens.model_interface import Model


@dataclass(frozen=True)
class AlphaEditConfig:
    """AlphaEdit's settings: the eigenvalue ``threshold`` under which a direction of ``C`` is in the
    null space (an absolute threshold, as AlphaEdit's code; GPT-2 XL: 2e-2) and the regulariser ``l2``
    (GPT-2 XL: 10)."""

    threshold: float = presets.ALPHAEDIT_GPT2_XL["threshold"]
    l2: float = presets.ALPHAEDIT_GPT2_XL["l2"]

    def __post_init__(self):
        for name in ("threshold", "l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"AlphaEdit's {name} must be a finite number >= 0, got {value!r}")


class Preserve:
    """AlphaEdit's projection state for a sequence of edits on one model (module docstring).

    ``Preserve(threshold, l2)`` or ``Preserve(config=AlphaEditConfig(...))``; :meth:`remember` after
    each edit of a sequence adds its keys to ``C_p`` (``edited[layer]``)."""

    def __init__(self, threshold: float | None = None, l2: float | None = None, *,
                 config: AlphaEditConfig | None = None):
        if config is not None and (threshold is not None or l2 is not None):
            raise ConfigError("give Preserve either config= or threshold= / l2=, not both")
        base = AlphaEditConfig()
        self.config = config or AlphaEditConfig(base.threshold if threshold is None else threshold,
                                                base.l2 if l2 is None else l2)
        self.projectors: dict[tuple[int, str], Tensor] = {}  # (layer, statistics fingerprint) -> P
        self.edited: dict[int, Tensor] = {}  # layer -> C_p

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def l2(self) -> float:
        return self.config.l2

    @classmethod
    def default_for(cls, model: Model, method: str | None = None) -> Preserve:
        """AlphaEdit's GPT-2 XL settings, except on a model with its own presets (the embedded default
        model: ``l2=0.1``, its keys are on a smaller scale and 10 stops every edit,
        experiments/tune_alphaedit.py, experiments/results/alphaedit_tuning.md; and for ``method``, the
        threshold and l2 :func:`relation_lens.tune` chose with AlphaEdit,
        :data:`~relation_lens.presets.DEFAULT_MODEL_TUNED`)."""
        return cls(config=AlphaEditConfig(**presets.for_model(model).alphaedit_for(method)))

    def projector(self, stats) -> Float[Tensor, "d_mlp d_mlp"]:
        """``P`` for these statistics: the projector onto the eigenvectors of ``C`` with eigenvalues under
        the threshold, computed once per layer and statistics."""
        key = (stats.layer, stats.fingerprint)
        if key not in self.projectors:
            C = stats.moment.double()
            eigvals, eigvecs = torch.linalg.eigh((C + C.T) / 2)
            null = eigvecs[:, eigvals < self.threshold]
            self.projectors[key] = null @ null.T
        return self.projectors[key]

    def solve(self, stats, K: Tensor, R: Tensor) -> Tensor:
        """``(P (K^T K + C_p) + l2 I)^-1 P K^T R`` in float64, ``[d_mlp, d_model]``."""
        P = self.projector(stats)
        K, R = K.double(), R.double()
        Cp = self.edited.get(stats.layer, torch.zeros_like(P))
        A = P @ (K.T @ K + Cp) + self.l2 * torch.eye(P.shape[0], dtype=torch.float64)
        return torch.linalg.solve(A, P @ K.T @ R)

    def remember(self, update) -> None:
        """Add the keys of an edit just applied (any :class:`~relation_lens.editing.updates.Update`) to
        ``C_p`` (AlphaEdit's ``cache_c``), per layer."""
        for layer, K in update.layer_keys().items():
            K = K.double()
            self.edited[layer] = self.edited.get(layer, 0) + K.T @ K

    def __repr__(self) -> str:
        return (f"Preserve(threshold={self.threshold:g}, l2={self.l2:g}; {len(self.projectors)} projector(s), "
                f"edited keys at layers {sorted(self.edited)})")
