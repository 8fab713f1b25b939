"""Data parallelism on torch.distributed (2 gloo processes on the CPU) gives the one-process numbers,
and a checkpointed dataset trace killed part-way and started again loses nothing and duplicates
nothing."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S

import relation_lens as rl
from relation_lens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_stamps(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("relation_lens_version", "schema_version")}


def test_trace_dataset_with_torchrun_equals_one_process(tmp_path):
    # packs of 2 prompts: rank 0 traces packs 0 and 2, rank 1 pack 1
    args = ["trace-dataset", "--relation", "P30", "--limit", "5", "--samples", "2", "--quiet", "--formats", "png",
            "--pack", "2"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    # the same intra-op threads as this process (torchrun would set 1): float32 kernels may round differently
    # with another thread count, and the claim is bit-for-bit equality
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "relation_lens",
                           *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "trace_dataset.json").read_text())
    two = json.loads((tmp_path / "two" / "trace_dataset.json").read_text())
    assert _without_stamps(one) == _without_stamps(two)  # every grid, bit for bit
    assert one["n_total"] == 5
    # both ranks appended their share to the checkpoint; outputs came from rank 0 alone
    shards = sorted(p.name for p in (tmp_path / "two").glob("items.rank*.jsonl"))
    assert shards == ["items.rank0.jsonl", "items.rank1.jsonl"]
    lines = [json.loads(l) for s in shards for l in (tmp_path / "two" / s).read_text().splitlines()]
    assert sorted(row["index"] for row in lines) == list(range(5))


def _on_two_ranks(tmp_path, workload: str) -> list:
    """What dist_worker's ``workload`` returns on each of two spawned ranks."""
    import torch.multiprocessing as mp
    from dist_worker import run

    out = str(tmp_path / workload)
    mp.spawn(run, args=(2, _free_port(), out, workload), nprocs=2, join=True)
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in (0, 1)]


def test_statistics_and_evaluation_on_two_processes_equal_one(tmp_path):
    from dist_worker import workloads

    ranked = _on_two_ranks(tmp_path, "workloads")
    single = workloads()
    for got in ranked:
        assert got["count"] == single["count"]
        rel = (got["moment"] - single["moment"]).abs().max() / single["moment"].abs().max()
        assert rel <= 1e-12, rel
        # every record, in order (compared as results: NaN, e.g. the unmeasured fluency, equals NaN)
        assert rl.EvaluationResult.from_dict(got["evaluation"]) == rl.EvaluationResult.from_dict(single["evaluation"])
    assert len(single["evaluation"]["records"]) == 5



def test_a_batched_sequence_on_two_processes_equals_one(tmp_path):
    """Each step's z's are optimised half on each rank and gathered; every rank writes the same edits and
    returns the one-process rows."""
    from dist_worker import sequence_workloads

    ranked = _on_two_ranks(tmp_path, "sequence_workloads")
    single = sequence_workloads()
    assert single["optimised"] == 4 and single["restored"]
    for got in ranked:
        assert got["optimised"] == 2 and got["restored"]
        assert repr(got["rows"]) == repr(single["rows"])  # float reprs round-trip: equal bit for bit (NaN too)


@pytest.mark.parametrize("pack, traced_by", [(1, "trace"), (2, "trace_packed")])
def test_killed_dataset_trace_resumes_without_loss_or_duplicates(tiny_model, tmp_path, monkeypatch, pack, traced_by):
    """Killed after two prompts (prompt by prompt) or after one pack of two (packed)."""
    import relation_lens.tracing.dataset as ds

    facts = [("The Space Needle is located in the city of", "The Space Needle"),
             ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
             ("Big Ben is located in the city of", "Big Ben"),
             ("The Colosseum is located in the city of", "The Colosseum"),
             ("I visited the Louvre", "the Louvre")]  # no relation words: recorded as skipped
    settings = dict(n_samples=2, window=2, kinds=("resid", "mlp"), pack=pack)
    whole = rl.trace_dataset(tiny_model, facts, **settings)
    real_trace, calls = getattr(ds, traced_by), []

    def dies_after_two_prompts(*a, **k):
        if len(calls) == 2 // pack:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real_trace(*a, **k)

    monkeypatch.setattr(ds, traced_by, dies_after_two_prompts)
    with pytest.raises(KeyboardInterrupt):
        rl.trace_dataset(tiny_model, facts, checkpoint=tmp_path, **settings)
    monkeypatch.setattr(ds, traced_by, real_trace)
    shard = tmp_path / "items.rank0.jsonl"
    assert len(shard.read_text().splitlines()) == 2
    with open(shard, "a") as fh:  # a third line cut short by the kill
        fh.write('{"index": 2, "result": {"prom')
    resumed = rl.trace_dataset(tiny_model, facts, checkpoint=tmp_path, **settings)
    assert resumed == whole
    rows = [l for l in shard.read_text().splitlines()]
    indices = [json.loads(l)["index"] for l in rows if l.endswith("}")]
    assert sorted(indices) == [0, 1, 2, 3, 4] and len(indices) == 5  # nothing lost, nothing twice
    again = rl.trace_dataset(tiny_model, facts, checkpoint=tmp_path, **settings)  # all done: nothing recomputed
    assert again == whole and len(shard.read_text().splitlines()) == len(rows)
    with pytest.raises(rl.ConfigError, match=r"other arguments \(differing: \['config'\]\)"):
        rl.trace_dataset(tiny_model, facts, checkpoint=tmp_path, **{**settings, "n_samples": 3})


@pytest.mark.parametrize("batch", [False, True])
def test_a_killed_evaluation_resumes_with_nothing_lost(default_model, tmp_path, monkeypatch, batch):
    """evaluate (record by record) and evaluate_batch (batch by batch) with ``checkpoint=``: killed at the
    third edit, started again, they edit only what was not written and equal an uninterrupted run; a
    finished run recomputes nothing; other settings are refused."""
    import relation_lens.evaluation as ev
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.editing.memit import memit_config
    from relation_lens.key_statistics import default_corpus

    model = default_model
    recs = list(load_counterfactual())[400:404]
    if batch:
        cfg = memit_config(v_steps=4, prefix_lengths=((4, 2),))
        stats = {l: rl.KeyStatistics.compute(model, l, default_corpus()[:150], n_texts=None, cache=False,
                                             progress=False) for l in (3, 4)}

        def run(**kw):
            return rl.evaluate_batch(model, recs, method="relation_memit", batch_size=1, layers=(3, 4), stats=stats,
                                     config=kw.pop("config", cfg), **kw)
    else:
        cfg = rl.EditConfig.default_model_preset(v_steps=4, prefix_lengths=((4, 2),))
        stats = rl.KeyStatistics.compute(model, 4, default_corpus()[:150], n_texts=None, cache=False, progress=False)

        def run(**kw):
            return rl.evaluate(model, recs, method="relation_rome", layer=4, stats=stats, fluency=False,
                               config=kw.pop("config", cfg), **kw)

    whole = run()
    real, calls = ev.compute_edit, []

    def edit(*a, **k):
        if calls.count("killed") == 0 and len(calls) == 2:
            calls.append("killed")
            raise KeyboardInterrupt("killed")
        calls.append("edit")
        return real(*a, **k)

    monkeypatch.setattr(ev, "compute_edit", edit)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=tmp_path)
    assert len((tmp_path / "items.rank0.jsonl").read_text().splitlines()) == 2
    resumed = run(checkpoint=tmp_path)
    assert calls == ["edit", "edit", "killed", "edit", "edit"]  # only the two not written were edited
    assert resumed == whole
    again = run(checkpoint=tmp_path)
    assert again == whole and len(calls) == 5
    with pytest.raises(rl.ConfigError, match=r"differing: \['config'\]"):
        run(checkpoint=tmp_path, config=dataclasses.replace(cfg, v_steps=5))


def test_tuning_on_two_processes_equals_one(tmp_path):
    from dist_worker import tune_workloads

    ranked = _on_two_ranks(tmp_path, "tune_workloads")
    single = tune_workloads()
    for got in ranked:
        for name in ("single", "batch", "sequence"):
            assert len(got[name]) == len(single[name]) and got[name][-1] == single[name][-1], name
            for a, b in zip(got[name][:-1], single[name][:-1]):
                assert a["params"] == b["params"] and a["trial"] == b["trial"]
                for k in ("objective", "ES", "PS", "NS", "RS", "Score"):
                    assert a[k] == pytest.approx(b[k], abs=1e-9, nan_ok=True), (name, k, a, b)
    assert len(single["sequence"]) == 4  # three trials (shared over the ranks), and the chosen settings
