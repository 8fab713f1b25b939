"""Sequential editing: N edits in a row on one model, without undoing in between, for ROME, r-ROME,
relation-ROME, MEMIT and relation-MEMIT (one request per step), each with and without AlphaEdit's
projection.

Requests are world facts of the default model given another object of the same relation. After
10, 100, 500 and 1,000 edits (those up to N) it measures, on top-1 predictions:

* ES: the edited facts' prompts now give the new object;
* PS: their held-out templates (paraphrases) give the new object;
* NS: untouched facts of other subjects keep their object (neighbourhood, the untouched-fact accuracy);
* RS: the edited subjects' other facts keep their objects;
* the total change of the edited MLP output matrices, ||dW|| / ||W||;

then undoes every edit in reverse order and checks the model is restored bit for bit.

    python experiments/sequential_edits.py [--n 1000] [--limit N] [--methods ...]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import relation_lens as rl
from relation_lens.batch_editing import Preserve, batch_defaults, memit_config
from relation_lens.data import load_world
from relation_lens.editing import EditConfig, default_layer
from relation_lens.probes import known_mask

OUT = Path(__file__).resolve().parent / "results"
VARIANTS = {"ROME": ("rome", "asymmetric"), "r-ROME": ("rome", "symmetric"),
            "relation-ROME": ("relation_rome", "symmetric"), "MEMIT": ("memit", None),
            "relation-MEMIT": ("relation_memit", None)}


def accuracy(model, prompts, objects) -> float:
    if not prompts:
        return float("nan")
    return sum(known_mask(model, prompts, objects)) / len(prompts)


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


def measure(model, world, done, untouched) -> dict:
    edited = [(f, r) for f, r in done]
    others = [g for f, _ in edited for g in world.by_subject(f.subject) if g.fact_id != f.fact_id][:500]
    para = [(f.heldout_templates[0].format(f.subject), r.target_new) for f, r in edited if f.heldout_templates]
    return {"ES": accuracy(model, [r.text for _, r in edited], [r.target_new for _, r in edited]),
            "PS": accuracy(model, [p for p, _ in para], [o for _, o in para]),
            "NS": accuracy(model, [g.prompt(0) for g in untouched], [g.object for g in untouched]),
            "RS": accuracy(model, [g.prompt(0) for g in others], [g.object for g in others])}


def run(model, world, reqs, untouched, name, alpha, checkpoints, stats_for):
    method, key_mode = VARIANTS[name]
    batch = method.endswith("memit")
    if batch:
        layers, config, lam = batch_defaults(model, method, None, memit_config(), None)
    else:
        layers, config, lam = (default_layer(model, method, reqs[0][1]),), \
            EditConfig.default_for(model, key_mode=key_mode), None
    stats = {l: stats_for(l) for l in layers}
    W0 = {l: model.blocks[l].mlp.W_out.detach().clone() for l in layers}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    preserve = Preserve.default_for(model) if alpha else None
    edits, done, skipped, rows, t0 = [], [], 0, [], time.perf_counter()
    for i, (fact, req) in enumerate(reqs, 1):
        try:
            if batch:
                upd = rl.compute_edit(model, [req], method=method, layers=layers, stats=stats, config=config,
                                      mom2_update_weight=lam, preserve=preserve)
            else:
                upd = rl.compute_edit(model, req, method=method, layer=layers[0], stats=stats[layers[0]],
                                      config=config, preserve=preserve)
            edits.append(rl.apply_edit(model, upd))
            done.append((fact, req))
            if preserve is not None:
                preserve.remember(upd)
        except (rl.EditError, rl.SpanError):
            skipped += 1  # e.g. the model already predicts the new object after earlier edits
        if i in checkpoints:
            change = (sum((model.blocks[l].mlp.W_out.detach() - W0[l]).norm() ** 2 for l in layers) ** 0.5
                      / sum(W0[l].norm() ** 2 for l in layers) ** 0.5).item()
            rows.append({"variant": name + (" + AlphaEdit" if alpha else ""), "edits": i, "applied": len(edits),
                         **measure(model, world, done, untouched), "w_change": change,
                         "s_per_edit": (time.perf_counter() - t0) / i})
            print(rows[-1], flush=True)
    for e in reversed(edits):
        e.undo()
    restored = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    for r in rows:
        r["restored"] = restored
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--untouched", type=int, default=500)
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many edits and 5x untouched facts")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    n, n_untouched = (args.limit, args.limit * 5) if args.limit else (args.n, args.untouched)
    checkpoints = sorted({c for c in (10, 100, 500, 1000) if c <= n} | {n})
    model = rl.load_model(args.model)
    world = load_world()
    reqs = make_requests(world, n)
    edited = {f.subject for f, _ in reqs}
    untouched = random.Random(1).sample([f for f in world if f.subject not in edited], n_untouched)
    cache = {}

    def stats_for(layer):
        if layer not in cache:
            cache[layer] = rl.KeyStatistics.compute(model, layer, n_texts=2000 if args.limit else 10_000)
        return cache[layer]

    rows = []
    for name in args.methods.split(","):
        for alpha in (False, True):
            rows += run(model, world, reqs, untouched, name, alpha, checkpoints, stats_for)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sequential editing: up to {n} edits in a row ({model.cfg.model_name})", "",
             "Top-1 accuracies (%): ES edited prompts give the new object, PS their held-out paraphrases, NS untouched "
             "facts of other subjects keep theirs, RS the edited subjects' other facts keep theirs.", "",
             "| variant | edits | applied | ES | PS | NS | RS | ‖ΔW‖/‖W‖ | restored bit-exact | s/edit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['edits']} | {r['applied']} | {100 * r['ES']:.1f} | {100 * r['PS']:.1f} | "
                     f"{100 * r['NS']:.1f} | {100 * r['RS']:.1f} | {r['w_change']:.3f} | {r['restored']} | "
                     f"{r['s_per_edit']:.2f} |")
    (args.out / ("sequential_edits_quick.md" if args.limit else "sequential_edits.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
