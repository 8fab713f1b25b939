"""Views of trace results: matplotlib heatmaps in the style of ROME's figures (a bare ``Figure``, never
pyplot, so no global state of the user's is touched) and offline HTML pages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from relation_lens.results import DatasetTraceResult, TraceResult, register_view
from relation_lens.views.html import colored_tokens, page, png_data_uri, save_figure

CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"resid": "single restored layer", "mlp": "restored MLP window", "attn": "restored attention window"}
STATE = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def _figure(grids: dict[str, torch.Tensor], ylabels: Sequence[str], *, window: int, title: str, value_label: str,
            diverging: bool = False) -> Figure:
    # A bare Figure, not pyplot: no global state of the user's (backend, current figure) is touched.
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


def trace_figure(result: TraceResult) -> Figure:
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


@register_view(TraceResult, "plot")
def plot_trace(result: TraceResult, path: str | Path | None = None, **savefig_kwargs):
    """Heatmaps of ``result.scores`` (rows: tokens, corrupted ones starred; columns: layers).
    Saves to ``path`` (format from its suffix: .png, .pdf, .svg) and returns the figure."""
    fig = trace_figure(result)
    return save_figure(fig, path, savefig_kwargs)


@register_view(TraceResult, "html")
def trace_html(result: TraceResult) -> str:
    """A self-contained page: summary, the heatmaps, and a circuitsvis token view with one
    button per (kind, layer) that colours each token by its restored probability."""
    summary = [("prompt", result.prompt), ("subject", result.subject), ("corrupted", f"{result.corrupt} tokens "
               f"{result.corrupt_span}: {''.join(result.tokens[slice(*result.corrupt_span)])!r}"),
               ("target", f"{result.target!r} (clean top prediction {result.clean_top!r})"),
               ("P(target)", f"clean {result.clean_prob:.4f}, corrupted {result.corrupted_prob:.4f}"),
               ("settings", f"window {result.window}, {result.n_samples} noise samples, seed {result.seed}, "
                            f"model {result.model_name}")]
    return page(f"relation trace: {result.prompt}", summary, png_data_uri(trace_figure(result)),
                 colored_tokens(result.tokens, result.scores),
                 "Pick a (kind, layer) to colour each token by P(target) when that site is restored.")


def dataset_figure(result: DatasetTraceResult) -> Figure:
    means = {k: v for k, v in result.mean.items()}
    labels = list(result.buckets)
    title = (f"average indirect effect over {result.n_used} prompts ({result.corrupt} corrupted); "
             f"{result.n_incorrect} wrong prompts {'excluded' if result.exclude_incorrect else 'included'}")
    return _figure(means, labels, window=result.window, title=title, value_label="AIE", diverging=True)


@register_view(DatasetTraceResult, "plot")
def plot_dataset(result: DatasetTraceResult, path: str | Path | None = None, **savefig_kwargs):
    fig = dataset_figure(result)
    return save_figure(fig, path, savefig_kwargs)


@register_view(DatasetTraceResult, "html")
def dataset_html(result: DatasetTraceResult) -> str:
    summary = [("prompts", f"{result.n_total} traced, {result.n_used} averaged, {result.n_incorrect} that the model "
                           f"gets wrong ({'excluded' if result.exclude_incorrect else 'included'})"),
               ("corrupted", result.corrupt), ("settings", f"window {result.window}, model {result.model_name}")]
    return page("average indirect effects", summary, png_data_uri(dataset_figure(result)),
                 colored_tokens(list(result.buckets), result.mean),
                 "Rows are position buckets; pick a (kind, layer) to colour them by the average indirect effect.")
