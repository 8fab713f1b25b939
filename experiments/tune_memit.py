"""Choose the default model's MEMIT / relation-MEMIT layers and lambda (``mom2_update_weight``) on the
tuning split (records 400-429 of the shipped counterfactual dataset, disjoint from the records the
experiments report), batches of 10, MEMIT's GPT-2 XL value-optimisation settings otherwise.

    python experiments/tune_memit.py > experiments/results/memit_tuning.md
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import relation_lens as rl  # noqa: E402
from relation_lens.batch_editing import memit_config  # noqa: E402
from relation_lens.data.counterfact import load_counterfactual  # noqa: E402
from relation_lens.evaluation import EvaluationResult, evaluate_batch  # noqa: E402

LAYER_SETS = [(1, 2), (2, 3), (1, 2, 3), (2, 3, 4), (3, 4)]
LAMBDAS = [30.0, 100.0, 300.0]


def main() -> None:
    model = rl.load_model()
    recs = list(load_counterfactual())[400:430]
    stats = {layer: rl.KeyStatistics.compute(model, layer) for layer in range(model.cfg.n_layers)}
    print("# MEMIT settings for the default model (tuning split: records 400-429, batches of 10)\n")
    head, rule = EvaluationResult.header().splitlines()
    print(head + " layers | lambda | time |\n" + rule + "---|---|---|")
    best = {}
    for method in ("memit", "relation_memit"):
        for layers in LAYER_SETS:
            for lam in LAMBDAS:
                t = time.time()
                r = evaluate_batch(model, recs, method=method, batch_size=10, layers=layers, stats=stats,
                                   # the rule the shipped presets were tuned with
                                   config=memit_config(prefix_seeds=None), mom2_update_weight=lam)
                print(r.row(), f"{layers} | {lam:g} | {time.time() - t:.0f}s |", flush=True)
                score = r.summary["Score"][0]
                if score == score and score > best.get(method, (-1,))[0]:
                    best[method] = (score, layers, lam)
    refine(model, recs, stats, best)


def refine(model, recs, stats, best) -> None:
    """While a method's best lambda is the smallest tried, try a third of it on its best layers."""
    print("\nRefinement below the grid's smallest lambda, on each method's best layers:\n")
    head, rule = EvaluationResult.header().splitlines()
    print(head + " layers | lambda | time |\n" + rule + "---|---|---|")
    for method in list(best):
        lam = best[method][2]
        while lam <= min(LAMBDAS) and lam > 1:
            lam = round(lam / 3, 1)
            t = time.time()
            r = evaluate_batch(model, recs, method=method, batch_size=10, layers=best[method][1], stats=stats,
                               # the rule the shipped presets were tuned with
                               config=memit_config(prefix_seeds=None), mom2_update_weight=lam)
            print(r.row(), f"{best[method][1]} | {lam:g} | {time.time() - t:.0f}s |", flush=True)
            score = r.summary["Score"][0]
            if not score > best[method][0]:
                break
            best[method] = (score, best[method][1], lam)
    print()
    for method, (score, layers, lam) in best.items():
        print(f"- {method}: best Score {score:.3f} at layers {layers}, lambda {lam:g}")


if __name__ == "__main__":
    main()
