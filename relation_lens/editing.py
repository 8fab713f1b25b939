"""Rank-one editing: ROME and relation-ROME, written into ``HookedTransformer`` MLP weights.

Both methods treat the output matrix of one MLP layer as a linear key-value memory. In
TransformerLens' ``x @ W`` layout the MLP output is ``k @ W_out + b_out`` with the key
``k = blocks.{l}.mlp.hook_post`` (``[d_mlp]``) and ``W_out`` of shape ``[d_mlp, d_model]``.

1. key ``k*``: the key at the *key token*, averaged over the edit prompt behind a few short random
   prefixes that the model itself generates. ROME (Meng et al. 2022) keys on the last subject
   token; relation-ROME (Li, Chen & Wang 2024) keys on the last relation token (the prompt's last
   token) in an early layer (index 4, the 5th MLP).
2. value ``v*``: the MLP output at the key token is optimised (Adam on an additive ``delta``) so the
   model predicts ``target_new`` on the prefixed prompts, with a KL term that keeps the
   prediction on ``"{subject} is a"`` unchanged, weight decay on ``delta`` and a norm clamp.
   ROME's learning rate (0.5) is tied to GPT-2 XL's activation scale; by default
   (``v_lr_scale="rms"``) Adam works on ``delta / rms(v_init)`` so the same setting behaves alike on
   models of any width and scale; ``v_lr_scale="absolute"`` is ROME's exact parameterisation.
3. the update, closed form with ``C = E[k k^T]`` (:class:`~relation_lens.key_statistics.KeyStatistics`)::

       u = C^-1 k*,   r = v* - (k* @ W_out + b_out),   W_out' = W_out + outer(u, r) / (u . k*)

   so that ``k* @ W_out' + b_out = v*`` exactly, and keys orthogonal to ``u`` in the C-metric are
   untouched. ``key_mode="symmetric"`` (default) uses the averaged ``k*`` in every term (the r-ROME
   fix, Gupta et al. 2024); ``"asymmetric"`` reproduces ROME's original code, which used the
   unprefixed prompt's key in the residual and the denominator, for comparison.

:func:`compute_edit` never changes the model; :func:`apply_edit` writes the update in place and
returns an :class:`Edit` that restores the saved weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens.guards import frozen_parameters, model_lock
from relation_lens._results import ValueEquality
from relation_lens.errors import EditError, SpanError, UnsupportedModelError, shorten
from relation_lens.spans import char_span_to_tokens, check_fits_context, object_tokens, right_pad, token_offsets

UNCHANGED = "; the model was not changed"
RELATION_ROME_LAYER = 4  # the 5th MLP layer, as in Li, Chen & Wang (2024)
# Settings for the embedded default model (used by EditConfig.default_for): it is tiny and was trained
# to near-certainty on its facts, so a value vector needs more room than GPT-2 XL's (docs/editing.md).
# Chosen on records 400-429 of the shipped counterfactual dataset, disjoint from those the experiments
# report (experiments/tune_edit_preset.py, experiments/results/edit_preset_tuning.md).
# Tuned with the formulas and conventions the library used then, which the preset keeps (each named).
DEFAULT_MODEL_PRESET: dict[str, Any] = {
    "v_weight_decay": 0.05, "clamp_norm_factor": 10.0, "v_steps": 40, "v_lr_scale": "rms",
    "weight_decay_form": "squared_ratio", "early_stop_on": "nll", "kl_direction": "forward",
    "prefix_lengths": ((6, 5), (11, 5)), "key_mode": "symmetric"}


@dataclass(frozen=True)
class EditRequest:
    """What to write: ``prompt`` with ``{}`` for the subject (CounterFact style), the new object.

    >>> request = EditRequest("{} is located in the city of", "The Space Needle", "Paris", target_true="Seattle")
    >>> request.text
    'The Space Needle is located in the city of'
    >>> EditRequest("{} is in", "Paris", "Italy", target_true="Italy")
    Traceback (most recent call last):
    ...
    relation_lens.errors.EditError: target_new 'Italy' is the same as target_true: nothing to edit (prompt '{} is in')
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise EditError(f"prompt {shorten(self.prompt)} must contain exactly one '{{}}' where the subject goes")
        if not self.prompt.replace("{}", "").strip():
            raise EditError(f"prompt {shorten(self.prompt)} has no words besides the subject placeholder")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditError(f"subject {self.subject!r} is empty (prompt {shorten(self.prompt)})")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EditError(f"target_new {self.target_new!r} is empty or whitespace (prompt {shorten(self.prompt)})")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise EditError(f"target_true {self.target_true!r} is empty (prompt {shorten(self.prompt)})")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditError(f"target_new {self.target_new!r} is the same as target_true: nothing to edit "
                            f"(prompt {shorten(self.prompt)})")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class EditConfig:
    """Algorithm settings. ``EditConfig()`` is ROME's own algorithm with its GPT-2 XL
    hyper-parameters (``hparams/ROME/gpt2-xl.json`` and ``rome/compute_v.py`` of kmeng01/rome), exactly;
    every deliberate departure is a named option (docs/editing.md, "ROME's code vs relation_lens").

    Value optimisation (``compute_v.py``):
        v_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompt: as ROME's hparams.
        v_lr_scale: ``"absolute"`` (ROME: Adam on ``delta`` itself) or ``"rms"`` (scale-free: Adam on
            ``delta / rms(v_init)``, so one learning rate behaves alike on models of any width).
        weight_decay_form: ``"rome"``: ``v_weight_decay * ||delta|| / ||v_init||**2`` as ROME's code
            computes it; ``"squared_ratio"``: ``v_weight_decay * (||delta|| / ||v_init||)**2``.
        early_stop_on: ``"loss"`` (ROME: stop when the total loss is under ``early_stop_loss``) or
            ``"nll"`` (stop on the NLL of the new target alone).
        kl_direction: ``"rome"``: ``kl_div(init, edited, log_target=True)`` = KL(edited || original), as
            ROME's code; ``"forward"``: KL(original || edited).
    Keys (``compute_u.py``, ``rome_main.py``):
        prefix_lengths: ``(length, count)`` pairs of self-generated context prefixes, ROME's
            ``context_template_length_params``: ``length`` counts the ``<|endoftext|>`` start token,
            so a prefix has ``length - 1`` generated tokens (ROME GPT-2 XL: 10 of 5 and 10 of 10).
        prefix_seeds: ``None`` (ROME's rule: each prefix starts at ``<|endoftext|>``) or the words
            MEMIT's code starts its prefixes with (``memit_config()``: ``("The", "Therefore", "Because",
            "I", "You")``; ``count`` is then shared among them and ``length`` counts the word's tokens;
            :func:`generate_prefixes`).
        prefixes: explicit context templates (``"{}"`` where the prompt goes, e.g.
            ``("{}", "The sky. {}")``), used instead of generated ones to reproduce an edit exactly.
        key_mode: ``"asymmetric"`` (ROME's code: the unprefixed prompt's key in the residual and the
            denominator) or ``"symmetric"`` (r-ROME, Gupta et al. 2024: the averaged ``k*`` in every term;
            sequential edits do not collapse).
        prepend_bos: ``None`` follows the model (``model.cfg.default_prepend_bos``; the default model
            was trained with BOS); ``False`` is ROME's tokenisation on GPT-2 (prompts, prefixes, and the
            key statistics computed for the edit).
    Closed form: ridge (relative ridge added to C), stats_n_texts (texts for the key statistics).
    """

    v_steps: int = 20
    v_lr: float = 0.5
    v_lr_scale: Literal["rms", "absolute"] = "absolute"
    v_weight_decay: float = 0.5
    weight_decay_form: Literal["rome", "squared_ratio"] = "rome"
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_direction: Literal["rome", "forward"] = "rome"
    kl_prompt: str = "{} is a"
    early_stop_loss: float = 5e-2
    early_stop_on: Literal["loss", "nll"] = "loss"
    prefix_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (length incl. <|endoftext|>, count)
    prefixes: tuple[str, ...] | None = None
    prefix_seeds: tuple[str, ...] | None = None  # None: ROME's rule; MEMIT's seed words (memit_config)
    key_mode: Literal["symmetric", "asymmetric"] = "asymmetric"
    prepend_bos: bool | None = None
    ridge: float = 0.0  # relative ridge added to C before solving
    stats_n_texts: int | None = 10_000
    seed: int = 0

    @classmethod
    def rome(cls, **overrides) -> "EditConfig":
        """ROME's code on GPT-2 (XL), tokenisation included: ``EditConfig(prepend_bos=False)``."""
        return cls(**{"prepend_bos": False, **overrides})

    @classmethod
    def default_model_preset(cls, **overrides) -> "EditConfig":
        """:data:`DEFAULT_MODEL_PRESET`: the settings tuned for the embedded default model."""
        return cls(**{**DEFAULT_MODEL_PRESET, **overrides})

    @classmethod
    def default_for(cls, model, **overrides) -> "EditConfig":
        """ROME's settings, except on the embedded default model, which gets :data:`DEFAULT_MODEL_PRESET`
        (see docs/editing.md); ``overrides`` replace fields either way."""
        from relation_lens.models import DEFAULT_MODEL_NAME

        base = DEFAULT_MODEL_PRESET if model.cfg.model_name == DEFAULT_MODEL_NAME else {}
        return cls(**{**base, **overrides})

    def __post_init__(self):
        choices = {"v_lr_scale": ("rms", "absolute"), "key_mode": ("symmetric", "asymmetric"),
                   "weight_decay_form": ("rome", "squared_ratio"), "early_stop_on": ("loss", "nll"),
                   "kl_direction": ("rome", "forward")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EditError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        if self.v_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0 or self.kl_factor < 0:
            raise EditError(f"invalid optimisation settings in {self}")
        if "{}" not in self.kl_prompt:
            raise EditError(f"kl_prompt {self.kl_prompt!r} must contain '{{}}'")
        for length, count in self.prefix_lengths:
            if length < 2 or count < 0:
                raise EditError(f"prefix_lengths {self.prefix_lengths!r}: each length counts the <|endoftext|> "
                                "start token, so it must be >= 2, and counts >= 0")
        if self.prefixes is not None:
            prefixes = tuple(self.prefixes)
            if not prefixes or not all(isinstance(p, str) and p.count("{}") == 1 for p in prefixes):
                raise EditError(f"prefixes {self.prefixes!r} must be a non-empty list of strings with one '{{}}' each")
            object.__setattr__(self, "prefixes", prefixes)
        if self.prefix_seeds is not None:
            seeds = tuple(self.prefix_seeds) if not isinstance(self.prefix_seeds, str) else ()
            if not seeds or not all(isinstance(w, str) and w.strip() for w in seeds):
                raise EditError(f"prefix_seeds {self.prefix_seeds!r} must be a non-empty list of words (or None for "
                                "ROME's rule)")
            object.__setattr__(self, "prefix_seeds", seeds)


@dataclass(frozen=True, repr=False, eq=False)
class RankOneUpdate(ValueEquality):
    """``W_out' = W_out + outer(left, right)`` at ``layer``; a value, applying it is separate."""

    layer: int
    left: Float[Tensor, "d_mlp"]
    right: Float[Tensor, "d_model"]
    key: Float[Tensor, "d_mlp"]  # k*
    value: Float[Tensor, "d_model"]  # v*
    method: str
    request: EditRequest
    key_positions: tuple[int, ...]  # key token in each prefixed prompt
    info: dict[str, Any] = field(default_factory=dict)

    def delta(self) -> Float[Tensor, "d_mlp d_model"]:
        return torch.outer(self.left, self.right)

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def layer_deltas(self) -> dict[int, Tensor]:
        return {self.layer: self.delta()}

    def layer_keys(self) -> dict[int, Tensor]:
        """The key written, per layer (``[1, d_mlp]``), for AlphaEdit's record of edited keys."""
        return {self.layer: self.key[None]}

    def __repr__(self) -> str:  # a summary; the vectors are in .left/.right/.key/.value
        norm = float(self.left.norm() * self.right.norm())  # Frobenius norm of the rank-one delta
        return (f"RankOneUpdate({self.method} at layer {self.layer}: {self.request.text!r} -> "
                f"{self.request.target_new!r}; ||delta||_F {norm:.3g})")


def _check_model(model, layer: int) -> None:
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise UnsupportedModelError(f"expected a HookedTransformer, got {type(model).__name__}")
    if model.cfg.attn_only or model.cfg.d_mlp is None:
        raise UnsupportedModelError(f"model {model.cfg.model_name!r} has no MLP layers to edit")
    if model.cfg.dtype not in (torch.float32, torch.float64):
        raise EditError(f"model {model.cfg.model_name!r} is in {model.cfg.dtype}; rank-one edits need float32 "
                        "(load it with dtype='float32'); the model was not changed")
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise EditError(f"layer {layer!r} is out of range: the model has layers 0..{model.cfg.n_layers - 1}")


def default_layer(model, method: str, request: EditRequest | None = None) -> int:
    """relation-ROME: index 4 (the 5th MLP; the middle layer for models of 4 layers or fewer).
    ROME: the layer where subject tracing of the MLPs (window scaled to depth, 5 noise samples) peaks at the
    last subject token of the request."""
    if method == "relation_rome":
        return RELATION_ROME_LAYER if model.cfg.n_layers > RELATION_ROME_LAYER else model.cfg.n_layers // 2
    if method == "rome":
        if request is None:
            raise EditError("ROME's default layer is found by tracing a request; pass one or a layer")
        import warnings

        from relation_lens.tracing import TargetWarning, depth_scaled_window, trace

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TargetWarning)
            res = trace(model, request.text, subject=request.subject, target=request.target_true,
                        corrupt="subject", kinds=("mlp",), n_samples=5,
                        window=depth_scaled_window(model.cfg.n_layers), include_last=True)
        last_subject = res.subject_span[1] - 1
        return int(res.scores["mlp"][:, last_subject].argmax())
    raise EditError(f"method {method!r} is not 'relation_rome' or 'rome'")


def _key_position(model, text: str, subject_start: int, subject: str, method: str,
                  prepend_bos: bool | None = None) -> tuple[Tensor, int]:
    tokens, offsets = token_offsets(model, text, prepend_bos)
    span = char_span_to_tokens(offsets, subject_start, subject_start + len(subject))
    if span[1] <= span[0]:
        raise SpanError(f"subject {subject!r} maps to no token of prompt {shorten(text)}")
    if method == "rome":
        return tokens, span[1] - 1
    if span[1] >= len(tokens):
        raise SpanError(f"prompt {shorten(text)} has no relation tokens after the subject {subject!r}; relation-ROME keys "
                        "on the last relation token")
    return tokens, len(tokens) - 1


def prefix_counts(config: EditConfig) -> list[int]:
    """How many generated prefixes each ``(length, count)`` group of ``config.prefix_lengths`` gives:
    ``count`` under ROME's rule; MEMIT's rule (``prefix_seeds``) gives ``count // len(prefix_seeds)``
    per seed word (MEMIT's ``n_gen // 5``), so ``count // n * n``."""
    if config.prefix_seeds is None:
        return [count for _, count in config.prefix_lengths]
    n = len(config.prefix_seeds)
    return [count // n * n for _, count in config.prefix_lengths]


@torch.no_grad()
def generate_prefixes(model, config: EditConfig) -> list[str]:
    """The context templates of ROME or MEMIT, as their code generates them (``get_context_templates``
    in ROME's ``rome_main.py`` and in MEMIT's ``memit_main.py``, both over ``util/generate.py``'s
    ``generate_fast``): ``"{}"`` first, then for each ``(length, count)`` of ``config.prefix_lengths``
    texts sampled from the model's top 5 tokens, decoded whole with ``<|endoftext|>`` removed,
    NFKD-normalised, ``"\\n\\n"`` turned into a space, with ``". {}"`` appended. Seeded by
    ``config.seed`` (the draws are those of ROME's code after ``torch.manual_seed(config.seed)``).

    ``config.prefix_seeds=None`` is ROME's rule: ``count`` texts started from ``<|endoftext|>``, whose
    token ``length`` counts. A tuple of words is MEMIT's rule (:func:`memit_config`: ``"The"``,
    ``"Therefore"``, ``"Because"``, ``"I"``, ``"You"``): ``count // len(prefix_seeds)`` texts per word,
    each starting with that word, whose tokens ``length`` counts; rows of seed words of several tokens
    advance together, as MEMIT's right-padded batch does, each drawing its own tokens once its seed is
    used up. Braces, which ROME's ``str.format`` would choke on, become spaces (MEMIT's code does the
    same; ROME's keeps them). ``config.prefixes``, when given, is returned as it is."""
    import unicodedata

    if config.prefixes is not None:
        return list(config.prefixes)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    tok = model.tokenizer
    out = ["{}"]
    for (length, _), count in zip(config.prefix_lengths, prefix_counts(config)):
        if config.prefix_seeds is None:
            rows = [[tok.bos_token_id] for _ in range(count)]
        else:
            per = count // len(config.prefix_seeds)
            rows = [list(tok(word, add_special_tokens=False)["input_ids"]) for word in config.prefix_seeds
                    for _ in range(per)]
        if not rows:
            continue
        for cur in range(min(map(len, rows)), length):
            context = torch.tensor([r[:cur] for r in rows], dtype=torch.long)
            probs = model(context.to(model.cfg.device))[:, -1].float().cpu().softmax(-1)
            top = probs.topk(min(5, probs.shape[-1]))  # ROME and MEMIT sample from the top 5
            pick = top.indices.gather(1, torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1,
                                                           generator=gen))[:, 0]
            for r, new in zip(rows, pick.tolist()):
                if len(r) == cur:  # a row still inside its seed word keeps it (the draw is made for every row)
                    r.append(new)
        for row in rows:
            text = unicodedata.normalize("NFKD", tok.decode(row)).replace("\n\n", " ")
            for special in {tok.bos_token, tok.eos_token} - {None}:
                text = text.replace(special, "")
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


def compute_edit(model, request, *, method: str = "relation_rome", layer: int | None = None,
                 stats=None, config: EditConfig | None = None, prefixes: Sequence[str] | None = None,
                 progress: bool = False, layers: Sequence[int] | None = None, preserve=None,
                 mom2_update_weight: float | None = None, values=None):
    """Compute the rank-one update that makes ``model`` answer ``request.target_new``.

    Pure: the model's weights, hooks and gradients are as they were afterwards.

    Args:
        method: ``"relation_rome"`` (key at the last relation token, default layer 4) or ``"rome"``
            (key at the last subject token, default layer from subject tracing).
        layer: the MLP layer to edit; ``None`` for the method's default (:func:`default_layer`).
        stats: :class:`KeyStatistics` of that layer; ``None`` computes or loads them from the disk cache
            over the default corpus.
        config: :class:`EditConfig` (``None``: :meth:`EditConfig.default_for` the model).
        prefix_seeds: ``None`` (ROME's rule: each prefix starts at ``<|endoftext|>``) or the words
            MEMIT's code starts its prefixes with (``memit_config()``: ``("The", "Therefore", "Because",
            "I", "You")``; ``count`` is then shared among them and ``length`` counts the word's tokens;
            :func:`generate_prefixes`).
        prefixes: explicit context templates (``"{}"`` where the prompt goes), overriding
            ``config.prefixes``; to reproduce an edit exactly or compare with another implementation.
        layers, mom2_update_weight, values: for ``method="memit"`` / ``"relation_memit"``, which take a list of
            requests and return a :class:`~relation_lens.batch_editing.BatchUpdate`
            (:func:`~relation_lens.batch_editing.compute_batch_edit`; ``stats`` is then a dict by layer).
        preserve: AlphaEdit's projection (:class:`~relation_lens.batch_editing.Preserve`) for any
            method: the update is solved in the null space of the preserved keys.

    Raises:
        EditError: bad layer, half-precision model, a target the model already predicts, NaN/Inf.
        SpanError: the subject is not in the tokenised prompt, or no relation token follows it.
    """
    if method in ("memit", "relation_memit"):
        from relation_lens.batch_editing import compute_batch_edit

        if layer is not None:
            raise EditError(f"{method} edits several layers: pass layers=, not layer=")
        if prefixes is not None and config is not None:
            config = dataclasses.replace(config, prefixes=tuple(prefixes))
        return compute_batch_edit(model, request, method=method, layers=layers, stats=stats, config=config,
                                  mom2_update_weight=mom2_update_weight, preserve=preserve, progress=progress,
                                  values=values)
    if layers is not None or mom2_update_weight is not None or values is not None:
        raise EditError(f"layers=, mom2_update_weight= and values= are for 'memit' / 'relation_memit', not {method!r}")
    if not isinstance(request, EditRequest):
        raise EditError(f"expected an EditRequest, got {type(request).__name__}")
    config = config or EditConfig.default_for(model)
    if prefixes is not None:
        config = dataclasses.replace(config, prefixes=tuple(prefixes))
    with model_lock(model):
        return _compute_edit(model, request, method, layer, stats, config, progress, preserve)


@dataclass
class _Value:
    """What the value optimisation found for one request at one layer."""
    keys: Tensor  # [prefixed prompt, d_mlp] float64: hook_post at the key token of each prefixed prompt
    k_star: Tensor  # their mean
    k_plain: Tensor  # the unprefixed prompt's
    target_init: Tensor  # the vector delta is added to (MLP output, or residual stream for MEMIT)
    delta: Tensor
    positions: list[int]
    prefixes: list[str]
    history: list[dict]


def _value(model, request: EditRequest, layer: int, method: str, config: EditConfig, init: str = "mlp") -> _Value:
    """Steps 1-2 of ROME (and MEMIT's ``compute_z``): the keys at ``layer`` and the optimised ``delta``
    added after block ``layer`` at the key token. ``init="mlp"``: ``v_init`` is the MLP output there
    (ROME); ``"resid"``: the residual stream after the block (MEMIT's ``target_init``, which its
    clamp and weight decay are relative to)."""
    if method not in ("rome", "relation_rome"):
        raise EditError(f"key method {method!r} is not 'rome' (last subject token) or 'relation_rome' (last token)")
    new_ids = object_tokens(model, request.text, request.target_new)
    prompt_text = request.text
    bos = config.prepend_bos
    with torch.no_grad():
        prompt_tokens, _ = token_offsets(model, prompt_text, bos)
        check_fits_context(model, prompt_text, len(prompt_tokens), note=UNCHANGED)
        clean_logits = model(prompt_tokens[None].to(model.cfg.device))[0, -1]
    if int(clean_logits.argmax()) == int(new_ids[0]) and len(new_ids) == 1:
        raise EditError(f"the model already predicts {request.target_new!r} for {shorten(prompt_text)}; nothing to edit")

    # prompts: each prefix + the edit prompt (+ target tokens but the last, teacher-forced)
    prefixes = generate_prefixes(model, config)
    contexts, positions, plens = [], [], []
    for prefix in prefixes:
        head = prefix.replace("{}", "")
        text = head + prompt_text
        toks, pos = _key_position(model, text, len(head) + request.prompt.index("{}"), request.subject, method, bos)
        check_fits_context(model, text, len(toks) + len(new_ids) - 1, what="prefixed prompt (with the target)",
                           note=UNCHANGED)
        contexts.append(toks)
        positions.append(pos)
        plens.append(len(toks))
    kl_text = config.kl_prompt.format(request.subject)
    kl_toks, kl_pos = _key_position(model, kl_text, config.kl_prompt.index("{}"), request.subject,
                                    "rome" if method == "rome" or kl_text.endswith(request.subject) else method, bos)
    hook_post, hook_out = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"
    dev = model.cfg.device

    # One forward of the prefixed prompts (with the target's tokens, teacher-forced) and the KL prompt up
    # to the edited layer gives the keys, v_init, and the residual the value optimisation starts from.
    seqs = [torch.cat([c, new_ids[:-1].cpu()]) for c in contexts] + [kl_toks]
    batch = right_pad(model, seqs).to(dev)
    with torch.no_grad():
        resid_base, cache = model.run_with_cache(batch, names_filter=[hook_post, hook_out], stop_at_layer=layer + 1)

    # 1. the key k*: average of hook_post at the key token over the prefixed prompts
    n_rw = len(contexts)
    dev = resid_base.device  # the edited block's device (blocks may be split over devices: n_devices)
    keys = cache[hook_post][torch.arange(n_rw), torch.tensor(positions)].double().cpu()
    k_star = keys.mean(0)
    k_plain = keys[0]  # the unprefixed prompt, as ROME's original code uses in part of the update
    target_init = (cache[hook_out] if init == "mlp" else resid_base)[0, positions[0]].detach().clone()

    # 2. the value v*: optimise delta on the MLP output at the key token
    lookup = torch.tensor(positions + [kl_pos], device=dev)
    unit = target_init.norm() / math.sqrt(model.cfg.d_model) if config.v_lr_scale == "rms" else 1.0
    z = torch.zeros(model.cfg.d_model, device=dev, dtype=target_init.dtype, requires_grad=True)
    opt = torch.optim.Adam([z], lr=config.v_lr)
    max_norm = config.clamp_norm_factor * target_init.norm()
    delta = z * unit

    # The layers up to the edited one do not change while delta is optimised, and the MLP output enters
    # the residual stream additively: so the residual after block `layer` is computed once (above), each
    # step adds delta to it at the key positions and runs only the blocks above, and only the positions
    # the loss reads (the target tokens, the KL prompt's key) are normalised and unembedded.
    L = model.cfg.n_layers
    rows = torch.arange(batch.shape[0], device=dev)
    tgt_pos = torch.stack([torch.arange(len(new_ids)) + p - 1 for p in plens]).to(dev)  # [rw, n_tgt]
    last_dev = next(model.blocks[L - 1].parameters()).device
    read_rows = torch.cat([torch.arange(n_rw).repeat_interleave(len(new_ids)), torch.tensor([n_rw])]).to(last_dev)
    read_pos = torch.cat([tgt_pos.flatten().cpu(), torch.tensor([kl_pos])]).to(last_dev)

    def log_probs(delta: Tensor) -> Tensor:
        resid = resid_base.index_put((rows, lookup), delta.to(resid_base.dtype).expand(len(rows), -1),
                                     accumulate=True)
        if layer + 1 < L:
            resid = model(resid, start_at_layer=layer + 1, stop_at_layer=L)
        picked = resid[read_rows, read_pos][:, None]  # [reads, 1, d_model]
        logits = model(picked, start_at_layer=L)[:, 0]  # final norm, unembed, soft cap
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # float64 stays float64

    kl_init = None
    history = []
    with frozen_parameters(model):
        for step in range(config.v_steps):
            logp = log_probs(delta)
            rw = logp[:-1].view(n_rw, len(new_ids), -1)
            nll = -rw.gather(2, new_ids.to(rw.device)[None, :, None].expand(n_rw, -1, 1)).squeeze(-1).mean()
            kl_logp = logp[-1]
            nll, kl_logp = nll.to(dev), kl_logp.to(dev)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            if config.kl_direction == "rome":  # kl_div(init, edited, log_target=True) = KL(edited || original)
                kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
            else:  # KL(original || edited)
                kl = (kl_init.exp() * (kl_init - kl_logp)).sum()
            if config.weight_decay_form == "rome":  # ROME's code: ||delta|| / ||v_init||**2
                decay = config.v_weight_decay * delta.norm() / target_init.norm() ** 2
            else:
                decay = config.v_weight_decay * (delta.norm() / target_init.norm()) ** 2
            loss = nll + config.kl_factor * kl + decay
            history.append({"step": step, "loss": loss.item(), "nll": nll.item(), "kl": kl.item(),
                            "decay": decay.item(), "p_new": math.exp(-nll.item())})
            if (loss if config.early_stop_on == "loss" else nll).item() < config.early_stop_loss:
                break
            if step == config.v_steps - 1:
                break
            (grad,) = torch.autograd.grad(loss, [z])
            z.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                if (z * unit).norm() > max_norm:
                    z.mul_(max_norm / (z * unit).norm())
            delta = z * unit
    return _Value(keys, k_star, k_plain, target_init, delta.detach(), positions, prefixes, history)


def _compute_edit(model, request: EditRequest, method: str, layer: int | None, stats, config: EditConfig,
                  progress: bool, preserve=None) -> RankOneUpdate:
    from relation_lens.key_statistics import KeyStatistics

    if method not in ("relation_rome", "rome"):
        raise EditError(f"method {method!r} is not 'relation_rome' or 'rome'")
    if layer is None:
        _check_model(model, 0)
        layer = default_layer(model, method, request)
    _check_model(model, layer)
    if stats is not None and stats.layer != layer:
        raise EditError(f"key statistics are for layer {stats.layer}, but the edit is at layer {layer}")
    val = _value(model, request, layer, method, config)
    k_star, k_plain, target_init, delta = val.k_star, val.k_plain, val.target_init, val.delta
    positions, prefixes, history, bos = val.positions, val.prefixes, val.history, config.prepend_bos
    prompt_text = request.text
    v_star = (target_init + delta.detach()).double().cpu()

    # 3. the closed form
    if stats is None:
        stats = KeyStatistics.compute(model, layer, n_texts=config.stats_n_texts, progress=progress,
                                      prepend_bos=bos)
    W = model.blocks[layer].mlp.W_out.detach().double().cpu()
    b = model.blocks[layer].mlp.b_out.detach().double().cpu()
    k_res = k_star if config.key_mode == "symmetric" else k_plain
    if preserve is None:
        u = stats.inverse_times(k_star, config.ridge)
        right = (v_star - (k_res @ W + b)) / torch.dot(u, k_res)
    else:  # AlphaEdit's projected solve with this one key and the whole residual: u r^T
        right = v_star - (k_res @ W + b)
        u = preserve.solve(stats, k_star[None], torch.ones(1, 1, dtype=torch.float64))[:, 0]
    if not (torch.isfinite(u).all() and torch.isfinite(right).all()):
        raise EditError(f"the update for {shorten(prompt_text)} -> {request.target_new!r} holds NaN or Inf "
                        "(singular key statistics? try EditConfig(ridge=1e-4)); the model was not changed")
    return RankOneUpdate(
        layer=layer, left=u.to(W.dtype), right=right, key=k_star, value=v_star, method=method, request=request,
        key_positions=tuple(positions),
        info={"history": history, "prefixes": prefixes, "key_mode": config.key_mode})


class Edit:
    """A handle on an update written into a model (a :class:`RankOneUpdate` or a MEMIT-style
    :class:`~relation_lens.batch_editing.BatchUpdate` over several layers); ``undo()`` restores the
    saved weights bit for bit.

    Use as a context manager to undo on exit::

        with rl.apply_edit(model, update):
            ...  # the edited model
    """

    def __init__(self, model, update):
        self.model = model
        self.update = update
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}
        new = {}
        for layer, delta in update.layer_deltas().items():
            param = model.blocks[layer].mlp.W_out
            new[layer] = param.detach() + delta.to(param.device, param.dtype)
            if not torch.isfinite(new[layer]).all():
                raise EditError(f"applying the update would put NaN or Inf into blocks.{layer}.mlp.W_out; the model "
                                "was not changed")
        with torch.no_grad():
            for layer, value in new.items():
                param = model.blocks[layer].mlp.W_out
                original = param.detach().clone()
                param.copy_(value)
                self._saved[layer] = (original, param.detach().clone())
        self.active = True

    def _what(self) -> str:
        r = getattr(self.update, "request", None)
        return f"{r.text!r} -> {r.target_new!r}" if r is not None else f"{len(self.update.requests)} requests"

    def undo(self) -> None:
        if not self.active:
            raise EditError(f"this edit (layers {list(self._saved)}, {self._what()}) was already undone")
        for layer, (_, edited) in self._saved.items():
            if not torch.equal(self.model.blocks[layer].mlp.W_out.detach(), edited):
                raise EditError(
                    f"blocks.{layer}.mlp.W_out changed since this edit was applied (another edit or training); "
                    "undo the later changes first (edits are undone in reverse order)")
        with torch.no_grad():
            for layer, (original, _) in self._saved.items():
                self.model.blocks[layer].mlp.W_out.copy_(original)
        self.active = False

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        layers = ", ".join(map(str, self._saved))
        return f"Edit({self.update.method}, layer {layers}: {self._what()}, {'active' if self.active else 'undone'})"


def apply_edit(model, update) -> Edit:
    """Write ``update`` (a :class:`RankOneUpdate`, or a :class:`~relation_lens.batch_editing.BatchUpdate`)
    into the model's MLP output matrices in place; returns the undo handle."""
    from relation_lens.batch_editing import BatchUpdate

    if not isinstance(update, (RankOneUpdate, BatchUpdate)):
        raise EditError(f"expected a RankOneUpdate or a BatchUpdate, got {type(update).__name__}")
    for layer, delta in update.layer_deltas().items():
        _check_model(model, layer)
        shape = tuple(model.blocks[layer].mlp.W_out.shape)
        if tuple(delta.shape) != shape:
            raise EditError(f"update of shape {tuple(delta.shape)} does not fit blocks.{layer}.mlp.W_out of shape "
                            f"{shape}")
    return Edit(model, update)


def edit(model, request: EditRequest, **kwargs) -> Edit:
    """``apply_edit(model, compute_edit(model, request, **kwargs))``."""
    return apply_edit(model, compute_edit(model, request, **kwargs))


# Where each Hugging Face architecture keeps the matrix TransformerLens calls W_out, and whether it is
# stored as [d_mlp, d_model] (GPT-2's Conv1D, the x @ W layout) or transposed (nn.Linear, [d_model, d_mlp]).
_HF_W_OUT = {
    "gpt2": ("transformer.h.{}.mlp.c_proj.weight", False),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h.weight", True),
    "gptj": ("transformer.h.{}.mlp.fc_out.weight", True),
    "llama": ("model.layers.{}.mlp.down_proj.weight", True),
    "mistral": ("model.layers.{}.mlp.down_proj.weight", True),
}


def save_edited(source: str | Path, updates: Sequence[RankOneUpdate], folder: str | Path) -> Path:
    """Write a Hugging Face folder of the model in ``source`` (the default model's name or a local
    Hugging Face folder) with ``updates`` added to its MLP output matrices: config, tokenizer and
    generation files copied, weights in ``model.safetensors``. The folder loads with
    :func:`relation_lens.load_model` and with ``transformers`` alike.

    The update is added to the stored matrix as it is. TransformerLens centres writing weights on
    load (subtracts their mean over ``d_model``), which changes nothing the model computes because
    every reader of the residual stream normalises it; so the saved model computes what the edited
    HookedTransformer computes (a test checks the logits).
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from relation_lens.models import DEFAULT_MODEL_NAME, default_model_path

    src = default_model_path() if str(source) in ("default", DEFAULT_MODEL_NAME) else Path(source).expanduser()
    weights_file = src / "model.safetensors"
    if not (src / "config.json").is_file() or not weights_file.is_file():
        raise EditError(f"cannot save an edited copy of {str(source)!r}: it is not a local Hugging Face folder with "
                        "config.json and model.safetensors (hub models: save_pretrained them to a folder first)")
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type not in _HF_W_OUT:
        raise EditError(f"saving edited {model_type!r} models is not supported (supported: {sorted(_HF_W_OUT)})")
    template, transposed = _HF_W_OUT[model_type]
    state = load_file(str(weights_file))
    for upd in updates:
        for layer, layer_delta in upd.layer_deltas().items():
            name = template.format(layer)
            if name not in state:
                raise EditError(f"{str(weights_file)!r} has no tensor {name!r} for the edit at layer {layer}")
            delta = layer_delta.T if transposed else layer_delta
            if tuple(delta.shape) != tuple(state[name].shape):
                raise EditError(f"the update of shape {tuple(delta.shape)} does not fit {name!r} of shape "
                                f"{tuple(state[name].shape)}")
            state[name] = (state[name].double() + delta.double()).to(state[name].dtype)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith((".bin", ".pt")):
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
