"""rl.tune and rl.evaluate_sequence.

The search is checked on a made-up objective whose optimum is known (the trials' numbers stand in for
evaluate's), for its budget, its invariants (trial 0 is the start, the chosen trial is the best of all
trials) and its resumption after a kill; the trials on the default model equal evaluate / evaluate_batch
run by hand with each trial's settings, and the sequence equals edits written one after another by hand.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

import relation_lens as rl
from relation_lens.batch_editing import memit_config
from relation_lens.data.counterfact import load_counterfactual
from relation_lens.evaluation import records_metrics
from relation_lens.key_statistics import default_corpus
from relation_lens.probes import known_mask

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

tune_module = importlib.import_module("relation_lens.tune")  # the module (rl.tune is the function)


def _fake_records(n=3):
    return [{"case_id": i, "prompt": "{} is located in the country of", "subject": s, "target_new": "Japan",
             "target_true": "France", "paraphrase_prompts": [], "neighborhood_prompts": [],
             "neighborhood_targets": [], "relation_prompts": [], "relation_targets": []}
            for i, s in enumerate(["Paris", "Lyon", "Nice"][:n])]


def _objective(p):
    """Separable, with its optimum at layer 1, v_weight_decay 0.1, clamp_norm_factor 4, v_steps 40."""
    return (100 - 10 * (p["layer"] - 1) ** 2 - 5 * abs(math.log10(p["v_weight_decay"] / 0.1))
            - abs(p["clamp_norm_factor"] - 4) - (0 if p["v_steps"] == 40 else 3))


class Calls(list):
    kill_at: int | None = None  # the call (0-based) that is killed


@pytest.fixture
def fake_evaluate(monkeypatch):
    """evaluate replaced by ``_objective`` of the settings it is called with; the calls counted."""
    calls = Calls()

    def fake(model, records, *, method, layer, stats, config, preserve, fluency):
        p = {"layer": layer, "v_weight_decay": config.v_weight_decay, "clamp_norm_factor": config.clamp_norm_factor,
             "v_steps": config.v_steps}
        if calls.kill_at == len(calls):
            raise KeyboardInterrupt
        if preserve is not None:  # AlphaEdit's settings as each trial got them (a Preserve of its own)
            p.update(threshold=preserve.threshold, l2=preserve.l2, preserve=preserve)
        calls.append(p)
        v = _objective(p)
        return SimpleNamespace(summary={k: (v, 0.0) for k in ("ES", "PS", "NS", "RS", "Score")}, n_failed=0)

    monkeypatch.setattr(tune_module, "evaluate", fake)
    return calls


def _stub_stats(model):
    return {l: object() for l in range(model.cfg.n_layers)}  # never read by the fake evaluate


def test_search_finds_the_optimum_of_a_separable_objective(tiny_model, fake_evaluate):
    space = {"layer": [0, 1, 2, 3]}
    res = rl.tune(tiny_model, _fake_records(), method="relation_rome", space=space, stats=_stub_stats(tiny_model),
                  budget=100)
    assert res.params == {"layer": 1, "v_weight_decay": 0.1, "clamp_norm_factor": 4.0, "v_steps": 40}
    assert res.best == pytest.approx(100.0)
    # trial 0 is the start (the method's defaults for the model); the chosen is the best of all trials
    start = rl.EditConfig.default_for(tiny_model)
    assert res.trials[0]["params"] == {"layer": 2, "v_weight_decay": start.v_weight_decay,
                                       "clamp_norm_factor": start.clamp_norm_factor, "v_steps": start.v_steps}
    assert res.best == max(t["objective"] for t in res.trials)
    assert [t["trial"] for t in res.trials] == list(range(len(res.trials)))
    # each trial once: distinct settings, as many evaluate calls as trials
    assert len({str(t["params"]) for t in res.trials}) == len(res.trials) == len(fake_evaluate)
    for t in res.trials:
        assert t["objective"] == pytest.approx(_objective(t["params"]))
    # what it returns is what compute_edit takes
    kw = res.edit_kwargs()
    assert kw["layer"] == 1 and kw["config"].v_weight_decay == 0.1 and kw["config"].v_steps == 40
    assert kw["preserve"] is None
    assert kw["config"].prefix_lengths == start.prefix_lengths  # what was not searched is the start's


def test_budget_caps_the_trials(tiny_model, fake_evaluate):
    res = rl.tune(tiny_model, _fake_records(), method="relation_rome", space={"layer": [0, 1, 2, 3]},
                  stats=_stub_stats(tiny_model), budget=3)
    assert len(res.trials) == 3 == len(fake_evaluate)
    assert [t["params"]["layer"] for t in res.trials] == [2, 0, 1]  # the start, then the layer candidates
    assert res.params["layer"] == 1


def test_a_killed_tuning_run_resumes_with_nothing_lost(tiny_model, fake_evaluate, tmp_path):
    kw = dict(method="relation_rome", space={"layer": [0, 1, 2, 3]}, stats=_stub_stats(tiny_model), budget=100)
    whole = rl.tune(tiny_model, _fake_records(), checkpoint=tmp_path / "a", **kw)
    n = len(fake_evaluate)
    fake_evaluate.clear()
    fake_evaluate.kill_at = 5  # the 6th trial is killed
    with pytest.raises(KeyboardInterrupt):
        rl.tune(tiny_model, _fake_records(), checkpoint=tmp_path / "b", **kw)
    assert len(fake_evaluate) == 5
    fake_evaluate.clear()
    fake_evaluate.kill_at = None
    resumed = rl.tune(tiny_model, _fake_records(), checkpoint=tmp_path / "b", **kw)
    assert len(fake_evaluate) == n - 5  # the five written trials are not run again
    strip = lambda r: [{k: v for k, v in t.items() if k != "seconds"} for t in r.trials]  # noqa: E731
    assert strip(resumed) == strip(whole) and resumed.params == whole.params
    # a folder of a run with other arguments is refused
    with pytest.raises(rl.ConfigError, match="other arguments"):
        rl.tune(tiny_model, _fake_records(), checkpoint=tmp_path / "b", **{**kw, "method": "rome"})


def test_a_search_continued_from_an_earlier_result_starts_there(tiny_model, fake_evaluate):
    kw = dict(method="relation_rome", space={"layer": [0, 1, 2, 3]}, stats=_stub_stats(tiny_model))
    whole = rl.tune(tiny_model, _fake_records(), budget=100, **kw)
    first = rl.tune(tiny_model, _fake_records(), budget=3, **kw)  # stopped after the layers
    assert first.params["layer"] == 1 and first.params != whole.params
    fake_evaluate.clear()
    more = rl.tune(tiny_model, _fake_records(), budget=100, start=first, **kw)
    assert more.trials[0]["params"] == first.params == more.start == fake_evaluate[0]
    assert more.params == whole.params and more.best == pytest.approx(whole.best)
    # a dict sets the settings it names; the others keep the method's defaults
    part = rl.tune(tiny_model, _fake_records(), budget=1, start={"v_steps": 20, "layer": 3}, **kw)
    d = rl.EditConfig.default_for(tiny_model)
    assert part.trials[0]["params"] == {"layer": 3, "v_weight_decay": d.v_weight_decay,
                                        "clamp_norm_factor": d.clamp_norm_factor, "v_steps": 20}


def test_preserve_starts_alphaedits_search_and_each_trial_gets_its_own(tiny_model, fake_evaluate):
    mine = rl.Preserve(threshold=1e-3, l2=10.0)
    res = rl.tune(tiny_model, _fake_records(), method="relation_rome", preserve=mine, budget=4,
                  space={"layer": [2]}, stats=_stub_stats(tiny_model))
    assert res.alphaedit and res.trials[0]["params"]["threshold"] == 1e-3 and res.trials[0]["params"]["l2"] == 10.0
    # the threshold candidates are tried next, each trial with a fresh Preserve of its settings
    assert [c["threshold"] for c in fake_evaluate] == [1e-3, 2e-2, 1e-2, 1e-4]
    assert all(c["l2"] == 10.0 and c["preserve"] is not mine for c in fake_evaluate)
    assert not mine.edited and not mine.projectors  # the user's Preserve is only read
    # without preserve, AlphaEdit starts from its defaults for the model
    d = rl.Preserve.default_for(tiny_model, "relation_rome")
    res = rl.tune(tiny_model, _fake_records(), method="relation_rome", alphaedit=True, budget=1,
                  space={"layer": [2]}, stats=_stub_stats(tiny_model))
    assert (res.trials[0]["params"]["threshold"], res.trials[0]["params"]["l2"]) == (d.threshold, d.l2)


def test_bad_arguments_are_refused_by_name(tiny_model, fake_evaluate):
    recs = _fake_records()
    kw = dict(space={"layer": [0, 1]}, stats=_stub_stats(tiny_model))
    with pytest.raises(rl.ConfigError, match="search spaces for"):
        rl.tune(tiny_model, recs, method="mend", **kw)
    with pytest.raises(rl.ConfigError, match="budget"):
        rl.tune(tiny_model, recs, budget=0, **kw)
    with pytest.raises(rl.ConfigError, match="does not search"):
        rl.tune(tiny_model, recs, space={"layer": [0], "lambda": [1]}, stats=kw["stats"])
    with pytest.raises(rl.ConfigError, match="not a layer"):
        rl.tune(tiny_model, recs, space={"layer": [9]}, stats=kw["stats"])
    with pytest.raises(rl.ConfigError, match="start names"):
        rl.tune(tiny_model, recs, start={"lambda": 1}, **kw)
    with pytest.raises(rl.ConfigError, match="not a layer"):
        rl.tune(tiny_model, recs, start={"layer": 9}, **kw)
    with pytest.raises(rl.ConfigError, match="alphaedit=False"):
        rl.tune(tiny_model, recs, preserve=rl.Preserve(), alphaedit=False, **kw)
    other = rl.tune(tiny_model, recs, method="relation_rome", budget=1, **kw)
    fake_evaluate.clear()
    with pytest.raises(rl.ConfigError, match="relation_rome result"):
        rl.tune(tiny_model, recs, alphaedit=True, start=other, **kw)
    with pytest.raises(rl.DataError, match="also evaluation records"):
        rl.tune(tiny_model, recs, evaluation_records=recs[1:2], **kw)
    with pytest.raises(rl.DataError, match="sequence"):
        rl.tune(tiny_model, recs, sequence=4, **kw)
    with pytest.raises(rl.DataError, match="untouched"):
        rl.tune(tiny_model, recs, sequence=3, **kw)
    with pytest.raises(rl.DataError, match="no records"):
        rl.tune(tiny_model, [], **kw)
    assert not fake_evaluate


@pytest.fixture(scope="module")
def small(default_model):
    # the layers the tests edit (the statistics of others are computed by tune when it needs them)
    stats = {l: rl.KeyStatistics.compute(default_model, l, default_corpus()[:150], n_texts=None, cache=False,
                                         progress=False) for l in (0, 1, 3, 4)}
    return default_model, list(load_counterfactual())[400:403], stats


def test_trials_on_the_default_model_equal_evaluate_by_hand(small, tmp_path):
    model, recs, stats = small
    recs = recs[:2]
    cfg = rl.EditConfig.default_model_preset(v_steps=6, prefix_lengths=((4, 2),))
    res = rl.tune(model, recs, method="relation_rome", config=cfg, stats=stats, budget=3,
                  space={"v_weight_decay": [0.05, 0.5], "clamp_norm_factor": (), "v_steps": ()},
                  locate_settings={"n_samples": 2})
    # the layers came from locate on the records' own prompts (trial 0: the default layer 4)
    facts = [{"prompt": r["prompt"].format(r["subject"]), "subject": r["subject"], "target": r["target_true"]}
             for r in recs]
    loc = rl.locate(model, facts, method="relation_rome", n_samples=2)
    assert res.located.peak == loc.peak and torch.equal(res.located.effect, loc.effect)
    assert res.candidates["layer"] == sorted({4, *[l for l in (loc.peak - 1, loc.peak, loc.peak + 1)
                                                  if l in loc.allowed]})
    assert res.trials[0]["params"]["layer"] == 4
    # the layers spend that budget: a second search at layer 4 alone tries a tight clamp, which edits worse
    res2 = rl.tune(model, recs, method="relation_rome", config=cfg, stats=stats, budget=2,
                   space={"layer": [4], "v_weight_decay": (), "clamp_norm_factor": [10.0, 0.75], "v_steps": ()})
    assert [t["params"]["clamp_norm_factor"] for t in res2.trials] == [10.0, 0.75]
    assert res2.trials[1]["objective"] != res2.trials[0]["objective"]
    for t in res.trials + res2.trials:
        p = t["params"]
        by_hand = rl.evaluate(model, recs, method="relation_rome", layer=p["layer"], stats=stats[p["layer"]],
                              config=rl.EditConfig.default_model_preset(v_steps=6, prefix_lengths=((4, 2),),
                                                                        v_weight_decay=p["v_weight_decay"],
                                                                        clamp_norm_factor=p["clamp_norm_factor"]),
                              fluency=False)
        for k in ("ES", "PS", "NS", "RS", "Score"):
            assert t[k] == pytest.approx(by_hand.summary[k][0], abs=1e-9), (t, k)
    assert res.best == max(t["objective"] for t in res.trials)
    # edit_kwargs reproduce the chosen trial's edit; the result survives JSON and renders
    upd = rl.compute_edit(model, rl.editing.request_of(recs[0]), method="relation_rome", stats=stats[res.layers[0]],
                          **res.edit_kwargs())
    assert upd.layer == res.params["layer"]
    back = rl.TuneResult.from_json(res.to_json(tmp_path / "t.json"))
    assert back == res and back.config == res.config
    res.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0 and "<table>" in res.to_html()
    assert "| chosen |" in res.table() and "start" in res.table()


def test_batch_trials_equal_evaluate_batch_by_hand(small):
    model, recs, stats = small
    cfg = memit_config(v_steps=6, prefix_lengths=((4, 2),))
    res = rl.tune(model, recs, method="relation_memit", alphaedit=True, config=cfg, stats=stats, budget=3,
                  batch_size=2, space={"layers": [[3, 4], [0]], "mom2_update_weight": [30.0, 3.0],
                                       "clamp_norm_factor": (), "threshold": (), "l2": ()})
    assert len(res.trials) == 3 and res.trials[1]["params"]["layers"] == [0]
    # the third trial changes only lambda: its z's are the first trial's (same last layer, same settings),
    # reused, and it still equals a by-hand evaluation that optimises them afresh (below)
    assert [t["values_reused"] for t in res.trials] == [0, 0, len(recs)], res.trials
    for t in res.trials:
        p = t["params"]
        by_hand = rl.evaluate_batch(model, recs, method="relation_memit", batch_size=2, layers=p["layers"],
                                    stats=stats, config=cfg, mom2_update_weight=p["mom2_update_weight"],
                                    preserve=rl.Preserve(threshold=p["threshold"], l2=p["l2"]))
        for k in ("ES", "PS", "NS", "RS", "Score"):
            assert t[k] == pytest.approx(by_hand.summary[k][0], abs=1e-9), (t, k)
    kw = res.edit_kwargs()
    assert kw["layers"] == tuple(res.params["layers"]) and isinstance(kw["preserve"], rl.Preserve)
    assert kw["preserve"].l2 == res.params["l2"]


def test_evaluate_sequence_equals_edits_written_one_after_another(small):
    model, recs, stats = small
    cfg = rl.EditConfig.default_model_preset(v_steps=6, prefix_lengths=((4, 2),))
    untouched = [(r["prompt"].format(r["subject"]), r["target_true"]) for r in list(load_counterfactual())[430:440]]
    preserve = rl.Preserve(threshold=2e-2, l2=0.1)
    saved = model.blocks[0].mlp.W_out.detach().clone()
    seq = rl.evaluate_sequence(model, recs[:2], method="relation_rome", layer=0, stats=stats[0], config=cfg,
                               preserve=preserve, untouched=untouched, checkpoints=[1, 2])
    assert seq.restored and torch.equal(model.blocks[0].mlp.W_out, saved)
    assert not preserve.edited  # the caller's Preserve is left as it was
    # by hand: the same prefixes (generated once, unedited), each edit written before the next is computed
    prefixes = rl.editing.generate_prefixes(model, cfg)
    by_hand = rl.Preserve(threshold=2e-2, l2=0.1)
    known = [u for u, k in zip(untouched, known_mask(model, [p for p, _ in untouched], [a for _, a in untouched])) if k]
    edits, rows = [], {}
    for i, rec in enumerate(recs[:2], 1):
        upd = rl.compute_edit(model, rl.editing.request_of(rec), method="relation_rome", layer=0, stats=stats[0],
                              config=cfg, preserve=by_hand, prefixes=prefixes)
        edits.append(rl.apply_edit(model, upd))
        by_hand.remember(upd)
        per = records_metrics(model, recs[:i])
        acc = sum(known_mask(model, [p for p, _ in known], [a for _, a in known])) / len(known)
        rows[i] = ({k: sum(x[k] for x in per if k in x) / max(1, sum(k in x for x in per))
                    for k in ("ES", "PS", "NS")}, acc)
    for e in reversed(edits):
        e.undo()
    assert seq.n_untouched == len(known) > 0
    assert [r["edits"] for r in seq.rows] == [0, 1, 2] and seq.final["applied"] == 2
    for i in (1, 2):
        got = seq.at(i)
        for k in ("ES", "PS", "NS"):
            assert got[k] == pytest.approx(rows[i][0][k], abs=1e-9)
        assert got["untouched"] == pytest.approx(rows[i][1])
        assert got["w_change"] > 0
    back = rl.SequenceResult.from_json(seq.to_json())
    assert back == seq


def test_sequence_objective_is_the_harmonic_mean_of_score_and_untouched(small):
    model, recs, stats = small
    cfg = rl.EditConfig.default_model_preset(v_steps=6, prefix_lengths=((4, 2),))
    res = rl.tune(model, recs, method="relation_rome", sequence=2, config=cfg, stats=stats, budget=2,
                  space={"layer": [0, 4], "v_weight_decay": (), "clamp_norm_factor": (), "v_steps": ()})
    untouched = [(r["prompt"].format(r["subject"]), r["target_true"]) for r in recs[2:]]
    for t in res.trials:
        seq = rl.evaluate_sequence(model, recs[:2], method="relation_rome", layer=t["params"]["layer"],
                                   stats=stats[t["params"]["layer"]], config=cfg, untouched=untouched)
        s, u = 100 * seq.final["Score"], 100 * seq.final["untouched"]
        assert t["Score"] == pytest.approx(s) and t["untouched"] == pytest.approx(u)
        assert t["objective"] == pytest.approx(0.0 if min(s, u) <= 0 else 2 / (1 / s + 1 / u))


def _memit_sequence_setup(small):
    from relation_lens.editing.memit import memit_config

    model, _, stats = small
    recs = list(load_counterfactual())[400:404]
    cfg = memit_config(v_steps=4, prefix_lengths=((4, 2),))
    untouched = [(r["prompt"].format(r["subject"]), r["target_true"]) for r in list(load_counterfactual())[430:440]]
    kw = dict(method="relation_memit", layers=(3, 4), stats={l: stats[l] for l in (3, 4)}, config=cfg,
              mom2_update_weight=30.0, untouched=untouched, checkpoints=[2, 4], batch_size=2)
    return model, recs, kw


def test_a_batched_sequence_equals_batch_edits_written_one_after_another(small):
    """batch_size=2 (AlphaEdit's protocol, at 2 instead of 100): each step one relation-MEMIT + AlphaEdit
    batch edit computed on the weights the earlier steps wrote, its keys remembered."""
    import relation_lens.evaluation as ev

    model, recs, kw = _memit_sequence_setup(small)
    saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in (3, 4)}
    seq = rl.evaluate_sequence(model, recs, preserve=rl.Preserve(threshold=2e-2, l2=0.1), fluency=1, **kw)
    assert seq.restored and all(torch.equal(model.blocks[l].mlp.W_out, saved[l]) for l in (3, 4))
    assert seq.rows[0]["fluency"] == pytest.approx(ev._fluency(model, recs[0]))  # unedited
    prefixes = rl.editing.generate_prefixes(model, kw["config"])
    by_hand = rl.Preserve(threshold=2e-2, l2=0.1)
    edits, rows = [], {}
    for i in (2, 4):
        reqs = [rl.editing.request_of(r) for r in recs[i - 2:i]]
        upd = rl.compute_edit(model, reqs, method="relation_memit", layers=(3, 4), stats=kw["stats"],
                              config=kw["config"], mom2_update_weight=30.0, preserve=by_hand, prefixes=prefixes)
        edits.append(rl.apply_edit(model, upd))
        by_hand.remember(upd)
        per = records_metrics(model, recs[:i])
        rows[i] = {k: sum(x[k] for x in per) / len(per) for k in ("ES", "PS", "NS")}
        rows[i]["fluency"] = ev._fluency(model, recs[0])  # the first record's generations, edited so far
    for e in reversed(edits):
        e.undo()
    assert [r["edits"] for r in seq.rows] == [0, 2, 4] and seq.final["applied"] == 4
    for i in (2, 4):
        for k in ("ES", "PS", "NS", "fluency"):
            assert seq.at(i)[k] == pytest.approx(rows[i][k], abs=1e-9), (i, k)
    with pytest.raises(rl.DataError, match=r"checkpoints \[3\] do not end a step of 2 edits"):
        rl.evaluate_sequence(model, recs, **{**kw, "checkpoints": [3]})
    with pytest.raises(rl.EditError, match="batch_size must be"):
        rl.evaluate_sequence(model, recs, method="relation_rome", layer=4, stats=kw["stats"][4], batch_size=2)


def test_a_killed_sequence_resumes_after_its_last_step(small, tmp_path, monkeypatch):
    """Killed during its second step, the model is left unedited; started again with the same checkpoint
    folder it computes only the second step and returns the uninterrupted run's rows."""
    import relation_lens.evaluation as ev

    model, recs, kw = _memit_sequence_setup(small)
    whole = rl.evaluate_sequence(model, recs, preserve=rl.Preserve(threshold=2e-2, l2=0.1), **kw)
    saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in (3, 4)}
    real, calls, killed = ev.compute_edit, [], []

    def edit(*a, **k):
        calls.append(len(calls))
        if len(calls) == 2 and not killed:  # once
            killed.append(True)
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ev, "compute_edit", edit)
    with pytest.raises(KeyboardInterrupt):
        rl.evaluate_sequence(model, recs, preserve=rl.Preserve(threshold=2e-2, l2=0.1), checkpoint=tmp_path, **kw)
    assert all(torch.equal(model.blocks[l].mlp.W_out, saved[l]) for l in (3, 4))
    calls.clear()
    resumed = rl.evaluate_sequence(model, recs, preserve=rl.Preserve(threshold=2e-2, l2=0.1), checkpoint=tmp_path,
                                   **kw)
    assert calls == [0]  # only the second step was computed
    assert resumed.rows == whole.rows and resumed.restored
    assert all(torch.equal(model.blocks[l].mlp.W_out, saved[l]) for l in (3, 4))
    with pytest.raises(rl.ConfigError, match="differing"):
        rl.evaluate_sequence(model, recs, preserve=rl.Preserve(threshold=2e-2, l2=1.0), checkpoint=tmp_path, **kw)
