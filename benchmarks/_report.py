"""Shared by the benchmark scripts: the machine description and the printed/appended report."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {'CUDA' if torch.cuda.is_available() else 'no GPU'}")


def median_time(fn, repeats: int):
    """(last result, median seconds) of ``repeats`` calls."""
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def emit(lines: list[str], write: Path | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        with open(write, "a") as fh:
            fh.write("\n" + text)
