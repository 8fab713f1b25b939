"""The result types of tracing: frozen values with a JSON round trip, value equality, a one-line
repr and views (the renderers in :mod:`relation_lens.viz` import these types, never the reverse:
``plot``/``to_html`` reach the renderers by a call-time import)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.results import JsonRoundTrip, ValueEquality, known_fields
from relation_lens.spans import Span


def _argmax_2d(grid: Float[Tensor, "row col"]) -> tuple[int, int]:
    """``(row, col)`` of the largest entry, NaN ignored (buckets no prompt has are NaN)."""
    flat = int(torch.nan_to_num(grid, nan=-math.inf).argmax())
    return divmod(flat, grid.shape[1])


class _Views(JsonRoundTrip, ValueEquality):
    """JSON round trip and notebook display shared by the result types (which define ``to_dict``,
    ``from_dict`` and ``to_html``)."""

    def _repr_html_(self) -> str:  # notebooks: offline, no network probe
        return self.to_html()


@dataclass(frozen=True, repr=False, eq=False)
class TraceResult(_Views):
    """The outcome of one trace.

    ``scores[kind]`` is a ``Float[Tensor, "layer pos"]`` grid of P(target) with the site restored;
    positions index ``tokens`` (a prepended BOS is position 0). Spans are half-open.
    """

    prompt: str
    tokens: tuple[str, ...]
    subject: str
    subject_span: Span
    relation_span: Span
    corrupt: str  # "relation", "subject" or "explicit"
    corrupt_span: Span
    target: str  # the scored token, decoded
    target_token: int
    target_requested: str | None
    target_n_tokens: int
    clean_top: str  # the model's own top prediction on the clean prompt
    clean_top_token: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, Float[Tensor, "layer pos"]]
    window: int
    n_samples: int
    noise_std: float | None
    seed: int
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    metric: str = "prob"  # what the grids hold: "prob", "logprob" or "logit_diff"
    clean_value: float = math.nan  # the metric on the clean run (NaN in results written before metrics)
    corrupted_value: float = math.nan  # the metric on the corrupted run
    corrupt_with: str = "noise"  # "noise" or "replace"
    contrast: str | None = None  # logit_diff's contrast answer, decoded
    contrast_token: int | None = None
    corrupted_prompt: str | None = None  # the counterfactual prompt under "replace"
    corrupted_tokens: tuple[str, ...] | None = None  # the corrupted run's tokens under "replace"
    method: str = "exact"  # "exact" (patching) or "attribution" (its first-order approximation)

    @property
    def correct(self) -> bool:
        """Whether the clean model's top prediction is the scored target."""
        return self.clean_top_token == self.target_token

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def _ends(self) -> tuple[float, float]:
        if self.metric == "prob" and math.isnan(self.corrupted_value):  # results written before metrics
            return self.clean_prob, self.corrupted_prob
        return self.clean_value, self.corrupted_value

    def indirect_effect(self, kind: str) -> Float[Tensor, "layer pos"]:
        """Score minus the corrupted run's value of the metric (the corrupted probability for "prob")."""
        return self.scores[kind] - self._ends()[1]

    def normalised(self, kind: str) -> Float[Tensor, "layer pos"]:
        """The grid rescaled as in Zhang & Nanda (2023): 0 = the corrupted run, 1 = the clean run,
        ``(score - corrupted) / (clean - corrupted)``; NaN where clean equals corrupted."""
        clean, corrupted = self._ends()
        gap = clean - corrupted
        if gap == 0 or math.isnan(gap):
            return torch.full_like(self.scores[kind], math.nan)
        return (self.scores[kind] - corrupted) / gap

    def peak(self, kind: str) -> tuple[int, int, float]:
        """``(layer, position, score)`` of the site whose restoration brings back the most."""
        layer, pos = _argmax_2d(self.scores[kind])
        return layer, pos, float(self.scores[kind][layer, pos])

    def __repr__(self) -> str:  # a summary; the grids are in .scores
        lo, hi = self.corrupt_span
        layers, positions = next(iter(self.scores.values())).shape
        peaks = ", ".join(f"{k} L{l}@{self.tokens[p]!r} {v:.3g}" for k in self.scores
                          for l, p, v in [self.peak(k)])
        return (f"TraceResult({self.prompt!r}, corrupt={self.corrupt} {''.join(self.tokens[lo:hi])!r}, "
                f"target={self.target!r}: clean {self.clean_prob:.3g}, corrupted {self.corrupted_prob:.3g}; "
                f"grids [{layers} layers x {positions} positions]; peaks: {peaks}; "
                f"n_samples={self.n_samples}, window={self.window}, model={self.model_name!r})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = {k: v.tolist() for k, v in self.scores.items()}
        d["subject_span"], d["relation_span"], d["corrupt_span"] = map(
            list, (self.subject_span, self.relation_span, self.corrupt_span))
        d["tokens"] = list(self.tokens)
        if self.corrupted_tokens is not None:
            d["corrupted_tokens"] = list(self.corrupted_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceResult":
        d = known_fields(cls, d)
        d["scores"] = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()}
        for key in ("subject_span", "relation_span", "corrupt_span"):
            d[key] = tuple(d[key])
        d["tokens"] = tuple(d["tokens"])
        if d.get("corrupted_tokens") is not None:
            d["corrupted_tokens"] = tuple(d["corrupted_tokens"])
        return cls(**d)

    def plot(self, path: str | Path | None = None, **kwargs):
        """ROME-style heatmaps (one panel per kind); saved to ``path`` (PNG/PDF/SVG) if given."""
        from relation_lens.viz import plot_trace

        return plot_trace(self, path, **kwargs)

    def to_html(self) -> str:
        """A self-contained (offline) circuitsvis view of the grids."""
        from relation_lens.viz import trace_html

        return trace_html(self)


@dataclass(frozen=True, repr=False, eq=False)
class DatasetTraceResult(_Views):
    """Average indirect effects over many prompts, by layer and position bucket.

    ``mean[kind]`` and ``ci95[kind]`` are ``Float[Tensor, "layer bucket"]`` (the CI is the half-width
    of a normal 95% interval, 1.96 x standard error); ``count[b]`` is how many prompts have bucket ``b``.
    Every prompt's own :class:`TraceResult` is kept in ``results``; ``used[i]`` says whether it was averaged.
    """

    buckets: tuple[str, ...]
    mean: dict[str, Float[Tensor, "layer bucket"]]
    ci95: dict[str, Float[Tensor, "layer bucket"]]
    count: Tensor
    clean_prob: float
    corrupted_prob: float
    n_total: int
    n_used: int
    n_incorrect: int
    exclude_incorrect: bool
    corrupt: str
    window: int
    model_name: str
    results: tuple[TraceResult, ...]
    used: tuple[bool, ...]
    skipped: tuple[tuple[int, str], ...] = ()  # (index of the fact, why it could not be traced)

    def __repr__(self) -> str:  # a summary; the grids are in .mean / .ci95
        peaks = []
        for kind, grid in self.mean.items():
            layer, b = _argmax_2d(grid)
            peaks.append(f"{kind} L{layer}@{self.buckets[b]} {float(grid[layer, b]):.3g}"
                         f"\u00b1{float(self.ci95[kind][layer, b]):.2g}")
        if self.n_used == 0:
            return (f"DatasetTraceResult(nothing averaged: 0 of {self.n_total} prompts usable "
                    f"({self.n_incorrect} wrong{', left out' if self.exclude_incorrect else ''}, "
                    f"{len(self.skipped)} skipped), corrupt={self.corrupt}, model={self.model_name!r})")
        return (f"DatasetTraceResult({self.n_used} of {self.n_total} prompts averaged "
                f"({self.n_incorrect} wrong{', left out' if self.exclude_incorrect else ''}, "
                f"{len(self.skipped)} skipped), corrupt={self.corrupt}; mean clean {self.clean_prob:.3g}, "
                f"corrupted {self.corrupted_prob:.3g}; largest mean indirect effects: {'; '.join(peaks)}; "
                f"window={self.window}, model={self.model_name!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": [list(x) for x in self.skipped],
            "buckets": list(self.buckets), "mean": {k: v.tolist() for k, v in self.mean.items()},
            "ci95": {k: v.tolist() for k, v in self.ci95.items()}, "count": self.count.tolist(),
            "clean_prob": self.clean_prob, "corrupted_prob": self.corrupted_prob, "n_total": self.n_total,
            "n_used": self.n_used, "n_incorrect": self.n_incorrect, "exclude_incorrect": self.exclude_incorrect,
            "corrupt": self.corrupt, "window": self.window, "model_name": self.model_name,
            "results": [r.to_dict() for r in self.results], "used": list(self.used),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetTraceResult":
        d = known_fields(cls, d)
        d["buckets"] = tuple(d["buckets"])
        d["mean"] = {k: torch.tensor(v) for k, v in d["mean"].items()}
        d["ci95"] = {k: torch.tensor(v) for k, v in d["ci95"].items()}
        d["count"] = torch.tensor(d["count"])
        d["results"] = tuple(TraceResult.from_dict(r) for r in d["results"])
        d["used"] = tuple(d["used"])
        d["skipped"] = tuple((int(i), str(m)) for i, m in d.get("skipped", ()))
        return cls(**d)

    def plot(self, path: str | Path | None = None, **kwargs):
        from relation_lens.viz import plot_dataset

        return plot_dataset(self, path, **kwargs)

    def to_html(self) -> str:
        from relation_lens.viz import dataset_html

        return dataset_html(self)

