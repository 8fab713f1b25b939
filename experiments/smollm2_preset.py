"""SmolLM2-135M's editing preset, made by rl.locate and rl.tune on the model itself.

Steps (each writes its file under ``results/smollm2-135m/`` and is skipped when the file is there, so a
killed run continues where it stopped; ``tune`` also checkpoints every trial):

1. ``known_counterfact.json``: the CounterFact records (../shared/data/rome/counterfact-train.json) whose
   true object SmolLM2 predicts at top-1 (``rl.known_facts``), with its probability; split by a seeded
   shuffle into the tuning split (``--n-tune``), the evaluation records (``--n-eval``) and the rest,
   held out for the tests (``splits.json``).
2. ``known_facts.json``: known_1000's facts the model knows; ``locate_<method>.json``: ``rl.locate`` for
   ROME (subject corrupted, MLPs at the last subject token) and relation-ROME (relation corrupted, MLPs
   at the last token), over ``--n-locate`` of them.
3. ``tune_<method>.json``: ``rl.tune`` from the depth-scaled defaults (the start), its layer candidates
   from locate, on the tuning split.
4. ``evaluate_<method>.json``: the depth-scaled defaults and tune's settings on the same evaluation
   records (each record checkpointed as it is measured), ROME's Score (ES, PS, NS; CounterFact has no relation prompts) and its paired bootstrap
   difference; ``preset.md`` the summary, with the machine, date and run time.

The library ships tune's settings (``relation_lens.presets.SMOLLM2``; tests/test_presets.py checks they
agree with ``tune_<method>.json``).

    python experiments/smollm2_preset.py                    # the whole run (hours on 2 CPU cores)
    python experiments/smollm2_preset.py --limit 2          # a quick run (the test): 2 records a split
    python experiments/smollm2_preset.py --report           # rebuild preset.md from the files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import relation_lens as rl  # noqa: E402
from relation_lens import presets  # noqa: E402
from relation_lens.data.loaders import load_counterfact, load_known  # noqa: E402
from relation_lens.editing import EditConfig  # noqa: E402
from relation_lens.results import json_safe  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rome"
METHODS = ("relation_rome", "rome")


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=1))
    os.replace(tmp, path)


def machine() -> str:
    """The machine a result was made on, as the experiments' run files record it."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def step(path: Path, make):
    """``path``'s content, made by ``make()`` (and written) when the file is not there yet."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    data = make()
    data["seconds"] = time.perf_counter() - t0
    write(path, data)
    return data


def known_counterfact(model, limit: int | None = None) -> dict:
    records = list(load_counterfact(SHARED / "counterfact-train.json", limit=limit))
    known = rl.known_facts(model, records)
    return {"source": "counterfact-train.json", "n_records": len(records),
            "known": [{"case_id": k["case_id"], "prob": k["prob"]} for k in known]}


def splits(known: dict, n_tune: int, n_eval: int, seed: int = 0) -> dict:
    ids = [k["case_id"] for k in known["known"]]
    random.Random(seed).shuffle(ids)
    return {"seed": seed, "tuning": sorted(ids[:n_tune]), "evaluation": sorted(ids[n_tune:n_tune + n_eval]),
            "held_out": sorted(ids[n_tune + n_eval:])}


def records_by_id(ids) -> list[dict]:
    want = set(ids)
    return [dict(r) for r in load_counterfact(SHARED / "counterfact-train.json") if r["case_id"] in want]


def known_facts(model, limit: int | None = None) -> dict:
    facts = list(load_known(SHARED / "known_1000.json"))[:limit]
    known = rl.known_facts(model, facts)
    return {"source": "known_1000.json", "n_records": len(facts),
            "known": [{"known_id": k["known_id"], "prompt": k["prompt"], "subject": k["subject"],
                       "target": k["target"], "prob": k["prob"]} for k in known]}


def locate_step(model, facts: list[dict], method: str, n_samples: int, out: Path) -> dict:
    res = rl.locate(model, facts, method=method, n_samples=n_samples, keep_trace=False,
                    checkpoint=out / f"locate_{method}_checkpoint")
    return {"method": method, "layers": list(res.layers), "peak": res.peak, "global_peak": res.global_peak,
            "significant": res.significant, "effect": res.effect.tolist(), "ci95": res.ci95.tolist(),
            "n_used": res.n_used, "token": res.token, "corrupt": res.corrupt, "n_samples": n_samples}


def tune_step(model, method: str, tuning: list[dict], evaluation: list[dict], located: dict, budget: int,
              out: Path) -> dict:
    # the layers to try: locate's peak(s) and the global peak, beside the depth-scaled start
    layers = sorted({located["peak"], located["global_peak"], *located["layers"],
                     presets.depth_scaled(model.cfg.n_layers).layers[method]})
    res = rl.tune(model, tuning, method=method, budget=budget, space={"layer": layers},
                  evaluation_records=evaluation, checkpoint=out / f"tune_{method}_checkpoint")
    return {"method": method, "params": res.params, "best": res.best, "start": res.start,
            "trials": list(res.trials), "layers_tried": layers}


def evaluate_step(model, method: str, records: list[dict], tuned: dict, start: dict, out_dir: Path) -> dict:
    out: dict = {}
    results = {}
    for name, params in (("depth_scaled", start), ("tuned", tuned)):
        config = EditConfig.default_for(model, method, **{k: params[k] for k in presets.EDIT_FIELDS if k in params})
        res = rl.evaluate(model, records, method=method, layer=int(params["layer"]), config=config, fluency=False,
                          checkpoint=out_dir / f"evaluate_{method}_{name}_checkpoint")
        results[name] = res
        out[name] = {"params": params, "summary": res.summary, "records": list(res.records)}
    d = rl.score_difference(results["tuned"], results["depth_scaled"], metric="Score")
    out["difference"] = {"difference": d.difference, "low": d.low, "high": d.high, "n": d.n_records}
    return out


def report(out: Path) -> str:
    lines = ["# SmolLM2-135M's editing preset (rl.locate + rl.tune on the model)", ""]
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    if meta:
        lines += [f"Machine: {meta.get('machine')}; date {meta.get('date')}; torch threads {meta.get('threads')}.", ""]
    if (out / "splits.json").is_file():
        sp = json.loads((out / "splits.json").read_text())
        kc = json.loads((out / "known_counterfact.json").read_text())
        lines += [f"CounterFact records the model knows (top-1 true object): {len(kc['known'])} of {kc['n_records']} "
                  f"({kc['seconds']:.0f} s); tuning split {len(sp['tuning'])}, evaluation {len(sp['evaluation'])}, "
                  f"held out for the tests {len(sp['held_out'])} (seeded shuffle, seed {sp['seed']}).", ""]
    for method in METHODS:
        f = out / f"locate_{method}.json"
        if f.is_file():
            loc = json.loads(f.read_text())
            e, h = loc["effect"], loc["ci95"]
            lines += [f"## {method}", "",
                      f"locate ({loc['corrupt']} corrupted, MLP at the {loc['token']}, {loc['n_used']} known_1000 facts, "
                      f"{loc['n_samples']} noise samples, {loc['seconds']:.0f} s): rule's layers {loc['layers']} "
                      f"(peak {loc['peak']}: {e[loc['peak']]:.4f} ± {h[loc['peak']]:.4f}); global peak "
                      f"{loc['global_peak']} ({e[loc['global_peak']]:.4f} ± {h[loc['global_peak']]:.4f}); "
                      f"{'every chosen interval excludes zero' if loc['significant'] else 'an interval includes zero'}.",
                      ""]
        f = out / f"tune_{method}.json"
        if f.is_file():
            tu = json.loads(f.read_text())
            lines += [f"tune ({len(tu['trials'])} trials, {tu['seconds'] / 60:.0f} min, layers tried "
                      f"{tu['layers_tried']}): start {tu['start']}, chosen {tu['params']} (tuning Score "
                      f"{tu['best']:.1f}).", ""]
        f = out / f"evaluate_{method}.json"
        if f.is_file():
            ev = json.loads(f.read_text())
            lines += ["| settings | Score (ES, PS, NS) | ES | PS | NS |", "|---|---|---|---|---|"]
            for name in ("depth_scaled", "tuned"):
                s = ev[name]["summary"]
                lines.append(f"| {name} | {s['Score'][0]:.1f} | {s['ES'][0]:.1f} | {s['PS'][0]:.1f} | {s['NS'][0]:.1f} |")
            d = ev.get("difference")
            if d:
                lines += ["", f"tuned − depth-scaled: {d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] (paired "
                          f"bootstrap 95%, {d['n']} records); {ev['seconds'] / 60:.0f} min.", ""]
    text = "\n".join(lines) + "\n"
    (out / "preset.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "smollm2-135m")
    p.add_argument("--n-tune", type=int, default=30)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--n-locate", type=int, default=60)
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="quick run: this many records per split and facts")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.report:
        print(report(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limit:
        args.n_tune = args.n_eval = args.limit
        args.n_locate, args.n_samples, args.budget = max(2, args.limit), 2, 2
    t0 = time.perf_counter()
    model = rl.load_model("smollm2-135m")
    out = args.out
    write(out / "run.json", {"machine": machine(),
                             "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                             "args": {k: str(v) for k, v in vars(args).items()}})
    kc = step(out / "known_counterfact.json", lambda: known_counterfact(model, args.limit and 300))
    sp = step(out / "splits.json", lambda: splits(kc, args.n_tune, args.n_eval))
    tuning, evaluation = records_by_id(sp["tuning"]), records_by_id(sp["evaluation"])
    kf = step(out / "known_facts.json", lambda: known_facts(model, args.limit and 100))
    facts = [{"prompt": k["prompt"], "subject": k["subject"], "target": k["target"]} for k in kf["known"]]
    facts = facts[:args.n_locate]
    for method in args.methods:
        loc = step(out / f"locate_{method}.json", lambda: locate_step(model, facts, method, args.n_samples, out))
        tu = step(out / f"tune_{method}.json",
                  lambda: tune_step(model, method, tuning, evaluation, loc, args.budget, out))
        step(out / f"evaluate_{method}.json", lambda: evaluate_step(model, method, evaluation, tu["params"], tu["start"], out))
        print(report(out), flush=True)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
