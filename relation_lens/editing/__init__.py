"""Editing: ROME, relation-ROME, MEMIT, relation-MEMIT and AlphaEdit's projection, written into
``HookedTransformer`` MLP output weights.

One module a concern, in the order an edit goes through them: :mod:`.requests` (what to write and
the settings), :mod:`.prefixes` (context templates and key positions), :mod:`.value` (the value step
every method shares), :mod:`.rome` and :mod:`.memit` (the closed forms), :mod:`.alphaedit` (the
null-space projection), :mod:`.updates` (the update values), :mod:`.apply` (apply, undo, save), and
:mod:`.registry` (the methods by name and :func:`compute_edit`). docs/architecture.md has the data flow.
"""

from relation_lens.editing.alphaedit import AlphaEditConfig, Preserve
from relation_lens.editing.apply import Edit, apply_edit, save_edited
from relation_lens.editing.memit import (
    BATCH_METHODS,
    ValueCache,
    batch_defaults,
    compute_batch_edit,
    default_layers,
    memit_config,
    statistics_for,
)
from relation_lens.editing.method import EditMethod
from relation_lens.editing.prefixes import (
    generate_prefixes,
    key_position,
    key_rows,
    prefix_counts,
)
from relation_lens.editing.registry import (
    METHODS,
    batch_methods,
    compute_edit,
    default_config_of,
    edit,
    get_method,
    register_method,
    single_methods,
)
from relation_lens.editing.requests import (
    EditConfig,
    EditRequest,
    check_editable,
    request_of,
)
from relation_lens.editing.rome import compute_rank_one, default_layer
from relation_lens.editing.updates import BatchUpdate, RankOneUpdate, Update, load_update, read_update_header
from relation_lens.editing.value import Value, optimise_value

__all__ = [
    "AlphaEditConfig", "Preserve", "Edit", "apply_edit", "save_edited", "BATCH_METHODS", "ValueCache",
    "batch_defaults", "compute_batch_edit", "default_layers", "memit_config", "statistics_for", "EditMethod",
    "generate_prefixes", "key_position", "key_rows", "prefix_counts", "METHODS", "batch_methods", "compute_edit",
    "default_config_of", "edit", "get_method", "register_method", "single_methods", "EditConfig", "EditRequest", "check_editable",
    "request_of", "compute_rank_one", "default_layer", "BatchUpdate", "RankOneUpdate", "Update", "load_update", "read_update_header", "Value",
    "optimise_value",
]
