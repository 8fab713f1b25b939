"""Loaders for the public relational datasets, from local files, as ``datasets.Dataset`` objects.

* FewRel 1.0 (``val_wiki.json`` layout + ``pid2name.json``): (subject, relation, object) triples with
  cased surface forms taken from the sentence tokens, and cloze prompts built from relation templates.
* ROME's ``known_1000.json``.
* The LRE relations (Hernandez et al. 2024; one JSON file per relation: ``name``, ``prompt_templates``,
  ``prompt_templates_zs``, ``samples``) as a :class:`~relation_lens.data.World` of facts, from which
  :func:`~relation_lens.data.counterfact.build_counterfactual` builds records for any model.
* CounterFact, in ROME's layout (``requested_rewrite`` / ``paraphrase_prompts`` /
  ``neighborhood_prompts``) and in the MEND/EasyEdit layout (``prompt`` / ``rephrase_prompt`` /
  ``locality_prompt``), both normalised to one flat schema (:data:`COUNTERFACT_FEATURES`).

Every loader validates its records and names the file, the record and the field that is wrong;
a missing file raises :class:`~relation_lens.errors.DataError` naming the path.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from relation_lens.data import Fact, Relation, World
from relation_lens.data.io import read_json
from relation_lens.errors import DataError, shorten

# Cloze templates for the 16 relations of FewRel's validation split (and a few more), "{}" for the
# subject, ending right before the object. Sources: MQuAKE's cloze templates (P26, P40, P361, P463,
# P641, P413, P364; MIT, princeton-nlp/MQuAKE), ParaRel patterns (MIT, yanaiela/pararel), our own.
RELATION_TEMPLATES: dict[str, list[str]] = {
    "P177": ["{} crosses the", "{} spans the", "{} goes over the"],
    "P364": ["The original language of {} is", "The language of {} is", "{} was made in the language of"],
    "P2094": ["{} competes in the class of", "The competition class of {} is", "{} is in the category"],
    "P361": ["{} is part of", "{} is a part of the", "{} belongs to"],
    "P641": ["{} is associated with the sport of", "{} plays the sport of", "The sport of {} is"],
    "P59": ["{} is part of the constellation named", "{} is a star in the constellation of", "{} lies in the constellation"],
    "P413": ["{} plays the position of", "{} plays in the position of", "On the field, {} plays as a"],
    "P206": ["{} is located next to the", "{} lies on the shore of the", "The body of water near {} is the"],
    "P412": ["{} has the voice type of a", "{} sings as a", "The voice type of {} is"],
    "P155": ["{} follows", "{} comes after", "{} is the successor of"],
    "P26": ["{} is married to", "The spouse of {} is", "{} is the husband or wife of"],
    "P410": ["{} holds the military rank of", "The military rank of {} is", "{} served with the rank of"],
    "P25": ["The mother of {} is", "{}'s mother is", "{} is the child of"],
    "P463": ["{} is a member of", "{} belongs to the organization of", "{} is part of the"],
    "P40": ["{}'s child is", "The child of {} is", "{} is the parent of"],
    "P921": ["The main subject of {} is", "{} is about", "{} deals with the topic of"],
}

COUNTERFACT_FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "relation_id",
                      "paraphrase_prompts", "neighborhood_prompts", "neighborhood_targets", "relation_prompts",
                      "relation_targets", "generation_prompts")


def _read_json(path: str | Path) -> Any:
    return read_json(path)


def _require(record: Any, fields: dict[str, type | tuple], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    for name, typ in fields.items():
        if name not in record:
            raise DataError(f"{where}: field {name!r} is missing")
        if not isinstance(record[name], typ):
            raise DataError(f"{where}: field {name!r} should be {getattr(typ, '__name__', typ)}, "
                            f"got {type(record[name]).__name__} {record[name]!r}")


def _surface(tokens: list[str], positions: list[list[int]]) -> str:
    text = " ".join(tokens[i] for i in positions[0])
    return re.sub(r" ([,.'’)])", r"\1", re.sub(r"\( ", "(", text)).replace(" - ", "-")


def load_fewrel(path: str | Path, pid2name: str | Path | None = None):
    """FewRel instances as triples: ``subject``, ``subject_id``, ``relation_id``, ``relation_name``,
    ``object``, ``object_id``, ``sentence``. Surface forms are cased, taken from ``tokens``."""
    import datasets

    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{str(path)!r}: expected an object mapping relation ids to instance lists")
    names = {}
    if pid2name is not None:
        names = {k: v[0] for k, v in _read_json(pid2name).items()}
    rows = []
    for pid, instances in data.items():
        for i, inst in enumerate(instances):
            where = f"{str(path)!r} relation {pid} instance {i}"
            _require(inst, {"tokens": list, "h": list, "t": list}, where)
            for side in ("h", "t"):
                ent = inst[side]
                if len(ent) != 3 or not isinstance(ent[2], list) or not ent[2] or not all(
                        isinstance(j, int) and 0 <= j < len(inst["tokens"]) for j in ent[2][0]):
                    raise DataError(f"{where}: field {side!r} should be [name, id, [[token positions]]] inside the "
                                    f"{len(inst['tokens'])} tokens, got {ent!r}")
            rows.append({"subject": _surface(inst["tokens"], inst["h"][2]), "subject_id": inst["h"][1],
                         "relation_id": pid, "relation_name": names.get(pid, pid),
                         "object": _surface(inst["tokens"], inst["t"][2]), "object_id": inst["t"][1],
                         "sentence": " ".join(inst["tokens"])})
    return datasets.Dataset.from_list(rows)


def fewrel_prompts(triples, templates: dict[str, list[str]] | None = None, *, which: int | None = 0):
    """Cloze prompts for FewRel triples: ``prompt`` (ending right before the object), ``subject``,
    ``target`` (the object), ``relation_id``, ``template``. ``which`` picks one template per relation
    (``None``: one row per template). Relations without a template are skipped."""
    import datasets

    templates = templates or RELATION_TEMPLATES
    rows: list[dict[str, Any]] = []
    missing: dict[str, int] = {}
    for r in triples:
        ts = templates.get(r["relation_id"])
        if not ts:
            missing[r["relation_id"]] = missing.get(r["relation_id"], 0) + 1
            continue
        for t in ts if which is None else [ts[which % len(ts)]]:
            rows.append({"prompt": t.format(r["subject"]), "subject": r["subject"], "target": r["object"],
                         "relation_id": r["relation_id"], "template": t})
    if missing:
        lacking = ", ".join(f"{rid} ({n} triples)" for rid, n in sorted(missing.items()))
        if not rows:
            raise DataError(f"no FewRel triple has a prompt template: relations without templates: {lacking}; "
                            "pass templates={relation_id: ['{} ...', ...]}")
        warnings.warn(f"skipped FewRel triples of relations without prompt templates: {lacking}", stacklevel=2)
    return datasets.Dataset.from_list(rows)


def load_known(path: str | Path):
    """ROME's ``known_1000.json``: ``known_id``, ``subject``, ``attribute`` (the object), ``template``,
    ``prompt``, ``relation_id``; also ``target`` (= attribute) for :func:`relation_lens.trace_dataset`."""
    import datasets

    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r}: expected a list of records")
    rows = []
    for i, rec in enumerate(data):
        where = f"{str(path)!r} record {i}"
        _require(rec, {"subject": str, "attribute": str, "template": str, "prompt": str, "relation_id": str}, where)
        if rec["subject"] not in rec["prompt"]:
            raise DataError(f"{where}: field 'subject' {rec['subject']!r} does not occur in 'prompt' {rec['prompt']!r}")
        rows.append({"known_id": rec.get("known_id", i), "subject": rec["subject"], "attribute": rec["attribute"],
                     "target": rec["attribute"], "template": rec["template"], "prompt": rec["prompt"],
                     "relation_id": rec["relation_id"]})
    return datasets.Dataset.from_list(rows)


def load_lre_world(folder: str | Path, relations: list[str] | None = None):
    """The relations of Hernandez et al.'s LRE data in ``folder`` (one ``<relation>.json`` each, e.g. its
    ``data/factual``) as a :class:`~relation_lens.data.World`: a relation's ``prompt_templates`` are its
    training templates (the first makes a record's prompt), its ``prompt_templates_zs`` the held-out
    ones (a record's paraphrases; those among the training templates left out), each sample a fact; relation ids are the file names. ``relations``:
    only these (file names without ``.json``)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder of LRE relation files")
    files = sorted(root.glob("*.json"))
    if relations is not None:
        missing = sorted(set(relations) - {f.stem for f in files})
        if missing:
            raise DataError(f"{str(root)!r} has no relation file for {missing}")
        files = [f for f in files if f.stem in set(relations)]
    if not files:
        raise DataError(f"{str(root)!r} holds no .json relation file")
    rels: dict = {}
    facts: list = []
    for f in files:
        data = _read_json(f)
        where = f"{str(f)!r}"
        _require(data, {"name": str, "prompt_templates": list, "samples": list}, where)
        templates = {k: list(data.get(k) or []) for k in ("prompt_templates", "prompt_templates_zs")}
        for k, ts in templates.items():
            bad = [t for t in ts if not isinstance(t, str) or t.count("{}") != 1]
            if bad:
                raise DataError(f"{where}: {k} holds {bad[0]!r}, not a template with one '{{}}' for the subject")
        if not templates["prompt_templates"]:
            raise DataError(f"{where}: prompt_templates is empty")
        heldout = [t for t in templates["prompt_templates_zs"] if t not in templates["prompt_templates"]]
        rel = Relation(f.stem, data["name"], tuple(templates["prompt_templates"]), tuple(heldout),
                       "LRE (Hernandez et al. 2024)")
        rels[f.stem] = rel
        for i, sample in enumerate(data["samples"]):
            _require(sample, {"subject": str, "object": str}, f"{where} sample {i}")
            facts.append(Fact(len(facts), sample["subject"], rel, sample["object"], f"lre:{f.stem}"))
    return World(tuple(facts), rels)


def _normalise_rome(rec: dict, i: int, where: str) -> dict:
    _require(rec, {"requested_rewrite": dict}, where)
    rw = rec["requested_rewrite"]
    _require(rw, {"prompt": str, "subject": str, "target_new": dict, "target_true": dict}, where + " requested_rewrite")
    for key in ("target_new", "target_true"):
        _require(rw[key], {"str": str}, f"{where} requested_rewrite.{key}")
    if rw["prompt"].count("{}") != 1:
        raise DataError(f"{where}: field 'requested_rewrite.prompt' {rw['prompt']!r} must contain one '{{}}'")
    neigh = rec.get("neighborhood_prompts", [])
    return {"case_id": rec.get("case_id", i), "prompt": rw["prompt"], "subject": rw["subject"],
            "target_new": rw["target_new"]["str"], "target_true": rw["target_true"]["str"],
            "relation_id": rw.get("relation_id", ""), "paraphrase_prompts": list(rec.get("paraphrase_prompts", [])),
            "neighborhood_prompts": list(neigh), "neighborhood_targets": [rw["target_true"]["str"]] * len(neigh),
            "relation_prompts": list(rec.get("relation_prompts", [])),
            "relation_targets": list(rec.get("relation_targets", [])),
            "generation_prompts": list(rec.get("generation_prompts", []))}


def _normalise_mend(rec: dict, i: int, where: str) -> dict:
    _require(rec, {"prompt": str, "subject": str, "target_new": str, "ground_truth": str}, where)
    prompt = rec["prompt"]
    if "{}" not in prompt:
        if rec["subject"] not in prompt:
            raise DataError(f"{where}: field 'subject' {rec['subject']!r} does not occur in 'prompt' {shorten(prompt)}")
        prompt = prompt.replace(rec["subject"], "{}", 1)
    loc = [rec["locality_prompt"]] if rec.get("locality_prompt") else []
    return {"case_id": rec.get("case_id", i), "prompt": prompt, "subject": rec["subject"],
            "target_new": rec["target_new"], "target_true": rec["ground_truth"], "relation_id": "",
            "paraphrase_prompts": [rec["rephrase_prompt"]] if rec.get("rephrase_prompt") else [],
            "neighborhood_prompts": loc, "neighborhood_targets": [rec.get("locality_ground_truth", "")] * len(loc),
            "relation_prompts": [], "relation_targets": [], "generation_prompts": []}


def validate_counterfact(rows: list[dict], source: str = "records") -> list[dict]:
    """Check normalised CounterFact records (see :data:`COUNTERFACT_FIELDS`)."""
    for i, r in enumerate(rows):
        where = f"{source} record {i}"
        _require(r, {"prompt": str, "subject": str, "target_new": str, "target_true": str,
                     "paraphrase_prompts": list, "neighborhood_prompts": list, "neighborhood_targets": list,
                     "relation_prompts": list, "relation_targets": list}, where)
        if r["prompt"].count("{}") != 1:
            raise DataError(f"{where}: field 'prompt' {r['prompt']!r} must contain exactly one '{{}}'")
        for key in ("subject", "target_new", "target_true"):
            if not r[key].strip():
                raise DataError(f"{where}: field {key!r} is empty")
        if len(r["neighborhood_prompts"]) != len(r["neighborhood_targets"]):
            raise DataError(f"{where}: fields 'neighborhood_prompts' and 'neighborhood_targets' differ in length")
        if len(r["relation_prompts"]) != len(r["relation_targets"]):
            raise DataError(f"{where}: fields 'relation_prompts' and 'relation_targets' differ in length")
    return rows


def load_counterfact(path: str | Path, limit: int | None = None):
    """CounterFact records in either layout, normalised to :data:`COUNTERFACT_FIELDS`."""
    import datasets

    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r}: expected a list of records")
    rows = []
    for i, rec in enumerate(data[:limit] if limit else data):
        where = f"{str(path)!r} record {i}"
        if isinstance(rec, dict) and "requested_rewrite" in rec:
            rows.append(_normalise_rome(rec, i, where))
        elif isinstance(rec, dict) and "ground_truth" in rec:
            rows.append(_normalise_mend(rec, i, where))
        elif isinstance(rec, dict) and "target_true" in rec and "prompt" in rec:
            rows.append({k: rec.get(k, [] if k.endswith(("prompts", "targets")) else "") for k in COUNTERFACT_FIELDS})
        else:
            raise DataError(f"{where}: neither ROME's layout ('requested_rewrite') nor the MEND layout "
                            f"('prompt', 'ground_truth'); keys are {sorted(rec) if isinstance(rec, dict) else rec!r}")
    validate_counterfact(rows, str(path))
    return datasets.Dataset.from_list(rows)
