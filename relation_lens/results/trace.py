"""The results of tracing: one prompt's grids (:class:`TraceResult`) and their average over a dataset
(:class:`DatasetTraceResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.errors import ConfigError
from relation_lens.intervals import mean_ci95
from relation_lens.results.codec import Result
from relation_lens.spans import Span

METRIC_RANGES = {"prob": (0.0, 1.0), "logprob": (-math.inf, 0.0)}  # the values each built-in metric can take


def argmax_2d(grid: Float[Tensor, "row col"]) -> tuple[int, int]:
    """``(row, col)`` of the largest entry, NaN ignored (buckets no prompt has are NaN)."""
    flat = int(torch.nan_to_num(grid, nan=-math.inf).argmax())
    return divmod(flat, grid.shape[1])


@dataclass(frozen=True, repr=False, eq=False)
class TraceResult(Result):
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
    # every noise sample's value per cell, [layer, pos, sample] per kind (None: attribution patching,
    # or results written before samples were kept)
    samples: dict[str, Float[Tensor, "layer pos sample"]] | None = None

    @property
    def correct(self) -> bool:
        """Whether the clean model's top prediction is the scored target."""
        return self.clean_top_token == self.target_token

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def out_of_range(self) -> dict[str, int]:
        """Per kind, how many cells hold a value the metric cannot take (a probability outside [0, 1], a
        log-probability above 0): attribution patching's first-order estimates can; exact patching
        cannot. ``{}`` when every cell is in range."""
        lo, hi = METRIC_RANGES.get(self.metric, (-math.inf, math.inf))
        tol = 1e-6
        out = {k: int(((v < lo - tol) | (v > hi + tol)).sum()) for k, v in self.scores.items()}
        return {k: n for k, n in out.items() if n}

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

    def ci95(self, kind: str) -> tuple[Float[Tensor, "layer pos"], Float[Tensor, "layer pos"]]:
        """Per cell, the mean over noise samples and its 95% half-width (``1.96 x std / sqrt(n)``),
        from :attr:`samples` (NaN half-widths for one sample)."""
        if self.samples is None:
            raise ConfigError("this result holds no per-sample values (attribution patching, or written before "
                              "relation_lens kept them): no interval per cell")
        mean, half, _ = mean_ci95(self.samples[kind], dim=-1)
        return mean.float(), half.float()

    def peak(self, kind: str) -> tuple[int, int, float]:
        """``(layer, position, score)`` of the site whose restoration brings back the most."""
        layer, pos = argmax_2d(self.scores[kind])
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


@dataclass(frozen=True, repr=False, eq=False)
class DatasetTraceResult(Result):
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
            layer, b = argmax_2d(grid)
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
