"""Where an edit reads its keys: the context prefixes (ROME's and MEMIT's template rules, as their
code generates them) and the key token of each prefixed prompt."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch
from torch import Tensor

from relation_lens.editing.requests import EditConfig, EditRequest
from relation_lens.errors import SpanError, shorten
from relation_lens.model_interface import Model, tokenizer_of
from relation_lens.spans import char_span_to_tokens, token_offsets


def key_position(model: Model, text: str, subject_start: int, subject: str, key: str,
                 prepend_bos: bool | None = None) -> tuple[Tensor, int]:
    """``(tokens, position)`` of the key token in ``text``, whose subject starts at character
    ``subject_start``: the last subject token (``key="subject"``: ROME, MEMIT) or the last token,
    which must be a relation token after the subject (``key="relation"``: relation-ROME and -MEMIT)."""
    tokens, offsets = token_offsets(model, text, prepend_bos)
    span = char_span_to_tokens(offsets, subject_start, subject_start + len(subject))
    if span[1] <= span[0]:
        raise SpanError(f"subject {subject!r} maps to no token of prompt {shorten(text)}")
    if key == "subject":
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
def generate_prefixes(model: Model, config: EditConfig) -> list[str]:
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
    if config.prefixes is not None:
        return list(config.prefixes)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    tok = tokenizer_of(model)
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


def key_rows(model: Model, requests: Sequence[EditRequest], key: str, prefixes: Sequence[str],
             config: EditConfig) -> tuple[list, list]:
    """Tokenise once what MEMIT's ``compute_ks`` reads: per request and context template, ``(tokens,
    key position, request index, context type)`` (type 0 the plain prompt, then one per group of
    generated prefixes); and the plain prompts' ``(tokens, key position)``."""
    groups, start = [(0, 1)], 1
    for count in prefix_counts(config) if config.prefixes is None else (len(prefixes) - 1,):
        if count:
            groups.append((start, start + count))
        start += count
    rows, plain = [], []
    for j, request in enumerate(requests):
        for g, (a, b) in enumerate(groups):
            for prefix in prefixes[a:b]:
                head = prefix.replace("{}", "")
                toks, pos = key_position(model, head + request.text, len(head) + request.prompt.index("{}"),
                                         request.subject, key, config.prepend_bos)
                rows.append((toks, pos, j, g))
                if g == 0:
                    plain.append((toks, pos))
    return rows, plain
