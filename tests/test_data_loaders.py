import json
from pathlib import Path

import pytest

from relation_lens import DataError
from relation_lens.data.loaders import (
    RELATION_TEMPLATES,
    fewrel_prompts,
    load_counterfact,
    load_fewrel,
    load_known,
    load_lre_world,
)

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SLICE = Path(__file__).resolve().parent / "data" / "shared_slice"  # the first records of the same files
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


@needs_shared
def test_full_files_load():
    """The whole files, where ../shared/data is at hand; the tests below read slices of them."""
    fewrel = load_fewrel(SHARED / "fewrel" / "val_wiki.json", SHARED / "fewrel" / "pid2name.json")
    assert len(fewrel) == 16 * 700 and set(fewrel["relation_id"]) == set(RELATION_TEMPLATES)
    assert len(load_known(SHARED / "rome" / "known_1000.json")) == 1209
    assert len(load_counterfact(SHARED / "rome" / "counterfact-train.json")) == 10_000


def test_fewrel_triples_are_cased_and_prompted():
    ds = load_fewrel(SLICE / "fewrel" / "val_wiki.json", SLICE / "fewrel" / "pid2name.json")
    assert len(ds) == 16 * 25 and set(ds["relation_id"]) == set(RELATION_TEMPLATES)
    row = ds[0]
    assert row["subject"] == "Cape Girardeau Bridge" and row["object"] == "Mississippi River"
    assert row["relation_name"] == "crosses"
    prompts = fewrel_prompts(ds.select(range(3)))
    assert prompts[0]["prompt"] == "Cape Girardeau Bridge crosses the" and prompts[0]["target"] == "Mississippi River"
    assert len(fewrel_prompts(ds.select(range(3)), which=None)) == 9


def test_known_1000():
    ds = load_known(SLICE / "rome" / "known_1000.json")
    assert len(ds) == 20 and ds[0]["subject"] == "Vinson Massif" and ds[0]["target"] == "Antarctica"


def test_lre_relations_load_as_a_world(tmp_path):
    folder = SLICE / "lre_relations" / "data" / "factual"
    world = load_lre_world(folder)
    files = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    assert sorted(world.relations) == sorted(files)
    assert len(world) == sum(len(d["samples"]) for d in files.values())
    for rid, d in files.items():
        rel = world.relations[rid]
        assert list(rel.train_templates) == d["prompt_templates"]
        # held out: the zero-shot templates that are not also training templates
        assert list(rel.heldout_templates) == [t for t in d["prompt_templates_zs"] if t not in d["prompt_templates"]]
        assert [(f.subject, f.object) for f in world.by_relation(rid)] == [(s["subject"], s["object"])
                                                                          for s in d["samples"]]
    only = load_lre_world(folder, relations=["landmark_on_continent"])
    assert list(only.relations) == ["landmark_on_continent"]
    with pytest.raises(DataError, match="no relation file for \\['nope'\\]"):
        load_lre_world(folder, relations=["nope"])
    (tmp_path / "r.json").write_text(json.dumps({"name": "r", "prompt_templates": ["no slot"], "samples": []}))
    with pytest.raises(DataError, match="r.json.*prompt_templates holds 'no slot'"):
        load_lre_world(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"name": "r", "prompt_templates": ["{} is"], "samples": [{"subject": 1}]}))
    with pytest.raises(DataError, match="sample 0"):
        load_lre_world(tmp_path)


def test_counterfact_mend_layout_is_normalised():
    ds = load_counterfact(SLICE / "rome" / "counterfact-train.json", limit=5)
    assert len(ds) == 5
    r = ds[0]
    assert r["prompt"] == "{}, the" and r["subject"] == "Toko Yasuda"
    assert r["target_new"] == "piano" and r["target_true"] == "guitar"
    assert r["paraphrase_prompts"] == ["Toko Yasuda is incredible at"]
    assert r["neighborhood_targets"] == ["guitar"]


def test_counterfact_rome_layout(tmp_path):
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
           "subject": "Danielle Darrieux", "target_new": {"str": "English"}, "target_true": {"str": "French"}},
           "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["Léon Blum speaks"]}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    r = load_counterfact(path)[0]
    assert r["case_id"] == 7 and r["relation_id"] == "P103" and r["neighborhood_targets"] == ["French"]


def test_loader_errors_name_record_and_field(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_counterfact(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"requested_rewrite": {"prompt": "{} is", "subject": "X",
                                                      "target_new": {"str": "a"}}}]))
    with pytest.raises(DataError, match="record 0.*'target_true' is missing"):
        load_counterfact(bad)
    bad.write_text(json.dumps([{"prompt": "Y is in", "subject": "X", "target_new": "a", "ground_truth": "b"}]))
    with pytest.raises(DataError, match="record 0: field 'subject' 'X' does not occur"):
        load_counterfact(bad)
    bad.write_text(json.dumps({"P1": [{"tokens": ["a"], "h": ["a", "Q1", [[0]]], "t": ["b", "Q2", [[5]]]}]}))
    with pytest.raises(DataError, match="instance 0: field 't'"):
        load_fewrel(bad)
    bad.write_text("[{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_known(bad)
