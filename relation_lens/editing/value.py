"""The value step every editing method shares (ROME's ``compute_v``, MEMIT's ``compute_z``): the keys
at the edited layer over the prefixed prompts, and the vector ``delta`` that, added after that layer
at the key token, makes the model predict the new target (Adam on the NLL, ROME's KL term, weight
decay and norm clamp)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relation_lens.editing.prefixes import generate_prefixes, key_position
from relation_lens.editing.requests import UNCHANGED, EditConfig, EditRequest
from relation_lens.errors import EditError, shorten
from relation_lens.guards import frozen_parameters
from relation_lens.model_interface import Model, final_logits, hooked_activations, run_blocks
from relation_lens.spans import (
    check_fits_context,
    object_tokens,
    right_pad,
    token_offsets,
)


@dataclass
class Value:
    """What the value optimisation found for one request at one layer."""
    keys: Tensor  # [prefixed prompt, d_mlp] float64: hook_post at the key token of each prefixed prompt
    k_star: Tensor  # their mean
    k_plain: Tensor  # the unprefixed prompt's
    target_init: Tensor  # the vector delta is added to (MLP output, or residual stream for MEMIT)
    delta: Tensor
    positions: list[int]
    prefixes: list[str]
    history: list[dict]


def optimise_value(model: Model, request: EditRequest, layer: int, key: str, config: EditConfig, init: str = "mlp") -> Value:
    """Steps 1-2 of ROME (and MEMIT's ``compute_z``), shared by all methods: the keys at ``layer`` and the optimised ``delta``
    added after block ``layer`` at the key token. ``init="mlp"``: ``v_init`` is the MLP output there
    (ROME); ``"resid"``: the residual stream after the block (MEMIT's ``target_init``, which its
    clamp and weight decay are relative to)."""
    if key not in ("subject", "relation"):
        raise EditError(f"key {key!r} is not 'subject' (the last subject token) or 'relation' (the last token)")
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
        toks, pos = key_position(model, text, len(head) + request.prompt.index("{}"), request.subject, key, bos)
        check_fits_context(model, text, len(toks) + len(new_ids) - 1, what="prefixed prompt (with the target)",
                           note=UNCHANGED)
        contexts.append(toks)
        positions.append(pos)
        plens.append(len(toks))
    kl_text = config.kl_prompt.format(request.subject)
    kl_toks, kl_pos = key_position(model, kl_text, config.kl_prompt.index("{}"), request.subject,
                                   "subject" if key == "subject" or kl_text.endswith(request.subject) else key, bos)
    hook_post, hook_out = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"
    input_dev = model.cfg.device

    # One forward of the prefixed prompts (with the target's tokens, teacher-forced) and the KL prompt up
    # to the edited layer gives the keys, v_init, and the residual the value optimisation starts from.
    seqs = [torch.cat([c, new_ids[:-1].cpu()]) for c in contexts] + [kl_toks]
    batch = right_pad(model, seqs).to(input_dev)
    with torch.no_grad():
        resid_base, cache = hooked_activations(model, batch, [hook_post, hook_out], layer)

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
            resid = run_blocks(model, resid, layer + 1, L)
        picked = resid[read_rows, read_pos][:, None]  # [reads, 1, d_model]
        logits = final_logits(model, picked)[:, 0]  # final norm, unembed (and soft cap)
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
    return Value(keys, k_star, k_plain, target_init, delta.detach(), positions, prefixes, history)
