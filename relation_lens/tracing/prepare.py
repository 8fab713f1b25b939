"""A prompt made ready for the engine (:func:`prepare`): inputs checked, spans found, the clean
and corrupted runs done, the cells listed; :meth:`Prepared.finish` turns the engine's scores into a
:class:`~relation_lens.results.TraceResult`. Shared by :func:`~relation_lens.trace`, packing and
:func:`~relation_lens.patch`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from relation_lens.errors import ConfigError, PromptError, TargetError, shorten
from relation_lens.interventions import Clean, Intervention, Mean, Resample, Steer, Zero
from relation_lens.model_interface import Model, decode, embed, final_logits, run_blocks
from relation_lens.results import TraceResult
from relation_lens.spans import Prompt, check_fits_context, find_spans, is_token_input, spans_from_tokens
from relation_lens.tracing.attribution import attribution_grids
from relation_lens.tracing.config import TraceConfig, metric_name
from relation_lens.tracing.engine import (
    Job,
    Runs,
    clean_run,
    corrupted_run,
    embed_with_noise,
    grid_cells,
    metric_values,
)
from relation_lens.tracing.inputs import (
    corrupt_span_for,
    counterfactual,
    make_noise,
    resolve_target,
)


def attribution_scores(model: Model, job: Prepared) -> dict:
    """Attribution patching's approximate scores for the job's cells."""
    cfg = job.cfg
    grids = attribution_grids(model, job.start, job.job.runs.clean, cfg.kinds, job.window, job.job.target,
                              cfg.metric, job.job.contrast)
    return {c: grids[c.kind][c.layer, c.pos].item() for c in job.job.cells}


@dataclass
class Prepared:
    """A prompt ready for the engine: its clean and corrupted runs, the cells to score, and what
    the result needs besides the scores."""
    job: Job
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
    fixed: dict  # cells before the corrupted span: the corrupted value
    n: int  # rows per cell: noise samples, or 1 under replacement
    clean_value: float
    corrupted_value: float
    contrast: Any  # Target or None
    counterfactual: Any  # Counterfactual or None
    start: Any  # the corrupted run's residual entering block 0 (for attribution patching)
    extra_clean: dict  # the clean run's activations at the hooks asked for by name (rl.patch)
    corrupted_samples: Tensor  # [n]: the metric on each corrupted run (one per noise sample)

    def finish(self, model: Model, scores: dict) -> TraceResult:
        cfg, spans, tgt, T = self.cfg, self.spans, self.target, self.job.n_tokens
        grids = {k: torch.zeros(model.cfg.n_layers, T) for k in cfg.kinds}
        per_sample = all(isinstance(v, Tensor) for v in scores.values())  # the engine's; attribution gives floats
        samples = {k: torch.zeros(model.cfg.n_layers, T, self.n) for k in cfg.kinds} if per_sample else None
        for c in self.fixed:
            grids[c.kind][c.layer, c.pos] = self.corrupted_value
            if samples is not None:
                samples[c.kind][c.layer, c.pos] = self.corrupted_samples
        for c, v in scores.items():
            if isinstance(v, Tensor):
                grids[c.kind][c.layer, c.pos] = v.mean()
                assert samples is not None
                samples[c.kind][c.layer, c.pos] = v
            else:
                grids[c.kind][c.layer, c.pos] = v
        top = int(self.clean_logits.argmax())
        return TraceResult(
            prompt=self.prompt, tokens=spans.str_tokens, subject=self.subject, subject_span=spans.subject_span,
            relation_span=spans.relation_span, corrupt=self.mode, corrupt_span=self.span, target=tgt.text,
            target_token=tgt.token, target_requested=tgt.requested, target_n_tokens=tgt.n_tokens,
            clean_top=decode(model, [top]), clean_top_token=top,
            clean_prob=self.clean_logits.float().softmax(-1)[tgt.token].item(),
            corrupted_prob=self.corrupted_prob,
            scores=grids, samples=samples, window=self.window, n_samples=self.n, noise_std=self.std, seed=cfg.seed,
            model_name=model.cfg.model_name,
            settings={"include_last": cfg.include_last, "kinds": list(cfg.kinds), "batch_size": cfg.batch_size,
                      "prepend_bos": cfg.prepend_bos,
                      "noise": cfg.noise if isinstance(cfg.noise, str) else None},
            metric=metric_name(cfg.metric), clean_value=self.clean_value, corrupted_value=self.corrupted_value,
            corrupt_with=cfg.corrupt_with, method=cfg.method,
            contrast=None if self.contrast is None else self.contrast.text,
            contrast_token=None if self.contrast is None else self.contrast.token,
            corrupted_prompt=None if self.counterfactual is None else self.counterfactual.prompt,
            corrupted_tokens=None if self.counterfactual is None else tuple(
                decode(model, [t]) for t in self.counterfactual.tokens.tolist()),
        )


def _set_intervention(model: Model, job: Job, how: Intervention, cfg: TraceConfig) -> None:
    """Make the engine write ``how``'s values instead of the clean ones: zeros, a mean over
    reference prompts or another prompt's values go in place of the clean grids; a steering vector is
    added (mode "add"); a function is called per cell (mode "function")."""
    clean, T = job.runs.clean, job.n_tokens
    if isinstance(how, Zero):
        job.runs.clean = {k: torch.zeros_like(v) for k, v in clean.items()}
    elif isinstance(how, (Mean, Resample)):
        bos = model.cfg.default_prepend_bos if cfg.prepend_bos is None else cfg.prepend_bos
        grids = []
        for p in how.prompts:
            ref = clean_run(model, model.to_tokens(p, prepend_bos=bos)[0], list(clean))[0]
            n_ref = next(iter(ref.values())).shape[1]
            if n_ref < T:
                raise ConfigError(f"reference prompt {shorten(p)} has {n_ref} tokens; a trace patches every position "
                                  f"of the prompt's {T}, so each reference prompt needs at least {T} (align={how.align!r})")
            lo = 0 if how.align == "start" else n_ref - T
            grids.append({k: v[:, lo:lo + T] for k, v in ref.items()})
        job.runs.clean = {k: torch.stack([g[k] for g in grids]).mean(0) for k in clean}
    elif isinstance(how, Steer):
        if tuple(how.vector.shape) != (model.cfg.d_model,):
            raise ConfigError(f"Steer's vector has shape {list(how.vector.shape)}; the trace's sites (residual, MLP "
                              f"and attention outputs) hold [{model.cfg.d_model}]")
        job.mode, job.offset = "add", how.scale * how.vector.to(model.cfg.device, model.cfg.dtype)
    else:
        job.mode, job.function = "function", how


def prepare(model: Model, prompt: Prompt, subject: str | Sequence[int], target, cfg: TraceConfig,
            corrupted_prompt: Prompt | None = None,
             contrast: str | int | None = None, engine: bool = True, clean_hooks: Sequence[str] = (),
            intervention: Intervention | None = None) -> Prepared:
    """Check the inputs, run the clean and corrupted passes, list the cells (call under the model's
    lock and ``no_grad``). The corrupted run keeps every block's residual and keys/values only when
    the patching engine will use them (``engine`` and ``method="exact"``); otherwise it is one plain
    forward pass for the corrupted value. ``clean_hooks``: more hooks the clean pass keeps
    (``extra_clean``)."""
    window = cfg.window_for(model.cfg.n_layers)
    if window > model.cfg.n_layers:
        warnings.warn(f"window={window} is larger than the model's {model.cfg.n_layers} layers: every MLP / attention "
                      "window covers all of them, so those grids do not vary by layer (window=None scales ROME's 10 "
                      "to the depth)", stacklevel=4)
    if is_token_input(prompt):  # token ids and the subject's token span
        spans = spans_from_tokens(model, prompt, subject, include_last=cfg.include_last,
                                  require_relation=cfg.corrupt == "relation")
    elif not isinstance(prompt, str):
        raise PromptError(f"prompt must be text or token ids (a 1-D integer tensor or a list of ints), got "
                          f"{type(prompt).__name__} {shorten(prompt)}")
    else:
        spans = find_spans(model, prompt, cast(str, subject), include_last=cfg.include_last,
                           require_relation=cfg.corrupt == "relation", prepend_bos=cfg.prepend_bos)
    prompt, subject = spans.prompt, spans.subject  # text from here on (decoded, for token ids)
    T = len(spans.tokens)
    check_fits_context(model, prompt, T)
    mode, span = corrupt_span_for(spans, cfg.corrupt, T)
    tokens = spans.tokens.to(model.cfg.device)
    if corrupted_prompt is not None and cfg.corrupt_with != "replace":
        raise ConfigError("corrupted_prompt= is used by corrupt_with='replace' only (noise corruption was asked for)")
    if contrast is not None and cfg.metric != "logit_diff":
        raise ConfigError(f"contrast= is used by metric='logit_diff' only (metric={cfg.metric!r})")
    if cfg.metric == "logit_diff" and contrast is None and cfg.corrupt_with == "noise":
        raise ConfigError("metric='logit_diff' under noise corruption needs contrast= (the answer to compare "
                          "the target with); under corrupt_with='replace' it defaults to the counterfactual's answer")
    cf = None
    if cfg.corrupt_with == "replace":
        cf = counterfactual(model, spans, subject, mode, span, corrupted_prompt=corrupted_prompt, seed=cfg.seed,
                            prepend_bos=cfg.prepend_bos)
        n, std = 1, None
        start = embed(model, cf.tokens.to(model.cfg.device)[None])  # the replaced tokens' embeddings
    else:
        noise_t, std = make_noise(model, cfg.n_samples, span[1] - span[0], cfg.noise, cfg.seed, cfg.noise_subjects)
        n = noise_t.shape[0]
        start = embed_with_noise(model, tokens, span, noise_t)
    clean, clean_logits, extra_clean = clean_run(model, tokens, cfg.kinds, clean_hooks)
    tgt = resolve_target(model, prompt, target, clean_logits)
    if engine and cfg.method == "exact":
        resids, kvs, corrupt_logits = corrupted_run(model, start)
    else:
        resids, kvs = [], []
        corrupt_logits = final_logits(model, run_blocks(model, start, 0, model.cfg.n_layers))[:, -1]
    contrast_t = None
    if cfg.metric == "logit_diff":
        contrast_t = resolve_target(model, prompt, contrast if contrast is not None else int(corrupt_logits[0].argmax()),
                                    clean_logits)
        if contrast_t.token == tgt.token:
            raise TargetError(f"the contrast {contrast_t.text!r} is the target itself (prompt {prompt!r}); "
                              "logit_diff needs another answer" + (" (the counterfactual's answer is the target: pass "
                                                                   "contrast= or corrupted_prompt=)" if contrast is None else ""))
    targets = torch.tensor([tgt.token])
    contrasts = None if contrast_t is None else torch.tensor([contrast_t.token])
    corrupted_prob = corrupt_logits.float().softmax(-1)[:, tgt.token].mean().item()
    corrupted_samples = metric_values(corrupt_logits, targets.repeat(n), cfg.metric,
                                      None if contrasts is None else contrasts.repeat(n)).float().cpu()
    corrupted_value = corrupted_samples.mean().item()
    clean_value = metric_values(clean_logits[None], targets, cfg.metric, contrasts).item()
    # Before the corrupted span the clean and corrupted runs are the same (causal attention, noise
    # only on the span), so restoring a site there changes nothing: its score is the corrupted one.
    # (Any other intervention changes the run there too: every cell is run.)
    cells = grid_cells(cfg.kinds, model.cfg.n_layers, T, window)
    restoring = intervention is None or isinstance(intervention, Clean)
    fixed = dict.fromkeys([c for c in cells if c.pos < span[0]], corrupted_value) if restoring else {}
    job = Job(Runs(clean, resids, kvs), [c for c in cells if c.pos >= span[0] or not restoring], tgt.token, T,
               None if contrast_t is None else contrast_t.token)
    if not restoring:
        assert intervention is not None
        _set_intervention(model, job, intervention, cfg)
    return Prepared(job, prompt, subject, cfg, spans, mode, span, tgt, clean_logits, corrupted_prob, std, window,
                     fixed, n, clean_value, corrupted_value, contrast_t, cf, start, extra_clean, corrupted_samples)
