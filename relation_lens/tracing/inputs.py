"""What a trace starts from: the model check, the noise, the target to score, the corrupted span."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from relation_lens import presets
from relation_lens.data import known_1000_subjects, load_world
from relation_lens.data.loaders import RELATION_TEMPLATES
from relation_lens.errors import (
    NoiseError,
    PromptError,
    SpanError,
    TargetError,
    UnsupportedModelError,
    shorten,
)
from relation_lens.model_interface import Model, check_interface, decode, is_bridge, is_hooked_transformer
from relation_lens.spans import PromptSpans, Span, is_token_input, object_tokens, token_ids, token_offsets
from relation_lens.tracing.config import KINDS, NOISE_MULTIPLIER


class TargetWarning(UserWarning):
    """A target string is several tokens long; only its first token is scored."""


def check_model(model: Model, kinds: Sequence[str] = KINDS, prompt: Any = None) -> None:
    """Raise :class:`UnsupportedModelError` unless tracing can run on ``model``."""
    try:
        _check_model(model, kinds)
    except UnsupportedModelError as exc:
        if prompt is not None:
            raise UnsupportedModelError(f"{exc} (prompt {shorten(prompt)})") from None
        raise


def _check_model(model: Model, kinds: Sequence[str]) -> None:
    if not (is_hooked_transformer(model) or is_bridge(model)):
        raise UnsupportedModelError(
            f"expected a TransformerLens model (HookedTransformer, or TransformerBridge under TransformerLens 4), "
            f"got {type(model).__name__}; load models with relation_lens.load_model()")
    cfg = model.cfg
    if cfg.attention_dir != "causal":
        raise UnsupportedModelError(f"model {cfg.model_name!r} has {cfg.attention_dir} attention; tracing needs a causal LM")
    if cfg.positional_embedding_type == "shortformer":
        raise UnsupportedModelError(f"model {cfg.model_name!r} uses shortformer positional embeddings, not supported")
    if model.tokenizer is None:
        raise UnsupportedModelError(f"model {cfg.model_name!r} has no tokenizer; tracing works on text prompts")
    if "mlp" in kinds and cfg.attn_only:
        raise UnsupportedModelError(f"model {cfg.model_name!r} is attention-only: it has no MLP outputs to restore")
    check_interface(model)


def noise_std(model: Model) -> float:
    """The default noise level: 3 x the standard deviation of the whole token embedding matrix."""
    return NOISE_MULTIPLIER * model.W_E.detach().float().std().item()


def default_noise_subjects(model: Model) -> tuple[str, ...]:
    """The subjects ROME's noise rule averages over when none are given: the default model's world
    subjects on the default model, known_1000's subjects (ROME's own list) on any other model."""
    if presets.for_model(model).world_noise_subjects:
        return tuple(dict.fromkeys(f.subject for f in load_world()))
    return known_1000_subjects()


def rome_noise_std(model: Model, subjects: Sequence[str] | None = None) -> float:
    """ROME's noise level (``collect_embedding_std`` in its ``experiments/causal_trace.py``): 3 x the
    standard deviation of the token embeddings (``hook_embed``, no positions) of every token of
    every subject, each subject tokenised alone without BOS, pooled over the list."""
    subjects = default_noise_subjects(model) if subjects is None else tuple(subjects)
    ids = [model.to_tokens(s, prepend_bos=False)[0] for s in subjects]
    if not ids:
        raise NoiseError("noise='rome' needs at least one subject to measure the embeddings of")
    with torch.no_grad():
        emb = model.embed(torch.cat(ids).to(model.cfg.device)[None])
    return NOISE_MULTIPLIER * emb.float().std().item()


def resolve_noise_std(model: Model, noise: float | str | None, subjects: Sequence[str] | None = None) -> float:
    """The std a noise setting stands for (``None``/``"embedding"``, ``"rome"`` or a number)."""
    if noise is None or noise == "embedding":
        return noise_std(model)
    if noise == "rome":
        return rome_noise_std(model, subjects)
    return float(noise)


def make_noise(model: Model, n_samples: int, span_len: int, noise: float | str | Tensor | None, seed: int,
               subjects: Sequence[str] | None = None) -> tuple[Float[Tensor, "sample span d_model"], float | None]:
    """The noise added to the corrupted span's token embeddings, and its std (None if given)."""
    d = model.cfg.d_model
    if isinstance(noise, Tensor):
        want = (n_samples, span_len, d)
        if tuple(noise.shape) != want:
            raise NoiseError(f"noise tensor has shape {tuple(noise.shape)}, expected [n_samples, span_len, d_model] "
                             f"= {list(want)}")
        if not torch.isfinite(noise).all():
            raise NoiseError("noise tensor holds NaN or Inf")
        return noise.detach().to(model.cfg.device, model.cfg.dtype), None
    std = resolve_noise_std(model, noise, subjects)
    if not math.isfinite(std) or std < 0:
        raise NoiseError(f"noise std must be a finite number >= 0, got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn((n_samples, span_len, d), generator=gen) * std
    return draw.to(model.cfg.device, model.cfg.dtype), std


@dataclass(frozen=True)
class Target:
    token: int
    text: str  # the decoded scored token
    requested: str | None  # what the caller asked for (None: the model's own prediction)
    n_tokens: int  # tokens in the requested string; only the first is scored


def resolve_target(model: Model, prompt: str, target: str | int | None, clean_logits: Tensor) -> Target:
    """Turn ``target`` into the token to score.

    A string is tokenised as a continuation of the prompt (:func:`relation_lens.spans.continuation_text`:
    a space in front unless either side already has whitespace there, GPT-2 convention " Paris"). A
    string of several tokens is scored by its first token, with a :class:`TargetWarning`.
    """
    if target is None:
        tok = int(clean_logits.argmax())
        return Target(tok, decode(model, [tok]), None, 1)
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise TargetError(f"target {target!r} is a {type(target).__name__}: give the answer as a string (' Paris'), a "
                          f"token id (an int) or None for the model's top prediction (prompt {shorten(prompt)})")
    if isinstance(target, int):
        if not 0 <= target < model.cfg.d_vocab:
            raise TargetError(f"target token id {target} is outside the vocabulary [0, {model.cfg.d_vocab}) "
                              f"(prompt {shorten(prompt)})")
        return Target(target, decode(model, [target]), str(target), 1)
    if not target.strip():
        raise TargetError(f"target {target!r} is empty (prompt {shorten(prompt)})")
    ids = object_tokens(model, prompt, target).tolist()
    if len(ids) > 1:
        warnings.warn(f"target {target!r} is {len(ids)} tokens; scoring its first token "
                      f"{decode(model, ids[:1])!r} (prompt {shorten(prompt)})", TargetWarning, stacklevel=3)
    return Target(ids[0], decode(model, ids[:1]), target, len(ids))


def corrupt_span_for(spans: PromptSpans, corrupt: str | Sequence[int], n_pos: int) -> tuple[str, Span]:
    if isinstance(corrupt, str):
        if corrupt == "relation":
            span = spans.relation_span
        elif corrupt == "subject":
            span = spans.subject_span
        else:
            raise SpanError(f"corrupt={corrupt!r} is not 'relation', 'subject' or a (start, end) token span "
                            f"(prompt {shorten(spans.prompt)})")
        if span[1] <= span[0]:
            raise SpanError(f"the {corrupt} span is empty in prompt {shorten(spans.prompt)}")
        return corrupt, span
    try:
        a, b = (int(v) for v in corrupt)
    except (TypeError, ValueError):
        raise SpanError(f"corrupt={corrupt!r} is not 'relation', 'subject' or a (start, end) token span") from None
    if not 0 <= a < b <= n_pos:
        raise SpanError(f"corrupt span {(a, b)} is not a non-empty range inside the {n_pos} tokens of prompt "
                        f"{shorten(spans.prompt)} {list(spans.str_tokens)}")
    return "explicit", (a, b)



@dataclass(frozen=True)
class Counterfactual:
    """The corrupted run's input under token replacement: the clean tokens with the corrupted span
    taken from ``prompt`` (a counterfactual of the same token length)."""
    prompt: str
    tokens: Tensor  # [pos], the clean tokens with the span replaced
    source: str  # "given", or how it was built


def _tokens(model: Model, text: Any, prepend_bos: bool | None) -> Tensor:
    if is_token_input(text):  # token ids are used as given
        return token_ids(model, text, "corrupted_prompt")
    return token_offsets(model, text, prepend_bos)[0]


def replacement_sources(model: Model) -> tuple[list[list[str]], list[str], str]:
    """The relation templates (one list a relation) and subjects token replacement builds its
    counterfactuals from on ``model``, and their name: the embedded model's world on the embedded model
    (the templates and subjects it was trained on), the vendored relation templates (ParaRel / MQuAKE)
    and ROME's known_1000 subjects on any other model (never the toy world's facts)."""
    if presets.is_default_model(model):
        world = load_world()
        return ([list(world.relations[r].train_templates) for r in sorted(world.relations)],
                [f.subject for f in world], "the default model's world")
    return ([list(RELATION_TEMPLATES[r]) for r in sorted(RELATION_TEMPLATES)], list(known_1000_subjects()),
            "the vendored ParaRel / MQuAKE relation templates and ROME's known_1000 subjects")


def counterfactual(model: Model, spans: PromptSpans, subject: str, mode: str, span: Span, *,
                   corrupted_prompt: Any, seed: int, prepend_bos: bool | None) -> Counterfactual:
    """The corrupted tokens for ``corrupt_with="replace"``.

    Given ``corrupted_prompt``: it must have as many tokens as the prompt and other tokens on the
    corrupted span. Otherwise one is built, chosen among the candidates by ``seed``, from data that
    belongs to the model (:func:`replacement_sources`): on the embedded model its world's templates and
    subjects; on any other model the vendored relation templates (ParaRel / MQuAKE, MIT) and ROME's
    known_1000 subjects. For relation corruption: the same subject under another relation's template
    (subject first) whose tokens match the prompt's up to the relation span and have the same length;
    for subject corruption, the prompt with the subject replaced by another subject of the same token
    length. :class:`PromptError` when nothing fits."""
    clean = spans.tokens
    a, b = span
    if corrupted_prompt is not None:
        other = _tokens(model, corrupted_prompt, prepend_bos)
        if len(other) != len(clean):
            raise PromptError(f"corrupted_prompt {shorten(corrupted_prompt)} has {len(other)} tokens; the prompt "
                              f"{shorten(spans.prompt)} has {len(clean)}: token replacement needs the same length")
        if torch.equal(other[a:b], clean[a:b]):
            raise PromptError(f"corrupted_prompt {shorten(corrupted_prompt)} has the prompt's own tokens on the "
                              f"corrupted span {list(spans.str_tokens[a:b])}: nothing would be corrupted")
        out = clean.clone()
        out[a:b] = other[a:b]
        text = decode(model, other.tolist()) if is_token_input(corrupted_prompt) else corrupted_prompt
        return Counterfactual(text, out, "given")
    if mode not in ("relation", "subject"):
        raise PromptError(f"corrupt_with='replace' on an explicit span needs corrupted_prompt= (prompt "
                          f"{shorten(spans.prompt)})")
    templates, subjects, source = replacement_sources(model)
    candidates: list[tuple[str, Tensor]] = []
    if mode == "relation":
        for group in templates:
            for template in group:
                if not template.startswith("{}"):
                    continue
                text = template.format(subject)
                if text == spans.prompt:
                    continue
                toks = _tokens(model, text, prepend_bos)
                if len(toks) == len(clean) and torch.equal(toks[:a], clean[:a]) and not torch.equal(toks[a:b], clean[a:b]):
                    candidates.append((text, toks))
        how = f"the same subject under another relation's template of the same token length ({source})"
    else:
        seen: set[str] = set()
        for other_subject in subjects:
            if other_subject in seen or other_subject == subject:
                continue
            seen.add(other_subject)
            text = spans.prompt.replace(subject, other_subject, 1)
            toks = _tokens(model, text, prepend_bos)
            if len(toks) == len(clean) and torch.equal(toks[:a], clean[:a]) and torch.equal(toks[b:], clean[b:]) \
                    and not torch.equal(toks[a:b], clean[a:b]):
                candidates.append((text, toks))
        how = f"another subject of the same token length ({source})"
    if not candidates:
        raise PromptError(f"no counterfactual for {mode} replacement in prompt {shorten(spans.prompt)}: there is "
                          f"no {how}; pass corrupted_prompt=")
    text, toks = candidates[seed % len(candidates)]
    out = clean.clone()
    out[a:b] = toks[a:b]
    return Counterfactual(text, out, how)
