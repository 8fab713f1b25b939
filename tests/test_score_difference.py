"""rl.score_difference: the paired bootstrap of two evaluations of the same records, against a
plain-Python bootstrap of the summary's own arithmetic, and its invariants."""

from __future__ import annotations

import math
import random

import pytest
import torch

import relation_lens as rl
from relation_lens.errors import DataError
from relation_lens.evaluation import summarise


def result(rows, method="rome"):
    return rl.EvaluationResult(method=method, layer=0, records=tuple(rows), summary=summarise(rows),
                               n_failed=sum("error" in r for r in rows))


def rows_from(seed, n=24, error_at=()):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = {"case_id": i, "prompt": f"p{i}", "target_new": "x"}
        if i in error_at:
            row["error"] = "failed"
        else:
            row.update({k: rng.choice([0.0, 0.5, 1.0]) for k in ("ES", "PS", "NS", "RS")})
            if i % 5 == 0:
                del row["PS"]  # a record without paraphrases: absent, not 0
        out.append(row)
    return out


def by_hand(a_rows, b_rows, metric, block, n_resamples, seed):
    """The same resamples (the same generator draws), each summarised by ``summarise`` itself."""
    n = len(a_rows)
    starts = list(range(0, n, block))
    draws = torch.randint(len(starts), (n_resamples, len(starts)), generator=torch.Generator().manual_seed(seed))
    diffs = []
    for draw in draws.tolist():
        idx = [i for g in draw for i in range(starts[g], min(starts[g] + block, n))]
        diffs.append(summarise([a_rows[i] for i in idx])[metric][0] - summarise([b_rows[i] for i in idx])[metric][0])
    diffs = sorted(d for d in diffs if not math.isnan(d))
    q = torch.quantile(torch.tensor(diffs, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return q.tolist()


@pytest.mark.parametrize("metric,block", [("Score", 1), ("Score", 5), ("ES", 1), ("PS", 3), ("ScoreROME", 1)])
def test_interval_equals_summarise_over_the_same_resamples(metric, block):
    a_rows, b_rows = rows_from(1, error_at=(3,)), rows_from(2, error_at=(7, 8))
    d = rl.score_difference(result(a_rows), result(b_rows), metric=metric, block=block, n_resamples=300, seed=4)
    low, high = by_hand(a_rows, b_rows, metric, block, 300, 4)
    assert d.low == pytest.approx(low, abs=1e-9) and d.high == pytest.approx(high, abs=1e-9)
    assert d.difference == pytest.approx(summarise(a_rows)[metric][0] - summarise(b_rows)[metric][0], abs=1e-12)
    assert d.low <= d.high


def test_invariants():
    a, b = result(rows_from(1)), result(rows_from(2))
    same = rl.score_difference(a, a, n_resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.significant
    ab, ba = rl.score_difference(a, b, n_resamples=200), rl.score_difference(b, a, n_resamples=200)
    assert ab.difference == pytest.approx(-ba.difference) and ab.low == pytest.approx(-ba.high)
    # one block holding every record: every resample is the whole set, so no spread at all
    whole = rl.score_difference(a, b, block=len(a.records), n_resamples=50)
    assert whole.low == pytest.approx(whole.difference) and whole.high == pytest.approx(whole.difference)
    # a clearly better edit: ES 1 everywhere against 0.5 everywhere, the interval leaves 0 out
    good = [{**r, "ES": 1.0} for r in rows_from(3)]
    poor = [{**r, "ES": 0.0 if r["case_id"] % 2 else 1.0} for r in rows_from(3)]
    d = rl.score_difference(result(good), result(poor), metric="ES", n_resamples=500)
    assert d.difference == pytest.approx(50.0) and d.significant and 25 < d.low < 50 < d.high < 75
    assert rl.ScoreDifference.from_json(d.to_json()).to_json() == d.to_json()


def test_bad_input_names_what_is_wrong():
    a, b = result(rows_from(1)), result(rows_from(2, n=23))
    with pytest.raises(DataError, match="same records"):
        rl.score_difference(a, b)
    with pytest.raises(DataError, match="metric"):
        rl.score_difference(a, a, metric="fluency")
    with pytest.raises(DataError, match="block"):
        rl.score_difference(a, a, block=0)
