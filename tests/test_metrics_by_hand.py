"""Metrics pinned by numbers worked out by hand, independent of the code's own helpers: the
per-record ES/PS/NS/RS (with the model's probabilities replaced by a table), the summary (means in
percent, 1.96 x sample std / sqrt(n), harmonic Scores), and trace_dataset's bucket means and
intervals from synthetic traces."""

import math

import pytest
import torch

import relation_lens.evaluation as ev
from relation_lens.tracing import TraceResult
from relation_lens.tracing.dataset import average

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

REC = {"prompt": "{} is in", "subject": "S", "target_new": "New", "target_true": "True",
       "paraphrase_prompts": ["P1", "P2"], "neighborhood_prompts": ["N1", "N2", "N3"],
       "neighborhood_targets": ["True", "True", "True"], "relation_prompts": ["R1"], "relation_targets": ["Other"]}
# P(target | prompt) for the record above, chosen by hand
TABLE = {("S is in", "New"): 0.6, ("S is in", "True"): 0.2,
         ("P1", "New"): 0.3, ("P1", "True"): 0.1, ("P2", "New"): 0.45, ("P2", "True"): 0.4,
         ("N1", "True"): 0.7, ("N1", "New"): 0.1, ("N2", "True"): 0.2, ("N2", "New"): 0.5,
         ("N3", "True"): 0.9, ("N3", "New"): 0.0,
         ("R1", "Other"): 0.25, ("R1", "New"): 0.35}


def test_record_metrics_by_hand(monkeypatch):
    monkeypatch.setattr(ev, "target_probs", lambda model, prompts, targets: torch.tensor(
        [TABLE[(p, t)] for p, t in zip(prompts, targets)]))
    m = ev.record_metrics(None, REC, fluency=False)
    assert ev.records_metrics(None, [REC, REC]) == [m, m]  # one batched read for several records
    assert m["ES"] == 1.0 and m["EM"] == pytest.approx(0.4)               # 0.6 > 0.2
    assert m["PS"] == 1.0 and m["PM"] == pytest.approx((0.2 + 0.05) / 2)  # both paraphrases take New
    assert m["NS"] == pytest.approx(2 / 3) and m["NM"] == pytest.approx((0.6 - 0.3 + 0.9) / 3)  # N1, N3 keep True
    assert m["RS"] == 0.0 and m["RM"] == pytest.approx(-0.1)              # the other relation lost to New


def test_summary_by_hand():
    rows = [{"ES": 1.0, "PS": 1.0, "NS": 0.5, "RS": 1.0}, {"ES": 1.0, "PS": 0.0, "NS": 1.0, "RS": 0.5},
            {"ES": 0.0, "PS": 0.5, "NS": 1.0, "RS": 1.0}, {"error": "refused"}]
    s = ev.summarise(rows)
    # ES: values 1, 1, 0 -> mean 2/3; sample variance ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    assert s["ES"][0] == pytest.approx(200 / 3)
    assert s["ES"][1] == pytest.approx(100 * 1.96 * math.sqrt((1 / 3) / 3))
    assert s["PS"][0] == pytest.approx(50.0)             # 1, 0, 0.5
    assert s["PS"][1] == pytest.approx(100 * 1.96 * math.sqrt(0.25 / 3))  # variance (0.25 + 0.25 + 0) / 2
    assert s["NS"][0] == pytest.approx(250 / 3)
    assert s["RS"][0] == pytest.approx(250 / 3)
    es, ps, ns, rs = 200 / 3, 50.0, 250 / 3, 250 / 3
    assert s["Score"][0] == pytest.approx(4 / (1 / es + 1 / ps + 1 / ns + 1 / rs))
    assert s["Score"][0] == pytest.approx(4 / 0.059)  # 4 / (0.015 + 0.02 + 0.012 + 0.012) = 67.80
    assert s["ScoreROME"][0] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))
    assert math.isnan(s["fluency"][0])  # nobody measured it


def _synthetic(grid_resid, clean, corrupted, correct=True):
    # 6 tokens: BOS, subject (1, 3), relation (3, 6) with the last token at 5
    return TraceResult(prompt="p", tokens=("<bos>", "A", "B", "is", "in", "of"), subject="AB", subject_span=(1, 3),
                       relation_span=(3, 6), corrupt="relation", corrupt_span=(3, 6), target="x", target_token=1,
                       target_requested=None, target_n_tokens=1, clean_top="x" if correct else "y",
                       clean_top_token=1 if correct else 2, clean_prob=clean, corrupted_prob=corrupted,
                       scores={"resid": torch.tensor(grid_resid, dtype=torch.float32)}, window=1, n_samples=1,
                       noise_std=0.1, seed=0, model_name="m")


def test_dataset_buckets_and_interval_by_hand():
    # two layers; rows are layers, columns the six positions
    a = _synthetic([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.1, 0.1, 0.1, 0.1, 0.9]], clean=0.9, corrupted=0.1)
    b = _synthetic([[0.2, 0.4, 0.6, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2, 0.8]], clean=0.7, corrupted=0.2)
    c = _synthetic([[0.0] * 6, [0.0] * 6], clean=0.5, corrupted=0.0, correct=False)  # wrong: left out
    used, mean, ci, count, clean, corrupted = average([a, b, c], ("resid",), 2, exclude_incorrect=True)
    assert used == (True, True, False) and clean == pytest.approx(0.8) and corrupted == pytest.approx(0.15)
    m = mean["resid"]
    # buckets: first subj = pos 1, middle subj = none, last subj = 2, first rel = 3, middle rel = none,
    # last rel = 4 (the last token has its own bucket), last token = 5; indirect effect = score - corrupted
    # layer 0, first subject: (0.2 - 0.1, 0.4 - 0.2) -> mean 0.15, sd sqrt(((0.05)^2 * 2) / 1)
    assert m[0, 0].item() == pytest.approx(0.15, abs=1e-6)
    assert ci["resid"][0, 0].item() == pytest.approx(1.96 * math.sqrt(0.005) / math.sqrt(2), abs=1e-6)
    assert math.isnan(m[0, 1].item()) and math.isnan(m[0, 4].item())  # empty buckets
    assert m[0, 2].item() == pytest.approx(((0.3 - 0.1) + (0.6 - 0.2)) / 2, abs=1e-6)
    assert m[0, 3].item() == pytest.approx(((0.4 - 0.1) + (0.2 - 0.2)) / 2, abs=1e-6)
    assert m[0, 5].item() == pytest.approx(((0.5 - 0.1) + (0.2 - 0.2)) / 2, abs=1e-6)
    assert m[1, 6].item() == pytest.approx(((0.9 - 0.1) + (0.8 - 0.2)) / 2, abs=1e-6)
    assert count.tolist() == [2, 0, 2, 2, 0, 2, 2]
    # with the wrong prompt included: three values, the third's indirect effect 0 everywhere
    _, mean3, _, _, _, _ = average([a, b, c], ("resid",), 2, exclude_incorrect=False)
    assert mean3["resid"][0, 0].item() == pytest.approx(0.3 / 3, abs=1e-6)
