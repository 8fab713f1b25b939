"""Time editing on the default model: key statistics (computed, and loaded from the disk cache) and one
edit with cached statistics, for both methods.

    python benchmarks/bench_edit.py [--repeats 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit, machine, median_time  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.editing import default_layer  # noqa: E402


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
            stats, t_stats = median_time(lambda: rl.KeyStatistics.compute(model, layer, directory=cache, progress=False,
                                                                     cache=False), 1)
            rl.KeyStatistics.compute(model, layer, directory=cache, progress=False)  # write the cache
            _, t_load = median_time(lambda: rl.KeyStatistics.compute(model, layer, directory=cache, progress=False),
                              args.repeats)
            _, t_edit = median_time(lambda: rl.compute_edit(model, request, method=method, layer=layer, stats=stats),
                              args.repeats)
            upd = rl.compute_edit(model, request, method=method, layer=layer, stats=stats)
            _, t_apply = median_time(lambda: rl.apply_edit(model, upd).undo(), args.repeats)
            rows.append((method, layer, stats.count, stats.n_texts, t_stats, t_load, t_edit, t_apply))
    lines = [f"### Editing timings — {datetime.date.today()} — {machine()}", "",
             "Default model; statistics over the default corpus (a seeded sample of the training text); one edit "
             "= compute_edit with cached statistics (prefix generation, key, value optimisation with the default "
             "model's preset, closed form); medians.", "",
             "| method | layer | keys (tokens) | texts | compute statistics (s) | load cached (s) | one edit (s) | "
             "apply + undo (s) |", "|---|---|---|---|---|---|---|---|"]
    for m, layer, count, n, ts, tl, te, ta in rows:
        lines.append(f"| {m} | {layer} | {count:,} | {n:,} | {ts:.2f} | {tl:.4f} | {te:.2f} | {ta:.5f} |")
    emit(lines, args.write)


if __name__ == "__main__":
    main()
