"""Write relation_lens/data/world/wikipedia_sentences.txt.gz: the 11,200 Wikipedia sentences of FewRel 1.0's
validation split (thunlp/FewRel ``val_wiki.json``, MIT, FewRel-LICENSE), one a line, detokenised. Key
statistics (``C = E[k kᵀ]``) are taken over them on every model but the embedded one, as ROME takes them
over Wikipedia text. Reads ../shared/data/fewrel/val_wiki.json."""

import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
data = json.loads((ROOT.parent / "shared" / "data" / "fewrel" / "val_wiki.json").read_text())


def detokenise(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = re.sub(r" - ", "-", text)
    text = text.replace("`` ", '"').replace(" ''", '"')
    return text


# one line a sentence: whitespace inside a token (a few hold line breaks) becomes a space
lines = [" ".join(detokenise(inst["tokens"]).split()) for rel in sorted(data) for inst in data[rel]]
out = ROOT / "relation_lens" / "data" / "world" / "wikipedia_sentences.txt.gz"
with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
    # mtime fixed so that the file is byte-identical on every run
    f.write(("\n".join(lines) + "\n").encode("utf-8"))
print(f"wrote {len(lines)} sentences to {out} ({out.stat().st_size} bytes)")
