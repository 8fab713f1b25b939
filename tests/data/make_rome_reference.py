"""Regenerate tests/data/rome_reference.*: reference numbers produced by ROME's own code
(kmeng01/rome, ``rome/rome_main.py``'s ``execute_rome``) on the default model's Hugging Face weights.

    python tests/data/make_rome_reference.py --rome /path/to/kmeng01/rome

Not run in CI. It imports ROME from the checkout given (nothing of ROME's is copied here) and gives
both implementations the same inputs: the same requests, the same context templates (generated
once by relation_lens and handed to ROME's ``CONTEXT_TEMPLATES_CACHE``), and the same key
statistics (``KeyStatistics`` over a fixed corpus, no BOS, as ROME's ``layer_stats``; ROME's
``get_inv_cov`` is replaced by the inverse of that matrix, which it then casts to float32 as it
does its own). ROME's code hard-codes ``"cuda"``; on a CPU the script maps that device to the CPU.

Both sides run in float64 (the model, ROME's optimisation variable, the statistics), and relation_lens'
model is loaded with ``center_writing_weights=False``, so the comparison is of formulas, not of float32
rounding nor of TransformerLens' weight processing: centring the MLP's output weights changes the norm of
the MLP output by ~3e-6 relative, hence ROME's weight decay and clamp radius, which moves an update whose
clamp binds by ~1e-4.

The fixture holds figures only: for each request and method, ROME's left vector ``u`` (unit
norm), right vector, and P(target_new) on the edit prompt after the update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
N_REQUESTS = 5
STATS_TEXTS = 2000
# method -> (layer, ROME's fact_token). Only ROME's own setting: with fact_token="last" (what relation-ROME
# would need) ROME's compute_v indexes position -1 of right-padded batches, a pad token in every row shorter
# than the longest (docs/editing.md), so its "last" updates are not a reference for anything.
SETUPS = {"rome": (1, "subject_last")}
# causal tracing: ROME's experiments/causal_trace.py (calculate_hidden_flow) on three world facts, the subject
# corrupted with a fixed noise tensor that both implementations add
TRACE_PROMPTS = [("Germany is located in the continent of", "Germany"),
                 ("The capital of Japan is", "Japan"),
                 ("Vinson Massif is located in the continent of", "Vinson Massif")]
TRACE_SAMPLES, TRACE_WINDOW = 3, 3


def reference_inputs(model):
    """The requests, templates and statistics both implementations get (the test rebuilds them)."""
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.editing import EditConfig, EditRequest, generate_prefixes
    from relation_lens.key_statistics import KeyStatistics

    rows = list(load_counterfactual())[:N_REQUESTS]
    requests = [EditRequest(r["prompt"], r["subject"], r["target_new"], target_true=r["target_true"]) for r in rows]
    prefixes = generate_prefixes(model, EditConfig.rome())
    stats = {m: KeyStatistics.compute(model, layer, n_texts=STATS_TEXTS, prepend_bos=False, cache=False,
                                      progress=False) for m, (layer, _) in SETUPS.items()}
    return requests, prefixes, stats


def gpt2_xl_hparams(ROMEHyperParams, layer: int, fact_token: str, n_layer: int):
    """ROME's hparams/ROME/gpt2-xl.json with the edited layer, the key token rule and the loss layer
    (the last) of the model at hand."""
    return ROMEHyperParams(
        layers=[layer], fact_token=fact_token, v_num_grad_steps=20, v_lr=0.5, v_loss_layer=n_layer - 1,
        v_weight_decay=0.5, clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=True,
        context_template_length_params=[[5, 10], [10, 10]], rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        layer_module_tmp="transformer.h.{}", mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f", lm_head_module="transformer.wte",
        mom2_dataset="wikipedia", mom2_n_samples=100000, mom2_dtype="float32")


def _cuda_to_cpu():
    """ROME's code says "cuda" everywhere; send it to the CPU instead."""
    import transformers

    def fix(dev):
        return "cpu" if isinstance(dev, str) and dev.startswith("cuda") else dev

    tensor_to, enc_to = torch.Tensor.to, transformers.BatchEncoding.to
    torch.Tensor.to = lambda self, *a, **k: tensor_to(self, *[fix(x) for x in a], **{n: fix(v) for n, v in k.items()})
    transformers.BatchEncoding.to = lambda self, dev: enc_to(self, fix(dev))
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for name in ("zeros", "tensor"):
        orig = getattr(torch, name)
        setattr(torch, name, (lambda orig: lambda *a, **k: orig(*a, **{n: fix(v) for n, v in k.items()}))(orig))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rome", type=Path, required=True, help="a checkout of kmeng01/rome")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    import relation_lens as rl
    from relation_lens.models import default_model_path

    tl_model = rl.load_model(dtype="float64", center_writing_weights=False)  # MLP outputs as HF computes them
    requests, prefixes, stats = reference_inputs(tl_model)

    rome_root = args.rome.resolve()
    os.chdir(rome_root)  # ROME reads globals.yml from the working directory
    sys.path.insert(0, str(rome_root))
    _cuda_to_cpu()
    from rome import compute_u as rome_u
    from rome import rome_main
    from rome.rome_hparams import ROMEHyperParams

    torch.set_default_dtype(torch.float64)  # ROME's delta is created with the default dtype
    hf = GPT2LMHeadModel.from_pretrained(default_model_path(), torch_dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.pad_token = tok.eos_token
    rome_main.CONTEXT_TEMPLATES_CACHE = list(prefixes)
    tensors, meta = {}, {"requests": [], "prefixes": prefixes, "stats_texts": STATS_TEXTS, "setups": {}}
    for method, (layer, fact_token) in SETUPS.items():
        inv = torch.inverse(stats[method].moment)  # ROME inverts (then casts to float32; float64 here)
        rome_u.get_inv_cov = lambda *a, inv=inv, **k: inv
        hp = gpt2_xl_hparams(ROMEHyperParams, layer, fact_token, hf.config.n_layer)
        meta["setups"][method] = {"layer": layer, "fact_token": fact_token}
        for i, req in enumerate(requests):
            request = {"prompt": req.prompt, "subject": req.subject, "target_new": {"str": req.target_new}}
            deltas = rome_main.execute_rome(hf, tok, request, hp)
            (u, v), = deltas.values()
            w = hf.transformer.h[layer].mlp.c_proj.weight
            with torch.no_grad():
                saved = w.detach().clone()
                w += torch.outer(u, v)
                ids = tok(req.text, return_tensors="pt")["input_ids"]
                new_id = tok(" " + req.target_new)["input_ids"][0]
                p_new = hf(ids).logits[0, -1].softmax(-1)[new_id].item()
                w.copy_(saved)
            tensors[f"{method}.{i}.u"], tensors[f"{method}.{i}.right"] = u.detach(), v.detach()
            meta["setups"][method][f"p_new.{i}"] = p_new
    meta["requests"] = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                         "target_true": r.target_true} for r in requests]
    tensors.update(trace_reference(hf, tok, meta))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / "rome_reference.safetensors"))
    (HERE / "rome_reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    print(f"wrote {len(tensors)} vectors for {len(requests)} requests x {len(SETUPS)} methods to {HERE}")


def trace_reference(hf, tok, meta) -> dict:
    """Grids of ROME's calculate_hidden_flow (float32, as ROME runs it) for TRACE_PROMPTS."""
    import types

    sys.modules.setdefault("dsets", types.SimpleNamespace(KnownsDataset=None))  # not needed, imports scipy
    from experiments import causal_trace as ct

    torch.set_default_dtype(torch.float32)
    hf = hf.float()
    mt = ct.ModelAndTokenizer(model=hf, tokenizer=tok)
    out, meta["trace"] = {}, []
    gen = torch.Generator().manual_seed(0)
    for i, (prompt, subject) in enumerate(TRACE_PROMPTS):
        inp = ct.make_inputs(tok, [prompt])
        span = ct.find_token_range(tok, inp["input_ids"][0], subject)
        noise = torch.randn(TRACE_SAMPLES, span[1] - span[0], hf.config.n_embd, generator=gen) * 0.25
        grids = {}
        for kind, name in ((None, "resid"), ("mlp", "mlp"), ("attn", "attn")):
            r = ct.calculate_hidden_flow(mt, prompt, subject, samples=TRACE_SAMPLES, noise=lambda x, n=noise: n,
                                         window=TRACE_WINDOW, kind=kind)
            grids[name] = r["scores"].float().T  # ROME's [pos, layer] -> [layer, pos]
            answer, low, high = r["answer"], float(r["low_score"]), float(r["high_score"])
        for name, g in grids.items():
            out[f"trace.{i}.{name}"] = g.contiguous()
        out[f"trace.{i}.noise"] = noise
        meta["trace"].append({"prompt": prompt, "subject": subject, "tokens": inp["input_ids"][0].tolist(),
                              "subject_range": list(span), "answer": answer, "corrupted": low, "clean": high,
                              "samples": TRACE_SAMPLES, "window": TRACE_WINDOW})
    return out


if __name__ == "__main__":
    main()
