"""The CLI as a user meets it: error messages, exit codes, and a store that survives both."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memcore.cli import main
from memcore.store import Store


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    """The single error line (progress notes such as 'loading ...' may precede it; no traceback may)."""
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if "error" in x]
    assert len(lines) == 1 and lines[0].startswith("memcore"), err
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--text", "   \n "], "empty"),
    (["--text", "hi", "--rank", "0"], "rank must be an integer >= 1, got 0"),
    (["--text", "hi", "--tau", "1"], "tau must be strictly between 0 and 1"),
    (["--text", "hi", "--tau", "0"], "tau"),
    (["--text", "hi", "--max-steps", "0"], "max steps"),
    (["--text", "hi", "--lr", "-1"], "learning rate must be a positive number"),
    (["--text", "hi", "--lr", "nan"], "learning rate"),
    (["--text", "hi", "--model", "./no/such/dir"], "does not exist"),
    (["--text", "hi", "--model", "some-org/some-model-that-cannot-download"], "offline"),
    (["--text", "hi", "--layers", "99"], "layer 99 does not exist"),
    (["--text", "hi", "--targets", "wq,wk"], "no module named"),
    (["--sample", "nope"], "no sample passage named 'nope'"),
    ([], "nothing to memorize"),
])
def test_bad_input_gets_one_clear_line_and_store_keeps_its_runs(home, tiny_model_dir, capsys, args, words):
    code, _, _ = run_cli(capsys, "train", "--text", "a b c d", "--model", str(tiny_model_dir), "--max-steps", "1",
                         "--json")
    assert code == 0
    before = Store(home).runs()
    full = ["train", "--model", str(tiny_model_dir), *args] if "--model" not in args else ["train", *args]
    code, out, err = run_cli(capsys, *full)
    assert code == 2
    assert words in _one_line_error(err)
    after = Store(home).runs()
    assert [r["id"] for r in after] == [r["id"] for r in before] and after[0]["status"] == "completed"


def test_argparse_errors_are_one_line(home, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--text", "hi", "--lr", "abc"])
    assert e.value.code == 2
    assert "invalid float value: 'abc'" in _one_line_error(capsys.readouterr().err)


def test_text_longer_than_context_names_both_numbers(home, tiny_model_dir, capsys):
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "word " * 600,
                           "--max-tokens", "5000")
    assert code == 2 and "more than the model's context of 512 tokens" in err
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "word " * 100,
                           "--max-tokens", "50")
    assert code == 2 and re.search(r"the text is 10\d target tokens, more than the configured maximum of 50", err)


def test_unwritable_home_is_reported(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MEMCORE_HOME", str(blocker / "home"))
    code, _, err = run_cli(capsys, "runs")
    assert code == 2 and "not writable" in _one_line_error(err) and str(blocker / "home") in err


def test_nf4_without_bitsandbytes_says_how_to_install(home, tiny_model_dir, capsys, monkeypatch):
    import memcore.loading as loading

    monkeypatch.setattr(loading, "bitsandbytes_available", lambda: False)
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "hi there", "--quant", "nf4")
    assert code == 2 and "needs bitsandbytes" in err and "pip install bitsandbytes" in err


def test_stdin_and_text_file_inputs(home, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import io

    f = tmp_path / "p.txt"
    f.write_text("A tiny passage from a file.", encoding="utf-8")
    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text-file", str(f), "--max-steps", "2",
                           "--json")
    s = json.loads(out)
    assert code == 0 and s["status"] == "completed" and s["steps"] == 2
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"From standard input.")))
    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text-file", "-", "--max-steps", "1",
                           "--json")
    assert code == 0 and json.loads(out)["n_tokens"] > 0


def test_runs_show_export_on_a_tiny_run(home, tiny_model_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "one two three four five",
                           "--method", "sft", "--max-steps", "3", "--json", "--label", "demo")
    s = json.loads(out)
    for key in ("run_id", "status", "steps", "recalled", "first_divergence", "p_eff", "delta_loss", "bits_stored",
                "bits_per_param", "seconds_per_step", "adapter_dir", "prompt_ids", "target_ids"):
        assert key in s
    assert isinstance(s["recalled"], bool) and s["p_eff"] > 0 and s["steps"] == 3
    assert (Path(s["adapter_dir"]) / "adapter_config.json").is_file()
    code, out, _ = run_cli(capsys, "runs", "--json")
    runs = json.loads(out)
    assert [r["id"] for r in runs] == [s["run_id"]] and runs[0]["label"] == "demo" and runs[0]["method"] == "sft"
    code, out, _ = run_cli(capsys, "runs")
    assert s["run_id"] in out and "completed" in out
    code, out, _ = run_cli(capsys, "show", s["run_id"][:12])
    assert code == 0 and s["run_id"] in out and "ΔL" in out
    dest = tmp_path / "exported"
    code, out, _ = run_cli(capsys, "export", s["run_id"], str(dest))
    assert code == 0 and (dest / "adapter_model.safetensors").is_file() and (dest / "steps.csv").is_file()
    assert len((dest / "steps.csv").read_text().strip().splitlines()) == 1 + 4  # header + steps 0..3
    code, _, err = run_cli(capsys, "export", s["run_id"], str(dest))
    assert code == 2 and "not empty" in err  # never overwrites


def _sigkill_when(home, args, ready, what: str) -> Store:
    """Run `memcore ARGS` in a child process and SIGKILL it as soon as ready(store, run) holds for its run;
    return the store as a later process opens it."""
    env = dict(os.environ, MEMCORE_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "memcore.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    store = Store(home)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            runs = store.runs()
            if runs and ready(store, runs[0]):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended by itself: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        else:
            pytest.fail(f"{what} within the time limit")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store.close()
    return Store(home)


def test_sigkill_mid_run_leaves_a_readable_store_marked_interrupted(home, tiny_model_dir):
    store = _sigkill_when(home, ["train", "--model", str(tiny_model_dir), "--sample", "long_archive", "--length", "200",
                                 "--max-steps", "100000", "--full-budget", "--method", "sft", "--json"],
                          lambda store, run: len(store.steps(run["id"])) >= 3, "the run never recorded 3 steps")
    run = store.runs()[0]
    assert run["status"] == "interrupted"
    steps = store.steps(run["id"])
    assert len(steps) >= 3
    replay = store.replay(run["id"])
    assert replay.p.shape == (len(replay.steps), len(replay.target_ids)) and len(replay.steps) >= 3


def test_sweep_defaults_do_not_leak_into_train():
    from memcore.cli import build_parser

    p = build_parser()
    train = p.parse_args(["train", "--text", "x"])
    sweep = p.parse_args(["sweep"])
    # None: 'all' for LoRA, 'paper' for the bypass
    assert (train.max_steps, train.layers, train.lr) == (200, None, 2e-3)
    from memcore.cli import spec_from_args

    assert spec_from_args(train).adapter.layers == "all"
    assert spec_from_args(p.parse_args(["train", "--text", "x", "--adapter", "bypass"])).adapter.layers == "paper"
    assert (sweep.max_steps, sweep.layers, sweep.lr) == (10, "paper", 1e-2)


def _subparsers(parser):
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_flag_of_every_verb_has_help():
    from memcore.cli import build_parser

    missing = [f"{verb} {a.option_strings or a.dest}" for verb, p in _subparsers(build_parser()).items()
               for a in p._actions if a.dest != "help" and not (a.help or "").strip()]
    assert missing == []


def test_train_flags_take_their_defaults_and_help_from_the_spec_dataclasses():
    from memcore.cli import build_parser, spec_from_args
    from memcore.config import DataSpec, RunSpec
    from memcore.specs import OPTIONS, default, option_help

    train = _subparsers(build_parser())["train"]
    args = train.parse_args(["--text", "x"])
    assert spec_from_args(args) == RunSpec(data=DataSpec(text="x"))  # no flag given: every field at its default
    flags = {a.dest: a for a in train._actions}
    spec_flags = [name for name in OPTIONS if name in flags]
    # every spec option is a flag but these: --jsonl gives pairs, --full-budget stop_when_recalled, sweeps the rest
    assert set(OPTIONS) - set(spec_flags) == {"pairs", "stop_when_recalled", "verify", "history"}
    for name in spec_flags:
        if name not in ("layers", "text"):  # layers None: "all" for LoRA, "paper" for the bypass
            assert getattr(args, name) == default(name), name
        if name != "seed":  # one flag for the data's and the training's seed: its own help
            assert flags[name].help.startswith(option_help(name)), name
    assert "Default: 8" in flags["rank"].help and "Default: 0.002" in flags["lr"].help
    sweep = {a.dest: a for a in _subparsers(build_parser())["sweep"]._actions}
    assert "Default: 10" in sweep["max_steps"].help and "Default: paper" in sweep["layers"].help
    assert not {"rank", "method", "seed", "noise", "length", "full_budget"} & set(sweep)  # what the grid varies


@pytest.mark.parametrize("verb", [["runs"], ["runs", "--json"]])
def test_piping_into_a_reader_that_closes_early_exits_quietly(home, verb):
    """`memcore runs | head -1`: no BrokenPipeError traceback when the reader stops reading."""
    from memcore.config import RunSpec
    from memcore.store import Store

    store = Store(home)
    for _ in range(3000):
        store.create_run(RunSpec().to_dict(), status="completed")
    store.close()
    cmd = f"{sys.executable} -m memcore.cli {' '.join(verb)} | head -c 100 >/dev/null"
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MEMCORE_HOME": str(home)})
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr[-2000:]
    assert out.returncode in (0, 141)  # 141 = 128 + SIGPIPE, what Unix tools exit with here


def test_a_sigkilled_run_resumes_from_its_checkpoint_and_ends_as_if_never_killed(home, tiny_model_dir, capsys):
    args = ["train", "--model", str(tiny_model_dir), "--sample", "orbit", "--max-steps", "60", "--full-budget",
            "--method", "sft", "--lr", "1e-2", "--json"]
    store = _sigkill_when(home, [*args, "--checkpoint-every", "0.2"],
                          lambda store, run: ((home / "runs" / run["id"] / "checkpoint.pt").is_file()
                                              and len(store.steps(run["id"])) >= 10),
                          "no checkpoint")
    rid = store.runs()[0]["id"]
    killed_at = len(store.steps(rid))
    assert store.run(rid)["status"] == "interrupted" and killed_at < 61
    assert (store.adapter_dir(rid) / "adapter_config.json").is_file()  # the adapter so far survived the kill

    code, out, err = run_cli(capsys, "resume", rid[:12], "--json")
    assert code == 0, err
    resumed = json.loads(out)
    assert "resuming run" in err and "from its checkpoint at step" in err
    assert resumed["run_id"] == rid and resumed["status"] == "completed" and resumed["steps"] == 60
    steps = store.steps(rid)
    assert [s.step for s in steps] == list(range(61))  # one history, continuing where the checkpoint left it
    assert all(b.elapsed >= a.elapsed for a, b in zip(steps, steps[1:]))
    assert not (home / "runs" / rid / "checkpoint.pt").exists()  # finished: nothing left to resume
    code, _, err = run_cli(capsys, "resume", rid)
    assert code == 2 and "completed" in err

    # the same run never killed ends with the same numbers
    code, out, _ = run_cli(capsys, *args)
    whole = json.loads(out)
    assert whole["loss"] == pytest.approx(resumed["loss"], rel=1e-4)
    assert whole["n_above"] == resumed["n_above"] and whole["n_correct"] == resumed["n_correct"]


def _two_method_table(path: Path, with_negative: bool = False) -> Path:
    import numpy as np
    import pandas as pd

    rows = []
    for method, c in (("sft", 1.0), ("memft-ot", 2.0)):
        for r in (1, 2, 4, 8):
            for n in (32, 64, 128, 256):
                rows.append({"rank": r, "length": n, "method": method,
                             "delta_loss": c * r ** 0.5 * n ** -0.3 + 0.01 * np.sin(r * n)})
    if with_negative:
        rows[3]["delta_loss"] = -0.2
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_fit_on_a_table_of_several_methods_fits_each_on_its_own(home, tmp_path, capsys):
    csv = _two_method_table(tmp_path / "two.csv")
    code, out, _ = run_cli(capsys, "fit", "--csv", str(csv), "--json")
    res = json.loads(out)
    assert code == 0 and res["methods"] == ["memft-ot", "sft"]
    assert res["by_method"]["sft"]["n"] == res["by_method"]["memft-ot"]["n"] == 16  # not 32 pooled points
    assert res["by_method"]["memft-ot"]["C"] == pytest.approx(2 * res["by_method"]["sft"]["C"], rel=0.2)
    code, out, _ = run_cli(capsys, "fit", "--csv", str(csv))
    assert "each method is fitted on its own points" in out and "== sft ==" in out and "== memft-ot ==" in out
    code, out, _ = run_cli(capsys, "fit", "--csv", str(csv), "--method", "sft", "--json")
    assert json.loads(out)["n"] == 16 and "by_method" not in json.loads(out)


def test_a_negative_delta_loss_is_said_not_fitted_silently(home, tmp_path, capsys):
    csv = _two_method_table(tmp_path / "neg.csv", with_negative=True)
    code, out, _ = run_cli(capsys, "fit", "--csv", str(csv), "--method", "sft")
    assert code == 0
    assert re.search(r"note: 1 point with a negative ΔL, where the loss rose in training .*rank 1 length 256 "
                     r"\(ΔL -0\.200\)", out)
    code, out, _ = run_cli(capsys, "fit", "--csv", str(csv), "--method", "memft-ot")
    assert "negative ΔL" not in out


def test_resuming_a_completed_run_says_only_why_not(home, tiny_model_dir, capsys):
    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "a b c", "--max-steps", "1",
                           "--json")
    rid = json.loads(out)["run_id"]
    code, _, err = run_cli(capsys, "resume", rid)
    assert code == 2 and _one_line_error(err) == (f"memcore: error: run {rid} is completed; only interrupted, "
                                                  "stopped or failed runs can be resumed")
    assert "checkpoint" not in err


def test_help_speaks_the_users_words(capsys):
    from memcore.cli import build_parser

    for verb in ("train", "sweep"):
        text = build_parser()._subparsers._group_actions[0].choices[verb].format_help()
        for leak in ("stop_when_recalled", "until='converged'", "tuple of", "max_steps", "plateau_tol",
                     "plateau_window", "`seed`", "`length`"):
            assert leak not in text, (verb, leak)
    flags = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert "LoRA or of the bypass" in flags["rank"].help and "LoRA or bypass" in flags["dropout"].help


def test_a_stopped_run_reads_stopped_once(home, tiny_model_dir, capsys):
    from memcore.records import RunSummary

    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "a b c", "--max-steps", "2",
                           "--json")
    s = RunSummary.from_dict(json.loads(out))
    s.status, s.stop_reason = "stopped", "stopped"
    assert s.ending == "stopped"
    s.status, s.stop_reason = "completed", "recalled"
    assert s.ending == "completed: recalled verbatim"
    code, out, _ = run_cli(capsys, "show", "last")
    assert re.search(r"\((completed: reached its step budget|completed: recalled verbatim)\)", out)


@pytest.mark.parametrize("verb", [["--help"], ["runs"], ["show", "last"], ["fit", "--csv", "{csv}"],
                                  ["predict", "--csv", "{csv}", "--rank", "2", "--length", "64"],
                                  ["frontier", "--csv", "{frontier}"]])
def test_verbs_that_need_no_model_do_not_load_torch(home, tmp_path, verb):
    """`memcore --help`, runs, show, fit, predict and frontier start without importing torch or transformers (about
    2 s of the start-up on this machine's CPU); what they do import is measured in the closing note, not here."""
    store = Store(home)
    from memcore.config import RunSpec

    store.create_run(RunSpec().to_dict(), status="completed")
    store.close()
    csv = _two_method_table(tmp_path / "t.csv")
    frontier = Path(__file__).resolve().parent.parent / "sample_data" / "sweeps" / "capacity_bypass_random.csv"
    args = [a.format(csv=csv, frontier=frontier) for a in verb]
    code = ("import sys\n"
            "from memcore.cli import main\n"
            "try:\n"
            f"    rc = main({args!r})\n"
            "except SystemExit as e:  # --help\n"
            "    rc = e.code\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEMCORE_HOME": str(home)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "LOADED []" in done.stdout, done.stdout[-500:]


def test_a_phonebook_run_speaks_of_entries_and_of_settings_that_do_nothing(home, tiny_model_dir, capsys):
    """A book's summary counts the entries not recalled (not a token position across the whole book), and a
    curriculum that the budget never reaches is said before training."""
    code, out, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--phonebook", "6", "--method",
                             "memft-sw", "--batch-size", "2", "--curriculum-epochs", "2,4,6,8", "--max-steps", "2",
                             "--adapter", "bypass", "--rank", "1")
    assert code == 0, err
    assert "note: the step budget (2) ends in curriculum stage 1 of 5" in err
    assert re.search(r"recalled +no: \d of 6 entries not recalled entry by entry", out)
    assert "diverges at token" not in out
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--text", "one two three",
                           "--method", "sft", "--curriculum-stages", "3", "--max-steps", "1")
    assert code == 0 and "note: --curriculum-stages/--curriculum-epochs only shape memft-sw" in err
