"""Views of patch results: a bar per restored group against the clean and corrupted runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from relation_lens.results import PatchResult, register_view
from relation_lens.sites import site_label
from relation_lens.tracing.path_patch import PathPatchResult
from relation_lens.views.html import save_figure


@register_view(PatchResult, "plot")
def plot_patch(result: PatchResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """A bar per group: the metric with that group restored, against the clean and corrupted runs."""
    fig = Figure(figsize=(max(4.0, 0.35 * len(result.values) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    labels = [", ".join(site_label(s) for s in g) if len(g) < 3 else f"{len(g)} sites" for g in result.groups]
    ax.bar(range(len(result.values)), list(result.values), color="tab:blue")
    ax.axhline(result.clean_value, color="green", lw=1, ls="--", label="clean")
    ax.axhline(result.corrupted_value, color="red", lw=1, ls="--", label="corrupted")
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
    ax.set_ylabel(f"{result.metric} of {result.target.strip()!r}")
    ax.legend(fontsize=7)
    return save_figure(fig, path, savefig_kwargs)


@register_view(PatchResult, "html")
def patch_html(result: PatchResult) -> str:
    rows = "".join(f"<tr><td>{', '.join(site_label(s) for s in g)}</td><td>{v:.4g}</td></tr>"
                   for g, v in zip(result.groups, result.values))
    return (f"<div><b>{result.metric}</b> of {result.target!r}: clean {result.clean_value:.4g}, corrupted "
            f"{result.corrupted_value:.4g}<table><tr><th>restored</th><th>{result.metric}</th></tr>{rows}</table></div>")


@register_view(PathPatchResult, "plot")
def plot_path_patch(result: PathPatchResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """Senders that are one head each (``senders="heads"``): a layer x head heatmap of the metric's
    change from the corrupted run; other senders: a bar per group, as :func:`plot_patch`."""
    try:
        grid = result.head_grid()
    except Exception:
        return plot_patch(result, path, **savefig_kwargs)
    delta = (grid - result.corrupted_value).numpy()
    fig = Figure(figsize=(max(3.5, 0.45 * grid.shape[1] + 2), max(2.5, 0.35 * grid.shape[0] + 1.2)), layout="constrained")
    ax = fig.subplots()
    lim = float(abs(delta[~(delta != delta)]).max()) if delta.size else 1.0
    im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    to = "logits" if not result.receivers else ", ".join(site_label(s) for s in result.receivers)
    ax.set_title(f"path patching: each head -> {to}\n{result.prompt!r}", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"change in {result.metric} of {result.target.strip()!r}")
    return save_figure(fig, path, savefig_kwargs)
