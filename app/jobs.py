"""The job queue shared by every session of the app, in front of one training process.

The queue lives in the run store (table jobs), so it outlives the server: a restart picks up the queued jobs
in order, and a job that was training when the server died shows as interrupted, its runs resumable from
their last checkpoint. Page scripts never train: they submit a Job and poll its live view (``RunLive``).

Exactly one app process per memcore home and device trains: the one holding the trainer lock (a file lock in
the home, released by the operating system when its holder dies). Its dispatcher thread claims jobs from
the store one at a time, hands them to a memcore training process (``memcore.service``: the model lives
there, so a busy page cannot starve training of the GIL) and files the reports it streams back. Any other
app process on the same home queues its jobs in the same store, follows them by reading the store, and takes
over the lock, and the queue, if the trainer goes away.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memcore.chain import Retention, chain_pieces
from memcore.config import ModelSpec, RunSpec
from memcore.loading import Base, load_base
from memcore.metrics import StubbornCounter, per_sample
from memcore.pieces import Piece
from memcore.records import EARLIER_FIELDS, RunSummary, StepRow
from memcore.service import SEARCH_LABEL, TrainingProcess, trainer_lock
from memcore.store import Store

SYNC_SECONDS = 0.5
MAX_FINISHED_IN_MEMORY = 16  # how often the trainer reads stop requests from the store and refreshes its heartbeat


# steps a live view keeps in full; beyond, every other one is dropped (memory and refresh cost stay flat)
MAX_KEPT = 512


@dataclass
class RunLive:
    """What the page shows of one run while it trains. Bounded whatever the run's length: per-token history is
    kept for at most MAX_KEPT steps (thinned evenly, the latest step always kept), and stubborn tokens are
    counted over every step as it arrives."""

    label: str
    spec: RunSpec
    run_id: str | None = None
    pieces: list[Piece] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # kept steps, ascending; the last is the latest step
    # per kept step: step, loss, delta_loss, frac_above, frac_correct, elapsed
    rows: list[dict[str, Any]] = field(default_factory=list)
    p_kept: np.ndarray | None = None  # [capacity, N] float16; rows [:len(steps)] hold p at the kept steps
    p_prev: np.ndarray | None = None  # [N] p at the step before the latest (for "just crossed τ")
    stride: int = 1  # kept steps are multiples of stride (plus the latest)
    stubborn: StubbornCounter | None = None
    correct: np.ndarray | None = None
    first_divergence: int | None = None
    recalled_at: int | None = None  # first step whose teacher-forced argmax was all right
    summary: RunSummary | None = None
    notes: list[str] = field(default_factory=list)  # said by the trainer as they happened
    sample_lengths: list[int] = field(default_factory=list)  # target tokens of each sample (entries of a PhoneBook)
    prompt_ids: list[list[int]] = field(default_factory=list)  # each sample's prompt (an entry's name)
    target_ids: list[list[int]] = field(default_factory=list)
    # a run trained after others (spec.train.after): their targets, measured every step without being trained on
    # (unless rehearsed), laid end to end in chain order
    earlier_runs: list[str] = field(default_factory=list)  # the chain before this run, oldest first
    earlier_pieces: list[Piece] = field(default_factory=list)
    earlier_lengths: list[int] = field(default_factory=list)  # target tokens of each earlier run, in chain order
    earlier_p: np.ndarray | None = None  # [M] p of the earlier targets at the latest step
    earlier_correct: np.ndarray | None = None  # [M] bool
    retention: Retention = field(default_factory=Retention)  # lost / regained over every step as it arrives

    @property
    def chained(self) -> bool:
        """Trained on top of an earlier run: its earlier passage is drawn beside its own."""
        return self.spec.train.after is not None

    @property
    def entries(self) -> bool:
        """Drawn as a grid of entries (many samples) rather than one strip of tokens."""
        return len(self.sample_lengths) >= 2

    @property
    def p(self) -> np.ndarray | None:
        """[N] p at the latest step."""
        return None if not self.steps else self.p_kept[len(self.steps) - 1]

    @property
    def p_history(self) -> np.ndarray:
        """[S, N] p at the kept steps (a view, not a copy)."""
        return (self.p_kept[: len(self.steps)] if self.p_kept is not None
                else np.zeros((0, len(self.pieces)), np.float16))

    def record(self, r: StepRow, summary: RunSummary | None = None) -> None:
        """Add a step (sent by the trainer, or read from the store); `summary` comes with the final one."""
        p = np.asarray(r.p, dtype=np.float16)
        row = {"step": r.step, "loss": r.loss, "delta_loss": r.delta_loss, "frac_above": r.frac_above,
               "frac_correct": r.token_accuracy, "elapsed": r.elapsed}
        if r.chained:  # this passage and the earlier ones, side by side in the chart of the chain
            row.update(recalled=bool(r.recalled), earlier_above=r.earlier_above, earlier_tokens=r.earlier_tokens,
                       earlier_recalled=bool(r.earlier_recalled), rehearsal=r.rehearsal)
            self.retention.see(r)
            if r.earlier_p is not None:
                self.earlier_p = np.asarray(r.earlier_p, dtype=np.float16)
                self.earlier_correct = np.asarray(r.earlier_correct, dtype=bool)
        if self.entries and len(p) == sum(self.sample_lengths):
            worst, right = per_sample(p, r.correct, self.sample_lengths)
            row.update(entries_recalled=int(right.sum()), entries_above=int((worst > self.spec.train.tau).sum()))
        if self.p_kept is None:
            self.p_kept = np.zeros((MAX_KEPT + 1, p.shape[0]), dtype=np.float16)
            self.stubborn = StubbornCounter(p.shape[0], self.spec.train.tau)
        k = len(self.steps)
        if k and self.steps[-1] == r.step:  # the final report re-measures the latest step
            k -= 1
        else:
            if k:
                self.p_prev = self.p_kept[k - 1].copy()
            self.stubborn.update(p)
            if k and self.steps[-1] % self.stride:  # the previous latest step was kept only for being the latest
                k -= 1
        del self.steps[k:], self.rows[k:]
        self.steps.append(r.step)
        self.rows.append(row)
        self.p_kept[k] = p
        if len(self.steps) > MAX_KEPT:
            self._thin()
        self.correct = np.asarray(r.correct, dtype=bool)
        self.first_divergence = r.first_divergence
        if r.recalled and self.recalled_at is None:
            self.recalled_at = r.step
        if r.final:
            self.summary = summary

    def _thin(self) -> None:
        """Keep every other kept step (multiples of twice the stride) and the latest one."""
        self.stride *= 2
        keep = [i for i, s in enumerate(self.steps) if s % self.stride == 0 or i == len(self.steps) - 1]
        self.p_kept[: len(keep)] = self.p_kept[keep]
        self.steps[:] = [self.steps[i] for i in keep]
        self.rows[:] = [self.rows[i] for i in keep]


@dataclass
class Job:
    id: str
    session: str | None
    specs: list[RunSpec]
    labels: list[str]
    kind: str = "train"  # train (new runs) | resume (continue stored runs) | frontier (a frontier search)
    status: str = "queued"  # queued | loading | running | done | stopped | failed | interrupted
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    runs: list[RunLive] = field(default_factory=list)
    fed: bool = False  # this process's trainer streams its reports; otherwise it is followed through the store
    stop_requested: bool = False  # Stop was pressed; the trainer stops after its current step
    lock: threading.Lock = field(default_factory=threading.Lock)
    search: dict[str, Any] | None = None  # a frontier search's latest progress (memcore.search.SearchProgress)

    @property
    def is_live(self) -> bool:
        return self.status in ("queued", "loading", "running")

    @property
    def title(self) -> str:
        """What the job trains, in words: its runs' labels, or the frontier search's ranks."""
        if self.kind == "frontier":
            d = json.loads(self.labels[0][len(SEARCH_LABEL):])
            return f"frontier search, ranks {', '.join(map(str, d['ranks']))}"
        return ", ".join(self.labels)

    @property
    def max_steps(self) -> int:
        return max(s.train.max_steps for s in self.specs)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        specs = [RunSpec.from_dict(d) for d in row["specs"]]
        job = cls(id=row["id"], session=row["session"], specs=specs, labels=row["labels"], kind=row["kind"],
                  created=row["created"])
        if job.kind != "frontier":  # a search's probes are not followed one by one: its progress says where it is
            job.runs = [RunLive(label=lab, spec=s, run_id=rid)
                        for lab, s, rid in zip(job.labels, specs, row["run_ids"])]
        job.update_from_row(row)
        return job

    def update_from_row(self, row: dict[str, Any]) -> None:
        status = row["status"]
        if status == "running" and not any(r.steps for r in self.runs) and self.search is None:
            status = "loading"
        self.status, self.error, self.started, self.finished = status, row["error"], row["started"], row["finished"]


class Worker:
    """The queue as this app process sees it, and (while it holds the trainer lock) the training process and
    the dispatcher thread between the two."""

    def __init__(self, home: Path, preload: ModelSpec | None = None):
        self.home = Path(home)
        self.store = Store(self.home)
        self.jobs: dict[str, Job] = {}
        self.ready_models: set[str] = set()
        self.loading_error: str | None = None
        self.owner = False  # holds the trainer lock: this process trains
        self._preload = preload
        self._trainer_lock = trainer_lock(self.home)
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._inference: dict[ModelSpec, Base] = {}  # at most one: the base the last generate used
        self._current: Job | None = None
        self._proc: TrainingProcess | None = None
        self._closed = False
        self._try_own()
        self._thread = threading.Thread(target=self._dispatch, name="memcore-dispatch", daemon=True)
        self._thread.start()
        # a server shutting down stops its run cleanly (checkpoint saved) and frees the lock
        atexit.register(self.close)

    # --- called from page scripts ---------------------------------------------------------------------------

    def submit(self, specs: list[RunSpec], session: str, labels: list[str] | None = None, *, kind: str = "train",
               run_ids: list[str] | None = None) -> Job:
        """Queue new runs of `specs` (kind train) or the continuation of stored runs `run_ids` (kind resume)."""
        labels = labels or [s.train.method for s in specs]
        jid = self.store.create_job([s.to_dict() for s in specs], labels, kind=kind, session=session, run_ids=run_ids)
        job = Job.from_row(self.store.job(jid))
        with self._lock:
            # the job is in the queue from create_job on: the dispatcher may have claimed it already and be feeding
            # a Job of its own; keep that one (replacing it left the dispatcher's current job never finishing, so
            # no later job ever started)
            return self.jobs.setdefault(jid, job)

    def find(self, job_id: str | None) -> Job | None:
        """The job with this id, from any session or app process, brought up to date."""
        if not job_id:
            return None
        job = self.jobs.get(job_id)
        if job is None:
            row = self.store.job(job_id)
            if row is None:
                return None
            job = Job.from_row(row)
            with self._lock:
                job = self.jobs.setdefault(job_id, job)
        if not job.fed:
            self._follow(job)
        return job

    def position(self, job: Job) -> int:
        """0 while the job runs; otherwise how many jobs are ahead of it (from every session and app process)."""
        if job.status != "queued":
            return 0
        return sum(1 for j in self.store.jobs(("queued", "running"))
                   if j["id"] != job.id and j["created"] <= job.created)

    def stop(self, job: Job) -> None:
        job.stop_requested = True
        self.store.request_stop(job.id)
        with self._lock:
            if job.status == "queued":
                job.status, job.finished = "stopped", time.time()
            elif self._current is job and self._proc is not None:
                self._proc.stop_job(job.id)

    def live_jobs(self) -> list[Job]:
        return [j for j in (self.find(r["id"]) for r in self.store.jobs(("queued", "running"))) if j is not None]

    def is_model_ready(self, spec: ModelSpec) -> bool:
        return spec.name in self.ready_models

    @property
    def trainer(self) -> str:
        """Who trains this queue: 'here', or a description of the other app process that holds the lock."""
        return "here" if self.owner else "another memcore app on this memcore home"

    def generate(self, run_id: str, prompt: str | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        """Greedy generation from a finished run's adapter, on an inference copy of its base model in this
        process (the training process keeps its own). See memcore.runner.generate_from_run."""
        from memcore.runner import generate_from_run, stored_run_spec

        spec = stored_run_spec(self.store, run_id)
        with self._gen_lock:
            if spec.model not in self._inference:
                self._inference.clear()  # keep one inference model at a time
                self._inference[spec.model] = load_base(spec.model, self.home)
            return generate_from_run(self.store, run_id, self._inference[spec.model], prompt, max_new_tokens)

    def close(self, grace: float = 30.0) -> None:
        """Stop the dispatcher and the training process and give up the trainer lock (when the server shuts down,
        and in tests). A job still training is asked to stop after its step (saving its adapter and checkpoint,
        `grace` seconds at most) and is left interrupted, its runs resumable."""
        if self._closed:
            return
        job = self._current
        if job is not None and self._proc is not None and self._proc.alive:
            self._proc.stop_job(job.id)
            deadline = time.monotonic() + grace
            while self._current is job and time.monotonic() < deadline:
                time.sleep(0.1)
        self._closed = True
        self._thread.join(timeout=5)
        if self._proc is not None:  # with no run in it, the child has nothing to save: no need to wait long
            self._proc.close(wait=5.0 if job is not None else 1.0)
        if job is not None:
            self.store.interrupt_job(job.id, "the app stopped while it trained")
            self.store.mark_interrupted()
        if self.owner:
            self._trainer_lock.release()
        self.store.close()

    # --- following a job through the store (trained by another process, or before a restart) -------------------

    def _follow(self, job: Job) -> None:
        row = self.store.job(job.id)
        if row is None:
            return
        with job.lock:
            for live, rid in zip(job.runs, row["run_ids"]):
                if rid is None:
                    continue
                if live.run_id != rid or not live.pieces:
                    try:
                        live.pieces = self.store.tokens(rid)["pieces"]
                    except Exception:
                        continue  # not measured yet
                    live.run_id = rid
                _catch_up(live, self.store, rid)
            job.update_from_row(row)

    # --- the dispatcher thread ------------------------------------------------------------------------------

    def _try_own(self) -> bool:
        """Take the trainer lock if nobody holds it; the holder starts the training process."""
        from filelock import Timeout

        if self.owner:
            return True
        try:
            self._trainer_lock.acquire(timeout=0)
        except Timeout:
            return False
        self.owner = True
        self.store.mark_interrupted()  # jobs and runs of a trainer that died are interrupted, not running
        self._proc = TrainingProcess(self.home, threads=_train_threads())
        if self._preload is not None:
            self._proc.send("preload", asdict(self._preload))
        return True

    def _dispatch(self) -> None:
        last_sync = 0.0
        while not self._closed:
            if not self._try_own():
                time.sleep(1.0)  # another process trains; take over if it goes away
                continue
            with self._lock:
                if self._current is None:
                    row = self.store.claim_job()
                    if row is not None:
                        job = self.jobs.get(row["id"]) or Job.from_row(row)
                        job.fed, job.status, job.started = True, "loading", row["started"]
                        self.jobs[job.id] = job
                        self._current = job
                        self._proc.send("run", job.id, job.kind, [s.to_dict() for s in job.specs], job.labels,
                                        row["run_ids"])
            if self._current is not None and time.monotonic() - last_sync >= SYNC_SECONDS:
                last_sync = time.monotonic()
                self._sync_current()
            msg = self._proc.receive(timeout=0.1)
            if msg is None:
                if not self._proc.alive and not self._closed:
                    self._crashed()
                continue
            self._handle(msg)

    def _sync_current(self) -> None:
        """Pass a stop request made in any process on to the trainer, and keep the job's heartbeat fresh."""
        job = self._current
        if job is None:
            return
        row = self.store.job(job.id)
        if row is not None and row["stop"]:
            self._proc.stop_job(job.id)
        self.store.update_job(job.id)

    def _crashed(self) -> None:
        """The training process died (killed, out of memory): fail its job and start a new process."""
        with self._lock:
            job, self._current = self._current, None
            if job is not None:
                job.status, job.error, job.finished = ("failed", "the training process died (out of memory?)",
                                                       time.time())
                self.store.update_job(job.id, status="failed", error=job.error)
            self.ready_models.clear()
            self.store.mark_interrupted()
            self._proc = TrainingProcess(self.home, threads=_train_threads())

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self.ready_models.add(msg[1])
            return
        if kind == "load_error":
            self.loading_error = msg[2]
            return
        job = self.jobs.get(msg[1])
        if job is None:
            return
        if kind == "started":
            _, _, i, run_id, pieces, step = msg
            self.store.update_job(job.id, run_index=i, run_id=run_id)
            with job.lock:
                live = job.runs[i]
                live.run_id, live.pieces = run_id, pieces
                _sample_layout(live, self.store, run_id)
                if step > 0:  # a resumed run: its history before the checkpoint comes from the store
                    _catch_up(live, self.store, run_id, before=step)
                job.status = "running"
            self.ready_models.add(job.specs[i].model.name)
        elif kind == "report":
            _, _, i, row, summary = msg
            with job.lock:
                job.runs[i].record(row, summary)
        elif kind == "search":
            with job.lock:
                job.search = msg[2]
                job.status = "running"
            self.ready_models.add(job.specs[0].model.name)
        elif kind == "note":
            _, _, i, note = msg
            with job.lock:
                job.runs[i].notes.append(note)
        elif kind == "done":
            _, _, status, error = msg
            self.store.update_job(job.id, status=status, error=error)
            with self._lock:
                job.status, job.error, job.finished = status, error, time.time()
                if self._current is not None and self._current.id == job.id:
                    self._current = None
                self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        """Keep the live views of the MAX_FINISHED_IN_MEMORY most recent finished jobs; an older one is read
        back from the store if a page asks for it (a server that runs for weeks must not grow without end)."""
        finished = sorted((j for j in self.jobs.values() if not j.is_live and j is not self._current),
                          key=lambda j: j.created)
        for j in finished[:-MAX_FINISHED_IN_MEMORY]:
            del self.jobs[j.id]


def _train_threads() -> int | None:
    """CPU threads for the training process: torch's default (every core), or MEMCORE_TRAIN_THREADS.

    Measured with bench/soak_app.py on 2 cores, a 500-token passage, the page open in Chromium on the same
    machine: one thread (a core left to the page) 1.89 s/step; every core 1.51 s/step, once the server no
    longer runs a full garbage collection after each refresh (.streamlit/config.toml); memcore train 1.02."""
    import os

    if os.environ.get("MEMCORE_TRAIN_THREADS"):
        return int(os.environ["MEMCORE_TRAIN_THREADS"])
    return None


def _sample_layout(live: RunLive, store: Store, run_id: str) -> None:
    """The run's samples as stored (lengths, prompts, targets): what draws many samples as entries."""
    try:
        tok = store.tokens(run_id)
    except Exception:  # no token data yet: drawn as one strip
        return
    lengths = tok["sample_lengths"] or [len(t) for t in tok["target_ids"]]
    if len(lengths) >= 2:
        live.sample_lengths, live.prompt_ids, live.target_ids = lengths, tok["prompt_ids"], tok["target_ids"]
    if live.chained and not live.earlier_runs:
        try:
            chain, per_run = chain_pieces(store, run_id)
            live.earlier_pieces = [piece for pieces in per_run for piece in pieces]
            live.earlier_lengths = [len(pieces) for pieces in per_run]
            live.earlier_runs = chain
        except Exception:  # an earlier run deleted since: its passage is not drawn, this run's still is
            pass


def _catch_up(live: RunLive, store: Store, run_id: str, before: int | None = None) -> None:
    """Record the steps the store has beyond what `live` shows (all of them, for a run trained elsewhere)."""
    if live.run_id == run_id and not live.sample_lengths:
        _sample_layout(live, store, run_id)
    after = live.steps[-1] if live.steps else -1
    rows = store.step_rows(run_id, after=after, before=before)
    if live.chained and rows:  # the earlier passages' measurements are kept in a table of their own
        earlier = {r.step: r for r in store.earlier_steps(run_id, with_tokens=True, after=after)}
        for row in rows:
            e = earlier.get(row.step)
            if e is not None:
                for f in EARLIER_FIELDS:
                    setattr(row, f, getattr(e, f))
    for row in rows:
        live.record(row)
    if before is None:
        run = store.run(run_id)
        if run["summary"] and run["status"] not in ("queued", "running"):
            live.summary = dataclasses.replace(run["summary"], status=run["status"])


