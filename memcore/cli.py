"""`memcore train | runs | show | export | generate`: a table from verbs to plain functions.

Every verb is an importable function taking parsed arguments, so tests call the same entry point as users.
User errors print one line (`memcore: error: ...`) and exit 2; nothing in the store is touched by them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memcore.config import (
    ADAPTERS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    METHODS,
    QUANTS,
    AdapterSpec,
    DataSpec,
    MemcoreError,
    ModelSpec,
    RunSpec,
    TrainSpec,
)


def _quiet() -> None:
    """Keep library chatter (progress bars of the loaders, deprecation notes) off the user's terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


def _store():
    from memcore.home import memcore_home
    from memcore.store import Store

    return Store(memcore_home())


# --- train ---------------------------------------------------------------------------------------------------


SOURCES = ("--text-file", "--text", "--sample", "--phonebook", "--random-tokens", "--jsonl")


def _given_sources(args: argparse.Namespace) -> list[str]:
    return [flag for flag in SOURCES if getattr(args, flag[2:].replace("-", "_"), None) is not None]


def _read_data(args: argparse.Namespace) -> dict[str, Any]:
    """The DataSpec fields naming what to memorize: text, phonebook, pairs or random_tokens."""
    from memcore.data import decode_text, read_jsonl, read_sample, read_text_file

    given = _given_sources(args)
    if len(given) > 1:
        raise MemcoreError(f"give only one of {', '.join(SOURCES)} (got {' and '.join(given)})")
    if args.jsonl is None and (args.jsonl_fields is not None or args.jsonl_line is not None):
        raise MemcoreError("--jsonl-fields and --jsonl-line only apply with --jsonl FILE")
    if (args.jsonl is not None or args.phonebook is not None) and (args.prompt != DEFAULT_PROMPT or args.no_prompt):
        raise MemcoreError("--prompt and --no-prompt do not apply to --jsonl or --phonebook: every sample brings its own prompt")
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
        print(f"{args.jsonl}: {data.layout} layout ({data.fields[0]} -> {data.fields[1]}), {len(data.pairs)} sample"
              f"{'s' if len(data.pairs) != 1 else ''}", file=sys.stderr)
        if data.note:
            print(data.note, file=sys.stderr)
        return {"pairs": data.pairs}
    raise MemcoreError("nothing to memorize: give --text-file FILE (or - for stdin), --text, --sample NAME, --phonebook N, "
                       "--random-tokens N or --jsonl FILE")


def _list_or_preset(value: str | None, presets: tuple[str, ...], kind: type = str) -> Any:
    if value is None:
        return None
    if value in presets:
        return value
    parts = [p for p in value.replace(",", " ").split() if p]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise MemcoreError(f"expected one of {', '.join(presets)} or a list of {kind.__name__} values, got {value!r}") from None


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    source = _read_data(args)
    prompt = None if args.no_prompt else args.prompt
    layers = args.layers if args.layers is not None else ("paper" if args.adapter == "bypass" else "all")
    model = ModelSpec(name=args.model, quant=args.quant, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter == "bypass" and (args.alpha is not None or args.targets != "all"):
        raise MemcoreError("--alpha and --targets apply to LoRA; the bypass adapter has no scaling and always wraps the MLP")
    adapter = AdapterSpec(rank=args.rank, alpha=args.alpha, dropout=args.dropout, kind=args.adapter,
                          targets=_list_or_preset(args.targets, ("attn", "mlp", "all")),
                          layers=_list_or_preset(layers, ("all", "paper"), int))
    data = DataSpec(**source, prompt=prompt, length=args.length, noise=args.noise,
                    chat_template=args.chat_template, seed=args.seed, max_tokens=args.max_tokens)
    train = TrainSpec(method=args.method, tau=args.tau, lr=args.lr, max_steps=args.max_steps, max_seconds=args.max_seconds,
                      stop_when_recalled=not args.full_budget, ot_when_empty=args.ot_when_empty, window=args.window,
                      seed=args.seed, weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                      recompute=args.recompute, history=getattr(args, "history", TrainSpec.history), until=args.until,
                      plateau_window=args.plateau_window, plateau_tol=args.plateau_tol)
    return RunSpec(model=model, adapter=adapter, data=data, train=train)


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
    if not enabled:
        return (lambda r: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(r: Any) -> None:
        bar.n = r.step
        bar.set_postfix_str(f"loss {r.loss:.3f}  above τ {r.n_above}/{r.n_tokens}  correct {r.n_correct}/{r.n_tokens}  "
                            f"recall {'yes' if r.recalled else 'no'}", refresh=False)
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
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from memcore.runner import execute_iter, prepare

    spec = spec_from_args(args)
    store = _store()
    if not args.json:
        print(f"loading {spec.model.name} ...", file=sys.stderr)
    base, samples = prepare(spec, home=store.home)
    return _run_in_foreground(args, spec.train.max_steps,
                              lambda stop: execute_iter(spec, store, base, samples, should_stop=stop, label=args.label))


def cmd_resume(args: argparse.Namespace) -> int:
    from memcore.runner import resumable_step, resume_iter

    store = _store()
    rid = store.resolve(args.run)
    step = resumable_step(store, rid)
    spec = RunSpec.from_dict(store.run(rid)["spec"])
    print(f"resuming run {rid} from its checkpoint at step {step}" if step is not None else
          f"run {rid} has no checkpoint (it stopped before its first one): training it again from step 0", file=sys.stderr)
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


def _print_summary(s: dict[str, Any]) -> None:
    how = "confirmed by greedy generate" if s.get("verified_by_generate", True) else "every teacher-forced argmax right"
    recall = f"yes, verbatim ({how})" if s["recalled"] else f"no: greedy decoding diverges at token {s['first_divergence']}"
    lines = [
        f"run            {s['run_id']}  ({s.get('status')}" + (f", {s['stop_reason']})" if s["stop_reason"] != s.get("status") else ")"),
        f"steps          {s['steps']}  ({_fmt(s['seconds_per_step'], 2)} s/step)",
        f"recalled       {recall}",
        f"tokens above τ {s['n_above']}/{s['n_tokens']}   argmax right {s['n_correct']}/{s['n_tokens']}",
        f"ΔL             {_fmt(s['delta_loss'])} nats/token  (base {_fmt(s['base_loss'])} -> {_fmt(s['loss'])})",
        f"bits stored    {_fmt(s['bits_stored'], 1)}  over P_eff {s['p_eff']:,} = {_fmt(s['bits_per_param'], 5)} bits/param",
        f"adapter        {s.get('adapter', 'lora')}: {s['adapter_dir']}",
    ]
    if s.get("verbatim_prefix") is not None:
        lines.insert(3, f"verbatim       first {s['verbatim_prefix']} of {s['n_tokens']} tokens in order   "
                        f"token accuracy {s['token_accuracy']:.3f}   converged: {'yes' if s.get('converged') else 'no'}")
    if s.get("history") == "decimated":
        lines.append(f"history        decimated: per-token snapshots at {s['snapshots']} of its {s['steps']} steps (scalars at every step)")
    for n in s.get("notes") or []:
        lines.append(f"note           {n}")
    print("\n".join(lines))


# --- runs, show, export, generate -------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    store = _store()
    runs = store.runs(method=args.method, model=args.model, status=args.status)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("id", "status", "created", "started", "finished", "model", "method", "rank", "length",
                                             "seed", "sweep", "label", "steps", "error")} | {"summary": r["summary"]} for r in runs]))
        return 0
    if not runs:
        print("no runs yet: try `memcore train --sample lighthouse`")
        return 0
    head = (f"{'run':<20} {'status':<11} {'model':<14} {'adapter':<7} {'method':<9} {'rank':>4} {'tokens':>6} {'steps':>5} "
            f"{'recalled':>8} {'ΔL':>7}")
    print(head)
    for r in runs:
        s = r["summary"]
        kind = r["spec"].get("adapter", {}).get("kind", "lora")
        print(f"{r['id']:<20} {r['status']:<11} {str(r['model'])[:14]:<14} {kind:<7} {r['method']:<9} {r['rank']:>4} {_fmt(r['length']):>6} "
              f"{_fmt(r['steps']):>5} {('yes' if s.get('recalled') else 'no') if s else '-':>8} {_fmt(s.get('delta_loss')):>7}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store()
    rid = store.resolve(args.run)
    r = store.run(rid)
    s = r["summary"]
    if args.json:
        print(json.dumps({k: r[k] for k in ("id", "status", "created", "started", "finished", "error", "spec", "summary")}))
        return 0
    if not s:
        print(f"run {rid}: {r['status']}" + (f" ({r['error']})" if r["error"] else "") + f", {r['steps']} steps recorded")
        return 0
    s["status"] = r["status"]
    _print_summary(s)
    if s.get("stubborn_tokens"):
        print("\nstubborn tokens (longest at or below τ):")
        for t in s["stubborn_tokens"]:
            steps = f"{t['steps_below']} step{'s' if t['steps_below'] != 1 else ''}"
            print(f"  #{t['index']:<5} {_pad(repr(t['token']), 16)} below τ for {steps}, last at step {t['last_below']}, p now {t['p']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _store()
    rid = store.resolve(args.run)
    src = store.adapter_dir(rid)
    if (src / "bypass_config.json").is_file():
        raise MemcoreError(f"run {rid} trained the paper's bypass adapter, which PEFT cannot load, so there is no PEFT adapter to "
                           f"export; its weights are in {src} (bypass_model.safetensors, bypass_config.json) and `memcore generate "
                           f"{rid}` uses them. Train with --adapter lora for an exportable adapter")
    if not (src / "adapter_config.json").is_file():
        raise MemcoreError(f"run {rid} has no saved adapter (status {store.run(rid)['status']})")
    dest = Path(args.dir)
    if dest.exists() and any(dest.iterdir()):
        raise MemcoreError(f"{dest} exists and is not empty; choose a new folder (nothing was overwritten)")
    shutil.copytree(src, dest, dirs_exist_ok=True)
    run = store.run(rid)
    (dest / "summary.json").write_text(json.dumps(run["summary"], indent=2))
    steps = store.steps(rid)
    if steps:
        with open(dest / "steps.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(steps[0]))
            w.writeheader()
            w.writerows(steps)
    print(f"exported run {rid} to {dest} (PEFT adapter, summary.json, steps.csv)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from memcore.loading import load_base
    from memcore.runner import generate_from_run, stored_run_spec

    store = _store()
    rid = store.resolve(args.run)
    spec = stored_run_spec(store, rid)
    out = generate_from_run(store, rid, load_base(spec.model, store.home), args.prompt, args.max_new_tokens)
    if args.prompt is None:
        for text in out["text"]:
            print(text)
        div = out["divergence"]
        print(f"\n[recalled verbatim: {'yes' if div is None else f'no, first difference at token {div}'}]", file=sys.stderr)
    else:
        print(args.prompt + out["text"][0])
    return 0


# --- sweep ------------------------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    import time

    import pandas as pd

    from memcore.sweep import SweepSpec, completed_keys, points, run_sweep, sweep_table

    if not _given_sources(args):
        args.sample = "long_archive"
    args.full_budget, args.method, args.seed, args.noise = True, args.methods[0], args.seeds[0], 0.0
    args.rank, args.length, args.label = args.ranks[0], None, None
    args.history = "full" if args.full_history else "decimated"
    base = spec_from_args(args)
    sweep = SweepSpec(base=base, ranks=tuple(args.ranks), lengths=tuple(args.lengths), methods=tuple(args.methods),
                      seeds=tuple(args.seeds), noises=tuple(args.noises), name=args.name)
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

            stream = run_sweep_ray(sweep, store, address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                                   retries=args.retries, should_stop=flag)
        else:
            stream = run_sweep(sweep, store, should_stop=flag)
        for s in stream:
            if s.get("status") == "stopped":  # cut off mid-way: not a completed point (a re-run continues it)
                bar.set_postfix_str(f"{s['method']} r={s['rank']} ℓ={s['length']} stopped at step {s['steps']}", refresh=True)
                continue
            bar.update(1)
            what = f"FAILED ({s['error'][:60]})" if s.get("failed") else f"ΔL {s['delta_loss']:.3f}"
            bar.set_postfix_str(f"{s['method']} r={s['rank']} ℓ={s['length']} {what}", refresh=True)
    finally:
        bar.close()
        restore()
    rows = sweep_table(store, sweep.id)
    left = total - len(rows)
    status = "stopped" if flag.stop else "completed"
    msg = f"sweep {sweep.id} {status}: {len(rows)}/{total} points in the store ({time.perf_counter() - t0:.0f} s this time)"
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


def law_data(args: argparse.Namespace, required: tuple[str, ...] = ("rank", "length", "delta_loss")) -> Any:
    """The (rank, length, delta_loss[, p_eff, method]) table a fit uses: a CSV file or finished runs in the store."""
    import pandas as pd

    if args.csv:
        from memcore.law import read_law_csv

        df = read_law_csv(args.csv, required=required)
    else:
        store = _store()
        rows = []
        for r in store.runs(method=args.method, model=args.model, status="completed", sweep=getattr(args, "sweep", None)):
            s = r["summary"]
            if s and s.get("delta_loss") is not None:
                n = s["n_tokens"]
                rows.append({"rank": r["rank"], "length": n, "delta_loss": s["delta_loss"], "p_eff": s["p_eff"],
                             "method": r["method"], "seed": r["seed"], "frac_above": s["n_above"] / n,
                             "token_accuracy": s["n_correct"] / n, "exact_recall": bool(s.get("exact_recall", s["recalled"])),
                             "stop_reason": s["stop_reason"], "bits_per_param": s["bits_per_param"],
                             "adapter": s.get("adapter", "lora"),
                             "data": next((k for k in ("random_tokens", "pairs", "phonebook") if r["spec"]["data"].get(k)), "text")})
        df = pd.DataFrame(rows, columns=["rank", "length", "delta_loss", "p_eff", "method", "seed", "frac_above", "token_accuracy",
                                         "exact_recall", "stop_reason", "bits_per_param", "adapter", "data"])
        if df.empty:
            raise MemcoreError("no completed runs match in the store (see `memcore runs`), or give --csv FILE")
        for col, what in (("adapter", "adapters"), ("data", "kinds of data")):
            kinds = sorted(df[col].unique())
            if len(kinds) > 1:
                print(f"note: the store's runs mix {what} ({', '.join(kinds)}); points trained differently need not lie on one "
                      "law or frontier: fit one sweep's CSV (`memcore sweep --out`) for a clean answer", file=sys.stderr)
    if args.method and "method" in df.columns and args.csv:
        df = df[df["method"] == args.method]
    return df


def _fit_all(df: Any) -> dict[str, Any]:
    from memcore.law import compare_forms, fit_law

    r, length, dl = df["rank"].to_numpy(float), df["length"].to_numpy(float), df["delta_loss"].to_numpy(float)
    fits, preferred = compare_forms(r, length, dl)
    main = fits.get("power") or fits[preferred]
    out = main.to_dict()
    out["comparison"] = {"aic": {f: fit.aic for f, fit in fits.items()}, "r2": {f: fit.r2 for f, fit in fits.items()},
                         "preferred": preferred, "forms": {f: fit.to_dict() for f, fit in fits.items()}}
    if "p_eff" in df.columns and df["p_eff"].notna().all() and df["p_eff"].nunique() > 1:
        try:
            out["p_eff_fit"] = fit_law(df["p_eff"].to_numpy(float), length, dl, main.form, x_name="p_eff").to_dict()
        except MemcoreError as e:
            out["p_eff_fit"] = {"error": str(e)}
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    from memcore.law import law_points, regime

    df = law_data(args)
    reg = regime(df)
    fit_df, how = law_points(df)
    out = _fit_all(fit_df)
    out["regime"], out["fitted_on"] = reg.to_dict(), how
    if args.json:
        print(json.dumps(out))
        return 0
    print(reg.describe())
    print(f"ΔL = C · r^α · ℓ^(−β) + b   {how}")
    for k in ("C", "alpha", "beta", "b"):
        lo, hi = out["intervals"][k]
        print(f"  {k:<6} {out[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    print(f"  R² {out['r2']:.4f}   RMSE {out['rmse']:.4f}   leave-one-out RMSE {out['loo_rmse']:.4f}")
    pe = out.get("p_eff_fit")
    if pe and "error" not in pe:
        print(f"in P_eff: C {pe['C']:.4g}  α {pe['alpha']:.4f}  β {pe['beta']:.4f}  b {pe['b']:.4f}  R² {pe['r2']:.4f}")
    cmp_ = out["comparison"]
    print("model comparison (AIC, lower is better): " + ", ".join(f"{f} {a:.1f} (R² {cmp_['r2'][f]:.4f})" for f, a in cmp_["aic"].items()))
    print(f"the data prefer the {cmp_['preferred']} form")
    if cmp_["preferred"] != out.get("form", "power"):
        pref = cmp_["forms"][cmp_["preferred"]]
        formula = "M · (1 − exp(−C · r^α · ℓ^(−β)))" if cmp_["preferred"] == "saturating" else cmp_["preferred"]
        print(f"ΔL = {formula}   R² {pref['r2']:.4f}")
        for k, (lo, hi) in pref["intervals"].items():
            print(f"  {k:<6} {pref[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    for n in out.get("notes") or []:
        print(f"note: {n}")
    return 0


def _one_method(df: Any, asked: str | None) -> tuple[Any, str | None, str | None]:
    """Rows of one method: the asked one, else memft-ot (or the first) when the table mixes methods (with a note)."""
    if "method" not in df.columns or df["method"].nunique() <= 1:
        return df, (df["method"].iloc[0] if "method" in df.columns and len(df) else asked), None
    if asked:
        return df[df["method"] == asked], asked, None
    methods = sorted(df["method"].unique())
    pick = "memft-ot" if "memft-ot" in methods else methods[0]
    return df[df["method"] == pick], pick, f"the table holds {', '.join(methods)}; using {pick} (choose with --method)"


def cmd_frontier(args: argparse.Namespace) -> int:
    from memcore.frontier import REFERENCE_BITS_PER_PARAM, frontier_from_table

    df = law_data(args, required=("rank", "length"))
    methods = [args.method] if args.method else (sorted(df["method"].unique()) if "method" in df.columns else [None])
    result = {}
    for m in methods:
        per_rank, fit, why = frontier_from_table(df, m)
        result[m or "all"] = {"per_rank": [vars(p) | {"recall_rate": {str(k): v for k, v in p.recall_rate.items()}} for p in per_rank],
                              "fit": fit.to_dict() if fit else None, "fit_error": why,
                              "fit_per_rank": [{"rank": p.rank, "ell_star": float(fit.ell_star(p.rank)),
                                                "interval": list(fit.ell_star_interval(p.rank)),
                                                "bits_per_param": fit.bits_per_param(p.rank)} for p in per_rank] if fit else None}
        if args.json:
            continue
        print(f"{m or 'all points'}: longest length recalled verbatim (recall rate crossing 1/2, interpolated in log ℓ)")
        for p in per_rank:
            rates = "  ".join(f"{k}:{v:.0%}" for k, v in p.recall_rate.items())
            line = f"  rank {p.rank:<4} ℓ* {'≥' if p.bound == 'at least' else '≤' if p.bound == 'at most' else '≈'} {p.ell_star:7.1f} tokens"
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
                      + ", ".join(f"r={p.rank}: {fit.bits_per_param(p.rank):.3f}" for p in per_rank) + " bits/param; references: "
                      + ", ".join(f"{v} ({k})" for k, v in REFERENCE_BITS_PER_PARAM.items()))
            for n in fit.notes:
                print(f"  note: {n}")
        else:
            print(f"  no fitted frontier: {why}")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from memcore.law import fit_law, smallest_rank

    if args.verbatim:
        return _predict_verbatim(args, law_data(args, required=("rank", "length")))
    df = law_data(args)
    fit = fit_law(df["rank"].to_numpy(float), df["length"].to_numpy(float), df["delta_loss"].to_numpy(float), args.form)
    if args.target_delta_loss is not None:
        r = smallest_rank(fit, args.length, args.target_delta_loss)
        out = {"length": args.length, "target_delta_loss": args.target_delta_loss, "smallest_rank": r}
        msg = (f"smallest rank predicted to reach ΔL {args.target_delta_loss} at length {args.length}: {r}" if r is not None
               else f"no rank up to 4096 is predicted to reach ΔL {args.target_delta_loss} at length {args.length}")
    else:
        if args.rank is None:
            raise MemcoreError("give --rank R (to predict ΔL) or --target-delta-loss X (to find the rank)")
        v = float(fit.predict(args.rank, args.length))
        out = {"rank": args.rank, "length": args.length, "delta_loss": v}
        msg = f"predicted ΔL at rank {args.rank}, length {args.length}: {v:.4f} nats/token ({fit.form} law, R² {fit.r2:.3f})"
    print(json.dumps(out) if args.json else msg)
    return 0


def _predict_verbatim(args: argparse.Namespace, df: Any) -> int:
    from memcore.frontier import frontier_from_table, smallest_verbatim_rank

    if args.rank is not None or args.target_delta_loss is not None:
        raise MemcoreError("--verbatim answers the smallest rank for --length; drop --rank and --target-delta-loss")
    df, method, note = _one_method(df, args.method)
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
    print(f"smallest rank predicted to recall {args.length} tokens verbatim{f' with {method}' if method else ''}: {ans.rank} "
          f"(95% [{lo}, {hi if hi is not None else 'unbounded'}]; frontier ℓ*(r) = {math.exp(fit.a):.3g} · r^{fit.gamma:.3f})"
          + ("  [extrapolated]" if ans.extrapolated else ""))
    return 0


# --- parser --------------------------------------------------------------------------------------------------


def _help(cls: type, name: str) -> str:
    import ast
    import inspect

    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name and isinstance(nxt, ast.Expr):
            return str(nxt.value.value)  # type: ignore[attr-defined]
    return ""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (with a pointer to --help) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memcore", description="Watch a language model memorize text.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="memorize a passage (or a PhoneBook) with a LoRA adapter")
    src = t.add_argument_group("what to memorize")
    src.add_argument("--text-file", help="UTF-8 text file to memorize, or - for standard input")
    src.add_argument("--text", help="the passage itself")
    src.add_argument("--sample", help="a shipped sample passage (lighthouse, recipe, orbit, long_archive)")
    src.add_argument("--phonebook", type=int, help=_help(DataSpec, "phonebook"))
    src.add_argument("--random-tokens", type=int, metavar="N", help=_help(DataSpec, "random_tokens"))
    src.add_argument("--jsonl", metavar="FILE", help="JSONL of prompt/target pairs (or - for stdin): the paper's PhoneBook lines "
                     "{query, target} (all trained as one batch) or long-context lines {question, matching} (one long target)")
    src.add_argument("--jsonl-fields", metavar="PROMPT,TARGET", help="the JSONL keys holding the prompt and the target, for other layouts")
    src.add_argument("--jsonl-line", type=int, metavar="N", help="train only the N-th JSON line (1-based)")
    src.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"{_help(DataSpec, 'prompt')} Default: {DEFAULT_PROMPT!r}")
    src.add_argument("--no-prompt", action="store_true", help="condition the target on the BOS token only")
    src.add_argument("--chat-template", action="store_true", help=_help(DataSpec, "chat_template"))
    src.add_argument("--length", type=int, help=_help(DataSpec, "length"))
    src.add_argument("--noise", type=float, default=0.0, help=_help(DataSpec, "noise"))
    src.add_argument("--max-tokens", type=int, default=2048, help=_help(DataSpec, "max_tokens"))
    m = t.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL, help=_help(ModelSpec, "name"))
    m.add_argument("--quant", default="none", choices=QUANTS, help=_help(ModelSpec, "quant"))
    m.add_argument("--device", default="auto", help=_help(ModelSpec, "device"))
    m.add_argument("--dtype", default="auto", help=_help(ModelSpec, "dtype"))
    m.add_argument("--trust-remote-code", action="store_true", help=_help(ModelSpec, "trust_remote_code"))
    a = t.add_argument_group("adapter")
    a.add_argument("--adapter", choices=ADAPTERS, default="lora", help=_help(AdapterSpec, "kind") + " Default: lora")
    a.add_argument("--rank", type=int, default=8, help=_help(AdapterSpec, "rank"))
    a.add_argument("--alpha", type=float, help=_help(AdapterSpec, "alpha"))
    a.add_argument("--dropout", type=float, default=0.0, help=_help(AdapterSpec, "dropout"))
    a.add_argument("--targets", default="all", help=_help(AdapterSpec, "targets") + " (comma-separated)")
    a.add_argument("--layers", help=_help(AdapterSpec, "layers") + " (comma-separated; default: all for LoRA, paper for bypass)")
    o = t.add_argument_group("training")
    o.add_argument("--method", default="memft-ot", choices=METHODS, help=_help(TrainSpec, "method"))
    o.add_argument("--tau", type=float, default=0.5, help=_help(TrainSpec, "tau"))
    o.add_argument("--lr", type=float, default=TrainSpec.lr, help=_help(TrainSpec, "lr"))
    o.add_argument("--max-steps", type=int, default=200, help=_help(TrainSpec, "max_steps"))
    o.add_argument("--max-seconds", type=float, help=_help(TrainSpec, "max_seconds"))
    o.add_argument("--full-budget", action="store_true", help="train all max-steps even once the passage is recalled")
    o.add_argument("--until", choices=("budget", "converged"), default=TrainSpec.until, help=_help(TrainSpec, "until"))
    o.add_argument("--plateau-window", type=int, default=TrainSpec.plateau_window, help=_help(TrainSpec, "plateau_window"))
    o.add_argument("--plateau-tol", type=float, default=TrainSpec.plateau_tol, help=_help(TrainSpec, "plateau_tol"))
    o.add_argument("--ot-when-empty", default="skip", choices=("skip", "mean"), help=_help(TrainSpec, "ot_when_empty"))
    o.add_argument("--window", type=int, default=50, help=_help(TrainSpec, "window"))
    o.add_argument("--weight-decay", type=float, default=0.0, help=_help(TrainSpec, "weight_decay"))
    o.add_argument("--seed", type=int, default=0, help="seed for adapter init, dropout, noise and PhoneBook")
    o.add_argument("--checkpoint-every", type=float, default=TrainSpec.checkpoint_every, help=_help(TrainSpec, "checkpoint_every"))
    o.add_argument("--recompute", choices=("auto", "on", "off"), default=TrainSpec.recompute, help=_help(TrainSpec, "recompute"))
    t.add_argument("--label", help="a free-text label stored with the run")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.set_defaults(func=cmd_train)

    rs = sub.add_parser("resume", help="continue an interrupted or stopped run from its last checkpoint")
    rs.add_argument("run", help="run id, unique prefix, or 'last'")
    rs.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    rs.set_defaults(func=cmd_resume)

    r = sub.add_parser("runs", help="list the runs in the store")
    r.add_argument("--method", choices=METHODS)
    r.add_argument("--model")
    r.add_argument("--status")
    r.add_argument("--json", action="store_true", help="print a JSON list of runs")
    r.set_defaults(func=cmd_runs)

    s = sub.add_parser("show", help="a run's summary and its stubborn tokens")
    s.add_argument("run", help="run id, unique prefix, or 'last'")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    e = sub.add_parser("export", help="copy a run's PEFT adapter, summary and metrics to a folder")
    e.add_argument("run")
    e.add_argument("dir")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="greedy generation from a run's memorized model")
    g.add_argument("run")
    g.add_argument("--prompt", help="text to continue (default: the run's own prompt, compared with its target)")
    g.add_argument("--max-new-tokens", type=int)
    g.set_defaults(func=cmd_generate)
    sw = sub.add_parser("sweep", help="a fixed-budget grid of runs (ranks x lengths x methods x seeds x noise) for the law")
    sw.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    sw.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="target tokens (first ℓ of the text)")
    sw.add_argument("--methods", nargs="+", default=["sft", "memft-ot"], choices=METHODS)
    sw.add_argument("--seeds", type=int, nargs="+", default=[0])
    sw.add_argument("--noises", type=float, nargs="+", default=[0.0], help="fractions of target tokens replaced at random")
    sw.add_argument("--name", help="sweep id (default: a hash of its definition); the same id resumes")
    sw.add_argument("--out", help="write the completed points as CSV (rank, length, delta_loss, p_eff, method, ...)")
    sw.add_argument("--json", action="store_true")
    sw.add_argument("--backend", choices=("local", "ray"), default="local", help="run points here, one at a time, or as Ray tasks")
    sw.add_argument("--address", help="Ray cluster: auto, ray://host:port, or unset for a new local instance")
    sw.add_argument("--cpus-per-run", type=float, default=1, help="Ray: CPUs each point asks for")
    sw.add_argument("--gpus-per-run", type=float, default=0, help="Ray: GPUs each point asks for")
    sw.add_argument("--retries", type=int, default=2, help="Ray: retries of a failing point before it is recorded as failed")
    sw.add_argument("--full-history", action="store_true",
                    help="keep every step's per-token history for replay (default: about 300 snapshots per point, denser early)")
    for action in t._actions:  # every train flag that makes sense for a whole grid
        if action.dest in ("help", "method", "seed", "full_budget", "noise", "length", "json", "label", "rank"):
            continue
        sw._add_action(copy.copy(action))  # a copy: set_defaults below must not change `train`'s defaults
    sw.set_defaults(func=cmd_sweep, max_steps=10, layers="paper", lr=1e-2)

    f = sub.add_parser("fit", help="fit the memory law ΔL = C·r^α·ℓ^(−β) + b over runs or a CSV")
    f.add_argument("--csv", help="CSV with columns rank, length, delta_loss (optional p_eff, method, seed)")
    f.add_argument("--model", help="only runs of this model")
    f.add_argument("--method", choices=METHODS, help="only runs (or CSV rows) of this method")
    f.add_argument("--json", action="store_true", help="print one JSON object (C, alpha, beta, b, r2, *_ci, ...)")
    f.set_defaults(func=cmd_fit)

    pr = sub.add_parser("predict", help="ΔL at (rank, length), or the smallest rank reaching a target ΔL")
    pr.add_argument("--rank", type=int)
    pr.add_argument("--length", type=int, required=True)
    pr.add_argument("--target-delta-loss", type=float)
    pr.add_argument("--verbatim", action="store_true",
                    help="the smallest rank predicted to recall --length tokens verbatim, from the recall frontier of a sweep")
    pr.add_argument("--form", default="power", choices=("power", "saturating"))
    pr.add_argument("--csv")
    pr.add_argument("--model")
    pr.add_argument("--method", choices=METHODS)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    fr = sub.add_parser("frontier", help="the verbatim-recall frontier of a sweep: longest length recalled per rank, "
                        "a fitted ℓ*(r), and bits stored per parameter there")
    fr.add_argument("--csv", help="a sweep CSV with rank, length, exact_recall (and p_eff, bits_per_param for capacity)")
    fr.add_argument("--model", help="only runs of this model")
    fr.add_argument("--method", choices=METHODS, help="only this method (default: each method in turn)")
    fr.add_argument("--json", action="store_true")
    fr.set_defaults(func=cmd_frontier)
    return p


def main(argv: list[str] | None = None) -> int:
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
