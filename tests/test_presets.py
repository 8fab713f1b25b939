"""The default model's presets: rl.tune's choices where they won on the evaluation records, and the
defaults every entry point resolves from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import relation_lens as rl
from relation_lens import presets
from relation_lens.editing import Preserve, batch_defaults, default_config_of, default_layer, get_method

TUNE_RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "tune"


def test_shipped_presets_are_tunes_output_where_it_won():
    """Each variant's entry in DEFAULT_MODEL_TUNED is the params of its tune result, present exactly where
    tune's Score on the evaluation records is at least the hand-made presets' (tune_presets.md)."""
    # tune_presets.py's results (sequential_edits.py --tuned writes its sequence searches there too: sequence_*)
    runs = {p.stem: json.loads(p.read_text()) for p in TUNE_RESULTS.glob("*.json") if not p.stem.startswith("sequence_")}
    assert "relation_rome" in runs and "rome" in runs
    for variant, r in runs.items():
        won = r["evaluation"]["tuned"]["Score"] >= r["evaluation"]["presets"]["Score"]
        shipped = presets.DEFAULT_MODEL_TUNED.get(variant)
        assert (shipped is not None) == won, variant
        if won:
            assert json.loads(json.dumps(shipped)) == r["tune"]["params"], variant
    assert set(presets.DEFAULT_MODEL_TUNED) <= set(runs)  # nothing shipped that tune did not choose


@pytest.fixture
def fake_tuned(monkeypatch):
    """Tune's choices replaced by made-up ones, so each default visibly comes from them."""
    fake = {"relation_rome": {"layer": 2, "v_weight_decay": 0.2, "clamp_norm_factor": 5.0, "v_steps": 3},
            "relation_rome+alphaedit": {"layer": 3, "v_weight_decay": 0.3, "clamp_norm_factor": 6.0, "v_steps": 2,
                                        "threshold": 0.5, "l2": 0.25},
            "relation_memit": {"layers": [1, 3], "mom2_update_weight": 7.0, "clamp_norm_factor": 3.0}}
    monkeypatch.setitem(presets._BY_NAME, presets.DEFAULT_MODEL_NAME,
                        dataclasses.replace(presets.DEFAULT_MODEL, tuned=fake))
    return fake


def test_defaults_resolve_from_tunes_choices(default_model, tiny_model, fake_tuned):
    m = get_method("relation_rome")
    plain, alpha = default_config_of(m, default_model), default_config_of(m, default_model, alphaedit=True)
    assert (plain.v_weight_decay, plain.clamp_norm_factor, plain.v_steps) == (0.2, 5.0, 3)
    assert (alpha.v_weight_decay, alpha.clamp_norm_factor, alpha.v_steps) == (0.3, 6.0, 2)
    assert plain.prefix_lengths == presets.DEFAULT_MODEL_PRESET["prefix_lengths"]  # the rest: the hand-made preset
    assert default_layer(default_model, "relation_rome") == 2
    assert default_layer(default_model, "relation_rome", alphaedit=True) == 3
    p = Preserve.default_for(default_model, "relation_rome")
    assert (p.threshold, p.l2) == (0.5, 0.25)
    assert Preserve.default_for(default_model).l2 == presets.DEFAULT_MODEL_ALPHAEDIT["l2"]  # no method: the model's
    # ROME has no entry: its hand-made preset and its tracing rule
    assert rl.EditConfig.default_for(default_model, "rome") == rl.EditConfig.default_model_preset()
    layers, cfg, lam = batch_defaults(default_model, "relation_memit", None, None, None)
    assert (layers, lam, cfg.clamp_norm_factor) == ((1, 3), 7.0, 3.0)
    assert cfg.v_weight_decay == presets.MEMIT_GPT2_XL["v_weight_decay"]  # not searched: MEMIT's own
    # with AlphaEdit and no entry of its own, the method's choices hold
    assert batch_defaults(default_model, "relation_memit", None, None, None, alphaedit=True)[0] == (1, 3)
    # another model has none of them
    assert default_layer(tiny_model, "relation_rome") == presets.relation_rome_layer(tiny_model.cfg.n_layers)
    assert default_config_of(m, tiny_model, alphaedit=True) == rl.EditConfig()
    with presets.hand_made():
        assert default_layer(default_model, "relation_rome") == presets.RELATION_ROME_LAYER
        assert default_config_of(m, default_model) == rl.EditConfig.default_model_preset()
    assert default_layer(default_model, "relation_rome") == 2  # restored


def test_compute_edit_takes_tunes_choices(default_model, fake_tuned):
    """compute_edit(config=None, layer=None) edits the chosen layer with the chosen settings, and with a
    Preserve those of the AlphaEdit search."""
    req = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    for alphaedit, entry in ((False, "relation_rome"), (True, "relation_rome+alphaedit")):
        chosen = fake_tuned[entry]
        stats = rl.KeyStatistics.compute(default_model, chosen["layer"], n_texts=200)
        preserve = Preserve.default_for(default_model, "relation_rome") if alphaedit else None
        update = rl.compute_edit(default_model, req, method="relation_rome", stats=stats, preserve=preserve)
        assert update.layers == (chosen["layer"],)
        config = update.info["config"]
        assert {k: config[k] for k in presets.EDIT_FIELDS} == {k: chosen[k] for k in presets.EDIT_FIELDS}
