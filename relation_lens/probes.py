"""Model probes: what the model predicts for a prompt, the probability of a target, greedy text,
whether it knows a fact. The one place these reads of a model live (editing, evaluation, the data
builders, the CLI and the experiments use them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from relation_lens.errors import ConfigError, DataError
from relation_lens.model_interface import Model, decode
from relation_lens.spans import object_tokens, right_pad


@torch.no_grad()
def predict(model: Model, prompts: Sequence[str], k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-``k`` next tokens and probabilities for each prompt."""
    out = []
    for p in prompts:
        probs = model(model.to_tokens(p))[0, -1].float().softmax(-1)
        top = probs.topk(k)
        out.append([(decode(model, [int(i)]), float(v)) for v, i in zip(top.values, top.indices)])
    return out


@torch.no_grad()
def target_probs(model: Model, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``exp(mean log P(target tokens | prompt))`` for each (prompt, target) pair, teacher-forced; the
    pairs run in right-padded batches of ``batch_size`` sequences of similar length (causal attention:
    each pair's positions are as they would be alone). A float32 tensor on the CPU."""
    pairs = [(model.to_tokens(p)[0].cpu(), object_tokens(model, p, t).cpu()) for p, t in zip(prompts, targets)]
    out = torch.zeros(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        seqs = [torch.cat([pairs[i][0], pairs[i][1][:-1]]) for i in idx]
        logits = model(right_pad(model, seqs).to(model.cfg.device))
        for row, i in enumerate(idx):
            ctx, tgt = pairs[i]
            logp = logits[row, len(ctx) - 1:len(ctx) - 1 + len(tgt)].float().log_softmax(-1)
            out[i] = logp.gather(1, tgt[:, None].to(logp.device)).mean().exp().cpu()
    return out


@torch.no_grad()
def greedy_generate(model: Model, prompt: str, max_new_tokens: int = 30) -> str:
    toks = model.to_tokens(prompt)[0]
    start = len(toks)
    for _ in range(max_new_tokens):
        if len(toks) >= model.cfg.n_ctx:
            break
        toks = torch.cat([toks, model(toks[None])[0, -1].argmax()[None]])
    return decode(model, toks[start:].tolist())


def _last_token_probs(model: Model, prompts: Sequence[str], batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, probs)`` per batch of ``batch_size`` prompts: the next-token distribution after each
    prompt's last token (``[batch, d_vocab]``, float32), the batch right-padded (real positions are
    unaffected under causal attention)."""
    for i in range(0, len(prompts), batch_size):
        ids = [model.to_tokens(p)[0].cpu() for p in prompts[i:i + batch_size]]
        logits = model(right_pad(model, ids).to(model.cfg.device))
        last = torch.tensor([len(x) - 1 for x in ids], device=logits.device)
        yield i, logits[torch.arange(len(ids), device=logits.device), last].float().softmax(-1)


@torch.no_grad()
def known_mask(model: Model, prompts: list[str], targets: list[str], batch_size: int = 128) -> list[bool]:
    """Whether the model's top next token after each prompt is the first token of its target."""
    out = []
    for i, probs in _last_token_probs(model, prompts, batch_size):
        pairs = zip(prompts[i:i + batch_size], targets[i:i + batch_size])
        gold = [int(object_tokens(model, p, t)[0]) for p, t in pairs]
        out += [int(p) == g for p, g in zip(probs.argmax(-1).tolist(), gold)]
    return out


def fact_pair(rec: Any) -> tuple[str, str]:
    """A fact record of any of the data loaders as ``(prompt, answer)``: a ``(prompt, answer)`` pair, or a
    dict with ``prompt`` (a template with ``{}`` is filled with ``subject``) and ``target``,
    ``target_true``, ``object`` or ``attribute``."""
    if isinstance(rec, (tuple, list)) and len(rec) == 2 and all(isinstance(x, str) for x in rec):
        return rec[0], rec[1]
    if isinstance(rec, dict):
        prompt = rec.get("prompt")
        if isinstance(prompt, str) and "{}" in prompt and isinstance(rec.get("subject"), str):
            prompt = prompt.format(rec["subject"])
        answer = next((rec[k] for k in ("target", "target_true", "object", "attribute") if isinstance(rec.get(k), str)),
                      None)
        if isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip():
            return prompt, answer
    raise DataError(f"fact {rec!r:.100} needs a prompt and an answer: a (prompt, answer) pair or a dict with 'prompt' "
                    "('{}' filled with 'subject') and 'target', 'target_true', 'object' or 'attribute'")


@torch.no_grad()
def known_facts(model: Model, records: Iterable[Any], *, min_prob: float = 0.0, batch_size: int = 128) -> list[dict]:
    """The facts ``model`` gets right, with the probability it gives them.

    A fact is known when the model's top next token after its prompt is the first token of its answer
    (as :func:`known_mask` reads it) and that token's probability is at least ``min_prob``. Works on the
    records of every loader (known_1000, CounterFact, FewRel / LRE cloze prompts, the world's facts)
    and on ``(prompt, answer)`` pairs.

    Returns:
        one dict per known fact, in the input's order: the record's own fields (a pair becomes
        ``prompt`` and ``target``), ``index`` (its position in ``records``) and ``prob``, the
        probability of the answer's first token.
    """
    if not 0.0 <= min_prob <= 1.0 or min_prob != min_prob:
        raise ConfigError(f"min_prob={min_prob!r} must be a probability in [0, 1]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    recs = list(records)
    pairs = [fact_pair(r) for r in recs]
    out = []
    for i, probs in _last_token_probs(model, [p for p, _ in pairs], batch_size):
        for j, (p, a) in enumerate(pairs[i:i + batch_size]):
            gold = int(object_tokens(model, p, a)[0])
            prob = float(probs[j, gold])
            if int(probs[j].argmax()) == gold and prob >= min_prob:
                rec = recs[i + j]
                row = dict(rec) if isinstance(rec, dict) else {"prompt": p, "target": a}
                out.append({**row, "index": i + j, "prob": prob})
    return out
