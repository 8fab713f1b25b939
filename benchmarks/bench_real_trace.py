"""The tracing engine on a real model against nnsight's per-cell loop and the naive TransformerLens loop,
in one process, on the same prompt, cells and noise (``bench_trace.py --model NAME`` runs this).

    python benchmarks/bench_trace.py --model smollm2-135m [--dtypes float32 bfloat16] [--write docs/benchmarks.md]

Three ways to the same grid (3 kinds, ``--samples`` noise samples, window ``--window``, relation corrupted):

* ``engine``: ``relation_lens.trace``;
* ``nnsight``: the loop of nnsight's causal-tracing tutorial on the Hugging Face model relation_lens
  converted (the same weights): per cell one traced forward of the clean row and the noised rows, the
  noise added to ``embed_tokens``' output, the cell's clean activations (the decoder layer's output, the
  MLP's output or the attention's output, the window's layers) written into the noised rows;
* ``naive``: the oracle the engine is tested against (``tests/oracle.py``): ``run_with_hooks`` per cell.

The noise is the engine's own (``make_noise``, seed 0), so the three grids agree to float32 rounding
(checked and reported: the largest difference from the engine's grid). The baselines run every
(kind, layer, position) cell, as the tutorial does; the engine runs none before the corrupted span
(their score is the corrupted value). ``--baseline-cells K`` times each baseline on K evenly spaced
cells and scales its per-cell time to the grid (each of its cells is one forward of the same batch):
quick runs; the published table uses every cell. ``nnsight`` is an optional dependency of the
benchmarks (``pip install nnsight``), not of the library.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import emit, machine  # noqa: E402
from oracle import naive_trace, window  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.tracing import make_noise  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
KINDS = ("resid", "mlp", "attn")


def hf_twin(name: str, dtype: torch.dtype):
    """The Hugging Face model and tokenizer that relation_lens converted ``name`` from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relation_lens.models.gguf import PACKAGED, gguf_folder, packaged_file

    folder = gguf_folder(packaged_file(name)) if name in PACKAGED else Path(name)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return hf, AutoTokenizer.from_pretrained(folder)


def cells(L: int, T: int) -> list[tuple[str, int, int]]:
    return [(k, layer, p) for k in KINDS for layer in range(L) for p in range(T)]


def nnsight_grid(lm, tokens, span, noise, target, todo, w):
    """The tutorial's loop over ``todo`` cells: ``{cell: mean P(target) over the noised rows}``."""
    batch = tokens[None].expand(noise.shape[0] + 1, -1)
    layers = lm.model.layers
    out = {}
    for kind, layer, p in todo:
        restored = [layer] if kind == "resid" else list(window(layer, w, len(layers)))
        with torch.no_grad(), lm.trace(batch):
            emb = lm.model.embed_tokens.output
            emb[1:, span[0]:span[1]] += noise.to(emb.dtype)
            for j in restored:
                h = layers[j].output if kind == "resid" else layers[j].mlp.output if kind == "mlp" else \
                    layers[j].self_attn.output[0]
                h[1:, p] = h[0, p]
            prob = lm.lm_head.output[1:, -1].float().softmax(-1)[:, target].mean().save()
        out[(kind, layer, p)] = float(prob)
    return out


def naive_cells(model, tokens, span, noise, target, todo, w):
    """The oracle's loop over ``todo`` cells (its grid function restricted to them)."""
    grids, _ = naive_trace(model, tokens, span, noise, target, kinds=KINDS, w=w, cells=set(todo))
    return {(k, layer, p): grids[k][layer, p].item() for k, layer, p in todo}


def _evenly(todo: list, k: int | None) -> list:
    if not k or k >= len(todo):
        return todo
    step = len(todo) / k
    return [todo[int(i * step)] for i in range(k)]


def _clock() -> float:
    """Seconds, after the GPU (if any) has finished what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(name: str, dtype: torch.dtype, samples: int, w: int, repeats: int, baseline_cells: int | None,
            baselines: tuple[str, ...], device: str = "cpu") -> dict:
    model = rl.load_model(name, dtype=dtype, device=device)
    kw = dict(subject=SUBJECT, corrupt="relation", n_samples=samples, window=w, progress=False)
    res = rl.trace(model, PROMPT, **kw)
    tokens = model.to_tokens(PROMPT)[0]  # the model's own BOS rule, as the trace's
    assert len(tokens) == len(res.tokens), (len(tokens), res.tokens)
    L, T = model.cfg.n_layers, len(tokens)
    span = res.corrupt_span
    noise, _ = make_noise(model, samples, span[1] - span[0], None, 0)
    times = []
    for _ in range(repeats):
        t = _clock()
        rl.trace(model, PROMPT, **kw)
        times.append(_clock() - t)
    row = {"dtype": str(dtype).replace("torch.", ""), "tokens": T, "layers": L, "cells": 3 * L * T,
           "engine_cells": 3 * L * (T - span[0]), "engine_s": sorted(times)[len(times) // 2],
           "clean": res.clean_value, "corrupted": res.corrupted_value, "span": span}
    everything = cells(L, T)
    todo = _evenly(everything, baseline_cells)
    row["baseline_cells"] = len(todo)
    if "nnsight" in baselines:
        from nnsight import LanguageModel

        hf, tok = hf_twin(name, dtype)
        lm = LanguageModel(hf.to(device), tokenizer=tok)
        t = _clock()
        got = nnsight_grid(lm, tokens, span, noise, res.target_token, todo, w)
        row["nnsight_s"] = (_clock() - t) * len(everything) / len(todo)
        row["nnsight_diff"] = max(abs(v - res.scores[k][l, p].item()) for (k, l, p), v in got.items())
        del lm, hf
    if "naive" in baselines:
        t = _clock()
        got = naive_cells(model, tokens, span, noise, res.target_token, todo, w)
        row["naive_s"] = (_clock() - t) * len(everything) / len(todo)
        row["naive_diff"] = max(abs(v - res.scores[k][l, p].item()) for (k, l, p), v in got.items())
    if "naive-tl" in baselines:  # the same loop on the model as TransformerLens lays it out (a copy per call)
        import copy

        plain = copy.deepcopy(model)
        for p in plain.parameters():
            p.data = p.data.contiguous()
        t = _clock()
        got = naive_cells(plain, tokens, span, noise, res.target_token, todo, w)
        row["naive_tl_s"] = (_clock() - t) * len(everything) / len(todo)
        del plain
    row["scores"] = {k: v.float() for k, v in res.scores.items()}
    return row


def profile_lines(name: str, samples: int, w: int, top: int = 8) -> list[str]:
    """Where one float32 trace spends its time: torch's profiler, the operators with the most self time,
    and how much of it copies memory (``aten::copy_``; a weight-sized copy is one of a weight per call)."""
    from torch.profiler import profile

    model = rl.load_model(name)
    kw = dict(subject=SUBJECT, corrupt="relation", n_samples=samples, window=w, progress=False)
    rl.trace(model, PROMPT, **kw)
    with profile() as prof:
        rl.trace(model, PROMPT, **kw)
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops)
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    lines = ["", f"Where the float32 engine's time goes (torch profiler, aten operators' self time, {total / 1e6:.1f} s "
                 "in all):", "", "| operator | share | calls |", "|---|---|---|"]
    lines += [f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count:,} |" for e in ops[:top]]
    return lines


def run(name: str, dtypes: list[str], samples: int, w: int, repeats: int, baseline_cells: int | None,
        baselines: tuple[str, ...], write: Path | None, profile: bool = False, device: str = "cpu") -> None:
    torch.set_grad_enabled(False)
    rows = [measure(name, getattr(torch, d), samples, w, repeats, baseline_cells, baselines, device) for d in dtypes]
    lines = [f"### {name}: engine vs nnsight and the naive loop — {datetime.date.today()} — {machine()}", "",
             f"Prompt {PROMPT!r}, relation corrupted (tokens {rows[0]['span'][0]}:{rows[0]['span'][1]}), 3 kinds, "
             f"{samples} noise samples (the engine's, seed 0, given to all three), window {w}; engine: median of "
             f"{repeats}. The baselines run every cell (kind x layer x position, as nnsight's tutorial does); the "
             "engine runs none before the corrupted span. "
             + ("Baselines timed on every cell." if rows[0]["baseline_cells"] == rows[0]["cells"] else
                f"Baselines timed on {rows[0]['baseline_cells']} evenly spaced cells of {rows[0]['cells']} and "
                "scaled to the grid (a quick run)."), "",
             "| dtype | cells (engine runs) | engine (s) | nnsight loop (s) | engine vs nnsight | naive TL loop (s) | "
             "engine vs naive | max abs diff nnsight / naive vs engine | P clean / corrupted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nn_s, nv_s, eng = r.get("nnsight_s"), r.get("naive_s"), r["engine_s"]
        nn_col = "— | —" if nn_s is None else f"{nn_s:.1f} | **{nn_s / eng:.1f}x**"
        nv_col = "— | —" if nv_s is None else f"{nv_s:.1f} | **{nv_s / eng:.1f}x**"
        lines.append(f"| {r['dtype']} | {r['cells']} ({r['engine_cells']}) | {eng:.2f} | {nn_col} | {nv_col} | "
                     f"{r.get('nnsight_diff', float('nan')):.1e} / {r.get('naive_diff', float('nan')):.1e} | "
                     f"{r['clean']:.4f} / {r['corrupted']:.5f} |")
    for r in rows:
        if "naive_tl_s" in r:
            lines += ["", f"{r['dtype']}: the naive loop on the model as TransformerLens 3 lays its weights out (a copy of "
                          f"every weight per block call; relation_lens' load_model stores them as the forward reads "
                          f"them, docs/models.md): {r['naive_tl_s']:.1f} s, the engine **{r['naive_tl_s'] / r['engine_s']:.1f}x** "
                          "faster."]
    if len(rows) > 1:
        ref = rows[0]
        for r in rows[1:]:
            diff = max((r["scores"][k] - ref["scores"][k]).abs().max().item() for k in KINDS)
            lines += ["", f"{r['dtype']} against {ref['dtype']}: engine {ref['engine_s'] / r['engine_s']:.2f}x; "
                          f"largest cell difference {diff:.4f} (P clean {r['clean']:.4f} vs {ref['clean']:.4f})."]
    if profile and device == "cpu":
        lines += profile_lines(name, samples, w)
    emit(lines, write)
