"""TransformerLens 4's TransformerBridge, where it differs from HookedTransformer: the nine breaks
found when relation_lens first met it (issue 21), each held by a test. These run in CI's second
environment (TransformerLens 4.x); under 3.x there is no bridge to test and the module is skipped
(tests/test_cross_line.py runs on both lines)."""

from __future__ import annotations

import pytest
import torch
from cross_line import BRIDGE_ONLY, PROMPT, SUBJECT, make_folder

import relation_lens as rl
from relation_lens import model_interface as mi
from relation_lens.key_statistics import model_fingerprint
from relation_lens.models.bridge import transformer_lens_major

pytestmark = [pytest.mark.transformer_lens_4,
              pytest.mark.skipif(transformer_lens_major() < 4,
                                 reason="TransformerLens 3.x has no TransformerBridge (CI runs this file under 4.x)")]


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    return {arch: make_folder(tokenizer, arch, root) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def bridges(folders):
    return {arch: rl.load_model(folder) for arch, folder in folders.items()}


def test_break1_load_model_returns_a_bridge_in_compatibility_mode(bridges):
    """Every load path raised under 4.x (HookedTransformerConfig and the converters are gone)."""
    default = rl.load_model()
    for model in (default, *bridges.values()):
        assert mi.is_bridge(model) and model.compatibility_mode
    ids = default.to_tokens(PROMPT)
    with torch.no_grad():
        ours = default(ids).log_softmax(-1)
        theirs = default.original_model(ids).logits.log_softmax(-1)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_break2_tracing_and_editing_accept_a_bridge(bridges):
    """The isinstance(model, HookedTransformer) checks raised ImportError before any work."""
    model = bridges["gpt2"]
    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=2, kinds="resid")
    assert res.scores["resid"].shape == (model.cfg.n_layers, len(res.tokens))
    stats = rl.KeyStatistics.compute(model, 1, n_texts=40, progress=False, cache=False)
    upd = rl.compute_edit(model, rl.EditRequest("{} is located in the city of", SUBJECT, "Paris"), layer=1,
                          stats=stats, config=rl.EditConfig(v_steps=3))
    assert upd.delta().shape == mi.mlp_out(model, 1).shape


def test_break3_final_logits_without_start_at_layer(bridges):
    """start_at_layer=n_layers raised ValueError on the bridge; the final norm and unembedding are
    reached directly and give the model's own logits."""
    for model in bridges.values():
        ids = model.to_tokens(PROMPT)
        with torch.no_grad():
            resid = mi.run_blocks(model, mi.embed(model, ids), 0, model.cfg.n_layers)
            assert torch.allclose(mi.final_logits(model, resid), model(ids), atol=1e-5)


def test_break4_a_block_that_ignores_its_cache_is_refused(folders, monkeypatch):
    """The silent wrong answer: the engine's cached prefix was handed to the bridge block under
    TransformerLens 3's keyword, which the block ignores, and grids came back wrong with no error.
    Handing it under that keyword again must now be refused by the self-check."""
    model = rl.load_model(folders["llama"])
    monkeypatch.setattr(mi, "_cache_kwarg", lambda m: "past_kv_cache_entry")
    with pytest.raises(rl.UnsupportedModelError, match="cached"):
        mi.check_interface(model)
    with pytest.raises(rl.UnsupportedModelError):
        rl.trace(model, PROMPT, subject=SUBJECT, n_samples=2)


def test_break4_the_self_check_passes_a_working_bridge_and_catches_wrong_positions(folders, monkeypatch):
    model = rl.load_model(folders["llama"])
    mi.check_interface(model)  # passes
    fresh = rl.load_model(folders["llama"])
    real = mi.run_block_cached

    def positions_from_zero(model, layer, resid, prefix=None, mask=None, collect=False):
        if prefix is None or mask is not None:
            return real(model, layer, resid, prefix, mask, collect)
        # the suffix told it starts at position 0, not after its prefix: rotary positions shift
        return mi._bridge_block(model, layer, resid, prefix, torch.arange(resid.shape[1])[None], None, collect)

    monkeypatch.setattr(mi, "run_block_cached", positions_from_zero)
    with pytest.raises(rl.UnsupportedModelError, match="suffix"):
        mi.check_interface(fresh)


def test_break5_attribution_reads_hooks_by_the_names_asked_for(bridges):
    """hook.name on a bridge is the canonical name (blocks.0.hook_out), not the alias; attribution
    patching raised KeyError: 'blocks.0.hook_resid_post'."""
    res = rl.trace(bridges["gpt2"], PROMPT, subject=SUBJECT, n_samples=2, method="attribution")
    assert all(torch.isfinite(v).all() for v in res.scores.values())


def test_break6_the_value_step_reads_a_residual_at_the_last_layer(bridges):
    """stop_at_layer=n_layers returned logits on the bridge, so the editor read the wrong tensor at
    the last layer with no error."""
    model = bridges["gpt2"]
    L = model.cfg.n_layers
    resid, acts = mi.hooked_activations(model, model.to_tokens(PROMPT), [f"blocks.{L - 1}.mlp.hook_post"], L - 1)
    assert resid.shape[-1] == model.cfg.d_model
    stats = rl.KeyStatistics.compute(model, L - 1, n_texts=40, progress=False, cache=False)
    upd = rl.compute_edit(model, rl.EditRequest("{} is located in the city of", SUBJECT, "Paris"), layer=L - 1,
                          stats=stats, config=rl.EditConfig(v_steps=3))
    assert upd.value.shape == (model.cfg.d_model,) and torch.isfinite(upd.value).all()


def test_break7_llama_has_no_b_out_and_edits_anyway(bridges):
    model = bridges["llama"]
    assert getattr(model.blocks[0].mlp, "b_out", None) is None
    b = mi.mlp_out_bias(model, 0)
    assert b.shape == (model.cfg.d_model,) and not b.any()


def test_break8_fingerprints_follow_the_weights(folders):
    """The fingerprint filtered named_parameters() on 'blocks.', which a bridge does not have: every
    bridge of one shape got the same fingerprint, and the statistics cache would have served one
    model's statistics to another."""
    a, b = rl.load_model(folders["gpt2"]), rl.load_model(folders["gpt2"])
    assert model_fingerprint(a, 1) == model_fingerprint(b, 1)
    saved = mi.mlp_out(b, 0).detach().clone()
    with torch.no_grad():
        mi.mlp_out(b, 0).add_(1e-2)
    assert model_fingerprint(a, 1) != model_fingerprint(b, 1)
    with torch.no_grad():
        mi.mlp_out(b, 0).copy_(saved)
        mi.mlp_out(b, 2).add_(1e-2)
    assert model_fingerprint(a, 1) == model_fingerprint(b, 1)  # layer 2 is above the keys of layer 1


def test_break9_random_models_of_each_architecture_load_from_folders(tokenizer, tmp_path):
    """The test fixtures built HookedTransformer(HookedTransformerConfig(...)); under 4.x random models
    are Hugging Face folders (tests/cross_line.py), which load on both lines."""
    for arch in ("gpt_neox", "gptj"):
        model = rl.load_model(make_folder(tokenizer, arch, tmp_path))
        mi.check_interface(model)


def test_an_edit_reaches_the_hugging_face_model_and_undoes_bit_for_bit(bridges, folders, tmp_path):
    for arch, model in bridges.items():
        hf = model.original_model
        ids = model.to_tokens(PROMPT)
        stats = rl.KeyStatistics.compute(model, 1, n_texts=40, progress=False, cache=False)
        upd = rl.compute_edit(model, rl.EditRequest("{} is located in the city of", SUBJECT, "Paris"), layer=1,
                              stats=stats, config=rl.EditConfig(v_steps=3))
        before = {k: v.clone() for k, v in hf.state_dict().items()}
        with torch.no_grad():
            plain = hf(ids).logits
        with rl.apply_edit(model, upd):
            with torch.no_grad():
                edited_hf, edited_bridge = hf(ids).logits, model(ids)
            assert (edited_hf - plain).abs().max().item() > 1e-3  # Hugging Face's own forward sees the edit
            assert torch.allclose(edited_hf, edited_bridge, atol=1e-4)
        assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())
        saved = rl.save_edited(folders[arch], [upd], tmp_path / f"edited-{arch}")
        with rl.apply_edit(model, upd), torch.no_grad():
            want = model(ids).log_softmax(-1)
        back = rl.load_model(saved)
        with torch.no_grad():
            assert (back(ids).log_softmax(-1) - want).abs().max().item() < 1e-4


def test_a_bridge_booted_without_compatibility_mode_is_refused(folders):
    import transformers
    from transformer_lens import TransformerBridge  # TransformerLens 4 only

    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"])
    raw = TransformerBridge.boot_transformers(str(folders["gpt2"]), hf_model=hf)
    with pytest.raises(rl.UnsupportedModelError, match="compatibility mode"):
        rl.trace(raw, PROMPT, subject=SUBJECT, n_samples=2)


def test_a_hub_name_offline_and_uncached_is_refused_at_once(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(rl.HubUnreachableError, match="not in the local Hugging Face cache"):
        rl.load_model("EleutherAI/pythia-70m")


@pytest.mark.parametrize("arch", BRIDGE_ONLY)
def test_families_only_transformer_lens_4_adapts_trace_and_edit(tokenizer, tmp_path, arch):
    """Cohere (parallel attention and MLP, logit_scale) and Granite (embedding/residual/attention
    multipliers, logits_scaling): the trace equals the naive oracle, an edit takes and undoes bit for bit."""
    from oracle import naive_trace

    from relation_lens.tracing import make_noise

    model = rl.load_model(make_folder(tokenizer, arch, tmp_path))
    res = rl.trace(model, PROMPT, subject=SUBJECT, n_samples=3, seed=0, window=3)
    a, b = res.corrupt_span
    noise, _ = make_noise(model, 3, b - a, None, 0)
    want, corrupted = naive_trace(model, model.to_tokens(PROMPT)[0], (a, b), noise, res.target_token, w=3)
    assert res.corrupted_prob == pytest.approx(corrupted, abs=1e-5)
    for kind, grid in want.items():
        assert (res.scores[kind] - grid).abs().max().item() < 1e-5, kind
    assert res.scores["resid"].std() > 1e-4  # not flat
    stats = rl.KeyStatistics.compute(model, 1, n_texts=60, progress=False, cache=False)
    upd = rl.compute_edit(model, rl.EditRequest("{} is located in the city of", SUBJECT, "Paris"), layer=1,
                          stats=stats, config=rl.EditConfig(v_steps=3))
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    ids = model.to_tokens(PROMPT)
    with torch.no_grad():
        plain = model(ids)
        with rl.apply_edit(model, upd):
            assert (model(ids) - plain).abs().max().item() > 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.original_model.state_dict().items())
