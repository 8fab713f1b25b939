"""Which layers to edit, from the model's own traces: :func:`locate`.

ROME and MEMIT edit where corrupting the subject and restoring an MLP output at the **last subject
token** brings the answer back (Meng et al. 2022, 2023); relation-ROME and relation-MEMIT edit where
corrupting the relation and restoring an MLP output at the **last token** (their key, the last
relation token) does, in the **early** layers (Li, Chen & Wang 2024: the 5th of GPT-2 XL's 48). One
:func:`relation_lens.trace_dataset` run (MLP outputs, packed, torchrun-able) gives the mean indirect
effect per layer at that token with its 95% interval; the rules below read the layers off it:

* ``"rome"``: the layer of the largest mean effect at the last subject token;
* ``"memit"``: the contiguous layers around that peak whose mean effect is at least ``fraction``
  (default 0.5) of the peak's (MEMIT's critical range; MEMIT's code takes a hand-picked range, 3-8 on
  GPT-J, that this rule stands in for);
* ``"relation_rome"``: the layer of the largest mean effect at the last token among the early
  layers, the first ``ceil(early x n_layers)`` (``early=1/3`` by default: layers 0-15 of GPT-2 XL,
  which hold the paper's 5th; 0-1 of a 6-layer model);
* ``"relation_memit"``: the contiguous early layers around that peak whose mean effect is at least
  ``fraction`` of it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from relation_lens.errors import ConfigError, DataError
from relation_lens.model_interface import Model
from relation_lens.results import DatasetTraceResult, Result
from relation_lens.tracing.dataset import BUCKETS, trace_dataset

__all__ = ["locate", "LocateResult", "LocateWarning", "RULES", "critical_range", "early_layers"]

# method -> (what is corrupted, the bucket read, early layers only, a range of layers)
RULES: dict[str, tuple[str, str, bool, bool]] = {
    "rome": ("subject", "last subject", False, False),
    "memit": ("subject", "last subject", False, True),
    "relation_rome": ("relation", "last token", True, False),
    "relation_memit": ("relation", "last token", True, True),
}


def early_layers(n_layers: int, early: float) -> range:
    """The first ``ceil(early x n_layers)`` layers (at least one)."""
    return range(max(1, math.ceil(early * n_layers)))


def critical_range(effect: Tensor, allowed: range, fraction: float) -> tuple[int, ...]:
    """The contiguous layers of ``allowed`` around the largest ``effect`` among them whose effect is at
    least ``fraction`` of that peak (just the peak for ``fraction >= 1``)."""
    sub = effect[allowed.start:allowed.stop]
    if torch.isnan(sub).all():
        raise DataError("no layer has a mean effect (nothing was averaged)")
    peak = allowed.start + int(torch.nan_to_num(sub, nan=-math.inf).argmax())
    bar = fraction * float(effect[peak])
    lo = hi = peak
    while lo - 1 >= allowed.start and float(effect[lo - 1]) >= bar:
        lo -= 1
    while hi + 1 < allowed.stop and float(effect[hi + 1]) >= bar:
        hi += 1
    return tuple(range(lo, hi + 1)) if fraction < 1 else (peak,)


@dataclass(frozen=True, repr=False, eq=False)
class LocateResult(Result):
    """The layers :func:`locate` chose for ``method``, and the evidence: ``effect[l]`` is the mean
    indirect effect of restoring layer ``l``'s MLP output at the ``token`` bucket with ``corrupt``
    corrupted, ``ci95[l]`` its 95% half-width, over ``n_used`` prompts."""
    method: str
    layers: tuple[int, ...]
    peak: int
    effect: Tensor  # [layer] (a plain Tensor: a one-name jaxtyping dimension reads as a forward reference)
    ci95: Tensor  # [layer]
    token: str
    corrupt: str
    allowed: tuple[int, ...]  # the layers the rule chose among (the early ones for relation methods)
    fraction: float
    early: float
    n_used: int
    model_name: str
    trace: DatasetTraceResult | None = None
    settings: dict = field(default_factory=dict)
    global_peak: int = -1  # the layer of the largest mean effect over all layers (beside the rule's peak)
    significant: bool = True  # every chosen layer's 95% interval excludes zero

    def __repr__(self) -> str:
        glob = (f"; global peak layer {self.global_peak} ({float(self.effect[self.global_peak]):.3g} ± "
                f"{float(self.ci95[self.global_peak]):.2g})" if self.global_peak not in (-1, self.peak) else "")
        flag = "" if self.significant else "; NOT SIGNIFICANT: an interval includes zero"
        return (f"LocateResult({self.method}: layers {list(self.layers)}, peak layer {self.peak} "
                f"({float(self.effect[self.peak]):.3g} ± {float(self.ci95[self.peak]):.2g} at the {self.token}, "
                f"{self.corrupt} corrupted, {self.n_used} prompts){glob}{flag}, model={self.model_name!r})")


class LocateWarning(UserWarning):
    """A layer :func:`locate` chose has an effect whose 95% interval includes zero: the traces do not
    tell that layer from no effect (more prompts or noise samples, or the global peak, may)."""


def locate(model: Model, facts: Any, *, method: str = "rome", fraction: float = 0.5, early: float = 1 / 3,
           window: int | None = None, keep_trace: bool = True, **trace_settings: Any) -> LocateResult:
    """The layers ``method`` should edit on ``model``, from the traces of ``facts``.

    Args:
        facts: what :func:`relation_lens.trace_dataset` takes (prompts the model gets right are
            averaged; the others are counted and left out).
        method: ``"rome"``, ``"memit"``, ``"relation_rome"`` or ``"relation_memit"`` (module docs).
        fraction: for the MEMIT methods, how much of the peak effect a layer needs to join the range.
        early: for the relation methods, the share of the layers (from the bottom) the peak is looked
            for in.
        window: the MLP restoration window (``None``: the tracing default, ROME's 10 scaled to depth).
        keep_trace: keep the whole :class:`~relation_lens.results.DatasetTraceResult` in ``trace``.
        **trace_settings: :func:`relation_lens.trace_dataset`'s other settings (``n_samples``, ``pack``,
            ``checkpoint``, ``progress``, ``noise``...); ``corrupt`` and ``kinds`` are the rule's.

    Returns:
        :class:`LocateResult`: the layers, the rule's peak and the ``global_peak`` over all layers, each
        layer's mean effect and 95% half-width, and ``significant`` (every chosen layer's interval
        excludes zero; a :class:`LocateWarning` says so where one does not).

    Raises:
        ConfigError: an unknown method, ``fraction`` outside (0, 1] or ``early`` outside (0, 1];
        DataError: no prompt could be averaged.
    """
    if method not in RULES:
        raise ConfigError(f"locate has rules for {sorted(RULES)}, not {method!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction!r} must be in (0, 1]")
    if not 0 < early <= 1:
        raise ConfigError(f"early={early!r} must be in (0, 1]")
    for k in ("corrupt", "kinds"):
        if k in trace_settings:
            raise ConfigError(f"locate sets {k}= itself (method {method!r} traces MLP outputs with the "
                              f"{RULES[method][0]} corrupted)")
    corrupt, token, early_only, ranged = RULES[method]
    if window is not None:
        trace_settings["window"] = window
    ds = trace_dataset(model, facts, corrupt=corrupt, kinds=("mlp",), **trace_settings)
    if ds.n_used == 0:
        raise DataError(f"locate: none of the {ds.n_total} prompts could be averaged ({ds.n_incorrect} wrong, "
                        f"{len(ds.skipped)} skipped)")
    b = BUCKETS.index(token)
    effect, half = ds.mean["mlp"][:, b].clone(), ds.ci95["mlp"][:, b].clone()
    L = model.cfg.n_layers
    allowed = early_layers(L, early) if early_only else range(L)
    layers = critical_range(effect, allowed, fraction if ranged else 1.0)
    sub = effect[allowed.start:allowed.stop]
    peak = allowed.start + int(torch.nan_to_num(sub, nan=-math.inf).argmax())
    global_peak = int(torch.nan_to_num(effect, nan=-math.inf).argmax())
    weak = [l for l in layers if not float(effect[l]) - float(half[l]) > 0]
    if weak:
        warnings.warn(
            f"locate({method!r}): the effect at layer(s) {weak} has a 95% interval that includes zero ("
            + ", ".join(f"layer {l}: {float(effect[l]):.3g} ± {float(half[l]):.2g}" for l in weak)
            + f", over {ds.n_used} prompts); the global peak is layer {global_peak} ({float(effect[global_peak]):.3g} "
            f"± {float(half[global_peak]):.2g}). Trace more prompts or noise samples before editing there.",
            LocateWarning, stacklevel=2)
    return LocateResult(method=method, layers=layers, peak=peak, effect=effect, ci95=half, token=token,
                        corrupt=corrupt, allowed=tuple(allowed), fraction=fraction, early=early, n_used=ds.n_used,
                        model_name=model.cfg.model_name, trace=ds if keep_trace else None,
                        settings={"window": ds.window, "n_total": ds.n_total}, global_peak=global_peak,
                        significant=not weak)
