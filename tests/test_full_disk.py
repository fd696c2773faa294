"""A full disk is said in words and costs no training: a checkpoint that cannot be written warns and training goes
on; a final save, or the store, that cannot be written ends the run in one line naming what, where and what is
kept, and the last good checkpoint stays resumable. Faults are injected at each write (ENOSPC), and a real small
file system is filled up where this machine lets a test mount one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import memcore.cli.runs
from memcore.cli import main
from memcore.store import Store

PASSAGE = "The keeper counted forty-one schooners, nine steamers and a single rowing boat."
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _train(capsys, tiny_model_dir, *extra: str) -> tuple[int, str, str]:
    code = main(["train", "--model", str(tiny_model_dir), "--text", PASSAGE, "--method", "sft", "--lr", "1e-2",
                 "--max-steps", "6", "--full-budget", "--checkpoint-every", "1e-9", "--json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _failing(real, fail_on: set[int]):
    """`real` wrapped to raise ENOSPC on the calls numbered in fail_on (1-based); .calls counts them all."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls in fail_on:
            raise ENOSPC
        return real(*args, **kwargs)

    wrapper.calls, wrapper.real = 0, real
    return wrapper


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("memcore: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_checkpoint_that_cannot_be_written_warns_and_training_goes_on(home, tiny_model_dir, capsys, monkeypatch):
    import torch

    save = _failing(torch.save, {1, 2})  # the first two checkpoints hit a full disk, the third gets through
    monkeypatch.setattr(torch, "save", save)
    code, out, err = _train(capsys, tiny_model_dir)
    assert code == 0, err
    s = json.loads(out)
    assert s["status"] == "completed" and s["steps"] == 6  # no training lost
    ckpt = str(home / "runs" / s["run_id"] / "checkpoint.pt")
    # the streak of two failures said once, when it began, and once when it ended
    assert [n for n in s["notes"] if "checkpoint" in n] == [
        f"step 1: could not write the checkpoint to {ckpt} (No space left on device); training goes on and tries "
        "again at each checkpoint",
        "step 3: the checkpoint was written again (the ones since step 1 could not be)"]
    assert err.count("note: step 1: could not write the checkpoint") == 1  # said when it happened
    assert save.calls >= 4  # it kept trying, and the later checkpoints were written


def test_a_final_save_that_fails_keeps_the_last_checkpoint_resumable(home, tiny_model_dir, capsys, monkeypatch):
    from memcore.stack import AdapterStack

    save = _failing(AdapterStack.write, set(range(7, 100)))  # checkpoints 1-6 save; the final save fails
    monkeypatch.setattr(AdapterStack, "write", save)
    code, out, err = _train(capsys, tiny_model_dir)
    line = _one_line(err)
    store = Store(home)
    rid = store.runs()[-1]["id"]
    adapter = home / "runs" / rid / "adapter"
    assert code == 2 and out == ""
    assert line == (f"memcore: error: could not write the adapter to {adapter} (No space left on device); kept: the "
                    "checkpoint at step 6 and the steps recorded before it; free some space and "
                    f"`memcore resume {rid}` (or Resume on the app's Runs page) continues from there")
    assert store.run(rid)["status"] == "failed" and store.run(rid)["error"] in line
    assert (home / "runs" / rid / "checkpoint.pt").is_file()
    assert not any(p.name.startswith(".save-") for p in (home / "runs" / rid).iterdir())  # no half-written folder

    monkeypatch.setattr(AdapterStack, "write", save.real)  # space again: the resume trains from step 6 on
    assert main(["resume", rid, "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["status"] == "completed" and resumed["steps"] == 6
    assert [r.step for r in store.steps(rid)] == list(range(7))
    code, out, _ = _train(capsys, tiny_model_dir)  # the same run never interrupted ends with the same numbers
    assert json.loads(out)["loss"] == pytest.approx(resumed["loss"], rel=1e-5)


def test_a_run_with_no_checkpoint_yet_says_so(home, tiny_model_dir, capsys, monkeypatch):
    from memcore.stack import AdapterStack

    monkeypatch.setattr(AdapterStack, "write", _failing(AdapterStack.write, {1}))
    code, _, err = _train(capsys, tiny_model_dir, "--checkpoint-every", "0")
    assert code == 2
    assert "no checkpoint was saved yet, so the training is lost" in _one_line(err)


class _FullDisk:
    """A sqlite3 connection whose writes to `table` fail as a full disk does, after `after` of them."""

    def __init__(self, db: sqlite3.Connection, table: str, after: int):
        self.db, self.table, self.left = db, table, after

    def _check(self, sql: str) -> None:
        if f"INTO {self.table}" in sql:
            if self.left <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.left -= 1

    def execute(self, sql, *args):
        self._check(sql)
        return self.db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self.db.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_store_that_cannot_be_written_ends_the_run_in_one_line(home, tiny_model_dir, capsys, monkeypatch):
    real = memcore.cli.runs.open_store

    def full_store():
        store = real()
        store._db = _FullDisk(store._db, "steps", after=2)  # two flushes of steps get in, then the disk is full
        return store

    monkeypatch.setattr(memcore.cli.runs, "open_store", full_store)
    code, _, err = _train(capsys, tiny_model_dir)
    line = _one_line(err)
    assert code == 2 and f"could not write the run store to {home / 'runs.db'} (database or disk is full)" in line
    monkeypatch.setattr(memcore.cli.runs, "open_store", real)
    runs = Store(home).runs()
    assert runs[-1]["status"] in ("failed", "interrupted")  # resumable either way
    assert main(["resume", runs[-1]["id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"


def test_summary_json_that_cannot_be_written_is_a_note(home, tiny_model_dir, capsys, monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "summary.json":
            raise ENOSPC
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    code, out, err = _train(capsys, tiny_model_dir)
    assert code == 0, err
    s = json.loads(out)
    assert any("could not write summary.json" in n and "the store has the summary" in n for n in s["notes"])
    assert Store(home).run(s["run_id"])["summary"].steps == 6


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB tmpfs (skipped where this machine does not let a test mount one)."""
    where = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_real_full_file_system_during_a_run(small_fs, tiny_model_dir, default_model_dir, tmp_path):
    home = small_fs / "home"
    home.mkdir()
    (home / "models").symlink_to(default_model_dir.parent, target_is_directory=True)
    env = dict(os.environ, MEMCORE_HOME=str(home))
    args = [sys.executable, "-m", "memcore.cli", "train", "--model", str(tiny_model_dir), "--sample", "orbit",
            "--rank", "16", "--method", "sft", "--max-steps", "40", "--full-budget", "--checkpoint-every", "1e-9",
            "--json"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    filler = small_fs / "filler"
    free = shutil.disk_usage(small_fs).free
    with open(filler, "wb") as f:  # leave room for a few store pages and not much more
        f.write(b"\0" * max(0, free - 96 * 1024))
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    if second.returncode == 0:  # the writes that failed were checkpoints: warned, and training went on
        assert "could not write" in second.stderr and json.loads(second.stdout)["steps"] == 40
    else:
        assert second.returncode == 2
        line = _one_line(second.stderr)
        assert "could not write" in line and str(home) in line and "No space left on device" in line or "full" in line
        assert "kept:" in line or "no checkpoint was saved yet" in line or "was saved before it" in line
    # on the full disk, what only reads the store still works: list the runs, show one, export it elsewhere
    listed = subprocess.run([sys.executable, "-m", "memcore.cli", "runs", "--json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    last = json.loads(listed.stdout)[-1]["id"]
    shown = subprocess.run([sys.executable, "-m", "memcore.cli", "show", last], env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and last in shown.stdout, shown.stderr
    filler.unlink()  # space again: the store opens whole and every run is finished or resumable
    store = Store(home)
    runs = store.runs()
    assert runs[0]["status"] == "completed"
    if runs[-1]["status"] != "completed":
        resumed = subprocess.run([sys.executable, "-m", "memcore.cli", "resume", runs[-1]["id"], "--json"], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["steps"] == 40
