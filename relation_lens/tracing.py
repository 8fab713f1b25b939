"""Relation tracing and ROME's causal tracing, with a batched patching engine.

The method (Meng et al. 2022, extended to relations by Li, Chen & Wang 2024):

1. Run the prompt clean and record every hidden state.
2. Corrupt a span of tokens (the relation words, or the subject for ROME's causal tracing) by
   adding Gaussian noise to their token embeddings (``hook_embed``); ``n_samples`` draws.
3. For every site (layer ``l``, position ``p``), run the corrupted prompt again but restore the
   clean value at that site, and score the probability of the target at the last position:

   * ``"resid"``: the residual stream after block ``l`` (``blocks.{l}.hook_resid_post``);
   * ``"mlp"``: the MLP outputs (``blocks.{j}.hook_mlp_out``) at position ``p`` for the ``window``
     layers ``j`` centred on ``l`` as ROME does: ``range(max(0, l - window // 2),
     min(n_layers, l + ceil(window / 2)))``;
   * ``"attn"``: the same with the attention outputs (``blocks.{j}.hook_attn_out``).

   The score of a site is the mean over noise samples of P(target). The indirect effect of a site
   is its score minus the corrupted probability.

The engine gives the same numbers as that one-run-per-site loop (checked against a naive oracle
in the tests) but does only the work each patched run truly needs. A run patched at
(layer ``l``, position ``p``) is identical to the corrupted run below its lowest restored layer
``s`` and, under causal attention, at every position before ``p``. So the engine runs the
corrupted prompt once, keeps its residual stream and its attention keys/values at every layer,
and for each site recomputes only layers ``>= s`` at positions ``>= p``, attending to the cached
corrupted keys/values of the earlier positions; a site before the corrupted span is not run at
all (clean and corrupted states are the same there, so its score is the corrupted probability).
Sites are grouped by ``p`` and packed into batches of at most ``batch_size`` rows (sites x noise
samples); inside a batch, a row joins the layer loop at its own start layer. Only the last
position is unembedded.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from relation_lens._results import JsonRoundTrip, ValueEquality
from relation_lens.errors import NoiseError, PromptError, SpanError, TargetError, UnsupportedModelError
from relation_lens.spans import PromptSpans, Span, find_spans, object_tokens

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
HOOKS = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}
NOISE_MULTIPLIER = 3.0


class TargetWarning(UserWarning):
    """A target string is several tokens long; only its first token is scored."""


# --------------------------------------------------------------------------------------- helpers
def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored around ``layer`` for windowed kinds, centred and clipped as ROME does."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def depth_scaled_window(n_layers: int) -> int:
    """ROME's window (10 layers of GPT-2 XL's 48) as the same fraction of another model's depth:
    10 for 48 layers, 2 for 12, 1 for the 6-layer default model. The CLI and experiments use it."""
    return max(1, round(10 * n_layers / 48))


def check_model(model, kinds: Sequence[str] = KINDS, prompt: str | None = None) -> None:
    """Raise :class:`UnsupportedModelError` unless tracing can run on ``model``."""
    try:
        _check_model(model, kinds)
    except UnsupportedModelError as exc:
        if prompt is not None:
            raise UnsupportedModelError(f"{exc} (prompt {prompt!r})") from None
        raise


def _check_model(model, kinds: Sequence[str]) -> None:
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise UnsupportedModelError(
            f"expected a transformer_lens.HookedTransformer, got {type(model).__name__}; "
            "load models with relation_lens.load_model()")
    cfg = model.cfg
    if cfg.attention_dir != "causal":
        raise UnsupportedModelError(f"model {cfg.model_name!r} has {cfg.attention_dir} attention; tracing needs a causal LM")
    if cfg.positional_embedding_type == "shortformer":
        raise UnsupportedModelError(f"model {cfg.model_name!r} uses shortformer positional embeddings, not supported")
    if model.tokenizer is None:
        raise UnsupportedModelError(f"model {cfg.model_name!r} has no tokenizer; tracing works on text prompts")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UnsupportedModelError(f"unknown kind(s) {bad}; choose from {list(KINDS)}")
    if "mlp" in kinds and cfg.attn_only:
        raise UnsupportedModelError(f"model {cfg.model_name!r} is attention-only: it has no MLP outputs to restore")


def noise_std(model) -> float:
    """Default noise level: 3 x the standard deviation of the model's token embeddings."""
    return NOISE_MULTIPLIER * model.W_E.detach().float().std().item()


def make_noise(model, n_samples: int, span_len: int, noise: float | Tensor | None, seed: int
               ) -> tuple[Float[Tensor, "sample span d_model"], float | None]:
    """The noise added to the corrupted span's token embeddings, and its std (None if given)."""
    d = model.cfg.d_model
    if isinstance(noise, Tensor):
        want = (n_samples, span_len, d)
        if tuple(noise.shape) != want:
            raise NoiseError(f"noise tensor has shape {tuple(noise.shape)}, expected [n_samples, span_len, d_model] "
                             f"= {list(want)}")
        if not torch.isfinite(noise).all():
            raise NoiseError("noise tensor holds NaN or Inf")
        return noise.detach().to(model.cfg.device, model.cfg.dtype), None
    std = noise_std(model) if noise is None else float(noise)
    if not math.isfinite(std) or std < 0:
        raise NoiseError(f"noise std must be a finite number >= 0, got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn((n_samples, span_len, d), generator=gen) * std
    return draw.to(model.cfg.device, model.cfg.dtype), std


@dataclass(frozen=True)
class Target:
    token: int
    text: str  # the decoded scored token
    requested: str | None  # what the caller asked for (None: the model's own prediction)
    n_tokens: int  # tokens in the requested string; only the first is scored


def resolve_target(model, prompt: str, target: str | int | None, clean_logits: Tensor) -> Target:
    """Turn ``target`` into the token to score.

    A string is tokenised as a continuation of the prompt (:func:`relation_lens.spans.continuation_text`:
    a space in front unless either side already has whitespace there, GPT-2 convention " Paris"). A
    string of several tokens is scored by its first token, with a :class:`TargetWarning`.
    """
    if target is None:
        tok = int(clean_logits.argmax())
        return Target(tok, model.tokenizer.decode([tok]), None, 1)
    if isinstance(target, int):
        if not 0 <= target < model.cfg.d_vocab:
            raise TargetError(f"target token id {target} is outside the vocabulary [0, {model.cfg.d_vocab}) "
                              f"(prompt {prompt!r})")
        return Target(target, model.tokenizer.decode([target]), str(target), 1)
    if not isinstance(target, str) or not target.strip():
        raise TargetError(f"target {target!r} is empty (prompt {prompt!r})")
    ids = object_tokens(model, prompt, target).tolist()
    if len(ids) > 1:
        warnings.warn(f"target {target!r} is {len(ids)} tokens; scoring its first token "
                      f"{model.tokenizer.decode(ids[:1])!r} (prompt {prompt!r})", TargetWarning, stacklevel=3)
    return Target(ids[0], model.tokenizer.decode(ids[:1]), target, len(ids))


# ------------------------------------------------------------------------------------ result type
def _argmax_2d(grid: Float[Tensor, "row col"]) -> tuple[int, int]:
    """``(row, col)`` of the largest entry, NaN ignored (buckets no prompt has are NaN)."""
    flat = int(torch.nan_to_num(grid, nan=-math.inf).argmax())
    return divmod(flat, grid.shape[1])


class _Views(JsonRoundTrip, ValueEquality):
    """JSON round trip and notebook display shared by the result types (which define ``to_dict``,
    ``from_dict`` and ``to_html``)."""

    def _repr_html_(self) -> str:  # notebooks: offline, no network probe
        return self.to_html()


@dataclass(frozen=True, repr=False, eq=False)
class TraceResult(_Views):
    """The outcome of one trace.

    ``scores[kind]`` is a ``Float[Tensor, "layer pos"]`` grid of P(target) with the site restored;
    positions index ``tokens`` (a prepended BOS is position 0). Spans are half-open.
    """

    prompt: str
    tokens: tuple[str, ...]
    subject: str
    subject_span: Span
    relation_span: Span
    corrupt: str  # "relation", "subject" or "explicit"
    corrupt_span: Span
    target: str  # the scored token, decoded
    target_token: int
    target_requested: str | None
    target_n_tokens: int
    clean_top: str  # the model's own top prediction on the clean prompt
    clean_top_token: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, Float[Tensor, "layer pos"]]
    window: int
    n_samples: int
    noise_std: float | None
    seed: int
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        """Whether the clean model's top prediction is the scored target."""
        return self.clean_top_token == self.target_token

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def indirect_effect(self, kind: str) -> Float[Tensor, "layer pos"]:
        """Score minus the corrupted probability."""
        return self.scores[kind] - self.corrupted_prob

    def peak(self, kind: str) -> tuple[int, int, float]:
        """``(layer, position, score)`` of the site whose restoration brings back the most."""
        layer, pos = _argmax_2d(self.scores[kind])
        return layer, pos, float(self.scores[kind][layer, pos])

    def __repr__(self) -> str:  # a summary; the grids are in .scores
        lo, hi = self.corrupt_span
        layers, positions = next(iter(self.scores.values())).shape
        peaks = ", ".join(f"{k} L{l}@{self.tokens[p]!r} {v:.3g}" for k in self.scores
                          for l, p, v in [self.peak(k)])
        return (f"TraceResult({self.prompt!r}, corrupt={self.corrupt} {''.join(self.tokens[lo:hi])!r}, "
                f"target={self.target!r}: clean {self.clean_prob:.3g}, corrupted {self.corrupted_prob:.3g}; "
                f"grids [{layers} layers x {positions} positions]; peaks: {peaks}; "
                f"n_samples={self.n_samples}, window={self.window}, model={self.model_name!r})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = {k: v.tolist() for k, v in self.scores.items()}
        d["subject_span"], d["relation_span"], d["corrupt_span"] = map(
            list, (self.subject_span, self.relation_span, self.corrupt_span))
        d["tokens"] = list(self.tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceResult":
        d = dict(d)
        d["scores"] = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()}
        for key in ("subject_span", "relation_span", "corrupt_span"):
            d[key] = tuple(d[key])
        d["tokens"] = tuple(d["tokens"])
        return cls(**d)

    def plot(self, path: str | Path | None = None, **kwargs):
        """ROME-style heatmaps (one panel per kind); saved to ``path`` (PNG/PDF/SVG) if given."""
        from relation_lens.viz import plot_trace

        return plot_trace(self, path, **kwargs)

    def to_html(self) -> str:
        """A self-contained (offline) circuitsvis view of the grids."""
        from relation_lens.viz import trace_html

        return trace_html(self)


# ---------------------------------------------------------------------------------- the engine
@dataclass
class _Runs:
    clean: dict[str, Tensor]  # kind -> [layer, pos, d_model]
    corrupt_resid: list[Tensor]  # layer 0..L -> [sample, pos, d_model]: resid entering block j (L: final)
    corrupt_kv: list[tuple[Tensor, Tensor]]  # layer -> (keys, values) [sample, pos, heads, d_head]


def _final_logits(model, resid_last: Float[Tensor, "batch 1 d_model"]) -> Float[Tensor, "batch vocab"]:
    x = model.ln_final(resid_last) if model.cfg.normalization_type is not None else resid_last
    logits = model.unembed(x)[:, -1]
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


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


def corrupt_span_for(spans: PromptSpans, corrupt: str | tuple[int, int], n_pos: int) -> tuple[str, Span]:
    if isinstance(corrupt, str):
        if corrupt == "relation":
            span = spans.relation_span
        elif corrupt == "subject":
            span = spans.subject_span
        else:
            raise SpanError(f"corrupt={corrupt!r} is not 'relation', 'subject' or a (start, end) token span "
                            f"(prompt {spans.prompt!r})")
        if span[1] <= span[0]:
            raise SpanError(f"the {corrupt} span is empty in prompt {spans.prompt!r}")
        return corrupt, span
    try:
        a, b = (int(v) for v in corrupt)
    except (TypeError, ValueError):
        raise SpanError(f"corrupt={corrupt!r} is not 'relation', 'subject' or a (start, end) token span") from None
    if not 0 <= a < b <= n_pos:
        raise SpanError(f"corrupt span {(a, b)} is not a non-empty range inside the {n_pos} tokens of prompt "
                        f"{spans.prompt!r} {list(spans.str_tokens)}")
    return "explicit", (a, b)


def trace(model, prompt: str, *, subject: str, target: str | int | None = None,
          corrupt: str | tuple[int, int] = "relation", kinds: Sequence[str] = KINDS, window: int = 10,
          n_samples: int = 10, noise: float | Tensor | None = None, seed: int = 0,
          include_last: bool = True, batch_size: int = 512, progress: bool = False) -> TraceResult:
    """Trace where ``model`` carries the relation (or subject) of ``prompt``.

    Args:
        model: a HookedTransformer. It is left exactly as it was (no hooks, no weight changes).
        prompt: text ending right before the answer, e.g. ``"The Space Needle is located in the city of"``.
        subject: a substring of ``prompt``; the relation span is the tokens after it up to the end.
        target: the answer to score (string, token id), or ``None`` for the model's top clean prediction.
            A multi-token string is scored by its first token (with a :class:`TargetWarning`).
        corrupt: ``"relation"`` (relation tracing), ``"subject"`` (ROME's causal tracing) or an explicit
            half-open token span ``(start, end)`` of ``model.to_tokens(prompt)[0]``.
        kinds: which sites to restore: ``"resid"``, ``"mlp"``, ``"attn"``.
        window: layers restored together for ``"mlp"``/``"attn"`` (centred, clipped at the ends).
        n_samples: noise draws; scores are averaged over them.
        noise: std of the Gaussian noise (default 3 x std of the token embeddings), or the exact noise
            as a ``[n_samples, span_len, d_model]`` tensor.
        seed: seed of the noise generator.
        include_last: whether the relation span includes the prompt's last token.
        batch_size: most rows (sites x noise samples) in one patched batch; bounds memory.
        progress: show a progress bar.

    Returns:
        TraceResult with ``scores[kind]`` a ``[n_layers, n_pos]`` grid of P(target).
    """
    check_model(model, kinds, prompt)
    if not kinds:
        raise UnsupportedModelError("kinds is empty; choose some of " + str(list(KINDS)))
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise NoiseError(f"n_samples must be a positive int, got {n_samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = find_spans(model, prompt, subject, include_last=include_last, require_relation=corrupt == "relation")
    T = len(spans.tokens)
    if T > model.cfg.n_ctx:
        raise PromptError(f"prompt {prompt!r} is {T} tokens, longer than the model's context of {model.cfg.n_ctx}")
    mode, span = corrupt_span_for(spans, corrupt, T)
    kinds = tuple(dict.fromkeys(kinds))
    tokens = spans.tokens.to(model.cfg.device)
    noise_t, std = make_noise(model, n_samples, span[1] - span[0], noise, seed)

    with torch.no_grad():
        clean, clean_logits = _clean_run(model, tokens, kinds)
        tgt = resolve_target(model, prompt, target, clean_logits)
        resids, kvs, corrupt_logits = _corrupted_run(model, tokens, span, noise_t)
        runs = _Runs(clean, resids, kvs)
        corrupted_prob = corrupt_logits.float().softmax(-1)[:, tgt.token].mean().item()
        # Before the corrupted span the clean and corrupted runs are the same (causal attention, noise
        # only on the span), so restoring a site there changes nothing: its score is the corrupted one.
        cells = _cells(kinds, model.cfg.n_layers, T, window)
        values = dict.fromkeys([c for c in cells if c.pos < span[0]], corrupted_prob)
        values.update(_run_cells(model, runs, [c for c in cells if c.pos >= span[0]], tgt.token, n_samples,
                                 batch_size, progress))
    grids = {k: torch.zeros(model.cfg.n_layers, T) for k in kinds}
    for c, v in values.items():
        grids[c.kind][c.layer, c.pos] = v
    return TraceResult(
        prompt=prompt, tokens=spans.str_tokens, subject=subject, subject_span=spans.subject_span,
        relation_span=spans.relation_span, corrupt=mode, corrupt_span=span, target=tgt.text,
        target_token=tgt.token, target_requested=tgt.requested, target_n_tokens=tgt.n_tokens,
        clean_top=model.tokenizer.decode([int(clean_logits.argmax())]), clean_top_token=int(clean_logits.argmax()),
        clean_prob=clean_logits.float().softmax(-1)[tgt.token].item(),
        corrupted_prob=corrupted_prob,
        scores=grids, window=window, n_samples=n_samples, noise_std=std, seed=seed,
        model_name=model.cfg.model_name,
        settings={"include_last": include_last, "kinds": list(kinds), "batch_size": batch_size},
    )


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


# ------------------------------------------------------------------------------ dataset averages
BUCKETS = ("first subject", "middle subject", "last subject", "first relation", "middle relation",
           "last relation", "last token")


def bucket_positions(result: TraceResult) -> dict[str, list[int]]:
    """Token positions of each bucket. Relation buckets cover the relation span without the
    prompt's last token, which has a bucket of its own; an empty bucket gets no positions."""
    T = len(result.tokens)
    a, b = result.subject_span
    ra, rb = result.relation_span[0], min(result.relation_span[1], T - 1)

    def three(lo, hi):
        if hi <= lo:
            return [], [], []
        return [lo], list(range(lo + 1, hi - 1)), [hi - 1]

    sf, sm, sl = three(a, b)
    rf, rm, rl = three(ra, rb)
    return dict(zip(BUCKETS, (sf, sm, sl, rf, rm, rl, [T - 1])))


def bucketize(result: TraceResult, kind: str) -> Float[Tensor, "layer bucket"]:
    """Indirect effect of ``kind`` averaged inside each position bucket (NaN for an empty bucket)."""
    ie = result.indirect_effect(kind)
    cols = [ie[:, pos].mean(1) if pos else torch.full((ie.shape[0],), float("nan"))
            for pos in bucket_positions(result).values()]
    return torch.stack(cols, dim=1)


@dataclass(frozen=True, repr=False, eq=False)
class DatasetTraceResult(_Views):
    """Average indirect effects over many prompts, by layer and position bucket.

    ``mean[kind]`` and ``ci95[kind]`` are ``Float[Tensor, "layer bucket"]`` (the CI is the half-width
    of a normal 95% interval, 1.96 x standard error); ``count[b]`` is how many prompts have bucket ``b``.
    Every prompt's own :class:`TraceResult` is kept in ``results``; ``used[i]`` says whether it was averaged.
    """

    buckets: tuple[str, ...]
    mean: dict[str, Float[Tensor, "layer bucket"]]
    ci95: dict[str, Float[Tensor, "layer bucket"]]
    count: Tensor
    clean_prob: float
    corrupted_prob: float
    n_total: int
    n_used: int
    n_incorrect: int
    exclude_incorrect: bool
    corrupt: str
    window: int
    model_name: str
    results: tuple[TraceResult, ...]
    used: tuple[bool, ...]
    skipped: tuple[tuple[int, str], ...] = ()  # (index of the fact, why it could not be traced)

    def __repr__(self) -> str:  # a summary; the grids are in .mean / .ci95
        peaks = []
        for kind, grid in self.mean.items():
            layer, b = _argmax_2d(grid)
            peaks.append(f"{kind} L{layer}@{self.buckets[b]} {float(grid[layer, b]):.3g}"
                         f"\u00b1{float(self.ci95[kind][layer, b]):.2g}")
        return (f"DatasetTraceResult({self.n_used} of {self.n_total} prompts averaged "
                f"({self.n_incorrect} wrong{', left out' if self.exclude_incorrect else ''}, "
                f"{len(self.skipped)} skipped), corrupt={self.corrupt}; mean clean {self.clean_prob:.3g}, "
                f"corrupted {self.corrupted_prob:.3g}; largest mean indirect effects: {'; '.join(peaks)}; "
                f"window={self.window}, model={self.model_name!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": [list(x) for x in self.skipped],
            "buckets": list(self.buckets), "mean": {k: v.tolist() for k, v in self.mean.items()},
            "ci95": {k: v.tolist() for k, v in self.ci95.items()}, "count": self.count.tolist(),
            "clean_prob": self.clean_prob, "corrupted_prob": self.corrupted_prob, "n_total": self.n_total,
            "n_used": self.n_used, "n_incorrect": self.n_incorrect, "exclude_incorrect": self.exclude_incorrect,
            "corrupt": self.corrupt, "window": self.window, "model_name": self.model_name,
            "results": [r.to_dict() for r in self.results], "used": list(self.used),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetTraceResult":
        d = dict(d)
        d["buckets"] = tuple(d["buckets"])
        d["mean"] = {k: torch.tensor(v) for k, v in d["mean"].items()}
        d["ci95"] = {k: torch.tensor(v) for k, v in d["ci95"].items()}
        d["count"] = torch.tensor(d["count"])
        d["results"] = tuple(TraceResult.from_dict(r) for r in d["results"])
        d["used"] = tuple(d["used"])
        d["skipped"] = tuple((int(i), str(m)) for i, m in d.get("skipped", ()))
        return cls(**d)

    def plot(self, path: str | Path | None = None, **kwargs):
        from relation_lens.viz import plot_dataset

        return plot_dataset(self, path, **kwargs)

    def to_html(self) -> str:
        from relation_lens.viz import dataset_html

        return dataset_html(self)


def _fact_fields(item: Any, index: int) -> tuple[str, str, str | int | None]:
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
    prompt, subject = get("prompt"), get("subject")
    target = get("target", None)
    if target is None:
        target = get("object", None) or get("attribute", None)
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise SpanError(f"fact {index} ({item!r}) needs a 'prompt' and a 'subject' string")
    return prompt, subject, target


def trace_dataset(model, facts, *, corrupt: str = "relation", kinds: Sequence[str] = KINDS, window: int = 10,
                  n_samples: int = 10, noise: float | None = None, seed: int = 0, include_last: bool = True,
                  exclude_incorrect: bool = True, batch_size: int = 512, progress: bool = False,
                  skip_invalid: bool = True) -> DatasetTraceResult:
    """Trace many prompts and average the indirect effects by layer and position bucket.

    Args:
        facts: items with ``prompt``, ``subject`` and optionally ``target`` (or ``object``/``attribute``):
            dicts, objects with those attributes, ``(prompt, subject[, target])`` tuples, or a
            ``datasets.Dataset``.
        exclude_incorrect: leave out of the averages the prompts whose clean top prediction is not
            the target (they are traced and kept in ``results`` either way, and counted).
        skip_invalid: a fact that cannot be traced (e.g. no relation words left with
            ``include_last=False``) is recorded in ``skipped`` with the reason instead of raising.
        Other arguments as in :func:`trace`; the noise std is computed once for all prompts.

    Returns:
        DatasetTraceResult.
    """
    check_model(model, kinds)
    items = [_fact_fields(f, i) for i, f in enumerate(facts)]
    if not items:
        raise SpanError("trace_dataset got no facts")
    std = noise_std(model) if noise is None else float(noise)
    results, skipped = [], []
    for i, (prompt, subject, target) in enumerate(tqdm(items, desc="prompts", disable=not progress)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TargetWarning)
            try:
                results.append(trace(model, prompt, subject=subject, target=target, corrupt=corrupt, kinds=kinds,
                                     window=window, n_samples=n_samples, noise=std, seed=seed + i,
                                     include_last=include_last, batch_size=batch_size))
            except (SpanError, PromptError, TargetError) as exc:
                if not skip_invalid:
                    raise
                skipped.append((i, str(exc)))
    used = tuple(r.correct or not exclude_incorrect for r in results)
    chosen = [r for r, u in zip(results, used) if u]
    mean, ci = {}, {}
    if chosen:
        for kind in kinds:
            stack = torch.stack([bucketize(r, kind) for r in chosen])  # [prompt, layer, bucket]
            present = ~torch.isnan(stack)
            n = present.sum(0).clamp(min=1)
            mu = torch.nansum(stack, 0) / n
            var = torch.nansum((stack - mu) ** 2, 0) / (n - 1).clamp(min=1)
            mean[kind] = torch.where(present.any(0), mu, torch.nan)
            ci[kind] = torch.where(present.sum(0) > 1, 1.96 * (var / n).sqrt(), torch.nan)
        count = (~torch.isnan(torch.stack([bucketize(r, kinds[0]) for r in chosen])[:, 0])).sum(0)
    else:
        L = model.cfg.n_layers
        mean = {k: torch.full((L, len(BUCKETS)), torch.nan) for k in kinds}
        ci = {k: torch.full((L, len(BUCKETS)), torch.nan) for k in kinds}
        count = torch.zeros(len(BUCKETS), dtype=torch.long)
    return DatasetTraceResult(
        buckets=BUCKETS, mean=mean, ci95=ci, count=count,
        clean_prob=float(sum(r.clean_prob for r in chosen) / max(1, len(chosen))),
        corrupted_prob=float(sum(r.corrupted_prob for r in chosen) / max(1, len(chosen))),
        n_total=len(results), n_used=len(chosen), n_incorrect=sum(not r.correct for r in results),
        exclude_incorrect=exclude_incorrect, corrupt=corrupt, window=window, model_name=model.cfg.model_name,
        results=tuple(results), used=used, skipped=tuple(skipped))
