"""Regenerate tests/data/template_reference.json: the context templates that ROME's and MEMIT's own
code (``get_context_templates`` in kmeng01/rome ``rome/rome_main.py`` and kmeng01/memit
``memit/memit_main.py``, both over ``util/generate.py``'s ``generate_fast``) generate on the default
model's Hugging Face weights after ``torch.manual_seed(0)``.

    python tests/data/make_template_reference.py --rome /path/to/kmeng01/rome --memit /path/to/kmeng01/memit

Not run in CI, and nothing of ROME's or MEMIT's is copied here: the script imports ``generate_fast``
from the checkouts given and writes down what it returns, with ROME's and MEMIT's template rules
(the list comprehensions of their ``get_context_templates``) restated in the two lines marked below.
Run it under transformers 4.x (made with 4.46.3): under transformers 5.x, ``generate_fast``'s
``past_key_values=`` argument is deprecated and not used as the cache, so every step sees only the
newest token and the texts are not what ROME's code produced when it was written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parents[1] / "relation_lens" / "data" / "default_model"
ROME_LENGTHS = [(5, 10), (10, 10)]  # ROME's GPT-2 XL context_template_length_params
MEMIT_SEEDS, MEMIT_LENGTHS = ["The", "Therefore", "Because", "I", "You"], [(10, 5)]  # memit_main.py


def _generate_fast(checkout: Path):
    sys.path.insert(0, str(checkout))
    spec = importlib.util.spec_from_file_location(f"generate_{checkout.name}", checkout / "util" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.pop(0)
    return module.generate_fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rome", type=Path, required=True)
    ap.add_argument("--memit", type=Path, required=True)
    args = ap.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tok.pad_token = tok.eos_token  # as ROME's and MEMIT's experiments set it
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    rome_fast, memit_fast = _generate_fast(args.rome), _generate_fast(args.memit)
    torch.manual_seed(0)
    rome = ["{}"] + [x + ". {}" for x in sum((rome_fast(model, tok, ["<|endoftext|>"], n_gen_per_prompt=n,  # ROME's rule
                                                        max_out_len=length) for length, n in ROME_LENGTHS), [])]
    torch.manual_seed(0)
    memit = [["{}"]] + [[f.replace("{", " ").replace("}", " ") + ". {}"  # MEMIT's rule
                         for f in memit_fast(model, tok, MEMIT_SEEDS, n_gen_per_prompt=n // 5, max_out_len=length)]
                        for length, n in MEMIT_LENGTHS]
    out = {"made_with": {"transformers": transformers.__version__, "torch": torch.__version__, "seed": 0},
           "rome": {"prefix_lengths": ROME_LENGTHS, "templates": rome},
           "memit": {"prefix_lengths": MEMIT_LENGTHS, "seeds": MEMIT_SEEDS, "templates": memit}}
    (HERE / "template_reference.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
