"""The view of :func:`relation_lens.locate`: the mean effect per layer with its interval, the layers
the rule could choose among, and the ones it chose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from relation_lens.locate import LocateResult
from relation_lens.results import register_view
from relation_lens.views.html import save_figure


@register_view(LocateResult, "plot")
def plot_locate(result: LocateResult, path: str | Path | None = None, **savefig_kwargs: Any) -> Figure:
    """A bar per layer (mean indirect effect of its MLP output at the rule's token, 95% interval);
    the chosen layers dark, the layers outside the rule's choice greyed."""
    L = len(result.effect)
    fig = Figure(figsize=(max(4.0, 0.35 * L + 2.0), 3.0), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:blue" if l in result.layers else ("lightsteelblue" if l in result.allowed else "lightgrey")
              for l in range(L)]
    ax.bar(range(L), result.effect.tolist(), yerr=result.ci95.nan_to_num().tolist(), color=colors, capsize=2)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean indirect effect (MLP, {result.token})")
    ax.set_title(f"locate {result.method}: layers {list(result.layers)} ({result.corrupt} corrupted, "
                 f"{result.n_used} prompts)", fontsize=8)
    return save_figure(fig, path, savefig_kwargs)


@register_view(LocateResult, "html")
def locate_html(result: LocateResult) -> str:
    rows = "".join(f"<tr><td>{l}</td><td>{float(e):.4g} ± {float(h):.2g}</td><td>{'chosen' if l in result.layers else ''}"
                   f"</td></tr>" for l, (e, h) in enumerate(zip(result.effect, result.ci95)))
    return (f"<div><b>locate {result.method}</b>: layers {list(result.layers)} ({result.corrupt} corrupted, MLP at the "
            f"{result.token}, {result.n_used} prompts)<table><tr><th>layer</th><th>effect</th><th></th></tr>{rows}"
            "</table></div>")
