"""Defaults that belong to the model in hand (the real-model issue), on models built in the tests:
presets by model (published ones only for their models, depth-scaled ones with a warning), ROME's
layer without a trace, the statistics corpus, token replacement's counterfactuals, the Score on
records without relation prompts, locate's global peak and its zero-interval warning, attribution
values out of range, the CLI's key mode, known_facts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import random_model

import relation_lens as rl
from relation_lens import presets
from relation_lens.editing.rome import default_layer
from relation_lens.key_statistics import WIKIPEDIA_CORPUS, default_corpus, model_corpus
from relation_lens.tracing.inputs import replacement_sources

pytestmark = pytest.mark.transformer_lens_4


def test_unknown_models_get_depth_scaled_presets_with_a_warning(tokenizer):
    model = random_model(tokenizer, "some-new-model", n_layers=30)
    with pytest.warns(presets.DefaultsWarning, match="depth-scaled.*ROME layer 10, relation-ROME layer 2"):
        own = presets.for_model(model)
    assert own.scaled and own.layers == {"rome": 10, "relation_rome": 2}
    assert own.memit_layers["memit"] == (8, 9, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        presets.for_model(model)
    assert default_layer(model, "rome") == 10 and default_layer(model, "relation_rome") == 2


def test_published_presets_only_for_their_models():
    from types import SimpleNamespace

    gpt2_xl = SimpleNamespace(cfg=SimpleNamespace(model_name="gpt2-xl", n_layers=48))  # what for_model reads
    own = presets.for_model(gpt2_xl)
    assert own is presets.GPT2_XL and own.layers["rome"] == 17 and own.memit_layers["memit"] == (13, 14, 15, 16, 17)
    assert presets.presets_named("EleutherAI/gpt-j-6B") is presets.GPT_J
    assert presets.GPT_J.mom2_update_weight["memit"] == 15000.0
    assert presets.presets_named("gpt2-small") is None


def test_the_paper_rule_scales_to_depth():
    assert presets.relation_rome_layer(48) == 4 and presets.scaled_layer(17, 48) == 17
    assert presets.relation_rome_layer(30) == 2 and presets.relation_rome_layer(3) == 1


def test_rome_default_layer_never_traces(tokenizer, monkeypatch):
    """ROME's default layer comes from the presets: a trace per request (588 s an edit on SmolLM2) is
    never run (the tracing engine is broken here: any trace would raise)."""
    import relation_lens.tracing.engine as engine

    model = random_model(tokenizer, "no-trace-model", n_layers=6)

    def boom(*a, **k):
        raise AssertionError("a trace was run to choose ROME's layer")

    monkeypatch.setattr(engine, "run_jobs", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", presets.DefaultsWarning)
        assert default_layer(model, "rome", rl.EditRequest("{} is in", "Paris", "Rome")) == presets.scaled_layer(17, 6)


def test_statistics_corpus_belongs_to_the_model(tiny_model, default_model):
    texts, name = model_corpus(tiny_model)
    assert name == WIKIPEDIA_CORPUS and len(texts) == 11_200 and not set(texts) & set(default_corpus())
    world_texts, world_name = model_corpus(default_model)
    assert world_texts == default_corpus() and "world" in world_name
    stats = rl.KeyStatistics.compute(tiny_model, 1, n_texts=30, progress=False, cache=False)
    assert stats.corpus.startswith(WIKIPEDIA_CORPUS) and "30 texts" in stats.corpus


def test_replacement_counterfactuals_never_use_the_world_on_other_models(tiny_model, default_model):
    """Token replacement builds its counterfactual from the model's own data: the world on the embedded
    model, the vendored templates and known_1000's subjects on any other (the subject comes from there)."""
    from relation_lens.data import known_1000_subjects, load_world

    _, subjects, source = replacement_sources(tiny_model)
    assert "known_1000" in source and subjects == list(known_1000_subjects())
    _, world_subjects, world_source = replacement_sources(default_model)
    assert "world" in world_source and set(world_subjects) == {f.subject for f in load_world()}
    prompt = "Paris is located in the country of"
    res = rl.trace(tiny_model, prompt, subject="Paris", corrupt="subject", corrupt_with="replace", n_samples=1)
    other = res.corrupted_prompt.replace(" is located in the country of", "")
    assert other != "Paris" and other in set(subjects)


def test_score_is_rome_three_way_without_relation_prompts():
    from relation_lens.evaluation import summarise

    rows = [{"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.1, "PM": 0.1, "NM": 0.1},
            {"ES": 1.0, "PS": 1.0, "NS": 0.5, "EM": 0.1, "PM": 0.1, "NM": 0.1}]
    s = summarise(rows)
    assert not math.isnan(s["Score"][0])
    assert s["Score"][0] == s["ScoreROME"][0]
    assert s["Score"][0] == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / 75))
    with_rs = [dict(r, RS=0.5, RM=0.1) for r in rows]
    assert summarise(with_rs)["Score"][0] == pytest.approx(4 / (1 / 100 + 1 / 75 + 1 / 75 + 1 / 50))


def test_locate_reports_the_global_peak_and_warns_on_an_interval_with_zero(tiny_model):
    """A LocateWarning exactly when a chosen layer's interval includes zero, ``significant`` saying the
    same, and the global peak beside the rule's. On TransformerLens 3.9's tiny model relation-ROME's
    peak is clear of zero and ROME's is not, so both branches run there (the 4.x model has other weights)."""
    from relation_lens.locate import LocateWarning
    from relation_lens.models.bridge import transformer_lens_major

    facts = [{"prompt": f"{c} is located in the country of", "subject": c} for c in ("Paris", "Rome", "Berlin")]
    seen = set()
    for method in ("relation_rome", "rome"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = rl.locate(tiny_model, facts, method=method, n_samples=2, early=0.25, progress=False)
        warned = any(issubclass(w.category, LocateWarning) for w in caught)
        weak = any(float(res.effect[l] - res.ci95[l]) <= 0 for l in res.layers)
        assert warned == weak == (not res.significant), method
        assert ("NOT SIGNIFICANT" in repr(res)) == weak
        assert res.global_peak == int(torch.nan_to_num(res.effect, nan=-1e9).argmax())
        seen.add(weak)
    if transformer_lens_major() < 4:
        assert seen == {True, False}


def test_attribution_out_of_range_is_flagged(tiny_model):
    res = rl.trace(tiny_model, "Paris is located in the country of", subject="Paris", n_samples=2)
    assert res.out_of_range == {}
    bad = res.scores["mlp"].clone()
    bad[0, 0] = 1.5
    from dataclasses import replace

    flagged = replace(res, scores={**res.scores, "mlp": bad})
    assert flagged.out_of_range == {"mlp": 1}
    logprob = replace(res, metric="logprob", scores={k: v.log() for k, v in res.scores.items()})
    assert logprob.out_of_range == {}
    over = replace(logprob, scores={**logprob.scores, "resid": logprob.scores["resid"] + 20})
    assert over.out_of_range["resid"] > 0


def test_known_facts_keep_what_the_model_gets_right(default_model):
    from relation_lens.data import world_trace_facts

    facts = world_trace_facts("P30", limit=20)
    known = rl.known_facts(default_model, facts)
    assert 0 < len(known) <= len(facts)
    for k in known:
        probs = default_model(default_model.to_tokens(k["prompt"]))[0, -1].softmax(-1)
        assert k["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert k["subject"] == facts[k["index"]]["subject"]
    with pytest.raises(rl.ConfigError, match="min_prob"):
        rl.known_facts(default_model, facts, min_prob=float("nan"))
    with pytest.raises(rl.DataError, match="prompt and an answer"):
        rl.known_facts(default_model, [{"prompt": "x"}])
    assert rl.known_facts(default_model, facts, min_prob=1.0) == []


def test_cli_key_mode_is_the_library_default(default_model, monkeypatch, capsys):
    """The CLI's edit and the library use one key mode by default (the model's EditConfig.default_for)."""
    import relation_lens.cli as cli

    seen = {}
    real = rl.compute_edit

    def spy(model, request, **kw):
        seen["key_mode"] = kw["config"].key_mode
        return real(model, request, **kw)

    monkeypatch.setattr(rl, "compute_edit", spy)
    assert cli.main(["edit", "--quiet"]) == 0
    assert seen["key_mode"] == rl.EditConfig.default_for(default_model, "relation_rome").key_mode
    assert cli.main(["edit", "--quiet", "--key-mode", "asymmetric"]) == 0
    assert seen["key_mode"] == "asymmetric"


@pytest.mark.parametrize("argv,flag", [(["trace-dataset"], "--facts"), (["evaluate"], "--records"),
                                       (["tune"], "--records")])
def test_cli_world_data_is_no_default_on_other_models(argv, flag, tmp_path, capsys):
    """The built-in facts and records are the default model's world: on another model the CLI asks for the
    model's own (before loading it) instead of tracing or editing the toy world's."""
    import relation_lens.cli as cli

    assert cli.main([*argv, "--model", "some/other-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"need {flag}" in err and "default model's world" in err
