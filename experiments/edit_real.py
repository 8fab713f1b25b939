"""The paper's editing question on a real model: relation-ROME against ROME (and MEMIT, relation-MEMIT,
each with and without AlphaEdit) on records the model knows, with paired bootstrap intervals.

Datasets (each made once and kept under ``results/<model>/edit_real/``):

* ``CounterFact``: ROME's training records whose true object the model predicts at top-1
  (``rl.known_facts``). Where ``results/<model>/splits.json`` exists (experiments/smollm2_preset.py,
  whose tune chose the model's preset on its tuning split), the records are its evaluation split and
  then its held-out records after the first ``HELD_FOR_TESTS`` (which the tests use): none of them was
  tuned on. Otherwise the known records are shuffled (seed 0) and the first 30 are left out as a
  tuning split.
* ``LRE counterfactual``: :func:`~relation_lens.data.counterfact.build_counterfactual` over the LRE
  relations (``load_lre_world``): facts the model knows, rewritten to another object of the relation,
  the held-out templates as paraphrases, known neighbours, and the subject's other known relations
  (RS).

Variants, each one edit per record, measured and undone (``rl.evaluate`` / ``rl.evaluate_batch`` with a
checkpoint folder each, so a killed run continues where it stopped; under ``torchrun`` the records are
shared between the ranks): the unedited model; ROME at the model's default layer; relation-ROME at the
paper's rule (the 5th MLP of 48 scaled to depth); relation-ROME and ROME at the peaks ``rl.locate``
found (``results/<model>/locate_<method>.json``, where there); MEMIT and relation-MEMIT at their default
layers, each with and without AlphaEdit; ROME and relation-ROME with AlphaEdit. Settings are the
library's defaults for the model (its preset where it has one, each row says where they came from).

Then paired bootstrap intervals (``rl.score_difference``, the same records) for relation-ROME minus ROME
and the other pairs, and a layer sweep of ROME and relation-ROME over ``--sweep-layers`` on the first
``--sweep-n`` LRE records (no fluency).

Writes ``results/<model>/edit_real.md`` (tables, intervals, machine, date, run time) and
``edit_real_sweep.png``; ``--report`` rebuilds them from what is there.

    python experiments/edit_real.py --model smollm2-135m          # many hours on 2 CPU cores; resumable
    python experiments/edit_real.py --model default --limit 2     # a quick run (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from smollm2_preset import machine, write  # noqa: E402  (the experiments' run-file helpers)

import relation_lens as rl  # noqa: E402
from relation_lens import presets  # noqa: E402
from relation_lens.data.counterfact import build_counterfactual, save_records  # noqa: E402
from relation_lens.data.loaders import load_counterfact, load_lre_world  # noqa: E402
from relation_lens.distributed import ranks  # noqa: E402
from relation_lens.editing import batch_defaults, default_layer, request_of  # noqa: E402
from relation_lens.evaluation import EvaluationResult  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
HELD_FOR_TESTS = 20  # held-out records the tests may use (tests/data/smollm2_held_out.json takes the first 5)
N_TUNING = 30
DATASETS = ("CounterFact", "LRE counterfactual")
# (a label, the method, how its layer is chosen, with AlphaEdit) in the order they run
VARIANTS = (("unedited", "none", None, False),
            ("ROME", "rome", "default", False),
            ("relation-ROME (paper's rule)", "relation_rome", "rule", False),
            ("relation-ROME (locate's global peak)", "relation_rome", "locate", False),
            ("ROME (locate's peak)", "rome", "locate", False),
            ("MEMIT", "memit", "default", False),
            ("relation-MEMIT", "relation_memit", "default", False),
            ("MEMIT + AlphaEdit", "memit", "default", True),
            ("relation-MEMIT + AlphaEdit", "relation_memit", "default", True),
            ("ROME + AlphaEdit", "rome", "default", True),
            ("relation-ROME + AlphaEdit (paper's rule)", "relation_rome", "rule", True))
PAIRS = (("relation-ROME (paper's rule)", "ROME"), ("relation-ROME (locate's global peak)", "ROME"),
         ("relation-ROME (locate's global peak)", "relation-ROME (paper's rule)"), ("relation-MEMIT", "MEMIT"),
         ("relation-MEMIT + AlphaEdit", "MEMIT + AlphaEdit"), ("MEMIT + AlphaEdit", "MEMIT"))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def counterfact_records(model, out: Path, shared: Path, n: int, candidates: int | None,
                        n_tuning: int = N_TUNING) -> list[dict]:
    """The CounterFact records of the evaluation (see the module docstring), made once."""
    path = out / "edit_real" / "counterfact_ids.json"
    records = {r["case_id"]: dict(r) for r in load_counterfact(shared / "rome" / "counterfact-train.json",
                                                               limit=candidates)}
    if not path.is_file():
        splits = out / "splits.json"
        if splits.is_file():
            sp = json.loads(splits.read_text())
            ids, source = sp["evaluation"] + sp["held_out"][HELD_FOR_TESTS:], \
                f"splits.json: its evaluation split, then its held-out records after the first {HELD_FOR_TESTS}"
        else:
            known = [k["case_id"] for k in rl.known_facts(model, list(records.values()))]
            random.Random(0).shuffle(known)
            ids, source = known[n_tuning:], f"known records, seeded shuffle, the first {n_tuning} left out for tuning"
        write(path, {"source": source, "case_ids": ids})
    ids = json.loads(path.read_text())["case_ids"]
    return [records[i] for i in ids if i in records][:n]


def lre_records(model, out: Path, shared: Path, n: int, limit: int | None) -> list[dict]:
    path = out / "edit_real" / "lre_counterfactual.jsonl"
    if not path.is_file():
        world = load_lre_world(shared / "lre_relations" / "data" / "factual")
        if limit:  # a quick run: a few facts of each relation
            from relation_lens.data import World

            keep = {rid: [f for f in world if f.relation_id == rid][:limit * 10] for rid in world.relations}
            world = World(tuple(f for fs in keep.values() for f in fs), world.relations)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_records(build_counterfactual(model, world, n=100_000, seed=0), path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def layer_of(model, method: str, how: str | None, out: Path, first: dict, alpha: bool) -> int | None:
    if how is None:
        return None
    if how == "rule":
        return presets.relation_rome_layer(model.cfg.n_layers)
    if how == "locate":
        f = out / f"locate_{method}.json"
        # relation-ROME: the global MLP peak at the last token (the early peak is the rule's layer); ROME:
        # the peak of its rule (MLPs at the last subject token)
        return int(json.loads(f.read_text())["global_peak" if method == "relation_rome" else "peak"]) \
            if f.is_file() else None
    return default_layer(model, method, request_of(first), alpha)


def run_variant(model, records, label, method, how, alpha, out: Path, folder: Path, fluency: bool, stats_for):
    """One variant's evaluation (its JSON file, made once; the checkpoint folder beside it)."""
    path = folder / f"{slug(label)}.json"
    if path.is_file():
        return EvaluationResult.from_json(path)
    t0 = time.perf_counter()
    preserve = rl.Preserve.default_for(model, method) if alpha else None
    if method in ("memit", "relation_memit"):
        layers, config, lam = batch_defaults(model, method, None, None, None, alpha)
        res = rl.evaluate_batch(model, records, method=method, batch_size=1, layers=layers, config=config,
                                stats=stats_for(layers),
                                mom2_update_weight=lam, preserve=preserve, fluency=fluency,
                                checkpoint=folder / f"{slug(label)}_checkpoint")
        source = presets.for_model(model).source_of(method, alpha)
    else:
        layer = layer_of(model, method, how, out, records[0], alpha)
        if how == "locate" and layer is None:
            return None  # no locate result for this model
        if layer is None and method != "none":
            layer = default_layer(model, method, request_of(records[0]), alpha)
        res = rl.evaluate(model, records, method=method, layer=layer, fluency=fluency, preserve=preserve,
                          stats=stats_for([layer])[layer] if layer is not None else None,
                          checkpoint=folder / f"{slug(label)}_checkpoint")
        source = "unedited" if method == "none" else (
            f"layer: {how}; settings: {presets.for_model(model).source_of(method, alpha)}")
    res = EvaluationResult(method=res.method, layer=res.layer, records=res.records, summary=res.summary,
                           n_failed=res.n_failed, settings={**res.settings, "label": label, "source": source,
                                                            "seconds": time.perf_counter() - t0})
    if ranks().is_main:
        res.to_json(path)
    return res


def fmt(summary: dict, key: str) -> str:
    v, h = summary.get(key, (float("nan"), float("nan")))
    return "n/a" if v != v else f"{v:.1f}" if h != h else f"{v:.1f} ± {h:.1f}"


def report(out: Path, model_name: str) -> str:
    meta = json.loads((out / "edit_real" / "run.json").read_text()) if (out / "edit_real" / "run.json").is_file() else {}
    lines = [f"# relation-ROME against ROME on {model_name} (experiments/edit_real.py)", ""]
    if meta:
        lines += [f"Machine: {meta['machine']}; date {meta['date']}; torch threads {meta['threads']}.", ""]
    for dataset in DATASETS:
        folder = out / "edit_real" / slug(dataset)
        results = {}
        for label, *_ in VARIANTS:
            f = folder / f"{slug(label)}.json"
            if f.is_file():
                results[label] = EvaluationResult.from_json(f)
        if not results:
            continue
        n = len(next(iter(results.values())).records)
        lines += [f"## {dataset}: {n} records", "",
                  "Rates in %, ± 95% interval; Score: the harmonic mean of ES, PS, NS (and RS where records have "
                  "relation prompts); fluency: ROME's n-gram entropy of greedy generations.", "",
                  "| variant | layer(s) | Score | ES | PS | NS | RS | fluency | refused | minutes | settings from |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, res in results.items():
            s = res.summary
            layers = res.settings.get("layers", res.layer)
            lines.append(f"| {label} | {layers if layers is not None else '-'} | {fmt(s, 'Score')} | {fmt(s, 'ES')} | "
                         f"{fmt(s, 'PS')} | {fmt(s, 'NS')} | {fmt(s, 'RS')} | {fmt(s, 'fluency')} | {res.n_failed} | "
                         f"{res.settings.get('seconds', float('nan')) / 60:.0f} | {res.settings.get('source', '')} |")
        diffs = []
        for a, b in PAIRS:
            if a in results and b in results:
                for metric in ("Score", "ES", "PS", "NS", "RS"):
                    d = rl.score_difference(results[a], results[b], metric=metric)
                    if d.difference == d.difference:
                        diffs.append(f"| {a} − {b} | {metric} | {d.difference:+.1f} | [{d.low:+.1f}, {d.high:+.1f}] | "
                                     f"{'yes' if d.significant else 'no'} |")
        if diffs:
            lines += ["", "Paired bootstrap (2,000 resamples of the same records), 95% intervals:", "",
                      "| difference | metric | value | interval | excludes 0 |", "|---|---|---|---|---|", *diffs]
        lines.append("")
    sweep = out / "edit_real" / "sweep"
    rows = sorted(sweep.glob("*.json")) if sweep.is_dir() else []
    if rows:
        got: dict[str, dict[int, dict]] = {}
        for f in rows:
            res = EvaluationResult.from_json(f)
            got.setdefault(res.method, {})[int(res.layer)] = res.summary
        lines += ["## Layer sweep (LRE counterfactual records, no fluency)", "",
                  "| method | layer | Score | ES | PS | NS | RS |", "|---|---|---|---|---|---|---|"]
        for method, by_layer in sorted(got.items()):
            for layer, s in sorted(by_layer.items()):
                lines.append(f"| {method} | {layer} | {fmt(s, 'Score')} | {fmt(s, 'ES')} | {fmt(s, 'PS')} | "
                             f"{fmt(s, 'NS')} | {fmt(s, 'RS')} |")
        fig, axes = plt.subplots(1, 5, figsize=(17, 3.2), constrained_layout=True)
        for ax, metric in zip(axes, ("Score", "ES", "PS", "NS", "RS")):
            for method, by_layer in sorted(got.items()):
                ls = sorted(by_layer)
                ax.errorbar(ls, [by_layer[l][metric][0] for l in ls], yerr=[by_layer[l][metric][1] for l in ls],
                            marker="o", capsize=2, label=method)
            ax.set_title(metric)
            ax.set_xlabel("edited MLP layer")
            ax.set_ylim(-5, 105)
        axes[0].legend()
        fig.savefig(out / "edit_real_sweep.png", dpi=120)
        plt.close(fig)
        lines += ["", "![layer sweep](edit_real_sweep.png)", ""]
    text = "\n".join(lines) + "\n"
    (out / "edit_real.md").write_text(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=160, help="CounterFact records (default 160)")
    ap.add_argument("--n-lre", type=int, default=150, help="LRE counterfactual records (default 150)")
    ap.add_argument("--candidates", type=int, default=None, help="CounterFact records searched (default all)")
    ap.add_argument("--sweep-n", type=int, default=20)
    ap.add_argument("--sweep-layers", default=None, help="comma-separated (default: every third layer and the last)")
    ap.add_argument("--parts", nargs="+", default=["main", "sweep"], choices=["main", "sweep"])
    ap.add_argument("--no-fluency", action="store_true")
    ap.add_argument("--variants", nargs="+", default=None, help="labels of the variants to run (default all)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--sweep-methods", nargs="+", default=["relation_rome", "rome"], choices=["relation_rome", "rome"])
    ap.add_argument("--stats-texts", type=int, default=None,
                    help="texts for key statistics (default: the library's, cached on disk)")
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many records, two sweep layers")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=None, help="default results/<model>/ (results/<model>_quick/ with --limit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", action="store_true", help="only rebuild edit_real.md and the figure")
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
    n, n_lre, sweep_n = (args.limit,) * 3 if args.limit else (args.n, args.n_lre, args.sweep_n)
    r = ranks()
    if r.is_main:
        write(out / "edit_real" / "run.json", {
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "world_size": r.world_size,
            "args": {k: str(v) for k, v in vars(args).items()}})
    data = {"CounterFact": counterfact_records(model, out, args.shared, n, args.candidates or (400 if args.limit else None),
                                               args.limit or N_TUNING),
            "LRE counterfactual": lre_records(model, out, args.shared, n_lre, args.limit)}
    stats: dict = {}

    def stats_for(layers) -> dict | None:
        """Statistics computed over ``--stats-texts`` texts (kept for the run), or the library's default."""
        if args.stats_texts is None:
            return None
        for layer in layers:
            if layer not in stats:
                stats[layer] = rl.KeyStatistics.compute(model, layer, n_texts=args.stats_texts, progress=False)
        return {layer: stats[layer] for layer in layers}

    unknown = set(args.variants or ()) - {v[0] for v in VARIANTS}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; the variants are {[v[0] for v in VARIANTS]}")
    if "main" in args.parts:
        for dataset, records in data.items():
            if dataset not in args.datasets:
                continue
            if not records:
                print(f"{dataset}: the model knows none of its facts; skipped", flush=True)
                continue
            for label, method, how, alpha in VARIANTS:
                if args.variants is None or label in args.variants:
                    run_variant(model, records, label, method, how, alpha, out, out / "edit_real" / slug(dataset),
                                fluency=not args.no_fluency, stats_for=stats_for)
                if r.is_main:
                    report(out, name)
    if "sweep" in args.parts and data["LRE counterfactual"]:
        L = model.cfg.n_layers
        layers = ([int(x) for x in args.sweep_layers.split(",")] if args.sweep_layers
                  else sorted({*range(0, L, 3), L - 1}))
        if args.limit:
            layers = layers[:2]
        records = data["LRE counterfactual"][:sweep_n]
        folder = out / "edit_real" / "sweep"
        for method in args.sweep_methods:
            for layer in layers:
                path = folder / f"{method}_{layer}.json"
                if path.is_file():
                    continue
                given = stats_for([layer])
                res = rl.evaluate(model, records, method=method, layer=layer, fluency=False,
                                  stats=given[layer] if given else None,
                                  checkpoint=folder / f"{method}_{layer}_checkpoint")
                if r.is_main:
                    res.to_json(path)
                    report(out, name)
    if r.is_main:
        print(report(out, name))
        print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
