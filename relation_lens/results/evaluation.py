"""The result of editing evaluation (:func:`relation_lens.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from relation_lens.results.codec import Result


@dataclass(frozen=True, repr=False, eq=False)
class EvaluationResult(Result):
    """Per-record metrics and their summary (mean, 95% CI half-width), in percent for the rates."""

    method: str
    layer: int | None
    records: tuple[dict[str, Any], ...]
    summary: dict[str, tuple[float, float]]
    n_failed: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.summary["Score"][0]

    def __repr__(self) -> str:  # a summary; per-record numbers are in .records
        metrics = ", ".join(f"{k} {self.summary[k][0]:.1f}" for k in ("Score", "ES", "PS", "NS", "RS")
                            if k in self.summary)
        return (f"EvaluationResult({self.method} at layer {self.layer}: {metrics}; "
                f"{len(self.records)} records, {self.n_failed} failed)")

    def row(self) -> str:
        """One markdown table row: method, layer, Score, ES, PS, NS, RS, fluency (mean ± CI)."""
        na = lambda v, fmt: "n/a" if math.isnan(v) else format(v, fmt)  # noqa: E731
        cells = [na(self.summary["Score"][0], ".1f"), na(self.summary["ScoreROME"][0], ".1f")]
        for k in ("ES", "PS", "NS", "RS"):
            mu, ci = self.summary[k]
            cells.append("n/a" if math.isnan(mu) else f"{mu:.1f} ± {na(ci, '.1f')}")
        mu, ci = self.summary["fluency"]
        cells.append(f"{mu:.2f} ± {ci:.2f}" if not math.isnan(mu) else "n/a")
        return f"| {self.method} | {self.layer if self.layer is not None else '-'} | " + " | ".join(cells) + " |"

    @staticmethod
    def header() -> str:
        return ("| method | layer | Score | Score (ES,PS,NS) | ES | PS | NS | RS | fluency |\n"
                "|---|---|---|---|---|---|---|---|---|")
