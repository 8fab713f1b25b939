"""Batch editing: ES / PS / NS / RS of MEMIT and relation-MEMIT, each with and without AlphaEdit's
projection, for batch sizes 1, 10, 100 and 1,000.

The same 1,000 records (the shipped counterfactual relation dataset outside its tuning split) are
edited ``batch size`` at a time with :func:`relation_lens.evaluate_batch`: each batch is written at
once on the unedited model, every record of the batch is measured with the whole batch written
(CounterFact's definitions, :func:`relation_lens.evaluation.record_metrics`), and the batch is undone
before the next one. Each record's ``z`` is optimised once and shared by the four batch sizes (a
:class:`relation_lens.ValueCache`, as MEMIT's own ``cache_template``), so the sizes differ only in how
many facts one solve writes together. AlphaEdit: the null-space projection of the key statistics,
fresh for every batch (nothing remembered between batches, which are independent).

    python experiments/batch_edits.py [--n 1000] [--sizes 1,10,100,1000] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import relation_lens as rl
from relation_lens.batch_editing import Preserve, batch_defaults, memit_config
from relation_lens.data.counterfact import evaluation_records

OUT = Path(__file__).resolve().parent / "results"
VARIANTS = {"MEMIT": "memit", "relation-MEMIT": "relation_memit"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many records, sizes 1 and all of them")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    n = args.limit or args.n
    sizes = sorted({1, n}) if args.limit else [int(b) for b in args.sizes.split(",")]
    if any(b < 1 or b > n for b in sizes):
        ap.error(f"batch sizes {sizes} must be between 1 and --n {n}")
    model = rl.load_model(args.model)
    records = evaluation_records(n=n)
    base = rl.evaluate(model, records, method="none", fluency=False)
    rows = [{"variant": "unedited", "batch_size": 0, "batches": 0, "failed": 0,
             **{m: base.summary[m] for m in ("ES", "PS", "NS", "RS")}, "seconds": 0.0}]
    for name in args.methods.split(","):
        method = VARIANTS[name]
        # ROME's template rule, as section 5 of docs/experiments.md was made
        layers, config, lam = batch_defaults(model, method, None, memit_config(prefix_seeds=None), None)
        stats = {l: rl.KeyStatistics.compute(model, l, n_texts=2000 if args.limit else 10_000) for l in layers}
        values = rl.ValueCache()
        t0 = time.perf_counter()
        for alpha in (False, True):
            for size in sizes:
                t = time.perf_counter()
                result = rl.evaluate_batch(model, records, method=method, batch_size=size, layers=layers,
                                           config=config, stats=stats, mom2_update_weight=lam, values=values,
                                           preserve=Preserve.default_for(model) if alpha else None)
                rows.append({"variant": name + (" + AlphaEdit" if alpha else ""), "batch_size": size,
                             "batches": -(-n // size), "failed": result.n_failed,
                             **{m: result.summary[m] for m in ("ES", "PS", "NS", "RS")},
                             "seconds": time.perf_counter() - t})
                print(rows[-1], flush=True)
        rows.append({"variant": name, "z_seconds": time.perf_counter() - t0, "values": len(values)})
    suffix = "_quick" if args.limit else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batch_edits{suffix}.json").write_text(json.dumps({"model": model.cfg.model_name, "n": n,
                                                                    "rows": rows}, indent=1))
    lines = [f"# Batch editing: {n} records, batch sizes {', '.join(map(str, sizes))} ({model.cfg.model_name})", "",
             "Each batch written at once on the unedited model, its records measured with it written, then undone. "
             "Rates (%) with 95% CI half-widths, CounterFact's definitions: ES the prompt prefers the new object, "
             "PS its paraphrases do, NS neighbourhood prompts keep the true object, RS the subject's other "
             "relations keep their answers. s: the batch size's time; each record's z is optimised once per method, "
             "during its first size (whose s includes it), and read from the cache by the others.", "",
             "| variant | batch size | batches | failed | ES | PS | NS | RS | s |", "|---|---|---|---|---|---|---|---|---|"]
    def fmt(ci):
        return f"{ci[0]:.1f} ± {ci[1]:.1f}"
    for r in rows:
        if "batch_size" in r:
            lines.append(f"| {r['variant']} | {r['batch_size'] or '–'} | {r['batches'] or '–'} | {r['failed']} | {fmt(r['ES'])} | "
                         f"{fmt(r['PS'])} | {fmt(r['NS'])} | {fmt(r['RS'])} | {r['seconds']:.0f} |")
    lines += [""] + [f"{r['variant']}: {r['values']} values optimised; {r['z_seconds']:.0f} s in all"
                     for r in rows if "z_seconds" in r]
    (args.out / f"batch_edits{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
