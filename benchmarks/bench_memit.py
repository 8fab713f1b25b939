"""A batch of 100 edits with MEMIT against 100 sequential ROME edits, same process.

    python benchmarks/bench_memit.py [--n 100] [--write docs/benchmarks.md]

On the default model, records 0..n-1 of the shipped counterfactual dataset: (a) relation-ROME and
ROME (their default layers), computed and applied one after the other (sequential editing, each
edit on the model the previous ones left, the context prefixes generated once as ROME's template
cache does); (b) relation-MEMIT and MEMIT, one batch of all n (the
default model's layers and lambda). Key statistics are computed before the clocks start (cached).
Reported: seconds, edits per second, the ratio to the sequential run of the same keying, and the
share of edit prompts whose new target beats the true one with all the edits written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    from _report import emit, machine

    import relation_lens as rl
    from relation_lens.batch_editing import batch_defaults, memit_config
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.editing import EditConfig, default_layer, generate_prefixes
    from relation_lens.probes import target_probs

    model = rl.load_model()
    recs = list(load_counterfactual())[: args.n]
    reqs = [rl.EditRequest(r["prompt"], r["subject"], r["target_new"], r["target_true"]) for r in recs]

    def efficacy() -> float:
        texts = [r.text for r in reqs]
        p = target_probs(model, texts * 2, [r.target_new for r in reqs] + [r.target_true for r in reqs])
        return (p[: len(reqs)] > p[len(reqs):]).float().mean().item()

    rows = ["## Batch editing: MEMIT (one batch) vs sequential ROME", "",
            f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; default model, {args.n} counterfactual records; "
            "compute + apply, key statistics cached beforehand (`benchmarks/bench_memit.py`).", "",
            "| method | how | layers | seconds | edits / s | speed-up over sequential | ES with all edits written |",
            "|---|---|---|---|---|---|---|"]
    for seq_method, batch_method in (("relation_rome", "relation_memit"), ("rome", "memit")):
        layer = default_layer(model, seq_method, reqs[0])
        config = EditConfig.default_for(model)
        stats = rl.KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts)
        t = time.perf_counter()
        edits = []
        prefixes = generate_prefixes(model, config)  # once, as ROME's template cache
        for r in reqs:
            try:
                edits.append(rl.apply_edit(model, rl.compute_edit(model, r, method=seq_method, layer=layer,
                                                                  stats=stats, config=config, prefixes=prefixes)))
            except rl.EditError:
                pass
        seq = time.perf_counter() - t
        es_seq = efficacy()
        for e in reversed(edits):
            e.undo()
        layers, mconfig, lam = batch_defaults(model, batch_method, None, memit_config(), None)
        bstats = {l: rl.KeyStatistics.compute(model, l, n_texts=mconfig.stats_n_texts) for l in layers}
        t = time.perf_counter()
        update = rl.compute_edit(model, reqs, method=batch_method, layers=layers, stats=bstats, config=mconfig,
                                 mom2_update_weight=lam)
        edit = rl.apply_edit(model, update)
        batch = time.perf_counter() - t
        es_batch = efficacy()
        edit.undo()
        rows.append(f"| {seq_method} | {len(edits)} sequential edits | {layer} | {seq:.1f} | {len(edits) / seq:.2f} | "
                    f"1.00x | {es_seq:.2f} |")
        rows.append(f"| {batch_method} | one batch of {args.n} | {list(layers)} | {batch:.1f} | {args.n / batch:.2f} | "
                    f"{seq / batch:.2f}x | {es_batch:.2f} |")
    emit(rows, args.write)


if __name__ == "__main__":
    main()
