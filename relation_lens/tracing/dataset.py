"""Dataset averages: trace many prompts with one config and average the indirect effects by layer
and position bucket (first / middle / last subject token, first / middle / last relation token,
last token), with 95% intervals (:func:`relation_lens.intervals.mean_ci95`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens.distributed import Checkpoint, fingerprint, gather, ranks
from relation_lens.errors import (
    ConfigError,
    DataError,
    PromptError,
    SpanError,
    TargetError,
    shorten,
)
from relation_lens.intervals import mean_ci95
from relation_lens.key_statistics import model_fingerprint
from relation_lens.model_interface import Model
from relation_lens.results import DatasetTraceResult, TraceResult
from relation_lens.tracing.api import trace, trace_packed
from relation_lens.tracing.config import TraceConfig
from relation_lens.tracing.inputs import TargetWarning, check_model, resolve_noise_std

BUCKETS = ("first subject", "middle subject", "last subject", "first relation", "middle relation",
           "last relation", "last token")


def bucket_positions(result: TraceResult) -> dict[str, list[int]]:
    """Token positions of each bucket. Relation buckets cover the relation span without the
    prompt's last token, which has a bucket of its own; an empty bucket gets no positions."""
    T = len(result.tokens)
    a, b = result.subject_span
    ra, rb = result.relation_span[0], min(result.relation_span[1], T - 1)

    def three(lo, hi):
        if hi <= lo:
            return [], [], []
        return [lo], list(range(lo + 1, hi - 1)), [hi - 1]

    sf, sm, sl = three(a, b)
    rf, rm, rl = three(ra, rb)
    return dict(zip(BUCKETS, (sf, sm, sl, rf, rm, rl, [T - 1])))


def bucketize(result: TraceResult, kind: str) -> Float[Tensor, "layer bucket"]:
    """Indirect effect of ``kind`` averaged inside each position bucket (NaN for an empty bucket)."""
    ie = result.indirect_effect(kind)
    cols = [ie[:, pos].mean(1) if pos else torch.full((ie.shape[0],), float("nan"))
            for pos in bucket_positions(result).values()]
    return torch.stack(cols, dim=1)


def fact_fields(item: Any, index: int) -> tuple[str, str, str | int | None]:
    """``(prompt, subject, target)`` of one dataset item (dict, object or tuple)."""
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        prompt, subject, target = item[0], item[1], (item[2] if len(item) == 3 else None)
    else:
        get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
        prompt, subject = get("prompt"), get("subject")
        target = get("target", None)
        if target is None:
            target = get("object", None) or get("attribute", None)
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise DataError(f"fact {index} ({shorten(repr(item))}) needs a 'prompt' and a 'subject' string")
    return prompt, subject, target


def average(results: list[TraceResult], kinds, n_layers: int, exclude_incorrect: bool):
    """Bucket means and 95% half-widths over the results chosen for averaging."""
    used = tuple(r.correct or not exclude_incorrect for r in results)
    chosen = [r for r, u in zip(results, used) if u]
    mean, ci = {}, {}
    count = torch.zeros(len(BUCKETS), dtype=torch.long)
    for kind in kinds:
        if chosen:
            stack = torch.stack([bucketize(r, kind) for r in chosen])  # [prompt, layer, bucket]
            mu, half, n = mean_ci95(stack, dim=0)
            mean[kind], ci[kind] = mu.float(), half.float()
            count = n[0]
        else:
            mean[kind] = torch.full((n_layers, len(BUCKETS)), torch.nan)
            ci[kind] = torch.full((n_layers, len(BUCKETS)), torch.nan)
    nan = float("nan")
    clean = sum(r.clean_prob for r in chosen) / len(chosen) if chosen else nan
    corrupted = sum(r.corrupted_prob for r in chosen) / len(chosen) if chosen else nan
    return used, mean, ci, count, clean, corrupted


def trace_dataset(model: Model, facts, *, config: TraceConfig | None = None, exclude_incorrect: bool = True,
                  skip_invalid: bool = True, progress: bool = False, checkpoint: str | Path | None = None,
                  pack: int = 8, **settings: Any) -> DatasetTraceResult:
    """Trace many prompts and average the indirect effects by layer and position bucket.

    Args:
        facts: items with ``prompt``, ``subject`` and optionally ``target`` (or ``object``/``attribute``):
            dicts, objects with those attributes, ``(prompt, subject[, target])`` tuples, or a
            ``datasets.Dataset``.
        config: a :class:`TraceConfig`; ``**settings`` override its fields as in :func:`trace`. Prompt
            ``i`` is traced with seed ``config.seed + i``; a noise rule is turned into one std for all.
        exclude_incorrect: leave out of the averages the prompts whose clean top prediction is not
            the target (they are traced and kept in ``results`` either way, and counted).
        skip_invalid: a fact that cannot be traced (e.g. no relation words left with
            ``include_last=False``) is recorded in ``skipped`` with the reason instead of raising.
        checkpoint: a folder where each prompt's result is appended as it finishes
            (:class:`relation_lens.distributed.Checkpoint`); a run started again with the same
            arguments skips what is done. A folder of a run with other arguments is refused.
        pack: prompts traced together in one engine run, their sites packed into shared batches of
            ``batch_size`` rows across prompts and positions (padded; see
            :func:`relation_lens.tracing.api.trace_packed`), so that short prompts fill a GPU's
            batches. ``pack=1`` traces prompt by prompt, as :func:`trace` does. Packed scores equal
            per-prompt ones up to float rounding (5e-6); the results are written to the checkpoint a
            pack at a time.

    Under torch.distributed (an initialised process group, or ``torchrun``'s environment) each rank
    traces the packs ``g`` (prompts ``g * pack`` to ``g * pack + pack - 1``) with
    ``g % world_size == rank`` and every rank returns the whole result, identical bit for bit to one
    process's (each prompt has its own seed, and a pack is the same batches on any rank).

    Returns:
        DatasetTraceResult (its means are NaN, and its repr says so, when nothing was averaged).
    """
    cfg = TraceConfig.of(config, settings)
    check_model(model, cfg.kinds)
    if not isinstance(pack, int) or isinstance(pack, bool) or pack < 1:
        raise ConfigError(f"pack must be a positive whole number of prompts, not {pack!r}")
    items = [fact_fields(f, i) for i, f in enumerate(facts)]
    if not items:
        raise DataError("trace_dataset got no facts")
    if not isinstance(cfg.noise, Tensor):
        cfg = cfg.replace(noise=resolve_noise_std(model, cfg.noise, cfg.noise_subjects))
    r = ranks()
    ckpt = None
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, {"workload": "trace_dataset", "config": cfg.to_dict(),
                                       "facts": fingerprint(items), "n_facts": len(items),
                                       "model": model_fingerprint(model), "skip_invalid": skip_invalid,
                                       "pack": pack}, r)
    done = ckpt.done() if ckpt else {}
    mine: dict[int, dict[str, Any]] = {}
    packs = [list(range(g * pack, min(len(items), g * pack + pack))) for g in r.share(-(-len(items) // pack))]
    todo = [[i for i in group if i not in done] for group in packs]
    todo = [group for group in todo if group]
    bar = tqdm(total=sum(map(len, todo)), desc="prompts", disable=not (progress and r.is_main))
    for group in todo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TargetWarning)
            if pack == 1:
                outcome: list[TraceResult | Exception] = []
                for i in group:
                    prompt, subject, target = items[i]
                    try:
                        outcome.append(trace(model, prompt, subject=subject, target=target,
                                             config=cfg.replace(seed=cfg.seed + i)))
                    except (SpanError, PromptError, TargetError) as exc:
                        outcome.append(exc)
            else:
                outcome = trace_packed(model, [(*items[i], cfg.replace(seed=cfg.seed + i)) for i in group],
                                       batch_size=cfg.batch_size)
        for i, res in zip(group, outcome):
            if isinstance(res, Exception):
                if not skip_invalid or not isinstance(res, (SpanError, PromptError, TargetError)):
                    raise res
                row: dict[str, Any] = {"index": i, "skipped": str(res)}
            else:
                row = {"index": i, "result": res}
            mine[i] = row
            if ckpt:  # results are kept as values here and turned into JSON for the checkpoint only
                ckpt.append({**row, "result": row["result"].to_dict()} if "result" in row else row)
        bar.update(len(group))
    bar.close()
    rows = {i: row for part in gather(mine, r) for i, row in part.items()}
    if ckpt:  # items done by an earlier run (by any rank, of any world size): every rank read them all
        rows.update({i: row for i, row in done.items() if i not in rows})
    results, skipped = [], []
    for i in sorted(rows):
        row = rows[i]
        if "skipped" in row:
            skipped.append((i, row["skipped"]))
        else:
            res = row["result"]  # a value traced now, or a dict read back from the checkpoint
            results.append(res if isinstance(res, TraceResult) else TraceResult.from_dict(res))
    used, mean, ci, count, clean, corrupted = average(results, cfg.kinds, model.cfg.n_layers, exclude_incorrect)
    return DatasetTraceResult(
        buckets=BUCKETS, mean=mean, ci95=ci, count=count, clean_prob=clean, corrupted_prob=corrupted,
        n_total=len(results), n_used=sum(used), n_incorrect=sum(not r.correct for r in results),
        exclude_incorrect=exclude_incorrect, corrupt=cfg.corrupt if isinstance(cfg.corrupt, str) else "explicit",
        window=cfg.window_for(model.cfg.n_layers), model_name=model.cfg.model_name,
        results=tuple(results), used=used, skipped=tuple(skipped))
