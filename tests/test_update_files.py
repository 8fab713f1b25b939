"""Edits as files: ``update.save(path)`` / ``rl.load_update(path, model)``.

Invariants: what is loaded equals what was saved (tensors bit for bit, in their dtypes; requests and
fields by value; ``info`` as JSON reads it), writing the loaded update changes the model exactly as
writing the computed one, and a file is refused for any model whose weights are not the ones the
update was computed on (another model, or the same model with an edit written)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import all_hooks, checksum, same_weights
from safetensors.torch import save_file

import relation_lens as rl
from relation_lens.batch_editing import memit_config
from relation_lens.results import encode, json_safe

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

REQUEST = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris", target_true="Seattle")
REQUESTS = [REQUEST, rl.EditRequest("{} is the capital of", "Paris", "Italy")]
CONFIG = rl.EditConfig(v_steps=4, prefix_lengths=((4, 2),), key_mode="symmetric", v_lr_scale="rms", stats_n_texts=60)


@pytest.fixture(scope="module")
def stats(tiny_model):
    return {l: rl.KeyStatistics.compute(tiny_model, l, n_texts=60, progress=False) for l in (1, 2)}


@pytest.fixture(scope="module")
def updates(tiny_model, stats):
    one = rl.compute_edit(tiny_model, REQUEST, method="relation_rome", layer=2, stats=stats[2], config=CONFIG)
    batch = rl.compute_edit(tiny_model, REQUESTS, method="relation_memit", layers=(1, 2), stats=stats,
                            config=memit_config(v_steps=3, prefix_lengths=((4, 5),), stats_n_texts=60))
    return {"rank_one": one, "batch": batch}


def _as_json(x):
    return json.loads(json.dumps(json_safe(encode(x))))


@pytest.mark.parametrize("kind", ["rank_one", "batch"])
def test_a_loaded_update_is_the_saved_one_and_writes_the_same_weights(tiny_model, updates, tmp_path, kind):
    upd = updates[kind]
    path = upd.save(tmp_path / f"{kind}.safetensors")
    loaded = rl.load_update(path, tiny_model)
    assert type(loaded) is type(upd)
    for f in dataclasses.fields(upd):
        a, b = getattr(upd, f.name), getattr(loaded, f.name)
        if f.name == "info":
            assert b == _as_json(a)  # as JSON reads it: tuples become lists
        else:
            assert rl.results.values_equal(a, b), f.name  # tensors bit for bit, same dtype
    assert loaded.info["model_fingerprint"] == upd.info["model_fingerprint"]
    assert loaded.info["config"]["v_steps"] == (4 if kind == "rank_one" else 3)
    before = checksum(tiny_model)
    with rl.apply_edit(tiny_model, upd):
        written = checksum(tiny_model)
    with rl.apply_edit(tiny_model, loaded):
        assert same_weights(tiny_model, written)
    assert same_weights(tiny_model, before) and all_hooks(tiny_model) == 0
    # the file holds the update, not the model: a rank-one update is four vectors
    if kind == "rank_one":
        d_mlp, d_model = tiny_model.cfg.d_mlp, tiny_model.cfg.d_model
        assert path.stat().st_size < 8 * 2 * (d_mlp + d_model) + 16_000


def test_an_update_is_refused_for_other_weights(tiny_model, tiny_model64, updates, tmp_path):
    upd = updates["rank_one"]
    path = upd.save(tmp_path / "edit.safetensors")
    with pytest.raises(rl.EditError, match="computed on other weights"):
        rl.load_update(path, tiny_model64)  # the same architecture, other weights and dtype
    with rl.apply_edit(tiny_model, upd):  # the same model with the edit written is other weights too
        with pytest.raises(rl.EditError, match="computed on other weights"):
            rl.load_update(path, tiny_model)
    assert rl.load_update(path, tiny_model64, verify=False) == rl.load_update(path)
    saved = checksum(tiny_model64)
    assert same_weights(tiny_model64, saved)


def test_a_sequence_of_edits_loads_in_order(tiny_model, stats, tmp_path):
    first = rl.compute_edit(tiny_model, REQUEST, method="relation_rome", layer=2, stats=stats[2], config=CONFIG)
    with rl.apply_edit(tiny_model, first):
        second = rl.compute_edit(tiny_model, REQUESTS[1], method="relation_rome", layer=2, stats=stats[2],
                                 config=CONFIG)
        target = checksum(tiny_model)
        with rl.apply_edit(tiny_model, second):
            target = checksum(tiny_model)
    p1, p2 = first.save(tmp_path / "1.safetensors"), second.save(tmp_path / "2.safetensors")
    with pytest.raises(rl.EditError, match="computed on other weights"):
        rl.load_update(p2, tiny_model)  # computed after the first edit: not for the unedited weights
    with rl.apply_edit(tiny_model, rl.load_update(p1, tiny_model)):
        with rl.apply_edit(tiny_model, rl.load_update(p2, tiny_model)):
            assert same_weights(tiny_model, target)


def test_files_that_are_not_updates_are_refused(tiny_model, updates, tmp_path):
    with pytest.raises(rl.EditError, match="does not exist"):
        rl.load_update(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(rl.EditError, match="is not a safetensors file"):
        rl.load_update(tmp_path / "text.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(rl.EditError, match="not a relation_lens update"):
        rl.load_update(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "future.safetensors"),
              metadata={"relation_lens": json.dumps({"format": "relation_lens.update/9", "type": "RankOneUpdate"})})
    with pytest.raises(rl.EditError, match="update format 'relation_lens.update/9'"):
        rl.load_update(tmp_path / "future.safetensors")
    # an update built by hand (not by compute_edit) has no fingerprint to check
    upd = updates["rank_one"]
    bare = dataclasses.replace(upd, info={})
    path = bare.save(tmp_path / "bare.safetensors")
    with pytest.raises(rl.EditError, match="records no model fingerprint"):
        rl.load_update(path, tiny_model)
    assert rl.load_update(path, tiny_model, verify=False) == bare


@pytest.mark.parametrize("kind", ["rank_one", "batch"])
def test_an_update_file_with_changed_tensor_bytes_is_refused(updates, tmp_path, kind):
    """The file records a SHA-256 of its own tensors (the model fingerprint covers the weights the update
    was computed on, not the update): one flipped byte in the tensor data is refused."""
    path = updates[kind].save(tmp_path / "u.safetensors")
    assert rl.load_update(path) == updates[kind]  # intact: loads
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(rl.EditError, match="do not match the checksum"):
        rl.load_update(path)
