"""Peak memory of ``load_model`` on a local folder, against the size of the float32 weights.

    python benchmarks/bench_load_memory.py [--shape medium] [--write docs/benchmarks.md]
    python benchmarks/bench_load_memory.py --model smollm2-135m [--write docs/benchmarks.md]

Writes a randomly initialised GPT-2 of the given shape (``medium``: 24 layers, d_model 1024, 355M
parameters, as GPT-2 medium) with ``save_pretrained`` into a temporary folder, then loads it with
``relation_lens.load_model`` in a fresh subprocess and reports that process's peak resident memory
(``VmHWM``) over the float32 weights' size, and over a baseline subprocess that only imports
the libraries. ``--model smollm2-135m`` loads SmolLM2-135M from its GGUF file instead, twice in fresh
processes over an empty cache: the first load dequantizes and writes the cached folder, the second reads it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"small": dict(n_layer=12, n_embd=768, n_head=12), "medium": dict(n_layer=24, n_embd=1024, n_head=16)}
# VmHWM is the peak resident memory of the process's own address space (reset by exec); ru_maxrss is
# not: Linux carries the parent's peak over into a forked child, which inflated both readings before
PROBE = """
import re, sys, time
def hwm_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
import relation_lens as rl, transformer_lens, transformers
base = hwm_kb()
if sys.argv[1] != "-":
    t = time.perf_counter(); rl.load_model(sys.argv[1]); print("seconds", time.perf_counter() - t)
print("peak_kb", hwm_kb(), "base_kb", base)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="medium", choices=sorted(SHAPES))
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--model", default=None, help="smollm2-135m: a GGUF load (first, converting; then cached)")
    args = ap.parse_args()
    if args.model:
        gguf(args.model, args.write)
        return
    import transformers as T
    from _report import emit, machine

    from relation_lens.models import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        cfg = T.GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[args.shape])
        model = T.GPT2LMHeadModel(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        T.AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp)
        out = subprocess.run([sys.executable, "-c", PROBE, tmp], capture_output=True, text=True, check=True,
                             env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.split()
        empty = subprocess.run([sys.executable, "-c", PROBE, "-"], capture_output=True, text=True, check=True,
                               env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.split()
    peak = int(out[out.index("peak_kb") + 1]) * 1024
    base = int(empty[empty.index("peak_kb") + 1]) * 1024
    seconds = float(out[out.index("seconds") + 1])
    weights = n_params * 4
    emit([f"## Loading memory ({args.shape}-shaped GPT-2)", "",
          f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; a random GPT-2 {args.shape} shape ({n_params:,} "
          f"parameters, {weights / 2**30:.2f} GiB in float32) saved by transformers, loaded by `rl.load_model(folder)` "
          "in a fresh process (`benchmarks/bench_load_memory.py`).", "",
          "| peak RSS (GiB) | of which the libraries alone (GiB) | load peak above the libraries / weights | load time (s) |",
          "|---|---|---|---|",
          f"| {peak / 2**30:.2f} | {base / 2**30:.2f} | {(peak - base) / weights:.2f}x | {seconds:.1f} |"], args.write)


def gguf(name: str, write: Path | None) -> None:
    import os

    from _report import emit, machine

    from relation_lens.models.files import stored_parameter_count
    from relation_lens.models.gguf import gguf_folder, packaged_file

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "RELATION_LENS_CACHE": cache}
        empty = subprocess.run([sys.executable, "-c", PROBE, "-"], capture_output=True, text=True, check=True,
                               env=env).stdout.split()
        base = int(empty[empty.index("peak_kb") + 1]) * 1024
        for what in ("first load (dequantize, write the cached folder)", "cached load"):
            out = subprocess.run([sys.executable, "-c", PROBE, name], capture_output=True, text=True, check=True,
                                 env=env).stdout.split()
            rows.append((what, int(out[out.index("peak_kb") + 1]) * 1024, float(out[out.index("seconds") + 1])))
        os.environ["RELATION_LENS_CACHE"] = cache
        n_params = stored_parameter_count(gguf_folder(packaged_file(name)))
    weights = n_params * 4
    lines = [f"## Loading memory ({name}, GGUF)", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; `rl.load_model({name!r})` in a fresh process, "
             f"twice over an empty cache ({n_params:,} parameters as stored, {weights / 2**30:.2f} GiB in float32; "
             "`benchmarks/bench_load_memory.py --model`).", "",
             "| load | peak RSS (GiB) | libraries alone (GiB) | peak above the libraries / weights | time (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {what} | {peak / 2**30:.2f} | {base / 2**30:.2f} | {(peak - base) / weights:.2f}x | {sec:.1f} |"
              for what, peak, sec in rows]
    emit(lines, write)


if __name__ == "__main__":
    main()
