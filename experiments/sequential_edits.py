"""Sequential editing: N edits in a row on one model, without undoing in between.

For each key mode (r-ROME's symmetric keys and ROME's original asymmetric ones) and method, it
applies N counterfactual edits one after another, then measures

* efficacy after all N: the share of edit prompts whose top prediction is the new object;
* retention: top-1 accuracy on untouched facts (other subjects), before and after the N edits;
* the norm of W_out's total change relative to W_out;

then undoes the edits in reverse order and checks the model is restored bit for bit.

    python experiments/sequential_edits.py [--n 100] [--model default] [--limit N]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import relation_lens as rl
from relation_lens.data import load_world
from relation_lens.probes import known_mask
from relation_lens.editing import EditConfig, default_layer

OUT = Path(__file__).resolve().parent / "results"


def top1_accuracy(model, facts) -> float:
    hits = known_mask(model, [f.prompt(0) for f in facts], [f.object for f in facts])
    return sum(hits) / max(1, len(hits))


def make_requests(world, n: int, seed: int = 0):
    rng = random.Random(seed)
    objects = {}
    for f in world:
        objects.setdefault(f.relation_id, set()).add(f.object)
    pool = [f for f in world if len(objects[f.relation_id]) > 1 and f.train_templates[0].startswith("{}")]
    chosen = rng.sample(pool, n)
    reqs = []
    for f in chosen:
        new = rng.choice(sorted(objects[f.relation_id] - {f.object}))
        reqs.append((f, rl.EditRequest(f.train_templates[0], f.subject, new, target_true=f.object)))
    return reqs


def run(model, reqs, untouched, method, layer, key_mode, stats):
    before_acc = top1_accuracy(model, untouched)
    W0 = model.blocks[layer].mlp.W_out.detach().clone()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    edits, skipped, t0 = [], 0, time.perf_counter()
    for fact, req in reqs:
        try:
            upd = rl.compute_edit(model, req, method=method, layer=layer, stats=stats,
                                  config=EditConfig.default_for(model, key_mode=key_mode))
            edits.append((req, rl.apply_edit(model, upd)))
        except rl.EditError:
            skipped += 1  # e.g. the model already predicts the new object after earlier edits
    seconds = time.perf_counter() - t0
    eff = sum(known_mask(model, [r.text for r, _ in edits], [r.target_new for r, _ in edits])) / len(edits)
    after_acc = top1_accuracy(model, untouched)
    change = ((model.blocks[layer].mlp.W_out.detach() - W0).norm() / W0.norm()).item()
    for _, e in reversed(edits):
        e.undo()
    restored = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    return {"method": method, "layer": layer, "key_mode": key_mode, "edits": len(edits), "skipped": skipped,
            "efficacy": eff, "acc_before": before_acc, "acc_after": after_acc, "w_change": change,
            "restored": restored, "seconds_per_edit": seconds / max(1, len(edits))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--untouched", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many edits and untouched facts")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    n, n_untouched = (args.limit, args.limit * 5) if args.limit else (args.n, args.untouched)
    model = rl.load_model(args.model)
    world = load_world()
    reqs = make_requests(world, n)
    edited = {f.subject for f, _ in reqs}
    rng = random.Random(1)
    untouched = rng.sample([f for f in world if f.subject not in edited], n_untouched)
    rows = []
    for method in ("relation_rome", "rome"):
        layer = default_layer(model, method, reqs[0][1])
        stats = rl.KeyStatistics.compute(model, layer, n_texts=2000 if args.limit else 10_000, progress=False)
        for key_mode in ("symmetric", "asymmetric"):
            rows.append(run(model, reqs, untouched, method, layer, key_mode, stats))
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sequential editing: {n} edits in a row ({model.cfg.model_name})", "",
             "| method | layer | keys | edits applied | efficacy after all | untouched-fact accuracy before -> after | "
             "‖ΔW_out‖/‖W_out‖ | restored bit-exact | s/edit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['layer']} | {r['key_mode']} | {r['edits']} ({r['skipped']} refused) | "
                     f"{r['efficacy']:.1%} | {r['acc_before']:.1%} -> {r['acc_after']:.1%} | {r['w_change']:.3f} | "
                     f"{r['restored']} | {r['seconds_per_edit']:.2f} |")
    (args.out / ("sequential_edits_quick.md" if args.limit else "sequential_edits.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
