"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations"): block the
last position's attention to a set of source positions over a window of layers and measure the
change in P(target).

For every layer ``l`` and source ``s`` the prompt is run clean, except that in the layers of the
window around ``l`` (centred and clipped as the tracing windows, :func:`window_layers`) the attention
scores from the last position to the positions of ``s`` are set to ``-inf`` before the softmax
(``blocks.{j}.attn.hook_attn_scores``), in all heads or in one head. The result is the relative
change ``(P_blocked - P_clean) / P_clean`` (Geva et al.'s measure); with another ``metric`` (``"logprob"``
or a function of the final-position logits, as :func:`relation_lens.trace` takes) it is the
difference ``metric_blocked - metric_clean``. Sources: ``"subject"`` (the subject tokens),
``"relation"`` (the tokens between the subject and the last token), ``"last"`` (the last token's
attention to itself), ``"other"`` (every other position: BOS, tokens before the subject).

All cells run as rows of batched forward passes; each row's hooks block only its own cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens.errors import (
    ConfigError,
    DataError,
    PromptError,
    SpanError,
    TargetError,
)
from relation_lens.guards import model_lock
from relation_lens.intervals import mean_ci95
from relation_lens.model_interface import Model
from relation_lens.results import DatasetKnockoutResult, KnockoutResult
from relation_lens.spans import Span, check_fits_context, find_spans
from relation_lens.tracing.config import TraceConfig, metric_name, window_layers
from relation_lens.tracing.dataset import fact_fields
from relation_lens.tracing.engine import Metric, metric_values
from relation_lens.tracing.inputs import check_model, resolve_target

SOURCES = ("subject", "relation", "last", "other")


def source_positions(n_tokens: int, subject_span: Span) -> dict[str, list[int]]:
    """The positions of each source in a prompt of ``n_tokens`` tokens."""
    a, b = subject_span
    last = n_tokens - 1
    return {"subject": list(range(a, b)), "relation": list(range(b, last)), "last": [last],
            "other": [p for p in range(last) if p < a]}


def knockout(model: Model, prompt: str, *, subject: str, target: str | int | None = None,
             sources: Sequence[str] = SOURCES, window: int | None = None, per_head: bool = False,
             batch_size: int = 256, prepend_bos: bool | None = None, metric: Metric = "prob") -> KnockoutResult:
    """Attention knockout of ``prompt`` (see the module docstring).

    Args:
        sources: some of ``"subject"``, ``"relation"``, ``"last"``, ``"other"``.
        window: layers blocked together, centred on each layer (``None``: depth-scaled, as tracing).
        per_head: one head at a time instead of all heads (``change[s]`` is then ``[layer, head]``).
        batch_size: most cells per forward pass.
        metric: ``"prob"`` (the relative change of P(target)), ``"logprob"`` or a metric function
            (``metric(logits)`` / ``metric(logits, targets)``, ``[rows, d_vocab] -> [rows]``): the
            difference from the clean run.
    """
    check_model(model, ("resid",), prompt)
    if not callable(metric) and metric not in ("prob", "logprob"):
        raise ConfigError(f"knockout's metric={metric!r} is not 'prob', 'logprob' or a function of the final-position "
                          "logits ([rows, d_vocab] -> [rows]); logit_diff needs a contrast, which knockout does not take")
    if isinstance(sources, str):
        sources = (sources,)
    bad = [s for s in sources if s not in SOURCES]
    if not sources or bad:
        raise ConfigError(f"sources {list(sources)!r} must be a non-empty choice of {list(SOURCES)}")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    # the window, batch size and BOS settings mean what they mean for tracing, and are checked the same way
    window = TraceConfig(window=window, batch_size=batch_size, prepend_bos=prepend_bos).window_for(L)
    spans = find_spans(model, prompt, subject, require_relation=False, prepend_bos=prepend_bos)
    T = len(spans.tokens)
    check_fits_context(model, prompt, T)
    positions = source_positions(T, spans.subject_span)
    tokens = spans.tokens.to(model.cfg.device)
    heads = list(range(H)) if per_head else [None]
    cells = [(s, l, h) for s in sources for l in range(L) for h in heads]
    with model_lock(model), torch.no_grad():
        clean_logits = model(tokens[None])[0, -1]
        tgt = resolve_target(model, prompt, target, clean_logits)
        clean = clean_logits.float().softmax(-1)[tgt.token].item()
        clean_value = metric_values(clean_logits[None], torch.tensor([tgt.token]), metric).float().item()
        blocked = _blocked(model, tokens, cells, positions, window, tgt.token, batch_size, metric)
    prob, value, change = {}, {}, {}
    for s in sources:
        p, v = (torch.tensor([blocked[(s, l, h)][i] for l in range(L) for h in heads], dtype=torch.float32)
                for i in (0, 1))
        p, v = (p.view(L, H), v.view(L, H)) if per_head else (p, v)
        prob[s], value[s] = p, v
        change[s] = (p - clean) / clean if metric == "prob" else v - clean_value
    return KnockoutResult(prompt=prompt, tokens=spans.str_tokens, subject=subject, subject_span=spans.subject_span,
                          target=tgt.text, target_token=tgt.token, clean_prob=clean,
                          positions={s: positions[s] for s in sources}, change=change, prob=prob, window=window,
                          per_head=per_head, model_name=model.cfg.model_name,
                          clean_top_token=int(clean_logits.argmax()), metric=metric_name(metric), value=value,
                          clean_value=clean_value)


def _blocked(model: Model, tokens: Tensor, cells: list, positions: dict[str, list[int]], window: int, target: int,
             batch_size: int, metric: Metric) -> dict:
    """``(P(target), metric)`` with each cell's edges blocked, cells as rows of batched forward passes."""
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, len(tokens)
    out: dict[tuple[str, int, int | None], tuple[float, float]] = {}
    for i in range(0, len(cells), batch_size):
        chunk = cells[i:i + batch_size]
        # block[j][row, head, key]: whether layer j blocks the last query's edge to that key in that row
        block = torch.zeros(L, len(chunk), H, T, dtype=torch.bool)
        for r, (s, l, h) in enumerate(chunk):
            keys = positions[s]
            if not keys:
                continue
            for j in window_layers(l, window, L):
                if h is None:
                    block[j, r][:, keys] = True
                else:
                    block[j, r, h, keys] = True
        block = block.to(tokens.device)

        def hook(scores: Float[Tensor, "batch head q k"], hook, _block=block):
            j = hook.layer()
            if not _block[j].any():
                return scores
            last = scores[:, :, -1, :].masked_fill(_block[j].to(scores.device), float("-inf"))  # blocks may be split
            scores = scores.clone()
            scores[:, :, -1, :] = last
            return scores

        hooks: list[tuple[str | Callable, Callable]] = [(f"blocks.{j}.attn.hook_attn_scores", hook) for j in range(L)]
        logits = model.run_with_hooks(tokens[None].expand(len(chunk), -1), fwd_hooks=hooks)
        last = logits[:, -1]
        p = last.float().softmax(-1)[:, target].tolist()
        v = metric_values(last, torch.full((len(chunk),), target), metric).float().tolist()
        out.update(zip(chunk, zip(p, v)))
    return out


def knockout_dataset(model: Model, facts, *, sources: Sequence[str] = SOURCES, window: int | None = None,
                     per_head: bool = False, exclude_incorrect: bool = True, skip_invalid: bool = True,
                     batch_size: int = 256, prepend_bos: bool | None = None,
                     progress: bool = False, metric: Metric = "prob") -> DatasetKnockoutResult:
    """:func:`knockout` over many facts (``prompt``, ``subject``, optional ``target``, as for
    :func:`relation_lens.trace_dataset`), averaged per source and layer with 95% intervals
    (:func:`relation_lens.intervals.mean_ci95`)."""
    items = [fact_fields(f, i) for i, f in enumerate(facts)]
    if not items:
        raise DataError("knockout_dataset got no facts")
    if isinstance(sources, str):
        sources = (sources,)
    results, skipped = [], []
    for i, (prompt, subject, target) in enumerate(tqdm(items, desc="knockout", disable=not progress)):
        try:
            results.append(knockout(model, prompt, subject=subject, target=target, sources=sources, window=window,
                                    per_head=per_head, batch_size=batch_size, prepend_bos=prepend_bos,
                                    metric=metric))
        except (SpanError, PromptError, TargetError) as exc:
            if not skip_invalid:
                raise
            skipped.append((i, str(exc)))
    used = tuple(r.clean_top_token == r.target_token or not exclude_incorrect for r in results)
    chosen = [r for r, u in zip(results, used) if u]
    L = model.cfg.n_layers
    shape = (L, model.cfg.n_heads) if per_head else (L,)
    mean, ci, count = {}, {}, {}
    for s in sources:
        have = [r.change[s] for r in chosen if r.positions[s]]
        count[s] = len(have)
        if have:
            mu, half, _ = mean_ci95(torch.stack(have), dim=0)
            mean[s], ci[s] = mu.float(), half.float()
        else:
            mean[s], ci[s] = torch.full(shape, math.nan), torch.full(shape, math.nan)
    w = results[0].window if results else TraceConfig(window=window).window_for(L)
    return DatasetKnockoutResult(sources=tuple(sources), mean=mean, ci95=ci, count=count, window=w, per_head=per_head,
                                 exclude_incorrect=exclude_incorrect, model_name=model.cfg.model_name,
                                 results=tuple(results), used=used, skipped=tuple(skipped), metric=metric_name(metric))
