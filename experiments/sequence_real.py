"""Sequential editing at AlphaEdit's scale on a real model: CounterFact edits written in batches of 100,
never undone in between, for MEMIT, MEMIT + AlphaEdit and relation-MEMIT + AlphaEdit.

AlphaEdit's protocol (Fang et al. 2025): the first ``--n`` (2,000) records of CounterFact (here ROME's
``counterfact-train.json``, the records in file order, whether or not the model knows them), edited
``--batch`` (100) at a time; each batch's update is computed on the weights the earlier batches wrote,
and with AlphaEdit the keys of every applied batch are preserved by the later ones. At ``--marks``
(100, 500, 1,000 and 2,000 edits) over the records edited so far: efficacy (ES), generalisation (PS),
specificity (NS), their Score, fluency (ROME's n-gram entropy of the first ``--fluency`` records'
generations), the accuracy on facts the model knew that no edit touched (known_1000 facts it gets right
at top-1 whose subjects no record edits), and ||ΔW|| / ||W||.

Each variant is one ``rl.evaluate_sequence(..., batch_size=100, checkpoint=...)``: the state after every
batch is written (the edited layers, AlphaEdit's preserved keys, the rows so far), so a killed run goes
on after its last batch; under ``torchrun`` each batch's z's are optimised over the ranks. Settings: the
library's defaults for the model (its preset where it has one; each row says where they came from).

Writes ``results/<model>/sequence/<variant>.json`` and ``results/<model>/sequence_real.md`` (with
AlphaEdit's GPT2-XL numbers beside ours, the machine, date and time per batch); ``--report`` rebuilds
the table from what is there.

    python experiments/sequence_real.py --model smollm2-135m --variants memit        # one variant
    torchrun --nproc-per-node 2 experiments/sequence_real.py --model smollm2-135m  # z's over 2 ranks
    python experiments/sequence_real.py --model default --limit 2                    # a quick run (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smollm2_preset import machine, write  # noqa: E402  (the experiments' run-file helpers)

import relation_lens as rl  # noqa: E402
from relation_lens import presets  # noqa: E402
from relation_lens.data.loaders import load_counterfact, load_known  # noqa: E402
from relation_lens.distributed import ranks  # noqa: E402
from relation_lens.editing import batch_defaults  # noqa: E402
from relation_lens.results import SequenceResult  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
VARIANTS = {"memit": ("memit", False), "memit+alphaedit": ("memit", True),
            "relation_memit+alphaedit": ("relation_memit", True)}
# AlphaEdit (Fang et al. 2025) on GPT2-XL after 2,000 CounterFact edits in batches of 100 (as the issue quotes it)
ALPHAEDIT_GPT2_XL = {"memit+alphaedit": {"ES": 99.5, "PS": 94.0, "NS": 66.4}}


def untouched_facts(model, shared: Path, records: list[dict], n: int) -> list[dict]:
    """known_1000 facts the model gets right whose subjects no record edits, the first ``n``."""
    edited = {r["subject"] for r in records}
    facts = [dict(f) for f in load_known(shared / "rome" / "known_1000.json") if f["subject"] not in edited]
    return [{"prompt": k["prompt"], "answer": k["target"]} for k in rl.known_facts(model, facts)][:n]


def report(out: Path, model_name: str) -> str:
    folder = out / "sequence"
    meta = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    lines = [f"# Sequential editing on {model_name}: CounterFact in batches (experiments/sequence_real.py)", ""]
    if meta:
        lines += [f"Machine: {meta['machine']}; date {meta['date']}; torch threads {meta['threads']}; "
                  f"ranks {meta['world_size']}.", ""]
    lines += ["Rates in % over the records edited so far; untouched: top-1 accuracy on known facts no edit "
              "touched; fluency in bits (ROME's n-gram entropy).", "",
              "| variant | edits | applied | ES | PS | NS | Score | untouched | fluency | ‖ΔW‖/‖W‖ | layers | lambda |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        f = folder / f"{name}.json"
        if not f.is_file():
            continue
        res = SequenceResult.from_json(f)
        for row in res.rows:
            pct = {k: 100 * row[k] if row.get(k) == row.get(k) and row.get(k) is not None else float("nan")
                   for k in ("ES", "PS", "NS", "Score", "untouched")}
            lines.append(f"| {name} | {row['edits']} | {row['applied']} | {pct['ES']:.1f} | {pct['PS']:.1f} | "
                         f"{pct['NS']:.1f} | {pct['Score']:.1f} | {pct['untouched']:.1f} | "
                         f"{row.get('fluency', float('nan')):.2f} | {row['w_change']:.3f} | {list(res.layers)} | "
                         f"{res.settings.get('mom2_update_weight')} |")
    lines += ["", "AlphaEdit's GPT2-XL numbers after 2,000 edits in batches of 100 (efficacy, generalisation, "
              "specificity):", "",
              "| variant | ES | PS | NS |", "|---|---|---|---|"]
    for name, v in ALPHAEDIT_GPT2_XL.items():
        lines.append(f"| {name} (GPT2-XL) | {v['ES']} | {v['PS']} | {v['NS']} |")
    partial = sorted(folder.glob("*_checkpoint/state.pt")) if folder.is_dir() else []
    for state in partial:
        name = state.parent.name.removesuffix("_checkpoint")
        if not (folder / f"{name}.json").is_file():
            st = torch.load(state, map_location="cpu", weights_only=False)
            lines += ["", f"{name}: in progress, {st['edits']} edits written (resumes from its checkpoint)."]
    text = "\n".join(lines) + "\n"
    (out / "sequence_real.md").write_text(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--marks", default="100,500,1000,2000")
    ap.add_argument("--untouched", type=int, default=300)
    ap.add_argument("--fluency", type=int, default=20, help="records whose generations are measured at each mark")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--stats-texts", type=int, default=None, help="texts for key statistics (default: the library's)")
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many edits a batch, two batches")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=None, help="default results/<model>/ (results/<model>_quick/ with --limit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = rl.load_model(args.model)
    name = model.cfg.model_name
    out = args.out or HERE / "results" / (name + ("_quick" if args.limit else ""))
    if args.report:
        print(report(out, name))
        return
    if args.limit:
        args.batch, args.n, args.marks = args.limit, 2 * args.limit, f"{args.limit},{2 * args.limit}"
        args.untouched, args.fluency = 20, 1
    marks = [int(m) for m in args.marks.split(",") if int(m) <= args.n]
    records = [dict(r) for r in load_counterfact(args.shared / "rome" / "counterfact-train.json", limit=args.n)]
    untouched = untouched_facts(model, args.shared, records, args.untouched)
    r = ranks()
    folder = out / "sequence"
    if r.is_main:
        write(folder / "run.json", {
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "world_size": r.world_size,
            "args": {k: str(v) for k, v in vars(args).items()}, "n_untouched": len(untouched)})
    for variant in args.variants:
        path = folder / f"{variant}.json"
        if path.is_file():
            continue
        method, alpha = VARIANTS[variant]
        layers, config, lam = batch_defaults(model, method, None, None, None, alpha)
        stats = ({l: rl.KeyStatistics.compute(model, l, n_texts=args.stats_texts, progress=False) for l in layers}
                 if args.stats_texts else None)
        started = time.perf_counter()
        seq = rl.evaluate_sequence(model, records, method=method, layers=layers, config=config, stats=stats,
                                   mom2_update_weight=lam, preserve=rl.Preserve.default_for(model, method) if alpha else None,
                                   untouched=[(u["prompt"], u["answer"]) for u in untouched], checkpoints=marks,
                                   batch_size=args.batch, fluency=args.fluency,
                                   checkpoint=folder / f"{variant}_checkpoint", progress=r.is_main)
        seq = SequenceResult(method=seq.method, layers=seq.layers, rows=seq.rows, restored=seq.restored,
                             n_untouched=seq.n_untouched,
                             settings={**seq.settings, "source": presets.for_model(model).source_of(method, alpha),
                                       "seconds_this_run": time.perf_counter() - started})
        if r.is_main:
            seq.to_json(path)
            report(out, name)
    if r.is_main:
        print(report(out, name))
        print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
