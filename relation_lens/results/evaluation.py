"""The result of editing evaluation (:func:`relation_lens.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from relation_lens.results.codec import Result

_METRICS = ("ES", "EM", "PS", "PM", "NS", "NM", "RS", "RM", "fluency", "Score", "untouched", "w_change", "objective")


def nan_for_null(rows: Any, keys: tuple[str, ...] = _METRICS) -> tuple[dict[str, Any], ...]:
    """Rows read back from JSON with the NaN of their numbers (``keys``) back: strict JSON writes NaN
    as ``null``, and none of these numbers is ever ``None`` otherwise."""
    return tuple({k: (float("nan") if v is None and k in keys else v) for k, v in row.items()} for row in rows)


@dataclass(frozen=True, repr=False, eq=False)
class EvaluationResult(Result):
    """Per-record metrics and their summary (mean, 95% CI half-width), in percent for the rates."""

    method: str
    layer: int | None
    records: tuple[dict[str, Any], ...]
    summary: dict[str, tuple[float, float]]
    n_failed: int
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return super().from_dict({**d, "records": nan_for_null(d["records"])})

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


@dataclass(frozen=True, repr=False, eq=False)
class SequenceResult(Result):
    """:func:`relation_lens.evaluate_sequence`: one row per checkpoint of a sequence of edits (the first
    at 0 edits, the unedited model), each with ``edits`` (requests tried), ``applied`` (edits written),
    the rates ES / PS / NS / RS (0-1) over the records edited so far, ``untouched`` (top-1 accuracy on
    facts never edited that the unedited model gets right), ``w_change`` (||ΔW|| / ||W|| of the edited
    MLP output matrices) and ``Score`` (harmonic mean of ES, PS, NS and RS, 0-1; of ES, PS, NS without relation prompts); ``restored``: every
    edit undone in reverse order left the edited matrices bit for bit as they were."""

    method: str
    layers: tuple[int, ...]
    rows: tuple[dict[str, Any], ...]
    restored: bool
    n_untouched: int
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return super().from_dict({**d, "rows": nan_for_null(d["rows"])})

    @property
    def final(self) -> dict[str, Any]:
        """The last checkpoint's row."""
        return self.rows[-1]

    def at(self, edits: int) -> dict[str, Any]:
        """The row after ``edits`` edits (a checkpoint of the run)."""
        for row in self.rows:
            if row["edits"] == edits:
                return row
        raise KeyError(f"no checkpoint at {edits} edits (checkpoints: {[r['edits'] for r in self.rows]})")

    def __repr__(self) -> str:
        f = self.final
        return (f"SequenceResult({self.method} at layers {list(self.layers)}: after {f['edits']} edits "
                f"({f['applied']} applied) ES {100 * f['ES']:.1f}, PS {100 * f['PS']:.1f}, NS {100 * f['NS']:.1f}, "
                f"RS {100 * f['RS']:.1f}, untouched {100 * f['untouched']:.1f}; restored {self.restored})")


@dataclass(frozen=True, repr=False, eq=False)
class ScoreDifference(Result):
    """:func:`relation_lens.score_difference`: ``a``'s ``metric`` minus ``b``'s on the same records, with a
    paired bootstrap 95% interval (``low``, ``high``: the 2.5th and 97.5th percentiles of the difference
    over ``n_resamples`` resamples of the records, in blocks of ``block`` consecutive records)."""

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    n_records: int
    block: int
    n_resamples: int
    seed: int

    @property
    def significant(self) -> bool:
        """Whether the 95% interval leaves out 0."""
        return self.low > 0 or self.high < 0

    def __repr__(self) -> str:
        return (f"ScoreDifference({self.metric} {self.a:.1f} - {self.b:.1f} = {self.difference:+.1f}, 95% bootstrap "
                f"interval {self.low:+.1f} to {self.high:+.1f}; {self.n_records} records in blocks of {self.block})")
