"""Re-measure the shipped default model's accuracy (training and held-out templates) into metrics.json,
keeping the training run's settings and log.

    python experiments/default_model/evaluate_model.py
"""

from __future__ import annotations

import json

import torch
from train import ROOT, load_world, measure
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

MODEL = ROOT / "relation_lens" / "data" / "default_model"


def main() -> None:
    torch.set_num_threads(2)
    facts, relations = load_world()
    model = GPT2LMHeadModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = GPT2TokenizerFast.from_pretrained(MODEL)
    metrics = json.loads((MODEL / "metrics.json").read_text())
    metrics.update(measure(model, tok, facts, relations))
    (MODEL / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print({k: v for k, v in metrics.items() if k not in ("per_relation", "log")})


if __name__ == "__main__":
    main()
