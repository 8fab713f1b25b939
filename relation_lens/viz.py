"""Views of trace results: matplotlib heatmaps in the style of ROME's figures, and offline HTML.

The HTML inlines circuitsvis' JavaScript bundle (``RenderedHTML.local_src``), so it renders with no
network; ``str()`` of a circuitsvis object would point at a CDN and render blank offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from relation_lens.tracing import TraceResult

CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"resid": "single restored layer", "mlp": "restored MLP window", "attn": "restored attention window"}
STATE = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def _figure(grids: dict[str, torch.Tensor], ylabels: Sequence[str], *, window: int, title: str, value_label: str,
            diverging: bool = False):
    # A bare Figure, not pyplot: no global state of the user's (backend, current figure) is touched.
    from matplotlib.figure import Figure

    kinds = list(grids)
    n_rows = len(ylabels)
    fig = Figure(figsize=(3.6 * len(kinds) + 0.8, 0.32 * n_rows + 1.8), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        grid = grids[kind].float().T.numpy()  # [rows, layer]
        kwargs = {}
        if diverging:
            lim = max(abs(grid.min()), abs(grid.max()), 1e-9)
            kwargs = {"vmin": -lim, "vmax": lim}
        im = ax.imshow(grid, cmap=CMAPS.get(kind, "viridis") if not diverging else "RdBu_r", aspect="auto",
                       interpolation="nearest", **kwargs)
        ax.set_yticks(range(n_rows), ylabels, fontsize=8)
        n_layers = grid.shape[1]
        step = max(1, n_layers // 8)
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xlabel(TITLES[kind] if kind == "resid" else f"center of {window} restored {kind.upper()} layers",
                      fontsize=8)
        ax.set_title(f"restoring the {STATE[kind]}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8).set_label(value_label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def trace_figure(result: "TraceResult"):
    a, b = result.corrupt_span
    labels = [f"{t!r}*" if a <= i < b else repr(t) for i, t in enumerate(result.tokens)]
    how = "replaced" if result.corrupt_with == "replace" else "noised"
    if result.metric == "prob":
        what, clean, corrupted = f"P({result.target!r})", result.clean_prob, result.corrupted_prob
        label = f"p({result.target.strip()})"
    else:
        what = (f"logit({result.target!r}) - logit({result.contrast!r})" if result.metric == "logit_diff"
                else f"log P({result.target!r})")
        clean, corrupted, label = result.clean_value, result.corrupted_value, result.metric
    title = f"{result.corrupt} {how} (*): {what} clean {clean:.3f}, corrupted {corrupted:.3f}"
    return _figure(result.scores, labels, window=result.window, title=title, value_label=label)


def plot_trace(result: "TraceResult", path: str | Path | None = None, **savefig_kwargs):
    """Heatmaps of ``result.scores`` (rows: tokens, corrupted ones starred; columns: layers).
    Saves to ``path`` (format from its suffix: .png, .pdf, .svg) and returns the figure."""
    fig = trace_figure(result)
    if path is not None:
        fig.savefig(path, dpi=savefig_kwargs.pop("dpi", 150), **savefig_kwargs)
    return fig


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _colored_tokens(tokens: Sequence[str], grids: dict[str, torch.Tensor]) -> str:
    import circuitsvis as cv

    values, labels = [], []
    for kind, grid in grids.items():
        for layer in range(grid.shape[0]):
            values.append(grid[layer])
            labels.append(f"{kind} L{layer}")
    view = cv.tokens.colored_tokens_multi(list(tokens), torch.stack(values, dim=1).float(), labels)
    return view.local_src


def _page(title: str, summary: list[tuple[str, str]], figure_uri: str, interactive: str, note: str) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}th{text-align:left;padding-right:1em}"
        "img{max-width:100%}</style></head><body>"
        f"<h2>{html.escape(title)}</h2><table>{rows}</table>"
        f"<h3>Heatmaps</h3><img alt='trace heatmaps' src='{figure_uri}'>"
        f"<h3>Interactive view</h3><p>{html.escape(note)}</p>{interactive}</body></html>")


def trace_html(result: "TraceResult") -> str:
    """A self-contained page: summary, the heatmaps, and a circuitsvis token view with one
    button per (kind, layer) that colours each token by its restored probability."""
    summary = [("prompt", result.prompt), ("subject", result.subject), ("corrupted", f"{result.corrupt} tokens "
               f"{result.corrupt_span}: {''.join(result.tokens[slice(*result.corrupt_span)])!r}"),
               ("target", f"{result.target!r} (clean top prediction {result.clean_top!r})"),
               ("P(target)", f"clean {result.clean_prob:.4f}, corrupted {result.corrupted_prob:.4f}"),
               ("settings", f"window {result.window}, {result.n_samples} noise samples, seed {result.seed}, "
                            f"model {result.model_name}")]
    return _page(f"relation trace: {result.prompt}", summary, _png_data_uri(trace_figure(result)),
                 _colored_tokens(result.tokens, result.scores),
                 "Pick a (kind, layer) to colour each token by P(target) when that site is restored.")


def dataset_figure(result) -> object:
    means = {k: v for k, v in result.mean.items()}
    labels = list(result.buckets)
    title = (f"average indirect effect over {result.n_used} prompts ({result.corrupt} corrupted); "
             f"{result.n_incorrect} wrong prompts {'excluded' if result.exclude_incorrect else 'included'}")
    return _figure(means, labels, window=result.window, title=title, value_label="AIE", diverging=True)


def plot_dataset(result, path: str | Path | None = None, **savefig_kwargs):
    fig = dataset_figure(result)
    if path is not None:
        fig.savefig(path, dpi=savefig_kwargs.pop("dpi", 150), **savefig_kwargs)
    return fig


def dataset_html(result) -> str:
    summary = [("prompts", f"{result.n_total} traced, {result.n_used} averaged, {result.n_incorrect} that the model "
                           f"gets wrong ({'excluded' if result.exclude_incorrect else 'included'})"),
               ("corrupted", result.corrupt), ("settings", f"window {result.window}, model {result.model_name}")]
    return _page("average indirect effects", summary, _png_data_uri(dataset_figure(result)),
                 _colored_tokens(list(result.buckets), result.mean),
                 "Rows are position buckets; pick a (kind, layer) to colour them by the average indirect effect.")
