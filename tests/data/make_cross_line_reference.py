"""Write tests/data/cross_line_reference.json: tests/cross_line.py's numbers under TransformerLens 3.9
(HookedTransformer), for tests/test_cross_line.py to hold the 4.x line (TransformerBridge) to.

    .venv/bin/python tests/data/make_cross_line_reference.py      # in the TransformerLens 3.9 environment
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_line import ARCHS, compute, make_folder  # noqa: E402

import relation_lens as rl  # noqa: E402
from relation_lens.models import default_model_path  # noqa: E402


def main() -> None:
    version = metadata.version("transformer-lens")
    if not version.startswith("3."):
        raise SystemExit(f"the reference is TransformerLens 3.x's; this environment has {version}")
    from transformers import AutoTokenizer

    # the tests' tokenizer fixture (tests/conftest.py): the default model's Hugging Face tokenizer, which
    # adds no BOS, so the folders' models follow that rule (relation_lens.models.tokenization)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    out = {"made_with": {"transformer_lens": version, "transformers": metadata.version("transformers"),
                         "torch": metadata.version("torch")}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            out[arch] = compute(rl.load_model(make_folder(tokenizer, arch, Path(tmp))))
            print(arch, "done")
    from relation_lens.key_statistics import model_fingerprint

    default = rl.load_model()
    out["default_model_fingerprints"] = {str(k): model_fingerprint(default, k) for k in (0, 3, None)}
    path = Path(__file__).with_name("cross_line_reference.json")
    path.write_text(json.dumps(out, indent=0))
    print("wrote", path)


if __name__ == "__main__":
    main()
