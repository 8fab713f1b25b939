from collections import Counter

import pytest

from relation_lens import DataError
from relation_lens.data import load_world


def test_world_size_and_shape():
    world = load_world()
    assert len(world) >= 5000
    assert len(world.relations) >= 20
    assert repr(world) == f"World({len(world)} facts over {len(world.relations)} relations)"
    subjects = Counter(f.subject for f in world)
    assert sum(v >= 2 for v in subjects.values()) / len(subjects) >= 0.30
    for rel in world.relations.values():
        assert len(rel.train_templates) >= 1 and len(rel.heldout_templates) >= 1
        assert not set(rel.train_templates) & set(rel.heldout_templates)
        for t in rel.train_templates + rel.heldout_templates:
            assert t.count("{}") == 1


def test_one_object_per_subject_and_relation():
    world = load_world()
    keys = Counter((f.subject, f.relation_id) for f in world)
    assert max(keys.values()) == 1
    assert len({f.fact_id for f in world}) == len(world)


def test_facts_carry_relation_names_and_prompts():
    world = load_world()
    fact = next(f for f in world if f.subject == "France" and f.relation_id == "P36")
    assert fact.object == "Paris" and fact.relation_name == "capital"
    assert fact.prompt(0) == fact.train_templates[0].format("France")
    assert fact.prompts(heldout=True) == ["France's capital is", "The seat of government of France is the city of"]
    ds = world.to_dataset()
    assert len(ds) == len(world) and set(ds.column_names) >= {"subject", "relation_id", "relation_name", "object",
                                                              "train_templates", "heldout_templates"}


def test_missing_or_bad_world(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_world(str(tmp_path))
    (tmp_path / "relations.json").write_text('{"P1": {"name": "x", "train_templates": ["{} a"], '
                                             '"heldout_templates": ["{} b"]}}')
    (tmp_path / "facts.jsonl").write_text('{"fact_id": 0, "subject": "s", "relation_id": "P1"}\n')
    with pytest.raises(DataError, match="record 0: field 'object'"):
        load_world(str(tmp_path))


def test_shipped_counterfactual_is_the_seeded_build_and_splits_off_its_tuning_records(default_model):
    from relation_lens.data.counterfact import (
        TUNING_SPLIT,
        build_counterfactual,
        evaluation_records,
        load_counterfactual,
    )

    shipped = [dict(r) for r in load_counterfactual()]
    assert len(shipped) == 1030 and len({(r["subject"], r["relation_id"]) for r in shipped}) == 1030
    assert build_counterfactual(default_model, n=12) == shipped[:12]  # the builder's first records, as shipped
    ev = evaluation_records(shipped, n=1000)
    tuning = [shipped[i] for i in TUNING_SPLIT]
    assert len(ev) == 1000 and ev[:400] == shipped[:400] and ev[400] == shipped[430]
    assert not any(r in ev for r in tuning)
    with pytest.raises(DataError, match="1001 evaluation records asked for, 1000 there"):
        evaluation_records(shipped, n=1001)
