"""Checks that need a GPU: tracing, packing, knockout and editing on CUDA, and with the model's blocks
split over two devices.

    python benchmarks/gpu_checks.py [--out FILE]

One machine here has one GPU, so the split is made between the CPU and the GPU: the embeddings and
the first half of the blocks on the CPU, the rest, the final norm and the unembedding on the GPU,
with TransformerLens' block-device lookup pointed at where each block actually sits (what
``load_model(..., n_devices=k)`` arranges over k GPUs). This runs the same code path as a split
over GPUs: activations, cached keys/values, clean values and masks moved to each block's device.
Each check prints the largest difference from the single-device run and whether it is within its
tolerance; the script exits non-zero if one is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

import relation_lens as rl

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"
FACTS = [("The Space Needle is located in the city of", "The Space Needle", None),
         ("Paris is the capital of", "Paris", None),
         ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", None)]


def split_cpu_gpu(model):
    """Embeddings and blocks < n/2 on the CPU, the rest on cuda:0; TransformerLens' forward told so."""
    ht = sys.modules["transformer_lens.HookedTransformer"]  # the module (the package's attribute is the class)

    cut = model.cfg.n_layers // 2
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        getattr(model, name).to("cpu")
    for i, block in enumerate(model.blocks):
        block.to("cpu" if i < cut else "cuda")
    model.ln_final.to("cuda")
    model.unembed.to("cuda")
    model.cfg.device = "cpu"  # the first block's device, as cfg.device is cuda:0 under n_devices=k
    ht.get_device_for_block_index = lambda i, cfg, device=None: next(model.blocks[i].parameters()).device
    return model


def grids_gap(a, b):
    return max((a.scores[k].cpu() - b.scores[k].cpu()).abs().max().item() for k in a.scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "checks": []}

    def check(name, gap, tol):
        ok = gap <= tol
        report["checks"].append({"check": name, "max_diff": gap, "tol": tol, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {gap:.2e} (tolerance {tol:g})", flush=True)

    cpu = rl.load_model()
    gpu = rl.load_model(device="cuda")
    settings = dict(n_samples=5, window=3)
    t_cpu = rl.trace(cpu, PROMPT, subject=SUBJECT, **settings)
    t_gpu = rl.trace(gpu, PROMPT, subject=SUBJECT, **settings)
    check("trace on cuda vs cpu (relation, 3 kinds)", grids_gap(t_cpu, t_gpu), 1e-4)

    from relation_lens.tracing.api import trace_packed
    from relation_lens.tracing.config import TraceConfig

    cfg = TraceConfig(**settings)
    items = [(p, s, t, cfg.replace(seed=i)) for i, (p, s, t) in enumerate(FACTS)]
    packed = trace_packed(gpu, items, batch_size=40)
    single = [rl.trace(gpu, p, subject=s, config=c) for p, s, _, c in items]
    check("packed vs per-prompt trace on cuda", max(grids_gap(a, b) for a, b in zip(packed, single)), 5e-6)

    k_gpu = rl.knockout(gpu, PROMPT, subject=SUBJECT, window=3)
    req = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    edit_cfg = dataclasses.replace(rl.EditConfig(), stats_n_texts=500)
    u_gpu = rl.compute_edit(gpu, req, method="relation_rome", layer=2, config=edit_cfg)

    split = split_cpu_gpu(rl.load_model(device="cuda"))
    t_split = rl.trace(split, PROMPT, subject=SUBJECT, **settings)
    check("trace with blocks split cpu|cuda vs all on cuda", grids_gap(t_split, t_gpu), 1e-4)
    packed_split = trace_packed(split, items, batch_size=40)
    check("packed trace, blocks split cpu|cuda", max(grids_gap(a, b) for a, b in zip(packed_split, single)), 1e-4)
    k_split = rl.knockout(split, PROMPT, subject=SUBJECT, window=3)
    check("knockout, blocks split cpu|cuda",
          max((k_split.change[s].cpu() - k_gpu.change[s].cpu()).abs().max().item() for s in k_gpu.change), 1e-4)
    u_split = rl.compute_edit(split, req, method="relation_rome", layer=2, config=edit_cfg)
    d_gpu, d_split = u_gpu.delta(), u_split.delta()
    check("relation-ROME update, blocks split cpu|cuda (relative)",
          ((d_split - d_gpu).norm() / d_gpu.norm()).item(), 1e-3)
    before = {n: p.detach().clone() for n, p in split.named_parameters()}
    edit = rl.apply_edit(split, u_split)
    p_new = torch.softmax(split(PROMPT)[0, -1].float(), -1)[split.to_single_token(" Paris")].item()
    edit.undo()
    check("edit applied on the split model takes (1 - P(new))", 1 - p_new, 0.5)
    check("undo on the split model is bit-exact (max diff)",
          max((p.detach() - before[n]).abs().max().item() for n, p in split.named_parameters()), 0.0)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    sys.exit(0 if all(c["ok"] for c in report["checks"]) else 1)


if __name__ == "__main__":
    main()
