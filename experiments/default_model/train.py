"""Train the embedded default model from scratch on the world's fact sentences.

Reads ``relation_lens/data/world`` (written by ``build_world.py``), trains a byte-level BPE
tokenizer and a GPT-2-architecture model on sentences (one per fact and training template, packed 1 to 3 to a sequence), and
writes the Hugging Face folder ``relation_lens/data/default_model/`` (config.json,
model.safetensors, tokenizer files) plus ``metrics.json`` with per-relation accuracy.
Seeded and deterministic on a given machine (CPU, fixed thread count).

    python experiments/default_model/train.py            # about 45 minutes on 2 CPU cores
    python experiments/default_model/train.py --epochs 2 --out /tmp/m   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parents[2]
WORLD = ROOT / "relation_lens" / "data" / "world"
EOT = "<|endoftext|>"


def load_world() -> tuple[list[dict], dict]:
    facts = [json.loads(line) for line in (WORLD / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    relations = json.loads((WORLD / "relations.json").read_text(encoding="utf-8"))
    return facts, relations


def sentences(facts: list[dict], relations: dict, which: str) -> list[tuple[str, str, int]]:
    """(prompt, object, fact_id) for every fact under every template of kind ``which``."""
    out = []
    for f in facts:
        for t in relations[f["relation_id"]][f"{which}_templates"]:
            out.append((t.format(f["subject"]), f["object"], f["fact_id"]))
    return out


def build_tokenizer(texts: list[str], vocab_size: int, out: Path) -> GPT2TokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    tok.save_pretrained(out)
    bpe.save_model(str(out))  # vocab.json + merges.txt too, for tools that want the slow GPT-2 files
    return GPT2TokenizerFast.from_pretrained(out)  # reload: an in-memory wrapper breaks HookedTransformer


@torch.no_grad()
def accuracy(model, tok, items: list[tuple[str, str, int]], batch: int = 256) -> list[bool]:
    model.eval()
    hits = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        ids = [[tok.bos_token_id] + tok.encode(p) for p, _, _ in chunk]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), tok.eos_token_id)
        for j, row in enumerate(ids):
            x[j, :len(row)] = torch.tensor(row)
        logits = model(x).logits
        last = torch.tensor([len(r) - 1 for r in ids])
        pred = logits[torch.arange(len(ids)), last].argmax(-1)
        gold = torch.tensor([tok.encode(" " + o)[0] for _, o, _ in chunk])
        hits += (pred == gold).tolist()
    model.train()
    return hits


def pack(first: list[list[int]], later: list[list[int]], bos: int, n_ctx: int, rng: random.Random
         ) -> list[list[int]]:
    """One epoch of training sequences: every sentence once, in a random order, 1 to 3 sentences per
    sequence after BOS, so the model sees facts both right after BOS and after other text."""
    order = list(range(len(first)))
    rng.shuffle(order)
    seqs, i = [], 0
    while i < len(order):
        k = rng.choice((1, 2, 3))
        seq = [bos] + first[order[i]]
        i += 1
        for _ in range(k - 1):
            if i >= len(order) or len(seq) + len(later[order[i]]) > n_ctx:
                break
            seq += later[order[i]]
            i += 1
        seqs.append(seq)
    return seqs


def measure(model, tok, facts: list[dict], relations: dict) -> dict:
    """Top-1 accuracy on every (fact, training template) and on each held-out template, per relation."""
    train = sentences(facts, relations, "train")
    rel_of = {f["fact_id"]: f["relation_id"] for f in facts}
    n_heldout = len(next(iter(relations.values()))["heldout_templates"])
    per_rel: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for (_, _, fid), h in zip(train, accuracy(model, tok, train)):
        per_rel[rel_of[fid]]["train"].append(h)
    overall = {"train": [h for v in per_rel.values() for h in v["train"]]}
    for i in range(n_heldout):
        items = [(relations[f["relation_id"]]["heldout_templates"][i].format(f["subject"]), f["object"], f["fact_id"])
                 for f in facts]
        hits = accuracy(model, tok, items)
        overall[f"heldout{i}"] = hits
        for (_, _, fid), h in zip(items, hits):
            per_rel[rel_of[fid]][f"heldout{i}"].append(h)
            per_rel[rel_of[fid]]["heldout"].append(h)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "train_template_accuracy": mean(overall["train"]),
        "heldout_template_accuracy": mean([h for i in range(n_heldout) for h in overall[f"heldout{i}"]]),
        "heldout_accuracy_by_template": [mean(overall[f"heldout{i}"]) for i in range(n_heldout)],
        "per_relation": {r: {"name": relations[r]["name"], "n_facts": len(v["heldout0"]), "train": mean(v["train"]),
                             "heldout": mean(v["heldout"]),
                             "heldout_by_template": [mean(v[f"heldout{i}"]) for i in range(n_heldout)]}
                         for r, v in sorted(per_rel.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "relation_lens" / "data" / "default_model")
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    facts, relations = load_world()
    train = sentences(facts, relations, "train")
    args.out.mkdir(parents=True, exist_ok=True)
    texts = [f"{p} {o}." for p, o, _ in train]
    tok = build_tokenizer(texts, args.vocab, args.out)
    first = [tok.encode(t) for t in texts]  # a sentence right after BOS
    later = [tok.encode(" " + t) for t in texts]  # a sentence after another one
    n_ctx = 64

    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_ctx, n_embd=192, n_layer=6, n_head=6,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(texts) / 2 / args.batch)
    total, warmup = steps_per_epoch * args.epochs, 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, step = time.time(), 0
    log = []
    for epoch in range(args.epochs):
        seqs = pack(first, later, tok.bos_token_id, n_ctx, rng)
        order = list(range(len(seqs)))
        rng.shuffle(order)
        # bucket by length inside windows to cut padding, then shuffle the batches
        windows = [sorted(order[i:i + args.batch * 32], key=lambda j: len(seqs[j]))
                   for i in range(0, len(order), args.batch * 32)]
        batches = [w[i:i + args.batch] for w in windows for i in range(0, len(w), args.batch)]
        rng.shuffle(batches)
        total_loss = 0.0
        for b in batches:
            width = max(len(seqs[j]) for j in b)
            x = torch.full((len(b), width), tok.eos_token_id)
            labels = torch.full((len(b), width), -100)
            for r, j in enumerate(b):
                x[r, :len(seqs[j])] = torch.tensor(seqs[j])
                labels[r, :len(seqs[j])] = torch.tensor(seqs[j])
            loss = model(x, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total_loss += loss.item()
            step += 1
        msg = f"epoch {epoch + 1}/{args.epochs} loss {total_loss / len(batches):.4f} ({time.time() - start:.0f}s)"
        if (epoch + 1) % 4 == 0 or epoch + 1 == args.epochs:
            sample = rng.sample(train, min(2000, len(train)))
            msg += f" train-acc {sum(accuracy(model, tok, sample)) / len(sample):.3f}"
        print(msg, flush=True)
        log.append(msg)

    model.save_pretrained(args.out, safe_serialization=True)
    metrics = {
        "seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
        "train_seconds": round(time.time() - start, 1), "n_params": sum(p.numel() for p in model.parameters()),
        "n_facts": len(facts), "n_train_sentences": len(train), **measure(model, tok, facts, relations), "log": log,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("per_relation", "log")}, indent=1))


if __name__ == "__main__":
    main()
