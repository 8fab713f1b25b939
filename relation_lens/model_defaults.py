"""Every default the library takes for a model, with where it came from: :func:`defaults`.

A silent wrong default is the worst defect a tool like this can have, so each default belongs to the
model in hand and says so: the tokenisation (the model's Hugging Face tokenizer's BOS rule), the text
key statistics are taken over, the subjects ROME's noise level is averaged over, the counterfactuals
of token replacement, and the editing methods' layers and settings (the model's own presets, the
published ones for the models they were published for, or GPT-2 XL's scaled to depth with a
warning). ``relation-lens info`` prints it; the updates carry the parts they used.
"""

from __future__ import annotations

from typing import Any

from relation_lens import presets
from relation_lens.editing import EditConfig
from relation_lens.editing.memit import batch_defaults
from relation_lens.editing.rome import default_layer
from relation_lens.key_statistics import model_corpus
from relation_lens.model_interface import Model

METHODS = ("rome", "relation_rome", "memit", "relation_memit")


def method_defaults(model: Model, method: str, alphaedit: bool = False) -> dict[str, Any]:
    """The layer(s) and settings ``method`` takes on ``model`` by default, and their source."""
    own = presets.for_model(model)
    if method in ("rome", "relation_rome"):
        config = EditConfig.default_for(model, method, alphaedit)
        out: dict[str, Any] = {"layer": default_layer(model, method, alphaedit=alphaedit), "config": config.changed()}
    else:
        layers, config, lam = batch_defaults(model, method, None, None, None, alphaedit)
        out = {"layers": list(layers), "mom2_update_weight": lam, "config": config.changed()}
    if alphaedit:
        out["alphaedit"] = own.alphaedit_for(method)
    out["source"] = own.source_of(method, alphaedit)
    return out


def defaults(model: Model, method: str | None = None, *, alphaedit: bool = False) -> dict[str, Any]:
    """What ``model`` gets by default and where each came from.

    Args:
        method: one editing method's defaults only (``"rome"``, ``"relation_rome"``, ``"memit"``,
            ``"relation_memit"``); ``None``: every method's.
        alphaedit: the settings with AlphaEdit's projection (``preserve=``).

    Returns:
        ``{"presets": ..., "tokenisation": ..., "key_statistics": ..., "noise_subjects": ...,
        "counterfactuals": ..., "methods": {method: {...}}}``; each entry names its source.
    """
    own = presets.for_model(model)
    recorded = presets.recorded_sources(model)
    bos = bool(model.cfg.default_prepend_bos)
    _, corpus = model_corpus(model)
    default = presets.is_default_model(model)
    return {
        "model": str(model.cfg.model_name),
        "presets": {"name": own.name, "source": own.source, "depth_scaled": own.scaled},
        "tokenisation": {"prepend_bos": bos, "source": recorded.get(
            "prepend_bos", f"{bos}: the model's cfg.default_prepend_bos (not loaded by relation_lens.load_model)"),
            "bos_token": recorded.get("bos_token", "the tokenizer's bos_token")},
        "key_statistics": {"corpus": corpus, "source": "the embedded model's own training text (the only text it "
                           "knows)" if default else "Wikipedia sentences vendored in the package (FewRel 1.0 "
                           "val_wiki, MIT), as ROME takes its statistics over Wikipedia"},
        "noise_subjects": {"source": "the default model's world subjects" if own.world_noise_subjects
                           else "ROME's known_1000 subjects (ROME's own rule)"},
        "counterfactuals": {"source": "the default model's world (token replacement, the CLI's paraphrase and "
                            "unrelated prompts)" if default else "none built in for this model: give "
                            "corrupted_prompt= (token replacement) and records with paraphrase / neighbourhood "
                            "prompts (the CLI's --paraphrase / --unrelated)"},
        "methods": {m: method_defaults(model, m, alphaedit) for m in ((method,) if method else METHODS)},
    }
