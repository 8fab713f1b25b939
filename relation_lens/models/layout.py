"""Weights stored in the orientation TransformerLens 3's forward reads them in.

TransformerLens 3.9 keeps its weights as ``[d_in, d_out]`` (MLPs, unembedding), ``[head, d_model, d_head]``
(queries, keys, values) and ``[head, d_head, d_model]`` (attention output), and its forward turns each
into the contiguous ``[d_out, d_in]`` matrix of ``F.linear`` on every call (``W.T.contiguous()``, an
``einops.rearrange`` then ``reshape``): one copy of every weight matrix per block call. On SmolLM2-135M
those copies were a fifth to a third of a trace's time (``docs/benchmarks.md``).

:func:`forward_layout` stores each such parameter's data in that orientation, so that ``.T`` (or the
rearrangement) is already contiguous and the copy is a view. The parameters keep their shapes and
values (a ``Parameter`` object is not replaced, only its storage's strides change): every number the
model gives is bit for bit the same, since ``F.linear`` receives the same contiguous matrix as before.
``relation_lens.load_model`` applies it to the models it loads under TransformerLens 3; a
``TransformerBridge`` (TransformerLens 4) reads Hugging Face ``nn.Linear`` weights, already ``[d_out,
d_in]``, and is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from relation_lens.model_interface import is_hooked_transformer

# per module class (by name, as TransformerLens 3.9 spells it): parameter -> the permutation its forward
# applies before flattening it to F.linear's [d_out, d_in]. The plain MLP is absent: it calls addmm on
# W_in / W_out as they are (no copy), and another layout would change its rounding.
_GATED_MLP: dict[str, tuple[int, ...]] = {"W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0)}  # F.linear(x, W.T.contiguous())
_ATTENTION: dict[str, tuple[int, ...]] = {"W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1),  # "h d_model d_head -> (h d_head) d_model"
              "_W_K": (0, 2, 1), "_W_V": (0, 2, 1),  # grouped-query attention's key/value heads
              "W_O": (2, 0, 1)}  # "h d_head d_model -> d_model (h d_head)"
_ORIENTATION: dict[str, dict[str, tuple[int, ...]]] = {
    "GatedMLP": _GATED_MLP, "Attention": _ATTENTION, "GroupedQueryAttention": _ATTENTION,
    "Unembed": {"W_U": (1, 0)}}  # F.linear(x, W_U.T.contiguous())


def _stored_as(p: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """``p``'s values (same shape) in a storage where ``p.permute(perm)`` is contiguous."""
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return p.detach().permute(perm).contiguous().permute(inverse)


def forward_layout(model: Any) -> Any:
    """Store a ``HookedTransformer``'s gated-MLP, attention and unembedding weights in the orientation
    its forward reads them in (see the module's docstring); returns ``model``. Idempotent; a
    ``TransformerBridge``, a module of another class and a quantised (non-floating) weight are left as
    they are."""
    if not is_hooked_transformer(model):
        return model
    with torch.no_grad():
        for module in model.modules():
            orientation = _ORIENTATION.get(type(module).__name__, {})
            for name, perm in orientation.items():
                p = module._parameters.get(name)
                if p is None or p.dim() != len(perm) or not p.is_floating_point() or p.permute(perm).is_contiguous():
                    continue
                p.data = _stored_as(p, perm)
    return model
