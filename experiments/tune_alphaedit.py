"""AlphaEdit on the default model: the eigenvalues of its key statistics, and single relation-MEMIT edits
(tuning records 400-411, disjoint from the reported ones) for thresholds and l2 values. AlphaEdit's
GPT-2 XL l2 (10) is too strong for the small model's keys; its threshold (2e-2) leaves a null space.

    python experiments/tune_alphaedit.py > experiments/results/alphaedit_tuning.md
"""
import itertools

import torch

import relation_lens as rl
from relation_lens.batch_editing import Preserve, batch_defaults, memit_config
from relation_lens.data.counterfact import load_counterfactual
from relation_lens.probes import target_probs

m = rl.load_model()
recs = list(load_counterfactual())[400:412]
for l in range(6):
    ev = torch.linalg.eigvalsh(rl.KeyStatistics.compute(m, l).moment)
    print(l, "eig quantiles", [f"{ev.quantile(q).item():.2e}" for q in (0.1, 0.5, 0.9, 0.99)], f"max {ev.max():.2e}")
# ROME's template rule, as section 5 of docs/experiments.md was made
layers, cfg, lam = batch_defaults(m, "relation_memit", None, memit_config(prefix_seeds=None), None)
stats = {l: rl.KeyStatistics.compute(m, l) for l in layers}
for thr, l2 in itertools.product([2e-2, 1e-3, 1e-4, 1e-5], [10, 1, 0.1]):
    es = []
    for r in recs:
        req = rl.EditRequest(r["prompt"], r["subject"], r["target_new"], r["target_true"])
        try:
            u = rl.compute_edit(m, [req], method="relation_memit", stats=stats, config=cfg, preserve=Preserve(threshold=thr, l2=l2))
        except rl.EditError:
            continue
        with rl.apply_edit(m, u):
            p = target_probs(m, [req.text] * 2, [req.target_new, req.target_true])
        es.append(float(p[0] > p[1]))
    P = Preserve(threshold=thr).projector(stats[4])
    print(thr, l2, "null dim", int(P.trace().round()), "ES", sum(es) / len(es))
