import json
import re
import socket

import pytest
import torch

import relation_lens as rl
from relation_lens.models import default_model_path
from relation_lens.models.bridge import transformer_lens_major

TL3_ONLY = pytest.mark.skipif(transformer_lens_major() >= 4, reason=(
    "TransformerLens 3's own weight conversion and processing: a TransformerLens 4 bridge wraps the Hugging Face "
    "model instead (its load is checked against the Hugging Face log-probs in test_bridge.py)"))


def test_default_model_loads_offline(default_model):
    cfg = default_model.cfg
    assert cfg.n_layers >= 6 and cfg.model_name == "relation-lens-default"
    assert default_model.tokenizer is not None and cfg.default_prepend_bos


def test_default_model_files_are_hf_format_and_small():
    path = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 15 * 2 ** 20, size


def test_hf_and_transformer_lens_log_probs_match(default_model):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    tokens = default_model.to_tokens(["The capital of France is Paris.", "Germany is located in the continent of"],
                                      padding_side="right")
    with torch.no_grad():
        a = hf(tokens).logits.log_softmax(-1)
        b = default_model(tokens).log_softmax(-1)
    assert (a - b).abs().max().item() < 1e-4


def test_local_gpt2_folder_converts_offline(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = rl.load_model(tmp_path)
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        assert (hf(tokens).logits.log_softmax(-1) - model(tokens).log_softmax(-1)).abs().max() < 1e-4
    assert model.cfg.n_layers == 2


def test_unknown_name():
    """TransformerLens 3 knows its model names and suggests one; a TransformerLens 4 bridge takes any hub
    id, so offline an unknown one is a hub id it cannot reach, said at once."""
    want = "unknown model name 'gpt2-xxl'.*Did you mean" if transformer_lens_major() < 4 else \
        "model 'gpt2-xxl' is not in the local Hugging Face cache and the hub cannot be reached"
    with pytest.raises(rl.ModelLoadError, match=want):
        rl.load_model("gpt2-xxl")


def test_hub_unreachable_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # "at once": not one connection is tried (no download, no retries), counted rather than timed
    tried = []

    def connect(*args, **kwargs):
        tried.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(rl.HubUnreachableError, match="cannot be reached"):
        rl.load_model("gpt2-xl")
    assert tried == []


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(rl.ModelLoadError, match="no config.json"):
        rl.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(rl.ModelLoadError, match="'bert' model"):
        rl.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(rl.ModelLoadError, match="no weights"):
        rl.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(rl.ModelLoadError, match="not valid JSON"):
        rl.load_model(tmp_path)
    with pytest.raises(rl.ModelLoadError, match="does not exist"):
        rl.load_model(tmp_path / "nothing")
    with pytest.raises(rl.ModelLoadError, match="is a file"):
        rl.load_model(tmp_path / "config.json")


@pytest.mark.parametrize("device,match", [("tpu", "not a valid torch device|not supported"),
                                          ("cuda:7", "CUDA|does not exist"), ("banana", "not a valid")])
def test_bad_device(device, match):
    with pytest.raises(rl.ModelLoadError, match=match):
        rl.load_model(device=device)


def test_bad_dtype():
    with pytest.raises(rl.ModelLoadError, match="dtype"):
        rl.load_model(dtype="float8")


# ----------------------------------------------------------------------- local folders, careful loading
def _variant(tmp_path, name, config_changes=None, drop=(), corrupt_weights=False):
    """A copy of the default model's folder (weights and tokenizer linked) with config.json edited."""
    import json
    import shutil

    from relation_lens.models import default_model_path

    src, dst = default_model_path(), tmp_path / name
    dst.mkdir()
    for f in src.iterdir():
        if f.name in drop:
            continue
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg.update(config_changes or {})
            (dst / f.name).write_text(json.dumps(cfg))
        elif f.name == "model.safetensors" and corrupt_weights:
            (dst / f.name).write_bytes(f.read_bytes()[: 1 << 16])  # truncated
        else:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("change,named", [
    ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False"),
])
def test_unsupported_gpt2_settings_are_refused_by_name(tmp_path, change, named):
    import relation_lens as rl

    folder = _variant(tmp_path, "variant", change)
    with pytest.raises(rl.ModelLoadError, match=re.escape(named)):
        rl.load_model(folder)


def test_truncated_weights_and_missing_tokenizer_are_named(tmp_path):
    import relation_lens as rl

    with pytest.raises(rl.ModelLoadError, match="model.safetensors"):
        rl.load_model(_variant(tmp_path, "truncated", corrupt_weights=True))
    no_tok = _variant(tmp_path, "no_tokenizer", drop=("tokenizer.json", "vocab.json", "merges.txt",
                                                       "tokenizer_config.json"))
    with pytest.raises(rl.ModelLoadError, match="no tokenizer files"):
        rl.load_model(no_tok)


def test_parity_check_refuses_a_conversion_that_drifts(tmp_path, monkeypatch):
    import relation_lens as rl
    import relation_lens.models as models

    monkeypatch.setattr(models.parity, "PARITY_TOL", -1.0)  # any difference at all now counts as drift
    with pytest.raises(rl.ModelLoadError, match="log-probs up to .* away from the Hugging Face model"):
        rl.load_model(_variant(tmp_path, "copy"))


def _random_folder(tmp_path, tokenizer, arch):
    """A small random model of ``arch`` saved by transformers (3 blocks: one more than the parity
    check's cut, so the whole-model comparisons below see a block the check did not)."""
    import transformers as T

    V = len(tokenizer)
    cfg = {"gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                              intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25),
           "llama": lambda: T.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64),
           "gptj": lambda: T.GPTJConfig(vocab_size=V, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=64),
           # SmolLM2's kind: the unembedding is the embedding's transpose (one tensor)
           "llama_tied": lambda: T.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                               tie_word_embeddings=True),
           }[arch]()
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path / f"my-{arch}-llama-named"  # a name TransformerLens would otherwise match by family
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gptj"])
def test_local_folders_of_other_architectures(tmp_path, tokenizer, arch):
    """Small random models saved by transformers load through TransformerLens' own conversion, with
    log-probs equal to the Hugging Face model's."""
    import relation_lens as rl

    hf, folder = _random_folder(tmp_path, tokenizer, arch)
    model = rl.load_model(folder)
    ids = model.to_tokens("The Space Needle is located in the city of", prepend_bos=False)
    with torch.no_grad():
        gap = (model(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)).abs().max().item()
    assert gap < 1e-4
    assert model.cfg.n_layers == 3


def _transformer_lens_reference(hf, folder, tokenizer, center=True):
    """TransformerLens' own whole-dict path: convert, then ``load_and_process_state_dict`` into a
    freshly initialised HookedTransformer (what the loader did before it went tensor by tensor)."""
    from transformer_lens import HookedTransformer

    from relation_lens import models

    cfg, state = models.to_hooked_state(hf, tokenizer, folder, folder.name, torch.float32)
    ref = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    ref.load_and_process_state_dict(dict(state), fold_ln=True, center_writing_weights=center, center_unembed=True,
                                    fold_value_biases=True, refactor_factored_attn_matrices=False)
    return ref


@TL3_ONLY
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "llama_tied"])
@pytest.mark.parametrize("center", [True, False])
def test_tensor_by_tensor_load_equals_transformer_lens_whole_dict_processing(tmp_path, tokenizer, arch, center):
    """Oracle: the block-by-block processing and the assignment of the processed tensors give
    TransformerLens' whole-dict ``load_and_process_state_dict`` result bit for bit (every parameter
    and buffer, the normalisation modules, the logits). ``llama_tied``: the unembedding is the
    embedding's transpose, as in SmolLM2."""
    from transformers import GPT2LMHeadModel

    import relation_lens as rl

    if arch == "gpt2":
        folder = default_model_path()
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    else:
        hf, folder = _random_folder(tmp_path, tokenizer, arch)
    ref = _transformer_lens_reference(hf, folder, tokenizer, center)
    got = rl.load_model(folder, center_writing_weights=center)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert got.cfg.normalization_type == ref.cfg.normalization_type
    ids = got.to_tokens("The Space Needle is located in the city of")
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))


def test_read_safetensors_equals_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    from relation_lens.models import read_safetensors

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "f16": torch.randn(7).half(),
               "i64": torch.arange(6).reshape(2, 3), "empty": torch.zeros(0, 3), "b": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ref, got = load_file(tmp_path / "t.safetensors"), read_safetensors(tmp_path / "t.safetensors")
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    cast = read_safetensors(tmp_path / "t.safetensors", torch.float64)
    assert cast["bf16"].dtype == torch.float64 and cast["i64"].dtype == torch.int64
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-4])
    with pytest.raises(ValueError, match="ends inside tensor"):
        read_safetensors(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("n, device, match", [(0, None, "positive whole number"), (2, None, "not one"),
                                               (2, "cpu", "not one")])
def test_n_devices_is_checked(n, device, match):
    import relation_lens as rl

    with pytest.raises(rl.ModelLoadError, match=match):
        rl.load_model(device=device, n_devices=n)


def test_uncentred_load_keeps_huggingface_mlp_outputs():
    """center_writing_weights=False: the MLP outputs are the Hugging Face model's (ROME's v_init norm);
    the default (centred) load differs from them by their mean over d_model only."""
    from transformers import GPT2LMHeadModel

    import relation_lens as rl

    hf = GPT2LMHeadModel.from_pretrained(default_model_path()).eval()
    raw = rl.load_model(center_writing_weights=False)
    centred = rl.load_model()
    ids = raw.to_tokens("The capital of Canada is", prepend_bos=False)
    got = {}
    handle = hf.transformer.h[1].mlp.register_forward_hook(lambda mod, i, o: got.setdefault("out", o))
    with torch.no_grad():
        hf(ids)
        handle.remove()
        _, c_raw = raw.run_with_cache(ids, names_filter="blocks.1.hook_mlp_out")
        _, c_cen = centred.run_with_cache(ids, names_filter="blocks.1.hook_mlp_out")
    ref = got["out"][0]
    assert torch.allclose(c_raw["blocks.1.hook_mlp_out"][0], ref, atol=1e-5)
    assert torch.allclose(c_cen["blocks.1.hook_mlp_out"][0], ref - ref.mean(-1, keepdim=True), atol=1e-5)
    assert (ref.mean(-1).abs() > 1e-5).any()  # the two loads really differ


@pytest.mark.skipif(transformer_lens_major() >= 4, reason=(
    "on TransformerLens 4.3 the bridge leaves a 1.3e-6 log-prob gap on a float64 folder (docs/models.md): float64 "
    "through and through holds on TransformerLens 3 only"))
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("center", [True, False])
def test_float64_loads_are_float64_through_and_through(tmp_path, tokenizer, arch, center):
    """dtype="float64": every parameter is float64 and the log-probs equal the Hugging Face model's in
    float64 to 1e-12 on GPT-2 (TransformerLens 3.9's process_weights rounds through float32 and is
    1.1e-6 off). Rotary models are compared at 1e-6: transformers' own rotary embedding computes its
    cos/sin tables in float32 whatever the model's dtype (measured: 8e-8 LLaMA, 8e-11 NeoX), while
    TransformerLens' tables are float64. The float64 processing, rounded to float32, is TransformerLens'
    float32 processing (each step in its order: dropping one moves the weights by far more than float32
    rounding)."""
    import transformers as T

    import relation_lens as rl

    if arch == "gpt2":
        folder = default_model_path()
    else:
        _, folder = _random_folder(tmp_path, tokenizer, arch)
    hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    model = rl.load_model(folder, dtype="float64", center_writing_weights=center)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    ids = model.to_tokens("The Space Needle is located in the city of", prepend_bos=False)
    with torch.no_grad():
        gap = (model(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)).abs().max().item()
    assert gap < (1e-12 if arch == "gpt2" else 1e-6), gap
    ref = dict(_transformer_lens_reference(T.AutoModelForCausalLM.from_pretrained(folder).eval(), folder, tokenizer,
                                           center).named_parameters())
    for k, v in model.named_parameters():
        assert (v.float() - ref[k]).abs().max() <= 1e-5 * max(1.0, ref[k].abs().max().item()), k
