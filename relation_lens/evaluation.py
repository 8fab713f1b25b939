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
* Score: the harmonic mean of ES, PS, NS and RS (``score_rome``: of ES, PS and NS, as in ROME's tables).
* Fluency: ROME's weighted 2-/3-gram entropy (weights 2/3 and 4/3, arithmetic mean, bits) of greedy
  generations from the record's generation prompts.

Each summary value comes with a 95% interval (1.96 standard errors over records); every record's
own numbers are kept in ``records``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from relation_lens.distributed import gather, ranks
from relation_lens.editing import (
    EditConfig,
    apply_edit,
    batch_defaults,
    batch_methods,
    compute_edit,
    default_layer,
    get_method,
    request_of,
    single_methods,
    statistics_for,
)
from relation_lens.errors import EditError, SpanError
from relation_lens.intervals import mean_ci95_list
from relation_lens.key_statistics import KeyStatistics
from relation_lens.model_interface import Model
from relation_lens.probes import greedy_generate, target_probs
from relation_lens.results import EvaluationResult

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
    summary["Score"] = (_harmonic([summary[k][0] for k in ("ES", "PS", "NS", "RS")]), float("nan"))
    summary["ScoreROME"] = (_harmonic([summary[k][0] for k in ("ES", "PS", "NS")]), float("nan"))
    return summary


def evaluate(model: Model, records, *, method: str = "relation_rome", layer: int | None = None,
             config: EditConfig | None = None, stats=None, fluency: bool = True,
             progress: bool = False) -> EvaluationResult:
    """Edit ``model`` for each record, measure, undo; summarise.

    Args:
        records: CounterFact records in the flat schema of :func:`relation_lens.data.loaders.load_counterfact`
            (a ``datasets.Dataset`` or a list of dicts).
        method: a registered single-request method (``"relation_rome"``, ``"rome"``, or one added with
            :func:`relation_lens.register_method`), or ``"none"`` (no edit: the unedited baseline).
        layer: the edited layer (``None``: the method's default, fixed from the first record for ROME).
        stats: key statistics of that layer (computed or loaded from the disk cache when ``None``).

    Records whose edit cannot be computed (e.g. the model already predicts ``target_new``) are kept
    with an ``error`` field and counted in ``n_failed``, not averaged.

    Under torch.distributed each rank edits and measures records ``i`` with ``i % world_size == rank``
    and every rank returns the whole result, its records in the input's order.
    """
    records = [dict(r) for r in records]
    if method != "none" and method not in single_methods():
        raise EditError(f"method {method!r} is not one of {single_methods() + ['none']}"
                        + (" (a batch method: use evaluate_batch)" if method in batch_methods() else ""))
    edit_method = None if method == "none" else get_method(method)
    config = config or (EditConfig.default_for(model) if edit_method is None else edit_method.default_config(model))
    options: dict[str, Any] = {}
    if edit_method is not None and "layer" in edit_method.options:
        if layer is None:
            layer = default_layer(model, "rome" if edit_method.key == "subject" else "relation_rome",
                                  request_of(records[0]))
        if stats is None:
            stats = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                          prepend_bos=config.prepend_bos)
        options["layer"] = layer
    r = ranks()
    mine: dict[int, dict[str, Any]] = {}
    for i in tqdm(r.share(len(records)), desc=f"evaluating {method}", disable=not (progress and r.is_main)):
        rec = records[i]
        row = _row(rec)
        if method == "none":
            row.update(record_metrics(model, rec, fluency))
        else:
            try:
                update = compute_edit(model, request_of(rec), method=method, stats=stats, config=config, **options)
            except (EditError, SpanError) as exc:
                row["error"] = str(exc)
                mine[i] = row
                continue
            with apply_edit(model, update):
                row.update(record_metrics(model, rec, fluency))
        mine[i] = row
    rows = {i: row for part in gather(mine, r) for i, row in part.items()}
    out = [rows[i] for i in range(len(records))]
    failed = sum("error" in row for row in out)
    summary = summarise(out)
    return EvaluationResult(method=method, layer=layer, records=tuple(out), summary=summary, n_failed=failed,
                            settings={"key_mode": config.key_mode, "n_records": len(records), "fluency": fluency})


def evaluate_batch(model: Model, records, *, method: str = "relation_memit", batch_size: int = 10,
                   layers: Sequence[int] | None = None, config: EditConfig | None = None, stats: dict | None = None,
                   mom2_update_weight: float | None = None, preserve=None, fluency: bool = False,
                   progress: bool = False, values=None) -> EvaluationResult:
    """Batch editing: the records are edited ``batch_size`` at a time with MEMIT or relation-MEMIT
    (one :class:`~relation_lens.editing.updates.BatchUpdate` per batch), every record of a batch is
    measured with the whole batch written, and the batch is undone before the next one. A batch
    whose update cannot be computed marks its records with an ``error``. The metrics are
    :func:`evaluate`'s (:func:`record_metrics`). ``values``: a
    :class:`~relation_lens.editing.memit.ValueCache`, to evaluate the same records at several batch
    sizes while optimising each record's ``z`` once."""
    if method not in batch_methods():
        raise EditError(f"method {method!r} is not one of {batch_methods()}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EditError(f"batch_size must be a positive int, got {batch_size!r}")
    records = [dict(r) for r in records]
    layers, config, mom2_update_weight = batch_defaults(model, method, layers, config, mom2_update_weight)
    stats = statistics_for(model, layers, stats, config)
    out = []
    for start in tqdm(range(0, len(records), batch_size), desc=f"evaluating {method}", disable=not progress):
        batch = records[start:start + batch_size]
        rows = [_row(rec) for rec in batch]
        try:
            update = compute_edit(model, [request_of(rec) for rec in batch], method=method, layers=layers,
                                  stats=stats, config=config, mom2_update_weight=mom2_update_weight,
                                  preserve=preserve, values=values)
        except (EditError, SpanError) as exc:
            out += [{**row, "error": str(exc)} for row in rows]
            continue
        with apply_edit(model, update):
            for row, rec, m in zip(rows, batch, records_metrics(model, batch)):
                row.update(m)
                if fluency:
                    row["fluency"] = _fluency(model, rec)
        out += rows
    failed = sum("error" in row for row in out)
    return EvaluationResult(method=method, layer=layers[-1], records=tuple(out), summary=summarise(out),
                            n_failed=failed,
                            settings={"layers": list(layers), "batch_size": batch_size, "n_records": len(records),
                                      "mom2_update_weight": mom2_update_weight, "alphaedit": preserve is not None,
                                      "fluency": fluency})
