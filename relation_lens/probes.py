"""Model probes: what the model predicts for a prompt, the probability of a target, greedy text,
whether it knows a fact. The one place these reads of a model live (editing, evaluation, the data
builders, the CLI and the experiments use them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


@torch.no_grad()
def known_mask(model: Model, prompts: list[str], targets: list[str], batch_size: int = 128) -> list[bool]:
    """Whether the model's top next token after each prompt is the first token of its target."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [model.to_tokens(p)[0].cpu() for p in prompts[i:i + batch_size]]
        logits = model(right_pad(model, ids).to(model.cfg.device))  # right padding: real positions are unaffected
        last = torch.tensor([len(x) - 1 for x in ids], device=logits.device)
        pred = logits[torch.arange(len(ids), device=logits.device), last].argmax(-1).tolist()
        pairs = zip(prompts[i:i + batch_size], targets[i:i + batch_size])
        gold = [int(object_tokens(model, p, t)[0]) for p, t in pairs]
        out += [p == g for p, g in zip(pred, gold)]
    return out
