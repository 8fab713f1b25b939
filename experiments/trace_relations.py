"""Experiment 1: relation tracing vs subject tracing on FewRel-derived prompts the model gets right.

FewRel triples (cased surface forms) become cloze prompts with relation templates
(``relation_lens.data.loaders.RELATION_TEMPLATES``); world facts of the default model add
relations FewRel's validation split lacks. Prompts with relation words after the subject are
traced twice: corrupting the relation (Li, Chen & Wang 2024) and corrupting the subject (ROME).
Prompts the model gets wrong are traced, counted and left out of the averages.

Three runs: the relation corrupted (last token included, the library's default), the relation
corrupted with the last token kept clean (``include_last=False``: where does relation information
reach the last token from?), and the subject corrupted (ROME).

Writes ``experiments/results/trace_relations{_quick}.md`` (tables of average indirect effects with
95% intervals), a PNG per run, and the HTML view and JSON of each run (not committed: regenerate them).

    python experiments/trace_relations.py [--model default] [--limit N] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import relation_lens as rl
from relation_lens.data import load_world
from relation_lens.data.loaders import fewrel_prompts, load_fewrel
from relation_lens.probes import known_mask

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"


def collect(model, shared: Path, n: int, seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    triples = load_fewrel(shared / "fewrel" / "val_wiki.json", shared / "fewrel" / "pid2name.json")
    fewrel = [dict(r, source="FewRel") for r in fewrel_prompts(triples)]
    world = [{"prompt": f.prompt(0), "subject": f.subject, "target": f.object, "relation_id": f.relation_id,
              "source": "world"} for f in load_world() if f.train_templates[0].startswith("{}")]
    rows = [r for r in fewrel + world if r["prompt"].startswith(r["subject"])]  # relation words after the subject
    knows = known_mask(model, [r["prompt"] for r in rows], [r["target"] for r in rows])
    known_fewrel = [r for r, k in zip(rows, knows) if k and r["source"] == "FewRel"]
    known_world = [r for r, k in zip(rows, knows) if k and r["source"] == "world"]
    stats = {"fewrel_prompts": sum(r["source"] == "FewRel" for r in rows), "fewrel_known": len(known_fewrel),
             "world_known": len(known_world)}
    half = min(len(known_fewrel), n // 2)
    chosen = rng.sample(known_fewrel, half) + rng.sample(known_world, min(len(known_world), n - half))
    # a few prompts the model gets wrong, to show they are reported and excluded
    wrong = [r for r, k in zip(rows, knows) if not k]
    chosen += rng.sample(wrong, min(len(wrong), max(1, n // 20)))
    return chosen, stats


def table(result, kind: str) -> str:
    lines = ["| layer | " + " | ".join(result.buckets) + " |", "|---" * (len(result.buckets) + 1) + "|"]
    for layer in range(result.mean[kind].shape[0]):
        cells = [f"{result.mean[kind][layer, b]:+.3f} ± {result.ci95[kind][layer, b]:.3f}"
                 for b in range(len(result.buckets))]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=200, help="prompts to trace (default 200)")
    ap.add_argument("--limit", type=int, default=None, help="quick run with this many prompts")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=None,
                    help="default: ROME's 10 of 48 layers scaled to the model's depth (1 for the default model)")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n = args.limit or args.n
    suffix = "_quick" if args.limit else ""
    model = rl.load_model(args.model)
    config = rl.TraceConfig(window=args.window, n_samples=args.samples)
    window = config.window_for(model.cfg.n_layers)
    facts, stats = collect(model, args.shared, n)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    runs = {"relation": ("relation", True), "relation, last token kept clean": ("relation", False),
            "subject": ("subject", True)}
    for name, (corrupt, include_last) in runs.items():
        res = rl.trace_dataset(model, facts, config=config.replace(corrupt=corrupt, include_last=include_last),
                               progress=not args.limit)
        stem = f"trace_relations_{corrupt}{'' if include_last else '_lastclean'}{suffix}"
        res.to_json(args.out / f"{stem}.json")
        res.plot(args.out / f"{stem}.png")
        (args.out / f"{stem}.html").write_text(res.to_html(), encoding="utf-8")
        results[name] = (res, stem)
    lines = [f"# Experiment 1: relation vs subject tracing ({model.cfg.model_name})", "",
             f"FewRel-derived prompts with relation words after the subject: {stats['fewrel_prompts']}, of which the "
             f"model gets {stats['fewrel_known']} right; world facts it gets right: {stats['world_known']}.",
             f"Traced: {len(facts)} prompts ({results['relation'][0].n_incorrect} that the model gets wrong, excluded "
             f"from the averages); {args.samples} noise samples, window {window}.", ""]
    for name, (res, stem) in results.items():
        lines += [f"## {name} corrupted: mean P clean {res.clean_prob:.3f}, corrupted {res.corrupted_prob:.3f}", "",
                  f"{res.n_used} prompts averaged, {len(res.skipped)} skipped (no relation token left to corrupt).", "",
                  f"![{name}]({stem}.png)", ""]
        for kind in res.mean:
            lines += [f"### average indirect effect, restoring {kind}", "", table(res, kind), ""]
    (args.out / f"trace_relations{suffix}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
