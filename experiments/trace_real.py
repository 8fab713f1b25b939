"""The paper's tracing questions on a real model: relation vs subject tracing over facts the model knows,
from several sources, reported per source, with attention knockout of the relation's edges to the last token.

Facts (``trace_facts.json``, made once): every source in ../shared/data whose prompts put the relation
after the subject, kept when the model's top next token is the answer's first token, with its
probability (``rl.known_facts``):

* ``known_1000``: ROME's known facts;
* ``CounterFact``: the training records' rewrite prompts with their true objects;
* ``LRE``: the factual relations of Hernandez et al.'s LRE data (templates that start with the subject);
* ``FewRel``: cloze prompts of FewRel's validation triples (the library's relation templates).

Each source's candidates are a seeded sample of ``--candidates``; up to ``--per-source`` of the known
ones are drawn from each source (seeded), at least ``--n`` in all.

Runs (each ``rl.trace_dataset`` with its own checkpoint folder, so a killed run continues where it
stopped; under ``torchrun`` the prompts are shared between the ranks):

1. the relation corrupted (the last token included: the library's default, the paper's setting);
2. the relation corrupted with the last token kept clean (``include_last=False``);
3. the subject corrupted (ROME);
4. attention knockout (``rl.knockout_dataset``): the last token's attention to the relation, the subject
   and itself blocked over a window of layers, the relative change of P(answer).

Writes under ``results/<model>/``: ``trace_<run>.json`` / ``.png`` per run, ``trace_real.md`` with the
means and 95% intervals per kind and position bucket (all facts, and per source), the peak of each
curve, the knockout table, the machine, date and run time.

    python experiments/trace_real.py --model smollm2-135m             # hours on 2 CPU cores; resumable
    python experiments/trace_real.py --model default --limit 4        # a quick run
    torchrun --nproc-per-node 2 experiments/trace_real.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smollm2_preset import write  # noqa: E402  (the experiments' atomic JSON writer)
from trace_relations import table  # noqa: E402  (the bucket table of experiment 1)

import relation_lens as rl  # noqa: E402
from relation_lens.data.loaders import fewrel_prompts, load_counterfact, load_fewrel, load_known  # noqa: E402
from relation_lens.distributed import ranks  # noqa: E402
from relation_lens.tracing.dataset import BUCKETS, average  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
RUNS = {"relation": ("relation", True), "relation_lastclean": ("relation", False), "subject": ("subject", True)}
SOURCES = ("known_1000", "CounterFact", "LRE", "FewRel")


def candidates(shared: Path, limit: int | None = None, per_source_candidates: int = 3000) -> dict[str, list[dict]]:
    """Each source's facts whose prompt starts with the subject (relation words after it): a seeded
    sample of ``per_source_candidates`` of them."""
    out: dict[str, list[dict]] = {}
    out["known_1000"] = [{"prompt": r["prompt"], "subject": r["subject"], "target": r["target"]}
                         for r in load_known(shared / "rome" / "known_1000.json")]
    out["CounterFact"] = [{"prompt": r["prompt"].format(r["subject"]), "subject": r["subject"],
                           "target": r["target_true"]}
                          for r in load_counterfact(shared / "rome" / "counterfact-train.json", limit=limit and 400)]
    lre = []
    for f in sorted(glob.glob(str(shared / "lre_relations" / "data" / "factual" / "*.json"))):
        data = json.loads(Path(f).read_text())
        templates = [t for t in data["prompt_templates"] if t.startswith("{}")]
        if templates:
            lre += [{"prompt": templates[0].format(s["subject"]), "subject": s["subject"], "target": s["object"],
                     "relation": data["name"]} for s in data["samples"]]
    out["LRE"] = lre
    triples = load_fewrel(shared / "fewrel" / "val_wiki.json", shared / "fewrel" / "pid2name.json")
    out["FewRel"] = [dict(r) for r in fewrel_prompts(triples)]
    for name in out:
        rows = [r for r in out[name] if r["prompt"].startswith(r["subject"]) and r["prompt"] != r["subject"]]
        random.Random(0).shuffle(rows)  # a seeded sample of each source's candidates, its relations mixed
        out[name] = rows[:limit * 50 if limit else per_source_candidates]
    return out


def known(model, shared: Path, limit: int | None, per_source_candidates: int) -> dict:
    found, sizes = {}, {}
    for name, rows in candidates(shared, limit, per_source_candidates).items():
        sizes[name] = len(rows)
        found[name] = [{"prompt": k["prompt"], "subject": k["subject"], "target": k["target"], "prob": k["prob"],
                        "source": name} for k in rl.known_facts(model, rows)]
    return {"candidates": sizes, "known": found}


def choose(facts: dict, per_source: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for name in SOURCES:
        rows = facts["known"].get(name, [])
        out += rng.sample(rows, min(per_source, len(rows)))
    return out


def peaks(mean: dict, ci: dict, kind: str) -> str:
    """The largest mean effect of a kind's curve: its layer, bucket, value and interval."""
    grid = mean[kind]
    flat = torch.nan_to_num(grid, nan=-1e9)
    layer, b = divmod(int(flat.argmax()), grid.shape[1])
    return f"{kind}: L{layer} at {BUCKETS[b]} {grid[layer, b]:+.3f} ± {ci[kind][layer, b]:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-source", type=int, default=50, help="facts drawn from each source (default 50)")
    ap.add_argument("--candidates", type=int, default=3000,
                    help="candidates probed per source (a seeded sample; default 3000)")
    ap.add_argument("--n", type=int, default=150, help="at least this many facts in all (a warning otherwise)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=None, help="default: depth-scaled (as rl.trace)")
    ap.add_argument("--runs", nargs="+", default=[*RUNS, "knockout"], choices=[*RUNS, "knockout"])
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many facts a source, 2 samples")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=None, help="default results/<model>/ (results/<model>_quick/ with --limit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu (default) or cuda (under torchrun: each rank its own GPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limit:
        args.per_source, args.samples = args.limit, 2
    t0 = time.perf_counter()
    rank = ranks()  # first: under torchrun on GPUs it picks this rank's device
    model = rl.load_model(args.model, device=args.device)
    name = model.cfg.model_name
    out = args.out or HERE / "results" / (name + ("_quick" if args.limit else ""))
    out.mkdir(parents=True, exist_ok=True)
    facts_file = out / "trace_facts.json"
    if facts_file.is_file():
        facts = json.loads(facts_file.read_text())
    else:
        facts = known(model, args.shared, args.limit, args.candidates)
        if rank.rank == 0:
            write(facts_file, facts)
    chosen = choose(facts, args.per_source)
    config = rl.TraceConfig(window=args.window, n_samples=args.samples)
    window = config.window_for(model.cfg.n_layers)
    results = {}
    for run in [r for r in args.runs if r in RUNS]:
        corrupt, include_last = RUNS[run]
        res = rl.trace_dataset(model, chosen, config=config.replace(corrupt=corrupt, include_last=include_last),
                               checkpoint=out / f"trace_{run}_checkpoint", progress=not args.limit)
        results[run] = res
        if rank.rank == 0:
            res.to_json(out / f"trace_{run}.json")
            res.plot(out / f"trace_{run}.png")
    knock = None
    if "knockout" in args.runs:
        knock = rl.knockout_dataset(model, chosen, sources=("relation", "subject", "last"), window=window)
    if rank.rank != 0:
        return
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                       f"{rank.world_size} process(es)", "date": time.strftime("%Y-%m-%d"),
            "minutes": (time.perf_counter() - t0) / 60, "args": {k: str(v) for k, v in vars(args).items()}}
    write(out / "trace_real_run.json", meta)
    by_source = {s: sum(f["source"] == s for f in chosen) for s in SOURCES}
    lines = [f"# Relation and subject tracing on {name}", "",
             f"Machine: {meta['machine']}; {meta['date']}; {meta['minutes']:.0f} min (this invocation; runs resumed "
             "from checkpoints count only what was left).", "",
             "Facts the model knows (top-1 answer), of the candidates whose prompt starts with the subject: " +
             "; ".join(f"{s} {len(facts['known'].get(s, []))} of {facts['candidates'].get(s, 0)}" for s in SOURCES) +
             f". Traced: {len(chosen)} ({', '.join(f'{s} {n}' for s, n in by_source.items())}); "
             f"{args.samples} noise samples, window {window}.", ""]
    if len(chosen) < args.n:
        lines += [f"**Fewer than {args.n} facts** ({len(chosen)}): what the sources' sampled candidates hold that the "
                  f"model knows, at most {args.per_source} a source.", ""]
    for run, res in results.items():
        lines += [f"## {run.replace('_', ', ')} corrupted: {res.n_used} facts averaged; mean P clean "
                  f"{res.clean_prob:.3f}, corrupted {res.corrupted_prob:.3f}", "", f"![{run}](trace_{run}.png)", "",
                  "Peaks (all facts): " + "; ".join(peaks(res.mean, res.ci95, k) for k in res.mean) + ".", ""]
        for s in SOURCES:
            skipped = {i for i, _ in res.skipped}
            traced = [chosen[i] for i in range(len(chosen)) if i not in skipped]  # res.results' facts
            part = [r for r, f in zip(res.results, traced) if f["source"] == s]
            if part:
                used, mean, ci, count, clean, corrupted = average(part, list(res.mean), model.cfg.n_layers, True)
                lines.append(f"- {s} ({sum(used)} averaged, P clean {clean:.3f}, corrupted {corrupted:.3f}): "
                             + "; ".join(peaks(mean, ci, k) for k in mean))
        lines.append("")
        for kind in res.mean:
            lines += [f"### {run}: mean indirect effect restoring {kind} (all facts)", "",
                      table(res, kind), ""]
    if knock is not None:
        lines += [f"## Attention knockout ({sum(knock.used)} facts, window {window}): relative change of P(answer) "
                  "when the last token's attention to a source is blocked", "",
                  "| layer | " + " | ".join(knock.sources) + " |", "|---" * (len(knock.sources) + 1) + "|"]
        for layer in range(model.cfg.n_layers):
            lines.append(f"| {layer} | " + " | ".join(f"{knock.mean[s][layer]:+.3f} ± {knock.ci95[s][layer]:.3f}"
                                                      for s in knock.sources) + " |")
        knock.to_json(out / "knockout.json")
    (out / "trace_real.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
