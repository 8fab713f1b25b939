"""The experiments' quick runs (--limit) are part of the suite: they run end to end on the default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT_S

import relation_lens as rl

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "shared_slice"  # the first records of ../shared/data's files


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                       "HOME": str(Path.home()),
                                                       "RELATION_LENS_CACHE": os.environ["RELATION_LENS_CACHE"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_trace_relations_quick(tmp_path):
    run("trace_relations.py", "--limit", "6", "--samples", "2", "--shared", str(SLICE), "--out", str(tmp_path))
    md = (tmp_path / "trace_relations_quick.md").read_text()
    assert "relation corrupted" in md and "subject corrupted" in md and "last relation" in md
    for corrupt in ("relation", "subject"):
        assert (tmp_path / f"trace_relations_{corrupt}_quick.png").stat().st_size > 1000
        assert (tmp_path / f"trace_relations_{corrupt}_quick.html").is_file()


@pytest.mark.slow
def test_edit_relations_quick(tmp_path):
    run("edit_relations.py", "--limit", "2", "--shared", str(SLICE), "--out", str(tmp_path))
    md = (tmp_path / "edit_relations_quick.md").read_text()
    assert md.count("| relation_rome |") >= 2 + 6 and "CounterFact (ROME)" in md
    assert (tmp_path / "edit_relations_sweep_quick.png").is_file()


@pytest.mark.slow
def test_sequential_edits_quick(tmp_path):
    run("sequential_edits.py", "--limit", "3", "--out", str(tmp_path))
    md = (tmp_path / "sequential_edits_quick.md").read_text()
    # 5 methods x (with, without AlphaEdit) x (unedited, 3 edits), each restored bit-exact
    assert md.count("| True |") == 20 and md.count("| 3 | 3 |") + md.count("| 3 | 2 |") == 10
    assert "relation-MEMIT + AlphaEdit" in md and "r-ROME" in md
    assert len(list((tmp_path / "sequential_quick").glob("*.json"))) == 10
    assert (tmp_path / "sequential_edits_quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_batch_edits_quick(tmp_path):
    run("batch_edits.py", "--limit", "3", "--out", str(tmp_path))
    md = (tmp_path / "batch_edits_quick.md").read_text()
    # 2 methods x (with, without AlphaEdit) x batch sizes 1 and 3, plus the unedited model
    assert md.count("MEMIT | 1 | 3 | 0 |") + md.count("MEMIT + AlphaEdit | 1 | 3 | 0 |") == 4
    assert md.count("| 3 | 1 | 0 |") == 4 and "| unedited |" in md
    assert "3 values optimised" in md


@pytest.mark.slow
def test_walkthrough_runs(tmp_path):
    run("walkthrough.py", "--out", str(tmp_path))
    page = (tmp_path / "walkthrough.md").read_text()
    assert "undone: True" in page and (tmp_path / "walkthrough_trace.png").is_file()


@pytest.mark.slow
def test_rome_exact_quick(tmp_path):
    out = run("rome_exact.py", "--limit", "2", "--out", str(tmp_path))
    assert "ROME's code: EditConfig()" in out and (tmp_path / "rome_exact_quick.md").is_file()


@pytest.mark.slow
def test_tracing_toolkit_quick(tmp_path):
    run("tracing_toolkit.py", "--limit", "4", "--samples", "2", "--out", str(tmp_path))
    md = (tmp_path / "tracing_toolkit_quick.md").read_text()
    assert "3a. Attention knockout" in md and "3b. Noise vs token replacement" in md and "3c. Attribution" in md
    assert (tmp_path / "tracing_toolkit_knockout_quick.png").stat().st_size > 1000
    assert (tmp_path / "tracing_toolkit_replace_quick.png").stat().st_size > 1000


@pytest.mark.slow
def test_path_patching_quick(tmp_path):
    run("path_patching.py", "--limit", "2", "--samples", "2", "--out", str(tmp_path))
    md = (tmp_path / "path_patching_quick.md").read_text()
    assert "direct path to the logits" in md and "through MLPs too" in md and md.count("| 5 |") == 2
    assert (tmp_path / "path_patching_quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tune_presets_quick(tmp_path):
    import json

    run("tune_presets.py", "--limit", "2", "--out", str(tmp_path))
    md = (tmp_path / "tune_presets_quick.md").read_text()
    assert md.count("| relation_rome |") == 2 and "| presets |" in md and "| tuned |" in md
    r = json.loads((tmp_path / "tune_quick" / "relation_rome.json").read_text())
    assert len(r["tune"]["trials"]) == 2 and r["n_evaluation"] == 2
    assert r["tune"]["best"] >= r["tune"]["trials"][0]["objective"]
    # every record's numbers are kept, and the report's difference is the two Scores' difference
    ev = r["evaluation"]
    assert [len(ev[k]["records"]) for k in ("presets", "tuned")] == [2, 2]
    row = next(line for line in md.splitlines() if line.startswith("| relation_rome | tuned |"))
    assert row.split(" | ")[8].startswith(f"{ev['tuned']['Score'] - ev['presets']['Score']:+.1f} [")


@pytest.mark.slow
def test_sequential_edits_with_tuned_settings_quick(tmp_path):
    import json

    import relation_lens as rl

    run("sequential_edits.py", "--limit", "2", "--methods", "ROME", "--alpha", "on", "--tuned", "--out", str(tmp_path))
    md = (tmp_path / "sequential_edits_quick.md").read_text()
    assert "| ROME + AlphaEdit (tuned) | 2 |" in md
    t = rl.TuneResult.from_json((tmp_path / "tune" / "sequence_rome_alphaedit.json").read_text())
    assert t.objective == "sequence" and t.alphaedit and len(t.trials) == 2
    assert list(t.candidates)[:2] == ["threshold", "l2"]  # AlphaEdit's own settings searched first
    rows = json.loads((tmp_path / "sequential_quick" / "rome_alphaedit_tuned.json").read_text())["rows"]
    assert rows[-1]["restored"] and rows[-1]["applied"] <= 2


@pytest.mark.slow
def test_longer_tuning_records_share_no_subject_with_the_shipped_records(default_model):
    """The records sequential_edits.py (over 30 edits) and tune_presets.py --tuning-extra tune on besides
    the split: none of their subjects, or of their neighbourhood / relation prompts, is a shipped record's
    subject, one of a shipped record's neighbours, or an untouched fact's subject."""
    import importlib.util

    from relation_lens.data import World, load_world
    from relation_lens.data.counterfact import load_counterfactual

    spec = importlib.util.spec_from_file_location("sequential_edits", ROOT / "experiments" / "sequential_edits.py")
    seq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seq)
    world, shipped = load_world(), list(load_counterfactual())
    some = set(sorted(world.relations)[:8])  # a quarter of the world keeps the test cheap
    part = World(tuple(f for f in world if f.relation_id in some), world.relations)
    subject_of = {f.prompt(0): f.subject for f in world}
    taken = {r["subject"] for r in shipped}
    prompts = {p for r in shipped for p in r["neighborhood_prompts"] + r["relation_prompts"]}
    neighbours = {f.subject for f in part if f.prompt(0) in prompts}  # the world's facts behind those prompts
    untouched = [f for f in part if f.subject not in taken and f.subject not in neighbours][:20]
    records = seq.longer_tuning_records(default_model, part, shipped, 8, untouched)
    assert len(records) == 8
    used = {r["subject"] for r in records} | {subject_of[p] for r in records
                                              for p in r["neighborhood_prompts"] + r["relation_prompts"]}
    assert not used & taken and not used & neighbours and not used & {f.subject for f in untouched}


@pytest.mark.slow
def test_trace_real_quick(tmp_path):
    run("trace_real.py", "--model", "default", "--limit", "2", "--shared", str(SLICE), "--out", str(tmp_path))
    md = (tmp_path / "trace_real.md").read_text()
    for run_name in ("relation corrupted", "relation, lastclean corrupted", "subject corrupted", "Attention knockout"):
        assert f"## {run_name}" in md, run_name
    facts = json.loads((tmp_path / "trace_facts.json").read_text())
    assert set(facts["known"]) == {"known_1000", "CounterFact", "LRE", "FewRel"}
    # every source the model knows facts of is reported on its own
    for source, rows in facts["known"].items():
        assert (f"- {source} (" in md) == bool(rows), source
    assert (tmp_path / "trace_relation_checkpoint" / "manifest.json").is_file()


@pytest.mark.slow
def test_edit_real_quick(tmp_path):
    variants = ["unedited", "ROME", "relation-ROME (paper's rule)", "relation-MEMIT + AlphaEdit"]
    run("edit_real.py", "--model", "default", "--limit", "1", "--shared", str(SLICE), "--out", str(tmp_path),
        "--datasets", "LRE counterfactual", "--variants", *variants, "--stats-texts", "200", "--sweep-layers", "0",
        "--sweep-methods", "relation_rome")
    md = (tmp_path / "edit_real.md").read_text()
    assert "## LRE counterfactual: 1 records" in md
    for label in variants:
        assert f"| {label} |" in md, label
    # the LRE records are facts the default model gets right, rewritten (build_counterfactual over the slice)
    rec = json.loads((tmp_path / "edit_real" / "lre_counterfactual.jsonl").read_text().splitlines()[0])
    assert rec["relation_id"] in ("landmark_in_country", "landmark_on_continent") and rec["target_new"] != rec["target_true"]
    assert "| relation-ROME (paper's rule) − ROME | Score |" in md
    assert "| relation_rome | 0 |" in md and (tmp_path / "edit_real_sweep.png").is_file()
    # each variant's evaluation was checkpointed record by record
    assert (tmp_path / "edit_real" / "lre_counterfactual" / "rome_checkpoint" / "items.rank0.jsonl").is_file()


@pytest.mark.slow
def test_sequence_real_quick(tmp_path):
    run("sequence_real.py", "--model", "default", "--limit", "1", "--shared", str(SLICE), "--out", str(tmp_path),
        "--variants", "relation_memit+alphaedit", "--stats-texts", "200")
    md = (tmp_path / "sequence_real.md").read_text()
    res = rl.SequenceResult.from_json(tmp_path / "sequence" / "relation_memit+alphaedit.json")
    assert [row["edits"] for row in res.rows] == [0, 1, 2] and res.restored
    assert res.settings["batch_size"] == 1 and res.settings["alphaedit"] and "fluency" in res.rows[-1]
    assert "| relation_memit+alphaedit | 2 |" in md and "99.5 | 94.0 | 66.4" in md
    assert (tmp_path / "sequence" / "relation_memit+alphaedit_checkpoint" / "state.pt").is_file()
