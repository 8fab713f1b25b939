"""Experiments 3a-3c: the tracing toolkit on the default model, over world facts it gets right.

3a. Attention knockout (Geva et al. 2023) of the subject, relation and last positions: where does
    blocking the last position's attention to each source hurt P(target)? The paper claims attention
    matters where the relation sits; Geva et al. find that relation information reaches the last
    position in earlier layers than the subject's attribute.
3b. Gaussian noise vs symmetric token replacement (Zhang & Nanda 2023) for relation corruption on the
    same prompts: do they localise the same sites? (rank correlation of the layer x bucket mean
    indirect effects, and the peak of each.)
3c. Attribution patching vs the exact engine: per prompt, the rank correlation of the two grids over
    the sites after the corrupted span, per kind, and the time of each.

Writes ``experiments/results/tracing_toolkit{_quick}.md`` and two PNGs.

    python experiments/tracing_toolkit.py [--limit N] [--samples 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import relation_lens as rl
from relation_lens.data import world_trace_facts
from relation_lens.probes import known_mask

OUT = Path(__file__).resolve().parent / "results"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return float("nan")
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def known_facts(model, n: int) -> list[dict]:
    facts = world_trace_facts(limit=4 * n)
    facts = [f for f in facts if f["prompt"].startswith(f["subject"]) and f["prompt"] != f["subject"]]
    knows = known_mask(model, [f["prompt"] for f in facts], [f["target"] for f in facts])
    return [f for f, k in zip(facts, knows) if k][:n]


def knockout_part(model, facts, suffix: str, out: Path) -> list[str]:
    res = rl.knockout_dataset(model, facts, sources=("subject", "relation", "last"))
    res.plot(out / f"tracing_toolkit_knockout{suffix}.png")
    L = model.cfg.n_layers
    lines = ["## 3a. Attention knockout", "",
             f"{sum(res.used)} prompts averaged (of {len(res.results)}); window {res.window}; mean relative change "
             "of P(target) (%) when the last position's attention to the source is blocked around that layer, "
             "with 95% half-widths.", "",
             "| layer | " + " | ".join(f"{s} (n={res.count[s]})" for s in res.sources) + " |",
             "|---" * (len(res.sources) + 1) + "|"]
    for layer in range(L):
        lines.append(f"| {layer} | " + " | ".join(
            f"{100 * res.mean[s][layer]:+.1f} ± {100 * res.ci95[s][layer]:.1f}" for s in res.sources) + " |")
    for s in res.sources:
        worst = int(res.mean[s].argmin())
        lines.append(f"\n- {s}: largest mean drop at layer {worst} ({100 * res.mean[s][worst]:+.1f}%)")
    return lines


def corruption_part(model, facts, samples: int, suffix: str, out: Path) -> list[str]:
    runs = {}
    for how in ("noise", "replace"):
        runs[how] = rl.trace_dataset(model, facts, corrupt_with=how, n_samples=samples, exclude_incorrect=True)
    runs["replace"].plot(out / f"tracing_toolkit_replace{suffix}.png")
    lines = ["## 3b. Noise vs token replacement (relation corrupted)", "",
             f"Noise: {runs['noise'].n_used} prompts averaged; replacement: {runs['replace'].n_used} "
             f"(prompts without a same-length counterfactual in the world are skipped: {len(runs['replace'].skipped)}). "
             "Mean indirect effect on P(target) by layer and bucket; rank correlation of the two layer x bucket grids, "
             "and where each peaks.", "",
             "| kind | Spearman (noise, replace) | noise peak | replacement peak |", "|---|---|---|---|"]
    for kind in ("resid", "mlp", "attn"):
        a, b = runs["noise"].mean[kind], runs["replace"].mean[kind]
        peaks = []
        for grid in (a, b):
            flat = int(torch.nan_to_num(grid, nan=-1e9).argmax())
            layer, bucket = divmod(flat, grid.shape[1])
            peaks.append(f"L{layer} {runs['noise'].buckets[bucket]} ({grid[layer, bucket]:+.3f})")
        lines.append(f"| {kind} | {spearman(a, b):.2f} | {peaks[0]} | {peaks[1]} |")
    return lines


def attribution_part(model, facts, samples: int) -> list[str]:
    rows = {k: [] for k in ("resid", "mlp", "attn")}
    t_exact, t_attr, errs = [], [], {k: [] for k in rows}
    for i, f in enumerate(facts):
        kw = dict(subject=f["subject"], target=f["target"], n_samples=samples, seed=i)
        t = time.perf_counter()
        exact = rl.trace(model, f["prompt"], **kw)
        t_exact.append(time.perf_counter() - t)
        t = time.perf_counter()
        approx = rl.trace(model, f["prompt"], method="attribution", **kw)
        t_attr.append(time.perf_counter() - t)
        a = exact.corrupt_span[0]
        for k in rows:
            rows[k].append(spearman(exact.scores[k][:, a:], approx.scores[k][:, a:]))
            errs[k].append((exact.scores[k] - approx.scores[k]).abs().max().item())
    lines = ["## 3c. Attribution patching vs the exact engine", "",
             f"{len(facts)} prompts, relation corrupted, {samples} noise samples; per prompt, the rank correlation of the "
             "two grids over the sites from the corrupted span on, and the largest absolute error in P(target).", "",
             "| kind | median Spearman | lowest | median max error | largest max error |", "|---|---|---|---|---|"]
    for k in rows:
        r = [x for x in rows[k] if x == x]
        lines.append(f"| {k} | {statistics.median(r):.2f} | {min(r):.2f} | {statistics.median(errs[k]):.3f} | "
                     f"{max(errs[k]):.3f} |")
    lines += ["", f"Time per prompt (median): exact {statistics.median(t_exact) * 1000:.0f} ms, attribution "
              f"{statistics.median(t_attr) * 1000:.0f} ms: {statistics.median(t_exact) / statistics.median(t_attr):.1f}x."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=None, help="quick run on this many facts")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.limit else ""
    model = rl.load_model(args.model)
    facts = known_facts(model, args.limit or 100)
    t = time.perf_counter()
    lines = [f"# Tracing toolkit on {model.cfg.model_name} ({len(facts)} world facts it gets right)", ""]
    lines += knockout_part(model, facts, suffix, args.out) + [""]
    lines += corruption_part(model, facts, args.samples, suffix, args.out) + [""]
    lines += attribution_part(model, facts, args.samples)
    lines += ["", f"Total time {time.perf_counter() - t:.0f} s (`python experiments/tracing_toolkit.py"
              f"{' --limit ' + str(args.limit) if args.limit else ''}`)."]
    (args.out / f"tracing_toolkit{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
