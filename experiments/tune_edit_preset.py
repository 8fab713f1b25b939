"""Choose the editing preset of the default model on a tuning split (records 400-429 of the shipped
counterfactual relation dataset), disjoint from the records the experiments report (0-199).

    python experiments/tune_edit_preset.py > experiments/results/edit_preset_tuning.md
"""
import os
import time

os.environ["HF_HUB_OFFLINE"]="1"
import relation_lens as rl
from relation_lens.data.counterfact import load_counterfactual
from relation_lens.editing import EditConfig, EditRequest, default_layer
from relation_lens.evaluation import EvaluationResult, evaluate

m = rl.load_model()
recs = list(load_counterfactual())[400:430]   # tuning split, disjoint from the evaluation records (first 100-200)
first = recs[0]
layers = {"relation_rome": 4, "rome": default_layer(m, "rome", EditRequest(first["prompt"], first["subject"], first["target_new"], first["target_true"]))}
print("rome layer", layers["rome"])
stats = {L: rl.KeyStatistics.compute(m, L, progress=False) for L in set(layers.values())}
configs = {"rome-defaults": {}, "wd.05-c10-s40": dict(v_weight_decay=0.05, clamp_norm_factor=10, v_steps=40),
           "wd.1-c8-s30": dict(v_weight_decay=0.1, clamp_norm_factor=8, v_steps=30),
           "wd.5-c10-s40": dict(v_weight_decay=0.5, clamp_norm_factor=10, v_steps=40)}
print(EvaluationResult.header())
for name, kw in configs.items():
    for method, L in layers.items():
        t = time.time()
        r = evaluate(m, recs, method=method, layer=L, stats=stats[L], config=EditConfig(**kw), fluency=False)
        print(r.row(), name, f"{time.time()-t:.0f}s", flush=True)
