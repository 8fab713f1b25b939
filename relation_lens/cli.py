"""The ``relation-lens`` command: argument parsing -> library call -> files. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Germany is located in the continent of"
DEFAULT_SUBJECT = "Germany"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (the embedded model), 'smollm2-135m', a .gguf file, a local Hugging Face folder of any "
                        "architecture TransformerLens converts (GPT-2, GPT-J, GPT-NeoX, LLaMA, ...), or a TransformerLens "
                        "name")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corrupt", default="relation", choices=["relation", "subject"],
                   help="which tokens to corrupt: the relation (relation tracing) or the subject (ROME)")
    p.add_argument("--kinds", default="resid,mlp,attn", help="comma-separated sites to restore (default: all)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="layers restored together for mlp/attn (default: ROME's 10 of 48 layers scaled to the "
                        "model's depth, i.e. 10 for gpt2-xl, 1 for the 6-layer default model)")
    p.add_argument("--samples", type=positive_int, default=10, help="noise samples (default 10)")
    p.add_argument("--noise", default=None,
                   help="noise: a std, 'embedding' (default: 3 x std of the token embedding matrix) or 'rome' "
                        "(3 x std of subject-token embeddings, ROME's rule)")
    p.add_argument("--no-bos", action="store_true", help="tokenise without BOS, as ROME's code does on GPT-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-last", action="store_true", help="leave the last token out of the relation span")
    p.add_argument("--batch-size", type=positive_int, default=512, help="rows per patched batch (bounds memory)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--formats", default="png", help="figure formats, comma-separated: png,pdf,svg")


def positive_int(text: str) -> int:
    """A count argument: a whole number >= 1 (argparse names the argument and exits with 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relation-lens",
        description="Trace and edit relational knowledge in GPT-style models (TransformerLens).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("trace", help="trace one prompt: write JSON, figures and an offline HTML view",
                       description="Corrupt the relation (or subject) tokens with noise, restore clean states one "
                                   "site at a time and write trace.json, trace.<fmt> and trace.html to --out.")
    _common(p)
    p.add_argument("--prompt", default=None, help=f"prompt ending before the answer (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--subject", default=None, help="subject substring of the prompt")
    p.add_argument("--target", default=None, help="answer to score (default: the model's top prediction)")
    _trace_args(p)

    p = sub.add_parser("trace-dataset", help="average indirect effects over many facts of the default world",
                       description="Trace facts of the default model's world (or a JSON/JSONL file of "
                                   "{prompt, subject, target} records) and write the bucketed averages.")
    _common(p)
    p.add_argument("--facts", type=Path, default=None, help="JSON or JSONL file of {prompt, subject, target} (default on the default model: its world's "
                        "facts; other models need --facts)")
    p.add_argument("--relation", default=None, help="only this relation id of the world (e.g. P36)")
    p.add_argument("--limit", type=positive_int, default=50, help="at most this many facts (default 50)")
    p.add_argument("--include-incorrect", action="store_true", help="average prompts the model gets wrong too")
    p.add_argument("--pack", type=positive_int, default=8,
                   help="prompts whose sites share engine batches (default 8; 1: prompt by prompt)")
    _trace_args(p)

    p = sub.add_parser("edit", help="edit a fact with ROME or relation-ROME and show predictions before/after",
                       description="Compute and apply a rank-one edit, print the top predictions before and after on "
                                   "the edit prompt, a paraphrase and an unrelated prompt, and save the edited "
                                   "weights only when --save is given.")
    _common(p)
    p.add_argument("--prompt", default="{} is located in the country of",
                   help="prompt with {} for the subject (default: '{} is located in the country of')")
    p.add_argument("--subject", default="Paris", help="the subject (default: Paris)")
    p.add_argument("--target-new", default="Italy", help="the new object (default: Italy)")
    p.add_argument("--method", default="relation_rome",
                   help="a registered single-request editing method: relation_rome (default), rome, or one added "
                        "with relation_lens.register_method")
    p.add_argument("--layer", type=int, default=None,
                   help="MLP layer (default: the model's presets, as relation_lens.defaults(model) lists them)")
    p.add_argument("--key-mode", default=None, choices=["symmetric", "asymmetric"],
                   help="symmetric: r-ROME keys; asymmetric: ROME's original code (default: the library's, "
                        "EditConfig.default_for(model, method): symmetric on the default model, ROME's elsewhere)")
    p.add_argument("--paraphrase", default=None,
                   help="a paraphrase prompt (default on the default model: a held-out template of its world; on "
                        "other models none unless given)")
    p.add_argument("--unrelated", default=None,
                   help="an unrelated prompt (default on the default model: another fact of its world; on other "
                        "models none unless given)")
    p.add_argument("--save", type=Path, default=None,
                   help="folder to save the edited model (a Hugging Face folder that load_model and transformers "
                        "read) and the edit (edit.json); only when the edit took, unless --save-anyway")
    p.add_argument("--save-anyway", action="store_true",
                   help="save even when the model's top prediction after the edit is not the new target")

    p = sub.add_parser("evaluate", help="evaluate an editing method on N CounterFact-style records",
                       description="Edit, measure (ES, PS, NS, RS, Score, fluency) and undo, record by record; "
                                   "write evaluation.json (every record's numbers) and a markdown row to --out.")
    _common(p)
    p.add_argument("--method", default="relation_rome",
                   help="a registered single-request editing method (relation_rome, the default; rome) or none "
                        "(the unedited model)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--records", type=Path, default=None,
                   help="CounterFact file (ROME or MEND layout, or JSONL); default on the default model: its "
                        "shipped counterfactual relation dataset (other models need --records)")
    p.add_argument("--n", type=positive_int, default=50, help="records to evaluate (default 50)")
    p.add_argument("--no-fluency", action="store_true", help="skip the generation fluency metric")
    p.add_argument("--key-mode", default=None, choices=["symmetric", "asymmetric"],
                   help="default: the library's (EditConfig.default_for(model, method))")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="folder to write each record's row to as it is measured, and resume from")
    p.add_argument("--out", type=Path, default=Path("out"))

    p = sub.add_parser("tune", help="choose an editing method's layers and hyperparameters on a tuning split",
                       description="rl.tune: a coordinate search from the method's defaults over the layers rl.locate "
                                   "reads off the model's traces and the method's hyperparameters, scored on tuning "
                                   "records; write tune.json (every trial), tune.md (the trial table and the chosen "
                                   "settings) and tune.png to --out. Resumable with --checkpoint, data-parallel under "
                                   "torchrun.")
    _common(p)
    p.add_argument("--method", default="relation_rome", choices=["relation_rome", "rome", "relation_memit", "memit"])
    p.add_argument("--alphaedit", action="store_true", help="tune with AlphaEdit's projection (and its threshold, l2)")
    p.add_argument("--records", type=Path, default=None,
                   help="CounterFact file of tuning records (ROME or MEND layout, or JSONL); default on the default "
                        "model: its shipped relation dataset's tuning split (records 400-429), disjoint from its "
                        "evaluation records (other models need --records)")
    p.add_argument("--n", type=positive_int, default=None, help="use the first N tuning records (default: all)")
    p.add_argument("--budget", type=positive_int, default=24, help="the most trials (default 24, the defaults included)")
    p.add_argument("--sequence", type=positive_int, default=None,
                   help="score sequences of N edits (Score and untouched-fact accuracy) instead of single edits")
    p.add_argument("--batch-size", type=positive_int, default=10, help="requests per MEMIT batch (default 10)")
    p.add_argument("--config", default=None,
                   help='JSON of EditConfig fields for what is not searched, e.g. \'{"v_steps": 20}\'')
    p.add_argument("--space", default=None,
                   help='JSON of candidate values by setting, e.g. \'{"layer": [0, 4], "v_steps": []}\'')
    p.add_argument("--start", default=None,
                   help="settings to start from: an earlier run's tune.json (continue its search, e.g. on longer "
                        'sequences) or JSON by setting, e.g. \'{"threshold": 0.02, "l2": 1}\'')
    p.add_argument("--checkpoint", type=Path, default=None, help="folder to write each trial to, and resume from")
    p.add_argument("--out", type=Path, default=Path("out"))

    p = sub.add_parser("stats", help="compute (and cache) the key statistics an edit needs",
                       description="Accumulate C = E[k k^T] of the MLP keys at --layer over a corpus (default: the "
                                   "default model's training text) into the disk cache, so that later edits load it. "
                                   "Runs data-parallel under torchrun.")
    _common(p)
    p.add_argument("--layer", type=int, required=True, help="MLP layer")
    p.add_argument("--corpus", type=Path, default=None,
                   help="a JSON list of strings or JSONL of {text} records (default: the default model's texts)")
    p.add_argument("--n-texts", type=positive_int, default=10_000, help="texts to use (a seeded sample; default 10,000)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--no-bos", action="store_true", help="tokenise without BOS, as ROME's layer_stats on GPT-2")

    p = sub.add_parser("world", help="summarise the default model's world of facts",
                       description="Print the relations of the world with their fact counts and templates.")
    p.add_argument("--relation", default=None, help="list the facts of this relation id")
    p.add_argument("--limit", type=positive_int, default=20)

    p = sub.add_parser("info", help="load a model and print its configuration",
                       description="Load a model (default: the embedded one) and print its shape.")
    _common(p)
    return parser


def _check_out(out: Path, command: str) -> None:
    """Fail at once, before any work, when ``out`` cannot be created or written."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"relation-lens {command}: cannot create the output folder {str(out)!r} ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise SystemExit(f"relation-lens {command}: the output folder {str(out)!r} is not writable")


def _write_views(result, out: Path, stem: str, formats: list[str], quiet: bool) -> None:
    result.to_json(out / f"{stem}.json")
    for fmt in formats:
        result.plot(out / f"{stem}.{fmt}")
    (out / f"{stem}.html").write_text(result.to_html(), encoding="utf-8")
    if not quiet:
        print(f"wrote {out / stem}.json, .{', .'.join(formats)} and .html")


def _formats(args) -> list[str]:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad:
        raise SystemExit(f"relation-lens: unknown figure format(s) {bad} (use png, pdf or svg)")
    return formats


def _trace_config(args):
    from relation_lens.tracing import TraceConfig

    noise = args.noise
    if noise is not None and noise not in ("rome", "embedding"):
        try:
            noise = float(noise)
        except ValueError:
            raise SystemExit(f"relation-lens: --noise {noise!r} is not a number, 'embedding' or 'rome'") from None
    return TraceConfig(corrupt=args.corrupt, kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                       window=args.window, n_samples=args.samples, noise=noise, seed=args.seed,
                       include_last=not args.exclude_last, batch_size=args.batch_size,
                       prepend_bos=False if args.no_bos else None)


def _cmd_trace(args) -> None:
    import relation_lens as rl

    prompt = args.prompt or DEFAULT_PROMPT
    subject = args.subject or (DEFAULT_SUBJECT if args.prompt is None else None)
    if subject is None:
        from relation_lens.errors import ConfigError

        raise ConfigError("relation-lens trace: --subject is required with --prompt (the subject substring of the "
                          "prompt)")
    config, formats = _trace_config(args), _formats(args)
    _check_out(args.out, "trace")
    model = rl.load_model(args.model, device=args.device)
    result = rl.trace(model, prompt, subject=subject, target=args.target, config=config, progress=not args.quiet)
    if not args.quiet:
        print(f"prompt {prompt!r}, subject {subject!r}, target {result.target!r}: "
              f"P clean {result.clean_prob:.4f}, corrupted ({result.corrupt}) {result.corrupted_prob:.4f}")
        for kind in result.scores:
            layer, pos, value = result.peak(kind)
            print(f"  {kind:5s} max P {value:.4f} at layer {layer}, token {pos} {result.tokens[pos]!r}")
    _write_views(result, args.out, "trace", formats, args.quiet)


def _world_is_the_models(args, flag: str, what: str) -> None:
    """The built-in facts and records are the default model's world; on any other model they are no
    default (a ConfigError, before the model is loaded, saying which argument gives the model's own)."""
    from relation_lens.errors import ConfigError
    from relation_lens.presets import DEFAULT_MODEL_NAME

    if args.model not in (None, "default", DEFAULT_MODEL_NAME):
        raise ConfigError(f"{what} on --model {args.model!r} need {flag}: the built-in ones are the default model's "
                          "world, which belongs to that model alone (rl.known_facts keeps the facts of any loader a "
                          "model knows)")


def _load_facts(args) -> list:
    if args.facts is not None:
        from relation_lens.data.io import read_json
        from relation_lens.errors import DataError

        rows = read_json(args.facts)
        if not isinstance(rows, list):
            raise DataError(f"{str(args.facts)!r}: expected a list of {{prompt, subject, target}} records")
        return rows[: args.limit]
    from relation_lens.data import world_trace_facts

    return world_trace_facts(relation=args.relation, limit=args.limit)


def _cmd_trace_dataset(args) -> None:
    import relation_lens as rl
    from relation_lens.distributed import ranks

    config, formats = _trace_config(args), _formats(args)
    r = ranks()
    if r.is_main:
        _check_out(args.out, "trace-dataset")
    if args.facts is None:
        _world_is_the_models(args, "--facts", "the facts to trace")
    model = rl.load_model(args.model, device=args.device)
    facts = _load_facts(args)
    result = rl.trace_dataset(model, facts, config=config, exclude_incorrect=not args.include_incorrect,
                              progress=not args.quiet, checkpoint=args.out, pack=args.pack)
    if not r.is_main:
        return
    if not args.quiet:
        print(repr(result))
    _write_views(result, args.out, "trace_dataset", formats, args.quiet)


def _edit_prompts(args, model) -> tuple[str | None, str | None]:
    """The paraphrase and unrelated prompts: given, or on the default model built from its world (the
    world's facts belong to that model alone: other models show only what was given)."""
    from relation_lens.data import load_world
    from relation_lens.presets import is_default_model

    paraphrase, unrelated = args.paraphrase, args.unrelated
    if not is_default_model(model):
        return paraphrase, unrelated
    world = load_world()
    rel = next((r for r in world.relations.values() if args.prompt in r.train_templates + r.heldout_templates), None)
    if paraphrase is None:
        if rel is None:
            from relation_lens.errors import ConfigError

            raise ConfigError("relation-lens edit: --paraphrase is needed for a prompt that is not a world template")
        others = [t for t in rel.heldout_templates + rel.train_templates if t != args.prompt]
        paraphrase = others[0].format(args.subject)
    if unrelated is None:
        fact = next(f for f in world if f.subject != args.subject and (rel is None or f.relation_id != rel.relation_id))
        unrelated = fact.prompt(0)
    return paraphrase, unrelated


def _cmd_edit(args) -> None:
    import relation_lens as rl
    from relation_lens.editing import (
        get_method,
        save_edited,
        single_methods,
    )
    from relation_lens.errors import EditError
    from relation_lens.probes import predict
    from relation_lens.spans import object_tokens

    if args.method not in single_methods():
        raise EditError(f"--method {args.method!r} is not one of {single_methods()} (batch methods: compute_edit "
                        "with a list of requests, or relation-lens evaluate)")
    if args.save is not None:
        _check_out(args.save, "edit")
    model = rl.load_model(args.model, device=args.device)
    request = rl.EditRequest(args.prompt, args.subject, args.target_new)
    paraphrase, unrelated = _edit_prompts(args, model)
    given = {"edit prompt": request.text, "paraphrase": paraphrase, "unrelated": unrelated}
    missing = [k for k, v in given.items() if v is None]
    prompts: dict[str, str] = {k: v for k, v in given.items() if v is not None}
    if missing and not args.quiet:
        print(f"(no {' or '.join(missing)} prompt: give --{' / --'.join(missing)}; the built-in ones come from the "
              "default model's world)")
    before = predict(model, list(prompts.values()), k=3)
    method = get_method(args.method)
    config = method.default_config(model)
    if args.key_mode is not None:
        config = dataclasses.replace(config, key_mode=args.key_mode)
    update = rl.compute_edit(model, request, method=args.method, layer=args.layer, config=config,
                             progress=not args.quiet)
    layers = ", ".join(map(str, update.layers))
    new_first = model.tokenizer.decode(object_tokens(model, request.text, request.target_new)[:1])
    with rl.apply_edit(model, update):
        after = predict(model, list(prompts.values()), k=3)
    took = after[0][0][0] == new_first
    print(f"{args.method} edit at layer {layers}: {request.text!r} -> {request.target_new!r}")
    for (name, prompt), b, a in zip(prompts.items(), before, after):
        fmt = lambda top: ", ".join(f"{t!r} {p:.2f}" for t, p in top)  # noqa: E731
        print(f"  {name:11s} {prompt!r}\n      before: {fmt(b)}\n      after:  {fmt(a)}")
    if not took:
        print(f"the edit did not take: the top prediction after it is {after[0][0][0]!r}, not {new_first!r}")
    if args.save is not None:
        if not took and not args.save_anyway:
            print(f"not saved to {args.save} (the edit did not take; --save-anyway saves it regardless)")
            return
        save_edited(args.model, [update], args.save)
        (args.save / "edit.json").write_text(json.dumps({
            "base_model": args.model, "method": args.method,
            "layer": update.layers[0] if len(update.layers) == 1 else list(update.layers), "key_mode": config.key_mode,
            "took": took,
            "request": {"prompt": request.prompt, "subject": request.subject, "target_new": request.target_new},
        }, indent=1))
        print(f"saved the edited model to {args.save} (loads with relation_lens.load_model and transformers)")


def _cmd_evaluate(args) -> None:
    import relation_lens as rl
    from relation_lens.distributed import ranks
    from relation_lens.editing import EditConfig
    from relation_lens.evaluation import EvaluationResult, evaluate

    r = ranks()
    if r.is_main:
        _check_out(args.out, "evaluate")
    if args.records is None:
        _world_is_the_models(args, "--records", "the records to evaluate")
    model = rl.load_model(args.model, device=args.device)
    if args.records is None:
        from relation_lens.data.counterfact import load_counterfactual

        records = list(load_counterfactual())[: args.n]
    else:
        from relation_lens.data.loaders import load_counterfact

        records = list(load_counterfact(args.records, limit=args.n))
    result = evaluate(model, records, method=args.method, layer=args.layer, fluency=not args.no_fluency,
                      config=EditConfig.default_for(model, args.method,
                                                    **({"key_mode": args.key_mode} if args.key_mode else {})),
                      progress=not args.quiet, checkpoint=args.checkpoint)
    if not r.is_main:
        return
    result.to_json(args.out / "evaluation.json")
    table = EvaluationResult.header() + "\n" + result.row() + "\n"
    (args.out / "evaluation.md").write_text(table)
    if not args.quiet:
        print(table + f"{result.n_failed} of {len(records)} records could not be edited; wrote {args.out}/evaluation.json")


def _json_arg(text: str | None, flag: str) -> dict:
    from relation_lens.errors import ConfigError

    if text is None:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not JSON ({exc}): {text!r}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{flag} must be a JSON object of names to values, not {text!r}")
    return out


def _cmd_tune(args) -> None:
    import relation_lens as rl
    from relation_lens.distributed import ranks
    from relation_lens.editing import default_config_of, get_method
    from relation_lens.errors import ConfigError

    r = ranks()
    if r.is_main:
        _check_out(args.out, "tune")
    overrides = _json_arg(args.config, "--config")
    space = _json_arg(args.space, "--space")
    start = rl.TuneResult.from_json(args.start) if args.start and Path(args.start).is_file() else \
        _json_arg(args.start, "--start") or None
    known = {f.name for f in dataclasses.fields(rl.EditConfig)}
    if set(overrides) - known:
        raise ConfigError(f"--config names {sorted(set(overrides) - known)}, which are not EditConfig fields")
    if args.records is None:
        _world_is_the_models(args, "--records", "the tuning records")
    model = rl.load_model(args.model, device=args.device)
    if args.records is None:
        from relation_lens.data.counterfact import TUNING_SPLIT, load_counterfactual

        records = [rec for i, rec in enumerate(load_counterfactual()) if i in TUNING_SPLIT]
        records = records[: args.n] if args.n is not None else records
    else:
        from relation_lens.data.loaders import load_counterfact

        records = list(load_counterfact(args.records, limit=args.n))
    base = default_config_of(get_method(args.method), model, args.alphaedit)
    tupled: dict[str, Any] = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in overrides.items()}
    result = rl.tune(model, records, method=args.method, alphaedit=args.alphaedit, budget=args.budget,
                     sequence=args.sequence, batch_size=args.batch_size, space=space or None, start=start,
                     config=dataclasses.replace(base, **tupled), checkpoint=args.checkpoint,
                     progress=not args.quiet)
    if not r.is_main:
        return
    result.to_json(args.out / "tune.json")
    result.plot(args.out / "tune.png")
    chosen = ", ".join(f"{k}={v}" for k, v in result.params.items())
    text = (f"# tune {args.method}{' + AlphaEdit' if args.alphaedit else ''} on {model.cfg.model_name}\n\n"
            f"{len(records)} tuning records; {result.objective} of the chosen settings {result.best:.2f} "
            f"(the defaults: {result.trials[0]['objective']:.2f})\n\nchosen: {chosen}\n\n{result.table()}\n")
    (args.out / "tune.md").write_text(text)
    if not args.quiet:
        print(text + f"wrote {args.out}/tune.json, tune.md, tune.png")


def _cmd_stats(args) -> None:
    import relation_lens as rl
    from relation_lens.distributed import ranks

    corpus = None
    if args.corpus is not None:
        from relation_lens.data.io import read_json

        rows = read_json(args.corpus)
        corpus = [row["text"] if isinstance(row, dict) else row for row in rows]
    model = rl.load_model(args.model, device=args.device)
    stats = rl.KeyStatistics.compute(model, args.layer, corpus, n_texts=args.n_texts, batch_size=args.batch_size,
                                     progress=not args.quiet, prepend_bos=False if args.no_bos else None)
    if ranks().is_main and not args.quiet:
        from relation_lens.key_statistics import cache_dir

        print(f"{stats!r}; cached under {cache_dir()}")


def _cmd_world(args) -> None:
    from collections import Counter

    from relation_lens.data import load_world

    world = load_world()
    if args.relation:
        for f in world.by_relation(args.relation)[: args.limit]:
            print(f"{f.fact_id:6d}  {f.prompt(0)} -> {f.object}")
        return
    counts = Counter(f.relation_id for f in world)
    subjects = Counter(f.subject for f in world)
    multi = sum(1 for v in subjects.values() if v > 1)
    print(f"{len(world)} facts, {len(world.relations)} relations, {len(subjects)} subjects "
          f"({multi / len(subjects):.1%} in two or more relations)")
    for rid, rel in world.relations.items():
        print(f"  {rid:26s} {rel.name:30s} {counts[rid]:5d}  train: {rel.train_templates[0]!r} ... "
              f"held out: {rel.heldout_templates[0]!r}")


def _cmd_info(args) -> None:
    import relation_lens as rl
    from relation_lens.model_interface import is_bridge
    from relation_lens.models import stored_parameter_count

    model = rl.load_model(args.model, device=args.device)
    c = model.cfg
    stored = stored_parameter_count(args.model)
    if is_bridge(model):  # the bridge's parameters repeat fused weights as split copies: count storage once
        n = stored if stored is not None else sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        counts = f"{n:,} parameters{' as stored' if stored is not None else ''} (a TransformerLens 4 TransformerBridge)"
    else:
        n = sum(p.numel() for p in model.parameters())
        counts = f"{n:,} parameters in the HookedTransformer"
        if stored is not None:
            counts += (f" ({stored:,} as stored: Hugging Face ties the unembedding to the embedding and counts it once, "
                       "TransformerLens keeps W_U apart and folds LayerNorm weights into the next layer)")
    print(f"{c.model_name}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, d_mlp {c.d_mlp}, "
          f"vocab {c.d_vocab}, context {c.n_ctx}, {counts}, device {c.device}, dtype {c.dtype}")
    import warnings

    with warnings.catch_warnings():  # the defaults below say the same
        warnings.simplefilter("ignore")
        d = rl.defaults(model)
    print("defaults, and where each came from:")
    print(f"  presets: {d['presets']['name']}: {d['presets']['source']}")
    print(f"  tokenisation: prepend_bos {d['tokenisation']['source']}; BOS token {d['tokenisation']['bos_token']}")
    print(f"  key statistics: {d['key_statistics']['corpus']} ({d['key_statistics']['source']})")
    print(f"  noise subjects: {d['noise_subjects']['source']}")
    print(f"  counterfactuals: {d['counterfactuals']['source']}")
    for m, v in d["methods"].items():
        where = f"layer {v['layer']}" if "layer" in v else f"layers {v['layers']}, lambda {v['mom2_update_weight']:g}"
        print(f"  {m}: {where}; EditConfig fields other than ROME's: {v['config'] or 'none'}; from {v['source']}")


COMMANDS = {"stats": _cmd_stats, "trace": _cmd_trace, "trace-dataset": _cmd_trace_dataset, "edit": _cmd_edit, "evaluate": _cmd_evaluate, "tune": _cmd_tune, "world": _cmd_world, "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    from relation_lens.errors import RelationLensError

    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from relation_lens.distributed import shutdown

    try:
        COMMANDS[args.command](args)
    except RelationLensError as exc:
        print(f"relation-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
