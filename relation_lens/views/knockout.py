"""Views of knockout results: Geva-style curves of the relative change of P(target) by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from relation_lens.errors import shorten
from relation_lens.results import DatasetKnockoutResult, KnockoutResult, register_view
from relation_lens.views.html import png_data_uri, save_figure


@register_view(KnockoutResult, "plot")
def plot_knockout(result: KnockoutResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """Geva-style curves: relative change of P(target) by layer, one line per source (per head:
    the head with the largest drop)."""
    curves = [(source, v.min(dim=1).values if v.dim() > 1 else v, None) for source, v in result.change.items()]
    label = f"% change in P({result.target.strip()})" if result.metric == "prob" else f"change in {result.metric}"
    return _curves_figure(curves, result.window, label,
                          f"attention knockout from the last position: {shorten(result.prompt, 60)}", path,
                          percent=result.metric == "prob", **savefig_kwargs)


@register_view(KnockoutResult, "html")
def knockout_html(result: KnockoutResult) -> str:
    return f'<img alt="attention knockout" src="{png_data_uri(plot_knockout(result))}">'


@register_view(DatasetKnockoutResult, "plot")
def plot_knockout_dataset(result: DatasetKnockoutResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """Mean relative change of P(target) by layer with 95% bands, one line per source (per head:
    the head with the largest mean drop)."""
    curves = []
    for s in result.sources:
        m, h = result.mean[s], result.ci95[s]
        if m.dim() > 1:
            worst = m.argmin(dim=1)
            m, h = m.gather(1, worst[:, None])[:, 0], h.gather(1, worst[:, None])[:, 0]
        curves.append((f"{s} (n={result.count[s]})", m, h))
    label = "% change in P(target)" if result.metric == "prob" else f"change in {result.metric}"
    return _curves_figure(curves, result.window, f"{label}, mean and 95% CI",
                          f"attention knockout from the last position, {sum(result.used)} prompts", path,
                          percent=result.metric == "prob", **savefig_kwargs)


@register_view(DatasetKnockoutResult, "html")
def knockout_dataset_html(result: DatasetKnockoutResult) -> str:
    return f'<img alt="attention knockout, dataset mean" src="{png_data_uri(plot_knockout_dataset(result))}">'


def _curves_figure(curves, window: int, ylabel: str, title: str, path, percent: bool = True,
                   **savefig_kwargs: Any) -> Figure:
    """Knockout curves by layer (in percent of a relative change, or as they are), ``curves`` =
    ``(label, values, half-width or None)``."""
    scale = 100 if percent else 1
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for label, m, h in curves:
        x = list(range(len(m)))
        ax.plot(x, (scale * m).tolist(), marker="o", label=label)
        if h is not None:
            ax.fill_between(x, (scale * (m - h)).tolist(), (scale * (m + h)).tolist(), alpha=0.2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"layer (centre of a {window}-layer window)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path, savefig_kwargs)
