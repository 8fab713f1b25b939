"""Writing and undoing a multi-layer edit is all-or-nothing: an interrupt (KeyboardInterrupt) injected at
every write of ``apply_edit`` and of ``undo`` leaves the model either exactly as before (no handle was
returned, so nothing is left to undo) or fully edited with an ``Edit`` whose ``undo()`` still works."""

from __future__ import annotations

import pytest
import torch
from conftest import checksum, same_weights

import relation_lens as rl
from relation_lens.editing import apply as apply_module
from relation_lens.editing.updates import BatchUpdate

pytestmark = pytest.mark.transformer_lens_4
LAYERS = (0, 1, 2)


def _update(model) -> BatchUpdate:
    g = torch.Generator().manual_seed(0)
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    deltas = {l: 1e-2 * torch.randn(d_mlp, d_model, generator=g, dtype=torch.float64) for l in LAYERS}
    keys = {l: torch.randn(1, d_mlp, generator=g, dtype=torch.float64) for l in LAYERS}
    res = {l: torch.zeros(1, d_model, dtype=torch.float64) for l in LAYERS}
    req = rl.EditRequest("{} is located in the country of", "Paris", "Italy")
    return BatchUpdate(method="memit", layers=LAYERS, deltas=deltas, keys=keys, residuals=res,
                       targets=torch.zeros(1, d_model, dtype=torch.float64), requests=(req,))


def _interrupt_at(monkeypatch, k: int) -> None:
    """Make the k-th layer write (0-based) raise KeyboardInterrupt, once."""
    real, calls = apply_module.write_layer, {"n": 0}

    def write(model, layer, value):
        calls["n"] += 1
        if calls["n"] - 1 == k:
            raise KeyboardInterrupt(f"write {k}")
        real(model, layer, value)

    monkeypatch.setattr(apply_module, "write_layer", write)


@pytest.mark.parametrize("k", range(len(LAYERS)))
def test_an_interrupted_apply_leaves_the_model_as_before(tiny_model, monkeypatch, k):
    saved = checksum(tiny_model)
    update = _update(tiny_model)
    _interrupt_at(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        rl.apply_edit(tiny_model, update)
    assert same_weights(tiny_model, saved)


@pytest.mark.parametrize("k", range(len(LAYERS)))
def test_an_interrupted_undo_leaves_the_edit_applied_and_undoable(tiny_model, monkeypatch, k):
    saved = checksum(tiny_model)
    update = _update(tiny_model)
    edit = rl.apply_edit(tiny_model, update)
    edited = checksum(tiny_model)
    assert not same_weights(tiny_model, saved)
    _interrupt_at(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        edit.undo()
    assert same_weights(tiny_model, edited) and edit.active
    monkeypatch.undo()
    edit.undo()
    assert same_weights(tiny_model, saved) and not edit.active
