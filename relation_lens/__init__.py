"""relation_lens: trace and edit relational knowledge in GPT-style models (on TransformerLens).

>>> import relation_lens as rl
>>> model = rl.load_model()                      # the embedded default model, offline
>>> result = rl.trace(model, "The capital of France is", subject="France")
"""

from relation_lens import interventions, views  # registers the renderers of result.plot() / to_html()
from relation_lens.editing import (
    METHODS,
    AlphaEditConfig,
    BatchUpdate,
    Edit,
    EditConfig,
    EditMethod,
    EditRequest,
    Preserve,
    RankOneUpdate,
    Update,
    ValueCache,
    apply_edit,
    compute_edit,
    edit,
    load_update,
    register_method,
    save_edited,
)
from relation_lens.errors import (
    ConfigError,
    DataError,
    EditError,
    HubUnreachableError,
    ModelLoadError,
    NoiseError,
    PromptError,
    RelationLensError,
    SpanError,
    TargetError,
    UnsupportedModelError,
)
from relation_lens.evaluation import (
    EvaluationResult,
    ScoreDifference,
    SequenceResult,
    evaluate,
    evaluate_batch,
    evaluate_sequence,
    score_difference,
)
from relation_lens.key_statistics import KeyStatistics
from relation_lens.locate import LocateResult, LocateWarning, locate
from relation_lens.model_defaults import defaults
from relation_lens.models import load_model
from relation_lens.presets import DefaultsWarning
from relation_lens.probes import known_facts
from relation_lens.spans import find_spans
from relation_lens.tracing import (
    DatasetKnockoutResult,
    DatasetTraceResult,
    KnockoutResult,
    TargetWarning,
    TraceConfig,
    TraceResult,
    knockout,
    knockout_dataset,
    trace,
    trace_dataset,
)
from relation_lens.tracing.api import AttributionRangeWarning
from relation_lens.tracing.patch import PatchResult, Site, patch
from relation_lens.tracing.path_patch import PathPatchResult, path_patch
from relation_lens.tune import TuneResult, tune
from relation_lens.version import __version__

__all__ = [
    "load_model", "defaults", "known_facts", "trace", "knockout", "KnockoutResult", "knockout_dataset", "DatasetKnockoutResult", "patch", "Site", "PatchResult", "path_patch", "PathPatchResult", "locate", "LocateResult", "tune", "TuneResult", "interventions", "EditRequest", "EditConfig", "RankOneUpdate", "Edit", "compute_edit", "apply_edit",
    "edit", "evaluate", "evaluate_batch", "evaluate_sequence", "SequenceResult", "score_difference", "ScoreDifference", "BatchUpdate", "Preserve", "AlphaEditConfig", "ValueCache", "Update", "load_update",
    "EditMethod", "METHODS", "register_method", "save_edited", "EvaluationResult", "KeyStatistics", "TraceConfig", "TraceResult", "trace_dataset", "DatasetTraceResult", "find_spans",
    "views", "__version__", "RelationLensError", "ConfigError", "ModelLoadError", "HubUnreachableError", "UnsupportedModelError", "SpanError",
    "PromptError", "TargetError", "NoiseError", "EditError", "DataError", "TargetWarning", "DefaultsWarning",
    "LocateWarning", "AttributionRangeWarning",
]
