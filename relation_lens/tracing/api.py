"""``trace()``: one prompt, one config, one :class:`~relation_lens.tracing.results.TraceResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from relation_lens._locks import model_lock
from relation_lens.spans import check_fits_context, find_spans
from relation_lens.tracing.config import TraceConfig
from relation_lens.errors import ConfigError, RelationLensError
from relation_lens.tracing.engine import _cells, _clean_run, _corrupted_run, _Job, _run_jobs, _Runs
from relation_lens.tracing.inputs import check_model, corrupt_span_for, make_noise, resolve_target
from relation_lens.tracing.results import TraceResult


def trace(model, prompt: str, *, subject: str, target: str | int | None = None, config: TraceConfig | None = None,
          progress: bool = False, **settings: Any) -> TraceResult:
    """Trace where ``model`` carries the relation (or subject) of ``prompt``.

    Args:
        model: a HookedTransformer. It is left exactly as it was (no hooks, no weight changes).
        prompt: text ending right before the answer, e.g. ``"The Space Needle is located in the city of"``.
        subject: a substring of ``prompt``; the relation span is the tokens after it up to the end.
        target: the answer to score (string, token id), or ``None`` for the model's top clean prediction.
            A multi-token string is scored by its first token (with a :class:`TargetWarning`).
        config: a :class:`TraceConfig` (defaults if ``None``).
        progress: show a progress bar.
        **settings: any :class:`TraceConfig` field, overriding ``config``'s (``corrupt="subject"``,
            ``kinds="mlp"``, ``window=10``, ``n_samples``, ``noise``, ``seed``, ``include_last``,
            ``batch_size``, ``prepend_bos``...).

    Returns:
        TraceResult with ``scores[kind]`` a ``[n_layers, n_pos]`` grid of P(target).

    Raises:
        ConfigError, NoiseError, SpanError, PromptError, TargetError, UnsupportedModelError: each names
        the input that was wrong; the model is unchanged.
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, cfg.kinds, prompt)
    with model_lock(model), torch.no_grad():
        job = _prepare(model, prompt, subject, target, cfg)
        scores = _run_jobs(model, [job.job], cfg.n_samples, cfg.batch_size, progress)[0]
    return job.finish(model, scores)


@dataclass
class _Prepared:
    """A prompt ready for the engine: its clean and corrupted runs, the cells to score, and what
    the result needs besides the scores."""
    job: _Job
    prompt: str
    subject: str
    cfg: TraceConfig
    spans: Any
    mode: str
    span: tuple[int, int]
    target: Any
    clean_logits: Tensor
    corrupted_prob: float
    std: Any  # float, or None for an explicit noise tensor
    window: int
    fixed: dict  # cells before the corrupted span: the corrupted probability

    def finish(self, model, scores: dict) -> TraceResult:
        cfg, spans, tgt, T = self.cfg, self.spans, self.target, self.job.n_tokens
        grids = {k: torch.zeros(model.cfg.n_layers, T) for k in cfg.kinds}
        for c, v in {**self.fixed, **scores}.items():
            grids[c.kind][c.layer, c.pos] = v
        top = int(self.clean_logits.argmax())
        return TraceResult(
            prompt=self.prompt, tokens=spans.str_tokens, subject=self.subject, subject_span=spans.subject_span,
            relation_span=spans.relation_span, corrupt=self.mode, corrupt_span=self.span, target=tgt.text,
            target_token=tgt.token, target_requested=tgt.requested, target_n_tokens=tgt.n_tokens,
            clean_top=model.tokenizer.decode([top]), clean_top_token=top,
            clean_prob=self.clean_logits.float().softmax(-1)[tgt.token].item(),
            corrupted_prob=self.corrupted_prob,
            scores=grids, window=self.window, n_samples=cfg.n_samples, noise_std=self.std, seed=cfg.seed,
            model_name=model.cfg.model_name,
            settings={"include_last": cfg.include_last, "kinds": list(cfg.kinds), "batch_size": cfg.batch_size,
                      "prepend_bos": cfg.prepend_bos,
                      "noise": cfg.noise if isinstance(cfg.noise, str) else None},
        )


def _prepare(model, prompt: str, subject: str, target, cfg: TraceConfig) -> _Prepared:
    """Check the inputs, run the clean and corrupted passes, list the cells (call under the model's
    lock and ``no_grad``)."""
    window = cfg.window_for(model.cfg.n_layers)
    spans = find_spans(model, prompt, subject, include_last=cfg.include_last,
                       require_relation=cfg.corrupt == "relation", prepend_bos=cfg.prepend_bos)
    T = len(spans.tokens)
    check_fits_context(model, prompt, T)
    mode, span = corrupt_span_for(spans, cfg.corrupt, T)
    tokens = spans.tokens.to(model.cfg.device)
    noise_t, std = make_noise(model, cfg.n_samples, span[1] - span[0], cfg.noise, cfg.seed, cfg.noise_subjects)
    clean, clean_logits = _clean_run(model, tokens, cfg.kinds)
    tgt = resolve_target(model, prompt, target, clean_logits)
    resids, kvs, corrupt_logits = _corrupted_run(model, tokens, span, noise_t)
    corrupted_prob = corrupt_logits.float().softmax(-1)[:, tgt.token].mean().item()
    # Before the corrupted span the clean and corrupted runs are the same (causal attention, noise
    # only on the span), so restoring a site there changes nothing: its score is the corrupted one.
    cells = _cells(cfg.kinds, model.cfg.n_layers, T, window)
    fixed = dict.fromkeys([c for c in cells if c.pos < span[0]], corrupted_prob)
    job = _Job(_Runs(clean, resids, kvs), [c for c in cells if c.pos >= span[0]], tgt.token, T)
    return _Prepared(job, prompt, subject, cfg, spans, mode, span, tgt, clean_logits, corrupted_prob, std, window,
                     fixed)


def trace_packed(model, items: list[tuple[str, str, Any, TraceConfig]], *, batch_size: int,
                 progress: bool = False) -> list[TraceResult | Exception]:
    """Trace several prompts in one engine run whose batches mix sites of different prompts (and
    positions): ``items`` are ``(prompt, subject, target, config)`` with one ``n_samples`` and one set
    of kinds; ``batch_size`` counts rows. A prompt whose inputs are wrong gives its exception in
    place of a result. The scores equal per-prompt :func:`trace` scores up to float rounding (the
    padded attention sums in another order; tested to 1e-6)."""
    prepared: list[_Prepared | Exception] = []
    with model_lock(model), torch.no_grad():
        for prompt, subject, target, cfg in items:
            check_model(model, cfg.kinds, prompt)
            try:
                prepared.append(_prepare(model, prompt, subject, target, cfg))
            except RelationLensError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if isinstance(p, _Prepared)]
        if len({(p.cfg.n_samples, tuple(p.cfg.kinds)) for p in ok}) > 1:
            raise ConfigError("trace_packed needs one n_samples and one set of kinds for all its prompts")
        scores = iter(_run_jobs(model, [p.job for p in ok], ok[0].cfg.n_samples, batch_size, progress, pack=True)
                      if ok else [])
    return [p.finish(model, next(scores)) if isinstance(p, _Prepared) else p for p in prepared]
