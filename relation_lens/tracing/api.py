"""``trace()``: one prompt, one config, one :class:`~relation_lens.results.TraceResult`."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from relation_lens.errors import ConfigError, RelationLensError
from relation_lens.guards import model_lock
from relation_lens.interventions import Clean, as_intervention
from relation_lens.model_interface import Model
from relation_lens.results import TraceResult
from relation_lens.spans import Prompt, Span
from relation_lens.tracing.config import TraceConfig
from relation_lens.tracing.engine import run_jobs
from relation_lens.tracing.inputs import check_model
from relation_lens.tracing.prepare import Prepared, attribution_scores, prepare


def trace(model: Model, prompt: Prompt, *, subject: str | Span, target: str | int | None = None, config: TraceConfig | None = None,
          corrupted_prompt: Prompt | None = None, contrast: str | int | None = None, progress: bool = False,
          intervention: Any = "clean", **settings: Any) -> TraceResult:
    """Trace where ``model`` carries the relation (or subject) of ``prompt``.

    Args:
        model: a HookedTransformer. It is left exactly as it was (no hooks, no weight changes).
        prompt: text ending right before the answer, e.g. ``"The Space Needle is located in the city of"``.
        subject: a substring of ``prompt``; the relation span is the tokens after it up to the end.
        target: the answer to score (string, token id), or ``None`` for the model's top clean prediction.
            A multi-token string is scored by its first token (with a :class:`TargetWarning`).
        config: a :class:`TraceConfig` (defaults if ``None``).
        corrupted_prompt: with ``corrupt_with="replace"``, the counterfactual prompt whose tokens the
            corrupted span takes (same token length); ``None`` builds one from the world (see
            :func:`relation_lens.tracing.inputs.counterfactual`).
        contrast: with ``metric="logit_diff"``, the contrast answer (string or token id); ``None``
            takes the counterfactual's top answer under ``"replace"`` (required under noise).
        progress: show a progress bar.
        intervention: what each restored site receives (:mod:`relation_lens.interventions`): the clean
            value (``"clean"``, causal tracing), ``"zero"``, ``Mean(prompts)`` / ``Resample(prompt)``
            (each reference prompt at least as long as ``prompt``), ``Steer(vector)`` (``[d_model]``) or
            a function ``f(clean, corrupted, site)``, called per cell and, for MLP and attention
            windows, per layer of the window. Exact with ``method="exact"`` only.
        **settings: any :class:`TraceConfig` field, overriding ``config``'s (``corrupt="subject"``,
            ``kinds="mlp"``, ``window=10``, ``n_samples``, ``noise``, ``seed``, ``include_last``,
            ``batch_size``, ``prepend_bos``...).

    Returns:
        TraceResult with ``scores[kind]`` a ``[n_layers, n_pos]`` grid of the metric (P(target) by
        default); ``result.normalised(kind)`` rescales it to 0 = corrupted, 1 = clean.

    Raises:
        ConfigError, NoiseError, SpanError, PromptError, TargetError, UnsupportedModelError: each names
        the input that was wrong; the model is unchanged.
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, cfg.kinds, prompt)
    how = as_intervention(intervention)
    if not isinstance(how, Clean) and cfg.method != "exact":
        raise ConfigError(f"intervention {how.name!r} needs method='exact': attribution patching approximates "
                          "restoring the clean value only")
    with model_lock(model), torch.no_grad():
        job = prepare(model, prompt, subject, target, cfg, corrupted_prompt, contrast, intervention=how)
        scores = attribution_scores(model, job) if cfg.method == "attribution" else \
            run_jobs(model, [job.job], job.n, cfg.batch_size, progress, metric=cfg.metric)[0]
    result = job.finish(model, scores)
    if not isinstance(how, Clean):
        result.settings["intervention"] = how.describe()
    if cfg.method == "attribution" and result.out_of_range:
        bad = result.out_of_range
        result.settings["out_of_range"] = bad
        warnings.warn(f"attribution patching gave {sum(bad.values())} cell(s) outside the range of {result.metric} "
                      f"({', '.join(f'{k}: {n}' for k, n in bad.items())}; first-order estimates, not values the "
                      "metric can take): result.out_of_range lists them; method='exact' gives the true values",
                      AttributionRangeWarning, stacklevel=2)
    return result


class AttributionRangeWarning(UserWarning):
    """Attribution patching estimated cells outside the range its metric can take (a probability
    above 1, a log-probability above 0): the first-order approximation is far off there."""


def trace_packed(model: Model, items: list[tuple[str, str, Any, TraceConfig]], *, batch_size: int,
                 progress: bool = False) -> list[TraceResult | Exception]:
    """Trace several prompts in one engine run whose batches mix sites of different prompts (and
    positions): ``items`` are ``(prompt, subject, target, config)`` with one ``n_samples`` and one set
    of kinds; ``batch_size`` counts rows. A prompt whose inputs are wrong gives its exception in
    place of a result. The scores equal per-prompt :func:`trace` scores up to float rounding (the
    padded attention sums in another order; tested to 1e-6)."""
    prepared: list[Prepared | Exception] = []
    with model_lock(model), torch.no_grad():
        for prompt, subject, target, cfg in items:
            check_model(model, cfg.kinds, prompt)
            try:
                prepared.append(prepare(model, prompt, subject, target, cfg))
            except RelationLensError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if isinstance(p, Prepared)]
        if len({(p.n, tuple(p.cfg.kinds), p.cfg.metric, p.cfg.method) for p in ok}) > 1:
            raise ConfigError("trace_packed needs one n_samples, one set of kinds, one metric and one method for all "
                              "its prompts")
        if ok and ok[0].cfg.method == "attribution":  # one backward pass per prompt: nothing to pack
            scores = iter([attribution_scores(model, p) for p in ok])
        else:
            scores = iter(run_jobs(model, [p.job for p in ok], ok[0].n, batch_size, progress, pack=True,
                                    metric=ok[0].cfg.metric) if ok else [])
    return [p.finish(model, next(scores)) if isinstance(p, Prepared) else p for p in prepared]
