"""Prompts per second of ``trace_dataset`` on one process and under ``torchrun`` with N processes.

    python benchmarks/bench_scaling.py [--prompts 24] [--procs 1,2] [--device cpu] [--write docs/benchmarks.md]

Each configuration runs the CLI (``python -m relation_lens trace-dataset``; ``torchrun --nproc-per-node N``
for N > 1) on the same facts of the default model's world, in a fresh folder, and is timed as a whole
command (model loading and process start-up included, as a user meets them) and by the tracing alone
(the trace-dataset wall time minus a run of 1 prompt, which pays the same start-up). Every process uses
``--threads`` intra-op threads (default: the cores divided by the processes). On a GPU machine:
``python benchmarks/bench_scaling.py --device cuda --procs 1,2,4,8`` (one GPU per process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, prompts: int, device: str, threads: int) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    args = ["trace-dataset", "--limit", str(prompts), "--samples", "10", "--quiet", "--formats", "png",
            "--device", device, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, "-m", "relation_lens", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(_port()), "-m", "relation_lens", *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, json.loads((out / "trace_dataset.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    from _report import emit, machine

    rows = ["## Dataset tracing on N processes", "",
            f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; default model, {args.prompts} world facts, "
            "relation corruption, 3 kinds, 10 samples, depth-scaled window; the whole CLI command timed "
            "(`benchmarks/bench_scaling.py`).", "",
            "| processes | threads each | command (s) | start-up (s, 1 prompt) | tracing (s) | prompts / s (tracing) | "
            "same result as 1 process |", "|---|---|---|---|---|---|---|"]
    base = None
    for procs in [int(p) for p in args.procs.split(",")]:
        threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
        total, result = run(procs, args.prompts, args.device, threads)
        startup, _ = run(procs, procs, args.device, threads)  # one prompt per process: the fixed costs
        tracing = max(1e-9, total - startup)
        grids = {k: v for k, v in result.items() if k not in ("relation_lens_version", "schema_version")}
        base = base or grids
        rows.append(f"| {procs} | {threads} | {total:.1f} | {startup:.1f} | {tracing:.1f} | "
                    f"{(args.prompts - procs) / tracing:.2f} | {'yes' if grids == base else 'no (thread counts differ)'} |")
    emit(rows, args.write)


if __name__ == "__main__":
    main()
