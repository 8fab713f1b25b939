"""What an edit is asked to do: :class:`EditRequest` (the fact to write), :class:`EditConfig` (the
algorithm's settings, ROME's by default), and the checks every method runs on the model first."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from relation_lens import presets
from relation_lens.errors import EditError, UnsupportedModelError, shorten
from relation_lens.model_interface import Model, check_interface, is_bridge, is_hooked_transformer

UNCHANGED = "; the model was not changed"


@dataclass(frozen=True)
class EditRequest:
    """What to write: ``prompt`` with ``{}`` for the subject (CounterFact style), the new object.

    >>> request = EditRequest("{} is located in the city of", "The Space Needle", "Paris", target_true="Seattle")
    >>> request.text
    'The Space Needle is located in the city of'
    >>> EditRequest("{} is in", "Paris", "Italy", target_true="Italy")
    Traceback (most recent call last):
    ...
    relation_lens.errors.EditError: target_new 'Italy' is the same as target_true: nothing to edit (prompt '{} is in')
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise EditError(f"prompt {shorten(self.prompt)} must contain exactly one '{{}}' where the subject goes")
        if not self.prompt.replace("{}", "").strip():
            raise EditError(f"prompt {shorten(self.prompt)} has no words besides the subject placeholder")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditError(f"subject {self.subject!r} is empty (prompt {shorten(self.prompt)})")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EditError(f"target_new {self.target_new!r} is empty or whitespace (prompt {shorten(self.prompt)})")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise EditError(f"target_true {self.target_true!r} is empty (prompt {shorten(self.prompt)})")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditError(f"target_new {self.target_new!r} is the same as target_true: nothing to edit "
                            f"(prompt {shorten(self.prompt)})")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class EditConfig:
    """Algorithm settings. ``EditConfig()`` is ROME's own algorithm with its GPT-2 XL
    hyper-parameters (``hparams/ROME/gpt2-xl.json`` and ``rome/compute_v.py`` of kmeng01/rome), exactly;
    every deliberate departure is a named option (docs/editing.md, "ROME's code vs relation_lens").

    Value optimisation (``compute_v.py``):
        v_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompt: as ROME's hparams.
        v_lr_scale: ``"absolute"`` (ROME: Adam on ``delta`` itself) or ``"rms"`` (scale-free: Adam on
            ``delta / rms(v_init)``, so one learning rate behaves alike on models of any width).
        weight_decay_form: ``"rome"``: ``v_weight_decay * ||delta|| / ||v_init||**2`` as ROME's code
            computes it; ``"squared_ratio"``: ``v_weight_decay * (||delta|| / ||v_init||)**2``.
        early_stop_on: ``"loss"`` (ROME: stop when the total loss is under ``early_stop_loss``) or
            ``"nll"`` (stop on the NLL of the new target alone).
        kl_direction: ``"rome"``: ``kl_div(init, edited, log_target=True)`` = KL(edited || original), as
            ROME's code; ``"forward"``: KL(original || edited).
    Keys (``compute_u.py``, ``rome_main.py``):
        prefix_lengths: ``(length, count)`` pairs of self-generated context prefixes, ROME's
            ``context_template_length_params``: ``length`` counts the ``<|endoftext|>`` start token,
            so a prefix has ``length - 1`` generated tokens (ROME GPT-2 XL: 10 of 5 and 10 of 10).
        prefix_seeds: ``None`` (ROME's rule: each prefix starts at ``<|endoftext|>``) or the words
            MEMIT's code starts its prefixes with (``memit_config()``: ``("The", "Therefore", "Because",
            "I", "You")``; ``count`` is then shared among them and ``length`` counts the word's tokens;
            :func:`generate_prefixes`).
        prefixes: explicit context templates (``"{}"`` where the prompt goes, e.g.
            ``("{}", "The sky. {}")``), used instead of generated ones to reproduce an edit exactly.
        key_mode: ``"asymmetric"`` (ROME's code: the unprefixed prompt's key in the residual and the
            denominator) or ``"symmetric"`` (r-ROME, Gupta et al. 2024: the averaged ``k*`` in every term;
            sequential edits do not collapse).
        prepend_bos: ``None`` follows the model (``model.cfg.default_prepend_bos``; the default model
            was trained with BOS); ``False`` is ROME's tokenisation on GPT-2 (prompts, prefixes, and the
            key statistics computed for the edit).
    Closed form: ridge (relative ridge added to C), stats_n_texts (texts for the key statistics).
    """

    v_steps: int = 20
    v_lr: float = 0.5
    v_lr_scale: Literal["rms", "absolute"] = "absolute"
    v_weight_decay: float = 0.5
    weight_decay_form: Literal["rome", "squared_ratio"] = "rome"
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_direction: Literal["rome", "forward"] = "rome"
    kl_prompt: str = "{} is a"
    early_stop_loss: float = 5e-2
    early_stop_on: Literal["loss", "nll"] = "loss"
    prefix_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (length incl. <|endoftext|>, count)
    prefixes: tuple[str, ...] | None = None
    prefix_seeds: tuple[str, ...] | None = None  # None: ROME's rule; MEMIT's seed words (memit_config)
    key_mode: Literal["symmetric", "asymmetric"] = "asymmetric"
    prepend_bos: bool | None = None
    ridge: float = 0.0  # relative ridge added to C before solving
    stats_n_texts: int | None = 10_000
    seed: int = 0

    @classmethod
    def rome(cls, **overrides) -> EditConfig:
        """ROME's code on GPT-2 (XL), tokenisation included: ``EditConfig(prepend_bos=False)``."""
        return cls(**{"prepend_bos": False, **overrides})

    @classmethod
    def default_model_preset(cls, **overrides) -> EditConfig:
        """:data:`~relation_lens.presets.DEFAULT_MODEL_PRESET`: the settings tuned for the embedded default model."""
        return cls(**{**presets.DEFAULT_MODEL_PRESET, **overrides})

    @classmethod
    def default_for(cls, model: Model, method: str | None = None, alphaedit: bool = False, **overrides) -> EditConfig:
        """ROME's settings, except on a model with its own preset (:func:`relation_lens.presets.for_model`:
        the embedded default model gets :data:`~relation_lens.presets.DEFAULT_MODEL_PRESET` and, for
        ``method`` (with AlphaEdit when ``alphaedit``), the fields :func:`relation_lens.tune` chose,
        :data:`~relation_lens.presets.DEFAULT_MODEL_TUNED`; see docs/editing.md); ``overrides`` replace
        fields either way."""
        own = presets.for_model(model)
        return cls(**{**own.edit, **own.edit_fields(method, alphaedit), **overrides})

    def changed(self) -> dict[str, Any]:
        """The fields set to something other than ``EditConfig()``'s (ROME's) value."""
        base = EditConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}

    def __post_init__(self):
        choices = {"v_lr_scale": ("rms", "absolute"), "key_mode": ("symmetric", "asymmetric"),
                   "weight_decay_form": ("rome", "squared_ratio"), "early_stop_on": ("loss", "nll"),
                   "kl_direction": ("rome", "forward")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EditError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        for name, (integer, low, strict) in _NUMERIC_FIELDS.items():
            value = getattr(self, name)
            if value is None and name == "stats_n_texts":
                continue
            _check_number(name, value, integer=integer, low=low, strict=strict)
        if "{}" not in self.kl_prompt:
            raise EditError(f"kl_prompt {self.kl_prompt!r} must contain '{{}}'")
        for pair in self.prefix_lengths:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair)):
                raise EditError(f"prefix_lengths {self.prefix_lengths!r}: each entry is a (length, count) pair of "
                                "whole numbers")
            length, count = pair
            if length < 2 or count < 0:
                raise EditError(f"prefix_lengths {self.prefix_lengths!r}: each length counts the <|endoftext|> "
                                "start token, so it must be >= 2, and counts >= 0")
        if self.prefixes is not None:
            prefixes = tuple(self.prefixes)
            if not prefixes or not all(isinstance(p, str) and p.count("{}") == 1 for p in prefixes):
                raise EditError(f"prefixes {self.prefixes!r} must be a non-empty list of strings with one '{{}}' each")
            object.__setattr__(self, "prefixes", prefixes)
        if self.prefix_seeds is not None:
            seeds = tuple(self.prefix_seeds) if not isinstance(self.prefix_seeds, str) else ()
            if not seeds or not all(isinstance(w, str) and w.strip() for w in seeds):
                raise EditError(f"prefix_seeds {self.prefix_seeds!r} must be a non-empty list of words (or None for "
                                "ROME's rule)")
            object.__setattr__(self, "prefix_seeds", seeds)


# EditConfig's numeric fields: (whole number, lowest value, lowest excluded)
_NUMERIC_FIELDS: dict[str, tuple[bool, float, bool]] = {
    "v_steps": (True, 1.0, False), "v_lr": (False, 0.0, True), "v_weight_decay": (False, 0.0, False),
    "clamp_norm_factor": (False, 0.0, True), "kl_factor": (False, 0.0, False), "early_stop_loss": (False, 0.0, False),
    "ridge": (False, 0.0, False), "stats_n_texts": (True, 1.0, False), "seed": (True, 0.0, False)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any, *, integer: bool, low: float, strict: bool) -> None:
    """Refuse a setting that is not a finite number at least (above, ``strict``) ``low``, by name (NaN
    compares false with everything, so each check is written to fail on it)."""
    kind = "a whole number" if integer else "a finite number"
    ok = _is_int(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool)
                                         and math.isfinite(value))
    if ok:
        ok = value > low if strict else value >= low
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise EditError(f"EditConfig.{name} must be {kind} {bound}, got {value!r}")


def check_editable(model: Model, layer: int) -> None:
    """Refuse a model the editor cannot write (not a HookedTransformer, no MLPs, half precision) or a
    layer it does not have, before anything is computed."""
    if not (is_hooked_transformer(model) or is_bridge(model)):
        raise UnsupportedModelError(f"expected a TransformerLens model (HookedTransformer, or TransformerBridge under "
                                    f"TransformerLens 4), got {type(model).__name__}")
    if model.cfg.attn_only or model.cfg.d_mlp is None:
        raise UnsupportedModelError(f"model {model.cfg.model_name!r} has no MLP layers to edit")
    if model.cfg.dtype not in (torch.float32, torch.float64):
        raise EditError(f"model {model.cfg.model_name!r} is in {model.cfg.dtype}; rank-one edits need float32 "
                        "(load it with dtype='float32'); the model was not changed")
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise EditError(f"layer {layer!r} is out of range: the model has layers 0..{model.cfg.n_layers - 1}")
    check_interface(model)


def request_of(record: dict) -> EditRequest:
    """The :class:`EditRequest` of a CounterFact-style record (``prompt``, ``subject``, ``target_new``,
    ``target_true``)."""
    return EditRequest(record["prompt"], record["subject"], record["target_new"], record.get("target_true"))
