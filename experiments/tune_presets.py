"""rl.tune on the default model against its hand-made presets.

For each variant (ROME, relation-ROME, MEMIT, relation-MEMIT; each with and without AlphaEdit),
``rl.tune`` searches from the presets on the tuning split (the shipped records 400-429,
``TUNING_SPLIT``), and then both settings, the presets and tune's, are evaluated on the same
evaluation records (the first ``--n-eval`` outside the split): single edits with ``rl.evaluate``
(ROME, relation-ROME) or batches of 10 with ``rl.evaluate_batch`` (MEMIT, relation-MEMIT). Each
variant's numbers go to ``results/tune/<variant>.json`` (the tune result, trials included, and both
evaluations); every run rebuilds ``results/tune_presets.md`` from what is there.

"presets" are the hand-made ones (``relation_lens.presets.hand_made()``: the run starts from them and
compares with them). Where tune's settings score at least as well on the evaluation records, the library
ships them: ``relation_lens.presets.DEFAULT_MODEL_TUNED`` holds that variant's ``params`` (the report's
"shipped" column; tests/test_presets.py checks the two agree).

    python experiments/tune_presets.py --variants relation_rome rome [--budget 16] [--n-eval 100]
    python experiments/tune_presets.py --variants rome --tuning-extra 100   # tune on 130 records
    python experiments/tune_presets.py --report
    python experiments/tune_presets.py --limit 2        # quick run of one variant (the test)

``--tuning-extra N`` tunes on the split and N more records built like the shipped ones from a world
without any shipped record's subjects or neighbours (``sequential_edits.longer_tuning_records``), so
they are as disjoint from the evaluation records as the split is: a larger tuning set for a variant
whose choice on 30 records is noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sequential_edits import longer_tuning_records  # noqa: E402  (experiments/ is the script's folder)

import relation_lens as rl  # noqa: E402
from relation_lens import presets  # noqa: E402
from relation_lens.data import load_world  # noqa: E402
from relation_lens.data.counterfact import TUNING_SPLIT, evaluation_records, load_counterfactual  # noqa: E402
from relation_lens.editing import Preserve, batch_defaults  # noqa: E402
from relation_lens.evaluation import summarise  # noqa: E402
from relation_lens.results import json_safe  # noqa: E402
from relation_lens.results.evaluation import nan_for_null  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
BATCH = 10  # MEMIT's and relation-MEMIT's batch size
VARIANTS = ["relation_rome", "rome", "relation_memit", "memit", "relation_rome+alphaedit", "rome+alphaedit",
            "relation_memit+alphaedit", "memit+alphaedit"]


def batched(method: str) -> bool:
    """MEMIT and relation-MEMIT are evaluated in batches of ``BATCH``; the ROMEs one edit at a time."""
    return method.endswith("memit")


def evaluate_with(model, records, method, kwargs, batch_size):
    if batched(method):
        return rl.evaluate_batch(model, records, method=method, batch_size=batch_size, **kwargs)
    return rl.evaluate(model, records, method=method, fluency=False, **kwargs)


def preset_config(model, method, n_texts):
    """The presets' EditConfig, with key statistics from ``n_texts`` texts."""
    if method.endswith("memit"):
        config = batch_defaults(model, method, None, None, None)[1]
    else:
        config = rl.editing.get_method(method).default_config(model)
    return dataclasses.replace(config, stats_n_texts=n_texts)


def preset_kwargs(model, method, alphaedit, first_record, config):
    """What the presets give compute_edit (the start of tune's search)."""
    preserve = Preserve.default_for(model, method) if alphaedit else None
    if method.endswith("memit"):
        layers, _, lam = batch_defaults(model, method, None, config, None)
        return {"layers": layers, "config": config, "mom2_update_weight": lam, "preserve": preserve}
    m = rl.editing.get_method(method)
    layer = rl.editing.default_layer(model, "rome" if m.key == "subject" else "relation_rome",
                                     rl.editing.request_of(first_record))
    return {"layer": layer, "config": config, "preserve": preserve}


def run(model, variant, tuning, evaluation, budget, folder: Path, checkpoint: Path | None, n_texts: int) -> dict:
    with presets.hand_made():  # tune starts from the hand-made presets, and they are what it is compared with
        return run_hand_made(model, variant, tuning, evaluation, budget, folder, checkpoint, n_texts)


def shipped(variant: str, params: dict) -> bool:
    """Whether the library ships tune's settings for ``variant`` (presets.DEFAULT_MODEL_TUNED)."""
    chosen = presets.DEFAULT_MODEL_TUNED.get(variant)
    return chosen is not None and json.loads(json.dumps(chosen)) == params


def run_hand_made(model, variant, tuning, evaluation, budget, folder, checkpoint, n_texts) -> dict:
    method, _, alpha = variant.partition("+")
    config = preset_config(model, method, n_texts)
    t0 = time.time()
    tuned = rl.tune(model, tuning, method=method, alphaedit=bool(alpha), budget=budget, config=config,
                    evaluation_records=evaluation, checkpoint=checkpoint, progress=False)
    tune_s = time.time() - t0
    print(tuned, f"({tune_s:.0f} s)", flush=True)
    rows = {}
    for name, kwargs in (("presets", preset_kwargs(model, method, bool(alpha), tuning[0], config)),
                         ("tuned", tuned.edit_kwargs())):
        res = evaluate_with(model, evaluation, method, kwargs, BATCH)
        rows[name] = ({k: res.summary[k][0] for k in ("Score", "ES", "PS", "NS", "RS")} | {"n_failed": res.n_failed}
                      | {"records": json_safe(list(res.records))})  # every record's numbers: the paired bootstrap
        print(variant, name, rows[name], flush=True)
    out = {"variant": variant, "tune": json.loads(tuned.to_json()), "evaluation": rows, "tune_seconds": tune_s,
           "n_tuning": len(tuning), "n_evaluation": len(evaluation), "budget": budget,
           "stats_n_texts": n_texts}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{variant}.json").write_text(json.dumps(out, indent=1, allow_nan=True))
    return out


def difference(run: dict) -> str:
    """tuned - presets Score with its paired bootstrap 95% interval (records drawn in the evaluation's
    batches), or n/a for a run written before the per-record numbers were kept."""
    ev = run["evaluation"]
    if not all("records" in ev[k] for k in ("presets", "tuned")):
        return "n/a"
    rows = {k: nan_for_null(ev[k]["records"]) for k in ("tuned", "presets")}
    a, b = (rl.EvaluationResult(method=run["variant"], layer=None, records=rows[k], summary=summarise(rows[k]),
                                n_failed=ev[k]["n_failed"]) for k in ("tuned", "presets"))
    d = rl.score_difference(a, b, block=BATCH if batched(run["variant"].partition("+")[0]) else 1)
    return f"{d.difference:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def report(folder: Path, out: Path) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
            if not p.stem.startswith("sequence_")}  # sequential_edits.py --tuned writes its searches here too
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"  # noqa: E731
    lines = ["# rl.tune on the default model against its hand-made presets", "",
             "Tuned on the shipped records 400-429 (the tuning split; with more records where \"tuning records\" "
             "says so: the split and records from `longer_tuning_records`, disjoint from the evaluation's subjects "
             "and neighbours), evaluated on the first evaluation records "
             "outside it; single edits (ROME, relation-ROME) or batches of 10 (MEMIT, relation-MEMIT), each edit "
             "undone before the next. Score: harmonic mean of ES, PS, NS, RS (%). Written by "
             "`experiments/tune_presets.py`. \"presets\": the hand-made presets (tune's start); \"shipped\": the "
             "settings the library uses by default now (`relation_lens.presets.DEFAULT_MODEL_TUNED` holds tune's "
             "where they score at least as well here). \"tuned − presets\": the Score difference on the evaluation "
             "records with a paired bootstrap 95% interval (`rl.score_difference`, 2,000 resamples of the records, "
             "MEMIT's in its batches of 10).", "",
             "| variant | settings | Score | ES | PS | NS | RS | failed | tuned − presets [95%] | chosen by tune | "
             "tuning Score (start → chosen) | trials | trial time | tuning records | shipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in [v for v in VARIANTS if v in runs] + sorted(set(runs) - set(VARIANTS)):
        r = runs[v]
        t = r["tune"]
        chosen = ", ".join(f"{k}={x}" for k, x in t["params"].items())
        ships = "tuned" if shipped(v, t["params"]) else "presets"
        for name in ("presets", "tuned"):
            e = r["evaluation"][name]
            extra = (f"{difference(r)} | {chosen} | {fmt(t['trials'][0]['objective'])} → {fmt(t['best'])} | {len(t['trials'])} | "
                     f"{sum(x['seconds'] for x in t['trials']) / 60:.0f} min | {r['n_tuning']}") if name == "tuned" else "| | | | |"
            extra += " | ✓" if ships == name else " |"
            lines.append(f"| {v} | {name} | {fmt(e['Score'])} | {fmt(e['ES'])} | {fmt(e['PS'])} | {fmt(e['NS'])} | "
                         f"{fmt(e['RS'])} | {e['n_failed']} | {extra} |")
    n = {r["n_evaluation"] for r in runs.values()}
    lines += ["", f"Evaluation records: {sorted(n)}; tuning records: {sorted({r['n_tuning'] for r in runs.values()})}."]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=VARIANTS[:4], choices=VARIANTS)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many tuning and evaluation records, "
                                                            "budget 2, relation-ROME only, written as *_quick")
    ap.add_argument("--stats-texts", type=int, default=None,
                    help="texts for key statistics (default 10,000, the presets'; 2,000 with --limit)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="folder for tune's checkpoints (one per variant)")
    ap.add_argument("--tuning-extra", type=int, default=0,
                    help="tune on the split and this many more records disjoint from the evaluation ones")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 for a run beside another)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.out / ("tune_quick" if args.limit else "tune")
    if not args.report:
        model = rl.load_model()
        records = list(load_counterfactual())
        tuning = [records[i] for i in TUNING_SPLIT]
        evaluation = evaluation_records(records, n=args.n_eval)
        variants, budget = args.variants, args.budget
        if args.limit:
            tuning, evaluation, variants, budget = tuning[:args.limit], evaluation[:args.limit], ["relation_rome"], 2
        if args.tuning_extra:  # after the split's records, the order of the committed 130-record run
            tuning += longer_tuning_records(model, load_world(), records, args.tuning_extra, untouched=())
        n_texts = args.stats_texts or (2000 if args.limit else 10_000)
        for v in variants:
            run(model, v, tuning, evaluation, budget, folder,
                None if args.checkpoint is None else args.checkpoint / v, n_texts)
    print(report(folder, args.out / ("tune_presets_quick.md" if args.limit else "tune_presets.md")))


if __name__ == "__main__":
    main()
