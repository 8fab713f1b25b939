"""Offline HTML pieces: a figure as a PNG data URI, a circuitsvis token view with its JavaScript
inlined (``RenderedHTML.local_src``: ``str()`` of a circuitsvis object would point at a CDN and
render blank offline), and the page around them."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import circuitsvis as cv
import torch


def save_figure(fig, path, savefig_kwargs: dict):
    """Write ``fig`` to ``path`` if given (format from the suffix; 150 dpi unless ``dpi`` is passed)
    and return it: what every view's ``plot(path, **savefig_kwargs)`` does."""
    if path is not None:
        fig.savefig(path, dpi=savefig_kwargs.pop("dpi", 150), **savefig_kwargs)
    return fig


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def colored_tokens(tokens: Sequence[str], grids: dict[str, torch.Tensor]) -> str:
    values, labels = [], []
    for kind, grid in grids.items():
        for layer in range(grid.shape[0]):
            values.append(grid[layer])
            labels.append(f"{kind} L{layer}")
    view = cv.tokens.colored_tokens_multi(list(tokens), torch.stack(values, dim=1).float(), labels)
    return view.local_src


def page(title: str, summary: list[tuple[str, str]], figure_uri: str, interactive: str, note: str) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}th{text-align:left;padding-right:1em}"
        "img{max-width:100%}</style></head><body>"
        f"<h2>{html.escape(title)}</h2><table>{rows}</table>"
        f"<h3>Heatmaps</h3><img alt='trace heatmaps' src='{figure_uri}'>"
        f"<h3>Interactive view</h3><p>{html.escape(note)}</p>{interactive}</body></html>")
