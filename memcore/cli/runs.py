"""The verbs of one run and the store: `train`, `resume`, `runs`, `show`, `export`, `generate`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from memcore.cli.common import StopFlag, open_store, spec_from_args
from memcore.config import RunSpec
from memcore.records import RunSummary


def _progress(total: int, enabled: bool) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """(update, close) of a run's progress bar on stderr; `update` takes each StepReport and says any new note
    (a checkpoint that could not be written, say) when it happens, bar or no bar."""
    said = [0]

    def notes(r: Any, write: Callable[[str], None]) -> None:
        for note in r.notes[said[0]:]:
            write(f"note: {note}")
        said[0] = len(r.notes)

    if not enabled:
        return (lambda r: notes(r, lambda m: print(m, file=sys.stderr))), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(r: Any) -> None:
        notes(r, lambda m: bar.write(m, file=sys.stderr))
        bar.n = r.step
        bar.set_postfix_str(f"loss {r.loss:.3f}  above τ {r.n_above}/{r.n_tokens}  correct {r.n_correct}/{r.n_tokens}"
                            f"  recall {'yes' if r.recalled else 'no'}", refresh=False)
        bar.refresh()

    return update, bar.close


def _run_in_foreground(args: argparse.Namespace, max_steps: int, stream: Callable[[StopFlag], Any]) -> int:
    """Drive one run's report stream in this terminal: a progress bar, Ctrl-C stops after the current step,
    and the summary at the end (as JSON with --json)."""
    from memcore.runner import drain

    flag = StopFlag()
    restore = flag.install()
    update, close = _progress(max_steps, enabled=not args.json or sys.stderr.isatty())
    try:
        summary = drain(stream(flag), update)
    finally:
        close()
        restore()
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        _print_summary(summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`memcore train`: one run in the foreground, its summary at the end. Returns the exit code."""
    from memcore.objectives import schedule_notes
    from memcore.runner import execute_iter, prepare

    store = open_store()
    if args.after is not None:
        inherit_placement(args, store)
    spec = spec_from_args(args)
    if spec.train.after is not None:  # a refusal before the model loads
        from memcore.runner import earlier_of

        earlier_of(store, spec)
    if not args.json:
        print(f"loading {spec.model.name} ...", file=sys.stderr)
    base, samples = prepare(spec, home=store.home)
    for note in schedule_notes(spec.train, len(samples)):
        print(f"note: {note}", file=sys.stderr)
    return _run_in_foreground(args, spec.train.max_steps,
                              lambda stop: execute_iter(spec, store, base, samples, should_stop=stop, label=args.label))




def given_flags(argv: list[str], verb: str, names: tuple[str, ...]) -> set[str]:
    """Which of the options `names` the command line `argv` (verb first) typed, whatever their values (a flag typed
    with its default value counts as given)."""
    from memcore.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    marker = object()
    ns = argparse.Namespace(**{n: marker for n in names})
    sub.choices[verb].parse_known_args(argv[argv.index(verb) + 1:], namespace=ns)  # defaults fill only what is unset
    return {n for n in names if getattr(ns, n) is not marker}


def inherit_placement(args: argparse.Namespace, store: Any) -> None:
    """`train --after RUN`: resolve RUN (an id, a unique prefix or 'last') and take its model and placement for every
    such flag not typed; a flag typed with another value than the run's is refused by memcore.runner.earlier_of,
    naming both values. Raises MemcoreError for an unknown run."""
    from memcore.runner import CHAIN_SETTINGS  # the model and placement a chain keeps, by option name

    args.after = store.resolve(args.after)
    parent = RunSpec.from_dict(store.run(args.after)["spec"])
    names = tuple(name for name, _ in CHAIN_SETTINGS)
    typed = given_flags(args.argv, "train", names) if getattr(args, "argv", None) else set()
    for name, get in CHAIN_SETTINGS:
        if name not in typed:
            value = get(parent)
            setattr(args, name, ",".join(map(str, value)) if isinstance(value, tuple) else value)


def cmd_resume(args: argparse.Namespace) -> int:
    """`memcore resume RUN`: continue a stopped, interrupted or failed run from its checkpoint."""
    from memcore.runner import check_resumable, resumable_step, resume_iter

    store = open_store()
    rid = store.resolve(args.run)
    spec = RunSpec.from_dict(check_resumable(store, rid)["spec"])
    step = resumable_step(store, rid)
    print(f"resuming run {rid} from its checkpoint at step {step}" if step is not None else
          f"run {rid} has no checkpoint (it stopped before its first one): training it again from step 0",
          file=sys.stderr)
    return _run_in_foreground(args, spec.train.max_steps, lambda stop: resume_iter(store, rid, should_stop=stop)[1])


def _pad(text: str, width: int) -> str:
    """Left-aligned in `width` terminal columns, counting East Asian wide characters (CJK, most emoji) as two."""
    import unicodedata

    cols = sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)
    return text + " " * max(0, width - cols)


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _chain_lines(s: RunSummary) -> list[str]:
    """What a run trained after another did to the earlier targets, in the summary's words."""
    chain = " -> ".join([*s.chain, "this run"])
    m = s.earlier_tokens or 0
    kept = "yes, verbatim" if s.earlier_recalled else f"no: first {s.earlier_prefix} of {m} tokens in order"
    story = ("never lost verbatim recall" if s.earlier_lost_at is None and s.earlier_recalled
             else "were not recalled verbatim when it started" if s.earlier_lost_at is None
             else f"lost verbatim recall at step {s.earlier_lost_at}" + (
                 f", regained at step {s.earlier_regained_at}" if s.earlier_regained_at is not None else ""))
    lines = [f"after          {chain}",
             f"earlier        {kept}   above τ {s.earlier_above}/{m}   argmax right {s.earlier_correct}/{m}   "
             f"({story})"]
    if len(s.earlier_parts) > 1:  # a longer chain: each earlier passage on its own
        for part in s.earlier_parts:
            n = part["tokens"]
            state = "yes, verbatim" if part["recalled"] else f"no: first {part['prefix']} of {n} tokens in order"
            lines.append(f"  run {part['run']}  {state}   above τ {part['above']}/{n}   argmax right "
                         f"{part['correct']}/{n}")
    if s.keep:
        lines.append(f"rehearsal      --keep: {100 * (s.rehearsal_share or 0):.1f}% of the update weight went to the "
                     "earlier targets on average")
    return lines


def _print_summary(s: RunSummary) -> None:
    how = "confirmed by greedy generate" if s.verified_by_generate else "every teacher-forced argmax right"
    if s.recalled:
        recall = f"yes, verbatim ({how})"
    elif s.samples > 1 and s.samples_recalled is not None:  # a book: which entry, not a position across all of them
        recall = f"no: {s.samples - s.samples_recalled} of {s.samples} entries not recalled entry by entry"
    else:
        recall = f"no: greedy decoding diverges at token {s.first_divergence}"
    lines = [
        f"run            {s.run_id}  ({s.ending})",
        f"steps          {s.steps}  ({_fmt(s.seconds_per_step, 2)} s/step)",
        f"recalled       {recall}",
        f"verbatim       first {s.verbatim_prefix} of {s.n_tokens} tokens in order   "
        f"token accuracy {s.token_accuracy:.3f}   converged: {'yes' if s.converged else 'no'}",
        f"tokens above τ {s.n_above}/{s.n_tokens}   argmax right {s.n_correct}/{s.n_tokens}",
        *([f"entries        {s.samples_recalled} of {s.samples} recalled entry by entry (every token of the entry's "
           "answer right)"] if s.samples > 1 and s.samples_recalled is not None else []),
        *(_chain_lines(s) if s.after else []),
        f"ΔL             {_fmt(s.delta_loss)} nats/token  (base {_fmt(s.base_loss)} -> {_fmt(s.loss)})",
        f"bits stored    {_fmt(s.bits_stored, 1)}  over P_eff {s.p_eff:,} = {_fmt(s.bits_per_param, 5)} bits/param",
        f"adapter        {s.adapter}: {s.adapter_dir}",
    ]
    if s.history == "decimated":
        lines.append(f"history        decimated: per-token snapshots at {s.snapshots} of its {s.steps} steps "
                     "(scalars at every step)")
    for n in s.notes:
        lines.append(f"note           {n}")
    print("\n".join(lines))




def cmd_runs(args: argparse.Namespace) -> int:
    """`memcore runs`: the stored runs as a table (or JSON), filtered by method, model, status."""
    store = open_store(writable=False)
    runs = store.runs(method=args.method, model=args.model, status=args.status)
    if args.json:
        keys = ("id", "status", "created", "started", "finished", "model", "method", "rank", "length", "seed", "sweep",
                "label", "steps", "error")
        print(json.dumps([{k: r[k] for k in keys} | {"after": r["spec"].get("train", {}).get("after"),
                                                     "keep": bool(r["spec"].get("train", {}).get("keep")),
                                                     "summary": r["summary"].to_dict() if r["summary"] else {}}
                          for r in runs]))
        return 0
    if not runs:
        print("no runs yet: try `memcore train --sample lighthouse`")
        return 0
    head = (f"{'run':<22} {'status':<11} {'model':<14} {'adapter':<7} {'method':<9} {'rank':>4} {'tokens':>6} "
            f"{'steps':>5} {'recalled':>8} {'ΔL':>7}  after (+keep: rehearsed it)")
    print(head)
    for r in runs:
        s = r["summary"]
        kind = r["spec"].get("adapter", {}).get("kind", "lora")
        recalled = ("yes" if s.recalled else "no") if s else "-"
        train = r["spec"].get("train", {})
        after = train.get("after") or "-"  # the run it was trained on top of, +keep when it rehearsed that run
        after += " +keep" if train.get("after") and train.get("keep") else ""
        print(f"{r['id']:<22} {r['status']:<11} {str(r['model'])[:14]:<14} {kind:<7} {r['method']:<9} {r['rank']:>4} "
              f"{_fmt(r['length']):>6} {_fmt(r['steps']):>5} {recalled:>8} {_fmt(s.delta_loss if s else None):>7}  "
              f"{after}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`memcore show RUN`: one run's summary and its stubborn tokens (or JSON)."""
    store = open_store(writable=False)
    rid = store.resolve(args.run)
    r = store.run(rid)
    s = r["summary"]
    if args.json:
        keys = ("id", "status", "created", "started", "finished", "error", "spec")
        print(json.dumps({k: r[k] for k in keys} | {"summary": s.to_dict() if s else {}}))
        return 0
    if not s:
        error = f" ({r['error']})" if r["error"] else ""
        print(f"run {rid}: {r['status']}{error}, {r['steps']} steps recorded")
        return 0
    s.status = r["status"]
    _print_summary(s)
    if s.stubborn_tokens:
        print("\nstubborn tokens (longest at or below τ):")
        for t in s.stubborn_tokens:
            steps = f"{t['steps_below']} step{'s' if t['steps_below'] != 1 else ''}"
            print(f"  #{t['index']:<5} {_pad(repr(t['token']), 16)} below τ for {steps}, "
                  f"last at step {t['last_below']}, p now {t['p']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`memcore export RUN DIR`: the run's adapter (PEFT, or memcore's bypass), its model card (README.md),
    summary.json and steps.csv into a new folder (memcore.export.export_run).

    Raises MemcoreError for a run with no adapter or summary, or a non-empty DIR."""
    from memcore.export import export_run

    store = open_store(writable=False)
    rid = store.resolve(args.run)
    dest = export_run(store, rid, args.dir)
    kind = "bypass adapter (memcore)" if (dest / "bypass_config.json").is_file() else "PEFT adapter"
    print(f"exported run {rid} to {dest} ({kind}, model card README.md, summary.json, steps.csv)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`memcore generate RUN`: greedy continuation with a stored run's adapter."""
    from memcore.loading import load_base
    from memcore.runner import generate_from_run, stored_run_spec

    store = open_store(writable=False)
    rid = store.resolve(args.run)
    spec = stored_run_spec(store, rid)
    out = generate_from_run(store, rid, load_base(spec.model, store.home), args.prompt, args.max_new_tokens)
    if args.prompt is None:
        for text in out["text"]:
            print(text)
        div = out["divergence"]
        verdict = "yes" if div is None else f"no, first difference at token {div}"
        print(f"\n[recalled verbatim: {verdict}]", file=sys.stderr)
    else:
        print(args.prompt + out["text"][0])
    return 0
