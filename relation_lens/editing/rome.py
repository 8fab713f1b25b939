"""Rank-one editing: ROME and relation-ROME, written into ``HookedTransformer`` MLP weights.

Both methods treat the output matrix of one MLP layer as a linear key-value memory. In
TransformerLens' ``x @ W`` layout the MLP output is ``k @ W_out + b_out`` with the key
``k = blocks.{l}.mlp.hook_post`` (``[d_mlp]``) and ``W_out`` of shape ``[d_mlp, d_model]``.

1. key ``k*``: the key at the *key token*, averaged over the edit prompt behind a few short random
   prefixes that the model itself generates. ROME (Meng et al. 2022) keys on the last subject
   token; relation-ROME (Li, Chen & Wang 2024) keys on the last relation token (the prompt's last
   token) in an early layer (index 4, the 5th MLP).
2. value ``v*``: the MLP output at the key token is optimised (Adam on an additive ``delta``) so the
   model predicts ``target_new`` on the prefixed prompts, with a KL term that keeps the
   prediction on ``"{subject} is a"`` unchanged, weight decay on ``delta`` and a norm clamp.
   ROME's learning rate (0.5) is tied to GPT-2 XL's activation scale; by default
   (``v_lr_scale="rms"``) Adam works on ``delta / rms(v_init)`` so the same setting behaves alike on
   models of any width and scale; ``v_lr_scale="absolute"`` is ROME's exact parameterisation.
3. the update, closed form with ``C = E[k k^T]`` (:class:`~relation_lens.key_statistics.KeyStatistics`)::

       u = C^-1 k*,   r = v* - (k* @ W_out + b_out),   W_out' = W_out + outer(u, r) / (u . k*)

   so that ``k* @ W_out' + b_out = v*`` exactly, and keys orthogonal to ``u`` in the C-metric are
   untouched. ``key_mode="symmetric"`` (default) uses the averaged ``k*`` in every term (the r-ROME
   fix, Gupta et al. 2024); ``"asymmetric"`` reproduces ROME's original code, which used the
   unprefixed prompt's key in the residual and the denominator, for comparison.

:func:`~relation_lens.compute_edit` never changes the model; :func:`~relation_lens.apply_edit`
writes the update in place and returns an :class:`~relation_lens.Edit` that restores the saved
weights bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch

from relation_lens import presets
from relation_lens.editing.method import EditMethod
from relation_lens.editing.requests import EditConfig, EditRequest, check_editable
from relation_lens.editing.updates import RankOneUpdate
from relation_lens.editing.value import optimise_value
from relation_lens.errors import EditError, shorten
from relation_lens.guards import model_lock
from relation_lens.key_statistics import KeyStatistics
from relation_lens.model_interface import Model, mlp_out, mlp_out_bias


def default_layer(model: Model, method: str, request: EditRequest | None = None, alphaedit: bool = False) -> int:
    """The layer ``method`` (``"rome"`` or ``"relation_rome"``) edits on ``model`` by default, from the
    model's presets (:func:`relation_lens.presets.for_model`): :func:`relation_lens.tune`'s choice where
    it made one (with AlphaEdit when ``alphaedit``), else the presets' layer: the published one for
    GPT-2 XL and GPT-J, otherwise GPT-2 XL's scaled to depth (relation-ROME the 5th of 48 layers, ROME
    the 18th), with a warning. Never a trace per request: ``rl.locate`` reads a model's layers off its
    traces once (``request`` is accepted for compatibility and not read)."""
    if method not in ("relation_rome", "rome"):
        raise EditError(f"method {method!r} is not 'relation_rome' or 'rome'")
    layer = presets.for_model(model).layer(method, alphaedit)
    if layer is None:  # presets that name no layer for the method: the paper's rule scaled to depth
        layer = presets.depth_scaled(model.cfg.n_layers).layers[method]
    return int(layer)


def compute_rank_one(model: Model, request: EditRequest, *, method: str, key: str, layer: int | None, stats,
                     config: EditConfig, progress: bool = False, preserve=None) -> RankOneUpdate:
    """ROME's update (module docstring) keyed on ``key`` at ``layer`` (``None``: :func:`default_layer`)."""
    which = "rome" if key == "subject" else "relation_rome"
    own = presets.for_model(model)
    if layer is None:
        check_editable(model, 0)
        layer = default_layer(model, which, request, preserve is not None)
        layer_source = own.source_of(which, preserve is not None)
    else:
        layer_source = "given (layer=)"
    check_editable(model, layer)
    if stats is not None and stats.layer != layer:
        raise EditError(f"key statistics are for layer {stats.layer}, but the edit is at layer {layer}")
    val = optimise_value(model, request, layer, key, config)
    k_star, k_plain, target_init, delta = val.k_star, val.k_plain, val.target_init, val.delta
    positions, prefixes, history, bos = val.positions, val.prefixes, val.history, config.prepend_bos
    prompt_text = request.text
    v_star = (target_init + delta.detach()).double().cpu()

    # 3. the closed form
    if stats is None:
        stats = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                      prepend_bos=bos)
        stats_source = f"computed or cached by default: {stats.corpus or 'corpus unnamed'}"
    else:
        stats_source = f"given (stats=): {stats.corpus or 'corpus unnamed'}"
    W = mlp_out(model, layer).detach().double().cpu()
    b = mlp_out_bias(model, layer).detach().double().cpu()
    k_res = k_star if config.key_mode == "symmetric" else k_plain
    if preserve is None:
        u = stats.inverse_times(k_star, config.ridge)
        right = (v_star - (k_res @ W + b)) / torch.dot(u, k_res)
    else:  # AlphaEdit's projected solve with this one key and the whole residual: u r^T
        right = v_star - (k_res @ W + b)
        u = preserve.solve(stats, k_star[None], torch.ones(1, 1, dtype=torch.float64))[:, 0]
    if not (torch.isfinite(u).all() and torch.isfinite(right).all()):
        raise EditError(f"the update for {shorten(prompt_text)} -> {request.target_new!r} holds NaN or Inf "
                        "(singular key statistics? try EditConfig(ridge=1e-4)); the model was not changed")
    return RankOneUpdate(
        layer=layer, left=u.to(W.dtype), right=right, key=k_star, value=v_star, method=method, request=request,
        key_positions=tuple(positions),
        info={"history": history, "prefixes": prefixes, "key_mode": config.key_mode,
              "sources": {"layer": layer_source, "statistics": stats_source,
                          "settings": f"EditConfig fields other than ROME's: {config.changed()}; the model's "
                                      f"presets ({own.name}): {own.source}"}})


class RankOneMethod(EditMethod):
    """ROME's rank-one update at one layer (``layer=``), keyed on :attr:`key`."""

    options = frozenset({"layer"})

    def check_options(self, given):
        if set(given) - self.options:
            raise EditError(f"layers=, mom2_update_weight= and values= are for 'memit' / 'relation_memit', "
                            f"not {self.name!r}")

    def compute(self, model: Model, request: Any, *, config: EditConfig, stats: Any, preserve: Any, progress: bool,
                layer: int | None = None) -> RankOneUpdate:
        with model_lock(model):
            return compute_rank_one(model, self.one_request(request), method=self.name, key=self.key, layer=layer,
                                    stats=stats, config=config, progress=progress, preserve=preserve)


class Rome(RankOneMethod):
    """ROME (Meng et al. 2022): the key at the last subject token; the default layer from subject tracing."""

    name, key = "rome", "subject"


class RelationRome(RankOneMethod):
    """relation-ROME (Li, Chen & Wang 2024): the key at the last relation token; layer index 4."""

    name, key = "relation_rome", "relation"
