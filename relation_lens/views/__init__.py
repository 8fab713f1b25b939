"""Every rendering of results: matplotlib figures (bare ``Figure`` objects, never pyplot) and
offline HTML (circuitsvis with its JavaScript inlined). Importing this package registers the
renderers that ``result.plot()``, ``result.to_html()`` and notebook display reach
(:func:`relation_lens.results.register_view`); views import results, never the reverse."""

from relation_lens.views.html import colored_tokens, page, png_data_uri
from relation_lens.views.knockout import (
           knockout_dataset_html,
           knockout_html,
           plot_knockout,
           plot_knockout_dataset,
)
from relation_lens.views.locate import locate_html, plot_locate
from relation_lens.views.patch import patch_html, plot_patch
from relation_lens.views.trace import (
           dataset_figure,
           dataset_html,
           plot_dataset,
           plot_trace,
           trace_figure,
           trace_html,
)
from relation_lens.views.tune import plot_tune, tune_html

__all__ = ["colored_tokens", "page", "png_data_uri", "knockout_html", "knockout_dataset_html", "plot_knockout",
           "plot_knockout_dataset", "locate_html", "plot_locate", "plot_tune", "tune_html", "patch_html", "plot_patch", "dataset_figure", "dataset_html", "plot_dataset",
           "plot_trace", "trace_figure", "trace_html"]
