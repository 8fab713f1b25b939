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

import inspect
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens.errors import ConfigError
from relation_lens.model_interface import Model, block_device, embed, final_logits, run_block_cached
from relation_lens.sites import Site
from relation_lens.spans import Span
from relation_lens.tracing.config import HOOKS, metric_name, window_layers


@dataclass
class Runs:
    clean: dict[str, Tensor]  # kind -> [layer, pos, d_model]
    corrupt_resid: list[Tensor]  # layer 0..L -> [sample, pos, d_model]: resid entering block j (L: final)
    corrupt_kv: list[tuple[Tensor, Tensor]]  # layer -> (keys, values) [sample, pos, heads, d_head]


def _final_logits(model: Model, resid_last: Float[Tensor, "batch 1 d_model"]) -> Float[Tensor, "batch vocab"]:
    """The logits at the last position from the residual stream after the last block."""
    return final_logits(model, resid_last)[:, -1]


def _noise_hook(span: Span, noise: Tensor):
    """A ``hook_embed`` hook adding ``noise`` ``[sample, span, d_model]`` to the tokens of ``span``."""
    def add_noise(act, hook):
        act = act.clone()
        act[:, span[0]:span[1]] += noise.to(act.device)
        return act

    return add_noise


def embed_with_noise(model: Model, tokens: Tensor, span: Span, noise: Tensor) -> Tensor:
    """Residual stream entering block 0, with ``noise`` added to ``hook_embed`` on ``span``."""
    with model.hooks(fwd_hooks=[("hook_embed", _noise_hook(span, noise))]):
        return embed(model, tokens.expand(noise.shape[0], -1))


def corrupted_run(model: Model, resid: Float[Tensor, "sample pos d_model"]):
    """The corrupted run from the residual entering block 0 (noised embeddings, or the embeddings of
    replaced tokens): the residual entering every block, each block's keys/values, the final logits."""
    resids, kvs = [resid], []
    for j in range(model.cfg.n_layers):
        resid = resid.to(block_device(model, j))  # blocks split over devices (n_devices)
        resid, kv = run_block_cached(model, j, resid, collect=True)
        assert kv is not None
        resids.append(resid)
        kvs.append(kv)
    return resids, kvs, _final_logits(model, resid[:, -1:])


def clean_run(model: Model, tokens: Tensor, kinds: Sequence[str], extra: Sequence[str] = ()):
    """The clean run: per kind, ``[layer, pos, d]`` activations; the last position's logits; and the
    hooks named in ``extra`` (``{name: [pos, ...]}``, for callers that restore other sites)."""
    names = {HOOKS[k].format(l) for k in kinds for l in range(model.cfg.n_layers)} | set(extra)
    out, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    logits = cast(Tensor, out)
    # on one device (the blocks' activations may sit on several: n_devices); moved where they are restored
    dev = logits.device
    clean = {k: torch.stack([cache[HOOKS[k].format(l)][0].to(dev) for l in range(model.cfg.n_layers)]) for k in kinds}
    return clean, logits[0, -1], {name: cache[name][0] for name in extra}


@dataclass(frozen=True)
class Cell:
    kind: str
    layer: int
    pos: int
    start: int  # first block to recompute
    patch_layers: range  # blocks whose kind output is restored (mlp/attn)


def grid_cells(kinds: Sequence[str], n_layers: int, n_pos: int, window: int) -> list[Cell]:
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            win = range(layer, layer + 1) if kind == "resid" else window_layers(layer, window, n_layers)
            start = layer + 1 if kind == "resid" else win.start
            for pos in range(n_pos):
                out.append(Cell(kind, layer, pos, start, win))
    return out


def restore_where(act: Tensor, mask: Tensor, clean: Tensor) -> Tensor:
    """``act`` with ``clean`` written where ``mask`` is set: ``mask``'s dimensions lead ``act``'s (rows,
    then positions, heads or neurons as far as it goes) and ``clean`` broadcasts to ``act``. The one
    restore-the-clean-value rule of the engine and of :func:`relation_lens.patch`."""
    m = mask.to(act.device)
    while m.dim() < act.dim():
        m = m[..., None]
    return torch.where(m, clean.to(act.device, act.dtype), act)


class _Plan:
    """What the restoring hooks do during the current block call: ``masks[(kind, layer)]`` marks
    the rows (of the active prefix of the batch) whose output of that kind is restored, and
    ``values[(kind, layer)]`` holds those rows' clean outputs ``[rows, d_model]`` (each row's own
    prompt and position)."""

    def __init__(self):
        self.masks: dict[tuple[str, int], Tensor] = {}
        self.values: dict[tuple[str, int], Tensor] = {}
        self.mode = "replace"
        self.offset: Tensor | None = None
        self.function: Any = None
        self.cells: list[tuple[slice, Site]] = []  # "function": each cell's rows and its site at a layer

    def hook(self, kind: str, layer: int):
        def restore(act, hook):
            mask = self.masks.get((kind, layer))
            if mask is None:
                return act
            act = act.clone()  # the block's first position is the one being restored
            now = act[:, 0]
            if self.mode == "replace":
                act[:, 0] = restore_where(now, mask, self.values[(kind, layer)])
            elif self.mode == "add":
                assert self.offset is not None
                act[:, 0] = restore_where(now, mask, now + self.offset.to(now.device, now.dtype))
            else:
                values = self.values[(kind, layer)]
                for rows, site in self.cells:
                    if site.kind == kind and bool(mask[rows.start]):  # site: this layer's, in the cell's window
                        act[rows, 0] = self.function.value(site, values[rows.start], now[rows], None, hook.name).to(act.dtype)
            return act

        return restore


@dataclass
class Job:
    """One prompt's share of an engine run: its runs, the cells to score, its target token (and the
    contrast token of ``metric="logit_diff"``)."""
    runs: Runs
    cells: list[Cell]
    target: int
    n_tokens: int
    contrast: int | None = None
    # what a restored site receives (relation_lens.interventions): "replace" writes runs.clean (the
    # clean values, or zeros / means / another prompt's values put there by prepare); "add" adds
    # ``offset`` to the value the run has (Steer); "function" calls ``function.value`` per cell
    mode: str = "replace"
    offset: Tensor | None = None
    function: Any = None


Metric = str | Callable[..., Tensor]  # a named metric, or a function of the final-position logits


def takes_targets(fn: Callable) -> bool:
    """Whether a metric function is called ``fn(logits, targets)`` (two or more positional
    parameters) rather than ``fn(logits)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def metric_values(logits: Float[Tensor, "row vocab"], targets: Tensor, metric: Metric = "prob",
                  contrasts: Tensor | None = None) -> Float[Tensor, row]:
    """Per row: P(target), log P(target), logit(target) - logit(contrast) (float32 or wider), or a
    metric function's values: ``metric(logits)`` or ``metric(logits, targets)`` with ``logits`` the
    final-position logits ``[rows, d_vocab]`` (float32 or wider) and ``targets`` each row's target
    token ``[rows]``, returning one float per row ``[rows]``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if callable(metric):
        t = targets.to(logits.device)
        out = metric(logits, t) if takes_targets(metric) else metric(logits)
        if not isinstance(out, Tensor) or tuple(out.shape) != (logits.shape[0],) or not out.is_floating_point():
            got = f"a {out.dtype} tensor of shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(f"metric {metric_name(metric)} returned {got}; a metric function maps the final-position "
                              f"logits [rows, d_vocab] = {list(logits.shape)} to one float per row, [rows] = "
                              f"[{logits.shape[0]}]")
        return out
    t = targets[:, None].to(logits.device)
    if metric == "prob":
        return logits.softmax(-1).gather(1, t)[:, 0]
    if metric == "logprob":
        return logits.log_softmax(-1).gather(1, t)[:, 0]
    if contrasts is None:
        raise ConfigError("metric='logit_diff' needs the contrast tokens")
    return (logits.gather(1, t) - logits.gather(1, contrasts[:, None].to(logits.device)))[:, 0]


def _chunks(jobs: list[Job], per_batch: int, pack: bool) -> list[list[tuple[int, Cell]]]:
    """Batches of at most ``per_batch`` cells. Unpacked, a batch holds cells of one prompt and one
    position (no padding). Packed, the (prompt, position) groups are ordered by the length of the
    suffix they recompute (longest first, so that batches hold similar lengths) and cut into
    batches across prompts and positions."""
    groups: dict[tuple[int, int], list[Cell]] = defaultdict(list)
    for i, job in enumerate(jobs):
        for c in job.cells:
            groups[(i, c.pos)].append(c)
    order = sorted(groups, key=lambda g: (-(jobs[g[0]].n_tokens - g[1]), g) if pack else g)
    if not pack:
        return [[(g[0], c) for c in groups[g][k:k + per_batch]] for g in order
                for k in range(0, len(groups[g]), per_batch)]
    stream = [(g[0], c) for g in order for c in groups[g]]
    return [stream[k:k + per_batch] for k in range(0, len(stream), per_batch)]


@torch.no_grad()
def run_jobs(model: Model, jobs: list[Job], n: int, batch_size: int, progress: bool = False,
              pack: bool = False, metric: Metric = "prob") -> list[dict[Cell, Tensor]]:
    """Score the cells of every job, ``n`` noise samples per cell (each cell's ``[n]`` values, one
    per noise sample), in batches of at most
    ``batch_size`` rows. The layer loop is planned on the host: inside a batch the cells are sorted
    by start layer, so the rows active at a layer are a prefix (a slice, not a gather); the restore
    masks go to the device once per batch; the scores come back once at the end. Nothing inside the
    loop waits for the device, so on a GPU the launches queue up ahead of the work.

    ``pack=True`` fills batches with cells of several prompts and positions: each row's suffix is
    right-padded and its cached prefix keys/values left-padded to the batch's longest, with an
    attention mask over the padding (which also gives rotary models their positions), and each row
    is read out at its own last position. A batch whose rows share one prompt and position runs
    without padding or mask, exactly as unpacked."""
    L = model.cfg.n_layers
    plan = _Plan()
    windowed = [k for k in ("mlp", "attn") if any(k in job.runs.clean for job in jobs)]
    hooks: list[tuple[str | Callable, Callable]] = [(HOOKS[k].format(l), plan.hook(k, l)) for k in windowed for l in range(L)]
    chunks = _chunks(jobs, max(1, batch_size // n), pack)
    # packed: every job's cached keys/values of each layer in one tensor [job, sample, pos, head, d_head]
    # (right-padded to the longest prompt), so that a batch's prefixes are one gather per layer
    stacked = _stack_kv(jobs) if pack else []
    scored: list[tuple[list[tuple[int, Cell]], Tensor]] = []
    with model.hooks(fwd_hooks=hooks):
        for chunk in tqdm(chunks, desc="tracing", disable=not progress, leave=False):
            chunk = sorted(chunk, key=lambda jc: jc[1].start)  # stable: the order within a start is kept
            runs = [jobs[i].runs for i, _ in chunk]
            pos = [c.pos for _, c in chunk]
            suffix = [jobs[i].n_tokens - c.pos for i, c in chunk]
            P, S = max(pos), max(suffix)
            uniform = len({(i, c.pos) for i, c in chunk}) == 1
            device = runs[0].corrupt_resid[chunk[0][1].start].device
            inputs = []
            job0 = jobs[chunk[0][0]]
            for (_, c), r, s in zip(chunk, runs, suffix):
                x = r.corrupt_resid[c.start][:, c.pos:].to(device)
                if c.kind == "resid" or s < S:
                    x = torch.nn.functional.pad(x, (0, 0, 0, S - s)) if s < S else x.clone()
                    if c.kind == "resid":
                        x[:, 0] = _resid_value(job0, r, c, x[:, 0])
                inputs.append(x)
            resid = torch.cat(inputs)  # [rows, S, d_model], row = cell * n + sample
            starts = [c.start for _, c in chunk]  # ascending
            restore = {k: [[c.kind == k and j in c.patch_layers for _, c in chunk] for j in range(L)]
                       for k in windowed}  # host [layer][cell]
            restore = {k: m for k, m in restore.items() if any(map(any, m))}
            masks = {k: torch.tensor(m, device=device).repeat_interleave(n, dim=1) for k, m in restore.items()}
            clean = {k: torch.stack([r.clean[k][:, c.pos].to(device) for r, (_, c) in zip(runs, chunk)])
                     for k in restore}  # [cell, layer, d_model]
            attn_mask: Tensor | None = None
            gather: tuple[Tensor, ...] = ()
            if not uniform:
                # row -> (job, sample, cached position t - (P - p), clamped; the padding is masked)
                job_idx = torch.tensor([i for i, _ in chunk]).repeat_interleave(n)
                sample_idx = torch.arange(n).repeat(len(chunk))
                shift = torch.tensor([P - p for p in pos]).repeat_interleave(n)
                time_idx = (torch.arange(P)[None, :] - shift[:, None]).clamp(min=0)
                gather = (job_idx[:, None], sample_idx[:, None], time_idx)
                t = torch.arange(P + S, device=device)
                lo = torch.tensor([P - p for p in pos], device=device).repeat_interleave(n)[:, None]
                hi = torch.tensor([P + s for s in suffix], device=device).repeat_interleave(n)[:, None]
                attn_mask = ((t >= lo) & (t < hi)).long()  # [rows, P + S]
            for j in range(starts[0], L):
                dev = block_device(model, j)
                resid = resid.to(dev)
                active_cells = bisect_right(starts, j)
                active = n * active_cells
                prefix = None
                if P > 0:
                    if uniform:
                        keys, values = runs[0].corrupt_kv[j]
                        p = chunk[0][1].pos
                        kv = (keys[:, :p].to(dev).repeat(active_cells, 1, 1, 1),
                              values[:, :p].to(dev).repeat(active_cells, 1, 1, 1))
                    else:  # only packed batches mix prompts or positions
                        where = tuple(t[:active].to(stacked[j][0].device) for t in gather)
                        kv = (stacked[j][0][where].to(dev), stacked[j][1][where].to(dev))
                    prefix = kv
                plan.mode, plan.offset, plan.function = job0.mode, job0.offset, job0.function
                if job0.mode == "function":
                    plan.cells = [(slice(i * n, (i + 1) * n), Site(c.kind, j, c.pos)) for i, (_, c) in enumerate(chunk[:active_cells])]
                plan.masks = {(k, j): masks[k][j, :active].to(dev) for k, m in restore.items() if any(m[j])}
                plan.values = {(k, j): clean[k][:active_cells, j].to(dev).repeat_interleave(n, dim=0)
                               for k, m in restore.items() if any(m[j])}
                y, _ = run_block_cached(model, j, resid[:active], prefix,
                                        None if attn_mask is None else attn_mask[:active].to(dev))
                if active == resid.shape[0]:
                    resid = y
                else:
                    resid[:active] = y
            if uniform:
                last = resid[:, -1:]
            else:
                idx = torch.tensor(suffix, device=resid.device).repeat_interleave(n) - 1
                last = resid[torch.arange(resid.shape[0], device=resid.device), idx][:, None]
            logits = _final_logits(model, last)
            targets = torch.tensor([jobs[i].target for i, _ in chunk]).repeat_interleave(n)
            contrasts = torch.tensor([jobs[i].contrast for i, _ in chunk]).repeat_interleave(n) \
                if metric == "logit_diff" else None
            values = metric_values(logits, targets, metric, contrasts).float()
            scored.append((chunk, values.view(len(chunk), n)))
            plan.masks, plan.values = {}, {}
    values = torch.cat([v.cpu() for _, v in scored]) if scored else torch.zeros(0, n)
    out: list[dict[Cell, Tensor]] = [{} for _ in jobs]
    for (i, c), v in zip((jc for chunk, _ in scored for jc in chunk), values):
        out[i][c] = v
    return out


def _resid_value(job: Job, r: Runs, c: Cell, now: Tensor) -> Tensor:
    """What a residual cell receives: ``now`` is the corrupted run's residual there ``[n, d_model]``."""
    clean = r.clean["resid"][c.layer, c.pos].to(now.device)
    if job.mode == "replace":
        return clean.expand_as(now)
    if job.mode == "add":
        assert job.offset is not None
        return now + job.offset.to(now.device, now.dtype)
    return job.function.value(Site("resid", c.layer, c.pos), clean, now, None, HOOKS["resid"].format(c.layer)).to(now.dtype)


def _stack_kv(jobs: list[Job]) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the jobs' cached keys and values stacked ``[job, sample, pos, head, d_head]``
    (right-padded to the longest prompt), on that layer's device."""
    T = max(job.n_tokens for job in jobs)
    out = []
    for layer in range(len(jobs[0].runs.corrupt_kv)):
        pair = []
        for which in (0, 1):
            parts = [job.runs.corrupt_kv[layer][which] for job in jobs]
            pair.append(torch.stack([torch.nn.functional.pad(x, (0, 0, 0, 0, 0, T - x.shape[1])) for x in parts]))
        out.append((pair[0], pair[1]))
    return out

