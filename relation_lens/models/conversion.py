"""Converting a Hugging Face model to a ``HookedTransformer``: TransformerLens' own config and weight
conversion, then its weight processing run block by block (and in float64 for a float64 model), so
that no second copy of the weights exists at any time."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from relation_lens.errors import ModelLoadError


def check_gpt2_settings(hf_cfg: dict, config_file: Path) -> None:
    """GPT-2 settings that TransformerLens' conversion does not carry over: refuse them by name
    rather than return a model whose logits are silently wrong."""
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    act = hf_cfg.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(f"{str(config_file)!r}: activation_function={act!r} is not supported by "
                             f"TransformerLens (supported: {sorted(SUPPORTED_ACTIVATIONS)})")
    if hf_cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise ModelLoadError(f"{str(config_file)!r}: scale_attn_by_inverse_layer_idx=True is not supported "
                             "(TransformerLens' GPT-2 attention does not scale by 1 / (layer + 1))")
    if not hf_cfg.get("scale_attn_weights", True):
        raise ModelLoadError(f"{str(config_file)!r}: scale_attn_weights=False is not supported "
                             "(TransformerLens always divides attention scores by sqrt(d_head))")

def to_hooked_state(hf_model, tokenizer, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
    """TransformerLens' config and (unprocessed) state dict for ``hf_model``, by TransformerLens' own
    conversion; ``n_layers`` follows ``hf_model``'s config (a truncated model gives a truncated one)."""
    if hf_model.config.model_type == "gpt2":
        return _gpt2_state(hf_model, path, model_name, dtype)
    return _any_state(hf_model, path, model_name, dtype)

def _gpt2_state(hf_model, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        model_name=model_name, tokenizer_name=str(path), default_prepend_bos=True, device="cpu",
        dtype=dtype,
    )
    return cfg, convert_gpt2_weights(hf_model, cfg)

def _any_state(hf_model, path: Path, model_name: str, dtype: torch.dtype) -> tuple:
    """Any architecture TransformerLens converts (GPT-NeoX/Pythia, LLaMA, GPT-J, Mistral, ...), read from
    a local folder through TransformerLens' own config and weight conversion. TransformerLens picks
    some architectures by their name, so it is given the folder under a neutral name (a symlink)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="rl_model_") as tmp:
        neutral = Path(tmp) / "model"
        neutral.symlink_to(path.resolve(), target_is_directory=True)
        try:
            d = loading.convert_hf_model_config(str(neutral))
            d = {k: v for k, v in d.items() if k in HookedTransformerConfig.__dataclass_fields__}
            n_full, n = d["n_layers"], hf_model.config.num_hidden_layers
            # per-layer settings (attention types, windows) follow the layers kept
            d = {k: (v[:n] if isinstance(v, list) and len(v) == n_full and n < n_full else v) for k, v in d.items()}
            d.update(n_layers=n, model_name=model_name, tokenizer_name=str(path), device="cpu", dtype=dtype)
            cfg = HookedTransformerConfig(**d)
            state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model)
        except Exception as exc:
            arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
            raise ModelLoadError(f"TransformerLens cannot convert the {arch} model in {str(path)!r} "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return cfg, state

# the non-block tensors a block's processing reads but does not change, cut to one row / column
# (copies: a step may change its inputs in place)
_PLACEHOLDERS = {"embed.W_E": lambda v: v[:1], "pos_embed.W_pos": lambda v: v[:1],
                 "unembed.W_U": lambda v: v[:, :1], "unembed.b_U": lambda v: v[:1]}

def trim_memory() -> None:
    """Hand memory freed by the C allocator back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Freed tensors otherwise stay in the allocator's arenas and count as resident."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)

_MALLOC_TRIM: Any = None

@torch.no_grad()  # the converted tensors may be Parameters: no autograd graph may keep the inputs alive
def process_state_layerwise(state: dict, cfg, *, fold_ln: bool = True, center_writing_weights: bool = True,
                            center_unembed: bool = True, fold_value_biases: bool = True) -> dict:
    """TransformerLens' weight processing (``ProcessWeights.process_weights``, as
    ``load_and_process_state_dict`` applies it) run one block at a time and then on the embeddings,
    so that at most one block's copies exist beside the state dict; ``state`` is emptied as it goes.
    Every processing step acts within one block or on the embeddings alone, so the result is
    TransformerLens' whole-dict result bit for bit (tested)."""
    from transformer_lens.weight_processing import ProcessWeights

    kw = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
              fold_value_biases=fold_value_biases)
    for k, v in state.items():
        state[k] = v.detach()
    float64 = any(v.dtype == torch.float64 for v in state.values() if v.is_floating_point())
    process = process_weights_stepwise if float64 else ProcessWeights.process_weights
    out = {}
    one = copy.copy(cfg)
    one.n_layers = 1
    small = {k: _PLACEHOLDERS.get(k, lambda v: v)(v).clone() for k, v in state.items() if not k.startswith("blocks.")}
    # each piece is handed over in a dict nothing else holds, so that its inputs are freed as soon as
    # TransformerLens' first step has copied them
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}."
        done = process(
            {**small, **{k.replace(prefix, "blocks.0.", 1): state.pop(k) for k in [k for k in state if k.startswith(prefix)]}},
            one, **{**kw, "center_unembed": False})
        out.update({k.replace("blocks.0.", prefix, 1): v for k, v in done.items() if k.startswith("blocks.0.")})
        del done
        trim_memory()
    rest = copy.copy(cfg)
    rest.n_layers = 0
    # the embeddings, then the unembedding (each with the other's placeholders)
    unembed = {k for k in state if k.startswith(("unembed.", "ln_final."))}
    for keys in ([k for k in state if k not in unembed], sorted(unembed)):
        others = {k: v for k, v in small.items() if k not in keys}
        # step by step, each step's input freed as the next is made (an embedding-sized tensor a step), and
        # the embeddings' phase without centring the unembedding (its placeholder there is not kept)
        embeddings = bool(keys) and keys[0] not in unembed
        given = {k: state.pop(k) for k in keys}
        done = process_weights_stepwise([{**others, **given}], rest, **({**kw, "center_unembed": False} if embeddings
                                                                     else kw))
        if embeddings:  # a tensor the steps left as it was (an RMS model's W_E): the input, not the steps' copy
            done.update({k: v for k, v in given.items() if _same(done.get(k), v)})
        del given
        out.update({k: v for k, v in done.items() if k in keys})
        del done
        trim_memory()
    state.clear()
    return out

def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def process_weights_stepwise(given: dict | list, cfg, *, fold_ln: bool, center_writing_weights: bool,
                             center_unembed: bool, fold_value_biases: bool) -> dict:
    """``ProcessWeights.process_weights``'s steps in its order (TransformerLens 3.9, no adapter, no
    refactoring of attention matrices), in the tensors' own precision: TransformerLens' function casts
    every tensor that is not float32 to float32 before processing and back after, which rounds a float64
    model's folded weights to float32 (W_in and W_Q moved by up to 3e-8, log-probs by 1e-6).

    Given a one-element list instead of a dict, it takes the dict out of the list: each TransformerLens
    step copies every tensor it is given, and this way each step's input is freed as soon as its result
    replaces it (a dict passed as an argument stays referenced by the caller until the call returns)."""
    from transformer_lens.weight_processing import ProcessWeights

    state: dict = given.pop() if isinstance(given, list) else given
    del given

    norm = getattr(cfg, "normalization_type", "LN")
    if fold_ln and norm in ("LN", "LNPre"):
        state = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=True, center_weights=True)
    elif fold_ln and norm in ("RMS", "RMSPre"):
        state = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=False, center_weights=False)
    if center_writing_weights and norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False):
        state = ProcessWeights.center_writing_weights(state, cfg)
    if center_unembed:
        state = ProcessWeights.center_unembed(state, cfg=cfg)
    if fold_value_biases:
        state = ProcessWeights.fold_value_biases(state, cfg)
        if center_writing_weights and norm in ("LN", "LNPre"):
            for layer in range(cfg.n_layers):
                key = f"blocks.{layer}.attn.b_O"
                if key in state:
                    state[key] = state[key] - state[key].mean()
    return state

def hooked_from_state(cfg, tokenizer, state: dict, center: bool):
    """A HookedTransformer of ``cfg`` with ``state`` processed as ``from_pretrained`` does by default
    (LayerNorm folded, unembedding centred, value biases folded; writing weights centred if ``center``).
    The weights are processed block by block and the model is built with uninitialised (untouched)
    parameters that the state dict then fills tensor by tensor, so no second copy of the weights
    exists at any time."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    fold = cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre")
    norm = {"LN": "LNPre", "RMS": "RMSPre"}.get(cfg.normalization_type, cfg.normalization_type) if fold else \
        cfg.normalization_type
    model = HookedTransformer(dataclasses.replace(cfg, normalization_type=norm, init_weights=False),
                              tokenizer=tokenizer, move_to_device=False)
    # as load_and_process_state_dict does first (zero biases); in place, since the processing empties
    # the caller's dict as it goes and no other reference may keep the inputs alive
    filled = loading.fill_missing_keys(model, state)
    state.update({k: v for k, v in filled.items() if k not in state})
    del filled
    state = process_state_layerwise(state, cfg, fold_ln=fold, center_writing_weights=center, center_unembed=True,
                                    fold_value_biases=True)
    # the processed tensors become the parameters; keys of folded norms are left over. Made contiguous
    # one at a time, each input dropped as its copy is made (processing keeps a converted view's
    # strides, and copying the whole dict at once held the weights twice: 2.8x SmolLM2's weights)
    params = {}
    for i, k in enumerate(list(state)):
        params[k] = state.pop(k).contiguous()
        if i % 16 == 15:
            trim_memory()  # the dropped inputs go back to the system, not only to the allocator
    del state
    trim_memory()
    model.load_state_dict(params, strict=False, assign=True)
    del params
    return model.eval()
