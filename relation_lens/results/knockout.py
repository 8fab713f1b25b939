"""The results of attention knockout (:func:`relation_lens.knockout`, :func:`relation_lens.knockout_dataset`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from relation_lens.errors import shorten
from relation_lens.results.codec import Result
from relation_lens.spans import Span


@dataclass(frozen=True, repr=False, eq=False)
class KnockoutResult(Result):
    """``change[source]``: relative change of P(target) per layer (``Float[Tensor, "layer"]``), or per
    layer and head (``"layer head"``) when traced per head (with another ``metric``: the blocked
    metric minus the clean one); ``prob[source]`` the blocked probabilities, ``value[source]`` the
    blocked metric."""

    prompt: str
    tokens: tuple[str, ...]
    subject: str
    subject_span: Span
    target: str
    target_token: int
    clean_prob: float
    positions: dict[str, list[int]]
    change: dict[str, Tensor]
    prob: dict[str, Tensor]
    window: int
    per_head: bool
    model_name: str
    clean_top_token: int | None = None  # the model's own top prediction on the prompt
    metric: str = "prob"  # what change measures: "prob" relative change, otherwise metric - clean metric
    value: dict[str, Tensor] | None = None  # the metric with the edges blocked (None: results written before metrics)
    clean_value: float = math.nan  # the metric on the clean run

    def __repr__(self) -> str:
        worst = ", ".join(f"{s} {float(v.min()):+.2f} at L{int(v.flatten().argmin()) // (v.shape[1] if v.dim() > 1 else 1)}"
                          for s, v in self.change.items())
        return (f"KnockoutResult({shorten(self.prompt)}, target={self.target!r}, clean {self.clean_prob:.3g}; "
                f"largest drops: {worst}; window={self.window}, per_head={self.per_head})")


@dataclass(frozen=True, repr=False, eq=False)
class DatasetKnockoutResult(Result):
    """Knockout averaged over prompts: ``mean[source]`` and ``ci95[source]`` (half-width of a normal
    95% interval, 1.96 x standard error) of the relative change of P(target), per layer (or layer and
    head); ``count[source]`` prompts averaged (a prompt with no position of a source is left out of
    that source). Each prompt's :class:`KnockoutResult` is in ``results``; ``used[i]`` says whether it
    was averaged (``exclude_incorrect``: only prompts whose clean top prediction is the target)."""

    sources: tuple[str, ...]
    mean: dict[str, Tensor]
    ci95: dict[str, Tensor]
    count: dict[str, int]
    window: int
    per_head: bool
    exclude_incorrect: bool
    model_name: str
    results: tuple[KnockoutResult, ...]
    used: tuple[bool, ...]
    skipped: tuple[tuple[int, str], ...] = ()
    metric: str = "prob"  # what the averaged change measures (KnockoutResult.metric)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s} {float(self.mean[s].min()):+.2f} at L{int(self.mean[s].flatten().argmin())}"
                          for s in self.sources if self.count[s])
        return (f"DatasetKnockoutResult({sum(self.used)} of {len(self.results)} prompts averaged; largest mean drops: "
                f"{parts or 'nothing averaged'}; window={self.window})")
