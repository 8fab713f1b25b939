"""Editing settings for a model nobody published settings for: :func:`tune`.

:func:`tune` searches the layers :func:`~relation_lens.locate` reads off the model's own traces and
the method's hyperparameters on a **tuning split** of records (kept apart from the records a result is
reported on), and returns what :func:`~relation_lens.compute_edit` takes.

The search is a coordinate search from the method's current defaults for the model (the published
settings, or the model's presets): for each setting in turn, every candidate value is tried with the
others held at the best so far, and the best is kept (a tie keeps the earlier); passes repeat until one
changes nothing or ``budget`` trials are spent. The start is trial 0, so the result is never worse than
the defaults on the tuning split. It is deterministic: the same arguments give the same trials, which
is what makes it resumable (a killed run started again with the same ``checkpoint`` folder reuses every
trial written there and goes on from where it stopped) and the same on any number of processes.

What a trial scores (``objective``):

* single edits (``sequence=None``): the Score, the harmonic mean of ES, PS, NS and RS (percent; of ES, PS and NS on
  records without relation prompts, such as CounterFact's)
  of :func:`~relation_lens.evaluate` (ROME, relation-ROME) or :func:`~relation_lens.evaluate_batch`
  (MEMIT, relation-MEMIT, ``batch_size`` requests a batch), each record edited and undone; a batch
  method's trials share a :class:`~relation_lens.ValueCache`, so a trial that changes only lambda,
  AlphaEdit's settings or the layers below the last reuses every ``z`` (``values_reused`` in its row);
* sequences (``sequence=N``): :func:`~relation_lens.evaluate_sequence` writes the first ``N`` records'
  edits one after another; the trial scores the harmonic mean of the Score over the edited records and
  the untouched-fact accuracy (percent) after the ``N`` edits. The accuracy alone would be best with no
  edit at all, so both must hold; both are in the trial table.

The settings searched (``space=`` replaces any candidate list, or leaves a setting out with ``()``):

* ROME / relation-ROME: ``layer`` (the :func:`locate` peak and its neighbours in the rule's layers, and
  the current default layer), ``v_weight_decay``, ``clamp_norm_factor``, ``v_steps``;
* MEMIT / relation-MEMIT: ``layers`` (the :func:`locate` critical ranges at fractions 1, 0.75, 0.5 and
  0.25 of the peak, and the current default), ``mom2_update_weight`` (lambda), ``clamp_norm_factor``;
* with ``alphaedit=True``, also AlphaEdit's ``threshold`` and ``l2``, one value for every edited layer
  (as AlphaEdit's code and hyperparameter files have them), searched before the others.

Data parallelism (torch.distributed, as :func:`~relation_lens.evaluate`): the key statistics of every
candidate layer and the :func:`locate` traces are computed once, by all ranks together; then a
single-edit trial's records are shared over the ranks (each rank edits its records), and for sequences
(which cannot be split) a round's trials are shared, whole, over the ranks. Every rank returns the whole
result; only rank 0 writes the checkpoint in the first case, each rank its own trials in the second.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relation_lens.distributed import Checkpoint, fingerprint, gather, ranks
from relation_lens.editing import (
    EditConfig,
    Preserve,
    ValueCache,
    batch_defaults,
    default_config_of,
    default_layer,
    get_method,
    request_of,
)
from relation_lens.editing.alphaedit import AlphaEditConfig
from relation_lens.errors import ConfigError, DataError, RelationLensError
from relation_lens.evaluation import evaluate, evaluate_batch, evaluate_sequence, untouched_pairs
from relation_lens.key_statistics import KeyStatistics, model_fingerprint
from relation_lens.locate import LocateResult, critical_range, locate
from relation_lens.model_interface import Model
from relation_lens.presets import EDIT_FIELDS
from relation_lens.results import Result
from relation_lens.results.evaluation import nan_for_null

__all__ = ["tune", "TuneResult", "SEARCHED", "GRIDS"]

METHODS = ("rome", "relation_rome", "memit", "relation_memit")

# the candidate values of each hyperparameter (the start value is always tried too)
GRIDS: dict[str, tuple[Any, ...]] = {
    "v_weight_decay": (0.01, 0.05, 0.1, 0.5, 1.0),
    "clamp_norm_factor": (0.75, 2.0, 4.0, 10.0, 20.0),
    "v_steps": (20, 40),
    "mom2_update_weight": (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 20000.0),
    "threshold": (2e-2, 1e-2, 1e-3, 1e-4),
    "l2": (10.0, 1.0, 0.1, 0.01, 0.001),
}

# the settings searched per kind of method, in the order the coordinate search visits them
SEARCHED: dict[str, tuple[str, ...]] = {
    "single": ("layer", "v_weight_decay", "clamp_norm_factor", "v_steps"),
    "batch": ("layers", "mom2_update_weight", "clamp_norm_factor"),
    "alphaedit": ("threshold", "l2"),
}
_MEMIT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _lists(x: Any) -> Any:
    """JSON's form of a value: tuples (and lists) as lists, dicts' values likewise."""
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True, repr=False, eq=False)
class TuneResult(Result):
    """What :func:`tune` chose (``params``) with every trial's numbers (``trials``, in the order run),
    the start (``start``: the defaults it began from, trial 0) and the candidates searched.

    ``config`` / ``preserve`` / :meth:`edit_kwargs` turn it into what
    :func:`~relation_lens.compute_edit`, :func:`~relation_lens.evaluate` and
    :func:`~relation_lens.evaluate_batch` take: ``compute_edit(model, request, method=t.method,
    **t.edit_kwargs())``."""

    method: str
    alphaedit: bool
    objective: str  # "score" or "sequence"
    sequence: int | None
    params: dict[str, Any]
    best: float
    start: dict[str, Any]
    trials: tuple[dict[str, Any], ...]
    candidates: dict[str, list[Any]]
    base_config: dict[str, Any]
    model_name: str
    located: LocateResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return super().from_dict({**d, "trials": nan_for_null(d["trials"]), "best": math.nan if d["best"] is None else d["best"]})

    @property
    def config(self) -> EditConfig:
        """The :class:`~relation_lens.EditConfig` with the tuned hyperparameters."""
        fields = {k: _tuples(v) for k, v in self.base_config.items()}
        fields.update({k: self.params[k] for k in EDIT_FIELDS if k in self.params})
        return EditConfig(**fields)

    @property
    def preserve(self) -> Preserve | None:
        """A fresh AlphaEdit :class:`~relation_lens.Preserve` with the tuned threshold and l2 (``None``
        without AlphaEdit)."""
        if not self.alphaedit:
            return None
        return Preserve(config=AlphaEditConfig(float(self.params["threshold"]), float(self.params["l2"])))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.params["layers"]) if "layers" in self.params else (int(self.params["layer"]),)

    def edit_kwargs(self) -> dict[str, Any]:
        """``config``, ``layer`` (or ``layers`` and ``mom2_update_weight``) and ``preserve``."""
        out: dict[str, Any] = {"config": self.config, "preserve": self.preserve}
        if "layers" in self.params:
            out.update(layers=self.layers, mom2_update_weight=float(self.params["mom2_update_weight"]))
        else:
            out["layer"] = int(self.params["layer"])
        return out

    def table(self) -> str:
        """Every trial as a markdown table (rates and Scores in percent; the chosen trial marked)."""
        names = list(self.candidates)
        metrics = ["objective", "Score", "ES", "PS", "NS", "RS"] + (["untouched"] if self.sequence else [])
        lines = ["| trial | " + " | ".join(names + metrics) + " | failed | s | |",
                 "|" + "---|" * (len(names) + len(metrics) + 4)]
        chosen = fingerprint(self.params)
        for t in self.trials:
            cells = [_fmt(t["params"][n]) for n in names] + [_fmt(t.get(m)) for m in metrics]
            mark = "chosen" if t["key"] == chosen else ("start" if t["trial"] == 0 else "")
            lines.append(f"| {t['trial']} | " + " | ".join(cells) + f" | {t.get('n_failed', 0)} | "
                         f"{t.get('seconds', float('nan')):.0f} | {mark} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        start = self.trials[0]["objective"] if self.trials else float("nan")
        return (f"TuneResult({self.method}{' + AlphaEdit' if self.alphaedit else ''}: {shown}; {self.objective} "
                f"{_fmt(self.best)} (start {_fmt(start)}), {len(self.trials)} trials, model={self.model_name!r})")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v) if v else "()"
    return str(v)


def _key(params: dict[str, Any]) -> str:
    return fingerprint(params)


def _plain(v: Any) -> Any:
    """JSON-stable form of a parameter value (tuples as lists, numbers as they are)."""
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else v


def _check_value(name: str, value: Any, where: str) -> None:
    """Refuse a searched setting's value that its config would refuse (NaN, infinities, out of range, a
    wrong type), by name, before any trial runs."""
    from_ = f"tune's {where}[{name!r}]"
    if name in EDIT_FIELDS:
        try:
            EditConfig(**{name: value})
        except RelationLensError as exc:
            raise ConfigError(f"{from_}: {exc}") from None
    elif name in ("threshold", "l2"):
        try:
            AlphaEditConfig(**{name: value})
        except RelationLensError as exc:
            raise ConfigError(f"{from_}: {exc}") from None
    elif name == "mom2_update_weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"{from_}: MEMIT's lambda must be a finite number > 0, got {value!r}")


def _layer_candidates(method: str, start: Any, located: LocateResult | None, n_layers: int) -> list[Any]:
    """The layers (or layer ranges) to try: the start and what :func:`locate` reads off the traces."""
    if method in ("rome", "relation_rome"):
        out = [int(start)]
        if located is not None:
            allowed = set(located.allowed)
            out += [l for l in (located.peak, located.peak - 1, located.peak + 1) if l in allowed]
        return sorted(set(out))
    out_r: list[list[int]] = [list(start)]
    if located is not None:
        span = range(min(located.allowed), max(located.allowed) + 1)
        for f in _MEMIT_FRACTIONS:
            out_r.append(list(critical_range(located.effect, span, f)))
    seen: list[list[int]] = []
    for r in out_r:
        if r not in seen and all(0 <= l < n_layers for l in r):
            seen.append(r)
    return seen


def tune(model: Model, records, *, method: str = "relation_rome", alphaedit: bool | None = None,
         preserve: Preserve | None = None, budget: int = 24, sequence: int | None = None, untouched=None,
         start: TuneResult | dict[str, Any] | None = None, space: dict[str, Sequence[Any]] | None = None,
         located: LocateResult | None = None, locate_settings: dict[str, Any] | None = None,
         evaluation_records=None, batch_size: int = 10, config: EditConfig | None = None, stats: dict | None = None,
         max_passes: int = 2, checkpoint: str | Path | None = None, progress: bool = False) -> TuneResult:
    """Choose ``method``'s layers and hyperparameters for ``model`` on the tuning ``records`` (module docs).

    Args:
        records: CounterFact-style records of the tuning split (the flat schema of
            :func:`relation_lens.data.loaders.load_counterfact`; e.g. the shipped records 400-429,
            :data:`relation_lens.data.counterfact.TUNING_SPLIT`).
        method: ``"rome"``, ``"relation_rome"``, ``"memit"`` or ``"relation_memit"``.
        alphaedit: tune with AlphaEdit's projection (and its threshold and l2); default: when ``preserve``
            is given.
        preserve: an AlphaEdit :class:`~relation_lens.Preserve` whose threshold and l2 are the start of
            their search (default: ``Preserve.default_for(model, method)``); it implies ``alphaedit``.
            Only its settings are read: each trial projects with a fresh one.
        budget: the most trials run (the start included).
        sequence: score sequences of this many edits (the first ``sequence`` records) instead of single
            edits; the untouched facts are then ``untouched`` or, by default, the records after them
            (their prompts with the true object).
        start: settings to start from instead of the defaults (a dict by setting name, or an earlier
            :class:`TuneResult`, whose ``params`` are taken, e.g. a search on shorter sequences continued
            on longer ones); the names left out keep their defaults.
        space: candidate values by setting name, replacing the defaults (``GRIDS``, the layers from
            :func:`locate`); ``()`` leaves a setting at its start value.
        located: a :func:`locate` result to take the layers from (default: :func:`locate` run on the
            records' prompts with their true objects, ``locate_settings`` passed on).
        evaluation_records: the records results will be reported on: any of them among ``records``
            is refused (:class:`~relation_lens.errors.DataError`), so the split stays disjoint.
        config: the :class:`~relation_lens.EditConfig` of everything not searched (and the start of what
            is): default, the method's for the model (``EditConfig.default_for``, MEMIT's settings).
        stats: key statistics by layer (the missing ones are computed or read from the disk cache).
        max_passes: coordinate-search passes over the settings.
        checkpoint: a folder where each trial is written as it ends; started again with the same
            arguments (``budget`` may grow), the run reuses them (a folder of another run is refused).

    Returns:
        :class:`TuneResult`.

    Raises:
        ConfigError: an unknown method or setting name (in ``space`` or ``start``), an empty candidate
            list for a layer, a bad budget, ``preserve`` with ``alphaedit=False``, a ``start`` of another
            method; DataError: no records, records shared with ``evaluation_records``, a ``sequence``
            longer than the records, no untouched facts for a sequence.
    """
    if method not in METHODS:
        raise ConfigError(f"tune has search spaces for {list(METHODS)}, not {method!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget must be a positive whole number of trials, not {budget!r}")
    if config is not None and not isinstance(config, EditConfig):
        raise ConfigError(f"config= takes an EditConfig, got {type(config).__name__}")
    if preserve is not None and not isinstance(preserve, Preserve):
        raise ConfigError(f"preserve= takes an AlphaEdit Preserve, got {type(preserve).__name__}")
    if preserve is not None and alphaedit is False:
        raise ConfigError("preserve= is AlphaEdit's start, but alphaedit=False: drop one of them")
    alphaedit = preserve is not None if alphaedit is None else bool(alphaedit)
    if isinstance(start, TuneResult):
        if (start.method, start.alphaedit) != (method, alphaedit):
            raise ConfigError(f"start= is a {start.method}{' + AlphaEdit' if start.alphaedit else ''} result; this "
                              f"search is {method}{' + AlphaEdit' if alphaedit else ''}")
        given = dict(start.params)
    elif start is None or isinstance(start, dict):
        given = dict(start or {})
    else:
        raise ConfigError(f"start= takes a dict of settings or a TuneResult, got {type(start).__name__}")
    if not isinstance(max_passes, int) or max_passes < 1:
        raise ConfigError(f"max_passes must be a positive whole number, not {max_passes!r}")
    records = [dict(r) for r in records]
    if not records:
        raise DataError("tune got no records")
    if evaluation_records is not None:
        held = {(r["prompt"], r["subject"], r["target_new"]) for r in evaluation_records}
        shared = [r for r in records if (r["prompt"], r["subject"], r["target_new"]) in held]
        if shared:
            raise DataError(f"{len(shared)} of the tuning records are also evaluation records (e.g. "
                            f"{shared[0]['subject']!r}: {shared[0]['prompt']!r}); tune on a disjoint split")
    batch = method.endswith("memit")
    m = get_method(method)
    # the start: the method's current defaults for this model
    if batch:
        start_layers, base, lam = batch_defaults(model, method, None, config, None, alphaedit)
        first: dict[str, Any] = {"layers": list(start_layers), "mom2_update_weight": lam}
    else:
        base = config or default_config_of(m, model, alphaedit)
        first = {"layer": default_layer(model, "rome" if m.key == "subject" else "relation_rome",
                                        request_of(records[0]), alphaedit)}
    first.update({k: getattr(base, k) for k in EDIT_FIELDS})
    if alphaedit:
        d = preserve or Preserve.default_for(model, method)
        first.update(threshold=d.threshold, l2=d.l2)
    # AlphaEdit's own settings first: they decide whether its edits stay stable (its published l2 makes
    # ROME diverge on the default model), and a small budget should reach them
    names = (SEARCHED["alphaedit"] if alphaedit else ()) + SEARCHED["batch" if batch else "single"]
    space = dict(space or {})
    for what, named in (("space", space), ("start", given)):
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ConfigError(f"{what} names {unknown}, which {method}{' + AlphaEdit' if alphaedit else ''} does "
                              f"not search (it searches {list(names)})")
    begin = {**first, **given}
    layer_name = "layers" if batch else "layer"
    if located is None and layer_name not in space:
        facts = [{"prompt": r["prompt"].format(r["subject"]), "subject": r["subject"], "target": r["target_true"]}
                 for r in records]
        located = locate(model, facts, method=method, keep_trace=False, **(locate_settings or {}))
    candidates: dict[str, list[Any]] = {}
    for n in names:
        if n in space:
            vals = [_plain(v) for v in space[n]]
        elif n == layer_name:
            vals = _layer_candidates(method, begin[n], located, model.cfg.n_layers)
        else:
            vals = list(GRIDS[n])
        if not vals:
            if n == layer_name and n in space:
                raise ConfigError(f"space[{n!r}] is empty: give the layer(s) to try")
            vals = [begin[n]]
        begin[n] = _plain(begin[n])
        if begin[n] not in vals:
            vals = [begin[n]] + vals
        for v in vals:
            if n != layer_name:
                _check_value(n, v, "space" if n in space else "start")
        if n == layer_name:
            for v in vals:
                for l in (v if batch else [v]):
                    if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < model.cfg.n_layers:
                        raise ConfigError(f"{n} candidate {v!r} is not a layer of a {model.cfg.n_layers}-layer model")
        candidates[n] = vals
    if sequence is not None:
        if not isinstance(sequence, int) or not 1 <= sequence <= len(records):
            raise DataError(f"sequence={sequence!r} must be a number of edits in 1..{len(records)} (the records)")
        pairs = untouched_pairs(untouched) if untouched is not None else [
            (r["prompt"].format(r["subject"]), r["target_true"]) for r in records[sequence:]]
        if not pairs:
            raise DataError("a sequence needs untouched facts: give untouched=, or more records than sequence= "
                            "(the records after the sequence are the default)")
    # every candidate layer's statistics, computed by all ranks together before any trial
    layers_needed = sorted({l for v in candidates[layer_name] for l in (v if batch else [v])})
    stats = dict(stats or {})
    for l in layers_needed:
        if l not in stats:
            stats[l] = KeyStatistics.compute(model, l, n_texts=base.stats_n_texts, progress=progress,
                                             prepend_bos=base.prepend_bos)
    r = ranks()
    description = {"method": method, "alphaedit": alphaedit, "sequence": sequence, "batch_size": batch_size,
                   "model": model_fingerprint(model), "records": fingerprint(records), "start": begin,
                   "candidates": candidates, "base_config": dataclasses.asdict(base),
                   "untouched": fingerprint(untouched_pairs(untouched)) if untouched is not None else None}
    ckpt = Checkpoint(checkpoint, description, r) if checkpoint is not None else None
    cache: dict[str, dict[str, Any]] = {}
    if ckpt is not None:
        for row in ckpt.done().values():
            cache.setdefault(row["key"], row)

    # a batch method's z depends on the request, the last edited layer and the value settings, not on
    # lambda, AlphaEdit's settings or the lower layers: trials that change only those reuse the z's
    values = ValueCache() if batch and sequence is None else None

    def trial(params: dict[str, Any], index: int) -> dict[str, Any]:
        cfg = dataclasses.replace(base, **{k: params[k] for k in EDIT_FIELDS})
        preserve = Preserve(config=AlphaEditConfig(float(params["threshold"]), float(params["l2"]))) \
            if alphaedit else None
        t0 = time.perf_counter()
        if batch:
            opts: dict[str, Any] = {"layers": tuple(params["layers"]),
                                    "mom2_update_weight": float(params["mom2_update_weight"])}
        else:
            opts = {"layer": int(params["layer"])}
        row: dict[str, Any] = {"index": index, "trial": index, "key": _key(params), "params": params}
        if sequence is None:
            if batch:
                hits = values.hits if values is not None else 0
                res = evaluate_batch(model, records, method=method, batch_size=batch_size, stats=stats, config=cfg,
                                     preserve=preserve, values=values, **opts)
                row["values_reused"] = (values.hits if values is not None else 0) - hits
            else:
                res = evaluate(model, records, method=method, stats=stats[opts["layer"]], config=cfg,
                               preserve=preserve, fluency=False, **opts)
            row.update({k: res.summary[k][0] for k in ("ES", "PS", "NS", "RS", "Score")}, n_failed=res.n_failed)
            row["objective"] = row["Score"]
        else:
            seq = evaluate_sequence(model, records[:sequence], method=method, config=cfg, preserve=preserve,
                                    stats=stats if batch else stats[opts["layer"]], untouched=pairs, **opts)
            f = seq.final
            row.update({k: 100 * f[k] for k in ("ES", "PS", "NS", "RS", "Score", "untouched")},
                       n_failed=f["edits"] - f["applied"], restored=seq.restored)
            s, u = row["Score"], row["untouched"]
            row["objective"] = float("nan") if math.isnan(s) or math.isnan(u) else (
                0.0 if min(s, u) <= 0 else 2 / (1 / s + 1 / u))
        row["seconds"] = time.perf_counter() - t0
        return row

    by_key: dict[str, dict[str, Any]] = {}  # every trial of this search, by its parameters' key

    def run_round(cands: list[dict[str, Any]]) -> None:
        todo: list[tuple[int, dict[str, Any]]] = []
        for p in cands:
            k = _key(p)
            if k in by_key or any(_key(q) == k for _, q in todo) or len(by_key) + len(todo) >= budget:
                continue
            index = len(by_key) + len(todo)
            if k in cache:  # written by an earlier run with the same arguments: the same trial, reused
                by_key[k] = {**cache[k], "index": index, "trial": index}
            else:
                todo.append((index, p))
        if sequence is None:  # each trial's records are shared over the ranks
            rows = []
            for i, p in todo:
                rows.append(trial(p, i))
                if ckpt is not None and r.is_main:  # written as it ends: a kill loses only the trial running
                    ckpt.append(rows[-1])
        else:  # whole sequences shared over the ranks
            mine = []
            for j in r.share(len(todo)):
                row = trial(todo[j][1], todo[j][0])
                if ckpt is not None:
                    ckpt.append(row)
                mine.append(row)
            rows = [row for part in gather(mine, r) for row in part]
        for row in rows:
            by_key[row["key"]] = row

    def score(p: dict[str, Any]) -> float:
        v = by_key[_key(p)]["objective"] if _key(p) in by_key else float("nan")
        return -math.inf if v is None or math.isnan(v) else float(v)

    best = dict(begin)
    run_round([best])
    for _ in range(max_passes):
        changed = False
        for n in names:
            cands = [{**best, n: v} for v in candidates[n]]
            run_round(cands)
            top = max(cands, key=lambda p: (score(p), p == best))  # a tie keeps the current best
            if score(top) > score(best):
                best, changed = top, True
        if not changed or len(by_key) >= budget:
            break
    trials = sorted(by_key.values(), key=lambda t: t["trial"])
    return TuneResult(method=method, alphaedit=alphaedit, objective="score" if sequence is None else "sequence",
                      sequence=sequence, params=best, best=score(best), start=begin,
                      trials=tuple({k: v for k, v in t.items() if k != "index"} for t in trials),
                      candidates=candidates, base_config=_lists(dataclasses.asdict(base)), model_name=model.cfg.model_name,
                      located=located,
                      settings={"budget": budget, "max_passes": max_passes, "n_records": len(records),
                                "batch_size": batch_size if batch else None, "world_size": r.world_size})
