"""Run store: one SQLite database (WAL) in the memcore home plus a folder per run for its adapter.

Tables
  runs         one row per run: spec, status, times, final summary
  steps        per-step scalar metrics
  token_steps  per-step p (float16) and argmax-correct (packed bits) of every target token, for replay
  tokens       each run's prompt ids, target ids and base per-token loss

  jobs         the app's queue: what to train (new runs, or runs to resume), in order, across restarts

Status moves queued -> running -> completed | stopped | failed; a run whose process died while running
(or queued) is shown as interrupted the next time anyone opens the store. A job moves queued -> running ->
done | stopped | failed, or to interrupted when the process that ran it died; a queued job waits for
whichever trainer claims it next, in the order jobs were created.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memcore.config import MemcoreError, WriteFailed
from memcore.pieces import Piece
from memcore.records import STEP_COLUMNS, RunSummary, StepRow

STATUSES = ("queued", "running", "completed", "stopped", "failed", "interrupted")
LIVE = ("queued", "running")
JOB_STATUSES = ("queued", "running", "done", "stopped", "failed", "interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, created REAL NOT NULL, started REAL, finished REAL, status TEXT NOT NULL,
  model TEXT, method TEXT, rank INTEGER, length INTEGER, seed INTEGER, sweep TEXT, label TEXT,
  spec TEXT NOT NULL, summary TEXT, error TEXT, pid INTEGER, host TEXT, heartbeat REAL, steps INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS steps (
  run_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, delta_loss REAL, n_above INTEGER, n_correct INTEGER,
  n_tokens INTEGER, active INTEGER, recalled INTEGER, first_divergence INTEGER, elapsed REAL, lr REAL, skipped INTEGER,
  PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS token_steps (
  run_id TEXT NOT NULL, step INTEGER NOT NULL, p BLOB NOT NULL, correct BLOB NOT NULL, PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS tokens (
  run_id TEXT PRIMARY KEY, prompt_ids TEXT NOT NULL, target_ids TEXT NOT NULL, pieces TEXT, base_loss BLOB, \
sample_lengths TEXT
);
CREATE TABLE IF NOT EXISTS earlier_steps (
  run_id TEXT NOT NULL, step INTEGER NOT NULL, n_above INTEGER, n_correct INTEGER, n_tokens INTEGER, recalled INTEGER,
  prefix INTEGER, rehearsal REAL, p BLOB, correct BLOB, PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, created REAL NOT NULL, session TEXT, status TEXT NOT NULL, kind TEXT NOT NULL, \
specs TEXT NOT NULL,
  labels TEXT NOT NULL, run_ids TEXT NOT NULL, error TEXT, started REAL, finished REAL, pid INTEGER, host TEXT,
  heartbeat REAL, stop INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created);
"""



def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `folder` has less than `margin` bytes free (1 MB)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def new_run_id() -> str:
    """A run id: local time (YYYYmmdd-HHMMSS) and 6 hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class Replay:
    """Everything needed to replay a run step by step."""

    steps: list[int]
    p: np.ndarray  # [S, N] float32
    correct: np.ndarray  # [S, N] bool
    target_ids: list[int]
    pieces: list[Piece]


class Store:
    """A handle on the run store. Safe to share between threads (one connection, serialized)."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.runs_dir = self.home / "runs"
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self.path = self.home / "runs.db"
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            for attempt in range(300):  # switching to WAL needs a moment alone with the file (two first opens at once)
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 299:
                        raise
                    time.sleep(0.1)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            if _disk_full(self.home):  # "disk I/O error" when SQLite cannot grow its files: the store is intact
                raise WriteFailed("the run store", self.home / "runs.db", f"{e}: the disk is full; the store is kept "
                                  "as it was, free some space and try again") from None
            raise MemcoreError(f"the run store {self.home / 'runs.db'} cannot be opened ({e}); "
                               "move it aside to start a new one") from None
        except OSError as e:
            raise MemcoreError(f"the memcore home {self.home} is not writable ({e.strerror or e})") from None
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            self.mark_interrupted()
        except WriteFailed:  # a full disk: reading the store still works, the marks wait for space
            pass

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def _failed_write(self, e: sqlite3.Error) -> WriteFailed | None:
        """The WriteFailed an SQLite error stands for (a full disk, a read-only or failing file system), else None."""
        text = str(e)
        if any(w in text for w in ("full", "disk I/O", "readonly", "read-only", "unable to open")):
            return WriteFailed("the run store", self.path, text)
        return None

    def _exec(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.OperationalError as e:
                raise (self._failed_write(e) or e) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that takes the write lock up front (BEGIN IMMEDIATE), so that another process
        writing at the same moment makes this one wait (busy timeout) instead of failing as "locked". A full disk
        (or a read-only one) raises WriteFailed naming the store; the transaction is rolled back whole."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                raise (self._failed_write(e) or e) from None

    # --- lifecycle --------------------------------------------------------------------------------------

    def mark_interrupted(self) -> int:
        """Runs left queued/running, and jobs left running, by a process that is gone are marked interrupted.
        Returns how many runs."""
        host = socket.gethostname()

        def dead(r: sqlite3.Row) -> bool:
            return ((r["host"] == host and not _pid_alive(r["pid"]))
                    or (r["host"] != host and (r["heartbeat"] or 0) < time.time() - 300))

        rows = self._exec("SELECT id, pid, host, heartbeat FROM runs WHERE status IN ('queued','running')").fetchall()
        runs = [r["id"] for r in rows if dead(r)]
        for rid in runs:
            self._exec("UPDATE runs SET status='interrupted', finished=COALESCE(finished, heartbeat) "
                       "WHERE id=? AND status IN ('queued','running')", (rid,))
        for j in self._exec("SELECT id, pid, host, heartbeat FROM jobs WHERE status='running'").fetchall():
            if dead(j):
                self._exec("UPDATE jobs SET status='interrupted', finished=COALESCE(heartbeat, started), "
                           "error=COALESCE(error, 'the app that ran it stopped') WHERE id=? AND status='running'",
                           (j["id"],))
        return len(runs)

    def create_run(self, spec: dict[str, Any], *, run_id: str | None = None, status: str = "queued",
                   sweep: str | None = None, label: str | None = None) -> str:
        """Add a run row for `spec` (a RunSpec dict) and make its folder; returns the run id."""
        m, a, d, t = spec["model"], spec["adapter"], spec["data"], spec["train"]
        for attempt in range(20):
            rid = run_id or new_run_id()
            try:
                self._exec(
                    "INSERT INTO runs (id, created, status, model, method, rank, length, seed, sweep, label, spec, "
                    "pid, host, heartbeat) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rid, time.time(), status, m["name"], t["method"], a["rank"], d.get("length"), t["seed"], sweep,
                     label, json.dumps(spec), os.getpid(), socket.gethostname(), time.time()))
                break
            except sqlite3.IntegrityError:
                if run_id is not None or attempt == 19:  # a given id is taken, or ids keep colliding
                    raise
        try:
            (self.runs_dir / rid).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteFailed.of("the run's folder", self.runs_dir / rid, e) from None
        return rid

    def set_status(self, run_id: str, status: str, *, error: str | None = None,
                   summary: RunSummary | None = None) -> None:
        """Set a run's status (one of STATUSES), with an error text or its final RunSummary."""
        assert status in STATUSES
        now = time.time()
        sets, args = ["status=?", "heartbeat=?", "pid=?"], [status, now, os.getpid()]
        if status == "running":
            sets.append("started=COALESCE(started, ?)")
            args.append(now)
        if status not in LIVE:
            sets.append("finished=?")
            args.append(now)
        if error is not None:
            sets.append("error=?")
            args.append(error)
        if summary is not None:
            sets.append("summary=?")
            args.append(json.dumps(summary.to_dict()))
            sets += ["steps=?", "length=?"]
            args += [summary.steps, summary.n_tokens]
        self._exec(f"UPDATE runs SET {', '.join(sets)} WHERE id=?", (*args, run_id))

    def save_tokens(self, run_id: str, prompt_ids: list[list[int]], target_ids: list[list[int]], pieces: list[Piece],
                    base_loss: np.ndarray) -> None:
        """Record a run's prompt and target ids, their display pieces and base loss per target token (nats)."""
        self._exec("INSERT OR REPLACE INTO tokens VALUES (?,?,?,?,?,?)",
                   (run_id, json.dumps(prompt_ids), json.dumps(target_ids), json.dumps([p.to_json() for p in pieces]),
                    np.asarray(base_loss, dtype=np.float32).tobytes(), json.dumps([len(t) for t in target_ids])))

    def write_steps(self, run_id: str, rows: list[StepRow]) -> None:
        """Append a block of step rows in one transaction (and refresh the heartbeat). A row whose p is None
        is stored without its per-token snapshot (a decimated history)."""
        if not rows:
            return
        with self._write() as db:
            db.executemany(f"INSERT OR REPLACE INTO steps VALUES ({','.join('?' * (len(STEP_COLUMNS) + 1))})",
                           [(run_id, *r.scalars()) for r in rows])
            db.executemany("INSERT OR REPLACE INTO token_steps VALUES (?,?,?,?)",
                           [(run_id, r.step, np.asarray(r.p, dtype=np.float16).tobytes(),
                             np.packbits(np.asarray(r.correct, dtype=bool)).tobytes())
                            for r in rows if r.p is not None])
            db.executemany("INSERT OR REPLACE INTO earlier_steps VALUES (?,?,?,?,?,?,?,?,?,?)",
                           [(run_id, r.step, r.earlier_above, r.earlier_correct_n, r.earlier_tokens,
                             int(bool(r.earlier_recalled)), r.earlier_prefix, r.rehearsal,
                             None if r.p is None else np.asarray(r.earlier_p, dtype=np.float16).tobytes(),
                             None if r.p is None else np.packbits(np.asarray(r.earlier_correct, dtype=bool)).tobytes())
                            for r in rows if r.chained])
            db.execute("UPDATE runs SET heartbeat=?, steps=? WHERE id=?", (time.time(), rows[-1].step, run_id))

    def truncate_steps(self, run_id: str, from_step: int) -> None:
        """Drop the recorded steps from `from_step` on (a resumed run continues its history from there)."""
        with self._write() as db:
            for table in ("steps", "token_steps", "earlier_steps"):
                db.execute(f"DELETE FROM {table} WHERE run_id=? AND step>=?", (run_id, from_step))
            db.execute("UPDATE runs SET steps=?, summary=NULL, finished=NULL, error=NULL WHERE id=?",
                       (max(0, from_step - 1), run_id))

    def delete_run(self, run_id: str) -> None:
        """Remove a run's rows and folder."""
        import shutil

        with self._write() as db:
            for table in ("steps", "token_steps", "tokens", "earlier_steps"):
                db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
        shutil.rmtree(self.runs_dir / run_id, ignore_errors=True)

    # --- queries --------------------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """A run id from an id, a unique id prefix, or 'last'."""
        if ref == "last":
            row = self._exec("SELECT id FROM runs ORDER BY created DESC LIMIT 1").fetchone()
            if row is None:
                raise MemcoreError("the run store is empty")
            return row["id"]
        rows = self._exec("SELECT id FROM runs WHERE id LIKE ? ORDER BY created",
                          (ref.replace("%", "") + "%",)).fetchall()
        if not rows:
            raise MemcoreError(f"no run {ref!r} in the store (see `memcore runs`)")
        exact = [r["id"] for r in rows if r["id"] == ref]
        if exact:
            return exact[0]
        if len(rows) > 1:
            raise MemcoreError(f"run prefix {ref!r} is ambiguous: {', '.join(r['id'] for r in rows[:5])}")
        return rows[0]["id"]

    def run(self, run_id: str) -> dict[str, Any]:
        """One run's row (spec as a dict, summary as a RunSummary or None). Raises MemcoreError if unknown."""
        row = self._exec("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise MemcoreError(f"no run {run_id!r} in the store")
        return self._row(row)

    def runs(self, *, method: str | None = None, model: str | None = None, status: str | None = None,
             sweep: str | None = None) -> list[dict[str, Any]]:
        """Runs oldest first, optionally filtered by method, model, status or sweep."""
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        for col, val in (("method", method), ("model", model), ("status", status), ("sweep", sweep)):
            if val is not None:
                sql += f" AND {col}=?"
                args.append(val)
        return [self._row(r) for r in self._exec(sql + " ORDER BY created", args).fetchall()]

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["spec"] = json.loads(d["spec"]) if d["spec"] else {}
        d["summary"] = RunSummary.from_dict(json.loads(d["summary"])) if d["summary"] else None
        return d

    def steps(self, run_id: str) -> list[StepRow]:
        """Every recorded step of a run, in order, scalars only (p and correct None: see step_rows, replay)."""
        rows = self._exec(f"SELECT {', '.join(STEP_COLUMNS)} FROM steps WHERE run_id=? ORDER BY step",
                          (run_id,)).fetchall()
        return [StepRow.from_scalars(tuple(r)) for r in rows]

    def tokens(self, run_id: str) -> dict[str, Any]:
        """A run's prompt_ids, target_ids, pieces, base_loss [N] and sample_lengths. Raises MemcoreError
        when the run never started."""
        row = self._exec("SELECT * FROM tokens WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise MemcoreError(f"run {run_id} has no token data (it never started)")
        return {"prompt_ids": json.loads(row["prompt_ids"]), "target_ids": json.loads(row["target_ids"]),
                "pieces": [Piece.from_json(v) for v in json.loads(row["pieces"] or "[]")],
                "base_loss": np.frombuffer(row["base_loss"], dtype=np.float32),
                "sample_lengths": json.loads(row["sample_lengths"] or "[]")}

    def replay(self, run_id: str) -> Replay:
        """A run's per-token history: steps, p [S, N], correct [S, N], target ids and pieces."""
        tok = self.tokens(run_id)
        n = sum(len(t) for t in tok["target_ids"])
        rows = self._exec("SELECT step, p, correct FROM token_steps WHERE run_id=? ORDER BY step", (run_id,)).fetchall()
        p = np.stack([np.frombuffer(r["p"], dtype=np.float16).astype(np.float32) for r in rows]) if rows \
            else np.zeros((0, n), np.float32)
        c = np.stack([np.unpackbits(np.frombuffer(r["correct"], dtype=np.uint8))[:n].astype(bool) for r in rows]) \
            if rows else np.zeros((0, n), bool)
        return Replay([r["step"] for r in rows], p, c, [t for ts in tok["target_ids"] for t in ts], tok["pieces"])

    def earlier_steps(self, run_id: str, with_tokens: bool = False, after: int = -1) -> list[StepRow]:
        """A chained run's measurements of its earlier runs' targets, step by step (those after step `after`):
        StepRows with only step and the earlier_* fields (and rehearsal) set; with_tokens: earlier_p [M] float16 and
        earlier_correct [M] bool at the steps that kept a per-token snapshot (the others are left out). Empty for a
        run without earlier targets."""
        rows = self._exec("SELECT * FROM earlier_steps WHERE run_id=? AND step>? ORDER BY step",
                          (run_id, after)).fetchall()
        out = []
        for r in rows:
            if with_tokens and r["p"] is None:
                continue
            row = StepRow(step=r["step"], loss=math.nan, delta_loss=math.nan, n_above=0, n_correct=0, n_tokens=0,
                          active=0, recalled=False, first_divergence=None, elapsed=math.nan, lr=math.nan,
                          skipped=False, earlier_above=r["n_above"], earlier_correct_n=r["n_correct"],
                          earlier_tokens=r["n_tokens"], earlier_recalled=bool(r["recalled"]),
                          earlier_prefix=r["prefix"], rehearsal=r["rehearsal"])
            if with_tokens:
                m = r["n_tokens"]
                row.earlier_p = np.frombuffer(r["p"], dtype=np.float16)
                row.earlier_correct = np.unpackbits(np.frombuffer(r["correct"], dtype=np.uint8))[:m].astype(bool)
            out.append(row)
        return out

    def step_rows(self, run_id: str, after: int = -1, before: int | None = None) -> list[StepRow]:
        """Recorded steps after step `after` (and before `before`), each with its scalars and the per-token
        p ([N] float16) and correct ([N] bool) arrays: what a live view needs to catch up incrementally."""
        n = self._exec("SELECT target_ids FROM tokens WHERE run_id=?", (run_id,)).fetchone()
        if n is None:
            return []
        n_tokens = sum(len(t) for t in json.loads(n["target_ids"]))
        sql = (f"SELECT {', '.join('s.' + c for c in STEP_COLUMNS)}, t.p, t.correct FROM steps s JOIN token_steps t "
               "ON t.run_id = s.run_id AND t.step = s.step WHERE s.run_id=? AND s.step>?")
        args: list[Any] = [run_id, after]
        if before is not None:
            sql += " AND s.step<?"
            args.append(before)
        out = []
        for r in self._exec(sql + " ORDER BY s.step", args).fetchall():
            row = StepRow.from_scalars(tuple(r[c] for c in STEP_COLUMNS))
            row.p = np.frombuffer(r["p"], dtype=np.float16)
            row.correct = np.unpackbits(np.frombuffer(r["correct"], dtype=np.uint8))[:n_tokens].astype(bool)
            out.append(row)
        return out

    # --- moving a run between stores (a Ray worker's scratch store -> the driver's) ---------------------------

    def export_run(self, run_id: str) -> dict[str, Any]:
        """Everything of one run as plain data: its rows in every table and the files of its folder."""
        with self._lock:
            run = dict(self._db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
            tables = {t: [tuple(r) for r in self._db.execute(f"SELECT * FROM {t} WHERE run_id=?", (run_id,)).fetchall()]
                      for t in ("steps", "token_steps", "tokens", "earlier_steps")}
        folder = self.runs_dir / run_id
        files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
        return {"run": run, "tables": tables, "files": files}

    def import_run(self, payload: dict[str, Any], rewrite: dict[str, str] | None = None) -> str:
        """Add an exported run (replacing a row with the same id). `rewrite` maps text found in its files
        (a worker's paths) to what it should say here."""
        run = dict(payload["run"])
        rid = run["id"]
        run["pid"], run["host"] = os.getpid(), socket.gethostname()
        folder = self.runs_dir / rid
        for rel, data in payload["files"].items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rewrite and rel.endswith((".json", ".txt")):
                text = data.decode("utf-8", errors="replace")
                for old, new in rewrite.items():
                    text = text.replace(old, new)
                data = text.encode()
            target.write_bytes(data)
        if rewrite and run.get("summary"):
            for old, new in rewrite.items():
                run["summary"] = run["summary"].replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
        with self._write() as db:
            for t in ("steps", "token_steps", "tokens", "earlier_steps"):
                db.execute(f"DELETE FROM {t} WHERE run_id=?", (rid,))
                rows = payload["tables"].get(t, [])  # a payload of an older version has no earlier_steps
                if rows:
                    db.executemany(f"INSERT INTO {t} VALUES ({','.join('?' * len(rows[0]))})", rows)
            cols = list(run)
            db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       [run[c] for c in cols])
        return rid

    # --- the job queue ------------------------------------------------------------------------------------------

    def create_job(self, specs: list[dict[str, Any]], labels: list[str], *, kind: str = "train",
                   session: str | None = None, run_ids: list[str | None] | None = None) -> str:
        """Queue a job: kind 'train' (new runs of these specs) or 'resume' (continue these run ids)."""
        jid = uuid.uuid4().hex[:10]
        self._exec("INSERT INTO jobs (id, created, session, status, kind, specs, labels, run_ids) "
                   "VALUES (?,?,?,?,?,?,?,?)",
                   (jid, time.time(), session, "queued", kind, json.dumps(specs), json.dumps(labels),
                    json.dumps(run_ids or [None] * len(specs))))
        return jid

    def claim_job(self) -> dict[str, Any] | None:
        """Take the oldest queued job for this process (status running), or None if the queue is empty."""
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status='running', started=?, heartbeat=?, pid=?, host=? WHERE id=?",
                       (now, now, os.getpid(), socket.gethostname(), row["id"]))
        return self.job(row["id"])

    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job's row, or None."""
        row = self._exec("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else self._job_row(row)

    def jobs(self, statuses: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Jobs in queue order (oldest first), optionally only those with one of these statuses."""
        sql, args = "SELECT * FROM jobs", []
        if statuses:
            sql += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args = list(statuses)
        return [self._job_row(r) for r in self._exec(sql + " ORDER BY created, rowid", args).fetchall()]

    @staticmethod
    def _job_row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for k in ("specs", "labels", "run_ids"):
            d[k] = json.loads(d[k])
        d["stop"] = bool(d["stop"])
        return d

    def update_job(self, job_id: str, *, status: str | None = None, error: str | None = None,
                   run_index: int | None = None, run_id: str | None = None) -> None:
        """Record a job's progress: its status (finishing it if final), an error, or the run id of its i-th run."""
        with self._write() as db:
            now = time.time()
            if run_index is not None:
                ids = json.loads(db.execute("SELECT run_ids FROM jobs WHERE id=?", (job_id,)).fetchone()["run_ids"])
                ids[run_index] = run_id
                db.execute("UPDATE jobs SET run_ids=? WHERE id=?", (json.dumps(ids), job_id))
            if status is not None:
                assert status in JOB_STATUSES
                db.execute("UPDATE jobs SET status=?, finished=? WHERE id=?",
                           (status, now if status not in LIVE else None, job_id))
            if error is not None:
                db.execute("UPDATE jobs SET error=? WHERE id=?", (error, job_id))
            db.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND status='running'", (now, job_id))

    def interrupt_job(self, job_id: str, reason: str) -> None:
        """The app that ran this job went away mid-run: the job and its runs that were stopped on the way out
        (adapter and checkpoint saved) are marked interrupted, as a crash would leave them, so they are offered
        a resume."""
        job = self.job(job_id)
        if job is None:
            return
        for rid in job["run_ids"]:
            if rid and self.run(rid)["status"] in ("stopped", "running"):
                self._exec("UPDATE runs SET status='interrupted', error=? WHERE id=?", (reason, rid))
        self.update_job(job_id, status="interrupted", error=reason)

    def request_stop(self, job_id: str) -> None:
        """A queued job is stopped at once; a running one is asked to stop after its current step."""
        with self._write() as db:
            db.execute("UPDATE jobs SET status='stopped', finished=? WHERE id=? AND status='queued'",
                       (time.time(), job_id))
            db.execute("UPDATE jobs SET stop=1 WHERE id=?", (job_id,))

    def adapter_dir(self, run_id: str) -> Path:
        """The folder a run's adapter is saved in."""
        return self.runs_dir / run_id / "adapter"
