"""What the result types share: one JSON codec (``to_dict`` / ``from_dict`` through
:func:`known_fields`, NaN kept as ``null``) and value equality for dataclasses that hold tensors."""

from relation_lens.results.codec import SCHEMA_VERSION, JsonRoundTrip, ValueEquality, json_safe, known_fields

__all__ = ["SCHEMA_VERSION", "JsonRoundTrip", "ValueEquality", "json_safe", "known_fields"]
