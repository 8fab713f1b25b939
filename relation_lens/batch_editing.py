"""Batch editing: MEMIT and relation-MEMIT, and AlphaEdit's null-space projection.

MEMIT (Meng et al. 2023, kmeng01/memit ``memit/memit_main.py``) writes a batch of facts into the MLP
output matrices of a range of layers ``L_1 < ... < L_m``:

1. ``z``: for each request, the residual stream after block ``L_m`` at the key token is optimised
   (:func:`relation_lens.editing._value` with ``init="resid"``: MEMIT's ``compute_z``, the same
   loss as ROME's, its clamp and weight decay relative to that residual) so the model predicts the
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

AlphaEdit (Fang et al., ICLR 2025; jianghoucheng/AlphaEdit ``AlphaEdit_main.py``) replaces the
solve by ``dW = (P (K^T K + C_p) + l2 I)^-1 P K^T R``, where ``P`` projects onto the null space of
the key statistics (the eigenvectors of ``C`` whose eigenvalues are under ``threshold``) and
``C_p = K_p^T K_p`` accumulates the keys of the facts edited earlier in a sequence. Every row of
``dW`` lies in the range of ``P``, so a preserved key ``k`` (``P k = 0``) sees ``k^T dW = 0``.
:class:`Preserve` holds ``P`` per layer and the accumulated keys; pass it as ``preserve=`` to
:func:`compute_batch_edit` (or :func:`relation_lens.compute_edit`, for ROME and relation-ROME too:
their rank-one update then uses the same projected solve with their one key and full residual).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.guards import model_lock
from relation_lens._results import ValueEquality
from relation_lens.editing import (EditConfig, EditRequest, _check_model, _key_position, _value, generate_prefixes,
                                   prefix_counts)
from relation_lens.spans import right_pad
from relation_lens.errors import EditError

BATCH_METHODS = ("memit", "relation_memit")
# MEMIT's GPT-2 XL hyper-parameters (hparams/MEMIT/gpt2-xl.json): its value optimisation settings and
# its context templates (memit_main.get_context_templates: 5 self-generated prefixes of 10 tokens, one
# started from each of its five seed words, beside the plain prompt)
MEMIT_PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
MEMIT_GPT2_XL: dict[str, Any] = {"v_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
                                 "kl_factor": 0.0625, "prefix_lengths": ((10, 5),),
                                 "prefix_seeds": MEMIT_PREFIX_SEEDS}
MOM2_UPDATE_WEIGHT = 20_000.0  # MEMIT's lambda on GPT-2 XL


def memit_config(**overrides) -> EditConfig:
    """``EditConfig`` with MEMIT's GPT-2 XL value-optimisation settings (``overrides`` replace fields)."""
    return EditConfig(**{**MEMIT_GPT2_XL, **overrides})


def default_layers(model, method: str) -> tuple[int, ...]:
    """MEMIT's layers scaled to depth: GPT-2 XL's 13-17 of 48 layers (relation-MEMIT: the 5 layers
    ending at relation-ROME's layer scaled the same way), at least one layer."""
    L = model.cfg.n_layers
    if method == "memit":
        lo, hi = round(13 * L / 48), round(17 * L / 48)
    else:
        from relation_lens.editing import RELATION_ROME_LAYER

        hi = RELATION_ROME_LAYER if L > RELATION_ROME_LAYER else L // 2
        lo = max(0, hi - max(0, round(4 * L / 48)))
    return tuple(range(lo, max(lo, hi) + 1))


# The default model's MEMIT settings, chosen on the tuning split (counterfactual records 400-429, disjoint
# from the records the experiments report) by experiments/tune_memit.py
# (experiments/results/memit_tuning.md): MEMIT's lambda of 20000 is tied to GPT-2 XL's key scale and
# leaves no room for an update on the small model's keys.
DEFAULT_MODEL_MEMIT: dict[str, Any] = {"layers": {"memit": (1, 2), "relation_memit": (3, 4)},
                                       "mom2_update_weight": {"memit": 10.0, "relation_memit": 30.0}}


def batch_defaults(model, method: str, layers, config, mom2_update_weight):
    """``(layers, config, lambda)`` with the method's defaults filled in: MEMIT's GPT-2 XL settings,
    except on the embedded default model (:data:`DEFAULT_MODEL_MEMIT`)."""
    from relation_lens.models import DEFAULT_MODEL_NAME

    own = model.cfg.model_name == DEFAULT_MODEL_NAME
    if layers is None:
        layers = DEFAULT_MODEL_MEMIT["layers"][method] if own else default_layers(model, method)
    if mom2_update_weight is None:
        mom2_update_weight = DEFAULT_MODEL_MEMIT["mom2_update_weight"][method] if own else MOM2_UPDATE_WEIGHT
    return tuple(layers), config or memit_config(), float(mom2_update_weight)


@dataclass
class Preserve:
    """AlphaEdit's projection state for a model: per layer, the null-space projector ``P`` of its key
    statistics (eigenvalues of ``C`` under ``threshold``; AlphaEdit's GPT-2 XL setting 2e-2), the
    regulariser ``l2`` (10), and ``C_p``, the summed ``K^T K`` of the keys edited so far (updated by
    :meth:`remember` after each edit of a sequence)."""

    threshold: float = 2e-2
    l2: float = 10.0
    projectors: dict[int, Tensor] = field(default_factory=dict)
    edited: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def default_for(cls, model) -> "Preserve":
        """AlphaEdit's GPT-2 XL settings, except on the embedded default model: ``l2=0.1`` (its keys are
        on a smaller scale; 10 stops every edit; experiments/tune_alphaedit.py,
        experiments/results/alphaedit_tuning.md)."""
        from relation_lens.models import DEFAULT_MODEL_NAME

        return cls(l2=0.1) if model.cfg.model_name == DEFAULT_MODEL_NAME else cls()

    def projector(self, stats) -> Float[Tensor, "d_mlp d_mlp"]:
        if stats.layer not in self.projectors:
            C = stats.moment.double()
            eigvals, eigvecs = torch.linalg.eigh((C + C.T) / 2)
            null = eigvecs[:, eigvals < self.threshold]
            self.projectors[stats.layer] = null @ null.T
        return self.projectors[stats.layer]

    def solve(self, stats, K: Tensor, R: Tensor) -> Tensor:
        """``(P (K^T K + C_p) + l2 I)^-1 P K^T R`` in float64, ``[d_mlp, d_model]``."""
        P = self.projector(stats)
        K, R = K.double(), R.double()
        Cp = self.edited.get(stats.layer, torch.zeros_like(P))
        A = P @ (K.T @ K + Cp) + self.l2 * torch.eye(P.shape[0], dtype=torch.float64)
        return torch.linalg.solve(A, P @ K.T @ R)

    def remember(self, update) -> None:
        """Add the keys of an edit just applied to ``C_p`` (AlphaEdit's ``cache_c``), per layer."""
        for layer, K in update.layer_keys().items():
            K = K.double()
            self.edited[layer] = self.edited.get(layer, 0) + K.T @ K


@dataclass(frozen=True, repr=False, eq=False)
class BatchUpdate(ValueEquality):
    """One MEMIT-style update: ``W_out[l] += deltas[l]`` for each layer ``l``; a value, applying it is
    separate (:func:`relation_lens.apply_edit`)."""

    method: str
    layers: tuple[int, ...]
    deltas: dict[int, Float[Tensor, "d_mlp d_model"]]  # float64
    keys: dict[int, Float[Tensor, "request d_mlp"]]  # K per layer, float64
    residuals: dict[int, Float[Tensor, "request d_model"]]  # R per layer (already divided), float64
    targets: Float[Tensor, "request d_model"]  # z
    requests: tuple[EditRequest, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def layer_deltas(self) -> dict[int, Tensor]:
        return dict(self.deltas)

    def layer_keys(self) -> dict[int, Tensor]:
        return dict(self.keys)

    def __repr__(self) -> str:
        norms = ", ".join(f"L{l} {self.deltas[l].norm():.3g}" for l in self.layers)
        return f"BatchUpdate({self.method}, {len(self.requests)} request(s); ||delta||_F {norms})"


def compute_batch_edit(model, requests: EditRequest | Sequence[EditRequest], *, method: str = "relation_memit",
                       layers: Sequence[int] | None = None, stats: dict | None = None,
                       config: EditConfig | None = None, mom2_update_weight: float | None = None,
                       preserve: Preserve | None = None, progress: bool = False,
                       values: "ValueCache | None" = None) -> BatchUpdate:
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
    from relation_lens.key_statistics import KeyStatistics

    if method not in BATCH_METHODS:
        raise EditError(f"method {method!r} is not one of {list(BATCH_METHODS)}")
    requests = (requests,) if isinstance(requests, EditRequest) else tuple(requests)
    if not requests or not all(isinstance(r, EditRequest) for r in requests):
        raise EditError("compute_batch_edit needs one or more EditRequests")
    _check_model(model, 0)
    layers, config, mom2_update_weight = batch_defaults(model, method, layers, config, mom2_update_weight)
    if not layers or list(layers) != sorted(set(layers)):
        raise EditError(f"layers {layers!r} must be distinct and ascending")
    for layer in layers:
        _check_model(model, layer)
    if mom2_update_weight < 0:
        raise EditError(f"mom2_update_weight must be >= 0, got {mom2_update_weight}")
    stats = dict(stats or {})
    with model_lock(model):
        for layer in layers:
            if layer not in stats:
                stats[layer] = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                                     prepend_bos=config.prepend_bos)
            elif stats[layer].layer != layer:
                raise EditError(f"key statistics for layer {stats[layer].layer} were given for layer {layer}")
        z_layer = layers[-1]
        key_method = "rome" if method == "memit" else "relation_rome"
        if values is not None and not isinstance(values, ValueCache):
            raise EditError(f"values= takes a ValueCache, got {type(values).__name__}")
        # the context prefixes generated once for the batch (MEMIT's template cache), not once per request
        fixed = config if config.prefixes is not None else dataclasses.replace(
            config, prefixes=tuple(generate_prefixes(model, config)))
        if values is None:
            found = [_value(model, r, z_layer, key_method, fixed, init="resid") for r in requests]
        else:
            found = values.values(model, requests, z_layer, key_method, fixed)
        Z = torch.stack([(v.target_init + v.delta).double().cpu() for v in found])
        prefixes = found[0].prefixes
        key_rows, plain_rows = _key_rows(model, requests, key_method, prefixes, config)
        originals = {l: model.blocks[l].mlp.W_out.detach().clone() for l in layers}
        deltas, keys, residuals = {}, {}, {}
        try:
            for i, layer in enumerate(layers):
                K = _memit_keys(model, key_rows, len(requests), layer)
                H = _rows_at(model, plain_rows, z_layer, None)
                R = (Z - H) / (len(layers) - i)  # the residual spread over the layers left
                if preserve is None:
                    C = stats[layer].moment.double()
                    dW = torch.linalg.solve(mom2_update_weight * C + K.T @ K, K.T @ R)
                else:
                    dW = preserve.solve(stats[layer], K, R)
                if not torch.isfinite(dW).all():
                    raise EditError(f"the MEMIT update at layer {layer} holds NaN or Inf; the model was not changed")
                deltas[layer], keys[layer], residuals[layer] = dW, K, R
                W = model.blocks[layer].mlp.W_out
                with torch.no_grad():  # as MEMIT: written while the next layers' keys are read
                    W.copy_(originals[layer] + dW.to(W.device, W.dtype))
        finally:
            with torch.no_grad():
                for layer, W0 in originals.items():
                    model.blocks[layer].mlp.W_out.copy_(W0)
    return BatchUpdate(method=method, layers=layers, deltas=deltas, keys=keys, residuals=residuals, targets=Z,
                       requests=requests,
                       info={"z_layer": z_layer, "mom2_update_weight": mom2_update_weight, "prefixes": prefixes,
                             "alphaedit": preserve is not None,
                             "histories": [v.history for v in found]})


def _key_rows(model, requests: Sequence[EditRequest], method: str, prefixes: Sequence[str],
              config: EditConfig) -> tuple[list, list]:
    """Tokenise once what MEMIT's ``compute_ks`` reads: per request and context template, ``(tokens,
    key position, request index, context type)`` (type 0 the plain prompt, then one per group of
    generated prefixes); and the plain prompts' ``(tokens, key position)``."""
    groups, start = [(0, 1)], 1
    for count in prefix_counts(config) if config.prefixes is None else (len(prefixes) - 1,):
        if count:
            groups.append((start, start + count))
        start += count
    rows, plain = [], []
    for j, request in enumerate(requests):
        for g, (a, b) in enumerate(groups):
            for prefix in prefixes[a:b]:
                head = prefix.replace("{}", "")
                toks, pos = _key_position(model, head + request.text, len(head) + request.prompt.index("{}"),
                                          request.subject, method, config.prepend_bos)
                rows.append((toks, pos, j, g))
                if g == 0:
                    plain.append((toks, pos))
    return rows, plain


@torch.no_grad()
def _rows_at(model, rows: Sequence[tuple], layer: int, hook: str | None, chunk: int = 64) -> Tensor:
    """float64 ``[len(rows), d]``: for each ``(tokens, position, ...)`` row, ``hook`` of block ``layer``
    (``None``: the residual stream after the block) at that position; right-padded batches of
    ``chunk`` rows, sorted by length so each batch pads little (causal attention: the padding is never
    read)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = [None] * len(rows)
    for c in range(0, len(order), chunk):
        idx = order[c:c + chunk]
        batch = right_pad(model, [rows[i][0] for i in idx]).to(model.cfg.device)
        if hook is None:
            acts = model(batch, stop_at_layer=layer + 1)
        else:
            name = f"blocks.{layer}.{hook}"
            _, cache = model.run_with_cache(batch, names_filter=name, stop_at_layer=layer + 1)
            acts = cache[name]
        picked = acts[torch.arange(len(idx)), torch.tensor([rows[i][1] for i in idx])].double().cpu()
        for r, i in enumerate(idx):
            out[i] = picked[r]
    return torch.stack(out)


def _memit_keys(model, rows: Sequence[tuple], n_requests: int, layer: int) -> Tensor:
    """MEMIT's ``compute_ks``: per request, the mean over context types (the plain prompt; each group
    of generated prefixes) of the mean key (``hook_post``) within the type; ``[request, d_mlp]``."""
    acts = _rows_at(model, rows, layer, "mlp.hook_post")
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
    fingerprints them (a float64 sum of every parameter) and is emptied when they change."""

    def __init__(self):
        self._found: dict = {}
        self._fingerprint: tuple | None = None
        self.hits = 0

    def __len__(self) -> int:
        return len(self._found)

    def values(self, model, requests, layer: int, method: str, config: EditConfig) -> list:
        fingerprint = (id(model), tuple(p.detach().double().sum().item() for p in model.parameters()))
        if fingerprint != self._fingerprint:
            self._found, self._fingerprint = {}, fingerprint
        out = []
        for r in requests:
            key = (r, layer, method, config)
            if key in self._found:
                self.hits += 1
            else:
                self._found[key] = _value(model, r, layer, method, config, init="resid")
            out.append(self._found[key])
        return out
