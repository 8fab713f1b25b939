"""The batched patching engine: the only tracing module that touches TransformerLens internals
(blocks called one by one with cached keys/values, hook points).

A run patched at (layer ``l``, position ``p``) is identical to the corrupted run below its lowest
restored layer ``s`` and, under causal attention, at every position before ``p``. So the engine
runs the corrupted prompt once, keeps its residual stream and its attention keys/values at every
layer, and for each site recomputes only layers ``>= s`` at positions ``>= p``, attending to the
cached corrupted keys/values of the earlier positions. Sites are grouped by ``p`` and packed into
batches of at most ``batch_size`` rows (sites x noise samples); inside a batch, a row joins the
layer loop at its own start layer. Only the last position is unembedded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens.spans import Span
from relation_lens.tracing.config import HOOKS, window_layers


@dataclass
class _Runs:
    clean: dict[str, Tensor]  # kind -> [layer, pos, d_model]
    corrupt_resid: list[Tensor]  # layer 0..L -> [sample, pos, d_model]: resid entering block j (L: final)
    corrupt_kv: list[tuple[Tensor, Tensor]]  # layer -> (keys, values) [sample, pos, heads, d_head]


def _final_logits(model, resid_last: Float[Tensor, "batch 1 d_model"]) -> Float[Tensor, "batch vocab"]:
    """The logits at the last position from the residual stream after the last block, through
    TransformerLens' own forward (``start_at_layer=n_layers``: final norm, unembedding, soft cap)."""
    return model(resid_last, start_at_layer=model.cfg.n_layers)[:, -1]


def _noise_hook(span: Span, noise: Tensor):
    """A ``hook_embed`` hook adding ``noise`` ``[sample, span, d_model]`` to the tokens of ``span``."""
    def add_noise(act, hook):
        act = act.clone()
        act[:, span[0]:span[1]] += noise
        return act

    return add_noise


def _embed_with_noise(model, tokens: Tensor, span: Span, noise: Tensor) -> Tensor:
    """Residual stream entering block 0, with ``noise`` added to ``hook_embed`` on ``span``."""
    with model.hooks(fwd_hooks=[("hook_embed", _noise_hook(span, noise))]):
        return model(tokens.expand(noise.shape[0], -1), stop_at_layer=0)


def _corrupted_run(model, tokens: Tensor, span: Span, noise: Tensor):
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

    resid = _embed_with_noise(model, tokens, span, noise)
    resids, kvs = [resid], []
    for block in model.blocks:
        entry = Entry.init_cache_entry(model.cfg, resid.device, resid.shape[0])
        resid = block(resid, past_kv_cache_entry=entry)
        resids.append(resid)
        kvs.append((entry.past_keys, entry.past_values))
    return resids, kvs, _final_logits(model, resid[:, -1:])


def _clean_run(model, tokens: Tensor, kinds: Sequence[str]):
    names = {HOOKS[k].format(l) for k in kinds for l in range(model.cfg.n_layers)}
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    clean = {k: torch.stack([cache[HOOKS[k].format(l)][0] for l in range(model.cfg.n_layers)]) for k in kinds}
    return clean, logits[0, -1]


@dataclass(frozen=True)
class _Cell:
    kind: str
    layer: int
    pos: int
    start: int  # first block to recompute
    patch_layers: range  # blocks whose kind output is restored (mlp/attn)


def _cells(kinds: Sequence[str], n_layers: int, n_pos: int, window: int) -> list[_Cell]:
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            win = range(layer, layer + 1) if kind == "resid" else window_layers(layer, window, n_layers)
            start = layer + 1 if kind == "resid" else win.start
            for pos in range(n_pos):
                out.append(_Cell(kind, layer, pos, start, win))
    return out


class _Plan:
    """What the restoring hooks do during the current block call: ``masks[(kind, layer)]`` marks
    the rows (of the active prefix of the batch) whose output of that kind is restored."""

    def __init__(self, clean: dict[str, Tensor]):
        self.clean = clean
        self.pos = 0
        self.masks: dict[tuple[str, int], Tensor] = {}

    def hook(self, kind: str, layer: int):
        def restore(act, hook):
            mask = self.masks.get((kind, layer))
            if mask is None:
                return act
            act = act.clone()
            act[:, 0] = torch.where(mask[:, None], self.clean[kind][layer, self.pos], act[:, 0])
            return act

        return restore


@torch.no_grad()
def _run_cells(model, runs: _Runs, cells: list[_Cell], target: int, n: int, batch_size: int,
               progress: bool) -> dict[_Cell, float]:
    """Score every cell. The layer loop is planned on the host: inside a batch the cells are sorted
    by start layer, so the rows active at a layer are a prefix (a slice, not a gather); the restore
    masks go to the device once per batch; the scores come back once at the end. Nothing inside the
    loop waits for the device, so on a GPU the launches queue up ahead of the work."""
    from bisect import bisect_right

    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

    L = model.cfg.n_layers
    plan = _Plan(runs.clean)
    windowed = [k for k in ("mlp", "attn") if k in runs.clean]
    hooks = [(HOOKS[k].format(l), plan.hook(k, l)) for k in windowed for l in range(L)]
    by_pos: dict[int, list[_Cell]] = defaultdict(list)
    for c in cells:
        by_pos[c.pos].append(c)
    per_batch = max(1, batch_size // n)
    chunks = []
    for p, group in sorted(by_pos.items()):
        group = sorted(group, key=lambda c: c.start)  # stable: kind, layer order kept within a start
        chunks += [(p, group[i:i + per_batch]) for i in range(0, len(group), per_batch)]
    device = runs.corrupt_resid[0].device
    scored: list[tuple[list[_Cell], Tensor]] = []
    with model.hooks(fwd_hooks=hooks):
        for p, chunk in tqdm(chunks, desc="tracing", disable=not progress, leave=False):
            plan.pos = p
            inputs = []
            for c in chunk:
                x = runs.corrupt_resid[c.start][:, p:]
                if c.kind == "resid":
                    x = x.clone()
                    x[:, 0] = runs.clean["resid"][c.layer, p]
                inputs.append(x)
            resid = torch.cat(inputs)  # [rows, pos - p, d_model], row = cell * n + sample
            starts = [c.start for c in chunk]  # ascending
            restore = {k: [[c.kind == k and j in c.patch_layers for c in chunk] for j in range(L)]
                       for k in windowed}  # host [layer][cell]
            restore = {k: m for k, m in restore.items() if any(map(any, m))}
            on_device = {k: torch.tensor(m, device=device).repeat_interleave(n, dim=1) for k, m in restore.items()}
            for j in range(starts[0], L):
                active = n * bisect_right(starts, j)
                entry = None
                if p > 0:
                    keys, values = runs.corrupt_kv[j]
                    reps = active // n
                    entry = Entry(keys[:, :p].repeat(reps, 1, 1, 1), values[:, :p].repeat(reps, 1, 1, 1),
                                  frozen=True)
                plan.masks = {(k, j): on_device[k][j, :active] for k, m in restore.items() if any(m[j])}
                y = model.blocks[j](resid[:active], past_kv_cache_entry=entry)
                if active == resid.shape[0]:
                    resid = y
                else:
                    resid[:active] = y
            probs = _final_logits(model, resid[:, -1:]).float().softmax(-1)[:, target]
            scored.append((chunk, probs.view(len(chunk), n).mean(1)))
            plan.masks = {}
    values = torch.cat([v for _, v in scored]).tolist() if scored else []
    return dict(zip((c for chunk, _ in scored for c in chunk), values))


@torch.no_grad()
def patched_probability(model, tokens: Tensor, corrupt_span: Span, noise: Tensor, target: int,
                        restore: Sequence[tuple[str, Sequence[int]]] = ()) -> float:
    """One corrupted run with clean values restored at ``restore`` = [(hook name, positions)], as a
    plain forward pass with hooks: the building block the engine is an accelerated form of.

    Returns the mean over noise samples of P(target) at the last position.
    """
    names = {name for name, _ in restore}
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)

    def restorer(positions):
        pos = list(positions)

        def fn(act, hook):
            act = act.clone()
            act[:, pos] = cache[hook.name][0, pos]
            return act
        return fn

    hooks = [("hook_embed", _noise_hook(corrupt_span, noise))] + [(name, restorer(pos)) for name, pos in restore]
    logits = model.run_with_hooks(tokens.expand(noise.shape[0], -1), fwd_hooks=hooks)
    return logits[:, -1].float().softmax(-1)[:, target].mean().item()

