"""TransformerLens 3 (HookedTransformer) against TransformerLens 4 (TransformerBridge): the same
work on the same weights, one process per line, and the ratio.

    .venv/bin/python benchmarks/bench_lines.py --out hooked.json          # TransformerLens 3.x env
    .venv-tl4/bin/python benchmarks/bench_lines.py --out bridge.json      # TransformerLens 4.x env
    python benchmarks/bench_lines.py --combine hooked.json bridge.json --write docs/benchmarks.md

Each line times, on the embedded default model and on a seeded random LLaMA (d_model 256, 4
layers, grouped-query attention): one ``trace`` (10 noise samples, all kinds), a packed
``trace_dataset`` of 8 prompts, and one relation-ROME ``compute_edit`` (key statistics given).
The fastest of ``--repeats`` runs after one warm-up (this host's timings jitter by tens of percent
from run to run; the fastest is the least disturbed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from _report import emit, machine, median_time  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.model_interface import tokenizer_of  # noqa: E402

FACTS = [("The Space Needle is located in the city of", "The Space Needle"),
         ("Paris is the capital of", "Paris"), ("Germany is located in the continent of", "Germany"),
         ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
         ("Tokyo is the capital of", "Tokyo"), ("Rome is located in the country of", "Rome"),
         ("The Nile flows through the country of", "The Nile"), ("Berlin is the capital of", "Berlin")]


def measure(model, repeats: int) -> dict[str, float]:
    prompt, subject = FACTS[0]
    stats = rl.KeyStatistics.compute(model, 1, n_texts=100, progress=False, cache=False)
    request = rl.EditRequest("{} is located in the city of", subject, "Paris")
    jobs = {
        "trace": lambda: rl.trace(model, prompt, subject=subject, n_samples=10),
        "packed trace_dataset (8 prompts)": lambda: rl.trace_dataset(model, [{"prompt": p, "subject": s} for p, s in FACTS],
                                                                     n_samples=10, pack=4),
        "compute_edit (relation_rome)": lambda: rl.compute_edit(model, request, layer=1, stats=stats),
    }
    out = {}
    for name, fn in jobs.items():
        fn()  # warm-up (and the self-check, once per model)
        times = [median_time(fn, 1)[1] for _ in range(repeats)]
        out[name] = min(times)  # the least disturbed run: this host's timings jitter by tens of percent
    return out


def llama_folder(tokenizer, root: Path) -> Path:
    """A seeded random LLaMA of a medium shape (d_model 256, 4 layers, 8 heads, 2 key/value heads)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=768, max_position_embeddings=128)
    folder = root / "llama-medium"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(out: Path, repeats: int) -> None:
    default = rl.load_model()
    rows = {"line": metadata.version("transformer-lens"), "model_type": type(default).__name__,
            "machine": machine(), "date": str(datetime.date.today()), "times": {}}
    rows["times"]["default model"] = measure(default, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        llama = rl.load_model(llama_folder(tokenizer_of(default), Path(tmp)))
        rows["times"]["random LLaMA, d_model 256, GQA"] = measure(llama, repeats)
    out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


def combine(hooked: Path, bridge: Path, write: Path | None) -> None:
    a, b = json.loads(hooked.read_text()), json.loads(bridge.read_text())
    lines = [f"### TransformerBridge (TransformerLens {b['line']}) vs HookedTransformer (TransformerLens {a['line']}) "
             f"— {b['date']} — {b['machine']}", "",
             "One process per line, the same weights; fastest of the repeats, seconds; ratio = bridge / HookedTransformer.", "",
             "| model | work | HookedTransformer | TransformerBridge | ratio |", "|---|---|---|---|---|"]
    for model, times in a["times"].items():
        for work, t in times.items():
            u = b["times"][model][work]
            lines.append(f"| {model} | {work} | {t:.3f} | {u:.3f} | {u / t:.2f}x |")
    emit(lines, write)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--combine", nargs=2, type=Path)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.combine:
        combine(*args.combine, args.write)
    else:
        run(args.out or Path("lines.json"), args.repeats)


if __name__ == "__main__":
    main()
