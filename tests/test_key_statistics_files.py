"""Key statistics from any corpus (a text file, .jsonl, a stream) and as a shareable file: the same
texts give the same moment whatever form they come in; save / load round-trips exactly and refuses
other weights and other files by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_model

import relation_lens as rl
from relation_lens.key_statistics import KeyStatistics, default_corpus, read_statistics_header

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

TEXTS = default_corpus()[:40]


def _stats(model, corpus, **kw):
    return KeyStatistics.compute(model, 1, corpus, cache=False, progress=False, **kw)


def test_a_corpus_in_any_form_gives_the_same_moment(tiny_model, tmp_path):
    want = _stats(tiny_model, TEXTS, n_texts=None)
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    for corpus in (tmp_path / "c.txt", str(tmp_path / "c.jsonl"), [{"text": t} for t in TEXTS]):
        got = _stats(tiny_model, corpus, n_texts=None)
        assert torch.equal(got.moment, want.moment) and got.count == want.count and got.corpus_hash == want.corpus_hash
    stream = (t for t in TEXTS + ["never read"] * 5)  # a stream: its first n_texts
    got = _stats(tiny_model, stream, n_texts=len(TEXTS))
    assert torch.equal(got.moment, want.moment)
    other = _stats(tiny_model, TEXTS[:20], n_texts=None)
    assert not torch.equal(other.moment, want.moment)


def test_statistics_files_round_trip_and_refuse_other_weights(tiny_model, tokenizer, tmp_path):
    stats = _stats(tiny_model, TEXTS, n_texts=None)
    path = stats.save(tmp_path / "L1.safetensors", corpus="40 texts of the default corpus")
    head = read_statistics_header(path)
    assert head["layer"] == 1 and head["count"] == stats.count and head["corpus"].startswith("40 texts")
    back = KeyStatistics.load(path, tiny_model)
    assert back == stats and back.moment.dtype == torch.float64
    other = random_model(tokenizer, "tiny-random-other", n_layers=4, d_mlp=128, act_fn="relu", normalization_type="LN")
    with pytest.raises(rl.EditError, match="other weights"):
        KeyStatistics.load(path, other)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(rl.DataError, match="not a safetensors file"):
        KeyStatistics.load(tmp_path / "x.safetensors")
    with pytest.raises(rl.DataError, match="no key-statistics file"):
        KeyStatistics.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("corpus, match", [("no such file.txt", "is not a file"), ((t for t in TEXTS), "needs n_texts")])
def test_bad_corpora_are_named(tiny_model, corpus, match):
    with pytest.raises(rl.DataError, match=match):
        _stats(tiny_model, corpus, n_texts=None)
