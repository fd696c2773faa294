"""`memcore train | runs | show | export | generate`: a table from verbs to plain functions.

Every verb is an importable function taking parsed arguments, so tests call the same entry point as users.
User errors print one line (`memcore: error: ...`) and exit 2; nothing in the store is touched by them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

from memcore.config import DEFAULT_PROMPT, METHODS, MemcoreError, RunSpec
from memcore.records import RunSummary
from memcore.specs import OPTIONS, option_help, option_type, run_spec
from memcore.specs import default as spec_default


def _quiet() -> None:
    """Keep library chatter (progress bars of the loaders, deprecation notes) off the user's terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # else the environment above quiets it when it loads (importing it costs ~1 s)
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _store(writable: bool = True):
    """The store of the memcore home. writable=False for verbs that only read it (runs, show, export, generate,
    fit, predict, frontier): they work on a home whose disk is full."""
    from memcore.home import memcore_home
    from memcore.store import Store

    return Store(memcore_home(writable=writable))


# --- train ---------------------------------------------------------------------------------------------------


SOURCES = ("--text-file", "--text", "--sample", "--phonebook", "--random-tokens", "--jsonl")


def _given_sources(args: argparse.Namespace) -> list[str]:
    return [flag for flag in SOURCES if getattr(args, flag[2:].replace("-", "_"), None) is not None]


def _read_data(args: argparse.Namespace) -> dict[str, Any]:
    """The DataSpec fields naming what to memorize: text, phonebook, pairs or random_tokens."""
    from memcore.data import read_jsonl, read_sample, read_text_file
    from memcore.textio import decode_text

    given = _given_sources(args)
    if len(given) > 1:
        raise MemcoreError(f"give only one of {', '.join(SOURCES)} (got {' and '.join(given)})")
    if args.jsonl is None and (args.jsonl_fields is not None or args.jsonl_line is not None):
        raise MemcoreError("--jsonl-fields and --jsonl-line only apply with --jsonl FILE")
    if (args.jsonl is not None or args.phonebook is not None) and (args.prompt != DEFAULT_PROMPT or args.no_prompt):
        raise MemcoreError("--prompt and --no-prompt do not apply to --jsonl or --phonebook: every sample brings its "
                           "own prompt")
    if args.text_file == "-":
        return {"text": decode_text(sys.stdin.buffer.read(), "standard input")}
    if args.text_file is not None:
        return {"text": read_text_file(args.text_file)}
    if args.sample is not None:
        return {"text": read_sample(args.sample)}
    if args.text is not None:
        return {"text": args.text}
    if args.phonebook is not None:
        return {"phonebook": args.phonebook}
    if args.random_tokens is not None:
        return {"random_tokens": args.random_tokens}
    if args.jsonl is not None:
        fields = None
        if args.jsonl_fields is not None:
            parts = [p.strip() for p in args.jsonl_fields.split(",")]
            if len(parts) != 2 or not all(parts):
                raise MemcoreError(f"--jsonl-fields takes two key names, PROMPT,TARGET; got {args.jsonl_fields!r}")
            fields = (parts[0], parts[1])
        data = read_jsonl(args.jsonl, fields, args.jsonl_line)
        where = "standard input" if args.jsonl == "-" else args.jsonl
        print(f"{where}: {data.layout} layout ({data.fields[0]} -> {data.fields[1]}), {len(data.pairs)} sample"
              f"{'s' if len(data.pairs) != 1 else ''}", file=sys.stderr)
        if data.note:
            print(data.note, file=sys.stderr)
        return {"pairs": data.pairs}
    raise MemcoreError("nothing to memorize: give --text-file FILE (or - for stdin), --text, --sample NAME, "
                       "--phonebook N, --random-tokens N or --jsonl FILE")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The memcore.specs settings a `train` or `sweep` command line gives: every flag named after a spec option,
    the data its source flags read, the prompt (None with --no-prompt) and, for train, --full-budget."""
    settings = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    settings.update(_read_data(args), prompt=None if args.no_prompt else args.prompt)
    if hasattr(args, "full_budget"):
        settings["stop_when_recalled"] = not args.full_budget
    return settings


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of a `memcore train` command line (memcore.specs.run_spec).
    Raises MemcoreError naming the bad value."""
    return run_spec(_settings(args))


class StopFlag:
    """First Ctrl-C asks the run to stop after the current step (adapter kept); a second one aborts."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def install(self) -> Callable[[], None]:
        """Install the handlers; returns a function that puts the previous ones back."""
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

        for sig in old:
            signal.signal(sig, handler)
        return lambda: [signal.signal(sig, h) for sig, h in old.items()] and None


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
    from memcore.runner import execute_iter, prepare

    spec = spec_from_args(args)
    store = _store()
    if not args.json:
        print(f"loading {spec.model.name} ...", file=sys.stderr)
    base, samples = prepare(spec, home=store.home)
    return _run_in_foreground(args, spec.train.max_steps,
                              lambda stop: execute_iter(spec, store, base, samples, should_stop=stop, label=args.label))


def cmd_resume(args: argparse.Namespace) -> int:
    """`memcore resume RUN`: continue a stopped, interrupted or failed run from its checkpoint."""
    from memcore.runner import check_resumable, resumable_step, resume_iter

    store = _store()
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


def _print_summary(s: RunSummary) -> None:
    how = "confirmed by greedy generate" if s.verified_by_generate else "every teacher-forced argmax right"
    recall = f"yes, verbatim ({how})" if s.recalled else f"no: greedy decoding diverges at token {s.first_divergence}"
    lines = [
        f"run            {s.run_id}  ({s.ending})",
        f"steps          {s.steps}  ({_fmt(s.seconds_per_step, 2)} s/step)",
        f"recalled       {recall}",
        f"verbatim       first {s.verbatim_prefix} of {s.n_tokens} tokens in order   "
        f"token accuracy {s.token_accuracy:.3f}   converged: {'yes' if s.converged else 'no'}",
        f"tokens above τ {s.n_above}/{s.n_tokens}   argmax right {s.n_correct}/{s.n_tokens}",
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


# --- runs, show, export, generate -------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    """`memcore runs`: the stored runs as a table (or JSON), filtered by method, model, status."""
    store = _store(writable=False)
    runs = store.runs(method=args.method, model=args.model, status=args.status)
    if args.json:
        keys = ("id", "status", "created", "started", "finished", "model", "method", "rank", "length", "seed", "sweep",
                "label", "steps", "error")
        print(json.dumps([{k: r[k] for k in keys} | {"summary": r["summary"].to_dict() if r["summary"] else {}}
                          for r in runs]))
        return 0
    if not runs:
        print("no runs yet: try `memcore train --sample lighthouse`")
        return 0
    head = (f"{'run':<22} {'status':<11} {'model':<14} {'adapter':<7} {'method':<9} {'rank':>4} {'tokens':>6} "
            f"{'steps':>5} {'recalled':>8} {'ΔL':>7}")
    print(head)
    for r in runs:
        s = r["summary"]
        kind = r["spec"].get("adapter", {}).get("kind", "lora")
        recalled = ("yes" if s.recalled else "no") if s else "-"
        print(f"{r['id']:<22} {r['status']:<11} {str(r['model'])[:14]:<14} {kind:<7} {r['method']:<9} {r['rank']:>4} "
              f"{_fmt(r['length']):>6} {_fmt(r['steps']):>5} {recalled:>8} {_fmt(s.delta_loss if s else None):>7}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`memcore show RUN`: one run's summary and its stubborn tokens (or JSON)."""
    store = _store(writable=False)
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

    store = _store(writable=False)
    rid = store.resolve(args.run)
    dest = export_run(store, rid, args.dir)
    kind = "bypass adapter (memcore)" if (dest / "bypass_config.json").is_file() else "PEFT adapter"
    print(f"exported run {rid} to {dest} ({kind}, model card README.md, summary.json, steps.csv)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`memcore generate RUN`: greedy continuation with a stored run's adapter."""
    from memcore.loading import load_base
    from memcore.runner import generate_from_run, stored_run_spec

    store = _store(writable=False)
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


# --- sweep ------------------------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    """`memcore sweep`: a grid of runs into the store, resumable; optionally its table as CSV/JSON."""
    import time

    import pandas as pd

    from memcore.sweep import SweepSpec, completed_keys, points, run_sweep, sweep_table

    if not _given_sources(args):
        args.sample = "long_archive"
    # the grid's first point stands for it; points vary rank, length, method, seed and noise (fixed budget each)
    template = run_spec(_settings(args) | {"rank": args.ranks[0], "method": args.methods[0], "seed": args.seeds[0],
                                           "stop_when_recalled": False,
                                           "history": "full" if args.full_history else "decimated"})
    sweep = SweepSpec(template=template, ranks=tuple(args.ranks), lengths=tuple(args.lengths),
                      methods=tuple(args.methods), seeds=tuple(args.seeds), noises=tuple(args.noises), name=args.name)
    store = _store()
    total = len(points(sweep))
    done = len(completed_keys(store, sweep))
    print(f"sweep {sweep.id}: {total} points, {done} already completed, {total - done} to run", file=sys.stderr)
    flag = StopFlag()
    restore = flag.install()
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="run", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if args.backend == "ray":
            from memcore.sweep_ray import run_sweep_ray

            stream = run_sweep_ray(sweep, store, address=args.address, cpus_per_run=args.cpus_per_run,
                                   gpus_per_run=args.gpus_per_run, retries=args.retries, should_stop=flag,
                                   batch=args.batch)
        else:
            stream = run_sweep(sweep, store, should_stop=flag, batch=args.batch)
        for point in stream:
            v = point.values
            where = f"{v['method']} r={v['rank']} ℓ={v['length']}"
            if point.stopped:  # cut off mid-way: not a completed point (a re-run continues it)
                bar.set_postfix_str(f"{where} stopped at step {point.summary.steps}", refresh=True)
                continue
            bar.update(1)
            what = f"FAILED ({point.error[:60]})" if point.error else f"ΔL {point.summary.delta_loss:.3f}"
            bar.set_postfix_str(f"{where} {what}", refresh=True)
    finally:
        bar.close()
        restore()
    rows = sweep_table(store, sweep.id)
    left = total - len(rows)
    status = "stopped" if flag.stop else "completed"
    msg = (f"sweep {sweep.id} {status}: {len(rows)}/{total} points in the store "
           f"({time.perf_counter() - t0:.0f} s this time)")
    if left:
        msg += f"; run the same command again to finish the {left} missing"
    print(msg, file=sys.stderr)
    if args.out:
        pd.DataFrame(rows).drop(columns=["run_id"]).to_csv(args.out, index=False)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"sweep": sweep.id, "status": status, "points": total, "completed": len(rows), "rows": rows}))
    return 0 if not flag.stop else 130


# --- fit, predict ------------------------------------------------------------------------------------------------


def _law_table(args: argparse.Namespace, required: tuple[str, ...] | None = None) -> Any:
    """memcore.law.law_table of --csv (else the store's runs), --method and --model, with the `required` columns
    (default: the law's); its notes go to stderr."""
    from memcore.law import LAW_COLUMNS, law_table

    sweep = getattr(args, "sweep", None)
    if sweep and args.csv:
        raise MemcoreError("give --csv or --sweep, not both: --sweep picks a sweep (or frontier search) in the store")
    store = None if args.csv else _store(writable=False)
    if sweep and not store.runs(sweep=sweep):
        known = sorted({r["sweep"] for r in store.runs() if r["sweep"]})
        raise MemcoreError(f"no sweep or frontier search {sweep!r} in the store"
                           + (f"; the store holds {', '.join(known)}" if known else " (it holds none)"))
    df, notes = law_table(args.csv, store, method=args.method, model=args.model, sweep=sweep,
                          required=required or LAW_COLUMNS)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return df


def cmd_fit(args: argparse.Namespace) -> int:
    """`memcore fit`: the memory law on a CSV or the store's runs (memcore.law.fit_all), printed or JSON. A table
    that holds several methods is fitted method by method (points trained differently need not share one law),
    unless --method picks one; its JSON is then {"methods": [...], "by_method": {method: fit}}."""
    from memcore.law import fit_all, method_rows

    df = _law_table(args)
    methods = sorted(df["method"].dropna().unique()) if "method" in df.columns and not args.method else []
    if len(methods) <= 1:
        fits = fit_all(df, with_p_eff=True)
        if args.json:
            print(json.dumps(fits.to_dict()))
        else:
            _print_fit(fits.to_dict(), fits.regime.describe(), fits.fitted_on)
        return 0
    by_method, errors = {}, {}
    for m in methods:
        try:
            by_method[m] = fit_all(method_rows(df, m), with_p_eff=True)
        except MemcoreError as e:
            errors[m] = str(e)
    if not by_method:
        raise MemcoreError("no method's points can be fitted: "
                           + "; ".join(f"{m}: {why}" for m, why in errors.items()))
    if args.json:
        print(json.dumps({"methods": methods, "by_method": {m: f.to_dict() for m, f in by_method.items()},
                          "errors": errors}))
        return 0
    print(f"the table holds {', '.join(methods)}: each method is fitted on its own points (choose one with --method)")
    for m in methods:
        print(f"\n== {m} ==")
        if m in errors:
            print(f"cannot fit: {errors[m]}")
            continue
        f = by_method[m]
        _print_fit(f.to_dict(), f.regime.describe(), f.fitted_on)
    return 0


def _print_fit(out: dict[str, Any], regime: str, fitted_on: str) -> None:
    """One fit (LawFits.to_dict) as text: the regime, the parameters with intervals, R², the forms compared."""
    print(regime)
    print(f"ΔL = C · r^α · ℓ^(−β) + b   {fitted_on}")
    for k in ("C", "alpha", "beta", "b"):
        lo, hi = out["intervals"][k]
        print(f"  {k:<6} {out[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    print(f"  R² {out['r2']:.4f}   RMSE {out['rmse']:.4f}   leave-one-out RMSE {out['loo_rmse']:.4f}")
    pe = out.get("p_eff_fit")
    if pe and "error" not in pe:
        print(f"in P_eff: C {pe['C']:.4g}  α {pe['alpha']:.4f}  β {pe['beta']:.4f}  b {pe['b']:.4f}  R² {pe['r2']:.4f}")
    cmp_ = out["comparison"]
    print("model comparison (AIC, lower is better): "
          + ", ".join(f"{f} {a:.1f} (R² {cmp_['r2'][f]:.4f})" for f, a in cmp_["aic"].items()))
    print(f"the data prefer the {cmp_['preferred']} form" if cmp_.get("clear", True)
          else "the data do not tell the forms apart (AIC within 2)")
    if cmp_["preferred"] != out.get("form", "power") and cmp_.get("clear", True):
        pref = cmp_["forms"][cmp_["preferred"]]
        formula = "M · (1 − exp(−C · r^α · ℓ^(−β)))" if cmp_["preferred"] == "saturating" else cmp_["preferred"]
        print(f"ΔL = {formula}   R² {pref['r2']:.4f}")
        for k, (lo, hi) in pref["intervals"].items():
            print(f"  {k:<6} {pref[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    for n in out.get("notes") or []:
        print(f"note: {n}")


SEARCH_ONLY = ("ranks", "seeds", "resolution", "max_length", "start_length", "batch", "name")


def cmd_frontier(args: argparse.Namespace) -> int:
    """`memcore frontier`: the verbatim-recall frontier and capacity of a table (memcore.frontier), or with --search
    found by bisection (memcore.search)."""
    if args.search:
        return _frontier_search(args)
    given = [f"--{n.replace('_', '-')}" for n in SEARCH_ONLY if getattr(args, n, None) is not None]
    given += [f for f in SOURCES if getattr(args, f[2:].replace("-", "_"), None) is not None]
    if given:
        raise MemcoreError(f"{', '.join(given)} apply only with --search (without it, frontier reads a sweep's table)")
    df = _law_table(args, required=("rank", "length"))
    _print_frontier(args, df)
    return 0


def _frontier_search(args: argparse.Namespace) -> int:
    """`memcore frontier --search`: memcore.search.FrontierSearch into the store, progress on stderr, then the
    brackets, the fitted frontier over every probe and the commands that read the search like a sweep."""
    import time

    from tqdm import tqdm

    from memcore.search import DEFAULT_RESOLUTION, DEFAULT_START, FrontierSearch, SearchSpec, search_result

    if args.csv:
        raise MemcoreError("--csv reads a sweep's table; --search trains its own probes (drop one of them)")
    if args.sweep:
        raise MemcoreError("--sweep reads a stored sweep or search; with --search, name the new one with --name")
    if not _given_sources(args):
        args.random_tokens = 512
    settings = _settings(args)
    settings["model"] = args.model or spec_default("model")
    template = run_spec(settings | {"rank": 1, "method": args.method or "sft", "seed": 0,
                                    "history": "full" if args.full_history else "decimated"})
    search = SearchSpec(template=template, ranks=tuple(args.ranks or (1, 2, 4, 8)),
                        methods=(args.method or "sft",), seeds=tuple(range(args.seeds or 1)),
                        resolution=args.resolution if args.resolution is not None else DEFAULT_RESOLUTION,
                        max_length=args.max_length, start_length=args.start_length or DEFAULT_START, name=args.name)
    store = _store()
    flag = StopFlag()
    restore = flag.install()
    t0 = time.perf_counter()
    try:
        fs = FrontierSearch(search, store, batch=args.batch or "auto", should_stop=flag)
        print(f"frontier search {search.id}: ranks {', '.join(map(str, search.ranks))}, {len(search.seeds)} seed(s), "
              f"{search.methods[0]}, lengths up to {fs.longest} tokens, within {search.resolution:.0%}",
              file=sys.stderr)
        bar = tqdm(unit="probe", file=sys.stderr, dynamic_ncols=True)
        try:
            for p in fs.run():
                bar.n = p.probes_done
                bar.set_postfix_str(f"{p.in_flight} training, {p.steps} steps   " + "  ".join(
                    f"r={b.rank} [{b.lo or '?'}, {b.hi or '?'}]" for b in p.brackets), refresh=True)
        finally:
            bar.close()
    finally:
        restore()
    result = search_result(fs, p)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result.to_dict() | {"seconds": took}))
        return 130 if flag.stop else 0
    state = "stopped (run the same command again to go on)" if flag.stop else "done"
    print(f"frontier search {search.id} {state}: {p.probes_done} probes, {p.steps} steps, {took:.0f} s")
    for row in result.rows():
        where = {"bracketed": f"between {row['lo']} and {row['hi']} tokens",
                 "at least": f"at least {row['lo']} tokens (the longest the data hold)",
                 "at most": f"under {row['hi']} tokens (even the shortest failed)",
                 "open": f"not yet bracketed ({row['lo'] or '?'} to {row['hi'] or '?'})"}[row["outcome"]]
        rates = [f"{n} token{'s' if n != 1 else ''} recalled by {row[k]:.0%} of seeds" for n, k in
                 ((row["lo"], "lo_rate"), (row["hi"], "hi_rate")) if n is not None]
        print(f"  rank {row['rank']:<4} ℓ* {where}   ("
              + "; ".join(rates + [f"{row['probes']} lengths, {row['steps']} steps"]) + ")")
    args.method = search.methods[0]
    if not store.runs(sweep=search.id, status="completed"):
        return 130 if flag.stop else 0
    print()
    df = _law_table(argparse.Namespace(csv=None, method=args.method, model=None, sweep=search.id),
                    required=("rank", "length"))
    _print_frontier(args, df)
    print(f"\nthe probes are the runs of sweep {search.id}: `memcore frontier --sweep {search.id}`, "
          f"`memcore predict --verbatim --length N --sweep {search.id}`, `memcore fit --sweep {search.id}`")
    return 130 if flag.stop else 0


def _print_frontier(args: argparse.Namespace, df: Any) -> None:
    """Each method's frontier in `df` (or --method's) as text, or all of them as one JSON object (--json)."""
    from memcore.frontier import REFERENCE_BITS_PER_PARAM, frontier_from_table

    methods = [args.method] if args.method else (sorted(df["method"].unique()) if "method" in df.columns else [None])
    result = {}
    for m in methods:
        per_rank, fit, why = frontier_from_table(df, m)
        result[m or "all"] = {
            "per_rank": [vars(p) | {"recall_rate": {str(k): v for k, v in p.recall_rate.items()}} for p in per_rank],
            "fit": fit.to_dict() if fit else None, "fit_error": why,
            "fit_per_rank": [{"rank": p.rank, "ell_star": float(fit.ell_star(p.rank)),
                              "interval": list(fit.ell_star_interval(p.rank)),
                              "bits_per_param": fit.bits_per_param(p.rank)} for p in per_rank] if fit else None}
        if args.json:
            continue
        print(f"{m or 'all points'}: longest length recalled verbatim "
              "(recall rate crossing 1/2, interpolated in log ℓ)")
        for p in per_rank:
            rates = "  ".join(f"{k}:{v:.0%}" for k, v in p.recall_rate.items())
            sym = "≥" if p.bound == "at least" else "≤" if p.bound == "at most" else "≈"
            line = f"  rank {p.rank:<4} ℓ* {sym} {p.ell_star:7.1f} tokens"
            if p.bits_per_param is not None:
                line += f"   {p.bits_per_param:.3f} bits/param at P_eff {p.p_eff:,.0f}"
            if fit:
                lo, hi = fit.ell_star_interval(p.rank)
                line += f"   fitted {fit.ell_star(p.rank):.1f} [{lo:.1f}, {hi:.1f}]"
            print(line + f"   (recall by length  {rates})")
        if fit:
            lo, hi = fit.gamma_interval
            print(f"  fitted frontier ℓ*(r) = {math.exp(fit.a):.3g} · r^{fit.gamma:.3f}   γ 95% [{lo:.3f}, {hi:.3f}]   "
                  f"sharpness k {fit.k:.1f}   {fit.n} points")
            if fit.capacity_bits_per_token is not None:
                print(f"  counting {fit.capacity_bits_per_token:.2f} bits per recalled token, at the frontier that is "
                      + ", ".join(f"r={p.rank}: {fit.bits_per_param(p.rank):.3f}" for p in per_rank)
                      + " bits/param; references: "
                      + ", ".join(f"{v} ({k})" for k, v in REFERENCE_BITS_PER_PARAM.items()))
            for n in fit.notes:
                print(f"  note: {n}")
        else:
            print(f"  no fitted frontier: {why}")
    if args.json:
        print(json.dumps(result))


def cmd_predict(args: argparse.Namespace) -> int:
    """`memcore predict`: ΔL at a rank and length, or with --verbatim the smallest rank for a length."""
    from memcore.law import fit_law, smallest_rank

    if args.verbatim:
        return _predict_verbatim(args, _law_table(args, required=("rank", "length")))
    df = _law_table(args)
    fit = fit_law(df["rank"].to_numpy(float), df["length"].to_numpy(float), df["delta_loss"].to_numpy(float),
                  args.form)
    if args.target_delta_loss is not None:
        r = smallest_rank(fit, args.length, args.target_delta_loss)
        out = {"length": args.length, "target_delta_loss": args.target_delta_loss, "smallest_rank": r}
        msg = (f"smallest rank predicted to reach ΔL {args.target_delta_loss} at length {args.length}: {r}"
               if r is not None
               else f"no rank up to 4096 is predicted to reach ΔL {args.target_delta_loss} at length {args.length}")
    else:
        if args.rank is None:
            raise MemcoreError("give --rank R (to predict ΔL) or --target-delta-loss X (to find the rank)")
        v = float(fit.predict(args.rank, args.length))
        out = {"rank": args.rank, "length": args.length, "delta_loss": v}
        msg = (f"predicted ΔL at rank {args.rank}, length {args.length}: {v:.4f} nats/token "
               f"({fit.form} law, R² {fit.r2:.3f})")
    print(json.dumps(out) if args.json else msg)
    return 0


def _predict_verbatim(args: argparse.Namespace, df: Any) -> int:
    from memcore.frontier import frontier_from_table, smallest_verbatim_rank
    from memcore.law import one_method

    if args.rank is not None or args.target_delta_loss is not None:
        raise MemcoreError("--verbatim answers the smallest rank for --length; drop --rank and --target-delta-loss")
    df, method, note = one_method(df, args.method)
    _, fit, why = frontier_from_table(df)
    if fit is None:
        raise MemcoreError(f"cannot predict a verbatim rank: {why}")
    ans = smallest_verbatim_rank(fit, args.length)
    out = ans.to_dict() | {"method": method, "frontier": {"a": fit.a, "gamma": fit.gamma}}
    if note:
        out["notes"] = [note, *out["notes"]]
    if args.json:
        print(json.dumps(out))
        return 0
    for n in out["notes"]:
        print(f"note: {n}", file=sys.stderr)
    lo, hi = ans.interval
    with_method = f" with {method}" if method else ""
    print(f"smallest rank predicted to recall {args.length} tokens verbatim{with_method}: {ans.rank} "
          f"(95% [{lo}, {hi if hi is not None else 'unbounded'}]; "
          f"frontier ℓ*(r) = {math.exp(fit.a):.3g} · r^{fit.gamma:.3f})"
          + ("  [extrapolated]" if ans.extrapolated else ""))
    return 0


# --- parser --------------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A default as the help text shows it: numbers and plain words bare, other text quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and not value.replace("-", "").replace("_", "").isalnum():
        return repr(value)
    return str(value)


def _spec_flag(group: Any, name: str, *, help: str | None = None, note: str = "", default: Any = MISSING,
               **kwargs: Any) -> None:
    """Add --NAME for the spec option `name`: its type, choices, default and help come from the dataclass field
    (memcore.specs); `help` replaces the field's docstring, `note` follows it, `default` replaces the field's."""
    kind, choices = option_type(name)
    value = spec_default(name) if default is MISSING else default
    text = (help if help is not None else option_help(name)) + note
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        group.add_argument(flag, action="store_true", help=text, **kwargs)
        return
    if value is not None:
        text += f" Default: {_shown(value)}"
    group.add_argument(flag, type=kind, choices=choices, default=value, help=text.replace("%", "%%"), **kwargs)


SEED_HELP = "seed for adapter init, dropout, noise and PhoneBook."


def _batch_size(text: str) -> int | str:
    """--batch: a whole number >= 1, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes a whole number or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch must be at least 1, got {n}")
    return n


def _run_flags(p: argparse.ArgumentParser, omit: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """The flags that define a run, shared by `train` and `sweep`: what to memorize, model, adapter, training.
    `omit` leaves out the options a sweep varies over its grid; `defaults` replaces some defaults (the sweep's
    budget and placement)."""
    defaults = defaults or {}

    def spec(group: Any, name: str, **kw: Any) -> None:
        if name not in omit:
            kw.setdefault("default", defaults.get(name, MISSING))
            _spec_flag(group, name, **kw)

    src = p.add_argument_group("what to memorize")
    src.add_argument("--text-file", help="text file to memorize (UTF-8, UTF-16 or UTF-32), or - for standard input")
    spec(src, "text")
    src.add_argument("--sample", help="a shipped sample passage (lighthouse, recipe, orbit, long_archive)"
                     + ("; a sweep without another source uses long_archive" if "full_budget" in omit else ""))
    spec(src, "phonebook", metavar="N")
    spec(src, "random_tokens", metavar="N")
    src.add_argument("--jsonl", metavar="FILE", help="JSONL of prompt/target pairs (or - for stdin): the paper's "
                     "PhoneBook lines {query, target} (all trained as one batch) or long-context lines {question, "
                     "matching} (one long target)")
    src.add_argument("--jsonl-fields", metavar="PROMPT,TARGET",
                     help="the JSONL keys holding the prompt and the target, for other layouts")
    src.add_argument("--jsonl-line", type=int, metavar="N", help="train only the N-th JSON line (1-based)")
    spec(src, "prompt")
    src.add_argument("--no-prompt", action="store_true", help="condition the target on the BOS token only")
    spec(src, "chat_template")
    spec(src, "length", metavar="L")
    spec(src, "noise", metavar="F")
    spec(src, "max_tokens", metavar="N")
    m = p.add_argument_group("model")
    spec(m, "model")
    spec(m, "quant")
    spec(m, "device")
    spec(m, "dtype")
    spec(m, "trust_remote_code")
    a = p.add_argument_group("adapter")
    spec(a, "adapter")
    spec(a, "rank")
    spec(a, "alpha")
    spec(a, "dropout")
    spec(a, "targets")
    layers_note = "" if "layers" in defaults else " Default: all for LoRA, paper for bypass."
    spec(a, "layers", note=layers_note, default=defaults.get("layers"))
    o = p.add_argument_group("training")
    spec(o, "method")
    spec(o, "tau")
    spec(o, "lr")
    spec(o, "max_steps")
    spec(o, "max_seconds")
    if "full_budget" not in omit:
        o.add_argument("--full-budget", action="store_true",
                       help="train the whole step budget even once the passage is recalled")
    spec(o, "until", help=None if "full_budget" not in omit else (
        "'budget': train the whole step budget (a sweep's points never stop when recalled); 'converged': also stop "
        "once every target token is above τ, or once ΔL has gained less than the plateau tolerance over the "
        "plateau window (a plateau); the step budget stays the cap."))
    spec(o, "plateau_window")
    spec(o, "plateau_tol")
    spec(o, "ot_when_empty")
    spec(o, "window")
    spec(o, "weight_decay")
    spec(o, "seed", help=SEED_HELP)
    spec(o, "checkpoint_every")
    spec(o, "recompute")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (with a pointer to --help) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every verb; spec flags take their help and defaults from memcore.specs."""
    p = _Parser(prog="memcore", description="Watch a language model memorize text.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="memorize a passage (or a PhoneBook) with a LoRA adapter")
    _run_flags(t)
    t.add_argument("--label", help="a free-text label stored with the run")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.set_defaults(func=cmd_train)

    rs = sub.add_parser("resume", help="continue an interrupted or stopped run from its last checkpoint")
    rs.add_argument("run", help="run id, unique prefix, or 'last'")
    rs.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    rs.set_defaults(func=cmd_resume)

    r = sub.add_parser("runs", help="list the runs in the store")
    r.add_argument("--method", choices=METHODS, help="only runs of this method")
    r.add_argument("--model", help="only runs of this model (as it was given: default, a hub id or a folder)")
    r.add_argument("--status",
                   help="only runs with this status (queued, running, completed, stopped, failed, interrupted)")
    r.add_argument("--json", action="store_true", help="print a JSON list of runs")
    r.set_defaults(func=cmd_runs)

    s = sub.add_parser("show", help="a run's summary and its stubborn tokens")
    s.add_argument("run", help="run id, unique prefix, or 'last'")
    s.add_argument("--json", action="store_true", help="print the run's spec, status and summary as one JSON object")
    s.set_defaults(func=cmd_show)

    e = sub.add_parser("export", help="copy a run's PEFT adapter, summary and metrics to a folder")
    e.add_argument("run", help="run id, unique prefix, or 'last'")
    e.add_argument("dir", help="the folder to copy into: new or empty (nothing is overwritten)")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="greedy generation from a run's memorized model")
    g.add_argument("run", help="run id, unique prefix, or 'last'")
    g.add_argument("--prompt", help="text to continue (default: the run's own prompt, compared with its target)")
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate (default: the target's length; 100 after --prompt)")
    g.set_defaults(func=cmd_generate)
    sw = sub.add_parser("sweep",
                        help="a fixed-budget grid of runs (ranks x lengths x methods x seeds x noise) for the law")
    sw.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help=f"{option_help('rank')} The grid's ranks: a point per value.")
    sw.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                    help="target tokens (first ℓ of the text)")
    sw.add_argument("--methods", nargs="+", default=["sft", "memft-ot"], choices=METHODS,
                    help=f"{option_help('method')} A point per method.")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0], help=f"{SEED_HELP} A point per seed.")
    sw.add_argument("--noises", type=float, nargs="+", default=[0.0],
                    help="fractions of target tokens replaced at random")
    sw.add_argument("--name", help="sweep id (default: a hash of its definition); the same id resumes")
    sw.add_argument("--out", help="write the completed points as CSV (rank, length, delta_loss, p_eff, method, ...)")
    sw.add_argument("--json", action="store_true",
                    help="print the sweep's id, status and completed points as one JSON object")
    sw.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="run points here, or as Ray tasks")
    sw.add_argument("--batch", type=_batch_size, default="auto", metavar="N|auto",
                    help="points trained together through one forward of the model (each recorded exactly as if "
                    "alone); auto: as many as fit in a quarter of the free memory, up to 64; 1: one at a time. On "
                    "Ray, the points each task trains together (auto: 8). Default: auto")
    sw.add_argument("--address", help="Ray cluster: auto, ray://host:port, or unset for a new local instance")
    sw.add_argument("--cpus-per-run", type=float, default=1, help="Ray: CPUs each point asks for")
    sw.add_argument("--gpus-per-run", type=float, default=0, help="Ray: GPUs each point asks for")
    sw.add_argument("--retries", type=int, default=2,
                    help="Ray: retries of a failing point before it is recorded as failed")
    sw.add_argument("--full-history", action="store_true",
                    help="keep every step's per-token history for replay (default: about 300 snapshots per point, "
                    "denser early)")
    # every train flag that makes sense for a whole grid; a fixed small budget on the paper's placement by default
    _run_flags(sw, omit=("rank", "method", "seed", "noise", "length", "full_budget"),
               defaults={"max_steps": 10, "layers": "paper", "lr": 1e-2})
    sw.set_defaults(func=cmd_sweep)

    f = sub.add_parser("fit", help="fit the memory law ΔL = C·r^α·ℓ^(−β) + b over runs or a CSV")
    f.add_argument("--csv", help="CSV with columns rank, length, delta_loss (optional p_eff, method, seed)")
    f.add_argument("--model", help="only runs of this model")
    f.add_argument("--sweep", metavar="ID", help="only the runs of this sweep or frontier search in the store")
    f.add_argument("--method", choices=METHODS, help="only runs (or CSV rows) of this method")
    f.add_argument("--json", action="store_true", help="print one JSON object (C, alpha, beta, b, r2, *_ci, ...)")
    f.set_defaults(func=cmd_fit)

    pr = sub.add_parser("predict", help="ΔL at (rank, length), or the smallest rank reaching a target ΔL")
    pr.add_argument("--rank", type=int, help=f"{option_help('rank')} Predict ΔL at this rank.")
    pr.add_argument("--length", type=int, required=True, help="target tokens ℓ")
    pr.add_argument("--target-delta-loss", type=float, metavar="X",
                    help="instead of --rank: the smallest rank predicted to reach ΔL X (nats/token) at --length")
    pr.add_argument("--verbatim", action="store_true",
                    help="the smallest rank predicted to recall --length tokens verbatim, from the recall frontier of "
                    "a sweep")
    pr.add_argument("--form", default="power", choices=("power", "saturating"),
                    help="the law fitted: power, C·r^α·ℓ^(−β) + b (default), or saturating, "
                    "M·(1 − exp(−C·r^α·ℓ^(−β)))")
    pr.add_argument("--csv", help="a sweep CSV with rank, length, delta_loss (or exact_recall for --verbatim) "
                    "instead of the store's completed runs")
    pr.add_argument("--model", help="only runs of this model")
    pr.add_argument("--sweep", metavar="ID", help="only the runs of this sweep or frontier search in the store")
    pr.add_argument("--method", choices=METHODS, help="only runs (or CSV rows) of this method")
    pr.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    pr.set_defaults(func=cmd_predict)

    fr = sub.add_parser("frontier", help="the verbatim-recall frontier of a sweep: longest length recalled per rank, "
                        "a fitted ℓ*(r), and bits stored per parameter there")
    fr.add_argument("--csv",
                    help="a sweep CSV with rank, length, exact_recall (and p_eff, bits_per_param for capacity)")
    fr.add_argument("--model", help="only runs of this model; with --search, the model searched (a hub id or a local "
                    "folder; default the default model)")
    fr.add_argument("--method", choices=METHODS,
                    help="only this method (default: each method in turn); with --search, the method trained (default "
                    "sft)")
    fr.add_argument("--sweep", metavar="ID", help="only the runs of this sweep or frontier search in the store")
    fr.add_argument("--json", action="store_true", help="print the frontier of each method as one JSON object")
    srch = fr.add_argument_group("search (--search)")
    srch.add_argument("--search", action="store_true",
                      help="find the frontier by training: for each rank, bisection in log length, each probe trained "
                      "until recalled, converged on a plateau or the step budget, probes of all ranks and seeds "
                      "trained together; every probe is stored as a run of a sweep named after the search. Other "
                      "flags: what to memorize (default --random-tokens 512), model (--model; default the default "
                      "model), adapter (default the bypass on the paper's layer), training (default lr 3e-2, 300 "
                      "steps, --until converged). Running the same command again reuses its finished probes")
    srch.add_argument("--ranks", type=int, nargs="+", metavar="R", help="ranks to search (default 1 2 4 8)")
    srch.add_argument("--seeds", type=int, metavar="K",
                      help="seeds per probe, 0..K-1 (default 1); a length counts as recalled by at least half of them")
    srch.add_argument("--resolution", type=float, metavar="F",
                      help="stop once each rank's bracket is this narrow: longest failed / longest recalled <= 1 + F "
                      "(default 0.05)")
    srch.add_argument("--max-length", type=int, metavar="N",
                      help="longest length to probe (default: all the data hold)")
    srch.add_argument("--start-length", type=int, metavar="N",
                      help="the first probe's length at rank 1, times the rank at other ranks (default 32)")
    srch.add_argument("--batch", type=_batch_size, metavar="N|auto",
                      help="probes trained together (default auto: every bracket's probes, as memory allows)")
    srch.add_argument("--name", help="the search's id (default: a hash of its settings); the same id resumes")
    srch.add_argument("--full-history", action="store_true", help="keep every step's per-token history")
    _run_flags(fr, omit=("rank", "method", "seed", "length", "full_budget", "model"),
               defaults={"max_steps": 300, "layers": "paper", "lr": 3e-2, "until": "converged", "adapter": "bypass",
                         "dropout": 0.1})
    fr.set_defaults(func=cmd_frontier)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]). Returns the exit code: 0, 2 on a MemcoreError, 130 stopped."""
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`memcore runs | head -3`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except MemcoreError as e:
        print(f"memcore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memcore: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
