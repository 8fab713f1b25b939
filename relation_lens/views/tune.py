"""The view of :func:`relation_lens.tune`: every trial's objective in the order run, the start and the
chosen trial marked, and the trial table."""

from __future__ import annotations

import html
import math
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from relation_lens.distributed import fingerprint
from relation_lens.results import register_view
from relation_lens.tune import TuneResult
from relation_lens.views.html import save_figure


@register_view(TuneResult, "plot")
def plot_tune(result: TuneResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """A point per trial (its objective; ES, PS, NS, RS as faint lines), the start and the chosen trial
    marked."""
    fig = Figure(figsize=(max(5.0, 0.25 * len(result.trials) + 3.0), 3.2), layout="constrained")
    ax = fig.subplots()
    xs = [t["trial"] for t in result.trials]
    val = lambda t, k: float("nan") if t.get(k) is None else float(t[k])  # noqa: E731
    for k, c in (("ES", "tab:green"), ("PS", "tab:olive"), ("NS", "tab:purple"), ("RS", "tab:brown")):
        ax.plot(xs, [val(t, k) for t in result.trials], color=c, alpha=0.35, lw=1, label=k)
    ax.plot(xs, [val(t, "objective") for t in result.trials], "o-", color="tab:blue", ms=4, label=result.objective)
    chosen = fingerprint(result.params)
    for t in result.trials:
        if t["key"] == chosen and not math.isnan(val(t, "objective")):
            ax.plot([t["trial"]], [val(t, "objective")], "*", color="tab:red", ms=14, label="chosen")
    ax.set_xlabel("trial (0: the defaults)")
    ax.set_ylabel("% (tuning split)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, ncol=3)
    shown = textwrap.fill(", ".join(f"{k}={v}" for k, v in result.params.items()), 90)
    ax.set_title(f"tune {result.method}{' + AlphaEdit' if result.alphaedit else ''} (chosen):\n{shown}", fontsize=8)
    return save_figure(fig, path, savefig_kwargs)


@register_view(TuneResult, "html")
def tune_html(result: TuneResult) -> str:
    rows = []
    for line in result.table().splitlines():
        if set(line) <= set("|-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<div><b>{html.escape(repr(result))}</b><table>{''.join(rows)}</table></div>")
