"""Time this checkout's tracing engine against the engine of another git revision, in one process.

    python benchmarks/bench_engine_versions.py REV [--repeats 7] [--device cpu] [--write docs/benchmarks.md]

``relation_lens/tracing.py`` is read from ``REV`` (``git show``) and loaded as a separate module
beside the current one; both trace the same prompt on the default model with the same settings,
alternating run by run so that drifts of the machine hit both alike. The two must give the same
numbers (checked); the result is the ratio of their median times.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import emit, machine  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens import tracing  # noqa: E402

PROMPT, SUBJECT = "Space Needle is located in the city of", "Space Needle"


def load_revision(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:relation_lens/tracing.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "tracing_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tracing_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision whose engine is the baseline")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    old = load_revision(args.rev)
    label = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.strip()
    model = rl.load_model(device=args.device)
    times = {"baseline": [], "current": []}
    results = {}
    for _ in range(args.repeats):
        for name, module in (("baseline", old), ("current", tracing)):
            start = time.perf_counter()
            results[name] = module.trace(model, PROMPT, subject=SUBJECT, n_samples=10, window=10)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    diff = max((results["baseline"].scores[k] - results["current"].scores[k]).abs().max().item()
               for k in results["current"].scores)
    if diff > 1e-5:
        raise SystemExit(f"the two engines disagree by {diff:.2e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    emit([f"### Engine against revision {label} — {datetime.date.today()} — {machine()}", "",
          f"Default model, prompt {PROMPT!r}, 3 kinds, 10 noise samples, window 10; {args.repeats} runs each, "
          "alternating; medians.", "",
          "| engine | median (s) | min (s) |", "|---|---|---|",
          f"| revision {label} | {med['baseline']:.3f} | {min(times['baseline']):.3f} |",
          f"| this checkout | {med['current']:.3f} | {min(times['current']):.3f} |", "",
          f"Ratio baseline / current: **{med['baseline'] / med['current']:.2f}x**; max abs difference of the "
          f"grids {diff:.1e}."], args.write)


if __name__ == "__main__":
    main()
