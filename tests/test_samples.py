"""Every noise sample's value per cell: trace keeps them ([layer, pos, sample] per kind), their mean is
the grid, and sample s is the grid of a trace run on noise draw s alone (an explicit one-sample noise
tensor), cell by cell."""

from __future__ import annotations

import pytest
import torch

import relation_lens as rl
from relation_lens.tracing import make_noise

pytestmark = pytest.mark.transformer_lens_4  # line-agnostic: CI runs it under TransformerLens 4 too

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


def test_each_sample_is_the_trace_of_its_own_noise_draw(tiny_model64):
    model = tiny_model64
    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=3, window=2, metric="logprob")
    a, b = res.corrupt_span
    noise, _ = make_noise(model, 3, b - a, None, 0)
    for kind in res.kinds:
        assert res.samples[kind].shape == (*res.scores[kind].shape, 3)
        assert torch.allclose(res.samples[kind].mean(-1), res.scores[kind], atol=1e-6)
    for s in range(3):
        one = rl.trace(model, PROMPT, subject=SUBJECT, noise=noise[s:s + 1], n_samples=1, window=2, metric="logprob")
        for kind in res.kinds:
            assert (res.samples[kind][..., s] - one.scores[kind]).abs().max().item() <= 1e-6, (kind, s)
    # the samples differ from each other, so the checks above tell them apart
    assert res.samples["mlp"].std(-1).max().item() > 1e-2
    mean, half = res.ci95("mlp")
    t = res.samples["mlp"].double()
    assert torch.allclose(half.double(), 1.96 * t.std(-1) / 3 ** 0.5, atol=1e-6)
    assert rl.TraceResult.from_dict(res.to_dict()) == res


def test_packed_and_dataset_traces_keep_samples_too(tiny_model):
    recs = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": "Germany is located in the continent of",
                                                   "subject": "Germany"}]
    packed = rl.trace_dataset(tiny_model, recs, n_samples=2, kinds="mlp", pack=2, metric="logprob")
    alone = rl.trace_dataset(tiny_model, recs, n_samples=2, kinds="mlp", pack=1, metric="logprob")
    for r, one in zip(packed.results, alone.results):
        assert torch.allclose(r.samples["mlp"].mean(-1), r.scores["mlp"], atol=1e-6)
        # packed batches sum the padded attention in another order: float32 rounding, relative to |log P|
        assert torch.allclose(r.samples["mlp"], one.samples["mlp"], rtol=1e-5, atol=1e-5)
        assert r.samples["mlp"].std(-1).max().item() > 1e-3
    attr = rl.trace(tiny_model, PROMPT, subject=SUBJECT, method="attribution", kinds="mlp", n_samples=2)
    assert attr.samples is None
    with pytest.raises(rl.ConfigError, match="no per-sample values"):
        attr.ci95("mlp")
