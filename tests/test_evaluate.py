import math

import pytest
import torch
from conftest import checksum, float32_prob_tolerance, same_weights

from relation_lens.editing import EditConfig
from relation_lens.evaluation import evaluate, ngram_entropy
from relation_lens.key_statistics import KeyStatistics
from relation_lens.probes import target_probs


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("x x x x x") == 0.0


def test_target_probs_teacher_forced(tiny_model):
    p = target_probs(tiny_model, ["The capital of France is"], ["Paris Texas"])[0]
    ctx = tiny_model.to_tokens("The capital of France is")[0]
    tgt = tiny_model.to_tokens(" Paris Texas", prepend_bos=False)[0]
    logp = 0.0
    for i, t in enumerate(tgt):
        logits = tiny_model(torch.cat([ctx, tgt[:i]])[None])[0, -1]
        logp += logits.log_softmax(-1)[t].item()
    assert p.item() == pytest.approx(math.exp(logp / len(tgt)), rel=1e-4)


def test_evaluate_undoes_and_keeps_records(tiny_model, tmp_path):
    recs = [{"case_id": 0, "prompt": "{} is located in the country of", "subject": "Paris", "target_new": "Japan",
             "target_true": "France", "paraphrase_prompts": ["Paris can be found in the country of"],
             "neighborhood_prompts": ["Lyon is located in the country of"], "neighborhood_targets": ["France"],
             "relation_prompts": ["The currency of Paris is the"], "relation_targets": ["Euro"],
             "generation_prompts": ["Paris is"]}] * 2
    texts = [f"{a} is located in the country of {b}." for a in ("Paris", "Lyon", "Rome") for b in ("France", "Italy")]
    stats = KeyStatistics.compute(tiny_model, 2, texts * 5, n_texts=None, progress=False, directory=tmp_path)
    saved = checksum(tiny_model)
    config = EditConfig(v_steps=10, prefix_lengths=((4, 2),), key_mode="symmetric", v_lr_scale="rms")
    res = evaluate(tiny_model, recs, layer=2, stats=stats, config=config)
    assert same_weights(tiny_model, saved)
    assert len(res.records) == 2 and res.n_failed == 0
    for k in ("ES", "PS", "NS", "RS"):
        assert 0 <= res.summary[k][0] <= 100
    # the record's numbers are those of the same edit applied by hand
    from relation_lens.editing import EditRequest, apply_edit, compute_edit

    upd = compute_edit(tiny_model, EditRequest(recs[0]["prompt"], "Paris", "Japan"), layer=2, stats=stats,
                       config=config)
    with apply_edit(tiny_model, upd):
        p = target_probs(tiny_model, ["Paris is located in the country of"] * 2, ["Japan", "France"])
        n = target_probs(tiny_model, ["Lyon is located in the country of"] * 2, ["France", "Japan"])
        with torch.no_grad():
            zmax = max(tiny_model(t)[0, -1].abs().max().item() for t in ("Paris is located in the country of",
                                                                          "Lyon is located in the country of"))
    # a difference of two probabilities, each read through other float32 batches than evaluate's
    tol = 2 * float32_prob_tolerance(1.0, zmax, tiny_model.cfg.d_model)
    assert res.records[0]["EM"] == pytest.approx((p[0] - p[1]).item(), abs=tol)
    assert res.records[0]["ES"] == float(p[0] > p[1])
    assert res.records[0]["NM"] == pytest.approx((n[0] - n[1]).item(), abs=tol)
    base = evaluate(tiny_model, recs, method="none")
    assert base.records[0]["EM"] == pytest.approx(
        (target_probs(tiny_model, ["Paris is located in the country of"] * 2, ["Japan", "France"]) @
         torch.tensor([1.0, -1.0])).item(), abs=1e-6)
    assert "| relation_rome | 2 |" in res.row()
    back = type(res).from_json(res.to_json(tmp_path / "e.json"))
    assert back.to_json() == res.to_json() and back == res
    metrics = ", ".join(f"{k} {res.summary[k][0]:.1f}" for k in ("ES", "PS", "NS", "RS"))
    assert repr(res) == f"EvaluationResult(relation_rome at layer 2: Score {res.score:.1f}, {metrics}; 2 records, 0 failed)"


def test_batched_target_probs_equal_one_forward_per_pair(tiny_model):
    prompts = ["The capital of France is", "Paris is located in the country of", "The Space Needle is in",
               "Lyon is"] * 3
    targets = ["Paris Texas", "Japan", "Seattle, Washington state", "a city"] * 3
    got = target_probs(tiny_model, prompts, targets, batch_size=5)  # chunks mixing lengths, padded
    for p, t, g in zip(prompts, targets, got):
        ctx = tiny_model.to_tokens(p)[0]
        tgt = tiny_model.to_tokens(" " + t, prepend_bos=False)[0]
        with torch.no_grad():
            logp = tiny_model(torch.cat([ctx, tgt[:-1]])[None])[0, len(ctx) - 1:].float().log_softmax(-1)
        assert g.item() == pytest.approx(logp.gather(1, tgt[:, None]).mean().exp().item(), rel=1e-5, abs=1e-9)
