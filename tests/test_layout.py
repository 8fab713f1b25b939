"""Weights stored as TransformerLens 3's forward reads them (relation_lens.models.layout): the same
parameters, values and outputs bit for bit, without a copy of a weight per block call."""

import copy

import pytest
import torch
from cross_line import ARCHS, make_folder

import relation_lens as rl
from relation_lens.model_interface import is_hooked_transformer
from relation_lens.models import forward_layout

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"


def _copies(model, tokens) -> int:
    """How many copies of a weight's size a forward makes (torch's profiler: aten::copy_ of a weight's shape)."""
    from torch.profiler import profile

    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}
    shapes |= {tuple(p.permute(*reversed(range(p.dim()))).shape) for p in model.parameters() if p.dim() >= 2}
    with torch.no_grad(), profile(record_shapes=True) as prof:
        model(tokens)
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::copy_" and e.input_shapes and tuple(e.input_shapes[0]) in shapes)


def _same_model_as_loaded_by_transformer_lens(model):
    plain = copy.deepcopy(model)
    for p in plain.parameters():  # TransformerLens' own layout, as from_pretrained leaves it
        p.data = p.data.contiguous()
    return plain


def _check(model):
    if not is_hooked_transformer(model):
        pytest.skip("a TransformerBridge reads Hugging Face nn.Linear weights, already as F.linear wants them")
    tokens = model.to_tokens(PROMPT)
    plain = _same_model_as_loaded_by_transformer_lens(model)
    before = _copies(plain, tokens)
    assert _copies(model, tokens) == 0
    with torch.no_grad():
        assert torch.equal(plain(tokens), model(tokens))
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q), name
    ids = [id(p) for p in plain.parameters()]
    assert forward_layout(plain) is plain and [id(p) for p in plain.parameters()] == ids  # the same Parameters
    assert forward_layout(plain) is plain and _copies(plain, tokens) == 0  # idempotent
    a = rl.trace(plain, PROMPT, subject=SUBJECT, n_samples=3, progress=False)
    b = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=3, progress=False)
    for kind in a.scores:
        assert torch.equal(a.scores[kind], b.scores[kind]), kind
    return before


def test_the_default_model_reads_its_weights_without_copies_and_gives_the_same_numbers(default_model):
    assert _check(default_model) > 0  # attention and unembedding weights were copied per call


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_reads_its_weights_without_copies_and_gives_the_same_numbers(tokenizer, tmp_path, arch):
    _check(rl.load_model(make_folder(tokenizer, arch, tmp_path)))


@pytest.mark.parametrize("arch", ARCHS)
def test_final_logits_are_transformer_lens_own_bit_for_bit(tokenizer, tmp_path, arch, default_model):
    from relation_lens.model_interface import final_logits

    model = default_model if arch == "gpt2" else rl.load_model(make_folder(tokenizer, arch, tmp_path))
    if not is_hooked_transformer(model):
        pytest.skip("TransformerLens 3's unembedding")
    resid = torch.randn(5, 3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(resid, start_at_layer=model.cfg.n_layers)
        assert torch.equal(final_logits(model, resid), want)
        saved = model.unembed.b_U.clone()
        model.unembed.b_U.add_(0.25)  # a bias that is there is added, as TransformerLens adds it
        try:
            assert torch.equal(final_logits(model, resid), model(resid, start_at_layer=model.cfg.n_layers))
            assert not torch.equal(final_logits(model, resid), want)
        finally:
            model.unembed.b_U.copy_(saved)  # bit for bit (x + 0.25 - 0.25 is not always x): a shared fixture
        assert torch.equal(final_logits(model, resid), want)
