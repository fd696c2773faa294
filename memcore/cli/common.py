"""What the CLI's verbs share: the store, what a command line says to memorize and how to train (flags built from
the spec dataclasses, memcore.specs), Ctrl-C as a cooperative stop, and the law table the law and frontier verbs
read."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

from memcore.config import DEFAULT_PROMPT, MemcoreError, RunSpec
from memcore.specs import OPTIONS, option_help, option_type, run_spec
from memcore.specs import default as spec_default


def quiet() -> None:
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


def open_store(writable: bool = True):
    """The store of the memcore home. writable=False for verbs that only read it (runs, show, export, generate,
    fit, predict, frontier): they work on a home whose disk is full."""
    from memcore.home import memcore_home
    from memcore.store import Store

    return Store(memcore_home(writable=writable))




SOURCES = ("--text-file", "--text", "--sample", "--phonebook", "--random-tokens", "--jsonl")


def given_sources(args: argparse.Namespace) -> list[str]:
    return [flag for flag in SOURCES if getattr(args, flag[2:].replace("-", "_"), None) is not None]


def read_data(args: argparse.Namespace) -> dict[str, Any]:
    """The DataSpec fields naming what to memorize: text, phonebook, pairs or random_tokens."""
    from memcore.data import read_jsonl, read_sample, read_text_file
    from memcore.textio import decode_text

    given = given_sources(args)
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


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The memcore.specs settings a `train` or `sweep` command line gives: every flag named after a spec option,
    the data its source flags read, the prompt (None with --no-prompt) and, for train, --full-budget."""
    settings = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    settings.update(read_data(args), prompt=None if args.no_prompt else args.prompt)
    if hasattr(args, "full_budget"):
        settings["stop_when_recalled"] = not args.full_budget
    return settings


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of a `memcore train` command line (memcore.specs.run_spec).
    Raises MemcoreError naming the bad value."""
    return run_spec(run_settings(args))


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


def law_table_of(args: argparse.Namespace, required: tuple[str, ...] | None = None) -> Any:
    """memcore.law.law_table of --csv (else the store's runs), --method and --model, with the `required` columns
    (default: the law's); its notes go to stderr."""
    from memcore.law import LAW_COLUMNS, law_table

    sweep = getattr(args, "sweep", None)
    if sweep and args.csv:
        raise MemcoreError("give --csv or --sweep, not both: --sweep picks a sweep (or frontier search) in the store")
    store = None if args.csv else open_store(writable=False)
    if sweep and not store.runs(sweep=sweep):
        known = sorted({r["sweep"] for r in store.runs() if r["sweep"]})
        raise MemcoreError(f"no sweep or frontier search {sweep!r} in the store"
                           + (f"; the store holds {', '.join(known)}" if known else " (it holds none)"))
    df, notes = law_table(args.csv, store, method=args.method, model=args.model, sweep=sweep,
                          required=required or LAW_COLUMNS)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return df


def shown(value: Any) -> str:
    """A default as the help text shows it: numbers and plain words bare, other text quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and not value.replace("-", "").replace("_", "").isalnum():
        return repr(value)
    return str(value)


def spec_flag(group: Any, name: str, *, help: str | None = None, note: str = "", default: Any = MISSING,
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
        text += f" Default: {shown(value)}"
    group.add_argument(flag, type=kind, choices=choices, default=value, help=text.replace("%", "%%"), **kwargs)


SEED_HELP = "seed for adapter init, dropout, noise and PhoneBook."


def batch_size(text: str) -> int | str:
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


def run_flags(p: argparse.ArgumentParser, omit: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """The flags that define a run, shared by `train` and `sweep`: what to memorize, model, adapter, training.
    `omit` leaves out the options a sweep varies over its grid; `defaults` replaces some defaults (the sweep's
    budget and placement)."""
    defaults = defaults or {}

    def spec(group: Any, name: str, **kw: Any) -> None:
        if name not in omit:
            kw.setdefault("default", defaults.get(name, MISSING))
            spec_flag(group, name, **kw)

    src = p.add_argument_group("what to memorize")
    src.add_argument("--text-file", help="text file to memorize (UTF-8, UTF-16 or UTF-32), or - for standard input")
    spec(src, "text")
    src.add_argument("--sample", help="a shipped sample passage (lighthouse, recipe, orbit, long_archive)"
                     + ("; a sweep without another source uses long_archive" if "full_budget" in omit else ""))
    spec(src, "phonebook", metavar="N")
    spec(src, "random_tokens", metavar="N")
    src.add_argument("--jsonl", metavar="FILE", help="JSONL of prompt/target pairs (or - for stdin): the paper's "
                     "PhoneBook lines {query, target} (trained together, or --batch-size N a step) or long-context "
                     "lines {question, matching} (one long target)")
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
    spec(o, "plateau_on")
    spec(o, "ot_when_empty")
    spec(o, "window")
    spec(o, "batch_size", metavar="N")
    spec(o, "curriculum_stages", metavar="K")
    spec(o, "curriculum_epochs", metavar="E1,E2,...")
    spec(o, "weight_decay")
    if "after" not in omit:
        spec(o, "after", metavar="RUN")
        spec(o, "keep")
    spec(o, "seed", help=SEED_HELP)
    spec(o, "checkpoint_every")
    spec(o, "recompute")
