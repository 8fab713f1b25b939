"""Data: the default model's world of facts (vendored in the package).

``load_world()`` returns the facts and templates the embedded default model was trained on:
each fact has a subject, a relation (id and name), an object, and the relation's templates split
into those used in training and those held out (for paraphrase evaluation). Sources and licences:
``relation_lens/data/LICENSES/`` and ``docs/default_model.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from relation_lens.data.io import read_json
from relation_lens.errors import DataError


def world_dir() -> Path:
    return Path(str(resources.files("relation_lens") / "data" / "world"))


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    template_sources: str


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) fact of the world."""

    fact_id: int
    subject: str
    relation: Relation
    object: str
    source: str

    @property
    def relation_id(self) -> str:
        return self.relation.relation_id

    @property
    def relation_name(self) -> str:
        return self.relation.name

    @property
    def train_templates(self) -> tuple[str, ...]:
        return self.relation.train_templates

    @property
    def heldout_templates(self) -> tuple[str, ...]:
        return self.relation.heldout_templates

    def prompt(self, template: int = 0, *, heldout: bool = False) -> str:
        """The prompt from one template (a training one by default), ending right before the object."""
        templates = self.heldout_templates if heldout else self.train_templates
        return templates[template].format(self.subject)

    def prompts(self, *, heldout: bool = False) -> list[str]:
        return [t.format(self.subject) for t in (self.heldout_templates if heldout else self.train_templates)]

    @property
    def target(self) -> str:
        return self.object

    def to_dict(self) -> dict:
        return {"fact_id": self.fact_id, "subject": self.subject, "relation_id": self.relation_id,
                "relation_name": self.relation_name, "object": self.object, "source": self.source,
                "train_templates": list(self.train_templates), "heldout_templates": list(self.heldout_templates)}


@dataclass(frozen=True, repr=False)
class World:
    facts: tuple[Fact, ...]
    relations: dict[str, Relation]

    def __repr__(self) -> str:
        return f"World({len(self.facts)} facts over {len(self.relations)} relations)"

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def by_relation(self, relation_id: str) -> list[Fact]:
        if relation_id not in self.relations:
            raise DataError(f"unknown relation {relation_id!r}; the world has {sorted(self.relations)}")
        return [f for f in self.facts if f.relation_id == relation_id]

    def by_subject(self, subject: str) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject]

    def to_dataset(self):
        """The facts as a ``datasets.Dataset`` (one row per fact, templates as lists)."""
        import datasets

        return datasets.Dataset.from_list([f.to_dict() for f in self.facts])


def load_world(path: str | None = None) -> World:
    """Load the world of facts (default: the one vendored with the package)."""
    folder = Path(path) if path else world_dir()
    raw = read_json(folder / "relations.json", lines=False)
    relations = {rid: Relation(rid, r["name"], tuple(r["train_templates"]), tuple(r["heldout_templates"]),
                               r.get("template_sources", "")) for rid, r in raw.items()}
    facts = []
    for i, row in enumerate(read_json(folder / "facts.jsonl", lines=True)):
        for key in ("fact_id", "subject", "relation_id", "object"):
            if key not in row:
                raise DataError(f"{str(folder / 'facts.jsonl')!r} record {i}: field {key!r} is missing")
        if row["relation_id"] not in relations:
            raise DataError(f"{str(folder / 'facts.jsonl')!r} record {i}: relation_id {row['relation_id']!r} "
                            "is not in relations.json")
        facts.append(Fact(row["fact_id"], row["subject"], relations[row["relation_id"]], row["object"],
                          row.get("source", "")))
    return World(tuple(facts), relations)


@lru_cache(maxsize=1)
def known_1000_subjects() -> tuple[str, ...]:
    """The subjects of ROME's known_1000 (vendored, MIT), as ROME's causal tracing pools them for its
    noise level."""
    path = world_dir() / "known_1000_subjects.json"
    return tuple(read_json(path, lines=False)["subjects"])


def world_trace_facts(relation: str | None = None, limit: int = 50) -> list[dict]:
    """Up to ``limit`` facts of the world (of one relation if given), spread evenly over it, as
    ``{prompt, subject, target}`` records for :func:`relation_lens.trace_dataset`. Facts whose first
    template starts with the subject are preferred, so that relation words follow the subject."""
    world = load_world()
    facts = world.by_relation(relation) if relation else list(world)
    facts = [f for f in facts if f.train_templates[0].startswith("{}")] or facts
    step = max(1, len(facts) // max(1, limit))
    return [{"prompt": f.prompt(0), "subject": f.subject, "target": f.object} for f in facts[::step][:limit]]
