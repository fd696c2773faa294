"""A benchmark's completed points kept beside the repository, so that an experiment of many hours resumes from a
fresh clone as well as from its store.

Each completed run of a sweep is written once as `<run id>.json.gz` under a folder: its row in the store (spec,
summary, label), its scalar step rows and its tokens. Left out are the adapter's weights and the per-token
history, which the benchmarks' tables do not read (a point of ranks 1-2 keeps in a few kB). A run still training
is kept under `in_flight/` with its files (adapter and resumable checkpoint, tens of kB at ranks 1-2), rewritten
whenever its checkpoint moves and removed once it completes, so a point of an hour is not lost with the store.
`restore` puts the kept runs a store lacks back into it before anything trains (the unfinished ones as
interrupted, so the sweep resumes them from their checkpoints); a search then counts the verdicts as its own.
`kept.json` in the folder adds up the wall seconds every invocation spent, whatever store it used.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import time
from pathlib import Path
from typing import Any

KEPT_TABLES = ("steps", "tokens")
IN_FLIGHT = "in_flight"


def _plain(v: Any) -> Any:
    return {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes | memoryview) else v


def _raw(v: Any) -> Any:
    return base64.b64decode(v["b64"]) if isinstance(v, dict) and "b64" in v else v


def _write(store, run_id: str, path: Path, with_files: bool) -> None:
    payload = store.export_run(run_id)
    data = {"run": payload["run"],
            "tables": {t: [[_plain(v) for v in row] for row in payload["tables"].get(t, [])] for t in KEPT_TABLES}}
    if with_files:
        data["files"] = {rel: _plain(b) for rel, b in payload["files"].items()}
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    tmp.replace(path)  # a stop mid-write leaves no half file


def keep_new(store, sweep: str, folder: Path) -> int:
    """Write every completed run of `sweep` in `store` that `folder` does not hold yet, and the resumable
    checkpoint of every run of it still training (or cut off) whose checkpoint is newer than the one kept; drop the
    kept checkpoints of runs that have completed. Returns how many completed runs were written."""
    folder.mkdir(parents=True, exist_ok=True)
    flight = folder / IN_FLIGHT
    n = 0
    for r in store.runs(sweep=sweep):
        path = folder / f"{r['id']}.json.gz"
        unfinished = flight / f"{r['id']}.json.gz"
        if r["status"] == "completed":
            if not path.exists():
                _write(store, r["id"], path, with_files=False)
                n += 1
            unfinished.unlink(missing_ok=True)
            continue
        ckpt = store.runs_dir / r["id"] / "checkpoint.pt"
        if ckpt.is_file() and (not unfinished.exists() or unfinished.stat().st_mtime < ckpt.stat().st_mtime):
            flight.mkdir(exist_ok=True)
            _write(store, r["id"], unfinished, with_files=True)
    _drop_stale(store, sweep, flight)
    return n


def _drop_stale(store, sweep: str, flight: Path) -> None:
    """Remove kept checkpoints that nothing will resume: of a point that has completed since under another run, or
    superseded by a newer run of the same point (one cut off before its first checkpoint, then started afresh)."""
    from memcore.sweep import resumable_points

    runs = store.runs(sweep=sweep)
    done = {r["label"] for r in runs if r["status"] == "completed"}
    live = {r["id"] for r in runs if r["status"] == "running"} | set(resumable_points(store, sweep).values())
    known = {r["id"]: r["label"] for r in runs}
    for path in flight.glob("*.json.gz") if flight.is_dir() else ():
        rid = path.name.removesuffix(".json.gz")
        if rid in known and (known[rid] in done or rid not in live):
            path.unlink(missing_ok=True)


def restore(store, folder: Path) -> int:
    """Import every kept run `store` does not hold (by id), the unfinished ones (in_flight/) as interrupted with
    their checkpoints, unless the same point's completed run is kept; returns how many completed runs were
    imported. A file that cannot be read is named in the ValueError raised, and nothing is imported from it."""
    if not folder.is_dir():
        return 0
    have = {r["id"] for r in store.runs()}
    n = 0
    done_labels = {(r["sweep"], r["label"]) for r in store.runs(status="completed")}
    for unfinished, paths in ((False, sorted(folder.glob("*.json.gz"))),
                              (True, sorted((folder / IN_FLIGHT).glob("*.json.gz")))):
        for path in paths:
            if path.name.removesuffix(".json.gz") in have:
                continue
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    data = json.load(f)
                run = dict(data["run"])
                payload = {"run": run, "files": {rel: _raw(v) for rel, v in data.get("files", {}).items()},
                           "tables": {t: [tuple(_raw(v) for v in row) for row in rows]
                                      for t, rows in data["tables"].items()}}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a kept run ({e})") from e
            if unfinished:
                if (run.get("sweep"), run.get("label")) in done_labels:
                    continue  # finished since (a kept checkpoint left behind by a stop)
                run["status"] = "interrupted"
            else:
                done_labels.add((run.get("sweep"), run.get("label")))
                n += 1
            store.import_run(payload)
    return n


def command_of(script: str, argv: list[str]) -> str:
    """The command line that regenerates the kept points: `python <script>` and argv without --home/--keep and
    their values (where this machine kept its store is not part of the experiment)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--home", "--keep"):
            skip = True
            continue
        if a.startswith(("--home=", "--keep=")):
            continue
        out.append(a)
    return " ".join(["python", script, *out])


class Ledger:
    """The wall seconds of every invocation of one benchmark, in `folder/kept.json`: `tick()` adds the seconds
    since the last tick (call it after each completed point, so that a stopped run still counts its time)."""

    def __init__(self, folder: Path, command: str):
        self.path = folder / "kept.json"
        self.command = command
        self.last = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"wall_s": 0.0, "invocations": 0}
        self.data["invocations"] = int(self.data.get("invocations", 0)) + 1
        self.data["command"] = command
        self._write()

    def tick(self) -> None:
        now = time.time()
        self.data["wall_s"] = round(float(self.data.get("wall_s", 0.0)) + now - self.last, 1)
        self.last = now
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


class StopOnSignal:
    """A should_stop for memcore's searches and batched runs that turns SIGTERM and SIGINT into a clean stop: the
    points in training end as 'stopped' with their checkpoints (and so are kept), instead of dying mid-step. A
    second signal is not caught again."""

    def __init__(self):
        self.asked = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask)

    def _ask(self, signum, _frame) -> None:
        self.asked = True
        signal.signal(signum, signal.SIG_DFL)
        print(f"signal {signum}: stopping after this step, checkpoints kept", flush=True)

    def __call__(self) -> bool:
        return self.asked
