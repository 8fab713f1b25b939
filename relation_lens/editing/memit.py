"""Batch editing: MEMIT and relation-MEMIT.

MEMIT (Meng et al. 2023, kmeng01/memit ``memit/memit_main.py``) writes a batch of facts into the MLP
output matrices of a range of layers ``L_1 < ... < L_m``:

1. ``z``: for each request, the residual stream after block ``L_m`` at the key token is optimised
   (:func:`relation_lens.editing.value.optimise_value` with ``init="resid"``: MEMIT's ``compute_z``,
   the same loss as ROME's, its clamp and weight decay relative to that residual) so the model predicts the
   new target; ``z = target_init + delta``.
2. for ``L_i`` in order, with the updates of the layers before it already written: the keys ``K``
   (``hook_post`` at the key token; per request the mean of the plain prompt's key and the mean of
   the prefixed prompts' keys, MEMIT's ``compute_ks``), the residual still missing at ``L_m``,
   ``R = (z - h_{L_m}) / (m - i)`` (the critical-path spread), and the covariance-weighted least
   squares ``dW = (lambda C + K^T K)^-1 K^T R`` with ``C = E[k k^T]``
   (:class:`~relation_lens.key_statistics.KeyStatistics`) and ``lambda = mom2_update_weight``.
   The solve is in float64.

relation-MEMIT keys on the last relation token (the prompt's last token), as relation-ROME does;
MEMIT on the last subject token.

AlphaEdit's projection (``preserve=``) is :mod:`relation_lens.editing.alphaedit`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from relation_lens import presets
from relation_lens.distributed import gather, ranks
from relation_lens.editing.alphaedit import Preserve
from relation_lens.editing.method import EditMethod
from relation_lens.editing.prefixes import generate_prefixes, key_rows
from relation_lens.editing.requests import EditConfig, EditRequest, check_editable
from relation_lens.editing.updates import BatchUpdate
from relation_lens.editing.value import Value, optimise_value
from relation_lens.errors import EditError
from relation_lens.guards import model_lock
from relation_lens.key_statistics import KeyStatistics
from relation_lens.model_interface import Model, embed, hooked_activation, mlp_out, run_blocks
from relation_lens.spans import right_pad

BATCH_METHODS = ("memit", "relation_memit")


def memit_config(**overrides) -> EditConfig:
    """``EditConfig`` with MEMIT's GPT-2 XL value-optimisation settings (``overrides`` replace fields)."""
    return EditConfig(**{**presets.MEMIT_GPT2_XL, **overrides})


def default_layers(model: Model, method: str) -> tuple[int, ...]:
    """MEMIT's layers scaled to depth (:func:`relation_lens.presets.depth_scaled`): GPT-2 XL's 13-17 of
    48 layers at the same relative depth (relation-MEMIT: as many layers ending at relation-ROME's layer
    scaled the same way), at least one layer."""
    return presets.depth_scaled(model.cfg.n_layers).memit_layers[method]


def batch_defaults(model: Model, method: str, layers, config, mom2_update_weight, alphaedit: bool = False):
    """``(layers, config, lambda)`` with the method's defaults filled in: MEMIT's GPT-2 XL settings,
    except on a model with its own presets (:func:`relation_lens.presets.for_model`; the default
    model: :data:`~relation_lens.presets.DEFAULT_MODEL_MEMIT`, and what :func:`relation_lens.tune`
    chose for the method, with AlphaEdit when ``alphaedit``: :data:`~relation_lens.presets.DEFAULT_MODEL_TUNED`)."""
    own = presets.for_model(model)
    chosen = own.chosen(method, alphaedit)
    if layers is None:
        layers = chosen.get("layers") or own.memit_layers.get(method) or default_layers(model, method)
    if mom2_update_weight is None:
        mom2_update_weight = chosen.get("mom2_update_weight",
                                        own.mom2_update_weight.get(method, presets.MOM2_UPDATE_WEIGHT))
    return tuple(layers), config or memit_config(**own.edit_fields(method, alphaedit)), float(mom2_update_weight)


def statistics_for(model: Model, layers, stats: dict | None, config: EditConfig, progress: bool = False) -> dict:
    """``{layer: KeyStatistics}`` for ``layers``: those given, the others computed (or read from the disk
    cache) with ``config``'s corpus size and BOS setting."""
    stats = dict(stats or {})
    for layer in layers:
        if layer not in stats:
            stats[layer] = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                                 prepend_bos=config.prepend_bos)
        elif stats[layer].layer != layer:
            raise EditError(f"key statistics for layer {stats[layer].layer} were given for layer {layer}")
    return stats


def compute_batch_edit(model: Model, requests: EditRequest | Sequence[EditRequest], *, method: str = "relation_memit",
                       layers: Sequence[int] | None = None, stats: dict | None = None,
                       config: EditConfig | None = None, mom2_update_weight: float | None = None,
                       preserve: Preserve | None = None, progress: bool = False,
                       values: Any = None) -> BatchUpdate:  # a ValueCache or None, checked by compute_batch_edit
    """MEMIT / relation-MEMIT for a batch of requests (see the module docstring). Pure: the model is
    as it was afterwards (the layers' updates are written while later layers' keys are read, then
    taken back bit for bit).

    Args:
        layers: MLP layers, ascending; ``None``: :func:`default_layers` (the default model:
            :data:`DEFAULT_MODEL_MEMIT`).
        stats: ``{layer: KeyStatistics}``; missing layers are computed or read from the cache.
        config: value optimisation and prefixes (``None``: :func:`memit_config`).
        mom2_update_weight: MEMIT's ``lambda`` (``None``: 20000 as on GPT-2 XL; the default model: :data:`DEFAULT_MODEL_MEMIT`).
        preserve: AlphaEdit's projection (:class:`Preserve`); ``None`` is MEMIT's own solve.
        values: a :class:`ValueCache` that keeps each request's ``z`` (MEMIT's ``cache_template``), so
            batches of the same requests on the same weights skip the value optimisation.
    """
    if method not in BATCH_METHODS:
        raise EditError(f"method {method!r} is not one of {list(BATCH_METHODS)}")
    requests = (requests,) if isinstance(requests, EditRequest) else tuple(requests)
    if not requests or not all(isinstance(r, EditRequest) for r in requests):
        raise EditError("compute_batch_edit needs one or more EditRequests")
    check_editable(model, 0)
    layers, config, mom2_update_weight = batch_defaults(model, method, layers, config, mom2_update_weight,
                                                        preserve is not None)
    if not layers or list(layers) != sorted(set(layers)):
        raise EditError(f"layers {layers!r} must be distinct and ascending")
    for layer in layers:
        check_editable(model, layer)
    if mom2_update_weight < 0:
        raise EditError(f"mom2_update_weight must be >= 0, got {mom2_update_weight}")
    with model_lock(model):
        stats = statistics_for(model, layers, stats, config, progress)
        z_layer = layers[-1]
        key = "subject" if method == "memit" else "relation"
        if values is not None and not isinstance(values, ValueCache):
            raise EditError(f"values= takes a ValueCache, got {type(values).__name__}")
        # the context prefixes generated once for the batch (MEMIT's template cache), not once per request
        fixed = config if config.prefixes is not None else dataclasses.replace(
            config, prefixes=tuple(generate_prefixes(model, config)))
        if values is None:
            found = [optimise_value(model, r, z_layer, key, fixed, init="resid") for r in requests]
        else:
            found = values.values(model, requests, z_layer, key, fixed)
        Z = torch.stack([(v.target_init + v.delta).double().cpu() for v in found])
        prefixes = found[0].prefixes
        rows, plain_rows = key_rows(model, requests, key, prefixes, config)
        originals = {l: mlp_out(model, l).detach().clone() for l in layers}
        deltas, keys, residuals = {}, {}, {}
        try:
            for i, layer in enumerate(layers):
                K = memit_keys(model, rows, len(requests), layer)
                H = rows_at(model, plain_rows, z_layer, None)
                R = (Z - H) / (len(layers) - i)  # the residual spread over the layers left
                if preserve is None:
                    C = stats[layer].moment.double()
                    dW = torch.linalg.solve(mom2_update_weight * C + K.T @ K, K.T @ R)
                else:
                    dW = preserve.solve(stats[layer], K, R)
                if not torch.isfinite(dW).all():
                    raise EditError(f"the MEMIT update at layer {layer} holds NaN or Inf; the model was not changed")
                deltas[layer], keys[layer], residuals[layer] = dW, K, R
                W = mlp_out(model, layer)
                with torch.no_grad():  # as MEMIT: written while the next layers' keys are read
                    W.copy_(originals[layer] + dW.to(W.device, W.dtype))
        finally:
            with torch.no_grad():
                for layer, W0 in originals.items():
                    mlp_out(model, layer).copy_(W0)
    return BatchUpdate(method=method, layers=tuple(layers), deltas=deltas, keys=keys, residuals=residuals, targets=Z,
                       requests=requests,
                       info={"z_layer": z_layer, "mom2_update_weight": mom2_update_weight, "prefixes": prefixes,
                             "alphaedit": preserve is not None,
                             "histories": [v.history for v in found]})


@torch.no_grad()
def rows_at(model: Model, rows: Sequence[tuple], layer: int, hook: str | None, chunk: int = 64) -> Tensor:
    """float64 ``[len(rows), d]``: for each ``(tokens, position, ...)`` row, ``hook`` of block ``layer``
    (``None``: the residual stream after the block) at that position; right-padded batches of
    ``chunk`` rows, sorted by length so each batch pads little (causal attention: the padding is never
    read)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[Tensor] = [torch.empty(0)] * len(rows)
    for c in range(0, len(order), chunk):
        idx = order[c:c + chunk]
        batch = right_pad(model, [rows[i][0] for i in idx]).to(model.cfg.device)
        if hook is None:
            acts = run_blocks(model, embed(model, batch), 0, layer + 1)
        else:
            acts = hooked_activation(model, batch, f"blocks.{layer}.{hook}", layer)
        picked = acts[torch.arange(len(idx)), torch.tensor([rows[i][1] for i in idx])].double().cpu()
        for r, i in enumerate(idx):
            out[i] = picked[r]
    return torch.stack(out)


def memit_keys(model: Model, rows: Sequence[tuple], n_requests: int, layer: int) -> Tensor:
    """MEMIT's ``compute_ks``: per request, the mean over context types (the plain prompt; each group
    of generated prefixes) of the mean key (``hook_post``) within the type; ``[request, d_mlp]``."""
    acts = rows_at(model, rows, layer, "mlp.hook_post")
    groups: dict[int, dict[int, list[int]]] = {}
    for i, (_, _, r, g) in enumerate(rows):
        groups.setdefault(r, {}).setdefault(g, []).append(i)
    return torch.stack([torch.stack([acts[idx].mean(0) for _, idx in sorted(groups[j].items())]).mean(0)
                        for j in range(n_requests)])


class ValueCache:
    """Each request's optimised ``z`` for MEMIT-style edits, kept between calls (MEMIT's
    ``cache_template``, which keeps them on disk by case id): pass the same cache as ``values=`` to
    :func:`compute_batch_edit` to edit batches of the same requests without optimising their values
    again, e.g. to compare batch sizes. A ``z`` depends on the weights it was optimised on: the cache
    fingerprints them (a float64 sum of every parameter) and is emptied when they change.

    ``spread=True``: under torch.distributed, the ``z``'s a call has to optimise are shared over the ranks
    (request ``j`` by rank ``j % world_size``) and gathered, so that every rank holds all of them; every
    rank must then make the same calls (as in :func:`relation_lens.evaluate_sequence`, where each rank
    writes the same sequence of edits)."""

    def __init__(self, spread: bool = False):
        self._found: dict = {}
        self._fingerprint: tuple | None = None
        self.hits = 0
        self.spread = spread

    def __len__(self) -> int:
        return len(self._found)

    def values(self, model: Model, requests, layer: int, key: str, config: EditConfig) -> list:
        fingerprint = (id(model), tuple(p.detach().double().sum().item() for p in model.parameters()))
        if fingerprint != self._fingerprint:
            self._found, self._fingerprint = {}, fingerprint
        entries = [(r, layer, key, config) for r in requests]
        missing: list = []
        for entry in entries:
            if entry in self._found:
                self.hits += 1
            elif entry not in missing:
                missing.append(entry)
        r = ranks() if self.spread and missing else None
        if r is not None and r.world_size > 1:
            mine = {j: _moved(_optimised(model, missing[j]), "cpu") for j in r.share(len(missing))}
            device = model.cfg.device
            for part in gather(mine, r):
                for j, value in part.items():
                    self._found[missing[j]] = _moved(value, device)
        else:
            for entry in missing:
                self._found[entry] = _optimised(model, entry)
        return [self._found[entry] for entry in entries]


def _optimised(model: Model, entry: tuple) -> Value:
    request, layer, key, config = entry
    return optimise_value(model, request, layer, key, config, init="resid")


def _moved(value: Value, device) -> Value:
    """``value`` with its vectors on ``device`` (to gather it between ranks: NCCL gathers no CUDA objects)."""
    return dataclasses.replace(value, target_init=value.target_init.to(device), delta=value.delta.to(device))


class BatchMethod(EditMethod):
    """MEMIT's batch update over ``layers=``, keyed on :attr:`key`."""

    batch = True
    options = frozenset({"layers", "mom2_update_weight", "values"})
    unread = frozenset({"ridge", "key_mode"})  # MEMIT's solve has lambda C + K^T K, and no asymmetric key

    def default_config(self, model: Model, alphaedit: bool = False) -> EditConfig:
        return batch_defaults(model, self.name, None, None, None, alphaedit)[1]

    def check_options(self, given):
        if "layer" in given:
            raise EditError(f"{self.name} edits several layers: pass layers=, not layer=")
        super().check_options(given)

    def compute(self, model: Model, request: Any, *, config: EditConfig, stats: Any, preserve: Any, progress: bool,
                layers: Sequence[int] | None = None, mom2_update_weight: float | None = None,
                values: Any = None) -> BatchUpdate:  # a ValueCache or None, checked by compute_batch_edit
        return compute_batch_edit(model, self.many_requests(request), method=self.name, layers=layers, stats=stats,
                                  config=config, mom2_update_weight=mom2_update_weight, preserve=preserve,
                                  progress=progress, values=values)


class Memit(BatchMethod):
    """MEMIT (Meng et al. 2023): keys at the last subject token, layers 13-17 of 48 scaled to depth."""

    name, key = "memit", "subject"


class RelationMemit(BatchMethod):
    """relation-MEMIT: MEMIT keyed at the last relation token, layers ending at relation-ROME's."""

    name, key = "relation_memit", "relation"
