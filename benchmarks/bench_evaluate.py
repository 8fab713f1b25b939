"""Measuring CounterFact records: batched reads against one forward per (prompt, target) pair, same process.

    python benchmarks/bench_evaluate.py [--n 200] [--write docs/benchmarks.md]

On the default model, the first n evaluation records of the shipped counterfactual dataset (each:
the prompt, its paraphrases, neighbourhood and relation prompts, each with two targets): (a) the
baseline, one teacher-forced forward per pair (how ``target_probs`` worked before), written out
here; (b) ``records_metrics``, every pair of the n records in right-padded batches of similar
length. Reported: seconds per record, the speed-up, and the largest probability difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    from _report import emit, machine

    import relation_lens as rl
    from relation_lens.data.counterfact import evaluation_records
    from relation_lens.evaluation import records_metrics
    from relation_lens.probes import target_probs
    from relation_lens.spans import object_tokens

    model = rl.load_model()
    recs = evaluation_records(n=args.n)
    prompts, targets = [], []
    for r in recs:
        for p in [r["prompt"].format(r["subject"])] + list(r["paraphrase_prompts"]):
            prompts += [p, p]
            targets += [r["target_new"], r["target_true"]]
        for ps, ts in ((r["neighborhood_prompts"], r["neighborhood_targets"]),
                       (r["relation_prompts"], r["relation_targets"])):
            for p, t in zip(ps, ts):
                prompts += [p, p]
                targets += [t, r["target_new"]]

    @torch.no_grad()
    def one_pair_at_a_time():
        out = []
        for p, t in zip(prompts, targets):
            ctx = model.to_tokens(p)[0]
            tgt = object_tokens(model, p, t)
            logits = model(torch.cat([ctx, tgt[:-1]])[None])[0]
            logp = logits[len(ctx) - 1:].float().log_softmax(-1)
            out.append(logp.gather(1, tgt[:, None]).mean().exp())
        return torch.stack(out)

    t = time.perf_counter()
    base = one_pair_at_a_time()
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    batched = target_probs(model, prompts, targets)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    records_metrics(model, recs)
    t_records = time.perf_counter() - t
    diff = (base - batched).abs().max().item()
    rows = ["## Measuring CounterFact records: batched probability reads", "",
            f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; default model, {args.n} evaluation records, "
            f"{len(prompts)} (prompt, target) pairs (`benchmarks/bench_evaluate.py`).", "",
            "| how | seconds | ms / record | speed-up |", "|---|---|---|---|",
            f"| one forward per pair (before) | {t_base:.1f} | {1000 * t_base / args.n:.1f} | 1.00x |",
            f"| target_probs, batches of 64 | {t_batched:.1f} | {1000 * t_batched / args.n:.1f} | "
            f"{t_base / t_batched:.1f}x |",
            f"| records_metrics (the metrics too) | {t_records:.1f} | {1000 * t_records / args.n:.1f} | "
            f"{t_base / t_records:.1f}x |", "",
            f"Largest probability difference between the two: {diff:.2e}."]
    emit(rows, args.write)


if __name__ == "__main__":
    main()
