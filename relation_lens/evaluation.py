"""Editing metrics on CounterFact-style records (ROME, Meng et al. 2022; RETS for relation specificity).

For each record, the edit is computed and applied, the metrics are measured, and the edit is undone
before the next record. A target's probability is that of its whole token sequence under teacher
forcing, as ``exp(mean token log-prob)`` (ROME compares mean per-token NLLs).

* ES, efficacy: 1[P(new) > P(true)] on the edit prompt; EM its magnitude P(new) - P(true).
* PS, paraphrase: the same averaged over paraphrase prompts; PM the magnitude.
* NS, neighborhood specificity: 1[P(true answer) > P(new)] averaged over other subjects with the same
  relation and true object; NM the magnitude P(true answer) - P(new).
* RS, relation specificity: the same over the edited subject's other relations, each with its own
  answer; RM the magnitude.
* Score: the harmonic mean of ES, PS, NS and RS; on records without relation prompts (CounterFact's: no RS)
  ROME's three-way Score of ES, PS and NS, which ``ScoreROME`` always is (as in ROME's tables).
* Fluency: ROME's weighted 2-/3-gram entropy (weights 2/3 and 4/3, arithmetic mean, bits) of greedy
  generations from the record's generation prompts.

Each summary value comes with a 95% interval (1.96 standard errors over records); every record's
own numbers are kept in ``records``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from relation_lens.distributed import Checkpoint, Ranks, fingerprint, gather, ranks
from relation_lens.editing import (
    EditConfig,
    Preserve,
    ValueCache,
    apply_edit,
    batch_defaults,
    batch_methods,
    compute_edit,
    default_config_of,
    default_layer,
    generate_prefixes,
    get_method,
    request_of,
    single_methods,
    statistics_for,
)
from relation_lens.errors import DataError, EditError, SpanError
from relation_lens.intervals import mean_ci95_list
from relation_lens.key_statistics import KeyStatistics, model_fingerprint
from relation_lens.model_interface import Model, mlp_out
from relation_lens.probes import fact_pair, greedy_generate, known_mask, target_probs
from relation_lens.results import EvaluationResult, ScoreDifference, SequenceResult
from relation_lens.results.evaluation import nan_for_null

METRICS = ("ES", "EM", "PS", "PM", "NS", "NM", "RS", "RM", "fluency")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: weighted arithmetic mean of n-gram entropies (bits) of the words."""
    words = text.split()
    ents = []
    for n in ns:
        grams = Counter(tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1)))
        total = sum(grams.values())
        ents.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, ents)) / len(ents)


def record_metrics(model: Model, rec: dict, fluency: bool = False) -> dict[str, float]:
    """One CounterFact-style record measured on the model as it is now: ES/EM (the prompt prefers
    ``target_new`` to ``target_true``; by how much), PS/PM (paraphrases), NS/NM (neighbourhood prompts
    keep their true object over ``target_new``), RS/RM (the subject's other relations keep their
    answers), and fluency when asked. Rates are 0-1 here; :class:`EvaluationResult` reports percent."""
    m = records_metrics(model, [rec])[0]
    if fluency:
        m["fluency"] = _fluency(model, rec)
    return m


def _fluency(model: Model, rec: dict) -> float:
    """ROME's fluency of greedy generations from the record's generation prompts (or its prompt)."""
    gens = [greedy_generate(model, g) for g in (rec.get("generation_prompts") or [rec["prompt"].format(rec["subject"])])]
    return sum(ngram_entropy(g) for g in gens) / len(gens)


def records_metrics(model: Model, records: Sequence[dict]) -> list[dict[str, float]]:
    """:func:`record_metrics` (without fluency) of several records, their probabilities read in one
    batched :func:`~relation_lens.probes.target_probs` call."""
    prompts: list[str] = []
    targets: list[str] = []
    reads: list[tuple[int, str, int, int]] = []
    for j, rec in enumerate(records):
        text = rec["prompt"].format(rec["subject"])
        new, true = rec["target_new"], rec["target_true"]
        paras = list(rec["paraphrase_prompts"])
        # (metric, prompts, the target that should win, the one it is compared with)
        for key, ps, wins, loses in (("E", [text], [new], [true]),
                                     ("P", paras, [new] * len(paras), [true] * len(paras)),
                                     ("N", list(rec["neighborhood_prompts"]), list(rec["neighborhood_targets"]),
                                      [new] * len(rec["neighborhood_prompts"])),
                                     ("R", list(rec["relation_prompts"]), list(rec["relation_targets"]),
                                      [new] * len(rec["relation_prompts"]))):
            if ps:
                reads.append((j, key, len(prompts), len(ps)))
                prompts += ps * 2
                targets += wins + loses
    p = target_probs(model, prompts, targets)
    out: list[dict[str, float]] = [{} for _ in records]
    for j, key, start, k in reads:
        a, b = p[start:start + k], p[start + k:start + 2 * k]
        out[j][f"{key}S"], out[j][f"{key}M"] = (a > b).float().mean().item(), (a - b).mean().item()
    return out


def _row(rec: dict) -> dict[str, Any]:
    """The fields of a record that its result row repeats."""
    return {"case_id": rec.get("case_id"), "subject": rec["subject"], "prompt": rec["prompt"],
            "target_new": rec["target_new"], "target_true": rec["target_true"]}


def _harmonic(values: list[float]) -> float:
    if any(math.isnan(v) for v in values) or not values:
        return float("nan")
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


_SCORES = {"Score": ("ES", "PS", "NS", "RS"), "ScoreROME": ("ES", "PS", "NS")}  # each Score's harmonic-mean rates


def _score_keys(rows: Sequence[dict[str, Any]], score: str) -> tuple[str, ...]:
    """The rates ``score`` is the harmonic mean of: ``Score`` is ROME's three-way Score on records that
    have no relation prompts (CounterFact's: no row has an RS), so that it ranks such evaluations too."""
    if score == "Score" and not any("RS" in r and "error" not in r for r in rows):
        return _SCORES["ScoreROME"]
    return _SCORES[score]


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean and 95% half-width of each metric over the rows without an ``error`` (rates in percent,
    fluency in bits), and the Scores: harmonic means of ES, PS, NS, RS (``Score``) and of ES, PS,
    NS (``ScoreROME``, ROME's three-way Score)."""
    ok = [r for r in rows if "error" not in r]
    summary = {}
    for k in METRICS:
        mu, ci = mean_ci95_list([r[k] for r in ok if k in r])
        scale = 1.0 if k == "fluency" else 100.0
        summary[k] = (mu * scale, ci * scale)
    for score in _SCORES:
        summary[score] = (_harmonic([summary[k][0] for k in _score_keys(rows, score)]), float("nan"))
    return summary


def _resampled(rows: Sequence[dict[str, Any]], weights: torch.Tensor, metric: str) -> torch.Tensor:
    """``metric`` (as :func:`summarise` computes it, in percent) of each resample: ``weights[s, i]`` is
    how often record ``i`` is drawn in resample ``s``; records with an ``error`` and absent metrics are
    left out, as in the summary."""
    keys = _score_keys(rows, metric) if metric in _SCORES else (metric,)
    means = []
    for k in keys:
        vals = torch.tensor([float(r.get(k, math.nan)) if "error" not in r else math.nan for r in rows],
                            dtype=torch.float64)
        present = ~torch.isnan(vals)
        w = weights * present
        means.append(100.0 * (w * torch.nan_to_num(vals)).sum(1) / w.sum(1))  # NaN where a resample has none
    if len(keys) == 1:
        return means[0]
    m = torch.stack(means)
    harmonic = len(keys) / (1.0 / m).sum(0)
    return torch.where(m.min(0).values <= 0, torch.zeros_like(harmonic), harmonic)  # _harmonic's 0


def score_difference(a: EvaluationResult, b: EvaluationResult, *, metric: str = "Score", block: int = 1,
                     n_resamples: int = 2000, seed: int = 0) -> ScoreDifference:
    """``a``'s ``metric`` minus ``b``'s, two evaluations of the same records, with a paired bootstrap
    95% interval: records are drawn with replacement, the same draw for both, in blocks of ``block``
    consecutive records (``evaluate_batch``'s ``batch_size``: a batch's records share one edit, so
    they are drawn together); each resample's metric is computed as the summary computes it (rates'
    means over records without an ``error``, the Scores their harmonic mean).

    Args:
        metric: ``"Score"``, ``"ScoreROME"`` or one of ``ES``, ``EM``, ``PS``, ``PM``, ``NS``, ``NM``,
            ``RS``, ``RM``.

    Raises:
        DataError: the two results are not of the same records in the same order, or an argument is out
            of range.
    """
    if not isinstance(a, EvaluationResult) or not isinstance(b, EvaluationResult):
        raise DataError(f"score_difference compares two EvaluationResults, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if metric not in (*_SCORES, *METRICS[:-1]):
        raise DataError(f"metric must be Score, ScoreROME or one of {list(METRICS[:-1])}, got {metric!r}")
    if not isinstance(block, int) or block < 1 or not isinstance(n_resamples, int) or n_resamples < 1:
        raise DataError(f"block and n_resamples must be positive ints, got {block!r} and {n_resamples!r}")
    ids_a, ids_b = ([(r.get("case_id"), r.get("prompt"), r.get("target_new")) for r in res.records] for res in (a, b))
    if ids_a != ids_b:
        first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        raise DataError(f"score_difference needs the same records in the same order ({len(ids_a)} and "
                        f"{len(ids_b)} records, first difference at {first})")
    n = len(a.records)
    if n == 0:
        raise DataError("score_difference needs at least one record")
    starts = list(range(0, n, block))
    draws = torch.randint(len(starts), (n_resamples, len(starts)), generator=torch.Generator().manual_seed(seed))
    picked = torch.zeros(n_resamples, len(starts), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(draws.shape, dtype=torch.float64))
    sizes = torch.tensor([min(block, n - s) for s in starts])
    weights = picked.repeat_interleave(sizes, dim=1)  # each record weighs as its block was drawn
    diffs = _resampled(a.records, weights, metric) - _resampled(b.records, weights, metric)
    diffs = diffs[~torch.isnan(diffs)]
    low, high = (torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                 if len(diffs) else (math.nan, math.nan))
    score_a, score_b = a.summary[metric][0], b.summary[metric][0]  # summarise(records), as evaluate builds it
    return ScoreDifference(metric=metric, a=score_a, b=score_b, difference=score_a - score_b, low=low,
                           high=high, n_records=n, block=block, n_resamples=n_resamples, seed=seed)


def _stats_digest(stats) -> Any:
    """What identifies the key statistics an evaluation uses (one, a dict by layer, or none)."""
    if stats is None:
        return None
    if isinstance(stats, dict):
        return {str(k): _stats_digest(v) for k, v in sorted(stats.items())}
    return getattr(stats, "fingerprint", type(stats).__name__)


def _preserve_digest(preserve: Preserve | None) -> Any:
    if preserve is None:
        return None
    return {"threshold": preserve.threshold, "l2": preserve.l2,
            "edited": {str(k): float(v.double().sum()) for k, v in sorted(preserve.edited.items())}}


def _resume(checkpoint: str | Path | None, description: dict[str, Any], model: Model, records: list[dict],
            r: Ranks) -> tuple[Checkpoint | None, dict[int, Any]]:
    """The checkpoint of an evaluation (``None`` without a folder) and what an earlier run with the same
    arguments finished there, by index (rows with their NaNs back)."""
    if checkpoint is None:
        return None, {}
    ckpt = Checkpoint(checkpoint, {**description, "model": model_fingerprint(model),
                                   "records": fingerprint(records)}, r)
    done = {}
    for i, row in ckpt.done().items():
        rows = nan_for_null(row["rows"])
        done[i] = list(rows)
    return ckpt, done


def evaluate(model: Model, records, *, method: str = "relation_rome", layer: int | None = None,
             config: EditConfig | None = None, stats=None, fluency: bool = True,
             progress: bool = False, preserve=None, checkpoint: str | Path | None = None) -> EvaluationResult:
    """Edit ``model`` for each record, measure, undo; summarise.

    Args:
        records: CounterFact records in the flat schema of :func:`relation_lens.data.loaders.load_counterfact`
            (a ``datasets.Dataset`` or a list of dicts).
        method: a registered single-request method (``"relation_rome"``, ``"rome"``, or one added with
            :func:`relation_lens.register_method`), or ``"none"`` (no edit: the unedited baseline).
        layer: the edited layer (``None``: the method's default, fixed from the first record for ROME).
        stats: key statistics of that layer (computed or loaded from the disk cache when ``None``).
        preserve: AlphaEdit's projection (:class:`~relation_lens.editing.alphaedit.Preserve`) for each
            edit (each record is edited alone, so only its preserved-knowledge null space acts).

    Records whose edit cannot be computed (e.g. the model already predicts ``target_new``) are kept
    with an ``error`` field and counted in ``n_failed``, not averaged.

    Under torch.distributed each rank edits and measures records ``i`` with ``i % world_size == rank``
    and every rank returns the whole result, its records in the input's order.

    ``checkpoint``: a folder where each record's row is written as it is measured; a killed run started
    again with the same arguments (model, records, method, layer, settings, statistics) skips the
    records done there and returns the same result. Other arguments are refused
    (:class:`~relation_lens.errors.ConfigError`).
    """
    records = [dict(r) for r in records]
    if method != "none" and method not in single_methods():
        raise EditError(f"method {method!r} is not one of {single_methods() + ['none']}"
                        + (" (a batch method: use evaluate_batch)" if method in batch_methods() else ""))
    edit_method = None if method == "none" else get_method(method)
    alpha = preserve is not None
    config = config or (EditConfig.default_for(model) if edit_method is None
                        else default_config_of(edit_method, model, alpha))
    options: dict[str, Any] = {}
    if edit_method is not None and "layer" in edit_method.options:
        if layer is None:
            layer = default_layer(model, "rome" if edit_method.key == "subject" else "relation_rome",
                                  request_of(records[0]), alpha)
        if stats is None:
            stats = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                          prepend_bos=config.prepend_bos)
        options["layer"] = layer
    r = ranks()
    ckpt, done = _resume(checkpoint, {"workload": "evaluate", "method": method, "layer": layer,
                                      "config": dataclasses.asdict(config), "fluency": fluency,
                                      "stats": _stats_digest(stats), "preserve": _preserve_digest(preserve)},
                         model, records, r)
    mine: dict[int, dict[str, Any]] = {}
    for i in tqdm(r.share(len(records)), desc=f"evaluating {method}", disable=not (progress and r.is_main)):
        if i in done:
            mine[i] = done[i][0]
            continue
        rec = records[i]
        row = _row(rec)
        if method == "none":
            row.update(record_metrics(model, rec, fluency))
        else:
            try:
                update = compute_edit(model, request_of(rec), method=method, stats=stats, config=config,
                                      preserve=preserve, **options)
            except (EditError, SpanError) as exc:
                row["error"] = str(exc)
            else:
                with apply_edit(model, update):
                    row.update(record_metrics(model, rec, fluency))
        mine[i] = row
        if ckpt is not None:
            ckpt.append({"index": i, "rows": [row]})
    rows = {i: row for part in gather(mine, r) for i, row in part.items()}
    out = [rows[i] for i in range(len(records))]
    failed = sum("error" in row for row in out)
    summary = summarise(out)
    return EvaluationResult(method=method, layer=layer, records=tuple(out), summary=summary, n_failed=failed,
                            settings={"key_mode": config.key_mode, "n_records": len(records), "fluency": fluency,
                                      "alphaedit": preserve is not None})


def evaluate_batch(model: Model, records, *, method: str = "relation_memit", batch_size: int = 10,
                   layers: Sequence[int] | None = None, config: EditConfig | None = None, stats: dict | None = None,
                   mom2_update_weight: float | None = None, preserve=None, fluency: bool = False,
                   progress: bool = False, values=None, checkpoint: str | Path | None = None) -> EvaluationResult:
    """Batch editing: the records are edited ``batch_size`` at a time with MEMIT or relation-MEMIT
    (one :class:`~relation_lens.editing.updates.BatchUpdate` per batch), every record of a batch is
    measured with the whole batch written, and the batch is undone before the next one. A batch
    whose update cannot be computed marks its records with an ``error``. The metrics are
    :func:`evaluate`'s (:func:`record_metrics`). ``values``: a
    :class:`~relation_lens.editing.memit.ValueCache`, to evaluate the same records at several batch
    sizes while optimising each record's ``z`` once.

    Under torch.distributed each rank edits and measures batches ``g`` with ``g % world_size == rank``
    (a batch is the same requests on any rank) and every rank returns the whole result. ``checkpoint``:
    as :func:`evaluate`'s, a batch's rows written as the batch is measured."""
    if method not in batch_methods():
        raise EditError(f"method {method!r} is not one of {batch_methods()}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EditError(f"batch_size must be a positive int, got {batch_size!r}")
    records = [dict(r) for r in records]
    layers, config, mom2_update_weight = batch_defaults(model, method, layers, config, mom2_update_weight,
                                                        preserve is not None)
    stats = statistics_for(model, layers, stats, config)
    r = ranks()
    ckpt, finished = _resume(checkpoint, {"workload": "evaluate_batch", "method": method, "layers": list(layers),
                                          "batch_size": batch_size, "mom2_update_weight": mom2_update_weight,
                                          "config": dataclasses.asdict(config), "fluency": fluency,
                                          "stats": _stats_digest(stats), "preserve": _preserve_digest(preserve)},
                             model, records, r)
    starts = list(range(0, len(records), batch_size))
    mine: dict[int, list[dict[str, Any]]] = {}
    for g in tqdm(r.share(len(starts)), desc=f"evaluating {method}", disable=not (progress and r.is_main)):
        if g in finished:
            mine[g] = finished[g]
            continue
        start = starts[g]
        batch = records[start:start + batch_size]
        rows = [_row(rec) for rec in batch]
        try:
            update = compute_edit(model, [request_of(rec) for rec in batch], method=method, layers=layers,
                                  stats=stats, config=config, mom2_update_weight=mom2_update_weight,
                                  preserve=preserve, values=values)
        except (EditError, SpanError) as exc:
            rows = [{**row, "error": str(exc)} for row in rows]
        else:
            with apply_edit(model, update):
                for row, rec, m in zip(rows, batch, records_metrics(model, batch)):
                    row.update(m)
                    if fluency:
                        row["fluency"] = _fluency(model, rec)
        mine[g] = rows
        if ckpt is not None:
            ckpt.append({"index": g, "rows": rows})
    done = {g: rows for part in gather(mine, r) for g, rows in part.items()}
    out = [row for g in range(len(starts)) for row in done[g]]
    failed = sum("error" in row for row in out)
    return EvaluationResult(method=method, layer=layers[-1], records=tuple(out), summary=summarise(out),
                            n_failed=failed,
                            settings={"layers": list(layers), "batch_size": batch_size, "n_records": len(records),
                                      "mom2_update_weight": mom2_update_weight, "alphaedit": preserve is not None,
                                      "fluency": fluency})


def untouched_pairs(facts) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of the untouched facts, each read by :func:`relation_lens.probes.fact_pair`
    (``(prompt, answer)`` tuples or dicts with ``prompt``, ``{}`` filled with ``subject``, and ``target``
    or ``target_true`` / ``object`` / ``attribute``)."""
    out = []
    for i, f in enumerate(facts or ()):
        try:
            out.append(fact_pair(f))
        except DataError as exc:
            raise DataError(f"untouched fact {i}: {exc}") from None
    return out


def _accuracy(model: Model, pairs: list[tuple[str, str]]) -> float:
    if not pairs:
        return float("nan")
    return sum(known_mask(model, [p for p, _ in pairs], [a for _, a in pairs])) / len(pairs)


def _rates(model: Model, done: list[dict]) -> dict[str, float]:
    per = records_metrics(model, done) if done else []
    out = {}
    for k in ("ES", "PS", "NS", "RS"):
        vals = [x[k] for x in per if k in x]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    out["Score"] = _harmonic([out[k] for k in _score_keys(per, "Score")])
    return out


def evaluate_sequence(model: Model, records, *, method: str = "relation_rome", layer: int | None = None,
                      layers: Sequence[int] | None = None, config: EditConfig | None = None, stats=None,
                      mom2_update_weight: float | None = None, preserve: Preserve | None = None,
                      untouched=None, checkpoints: Sequence[int] | None = None, batch_size: int = 1,
                      checkpoint: str | Path | None = None, fluency: int = 0,
                      progress: bool = False) -> SequenceResult:
    """Sequential editing: the records' edits written one after another without undoing in between
    (one request per step; the batch methods ``batch_size`` requests a step, as AlphaEdit's protocol
    edits 100 at a time), measured at ``checkpoints`` (numbers of edits; default: the end) over the
    records edited so far, then every edit undone in reverse order.

    As ROME's and MEMIT's code (their ``CONTEXT_TEMPLATES_CACHE``), the self-generated context prefixes
    are generated once, on the unedited model. With ``preserve`` (AlphaEdit), each applied edit's keys
    are remembered (in a copy: the ``Preserve`` given is left as it was), so later edits are solved in
    the null space of earlier ones too. A step whose
    edit cannot be computed (e.g. the model already gives its new object after earlier edits) is
    skipped and its requests counted (``edits`` vs ``applied``).

    Args:
        untouched: facts of subjects the sequence never edits, as ``(prompt, answer)`` pairs or dicts
            (:func:`untouched_pairs`); those the unedited model gets right (top-1) are measured.
        batch_size: requests per step (batch methods only); each of ``checkpoints`` must end a step.
        fluency: at each checkpoint, ROME's fluency (``fluency`` in the row) of greedy generations from
            the generation prompts of the first ``fluency`` records applied (0: not measured).
        checkpoint: a folder where the state after each step (the edited layers' weights, AlphaEdit's
            remembered keys, the rows so far) is written; a killed run started again with the same
            arguments on the same unedited model continues after the last step written and returns the
            same rows. Other arguments are refused (:class:`~relation_lens.errors.ConfigError`).

    A sequence cannot be split (each edit depends on the ones before): under torch.distributed every
    rank writes the same sequence, and a batch method's ``z``'s of each step are optimised over the
    ranks and gathered (:class:`~relation_lens.editing.memit.ValueCache` with ``spread=True``); only
    rank 0 writes the checkpoint. :func:`relation_lens.tune` spreads whole sequences over ranks instead.
    The model is as it was afterwards, also when an error is raised.
    """
    records = [dict(r) for r in records]
    if not records:
        raise DataError("evaluate_sequence got no records")
    m = get_method(method)
    batch = method in batch_methods()
    if not isinstance(batch_size, int) or batch_size < 1 or (batch_size > 1 and not batch):
        raise EditError(f"batch_size must be a positive int, and 1 for {method} (a single-request method): "
                        f"got {batch_size!r}")
    alpha = preserve is not None
    config = config or default_config_of(m, model, alpha)
    values = None
    if batch:
        layers, config, mom2_update_weight = batch_defaults(model, method, layers, config, mom2_update_weight, alpha)
        stats = statistics_for(model, layers, stats, config)
        values = ValueCache(spread=True)
        options: dict[str, Any] = {"layers": layers, "mom2_update_weight": mom2_update_weight, "values": values}
    else:
        if layers is not None:
            raise EditError(f"{method} edits one layer: give layer=, not layers=")
        if layer is None:
            layer = default_layer(model, "rome" if m.key == "subject" else "relation_rome", request_of(records[0]),
                                  alpha)
        layers = (layer,)
        if stats is None:
            stats = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                          prepend_bos=config.prepend_bos)
        options = {"layer": layer}
    marks = sorted(set(checkpoints or (len(records),)))
    if marks[0] < 1 or marks[-1] > len(records):
        raise DataError(f"checkpoints {marks} must lie in 1..{len(records)} (the number of records)")
    ends = [min(s + batch_size, len(records)) for s in range(0, len(records), batch_size)]
    if set(marks) - set(ends):
        raise DataError(f"checkpoints {sorted(set(marks) - set(ends))} do not end a step of {batch_size} edits")
    pairs = untouched_pairs(untouched)
    known = [pq for pq, k in zip(pairs, known_mask(model, [p for p, _ in pairs], [a for _, a in pairs]))
             if k] if pairs else []
    if preserve is not None:  # the caller's Preserve is left as it was: the sequence remembers into a copy
        own = Preserve(config=preserve.config)
        own.projectors, own.edited = dict(preserve.projectors), dict(preserve.edited)
        preserve = own
    r = ranks()
    state = _SequenceState(checkpoint, {
        "workload": "evaluate_sequence", "method": method, "layers": list(layers), "batch_size": batch_size,
        "config": dataclasses.asdict(config), "mom2_update_weight": mom2_update_weight, "marks": marks,
        "stats": _stats_digest(stats), "preserve": _preserve_digest(preserve), "fluency": fluency,
        "untouched": fingerprint([list(p) for p in known])}, model, records, r) if checkpoint is not None else None
    prefixes = generate_prefixes(model, config)
    W0 = {l: mlp_out(model, l).detach().clone() for l in layers}
    edits, done = [], []
    start, rows = 0, None
    try:
        if state is not None:
            start, rows, done = state.load(model, layers, preserve, records)
        if rows is None:
            rows = [{"edits": 0, "applied": 0, **_rates(model, records), "untouched": _accuracy(model, known),
                     "w_change": 0.0, **({"fluency": _mean_fluency(model, records[:fluency])} if fluency else {})}]
        steps = [(s, e) for s, e in zip(range(0, len(records), batch_size), ends) if e > start]
        for s, e in tqdm(steps, desc=f"sequence of {method}", disable=not (progress and r.is_main)):
            chunk = records[s:e]
            reqs = [request_of(rec) for rec in chunk]
            try:
                upd = compute_edit(model, reqs if batch else reqs[0], method=method, stats=stats, config=config,
                                   preserve=preserve, prefixes=prefixes, **options)
            except (EditError, SpanError):
                upd = None
            if upd is not None:
                edits.append(apply_edit(model, upd))
                done += [s + j for j in range(len(chunk))]
                if preserve is not None:
                    preserve.remember(upd)
            if e in marks:
                change = (sum((mlp_out(model, l).detach() - W0[l]).norm() ** 2 for l in layers) ** 0.5
                          / sum(W0[l].norm() ** 2 for l in layers) ** 0.5).item()
                rows.append({"edits": e, "applied": len(done), **_rates(model, [records[i] for i in done]),
                             "untouched": _accuracy(model, known), "w_change": change,
                             **({"fluency": _mean_fluency(model, [records[i] for i in done[:fluency]])}
                                if fluency else {})})
            if state is not None:
                state.save(model, layers, preserve, e, rows, done)
    finally:
        for ed in reversed(edits):
            ed.undo()
        if start > 0:  # the steps written before a restart: back to the unedited weights they started from
            with torch.no_grad():
                for l in layers:
                    mlp_out(model, l).copy_(W0[l])
    restored = all(torch.equal(mlp_out(model, l).detach(), W0[l]) for l in layers)
    return SequenceResult(method=method, layers=tuple(layers), rows=tuple(rows), restored=restored,
                          n_untouched=len(known),
                          settings={"n_records": len(records), "mom2_update_weight": mom2_update_weight,
                                    "alphaedit": preserve is not None, "checkpoints": marks,
                                    "batch_size": batch_size})


def _mean_fluency(model: Model, records: list[dict]) -> float:
    return sum(_fluency(model, rec) for rec in records) / len(records) if records else math.nan

class _SequenceState:
    """The checkpoint of a sequence: the manifest (:class:`~relation_lens.distributed.Checkpoint`) and
    ``state.pt``, the state after the last step written (replaced atomically, by rank 0)."""

    def __init__(self, folder, description: dict[str, Any], model: Model, records: list[dict], r: Ranks):
        self.ckpt = Checkpoint(folder, {**description, "model": model_fingerprint(model),
                                        "records": fingerprint(records)}, r)
        self.file = Path(folder) / "state.pt"
        self.rank = r

    def load(self, model: Model, layers, preserve: Preserve | None, records: list[dict]):
        """``(edits done, rows, indices of applied records)`` of the last step written, with the model's
        edited layers and ``preserve`` set to that step's (``(0, None, [])`` where none was)."""
        if not self.file.is_file():
            return 0, None, []
        state = torch.load(self.file, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for l in layers:
                w = mlp_out(model, l)
                w.copy_(state["weights"][l].to(w.device, w.dtype))
        if preserve is not None:
            preserve.edited = {int(k): v for k, v in state["edited"].items()}
        return int(state["edits"]), list(nan_for_null(state["rows"])), list(state["done"])

    def save(self, model: Model, layers, preserve: Preserve | None, edits: int, rows: list, done: list[int]) -> None:
        if not self.rank.is_main:
            return
        state = {"edits": edits, "rows": rows, "done": done,
                 "weights": {l: mlp_out(model, l).detach().cpu().clone() for l in layers},
                 "edited": dict(preserve.edited) if preserve is not None else {}}
        tmp = self.file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.file)
