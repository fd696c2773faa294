"""`memcore train | resume | runs | show | export | generate | sweep | frontier | fit | predict`: a table from verbs to
plain functions, one module per family of verbs (runs: one run and the store; sweeps: grids and the frontier;
law: the memory law), what they share in common.

Every verb is an importable function taking parsed arguments, so tests call the same entry point as users.
User errors print one line (`memcore: error: ...`) and exit 2; nothing in the store is touched by them. Verbs that
need no model (runs, show, fit, predict, frontier, --help) import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys

from memcore.cli.common import SEED_HELP, batch_size, quiet, run_flags, spec_from_args
from memcore.cli.law import cmd_fit, cmd_predict
from memcore.cli.runs import cmd_export, cmd_generate, cmd_resume, cmd_runs, cmd_show, cmd_train
from memcore.cli.sweeps import cmd_frontier, cmd_sweep
from memcore.config import METHODS, MemcoreError
from memcore.specs import option_help

__all__ = ["build_parser", "main", "spec_from_args"]

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (with a pointer to --help) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every verb; spec flags take their help and defaults from memcore.specs."""
    p = _Parser(prog="memcore", description="Watch a language model memorize text.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="memorize a passage (or a PhoneBook) with a LoRA adapter")
    run_flags(t)
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
    sw.add_argument("--chain", action="store_true",
                    help="a sweep over chains: per rank, first length and seed a first passage of random tokens, "
                    "then on top of it a second one of each --lengths under each --strategies; the table gives the "
                    "first passage's retention (see 'Memorize more on top of a run')")
    sw.add_argument("--first-lengths", type=int, nargs="+", default=[16], metavar="N",
                    help="with --chain: the first passage's target tokens (default: %(default)s)")
    sw.add_argument("--first-method", choices=METHODS, default="memft-ot",
                    help="with --chain: how each first passage is memorized (default: %(default)s)")
    sw.add_argument("--strategies", nargs="+", default=["none", "keep-sft", "keep-memft-ot"], metavar="S",
                    help="with --chain: none (the second passage alone, sft), keep-sft (the first rehearsed, sft), "
                    "keep-memft-ot (the first rehearsed under memft-ot) (default: all three)")
    sw.add_argument("--name", help="sweep id (default: a hash of its definition); the same id resumes")
    sw.add_argument("--out", help="write the completed points as CSV (rank, length, delta_loss, p_eff, method, ...)")
    sw.add_argument("--json", action="store_true",
                    help="print the sweep's id, status and completed points as one JSON object")
    sw.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="run points here, or as Ray tasks (with --chain too: a chain's task carries its first "
                    "passage's run)")
    sw.add_argument("--batch", type=batch_size, default="auto", metavar="N|auto",
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
    run_flags(sw, omit=("rank", "method", "seed", "noise", "length", "full_budget", "after"),
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
                      help="stop once each rank's bracket is this narrow: shortest failed / longest recalled <= 1 + F "
                      "(default 0.05)")
    srch.add_argument("--max-length", type=int, metavar="N",
                      help="longest length to probe (default: all the data hold)")
    srch.add_argument("--start-length", type=int, metavar="N",
                      help="the first probe's length at rank 1, times the rank at other ranks (default 32)")
    srch.add_argument("--batch", type=batch_size, metavar="N|auto",
                      help="probes trained together (default auto: every bracket's probes, as memory allows)")
    srch.add_argument("--name", help="the search's id (default: a hash of its settings); the same id resumes")
    srch.add_argument("--full-history", action="store_true", help="keep every step's per-token history")
    run_flags(fr, omit=("rank", "method", "seed", "length", "full_budget", "model", "after"),
               defaults={"max_steps": 300, "layers": "paper", "lr": 3e-2, "until": "converged", "adapter": "bypass",
                         "dropout": 0.1})
    fr.set_defaults(func=cmd_frontier)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]). Returns the exit code: 0, 2 on a MemcoreError, 130 stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # as typed: which flags were given (train --after takes the others from the earlier run)
    quiet()
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
