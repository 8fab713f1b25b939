"""The former home of MEMIT and AlphaEdit, kept so that existing imports work: the code is in
:mod:`relation_lens.editing` (:mod:`~relation_lens.editing.memit`, :mod:`~relation_lens.editing.alphaedit`,
:mod:`~relation_lens.editing.updates`); new code imports from there."""

from relation_lens.editing import (
    BATCH_METHODS,
    AlphaEditConfig,
    BatchUpdate,
    Preserve,
    ValueCache,
    batch_defaults,
    compute_batch_edit,
    default_layers,
    memit_config,
)
from relation_lens.presets import DEFAULT_MODEL_MEMIT, MEMIT_GPT2_XL, MOM2_UPDATE_WEIGHT

__all__ = ["BATCH_METHODS", "AlphaEditConfig", "BatchUpdate", "Preserve", "ValueCache", "batch_defaults",
           "compute_batch_edit", "default_layers", "memit_config", "DEFAULT_MODEL_MEMIT", "MEMIT_GPT2_XL",
           "MOM2_UPDATE_WEIGHT"]
