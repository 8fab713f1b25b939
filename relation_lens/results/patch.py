"""The result of patching chosen sites (:func:`relation_lens.patch`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from relation_lens.intervals import mean_ci95_list
from relation_lens.results.codec import Result
from relation_lens.sites import Site


@dataclass(frozen=True, repr=False, eq=False)
class PatchResult(Result):
    """``values[g]``: the metric (mean over noise samples) with group ``groups[g]`` patched;
    ``samples[g]``: each noise sample's value (empty in results written before they were kept)."""
    prompt: str
    tokens: tuple[str, ...]
    groups: tuple[tuple[Site, ...], ...]
    values: tuple[float, ...]
    metric: str
    target: str
    target_token: int
    clean_value: float
    corrupted_value: float
    corrupt_span: tuple[int, int]
    corrupt_with: str
    n_samples: int
    model_name: str
    settings: dict = field(default_factory=dict)
    samples: tuple[tuple[float, ...], ...] = ()

    def ci95(self) -> tuple[tuple[float, float], ...]:
        """Per group, the mean over noise samples and its 95% half-width (``1.96 x std / sqrt(n)``;
        NaN for one sample), from :attr:`samples`."""
        return tuple(mean_ci95_list(list(s)) for s in self.samples)

    def normalised(self) -> tuple[float, ...]:
        """0 = the corrupted run, 1 = the clean run (Zhang & Nanda 2023)."""
        gap = self.clean_value - self.corrupted_value
        return tuple(math.nan if gap == 0 else (v - self.corrupted_value) / gap for v in self.values)

    def __repr__(self) -> str:
        return (f"PatchResult({self.prompt!r}, {len(self.groups)} groups, {self.metric} of {self.target!r}: clean "
                f"{self.clean_value:.4g}, corrupted {self.corrupted_value:.4g})")
