"""The editing method registry: a new method is one class and one registration (the toy method of
docs/architecture.md, used here as written there), settings a method does not read are refused, and
AlphaEdit's projectors are keyed by the statistics they came from."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import checksum, same_weights

import relation_lens as rl
from relation_lens.editing import EditConfig, RankOneUpdate, single_methods


# --- the toy method of docs/architecture.md, "Adding an editing method" ---
class UnembedNudge(rl.EditMethod):
    """Toy: a rank-one update at ``layer`` that adds ``scale`` x the new target's unembedding direction to
    the MLP output at the prompt's last token (minimum-norm: ``W_out += k (scale d)^T / (k . k)``)."""

    name, key = "toy_unembed_nudge", "relation"
    options = frozenset({"layer"})
    unread = frozenset(f.name for f in dataclasses.fields(EditConfig)) - {"prepend_bos"}

    def default_config(self, model):
        return EditConfig()  # ROME's fields at their defaults: none of them is read


    def compute(self, model, request, *, config, stats, preserve, progress, layer=1, scale=8.0):
        request = self.requests_of(request)
        rl.editing.check_editable(model, layer)
        tokens = model.to_tokens(request.text, prepend_bos=config.prepend_bos)
        new = model.to_tokens(" " + request.target_new.strip(), prepend_bos=False)[0, 0]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mlp.hook_post")
        k = cache[f"blocks.{layer}.mlp.hook_post"][0, -1].double().cpu()
        d = model.W_U[:, new].detach().double().cpu()
        right = scale * (d - d.mean()) / d.norm()
        W, b = (t.detach().double().cpu() for t in (model.blocks[layer].mlp.W_out, model.blocks[layer].mlp.b_out))
        return RankOneUpdate(layer=layer, left=k / (k @ k), right=right, key=k, value=k @ W + b + right,
                             method=self.name, request=request, key_positions=(tokens.shape[1] - 1,))
# --- end of the toy method ---


@pytest.fixture
def toy():
    method = rl.register_method(UnembedNudge())
    yield method
    del rl.METHODS[method.name]


def test_a_new_method_is_one_class_and_one_registration(tiny_model, toy):
    request = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    saved = checksum(tiny_model)
    update = rl.compute_edit(tiny_model, request, method=toy.name, layer=2)
    assert same_weights(tiny_model, saved) and update.method == toy.name and update.layers == (2,)
    W = tiny_model.blocks[2].mlp.W_out.detach().double()
    b = tiny_model.blocks[2].mlp.b_out.detach().double()
    assert torch.allclose(update.key @ (W + update.delta()) + b, update.value, rtol=0, atol=1e-9)  # k -> v exactly
    new = tiny_model.to_tokens(" Paris", prepend_bos=False)[0, 0]
    with torch.no_grad():
        before = tiny_model(request.text)[0, -1, new]
        with rl.apply_edit(tiny_model, update):
            after = tiny_model(request.text)[0, -1, new]
    assert after > before + 0.1 and same_weights(tiny_model, saved)  # it nudges, and undoes bit for bit
    assert toy.name in single_methods()  # evaluation and the CLI list it
    res = rl.evaluate(tiny_model, [{"prompt": "{} is located in the city of", "subject": "The Space Needle",
                                    "target_new": "Paris", "target_true": "Seattle",
                                    "paraphrase_prompts": ["Where is The Space Needle? It is in the city of"],
                                    "neighborhood_prompts": [], "neighborhood_targets": [],
                                    "relation_prompts": [], "relation_targets": []}],
                      method=toy.name, layer=2, fluency=False)
    assert res.n_failed == 0 and res.layer == 2
    with pytest.raises(rl.EditError, match="already registered"):
        rl.register_method(UnembedNudge())


def test_settings_a_method_does_not_read_are_refused(tiny_model, toy):
    request = rl.EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    with pytest.raises(rl.ConfigError, match=r"does not read EditConfig ridge=0\.001"):
        rl.compute_edit(tiny_model, request, method=toy.name, config=EditConfig(ridge=1e-3))
    before = checksum(tiny_model)
    for key, value in (("ridge", 1e-4), ("key_mode", "symmetric")):  # MEMIT's solve reads neither
        with pytest.raises(rl.ConfigError, match=f"'memit' does not read EditConfig {key}="):
            rl.compute_edit(tiny_model, [request], method="memit",
                            config=dataclasses.replace(rl.editing.memit_config(), **{key: value}))
    assert same_weights(tiny_model, before)
    with pytest.raises(rl.EditError, match="is not one of"):
        rl.compute_edit(tiny_model, request, method="no_such_method")


def test_alphaedit_projectors_are_keyed_by_the_statistics(tiny_model):
    """Other statistics for the same layer give another projector (a cache keyed by layer alone would
    hand back the first one); the same statistics reuse it."""
    d = tiny_model.cfg.d_mlp
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))

    def stats(lo):
        C = q @ torch.diag(torch.logspace(lo, 1, d, dtype=torch.float64)) @ q.T
        return rl.KeyStatistics(layer=2, moment=C, count=100, model_fingerprint="synthetic",
                                corpus_hash="synthetic", n_texts=1)

    a, b = stats(-3), stats(-1)  # the same provenance fields, other matrices: 1/3 vs 0 eigenvalues under 1e-2
    preserve = rl.Preserve(threshold=1e-2, l2=1.0)
    Pa, Pb = preserve.projector(a), preserve.projector(b)
    assert torch.linalg.matrix_rank(Pa) > 0 and not torch.allclose(Pa, Pb)
    assert preserve.projector(a) is Pa and len(preserve.projectors) == 2
    assert preserve.config == rl.AlphaEditConfig(threshold=1e-2, l2=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preserve.config.l2 = 3.0
    with pytest.raises(rl.ConfigError, match="l2 must be a finite number >= 0"):
        rl.Preserve(threshold=1e-2, l2=-1.0)
