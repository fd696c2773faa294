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
import os
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


def keep_new(store, sweep: str, folder: Path, seeds=None) -> int:
    """Write every completed run of `sweep` in `store` (of `seeds` only, when given) that `folder` does not hold
    yet, and the resumable checkpoint of every run of it still training (or cut off) whose checkpoint is newer than
    the one kept; drop the kept checkpoints of runs that have completed. Returns how many completed runs were
    written."""
    folder.mkdir(parents=True, exist_ok=True)
    flight = folder / IN_FLIGHT
    n = 0
    for r in store.runs(sweep=sweep):
        if seeds is not None and r["seed"] not in seeds:
            continue
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
    """Bring `store` up to what `folder` keeps; returns how many completed runs were imported.

    A kept completed run is imported unless the store holds it completed already (a store that was cut off in
    that run takes the finished one over its own). A kept unfinished run (in_flight/) is imported as interrupted,
    with its checkpoint, when the store holds no completed run of that point and no copy of it with as many steps.
    A file that cannot be read or imported is named in the ValueError raised."""
    if not folder.is_dir():
        return 0
    mine = {r["id"]: r for r in store.runs()}
    done_labels = {(r["sweep"], r["label"]) for r in mine.values() if r["status"] == "completed"}
    n = 0
    for unfinished, paths in ((False, sorted(folder.glob("*.json.gz"))),
                              (True, sorted((folder / IN_FLIGHT).glob("*.json.gz")))):
        for path in paths:
            have = mine.get(path.name.removesuffix(".json.gz"))
            if have is not None and have["status"] == "completed":
                continue
            payload = _read(path)
            run = payload["run"]
            if unfinished:
                if (run.get("sweep"), run.get("label")) in done_labels:
                    continue  # finished since (a kept checkpoint left behind by a stop)
                if have is not None and int(have.get("steps") or 0) >= int(run.get("steps") or 0):
                    continue  # the store is as far along
                run["status"] = "interrupted"
            else:
                done_labels.add((run.get("sweep"), run.get("label")))
                n += 1
            try:
                store.import_run(payload)
            except Exception as e:  # a kept file of another schema: say which
                raise ValueError(f"{path}: could not be imported into {store.home} ({e})") from e
    return n


def _read(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return {"run": dict(data["run"]), "files": {rel: _raw(v) for rel, v in data.get("files", {}).items()},
                "tables": {t: [tuple(_raw(v) for v in row) for row in rows] for t, rows in data["tables"].items()}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a kept run ({e})") from e


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


RECENT = 12  # invocations kept in kept.json's "recent" list


class Ledger:
    """The wall seconds of every invocation of one benchmark, in `folder/kept.json`: `tick()` adds the seconds
    since the last tick (call it often, so that a stopped run still counts its time). Each tick reads, adds and
    writes under a lock, so two invocations at once both count (their wall times add up, as CPU time would).

    `recent` lists the last RECENT invocations, each with its start (UTC), wall seconds and `work`: the length ×
    steps its points advanced (tick(work=...) gives the total so far), from which the report reads the pace of
    the runs as they go now, apart from the time lost over the whole history (restarts, work cut off, a machine
    shared with other jobs)."""

    def __init__(self, folder: Path, command: str):
        self.path = folder / "kept.json"
        self.command = command
        self.last = time.time()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.last))
        self.first_work: float | None = None
        self.id = os.urandom(4).hex()  # this invocation's entry in `recent`
        folder.mkdir(parents=True, exist_ok=True)
        self.data = self._update(invocations=1)

    def tick(self, work: float | None = None) -> None:
        """Add the seconds since the last tick; `work`: the sweep's length × steps now (all its points)."""
        now = time.time()
        if work is not None and self.first_work is None:
            self.first_work = work
        done = None if work is None or self.first_work is None else max(0.0, work - self.first_work)
        self.data = self._update(seconds=now - self.last, done=done)
        self.last = now

    def _update(self, seconds: float = 0.0, invocations: int = 0, done: float | None = None) -> dict[str, Any]:
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            data["wall_s"] = round(float(data.get("wall_s", 0.0)) + seconds, 1)
            data["invocations"] = int(data.get("invocations", 0)) + invocations
            data["command"] = self.command
            recent = [r for r in data.get("recent", []) if isinstance(r, dict)]
            mine = next((r for r in recent if r.get("id") == self.id), None)
            if mine is None:
                mine = {"started": self.started, "id": self.id, "wall_s": 0.0, "work": 0.0}
                recent.append(mine)
            mine["wall_s"] = round(float(mine["wall_s"]) + seconds, 1)
            if done is not None:
                mine["work"] = round(done, 1)
            data["recent"] = recent[-RECENT:]
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(self.path)
        return data


class Keeper:
    """What a benchmark invocation does after each point and now and then: keep_new into `folder` (of `seeds`
    only, when given) and add the wall time to its Ledger. `ended(stopped)` keeps once more and gives the line
    the invocation ends on; t0 is when it began (time.perf_counter)."""

    def __init__(self, store, sweep: str, folder: Path, script: str, argv: list[str], t0: float, seeds=None):
        self.store, self.sweep, self.folder, self.seeds, self.t0 = store, sweep, folder, seeds, t0
        self.ledger = Ledger(folder, command_of(script, argv))
        self.ledger.first_work = self._work()  # what the store holds as this invocation begins

    def _work(self) -> float:
        """length × steps summed over every point of the sweep in the store, completed or in training; the length in
        the search's own unit, as its label gives it (tokens, or a PhoneBook's entries), as the report costs it."""
        def length(r) -> float:
            try:
                return float(json.loads(r.get("label") or "{}").get("length") or r.get("length") or 0)
            except (ValueError, AttributeError, TypeError):
                return float(r.get("length") or 0)
        return float(sum(length(r) * (r.get("steps") or 0) for r in self.store.runs(sweep=self.sweep)))

    def __call__(self) -> None:
        keep_new(self.store, self.sweep, self.folder, seeds=self.seeds)
        self.ledger.tick(work=self._work())

    def ended(self, stopped: bool) -> str:
        """Keep once more and give the invocation's last line. When it ran to the end (not `stopped`), nothing of
        this experiment trains again, so the checkpoints still under in_flight/ (later seeds the search held back
        while they trained, whose length it then never needed) are stale: they are removed, and the line says
        how many."""
        self()
        seconds = time.perf_counter() - self.t0
        if stopped:
            return f"stopped after {seconds:.0f} s; run the same command to go on"
        flight = self.folder / IN_FLIGHT
        stale = sorted(flight.glob("*.json.gz")) if flight.is_dir() else []
        for path in stale:
            path.unlink()
        if flight.is_dir() and not any(flight.iterdir()):
            flight.rmdir()
        d = self.ledger.data
        return (f"done in {seconds:.0f} s this time ({d['wall_s'] / 3600:.2f} h over {d['invocations']} "
                f"invocations, kept in {self.folder}"
                + (f"; {len(stale)} stale checkpoint{'s' if len(stale) != 1 else ''} of held-back seeds removed"
                   if stale else "") + ")")


class StopOnSignal:
    """A should_stop for memcore's searches and batched runs that turns SIGTERM and SIGINT into a clean stop: the
    points in training end as 'stopped' with their checkpoints (and so are kept), instead of dying mid-step. A
    second signal does what it did before (Ctrl-C twice: KeyboardInterrupt)."""

    def __init__(self):
        self.asked = False
        self.before = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a job started in the background keeps ignoring Ctrl-C
                self.before[sig] = signal.signal(sig, self._ask)

    def _ask(self, signum, _frame) -> None:
        self.asked = True
        signal.signal(signum, self.before.get(signum, signal.SIG_DFL))  # a second one does what it did before
        os.write(2, f"signal {signum}: stopping after this step, checkpoints kept\n".encode())

    def __call__(self) -> bool:
        return self.asked
