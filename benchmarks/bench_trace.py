"""Time the tracing engine against the naive one-run-per-site loop, in one process.

    python benchmarks/bench_trace.py [--repeats 3] [--write docs/benchmarks.md]
    python benchmarks/bench_trace.py --model smollm2-135m [--write docs/benchmarks.md]   # a real model

For each model (the embedded default model, and a randomly initialised GPT-2-small-shaped model),
a 12-token prompt and both corruptions (the relation, and the subject as in ROME) it times:

* ``naive``: the ROME procedure, one forward pass of batch 1 + n_samples per (kind, layer, position)
  (``tests/oracle.py``, the oracle the engine is tested against);
* ``engine``: ``relation_lens.trace`` (same numbers, checked here too);
* ``tl.patching``: ``transformer_lens.patching``'s single-site activation patching (resid_pre,
  attn_out, mlp_out per layer and position) with the same noise, where it applies: it has no
  windowed restoration, so it is compared on single sites only.

It also counts the arithmetic (matmul FLOPs) each approach does, so the measured speed-up can be
read against what skipping work can give at most. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from _report import emit, machine, median_time  # noqa: E402
from oracle import naive_trace  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.tracing import make_noise, window_layers  # noqa: E402

PROMPT = "Space Needle is located in the city of"
SUBJECT = "Space Needle"


def random_gpt2(tokenizer, device: str, *, n_layers: int, n_heads: int, d_head: int, name: str, n_ctx: int = 1024,
                d_vocab: int = 50257, act_fn: str = "gelu_new", normalization_type: str = "LN"):
    """A randomly initialised GPT-2-architecture model (d_model = n_heads x d_head, d_mlp = 4 x d_model)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d_model = n_heads * d_head
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                                  d_mlp=4 * d_model, n_ctx=n_ctx, d_vocab=d_vocab, act_fn=act_fn,
                                  normalization_type=normalization_type, seed=0, model_name=name,
                                  default_prepend_bos=True, device=device)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def gpt2_small_shaped(tokenizer, device: str):
    return random_gpt2(tokenizer, device, n_layers=12, n_heads=12, d_head=64, name="gpt2-small-shaped-random")


def gpt2_xl_depth(tokenizer, device: str):
    """GPT-2 XL's depth, heads and vocabulary at 1/8 of its width (d_head 8): only its torch calls are
    counted, and they do not depend on the width."""
    return random_gpt2(tokenizer, device, n_layers=48, n_heads=25, d_head=8, name="gpt2-xl-depth-random")


def flops(model, T: int, n: int, window: int, span: tuple[int, int]) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the naive loop and of the engine for a full 3-kind grid."""
    c = model.cfg
    d, dm, L, V = c.d_model, c.d_mlp, c.n_layers, c.d_vocab

    def layer(tokens: int, ctx: int) -> float:  # one block on `tokens` new positions attending to `ctx` keys
        return 2 * tokens * (4 * d * d + 2 * d * dm) + 2 * 2 * tokens * ctx * d

    full = L * layer(T, T)
    naive_cells = 3 * L * T
    naive = naive_cells * (n + 1) * (full + 2 * T * d * V)
    engine = full + 2 * T * d * V + n * (full + 2 * d * V)  # clean run, corrupted run
    for kind in ("resid", "mlp", "attn"):
        for l in range(L):
            start = l + 1 if kind == "resid" else window_layers(l, window, L).start
            for p in range(span[0], T):  # sites before the corrupted span are not run
                engine += n * ((L - start) * layer(T - p, T) + 2 * d * V)
    return {"naive": naive, "engine": engine}


def time_it(fn, repeats: int) -> float:
    return median_time(fn, repeats)[1]


# reads of a tensor's metadata (shape, device, dtype...) launch nothing: not counted
METADATA = {"__get__", "size", "dim", "numel", "stride", "is_floating_point", "is_contiguous", "__len__",
            "data_ptr", "element_size", "get_device"}


def torch_calls(fn) -> int:
    """How many torch functions and tensor methods ``fn`` calls, metadata reads left out: on a GPU
    most launch a kernel or more (views launch none; they are counted on both sides), so when the chip idles between small launches (the naive loop's case) the time follows
    this count. Counted with ``torch.overrides.TorchFunctionMode``; the count depends on the depth,
    the prompt and the code path, not on the width or the device."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") not in METADATA:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def narrow_twin(model):
    """A random model of the same depth, heads, vocabulary and layer types at d_head 8: the same torch
    calls as ``model`` (checked on the default model), counted in seconds instead of minutes."""
    c = model.cfg
    return random_gpt2(model.tokenizer, c.device, n_layers=c.n_layers, n_heads=c.n_heads, d_head=8,
                       name="narrow-twin", n_ctx=c.n_ctx, d_vocab=c.d_vocab, act_fn=c.act_fn,
                       normalization_type=c.normalization_type)


def launch_proxy(model, corrupt, n=10, window=10, naive: bool = True) -> tuple[int | None, int]:
    """(naive, engine) torch calls for the full grid on ``model`` (naive None when not counted: it is
    the same for every corruption, one run per site either way)."""
    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=n, window=window, corrupt=corrupt)
    noise, _ = make_noise(model, n, res.corrupt_span[1] - res.corrupt_span[0], None, 0)
    tokens = model.to_tokens(PROMPT)[0]
    naive = None if not naive else torch_calls(
        lambda: naive_trace(model, tokens, res.corrupt_span, noise, res.target_token, w=window))
    engine = torch_calls(lambda: rl.trace(model, PROMPT, subject=SUBJECT, n_samples=n, window=window,
                                          corrupt=corrupt))
    return naive, engine


def tl_patching(model, tokens, span, noise, target):
    from transformer_lens import patching

    n = noise.shape[0]
    clean_tokens = tokens[None].expand(n, -1)
    _, clean_cache = model.run_with_cache(clean_tokens)

    def add_noise(act, hook):
        act = act.clone()
        act[:, span[0]:span[1]] += noise
        return act

    def metric(logits):
        return logits[:, -1].softmax(-1)[:, target].mean()

    with model.hooks(fwd_hooks=[("hook_embed", add_noise)]):
        return [fn(model, clean_tokens, clean_cache, metric) for fn in (
            patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out, patching.get_act_patch_mlp_out)]


def _quiet_tqdm():
    """transformer_lens.patching draws a progress bar per call; keep the benchmark's output readable."""
    import transformer_lens.patching as p
    from tqdm.auto import tqdm

    p.tqdm = partial(tqdm, disable=True)


def run(name, model, repeats, corrupt, n=10, window=10, with_tl=True, count_on=None, counts=True):
    tokens = model.to_tokens(PROMPT)[0]
    T = len(tokens)
    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=n, window=window, corrupt=corrupt)
    noise, _ = make_noise(model, n, res.corrupt_span[1] - res.corrupt_span[0], None, 0)
    grids, _ = naive_trace(model, tokens, res.corrupt_span, noise, res.target_token, w=window)
    err = max((grids[k] - res.scores[k]).abs().max().item() for k in grids)
    t_engine = time_it(lambda: rl.trace(model, PROMPT, subject=SUBJECT, n_samples=n, window=window,
                                        corrupt=corrupt), repeats)
    t_naive = time_it(lambda: naive_trace(model, tokens, res.corrupt_span, noise, res.target_token, w=window),
                      max(1, repeats - 2))
    t_tl = float("nan")
    if with_tl:  # its cost does not depend on what is corrupted: once per model
        with torch.no_grad():
            t_tl = time_it(lambda: tl_patching(model, tokens, res.corrupt_span, noise, res.target_token),
                           max(1, repeats - 2))
    f = flops(model, T, n, window, res.corrupt_span)
    calls_naive, calls_engine = (launch_proxy(count_on if count_on is not None else model, corrupt, n, window)
                                 if counts else (None, None))
    return {"calls_naive": calls_naive, "calls_engine": calls_engine,"model": name, "corrupt": f"{corrupt} {res.corrupt_span[0]}:{res.corrupt_span[1]}", "tokens": T,
            "n": n, "window": window, "naive_s": t_naive, "engine_s": t_engine, "tl_s": t_tl, "speedup": t_naive / t_engine, "flop_fraction": f["engine"] / f["naive"],
            "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU comparison")
    ap.add_argument("--write", type=Path, default=None, help="append a results section to this markdown file")
    ap.add_argument("--no-counts", action="store_true",
                    help="skip the torch-call counts (they depend on the code path, not the device: the CPU "
                         "table has them) and time only")
    ap.add_argument("--model", default=None,
                    help="a real model (e.g. smollm2-135m): the engine against nnsight's loop and the naive loop "
                         "on it (benchmarks/bench_real_trace.py)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="with --model")
    ap.add_argument("--samples", type=int, default=10, help="with --model: noise samples")
    ap.add_argument("--window", type=int, default=6, help="with --model: the window of the MLP and attention kinds")
    ap.add_argument("--baseline-cells", type=int, default=None,
                    help="with --model: time the baselines on this many evenly spaced cells (a quick run)")
    ap.add_argument("--baselines", nargs="*", default=["nnsight", "naive"], choices=["nnsight", "naive", "naive-tl"],
                    help="with --model: naive-tl is the naive loop on TransformerLens' own weight layout")
    ap.add_argument("--profile", action="store_true", help="with --model: where the engine's time goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from bench_real_trace import run as run_real

        run_real(args.model, args.dtypes, args.samples, args.window, args.repeats, args.baseline_cells,
                 tuple(args.baselines), args.write, args.profile, args.device)
        return
    torch.set_grad_enabled(False)
    _quiet_tqdm()
    default = rl.load_model(device=args.device)
    small = gpt2_small_shaped(default.tokenizer, args.device)
    twin = narrow_twin(default)
    same = [launch_proxy(default, "relation"), launch_proxy(twin, "relation")] if not args.no_counts else [0, 0]
    if same[0] != same[1]:
        raise SystemExit(f"the narrow twin's torch calls {same[1]} differ from the model's {same[0]}")
    rows = [run(name, model, args.repeats, corrupt, with_tl=corrupt == "relation",
                count_on=None if model is default else narrow_twin(small), counts=not args.no_counts)
            for name, model in (("default (6L, d192)", default), ("GPT-2-small-shaped random (12L, d768)", small))
            for corrupt in ("relation", "subject")]
    lines = [f"### Tracing engine vs naive loop — {datetime.date.today()} — {machine()}", "",
             f"Full grid, 3 kinds (resid, MLP window, attention window), prompt {PROMPT!r}, "
             "10 noise samples, window 10; medians. Sites before the corrupted span are not run by the engine "
             "(their score is the corrupted probability), so relation tracing, whose span starts after the "
             "subject, gains more than subject tracing, whose span starts after BOS. The torch-call columns "
             "count the torch functions and tensor methods each approach calls (each launches one kernel or "
             "more on a GPU, where the naive loop's small batches leave the chip idle between launches, so "
             "that its time follows this count); for the GPT-2-small-shaped model they are counted on a "
             "64-wide twin of the same depth, which makes the same calls (checked on the default model).", "",
             "| model | corrupted span | tokens | naive loop (s) | engine (s) | speed-up | engine arithmetic / naive | "
             "arithmetic bound on speed-up | torch calls naive / engine | tl.patching, single sites only (s) | "
             "max abs diff vs naive |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tl = "—" if r["tl_s"] != r["tl_s"] else f"{r['tl_s']:.2f}"
        calls = "—" if r["calls_engine"] is None else \
            f"{r['calls_naive']:,} / {r['calls_engine']:,} = {r['calls_naive'] / r['calls_engine']:.0f}x"
        lines.append(f"| {r['model']} | {r['corrupt']} | {r['tokens']} | {r['naive_s']:.2f} | {r['engine_s']:.2f} | "
                     f"**{r['speedup']:.1f}x** | {r['flop_fraction']:.3f} | {1 / r['flop_fraction']:.1f}x | "
                     f"{calls} | "
                     f"{tl} | {r['max_abs_diff']:.1e} |")
    # the paper's model is GPT-2 XL: 48 layers, 25 heads; too big to time the naive loop on a CPU, so
    # only its torch calls, on a narrow twin of its depth
    if args.no_counts:
        emit(lines, args.write)
        return
    xl = gpt2_xl_depth(default.tokenizer, args.device)
    lines += ["", "Torch calls for a GPT-2-XL-shaped model (48 layers, 25 heads, counted at 200 wide), same "
              "prompt and settings; the naive loop's count is the same for both corruptions (one run per site):",
              "", "| corrupted | naive | engine | ratio |", "|---|---|---|---|"]
    naive = None
    for corrupt in ("relation", "subject"):
        counted, engine = launch_proxy(xl, corrupt, naive=naive is None)
        naive = naive or counted
        lines.append(f"| {corrupt} | {naive:,} | {engine:,} | {naive / engine:.0f}x |")
    emit(lines, args.write)


if __name__ == "__main__":
    main()
