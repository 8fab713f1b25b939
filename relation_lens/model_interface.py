"""The one interface through which relation_lens reaches a model, on both lines of TransformerLens.

Two kinds of model are accepted: TransformerLens 3.x's ``HookedTransformer`` and TransformerLens
4.x's ``TransformerBridge`` (in compatibility mode: TransformerLens' hook names and weight
layout). Everything the tracing engine and the editors need that the two do not offer the same
way goes through the functions here:

* :func:`embed`: the residual stream entering block 0;
* :func:`run_blocks`: blocks ``[start, stop)`` on a residual stream, really skipping the blocks
  below ``start`` (the bridge's own ``start_at_layer`` still runs them);
* :func:`final_logits`: final norm and unembedding of a residual stream;
* :func:`run_block_cached`: one block on the suffix of a prompt whose prefix keys/values are
  cached, with a padding mask (positions follow the mask), returning the block's keys/values;
* :func:`mlp_out` / :func:`mlp_out_bias`: an MLP's ``W_out`` (the parameter itself, or on a
  bridge a view of the Hugging Face weight: in-place writes reach the Hugging Face forward) and
  ``b_out`` (zeros where a model has none);
* :func:`parameter_fingerprint_items`: the parameters that identify a model's weights, named
  the same way on both lines;
* :func:`check_interface`: a cheap self-check per model (blocks run one by one give the model's
  own logits; a suffix on a cached prefix, padded or not, equals the full run) that raises
  :class:`~relation_lens.UnsupportedModelError` naming what failed, instead of letting a
  wrong grid come back with no error.

Keys and values are held in TransformerLens' layout, ``[batch, pos, kv_heads, d_head]``.
No TransformerLens class is named outside this module and :mod:`relation_lens.models`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from relation_lens.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer as Model
else:
    Model = Any

__all__ = ["Model", "tokenizer_of", "decode", "mlp_out", "mlp_out_bias", "is_bridge", "is_hooked_transformer",
           "embed", "run_blocks", "final_logits", "hooked_activation", "hooked_activations", "recording_hooks", "run_block_cached", "block_device", "check_interface",
           "parameter_fingerprint_items", "SELF_CHECK_TOL"]

KV = tuple[Tensor, Tensor]


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge`` (checked by class name, so
    that TransformerLens need not be imported to ask)."""
    return any(k.__name__ == "TransformerBridge" for k in type(model).__mro__)


def is_hooked_transformer(model: Any) -> bool:
    return any(k.__name__ == "HookedTransformer" for k in type(model).__mro__)


def tokenizer_of(model: Model) -> Any:
    """The model's tokenizer; a model without one is refused by name."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise UnsupportedModelError(f"the model {getattr(getattr(model, 'cfg', None), 'model_name', '?')!r} has no "
                                    "tokenizer; relation_lens reads prompts as text (pass tokenizer= when building it)")
    return tok


def decode(model: Model, ids: list[int]) -> str:
    """The text of token ids under the model's tokenizer."""
    return str(tokenizer_of(model).decode(ids))


def mlp_out(model: Model, layer: int) -> Tensor:
    """Block ``layer``'s MLP output matrix ``W_out`` (``[d_mlp, d_model]``): the parameter itself
    (HookedTransformer, GPT-2 bridges) or a view of it (bridges of ``nn.Linear`` models): in-place
    writes change the model."""
    return model.blocks[layer].mlp.W_out


def mlp_out_bias(model: Model, layer: int) -> Tensor:
    """Block ``layer``'s MLP output bias (``[d_model]``); zeros where the model has none."""
    b = getattr(model.blocks[layer].mlp, "b_out", None)
    if isinstance(b, Tensor):
        return b
    W = mlp_out(model, layer)
    return torch.zeros(model.cfg.d_model, dtype=W.dtype, device=W.device)


def block_device(model: Model, layer: int) -> torch.device:
    """The device of block ``layer``'s weights (blocks may be split over devices: ``n_devices``)."""
    return next(model.blocks[layer].parameters()).device


# --- running the model in pieces ---------------------------------------------------------------


def embed(model: Model, tokens: Tensor) -> Tensor:
    """The residual stream entering block 0 for ``tokens`` ``[batch, pos]`` (hooks on the embeddings,
    e.g. ``hook_embed``, apply)."""
    return model(tokens, stop_at_layer=0)


def run_blocks(model: Model, resid: Tensor, start: int, stop: int) -> Tensor:
    """Blocks ``start .. stop - 1`` on ``resid`` ``[batch, pos, d_model]`` (whole prompts from
    position 0, causal attention); the blocks below ``start`` are not run."""
    if stop <= start:
        return resid
    if not is_bridge(model):
        return model(resid, start_at_layer=start, stop_at_layer=stop)
    pos = torch.arange(resid.shape[1])
    for j in range(start, stop):
        resid = _bridge_block(model, j, resid.to(block_device(model, j)), None, pos[None], None)[0]
    return resid


def hooked_activations(model: Model, tokens: Tensor, names: list[str], upto_layer: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The residual after block ``upto_layer`` and the activations at hook points ``names`` (in
    blocks ``<= upto_layer``; names as TransformerLens 3 spells them, aliases on a bridge), from
    one run of the blocks up to that layer."""
    hooks, acts = recording_hooks(names)
    with model.hooks(fwd_hooks=hooks):
        resid = run_blocks(model, embed(model, tokens), 0, upto_layer + 1)
    return resid, acts


def recording_hooks(names: list[str]) -> tuple[list[tuple[str | Callable, Callable]], dict[str, Tensor]]:
    """Forward hooks that keep the activation at each hook point of ``names``, under the name asked
    for (a bridge's ``hook.name`` is its canonical name, not the alias the hook was added under),
    and the dict they fill."""
    acts: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(act, hook):
            acts[name] = act
            return act
        return keep

    return [(name, keeper(name)) for name in names], acts


def hooked_activation(model: Model, tokens: Tensor, name: str, upto_layer: int) -> Tensor:
    """The activation at hook point ``name`` of a block ``<= upto_layer`` (see :func:`hooked_activations`)."""
    return hooked_activations(model, tokens, [name], upto_layer)[1][name]


def final_logits(model: Model, resid: Tensor) -> Tensor:
    """Final norm and unembedding of ``resid`` ``[batch, pos, d_model]`` (after the last block)."""
    if not is_bridge(model):
        if _zero_unembed_bias(model):
            # TransformerLens 3's own final norm and unembedding, less the addition of an all-zero b_U
            # (addmm writes the broadcast bias into its output first: a copy of the logits' size, a
            # twentieth of a SmolLM2 trace); the same numbers bit for bit (tests/test_layout.py)
            x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
            unembed = model.unembed
            return unembed.hook_out(torch.nn.functional.linear(unembed.hook_in(x), unembed.W_U.T.contiguous()))
        return model(resid, start_at_layer=model.cfg.n_layers)  # TransformerLens' own: soft cap included
    logits = model.unembed(model.ln_final(resid))
    # Hugging Face heads that scale the logits after the unembedding (Granite's logits_scaling), which
    # the bridge's unembedding component leaves out; the self-check holds the result to model(tokens)
    scaling = getattr(getattr(model.original_model, "config", None), "logits_scaling", None)
    return logits / scaling if scaling not in (None, 1, 1.0) else logits


# per model: (b_U's identity and version, whether it is all zero), so that the check reads b_U once
_ZERO_BIAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _zero_unembed_bias(model: Model) -> bool:
    """Whether a HookedTransformer's unembedding adds nothing (``b_U`` all zero, no logit soft cap)."""
    b = getattr(model.unembed, "b_U", None)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if not isinstance(b, Tensor) or (cap is not None and cap > 0):
        return False
    key = (id(b), b._version)
    hit = _ZERO_BIAS.get(model)
    if hit is None or hit[0] != key:
        hit = (key, not bool(b.any()))
        _ZERO_BIAS[model] = hit
    return hit[1]


def run_block_cached(model: Model, layer: int, resid: Tensor, prefix: KV | None = None,
                     mask: Tensor | None = None, collect: bool = False) -> tuple[Tensor, KV | None]:
    """Block ``layer`` on ``resid`` ``[batch, S, d_model]``, the suffix of prompts whose first
    ``P`` positions have cached keys/values ``prefix`` (``[batch, P, kv_heads, d_head]`` each).

    ``mask`` ``[batch, P + S]`` (1 = a real token) marks left-padding of the prefix and
    right-padding of the suffix in packed batches; positions count the real tokens. Without it
    every row's positions are ``P .. P + S - 1``. With ``collect``, the block's keys/values
    (prefix and suffix) come back as well."""
    if not is_bridge(model):
        return _hooked_block(model, layer, resid, prefix, mask, collect)
    P = 0 if prefix is None else prefix[0].shape[1]
    S = resid.shape[1]
    if mask is None:
        pos = torch.arange(P, P + S)[None]
        keep = None
    else:
        keep = mask.bool()
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
    return _bridge_block(model, layer, resid, prefix, pos.to(resid.device), keep, collect=collect)


def _hooked_block(model: Model, layer: int, resid: Tensor, prefix: KV | None, mask: Tensor | None,
                  collect: bool) -> tuple[Tensor, KV | None]:
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

    if prefix is not None:
        entry = Entry(prefix[0], prefix[1], frozen=not collect)
    elif collect:
        entry = Entry.init_cache_entry(model.cfg, resid.device, resid.shape[0])
    else:
        entry = None
    kw = {} if mask is None else {"attention_mask": mask.long()}
    y = model.blocks[layer](resid, past_kv_cache_entry=entry, **kw)
    return y, ((entry.past_keys, entry.past_values) if collect and entry is not None else None)


def _rotary(model: Model) -> Any:
    hf = model.original_model
    core = getattr(hf, getattr(hf, "base_model_prefix", ""), hf)
    return getattr(core, "rotary_emb", None)


def _bridge_block(model: Model, layer: int, resid: Tensor, prefix: KV | None, pos: Tensor, keep: Tensor | None,
                  collect: bool = False) -> tuple[Tensor, KV | None]:
    """One bridge block through the Hugging Face layer: a fresh cache holding ``prefix`` (Hugging
    Face layout ``[batch, kv_heads, P, d_head]``) when there is one to hold or keys to collect, a 4-D
    additive mask (causal from the cached offset, and the padding), the positions and, for rotary
    models, their cos/sin (both built once per shape, :func:`_bridge_inputs`)."""
    from transformers import DynamicCache

    P = 0 if prefix is None else prefix[0].shape[1]
    kw = dict(_bridge_inputs(model, resid, P, pos, keep))
    cache = None
    if prefix is not None or collect:
        cache = DynamicCache()
        if prefix is not None:
            cache.update(prefix[0].transpose(1, 2).to(resid.device), prefix[1].transpose(1, 2).to(resid.device), layer)
        kw[_cache_kwarg(model)] = cache
        kw["use_cache"] = True
    out = model.blocks[layer](resid, **kw)
    y = out[0] if isinstance(out, tuple) else out
    kv = None
    if collect:
        assert cache is not None
        lay: Any = cache.layers[layer] if len(cache.layers) > layer else None
        if getattr(lay, "keys", None) is None:
            raise UnsupportedModelError(f"block {layer} of {model.cfg.model_name!r} did not write its keys/values into "
                                        "the cache handed to it; relation_lens cannot reuse a cached prefix on it")
        kv = (lay.keys.transpose(1, 2), lay.values.transpose(1, 2))
    return y, kv


# per model, a handful of recent shapes (the blocks of one batch share one)
_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bridge_inputs(model: Model, resid: Tensor, P: int, pos: Tensor, keep: Tensor | None) -> dict[str, Any]:
    """The mask, positions and rotary cos/sin of a block call; the same for every block of a batch,
    so built once per (model, shape, positions, padding) and reused."""
    B, S, dev = resid.shape[0], resid.shape[1], resid.device
    # positions on the host are keyed by value; a tensor elsewhere (and the padding mask) by identity,
    # with the tensor itself kept in the entry so that its identity cannot be reused while it is there
    pos_key = tuple(pos.flatten().tolist()) if pos.device.type == "cpu" else ("tensor", id(pos))
    keep_key = None if keep is None else ("tensor", id(keep))
    key = (B, S, P, str(dev), resid.dtype, pos_key, keep_key)
    memo = _INPUTS.setdefault(model, {})
    if key in memo:
        return memo[key][0]
    attn_mask = torch.ones(S, P + S, dtype=torch.bool, device=dev).tril(diagonal=P)[None, None].expand(B, 1, S, P + S)
    if keep is not None:
        attn_mask = attn_mask & keep.to(dev)[:, None, None, :]
        # a padded query row that sees nothing would give NaN: let it see itself (its output is never read)
        own = torch.zeros(S, P + S, dtype=torch.bool, device=dev)
        own[torch.arange(S), P + torch.arange(S)] = True
        attn_mask = attn_mask | own[None, None]
    # additive (0 / the dtype's minimum): what eager Hugging Face attention adds to its scores, what SDPA
    # takes as a float mask, and what the attention bridges read as "masked"
    additive = torch.zeros(attn_mask.shape, dtype=resid.dtype, device=dev).masked_fill(
        ~attn_mask, torch.finfo(resid.dtype).min)
    positions = pos.to(dev).expand(B, -1)
    kw: dict[str, Any] = {"attention_mask": additive, "position_ids": positions}
    rot = _rotary(model)
    if rot is not None:
        kw["position_embeddings"] = rot(resid, positions)
    if len(memo) > 16:
        memo.clear()
    memo[key] = (kw, pos, keep)
    return kw


# The keyword under which a bridge block's attention reads a cache: TransformerLens 4.3's attention
# bridges read ``past_key_values`` or ``layer_past``, while transformers 5.x's layers rename
# ``past_key_values`` to ``cache`` on the way down (so only ``layer_past`` reaches most of them);
# some architectures' attention takes the Hugging Face ``cache`` itself. Found once per model.
_CACHE_KWARG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_kwarg(model: Model) -> str:
    if model in _CACHE_KWARG:
        return _CACHE_KWARG[model]
    from transformers import DynamicCache

    x = embed(model, torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device))
    x = x.to(block_device(model, 0))
    pos = torch.arange(2, device=x.device)[None]
    rot = _rotary(model)
    for name in ("layer_past", "cache", "past_key_values"):
        cache = DynamicCache()
        kw: dict[str, Any] = {name: cache, "position_ids": pos, "use_cache": True}
        if rot is not None:
            kw["position_embeddings"] = rot(x, pos)
        with torch.no_grad():
            model.blocks[0](x, **kw)
        if len(cache.layers) > 0 and getattr(cache.layers[0], "keys", None) is not None:
            _CACHE_KWARG[model] = name
            return name
    raise UnsupportedModelError(f"the blocks of {model.cfg.model_name!r} write their keys/values into no cache handed "
                                "to them (tried layer_past=, cache=, past_key_values=); relation_lens cannot reuse a "
                                "cached prefix on this TransformerBridge")


def parameter_fingerprint_items(model: Model) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the model's weights, those inside block ``l`` named ``blocks.{l}.<name>`` on
    both lines (a bridge's own parameter names are the Hugging Face module paths), so that a
    fingerprint can be cut at a layer and the statistics cache keys follow the weights."""
    if not is_bridge(model):
        yield from model.named_parameters()
        return
    in_blocks = set()
    for layer, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            in_blocks.add(id(p))
            yield f"blocks.{layer}.{name.replace('._original_component', '').replace('_original_component.', '')}", p
    for name, p in model.named_parameters():  # embeddings, final norm, unembedding
        if id(p) not in in_blocks:
            yield name.replace("._original_component", ""), p


# --- the self-check ----------------------------------------------------------------------------

SELF_CHECK_TOL = 1e-4  # relative to the largest |value| compared (float32 kernels of other batch shapes);
# half precisions get 16 of their epsilons (a lost prefix or a wrong position moves values by O(1))
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_interface(model: Model) -> None:
    """Once per model: the pieces above must reproduce the model's own forward pass. Raises
    :class:`~relation_lens.UnsupportedModelError` naming the first property that fails:

    1. embedding, the blocks one by one and the final norm and unembedding give the model's logits;
    2. each block on a suffix with the prefix's keys/values cached equals the full run there;
    3. the same with the prefix left-padded and a mask (packed batches) equals it too;
    4. running the blocks returns a residual stream (``d_model`` wide), not logits.
    """
    if model in _CHECKED:
        return
    if not (is_bridge(model) or is_hooked_transformer(model)):
        raise UnsupportedModelError(f"relation_lens works on TransformerLens models (a HookedTransformer, or a "
                                    f"TransformerBridge under TransformerLens 4), not {type(model).__name__}; load "
                                    "models with relation_lens.load_model()")
    if is_bridge(model) and not getattr(model, "compatibility_mode", False):
        raise UnsupportedModelError("this TransformerBridge is not in compatibility mode: call "
                                    "model.enable_compatibility_mode() first (relation_lens reads TransformerLens' "
                                    "hook names and weight layout), or load it with relation_lens.load_model()")
    name = getattr(model.cfg, "model_name", "?")
    try:
        _self_check(model, name)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # a block that cannot be run piece by piece at all
        raise UnsupportedModelError(f"{name!r}: running the model piece by piece failed ({type(exc).__name__}: "
                                    f"{str(exc)[:300]}); relation_lens cannot trace or edit it") from None
    _CHECKED[model] = True


def _self_check(model: Model, name: str) -> None:
    n = min(8, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, n), generator=gen).to(model.cfg.device)
    L = model.cfg.n_layers
    with torch.no_grad():
        want = model(tokens)
        resid = embed(model, tokens)
        resids = [resid]
        kvs = []
        for j in range(L):
            resid, kv = run_block_cached(model, j, resid.to(block_device(model, j)), collect=True)
            if kv is None:
                raise UnsupportedModelError(f"{name!r}: block {j} gave no keys/values to cache")
            resids.append(resid)
            kvs.append(kv)
        if resid.shape[-1] != model.cfg.d_model:
            raise UnsupportedModelError(f"{name!r}: running the blocks returns a tensor {resid.shape[-1]} wide, not "
                                        f"the residual stream (d_model={model.cfg.d_model})")
        got = final_logits(model, resid).to(want.device)
        _close(name, "the blocks run one by one, then the final norm and unembedding, do not give the model's own "
                     "logits", got, want)
        piece = run_blocks(model, resids[0], 0, L)
        _close(name, "run_blocks over every block does not give the residual of the full run", piece, resids[L])
        P = n // 2
        for j in range(L):
            keys, values = kvs[j]
            y, _ = run_block_cached(model, j, resids[j][:, P:], (keys[:, :P], values[:, :P]))
            _close(name, f"block {j} run on a suffix with the prefix's keys/values cached differs from the full run",
                   y, resids[j + 1][:, P:])
            pad = 2  # the prefix left-padded by two positions, the padding masked
            pk = torch.cat([keys[:, :1].expand(-1, pad, -1, -1), keys[:, :P]], 1)
            pv = torch.cat([values[:, :1].expand(-1, pad, -1, -1), values[:, :P]], 1)
            mask = torch.ones(1, pad + n, dtype=torch.long, device=y.device)
            mask[:, :pad] = 0
            y2, _ = run_block_cached(model, j, resids[j][:, P:], (pk, pv), mask=mask)
            _close(name, f"block {j} on a cached prefix left-padded under a mask (packed batches) differs from the "
                         "full run (positions or masking)", y2, resids[j + 1][:, P:])


def _close(name: str, what: str, got: Tensor, want: Tensor) -> None:
    tol = max(SELF_CHECK_TOL, 16 * torch.finfo(want.dtype).eps) if want.is_floating_point() else SELF_CHECK_TOL
    got, want = got.float(), want.float().to(got.device)
    scale = max(want.abs().max().item(), 1e-6)
    gap = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not gap <= tol * scale:
        raise UnsupportedModelError(f"{name!r}: {what} (largest gap {gap:.3g} of {scale:.3g}); relation_lens would "
                                    "return wrong grids on this model, so it refuses it")
