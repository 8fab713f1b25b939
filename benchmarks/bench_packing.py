"""Prompts per second of ``trace_dataset`` with cross-prompt batching on and off, in one process.

    python benchmarks/bench_packing.py [--prompts 24] [--device cpu] [--write docs/benchmarks.md]

The same world facts are traced with ``pack=1`` (prompt by prompt: each engine batch holds the sites
of one prompt and one position) and with ``pack=8`` / ``pack=24`` (sites of several prompts and
positions share batches of ``batch_size`` rows, padded), on the default model and on a random model of
GPT-2 small's shape, alternating the settings over ``--repeats`` rounds (median). The ratio is
against ``pack=1`` in the same process. Packed grids are checked against the unpacked ones (max
difference printed). On a GPU machine: ``python benchmarks/bench_packing.py --device cuda``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from _report import emit, machine
    from bench_trace import gpt2_small_shaped

    import relation_lens as rl
    from relation_lens.data import world_trace_facts

    facts = world_trace_facts(limit=args.prompts)
    default = rl.load_model(device=args.device)
    models = {"default (6 layers)": default, "GPT-2-small-shaped (12 layers, random)":
              gpt2_small_shaped(default.tokenizer, args.device)}
    packs = (1, 8, args.prompts)
    rows = ["## Cross-prompt batching (`trace_dataset(pack=...)`)", "",
            f"Machine: {machine()}; device {args.device}; {time.strftime('%Y-%m-%d')}; {len(facts)} world facts, "
            f"relation corruption, 3 kinds, {args.samples} samples, batch_size 512 rows, depth-scaled window; median "
            f"of {args.repeats} alternating rounds in one process (`benchmarks/bench_packing.py`).", "",
            "| model | pack | seconds | prompts / s | speed-up over pack=1 | max grid difference from pack=1 |",
            "|---|---|---|---|---|---|"]
    for name, model in models.items():
        times = {p: [] for p in packs}
        results = {}
        for _ in range(args.repeats):
            for p in packs:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                results[p] = rl.trace_dataset(model, facts, n_samples=args.samples, exclude_incorrect=False, pack=p)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[p].append(time.perf_counter() - t)
        base = sorted(times[1])[len(times[1]) // 2]
        for p in packs:
            med = sorted(times[p])[len(times[p]) // 2]
            gap = max((a.scores[k] - b.scores[k]).abs().max().item()
                      for a, b in zip(results[p].results, results[1].results) for k in a.scores)
            rows.append(f"| {name} | {p} | {med:.2f} | {len(facts) / med:.2f} | {base / med:.2f}x | {gap:.1e} |")
    emit(rows, args.write)


if __name__ == "__main__":
    main()
