"""Relation tracing and ROME's causal tracing, with a batched patching engine.

One idea per module: :mod:`.config` (``TraceConfig``, the kinds, the window rule), :mod:`.inputs`
(model check, noise, target, corrupted span), :mod:`.engine` (the only module touching
TransformerLens internals), :mod:`.results` (result types), :mod:`.api` (``trace``) and
:mod:`.dataset` (``trace_dataset`` and the bucket averages).

The method (Meng et al. 2022, extended to relations by Li, Chen & Wang 2024):

1. Run the prompt clean and record every hidden state.
2. Corrupt a span of tokens (the relation words, or the subject for ROME's causal tracing) by
   adding Gaussian noise to their token embeddings (``hook_embed``); ``n_samples`` draws.
3. For every site (layer ``l``, position ``p``), run the corrupted prompt again but restore the
   clean value at that site, and score the probability of the target at the last position:

   * ``"resid"``: the residual stream after block ``l`` (``blocks.{l}.hook_resid_post``);
   * ``"mlp"``: the MLP outputs (``blocks.{j}.hook_mlp_out``) at position ``p`` for the ``window``
     layers ``j`` centred on ``l`` as ROME does: ``range(max(0, l - window // 2),
     min(n_layers, l + ceil(window / 2)))``;
   * ``"attn"``: the same with the attention outputs (``blocks.{j}.hook_attn_out``).

   The score of a site is the mean over noise samples of P(target). The indirect effect of a site
   is its score minus the corrupted probability.

The engine gives the same numbers as that one-run-per-site loop (checked against a naive oracle
in the tests) but does only the work each patched run truly needs. A run patched at
(layer ``l``, position ``p``) is identical to the corrupted run below its lowest restored layer
``s`` and, under causal attention, at every position before ``p``. So the engine runs the
corrupted prompt once, keeps its residual stream and its attention keys/values at every layer,
and for each site recomputes only layers ``>= s`` at positions ``>= p``, attending to the cached
corrupted keys/values of the earlier positions; a site before the corrupted span is not run at
all (clean and corrupted states are the same there, so its score is the corrupted probability).
Sites are grouped by ``p`` and packed into batches of at most ``batch_size`` rows (sites x noise
samples); inside a batch, a row joins the layer loop at its own start layer. Only the last
position is unembedded.
"""

from relation_lens.results import DatasetTraceResult, TraceResult
from relation_lens.tracing.api import trace
from relation_lens.tracing.config import (
    HOOKS,
    KINDS,
    NOISE_MULTIPLIER,
    Kind,
    TraceConfig,
    depth_scaled_window,
    window_layers,
)
from relation_lens.tracing.dataset import (
    BUCKETS,
    bucket_positions,
    bucketize,
    fact_fields,
    trace_dataset,
)
from relation_lens.tracing.inputs import (
    Target,
    TargetWarning,
    check_model,
    corrupt_span_for,
    make_noise,
    noise_std,
    resolve_noise_std,
    resolve_target,
    rome_noise_std,
)
from relation_lens.tracing.knockout import (
    SOURCES,
    DatasetKnockoutResult,
    KnockoutResult,
    knockout,
    knockout_dataset,
    source_positions,
)

__all__ = [
    "trace", "trace_dataset", "TraceConfig", "TraceResult", "DatasetTraceResult", "TargetWarning", "Kind", "KINDS",
    "knockout_dataset", "DatasetKnockoutResult",
    "HOOKS", "NOISE_MULTIPLIER", "BUCKETS", "window_layers", "depth_scaled_window", "check_model", "make_noise",
    "noise_std", "rome_noise_std", "resolve_noise_std", "resolve_target", "Target", "corrupt_span_for",
    "bucket_positions", "bucketize", "fact_fields", "knockout", "KnockoutResult", "SOURCES",
    "source_positions",
]
