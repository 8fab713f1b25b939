"""The type of the models relation_lens works on, for signatures and the type checker.

For the checker, ``Model`` is TransformerLens' ``HookedTransformer``. At run time it is ``Any``:
importing TransformerLens costs seconds that ``import relation_lens`` should not pay, and what a
model must offer is checked by :func:`relation_lens.tracing.inputs.check_model` and
:func:`relation_lens.editing.requests.check_editable`, which raise an
:class:`~relation_lens.UnsupportedModelError` naming what is missing (a runtime type checker
would raise its own, less helpful error instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from relation_lens.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer as Model
else:
    Model = Any

__all__ = ["Model", "tokenizer_of", "decode", "mlp_out", "mlp_out_bias"]


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
    """Block ``layer``'s MLP output matrix ``W_out`` (``[d_mlp, d_model]``), the parameter itself:
    in-place writes change the model."""
    return model.blocks[layer].mlp.W_out


def mlp_out_bias(model: Model, layer: int) -> Tensor:
    """Block ``layer``'s MLP output bias (``[d_model]``); zeros where the model has none."""
    mlp = model.blocks[layer].mlp
    b = getattr(mlp, "b_out", None)
    return b if isinstance(b, Tensor) else torch.zeros(model.cfg.d_model, dtype=mlp_out(model, layer).dtype,
                                                        device=mlp_out(model, layer).device)
