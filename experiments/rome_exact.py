"""Experiment 2b: the editing table with ROME's own algorithm against the default model's preset.

    python experiments/rome_exact.py [--n 100] [--limit N]

On the counterfactual relation dataset, relation-ROME (layer 4) and ROME (layer 0, the subject-tracing
peak) are evaluated with three configurations: ``EditConfig()`` (ROME's code exactly: weight decay
``||delta|| / ||v_init||**2``, early stop on the total loss, KL(edited || original), absolute learning
rate, 10 + 10 context prefixes, asymmetric keys), the same with r-ROME's symmetric keys, and the default
model's preset (``EditConfig.default_model_preset()``, the settings the other experiments use). No
fluency (speed). Writes experiments/results/rome_exact{_quick}.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import relation_lens as rl
from relation_lens.data.counterfact import load_counterfactual
from relation_lens.evaluation import EvaluationResult

OUT = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "ROME's code: EditConfig()": rl.EditConfig(),
    "ROME's code + symmetric keys": rl.EditConfig(key_mode="symmetric"),
    "default model's preset": rl.EditConfig.default_model_preset(),
}
LAYERS = {"relation_rome": 4, "rome": 0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--limit", type=int, default=None, help="quick run with this many records")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n = args.limit or args.n
    model = rl.load_model()
    records = list(load_counterfactual())[:n]
    stats = {layer: rl.KeyStatistics.compute(model, layer, n_texts=2000 if args.limit else 10_000, progress=False)
             for layer in LAYERS.values()}
    start = time.perf_counter()
    lines = [f"# Experiment 2b: ROME's own algorithm vs the default model's preset ({model.cfg.model_name})", "",
             f"{n} records of the counterfactual relation dataset; rates in %, ± 95% interval; no fluency.", "",
             "| config | " + EvaluationResult.header().split("\n")[0][2:], "|---" + EvaluationResult.header().split("\n")[1]]
    for name, config in CONFIGS.items():
        for method, layer in LAYERS.items():
            res = rl.evaluate(model, records, method=method, layer=layer, stats=stats[layer], config=config,
                              fluency=False)
            lines.append(f"| {name} " + res.row() + (f" ({res.n_failed} refused)" if res.n_failed else ""))
    lines += ["", f"Run time {time.perf_counter() - start:.0f} s on this machine."]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rome_exact{'_quick' if args.limit else ''}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
