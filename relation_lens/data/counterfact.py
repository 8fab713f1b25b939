"""The counterfactual relation dataset: CounterFact-style records built from facts a model knows.

From a world of facts (default: the default model's), each record asks to rewrite one fact
(subject, relation) from its true object to ``target_new``, another object of the same relation,
and carries what measures the edit:

* ``paraphrase_prompts``: the same fact under templates held out of training (where the model has
  them), for generalisation;
* ``neighborhood_prompts``/``neighborhood_targets``: other subjects with the same relation and the
  same true object, which must keep it (ROME's neighborhood specificity);
* ``relation_prompts``/``relation_targets``: the same subject under its other relations, with
  their answers, which must be kept (relation specificity, as in RETS);
* ``generation_prompts``: prompts to generate from, for fluency.

Only facts the model predicts correctly (top-1 on the first training template) become records,
and only neighbour and relation prompts it predicts correctly are kept, so the specificity metrics
measure damage done by the edit rather than what the model never knew.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

import torch

from relation_lens.data import load_world
from relation_lens.data.io import read_json
from relation_lens.data.loaders import COUNTERFACT_FIELDS, validate_counterfact
from relation_lens.errors import DataError
from relation_lens.model_interface import Model
from relation_lens.probes import known_mask

# Records 400-429 of the shipped dataset tune the editors' settings (experiments/tune_*.py); reported
# results use the others (evaluation_records).
TUNING_SPLIT = range(400, 430)


def evaluation_records(records=None, n: int | None = None) -> list[dict]:
    """The shipped records (or ``records``) outside :data:`TUNING_SPLIT`, in order, the first ``n``."""
    records = list(load_counterfactual() if records is None else records)
    kept = [r for i, r in enumerate(records) if i not in TUNING_SPLIT]
    if n is not None and n > len(kept):
        raise DataError(f"{n} evaluation records asked for, {len(kept)} there (outside the tuning split "
                        f"{TUNING_SPLIT.start}-{TUNING_SPLIT.stop - 1}); build more with build_counterfactual(n=...)")
    return kept[:n]


@torch.no_grad()
def build_counterfactual(model: Model, world=None, *, n: int = 500, seed: int = 0, n_neighbors: int = 5,
                         n_relations: int = 5) -> list[dict]:
    """Build ``n`` CounterFact-style records (see the module docstring) from facts ``model`` knows.

    Records are ordered and chosen by ``seed``; fields are :data:`~relation_lens.data.loaders.COUNTERFACT_FIELDS`.
    """
    world = world or load_world()
    facts = list(world)
    knows = known_mask(model, [f.prompt(0) for f in facts], [f.object for f in facts])
    known = [f for f, k in zip(facts, knows) if k]
    by_rel: dict[str, list] = {}
    by_subject: dict[str, list] = {}
    for f in known:
        by_rel.setdefault(f.relation_id, []).append(f)
        by_subject.setdefault(f.subject, []).append(f)
    objects = {rid: sorted({f.object for f in world.by_relation(rid)}) for rid in world.relations}
    rng = random.Random(seed)
    pool = [f for f in known if len(objects[f.relation_id]) > 1]
    rng.shuffle(pool)
    records: list[dict] = []
    for f in pool:
        if len(records) >= n:
            break
        new = rng.choice([o for o in objects[f.relation_id] if o != f.object])
        neighbours = [g for g in by_rel[f.relation_id] if g.object == f.object and g.subject != f.subject]
        neighbours = rng.sample(neighbours, min(n_neighbors, len(neighbours)))
        others = [g for g in by_subject[f.subject] if g.relation_id != f.relation_id]
        others = rng.sample(others, min(n_relations, len(others)))
        records.append({
            "case_id": len(records), "prompt": f.train_templates[0], "subject": f.subject, "target_new": new,
            "target_true": f.object, "relation_id": f.relation_id,
            "paraphrase_prompts": f.prompts(heldout=True) + [t.format(f.subject) for t in f.train_templates[1:]],
            "neighborhood_prompts": [g.prompt(0) for g in neighbours],
            "neighborhood_targets": [g.object for g in neighbours],
            "relation_prompts": [g.prompt(0) for g in others], "relation_targets": [g.object for g in others],
            "generation_prompts": [f.train_templates[0].format(f.subject), f"{f.subject} is"],
        })
    if not records:
        raise DataError("the model knows none of the world's facts: no counterfactual record could be built")
    return validate_counterfact(records, "built")


def counterfactual_path() -> Path:
    return Path(str(resources.files("relation_lens") / "data" / "world" / "counterfactual.jsonl"))


def load_counterfactual(path: str | Path | None = None):
    """The shipped, seeded build for the default model (or the JSONL file at ``path``), as a ``datasets.Dataset``."""
    import datasets

    path = Path(path) if path else counterfactual_path()
    rows = read_json(path, lines=True)
    validate_counterfact(rows, str(path))
    return datasets.Dataset.from_list([{k: r[k] for k in COUNTERFACT_FIELDS} for r in rows])


def save_records(records: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({k: r[k] for k in COUNTERFACT_FIELDS}, ensure_ascii=False) + "\n")
