"""Every result type in one place, on one JSON codec (:mod:`relation_lens.results.codec`: the
dataclass' annotations drive ``to_dict`` / ``from_dict``, NaN kept as ``null``) and value equality.
Rendering lives in :mod:`relation_lens.views`, which imports these types and registers its
renderers; nothing here imports a view."""

from relation_lens.results.codec import (
    SCHEMA_VERSION,
    Result,
    ValueEquality,
    decode,
    decode_dataclass,
    encode,
    json_safe,
    known_fields,
    register_view,
    values_equal,
)
from relation_lens.results.evaluation import EvaluationResult, ScoreDifference, SequenceResult
from relation_lens.results.knockout import DatasetKnockoutResult, KnockoutResult
from relation_lens.results.patch import PatchResult
from relation_lens.results.trace import DatasetTraceResult, TraceResult, argmax_2d

__all__ = ["SCHEMA_VERSION", "Result", "ValueEquality", "decode", "decode_dataclass", "encode", "json_safe",
           "known_fields", "register_view", "values_equal", "TraceResult", "DatasetTraceResult", "KnockoutResult",
           "DatasetKnockoutResult", "PatchResult", "EvaluationResult", "ScoreDifference", "SequenceResult", "argmax_2d"]
