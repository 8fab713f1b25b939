"""Sequential editing: N edits in a row on one model, without undoing in between, for ROME, r-ROME,
relation-ROME, MEMIT and relation-MEMIT (one request per step), each with and without AlphaEdit's
projection.

The requests are the first N records of the shipped counterfactual relation dataset outside its
tuning split (``evaluation_records``; 1,000 of its 1,030). After 10, 100, 500 and 1,000 edits (those
up to N) it measures, over the records edited so far, the evaluation's CounterFact metrics
(``relation_lens.evaluation.records_metrics``):

* ES: the edited prompt prefers the new object to the true one;
* PS: so do its paraphrases;
* NS: neighbourhood prompts (other subjects, same relation and true object) keep the true object;
* RS: the edited subject's other relations keep their answers;

plus the untouched-fact accuracy (top-1, on facts of subjects never edited that the unedited model
gets right) and the total change of the edited MLP output matrices, ||dW|| / ||W||; then undoes
every edit in reverse order and checks the model is restored bit for bit.

As ROME's and MEMIT's code (their ``CONTEXT_TEMPLATES_CACHE``), the self-generated context prefixes are
generated once, on the unedited model, and used for every edit of a sequence.

Each variant's rows are written to ``results/sequential/<variant>.json``; every run then rebuilds the
table (``sequential_edits.md``) and the figure (``sequential_edits.png``: accuracy vs number of edits,
one line per variant) from all the variants there. Run the variants one at a time on the 2-core
CPU (two side by side with ``--threads 1`` each were slower in all: ROME at 2.3 s an edit each,
against 0.8 s alone); each variant at 1,000 edits takes under 30 minutes:

    python experiments/sequential_edits.py --methods ROME --alpha off [--n 1000]
    python experiments/sequential_edits.py --report          # table and figure from what is there
    python experiments/sequential_edits.py --limit 3         # quick run of all ten (the test)
    python experiments/sequential_edits.py --methods ROME,r-ROME --alpha on --tuned   # rl.tune's settings

With ``--tuned`` each variant's settings come from ``rl.tune`` run first with the sequence objective
(the harmonic mean of the Score after ``--tune-sequence`` edits of the tuning split, records 400-429,
and the accuracy on 100 untouched facts kept apart from the evaluation's); its result is written to
``results/tune/sequence_<variant>.json`` / ``.md`` and the rows are labelled "(tuned)". That search
starts from the library's defaults (``relation_lens.presets``, tune's single-edit choices included);
the untuned variants use the hand-made presets (``presets.hand_made()``), as the table was made.
``--tuned-from results/tune`` reuses an earlier search's ``sequence_<variant>.json`` instead: the
1,000-edit tuned rows were run so, with the settings searched for the 100-edit run. The tuning
split (records 400-429) is outside the evaluation records either way, but that search's 100
untouched facts were kept apart from the 100-edit run's untouched facts, not the 1,000-edit run's,
so a few of them may be among the facts the 1,000-edit rows measure.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import relation_lens as rl
from relation_lens import presets
from relation_lens.batch_editing import Preserve, batch_defaults, memit_config
from relation_lens.data import World, load_world
from relation_lens.data.counterfact import TUNING_SPLIT, build_counterfactual, evaluation_records, load_counterfactual
from relation_lens.editing import EditConfig, default_layer, generate_prefixes, request_of
from relation_lens.evaluation import records_metrics
from relation_lens.probes import known_mask

OUT = Path(__file__).resolve().parent / "results"
VARIANTS = {"ROME": ("rome", "asymmetric"), "r-ROME": ("rome", "symmetric"),
            "relation-ROME": ("relation_rome", "symmetric"), "MEMIT": ("memit", None),
            "relation-MEMIT": ("relation_memit", None)}
# A search continued from the 30-edit one (--tune-start) on longer sequences searches these (each trial
# is 3x longer; () keeps a setting at its start): AlphaEdit's threshold and the layer stay where the
# 30-edit search put them (there, thresholds under 0.02 stopped every edit or most, and layer 0 lost
# most edits: results/tune/sequence_*.md; tune takes no empty layer list, so the start's layer is
# given), and the three settings that trade edits for preservation get three values each.
LONG_SPACE = {"threshold": (), "l2": (10.0, 1.0, 0.1), "v_weight_decay": (0.01, 0.05, 0.1),
              "clamp_norm_factor": (2.0, 4.0, 10.0), "v_steps": ()}


def accuracy(model, prompts, objects) -> float:
    if not prompts:
        return float("nan")
    return sum(known_mask(model, prompts, objects)) / len(prompts)


def make_requests(n: int):
    """(record, EditRequest) for the first ``n`` evaluation records."""
    return [(rec, rl.EditRequest(rec["prompt"], rec["subject"], rec["target_new"], rec["target_true"]))
            for rec in evaluation_records(n=n)]


def untouched_facts(model, world, reqs, n: int, seed: int = 1):
    """``n`` facts of subjects no request edits, that the unedited model gets right (top-1)."""
    edited = {r.subject for _, r in reqs}
    pool = [f for f in world if f.subject not in edited]
    random.Random(seed).shuffle(pool)
    pool = pool[:3 * n]
    known = known_mask(model, [f.prompt(0) for f in pool], [f.object for f in pool])
    return [f for f, k in zip(pool, known) if k][:n]


def measure(model, done, untouched) -> dict:
    """Mean CounterFact metrics over the records in ``done``, and the untouched-fact accuracy."""
    per = records_metrics(model, [rec for rec, _ in done])
    mean = {m: (sum(x[m] for x in per if m in x) / n if (n := sum(m in x for x in per)) else float("nan"))
            for m in ("ES", "PS", "NS", "RS")}
    return {**mean, "untouched": accuracy(model, [g.prompt(0) for g in untouched], [g.object for g in untouched])}


def run(model, reqs, untouched, name, alpha, checkpoints, stats_for, tuned=None):
    """One variant's sequence; its rows (one per checkpoint, the first at 0 edits). ``tuned``: a
    :class:`~relation_lens.TuneResult` whose settings replace the presets (the variant named "(tuned)")."""
    method, key_mode = VARIANTS[name]
    batch = method.endswith("memit")
    if tuned is not None:
        kw = tuned.edit_kwargs()
        layers, config, lam, preserve = tuned.layers, kw["config"], kw.get("mom2_update_weight"), tuned.preserve
    else:  # the hand-made presets, as section 5 of docs/experiments.md was made
        with presets.hand_made():
            if batch:  # ROME's template rule
                layers, config, lam = batch_defaults(model, method, None, memit_config(prefix_seeds=None), None)
            else:
                layers, config, lam = (default_layer(model, method, reqs[0][1]),), \
                    EditConfig.default_for(model, key_mode=key_mode), None
            preserve = Preserve.default_for(model)
    preserve = preserve if alpha else None
    stats = {l: stats_for(l) for l in layers}
    prefixes = generate_prefixes(model, config)  # once, on the unedited model (ROME's template cache)
    W0 = {l: model.blocks[l].mlp.W_out.detach().clone() for l in layers}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    variant = name + (" + AlphaEdit" if alpha else "") + (" (tuned)" if tuned is not None else "")
    # row 0: the unedited model on every request of the sequence (ES/PS: the new objects it already gives)
    rows = [{"variant": variant, "edits": 0, "applied": 0, **measure(model, reqs, untouched), "w_change": 0.0,
             "s_per_edit": float("nan")}]
    edits, done, skipped, spent = [], [], 0, 0.0
    for i, (fact, req) in enumerate(reqs, 1):
        t0 = time.perf_counter()
        try:
            if batch:
                upd = rl.compute_edit(model, [req], method=method, layers=layers, stats=stats, config=config,
                                      mom2_update_weight=lam, preserve=preserve, prefixes=prefixes)
            else:
                upd = rl.compute_edit(model, req, method=method, layer=layers[0], stats=stats[layers[0]],
                                      config=config, preserve=preserve, prefixes=prefixes)
            edits.append(rl.apply_edit(model, upd))
            done.append((fact, req))
            if preserve is not None:
                preserve.remember(upd)
        except (rl.EditError, rl.SpanError, torch.linalg.LinAlgError):
            skipped += 1  # e.g. the model already predicts the new object after earlier edits
        spent += time.perf_counter() - t0
        if i in checkpoints:
            change = (sum((model.blocks[l].mlp.W_out.detach() - W0[l]).norm() ** 2 for l in layers) ** 0.5
                      / sum(W0[l].norm() ** 2 for l in layers) ** 0.5).item()
            rows.append({"variant": variant, "edits": i, "applied": len(edits),
                         **measure(model, done, untouched), "w_change": change, "s_per_edit": spent / i})
            print(rows[-1], flush=True)
    for e in reversed(edits):
        e.undo()
    restored = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    for r in rows:
        r["restored"] = restored
    return rows


def slug(variant: str) -> str:
    return variant.replace(" (tuned)", "_tuned").replace(" + ", "_").replace("-", "_").lower()


def order(variant: str) -> tuple:
    tuned = variant.endswith(" (tuned)")
    name, _, alpha = variant.removesuffix(" (tuned)").partition(" + ")
    return list(VARIANTS).index(name), bool(alpha), tuned


def sequence_label(name: str, alpha: bool) -> str:
    """A variant's sequence search files' stem: ``results/tune/sequence_<variant>.json`` / ``.md`` and its checkpoint folder."""
    return "sequence_" + slug(name + (" + AlphaEdit" if alpha else ""))


def tuning_untouched(model, world, reqs, tuning, untouched, n: int = 100):
    """Untouched facts for tuning: known to the unedited model, of subjects neither the evaluation
    sequence nor the tuning split edits, none of them among the evaluation's ``untouched`` facts."""
    taken = {(f.subject, f.object) for f in untouched}
    pool = [f for f in world if (f.subject, f.object) not in taken]
    extra = [(None, request_of(r)) for r in tuning]
    return untouched_facts(model, pool, reqs + extra, n, seed=2)


def longer_tuning_records(model, world, shipped, n: int, untouched, seed: int = 1) -> list[dict]:
    """``n`` records for tuning on sequences longer than the tuning split: built as the ``shipped``
    records (``build_counterfactual``) from a world without any subject of them (the evaluation
    records, the tuning split, their neighbours and other relations) or of the evaluation's
    ``untouched`` facts, so that nothing they edit or measure is one of the evaluation's facts."""
    taken = {r["subject"] for r in shipped} | {f.subject for f in untouched}
    prompts = {p for r in shipped for p in r["neighborhood_prompts"] + r["relation_prompts"]}
    taken |= {f.subject for f in world if f.prompt(0) in prompts}
    rest = World(tuple(f for f in world if f.subject not in taken), world.relations)
    return list(build_counterfactual(model, rest, n=n, seed=seed))


def tune_for_sequences(model, name, alpha, reqs, untouched, budget, sequence, out: Path, quick: bool,
                       start: Path | None = None):
    """rl.tune for ``name`` (with AlphaEdit when ``alpha``) on the tuning split (records 400-429), scoring
    the harmonic mean of the Score after ``sequence`` sequential edits and the untouched-fact accuracy
    (on facts apart from the evaluation's); its checkpoint and result are kept under ``out`` (a run
    started again reuses them). A ``sequence`` longer than the split goes on with
    :func:`longer_tuning_records`. ``start``: a folder with an earlier search's
    ``sequence_<variant>.json`` to start from (e.g. the 30-edit search), searching then only the settings
    in :data:`LONG_SPACE`."""
    method, key_mode = VARIANTS[name]
    records, world = load_counterfactual(), load_world()
    tuning = [records[i] for i in TUNING_SPLIT][:sequence]
    if sequence > len(tuning):
        tuning += longer_tuning_records(model, world, records, sequence - len(tuning), untouched)
    facts = tuning_untouched(model, world, reqs, tuning, untouched, 20 if quick else 100)
    if method.endswith("memit"):  # tune starts from the library's defaults (the shipped presets)
        config = memit_config(prefix_seeds=None, **presets.for_model(model).edit_fields(method, alpha),
                              stats_n_texts=2000 if quick else 10_000)
    else:
        config = EditConfig.default_for(model, method, alpha, key_mode=key_mode, stats_n_texts=2000 if quick else 10_000)
    label = sequence_label(name, alpha)
    earlier, space = None, None
    if start is not None:
        earlier = rl.TuneResult.from_json(start / f"{label}.json")
        space = {k: v for k, v in LONG_SPACE.items() if k in earlier.params}
        if "layer" in earlier.params:
            space["layer"] = (earlier.params["layer"],)
    t = rl.tune(model, tuning, method=method, alphaedit=alpha, config=config, budget=budget, sequence=len(tuning),
                untouched=[(f.prompt(0), f.object) for f in facts], evaluation_records=evaluation_records(),
                checkpoint=out / "tune_checkpoints" / label, start=earlier, space=space)
    (out / "tune").mkdir(parents=True, exist_ok=True)
    (out / "tune" / f"{label}.json").write_text(t.to_json())
    (out / "tune" / f"{label}.md").write_text(f"{t!r}\n\n{t.table()}\n")
    print(t, flush=True)
    return t


def report(folder: Path, out: Path, title: str, quick: bool) -> str:
    """The table and figure from every variant's rows in ``folder``."""
    rows = [r for f in sorted(folder.glob("*.json")) for r in json.loads(f.read_text())["rows"]]
    rows.sort(key=lambda r: (order(r["variant"]), r["edits"]))
    suffix = "_quick" if quick else ""
    def fmt(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"
    lines = [f"# Sequential editing: up to {max(r['edits'] for r in rows)} edits in a row ({title})", "",
             "Rates (%) over the records edited so far, CounterFact's definitions: ES the prompt prefers the new "
             "object, PS its paraphrases do, NS neighbourhood prompts keep the true object, RS the subject's other "
             "relations keep their answers; untouched: top-1 accuracy on facts of subjects never edited. Row 0 is "
             "the unedited model measured on all the sequence's records. s/edit: compute time per edit "
             "(measurement excluded).", "",
             "| variant | edits | applied | ES | PS | NS | RS | untouched | ‖ΔW‖/‖W‖ | restored bit-exact | s/edit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['edits']} | {r['applied']} | {fmt(r['ES'])} | {fmt(r['PS'])} | "
                     f"{fmt(r['NS'])} | {fmt(r['RS'])} | {fmt(r['untouched'])} | {r['w_change']:.3f} | {r['restored']} | "
                     + ("–" if math.isnan(r["s_per_edit"]) else f"{r['s_per_edit']:.2f}") + " |")
    (out / f"sequential_edits{suffix}.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 8.5))
    axes = fig.subplots(2, 3).flatten()
    axes[-1].axis("off")
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for ax, metric, label in zip(axes, ("ES", "PS", "NS", "RS", "untouched"),
                                 ("ES: edits take", "PS: paraphrases take", "NS: neighbours keep their object",
                                  "RS: edited subjects' other relations kept", "untouched facts (top-1)")):
        for variant in sorted({r["variant"] for r in rows}, key=order):
            pts = [(r["edits"], 100 * r[metric]) for r in rows if r["variant"] == variant and r["edits"] > 0]
            # the unedited model (0 edits) drawn at x = 1 of the log axis
            pts = [(1, 100 * r[metric]) for r in rows if r["variant"] == variant and r["edits"] == 0] + pts
            name, _, alpha = variant.removesuffix(" (tuned)").partition(" + ")
            ls = ":" if variant.endswith(" (tuned)") else "--" if alpha else "-"
            ax.plot(*zip(*pts), marker="o", ms=3, color=colours[name], ls=ls, label=variant)
        ax.set_xscale("log")
        ticks = [1] + [c for c in (10, 100, 500, 1000) if c <= max(r["edits"] for r in rows)]
        ax.set_xticks(ticks, ["0"] + [str(t) for t in ticks[1:]])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(label)
        ax.set_xlabel("edits in the sequence")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize=9)
    axes[0].get_legend().remove()
    fig.suptitle(f"Sequential editing on {title} (dashed: with AlphaEdit's projection; dotted: settings chosen by rl.tune)")
    fig.tight_layout()
    fig.savefig(out / f"sequential_edits{suffix}.png", dpi=130)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--untouched", type=int, default=500)
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--alpha", choices=("both", "off", "on"), default="both", help="without / with AlphaEdit")
    ap.add_argument("--limit", type=int, default=None, help="quick run: this many edits and 5x untouched facts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 each for two runs side by side)")
    ap.add_argument("--tuned", action="store_true",
                    help="settings from rl.tune (sequence objective on the tuning split) instead of the presets")
    ap.add_argument("--tuned-from", type=Path, default=None,
                    help="with --tuned: read each variant's settings from FOLDER/sequence_<variant>.json (an earlier "
                         "--tuned run's result, e.g. results/tune) instead of tuning again")
    ap.add_argument("--tune-budget", type=int, default=16, help="trials for --tuned")
    ap.add_argument("--tune-sequence", type=int, default=30,
                    help="edits in each tuning trial's sequence (over 30: the tuning split, then longer_tuning_records)")
    ap.add_argument("--tune-start", type=Path, default=None,
                    help="with --tuned: start each search from FOLDER/sequence_<variant>.json (an earlier search, "
                         "e.g. results/tune), searching LONG_SPACE")
    ap.add_argument("--report", action="store_true", help="only rebuild the table and figure")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.out / ("sequential_quick" if args.limit else "sequential")
    folder.mkdir(parents=True, exist_ok=True)
    model = rl.load_model(args.model)
    if args.report:
        print(report(folder, args.out, model.cfg.model_name, bool(args.limit)))
        return
    unknown = set(args.methods.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(VARIANTS)}")
    n, n_untouched = (args.limit, args.limit * 5) if args.limit else (args.n, args.untouched)
    checkpoints = sorted({c for c in (10, 100, 500, 1000) if c <= n} | {n})
    reqs = make_requests(n)
    untouched = untouched_facts(model, load_world(), reqs, n_untouched)
    cache = {}

    def stats_for(layer):
        if layer not in cache:
            cache[layer] = rl.KeyStatistics.compute(model, layer, n_texts=2000 if args.limit else 10_000)
        return cache[layer]

    for name in args.methods.split(","):
        for alpha in {"both": (False, True), "off": (False,), "on": (True,)}[args.alpha]:
            tuned = None
            if args.tuned and args.tuned_from is not None:
                tuned = rl.TuneResult.from_json(args.tuned_from / f"{sequence_label(name, alpha)}.json")
                print(f"settings from {args.tuned_from}: {tuned.params}", flush=True)
            elif args.tuned:
                tuned = tune_for_sequences(model, name, alpha, reqs, untouched, 2 if args.limit else args.tune_budget,
                                           args.limit or args.tune_sequence, args.out, bool(args.limit),
                                           args.tune_start)
            rows = run(model, reqs, untouched, name, alpha, checkpoints, stats_for, tuned)
            (folder / f"{slug(rows[0]['variant'])}.json").write_text(json.dumps(
                {"model": model.cfg.model_name, "n": n, "untouched": n_untouched, "rows": rows}, indent=1))
    print(report(folder, args.out, model.cfg.model_name, bool(args.limit)))


if __name__ == "__main__":
    main()
