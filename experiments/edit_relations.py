"""Experiment 2: ROME vs relation-ROME, on the counterfactual relation dataset and on CounterFact.

* Main table: both methods at their default layers (relation-ROME: 4, the 5th MLP; ROME: the layer
  where subject tracing peaks), plus the unedited model, on (a) the counterfactual relation dataset
  shipped for the default model (or built for ``--model``) and (b) ROME's CounterFact records
  (``counterfact-train.json``, MEND layout), with ES, PS, NS, RS, Score and fluency (95% intervals).
* Layer sweep: both methods at every layer on a subset of (a), without fluency.

Writes ``experiments/results/edit_relations{_quick}.md`` and ``edit_relations_sweep{_quick}.png``.

    python experiments/edit_relations.py [--model default] [--n 100] [--sweep-n 30] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.data.counterfact import build_counterfactual, load_counterfactual  # noqa: E402
from relation_lens.data.loaders import load_counterfact  # noqa: E402
from relation_lens.editing import EditRequest, default_layer  # noqa: E402
from relation_lens.evaluation import EvaluationResult, evaluate  # noqa: E402
from relation_lens.models import DEFAULT_MODEL_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=100, help="records per dataset in the main table")
    ap.add_argument("--sweep-n", type=int, default=30, help="records per layer in the sweep")
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many records everywhere")
    ap.add_argument("--stats-texts", type=int, default=None,
                    help="texts for key statistics (default 10,000; 2,000 with --limit)")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n, sweep_n = (args.limit, args.limit) if args.limit else (args.n, args.sweep_n)
    n_texts = args.stats_texts or (2000 if args.limit else 10_000)
    suffix = "_quick" if args.limit else ""
    model = rl.load_model(args.model)
    start = time.perf_counter()
    if model.cfg.model_name == DEFAULT_MODEL_NAME:
        relational = list(load_counterfactual())
    else:
        relational = build_counterfactual(model, n=n)
    datasets = {"counterfactual relation dataset": relational[:n],
                "CounterFact (ROME)": list(load_counterfact(args.shared / "rome" / "counterfact-train.json", limit=n))}
    first = relational[0]
    layers = {"relation_rome": default_layer(model, "relation_rome"),
              "rome": default_layer(model, "rome", EditRequest(first["prompt"], first["subject"], first["target_new"],
                                                               first["target_true"]))}
    stats = {}

    def stats_for(layer):
        if layer not in stats:
            stats[layer] = rl.KeyStatistics.compute(model, layer, n_texts=n_texts, progress=False)
        return stats[layer]

    lines = [f"# Experiment 2: ROME vs relation-ROME ({model.cfg.model_name})", "",
             f"Default layers: relation-ROME {layers['relation_rome']}, ROME {layers['rome']} (subject-tracing peak "
             f"on the first record). Rates in %, ± 95% interval; fluency in bits.", ""]
    for name, records in datasets.items():
        lines += [f"## {name}: {len(records)} records", "", EvaluationResult.header()]
        for method in ("none", "relation_rome", "rome"):
            layer = layers.get(method)
            res = evaluate(model, records, method=method, layer=layer,
                           stats=stats_for(layer) if layer is not None else None, progress=not args.limit)
            lines.append(res.row() + (f" ({res.n_failed} refused)" if res.n_failed else ""))
        lines.append("")
    sweep = {m: [] for m in ("relation_rome", "rome")}
    lines += [f"## Layer sweep: {sweep_n} records of the counterfactual relation dataset, no fluency", "",
              EvaluationResult.header()]
    for method in sweep:
        for layer in range(model.cfg.n_layers):
            res = evaluate(model, relational[:sweep_n], method=method, layer=layer, stats=stats_for(layer),
                           fluency=False)
            sweep[method].append(res.summary)
            lines.append(res.row())
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), constrained_layout=True)
    for ax, metric in zip(axes, ("ES", "PS", "NS", "RS")):
        for method, rows in sweep.items():
            ax.errorbar(range(len(rows)), [r[metric][0] for r in rows], yerr=[r[metric][1] for r in rows],
                        marker="o", capsize=2, label=method)
        ax.set_title(metric)
        ax.set_xlabel("edited MLP layer")
        ax.set_ylim(-5, 105)
    axes[0].legend()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"edit_relations_sweep{suffix}.png", dpi=130)
    plt.close(fig)
    lines += ["", f"![layer sweep](edit_relations_sweep{suffix}.png)", "",
              f"Run time: {time.perf_counter() - start:.0f} s."]
    (args.out / f"edit_relations{suffix}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
