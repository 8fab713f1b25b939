"""Token spans of the subject and the relation, from character offsets.

All span finding goes through :func:`token_offsets` and :func:`char_span_to_tokens`: the
prompt is tokenised the way the model tokenises it (``model.to_tokens``, BOS included when the
model prepends one), each token gets the character range of the prompt it covers, and a
character span maps to the tokens that overlap it. This works for any tokenizer: fast
tokenizers give offsets directly; for others the offsets are rebuilt by decoding prefixes.

Conventions (positions index ``model.to_tokens(prompt)[0]``, half-open ``(start, end)``):

* subject span: the tokens overlapping the first occurrence of ``subject`` in the prompt (or
  the ``occurrence``-th one).
* relation span: the tokens after the subject up to the end of the prompt. By default the
  last token of the prompt is part of it (``include_last=True``); pass ``include_last=False``
  to leave it out, as when the last token is studied on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from relation_lens.errors import PromptError, SpanError, shorten
from relation_lens.model_interface import Model, tokenizer_of

Span = tuple[int, int]
Prompt = str | Sequence[int] | torch.Tensor  # text, or token ids used as given


@dataclass(frozen=True)
class PromptSpans:
    """Tokenised prompt with its subject and relation spans (half-open token index ranges)."""

    prompt: str
    tokens: torch.Tensor  # [pos], int64
    str_tokens: tuple[str, ...]
    subject: str
    subject_span: Span
    relation_span: Span


def token_offsets(model: Model, prompt: str, prepend_bos: bool | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Tokens of ``prompt`` as the model sees them, and each token's character range.

    ``prepend_bos``: ``None`` follows the model's own default (``model.cfg.default_prepend_bos``);
    ``False`` tokenises as ROME's code does for GPT-2 (no BOS).

    Returns:
        tokens: ``Int[Tensor, "pos"]``; offsets: one ``(start, end)`` character range per token
        (``(0, 0)`` for a prepended BOS token).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"prompt {shorten(prompt)} is empty; give the text that ends right before the answer")
    bos = model.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)
    tokens = model.to_tokens(prompt, prepend_bos=bos, truncate=False)[0].cpu()
    tok = tokenizer_of(model)
    ids = tokens.tolist()
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        body = enc["input_ids"]
        shift = len(ids) - len(body)
        if shift >= 0 and ids[shift:] == body:
            return tokens, [(0, 0)] * shift + [tuple(o) for o in enc["offset_mapping"]]
    # Fallback for any tokenizer: the decoded prefixes grow through the prompt.
    offsets, prev = [], 0
    strs = cast(list[str], model.to_str_tokens(tokens))
    text = ""
    for i, s in enumerate(strs):
        if i == 0 and bos and s == tok.bos_token:
            offsets.append((0, 0))
            continue
        text += s
        end = min(len(prompt), len(text))
        offsets.append((prev, end))
        prev = end
    return tokens, offsets


def check_fits_context(model: Model, text: str, n_tokens: int, what: str = "prompt", note: str = "") -> None:
    """Raise :class:`PromptError` naming ``text`` (shortened) when ``n_tokens`` exceed the model's context."""
    if n_tokens > model.cfg.n_ctx:
        raise PromptError(f"{what} {shorten(text)} is {n_tokens} tokens, longer than the model's context of "
                          f"{model.cfg.n_ctx}{note}")


def char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> Span:
    """The half-open token range whose character ranges overlap ``[start, end)``."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        return (0, 0)
    return (hit[0], hit[-1] + 1)


def find_spans(model: Model, prompt: str, subject: str, *, include_last: bool = True, occurrence: int = 0,
               require_relation: bool = True, prepend_bos: bool | None = None) -> PromptSpans:
    """Find the subject and relation token spans of ``prompt``.

    Args:
        model: a HookedTransformer (its tokenizer and BOS convention are used).
        prompt: text ending right before the answer, e.g. ``"The Space Needle is located in the city of"``.
        subject: a substring of ``prompt``, e.g. ``"The Space Needle"``.
        include_last: whether the relation span includes the prompt's last token.
        occurrence: which occurrence of ``subject`` to use when it appears several times.
        require_relation: raise when the relation span is empty (otherwise return it empty).
        prepend_bos: ``None`` for the model's own default, or an explicit choice (ROME: ``False``).

    Raises:
        SpanError: the subject is not in the prompt, or the relation span is empty.
    """
    if isinstance(subject, (tuple, list)):
        raise SpanError(f"subject {subject!r} is a token span: spans work only with token ids as input (pass the "
                        f"prompt as token ids); with a text prompt give the subject as a substring (prompt "
                        f"{shorten(prompt)})")
    if not isinstance(subject, str) or not subject.strip():
        raise SpanError(f"subject {subject!r} is empty (prompt {shorten(prompt)})")
    tokens, offsets = token_offsets(model, prompt, prepend_bos)
    start = -1
    for _ in range(occurrence + 1):
        start = prompt.find(subject, start + 1)
        if start < 0:
            raise SpanError(f"subject {subject!r} does not occur in prompt {shorten(prompt)}"
                            + (f" {occurrence + 1} times" if occurrence else ""))
    subj = char_span_to_tokens(offsets, start, start + len(subject))
    if subj[1] <= subj[0]:
        raise SpanError(f"subject {subject!r} maps to no token of prompt {shorten(prompt)}")
    rel_end = len(offsets) if include_last else len(offsets) - 1
    rel = (subj[1], max(subj[1], rel_end))
    if rel[1] <= rel[0] and require_relation:
        where = "ends the prompt" if subj[1] == len(offsets) else "is followed only by the last token"
        raise SpanError(f"relation span is empty in prompt {shorten(prompt)}: the subject {subject!r} {where} "
                        f"(include_last={include_last}); relation tracing needs relation words after the subject")
    return PromptSpans(prompt=prompt, tokens=tokens, str_tokens=tuple(cast(list[str], model.to_str_tokens(tokens))),
                       subject=subject, subject_span=subj, relation_span=rel)


def is_token_input(prompt: object) -> bool:
    """Whether ``prompt`` is given as token ids (a 1-D integer tensor, or a list / tuple of ints)
    rather than text."""
    if isinstance(prompt, torch.Tensor):
        return not prompt.is_floating_point() and not prompt.is_complex()
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                     for t in prompt)


def token_ids(model: Model, prompt: object, what: str = "prompt") -> torch.Tensor:
    """``prompt``'s token ids as an ``int64`` tensor ``[pos]``, checked: one dimension (or ``[1, pos]``),
    not empty, every id in the vocabulary."""
    t = torch.as_tensor(prompt).cpu()
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise PromptError(f"{what} given as token ids must be one non-empty sequence [pos], got shape {list(t.shape)}")
    t = t.long()
    bad = (t < 0) | (t >= model.cfg.d_vocab)
    if bad.any():
        raise PromptError(f"{what} holds token ids outside the vocabulary [0, {model.cfg.d_vocab}): "
                          f"{t[bad].tolist()[:5]} at positions {bad.nonzero()[:, 0].tolist()[:5]}")
    return t


def spans_from_tokens(model: Model, prompt: object, subject: object, *, include_last: bool = True,
                      require_relation: bool = True) -> PromptSpans:
    """:func:`find_spans` for a prompt given as token ids: ``subject`` is the subject's half-open
    token span ``(start, end)``; the relation span follows it to the end (as for text). The tokens
    are used as given (no BOS is added); ``prompt`` and ``subject`` of the result are their decoded
    text."""
    tokens = token_ids(model, prompt)
    T = len(tokens)
    try:
        a, b = (int(v) for v in subject)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise SpanError(f"a prompt given as token ids takes subject=(start, end), the subject's token span; got "
                        f"{subject!r}") from None
    str_tokens = tuple(cast(list[str], model.to_str_tokens(tokens)))
    if not 0 <= a < b <= T:
        raise SpanError(f"subject span {(a, b)} is not a non-empty range inside the prompt's {T} tokens {list(str_tokens)}")
    text = str(tokenizer_of(model).decode(tokens.tolist()))
    rel_end = T if include_last else T - 1
    rel = (b, max(b, rel_end))
    if rel[1] <= rel[0] and require_relation:
        raise SpanError(f"relation span is empty in prompt {shorten(text)}: the subject span {(a, b)} leaves no relation "
                        f"tokens after it (include_last={include_last})")
    return PromptSpans(prompt=text, tokens=tokens, str_tokens=str_tokens,
                       subject=str(tokenizer_of(model).decode(tokens[a:b].tolist())), subject_span=(a, b),
                       relation_span=rel)


def right_pad(model: Model, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Stack token sequences into one ``[batch, max_len]`` tensor, padded on the right with the
    tokenizer's pad token. Under causal attention, right padding leaves every real position's
    states as they would be alone, so callers read positions ``< len(seq)`` only."""
    pad_id = tokenizer_of(model).pad_token_id
    pad = pad_id if pad_id is not None else 0
    out = torch.full((len(seqs), max(len(x) for x in seqs)), pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, :len(x)] = x
    return out


def continuation_text(prompt: str, target: str) -> str:
    """How ``target`` is written after ``prompt``, the one convention of tracing, editing and
    evaluation: trailing whitespace dropped; a space put in front (GPT-2 convention, ``" Paris"``)
    unless the target already starts with whitespace or the prompt ends with it."""
    target = target.rstrip()
    if target[:1].isspace() or prompt[-1:].isspace():
        return target
    return " " + target


def object_tokens(model: Model, prompt: str, obj: str) -> torch.Tensor:
    """Tokens of ``obj`` as the continuation of ``prompt`` (:func:`continuation_text`), no BOS.
    Shape ``[n_tokens]``."""
    return model.to_tokens(continuation_text(prompt, obj), prepend_bos=False)[0]
