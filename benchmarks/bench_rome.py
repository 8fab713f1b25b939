"""relation_lens against ROME's own code, side by side in one process, on the default model.

    python benchmarks/bench_rome.py --rome /path/to/kmeng01/rome [--repeats 5] [--write docs/benchmarks.md]

Two rows, each timing both implementations on the same inputs, alternating runs, median of repeats:

1. one edit with cached statistics: ``compute_edit(EditConfig.rome(prefixes=...))`` against ROME's
   ``execute_rome`` (its ``get_inv_cov`` handed the same inverse, its context templates the same
   prefixes), on the five requests of tests/data/rome_reference.json;
2. key statistics over the same texts: ``KeyStatistics.compute(cache=False)`` against ROME's
   ``layer_stats`` (its dataset replaced by the same texts; no download, a fresh cache folder).

ROME's code is imported from the checkout given (nothing of it is copied here); its hard-coded
"cuda" is mapped to the CPU as in tests/data/make_rome_reference.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rome", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from make_rome_reference import _cuda_to_cpu, gpt2_xl_hparams
    from transformers import AutoTokenizer, GPT2LMHeadModel

    import relation_lens as rl
    from relation_lens.editing import EditConfig, EditRequest, compute_edit
    from relation_lens.key_statistics import _texts, default_corpus
    from relation_lens.models import default_model_path

    meta = json.loads((ROOT / "tests" / "data" / "rome_reference.json").read_text())
    model = rl.load_model()
    texts = _texts(default_corpus(), args.texts)
    stats = rl.KeyStatistics.compute(model, args.layer, texts, n_texts=None, prepend_bos=False, cache=False,
                                     progress=False)
    requests = [EditRequest(r["prompt"], r["subject"], r["target_new"], target_true=r["target_true"])
                for r in meta["requests"]]
    config = EditConfig.rome(prefixes=tuple(meta["prefixes"]))

    rome_root = args.rome.resolve()
    here = os.getcwd()
    os.chdir(rome_root)
    sys.path.insert(0, str(rome_root))
    _cuda_to_cpu()
    from rome import compute_u as rome_u
    from rome import layer_stats as rome_ls
    from rome import rome_main
    from rome.rome_hparams import ROMEHyperParams

    os.chdir(here)
    hf = GPT2LMHeadModel.from_pretrained(default_model_path()).eval()
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.pad_token = tok.eos_token
    rome_main.CONTEXT_TEMPLATES_CACHE = list(meta["prefixes"])
    inv = torch.inverse(stats.moment).float()
    rome_u.get_inv_cov = lambda *a, **k: inv
    hp = gpt2_xl_hparams(ROMEHyperParams, args.layer, "subject_last", hf.config.n_layer)

    def ours_edit(req):
        return compute_edit(model, req, method="rome", layer=args.layer, stats=stats, config=config)

    def rome_edit(req):
        request = {"prompt": req.prompt, "subject": req.subject, "target_new": {"str": req.target_new}}
        return _quiet(rome_main.execute_rome, hf, tok, request, hp)

    ours_t, rome_t = [], []
    for _ in range(args.repeats):
        for req in requests:
            ours_t.append(_timed(lambda: ours_edit(req)))
            rome_t.append(_timed(lambda: rome_edit(req)))
    edit_row = (statistics.median(ours_t), statistics.median(rome_t))

    import datasets

    rome_ls.load_dataset = lambda *a, **k: {"train": datasets.Dataset.from_dict({"text": texts})}
    layer_name = f"transformer.h.{args.layer}.mlp.c_proj"

    def rome_stats():
        with tempfile.TemporaryDirectory() as d:
            return _quiet(rome_ls.layer_stats, hf, tok, layer_name, d, "wikipedia", ["mom2"], sample_size=None,
                          precision="float32", download=False, progress=lambda x, **k: x)

    def ours_stats():
        return rl.KeyStatistics.compute(model, args.layer, texts, n_texts=None, prepend_bos=False, cache=False,
                                        progress=False)

    s_ours, s_rome = [], []
    for _ in range(args.repeats):
        s_ours.append(_timed(ours_stats))
        s_rome.append(_timed(rome_stats))
    stats_row = (statistics.median(s_ours), statistics.median(s_rome))
    check = rome_stats().mom2.moment().double()
    rel = float((check - stats.moment).abs().max() / stats.moment.abs().max())

    from _report import emit, machine

    lines = [
        "## Against ROME's code", "",
        f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; default model, layer {args.layer}, medians of "
        f"{args.repeats} alternating runs in one process (`benchmarks/bench_rome.py --rome CHECKOUT`).",
        "",
        "| workload | relation_lens (s) | ROME's code (s) | ROME / relation_lens |",
        "|---|---|---|---|",
        f"| one edit, cached statistics (5 requests, 21 contexts, 20 steps) | {edit_row[0]:.3f} | {edit_row[1]:.3f} "
        f"| {edit_row[1] / edit_row[0]:.2f}x |",
        f"| key statistics, {len(texts)} texts (ROME's float32 moment agrees to {rel:.1e} relative) | "
        f"{stats_row[0]:.3f} | {stats_row[1]:.3f} | {stats_row[1] / stats_row[0]:.2f}x |",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
