"""Time editing on the default model: key statistics (computed, and loaded from the disk cache) and one
edit with cached statistics, for both methods.

    python benchmarks/bench_edit.py [--repeats 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.editing import default_layer  # noqa: E402


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    model = rl.load_model()
    request = rl.EditRequest("{} is located in the continent of", "Germany", "Asia", target_true="Europe")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for method in ("relation_rome", "rome"):
            layer = default_layer(model, method, request)
            stats, t_stats = timed(lambda: rl.KeyStatistics.compute(model, layer, directory=cache, progress=False,
                                                                     cache=False), 1)
            rl.KeyStatistics.compute(model, layer, directory=cache, progress=False)  # write the cache
            _, t_load = timed(lambda: rl.KeyStatistics.compute(model, layer, directory=cache, progress=False),
                              args.repeats)
            _, t_edit = timed(lambda: rl.compute_edit(model, request, method=method, layer=layer, stats=stats),
                              args.repeats)
            upd = rl.compute_edit(model, request, method=method, layer=layer, stats=stats)
            _, t_apply = timed(lambda: rl.apply_edit(model, upd).undo(), args.repeats)
            rows.append((method, layer, stats.count, stats.n_texts, t_stats, t_load, t_edit, t_apply))
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads)")
    lines = [f"### Editing timings — {datetime.date.today()} — {machine}", "",
             "Default model; statistics over the default corpus (a seeded sample of the training text); one edit "
             "= compute_edit with cached statistics (prefix generation, key, 20-step value optimisation, closed "
             "form); medians.", "",
             "| method | layer | keys (tokens) | texts | compute statistics (s) | load cached (s) | one edit (s) | "
             "apply + undo (s) |", "|---|---|---|---|---|---|---|---|"]
    for m, layer, count, n, ts, tl, te, ta in rows:
        lines.append(f"| {m} | {layer} | {count:,} | {n:,} | {ts:.2f} | {tl:.4f} | {te:.2f} | {ta:.5f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
