"""The job queue shared by every session of the app, in front of one training process.

Page scripts never train: they submit a Job and poll its live view (``RunLive``). A dispatcher thread
hands jobs one at a time to a memcore training process (``memcore.service``: the model lives there, so a
busy page cannot starve training of the GIL) and files the reports it streams back. A compare job advances
two runs (sft and memft-ot on the same text and seed) in alternation, so both move live.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memcore.config import ModelSpec, RunSpec
from memcore.models import Base, load_base
from memcore.pieces import Piece
from memcore.service import TrainingProcess
from memcore.store import Store


@dataclass
class RunLive:
    """What the page shows of one run while it trains."""

    label: str
    spec: RunSpec
    run_id: str | None = None
    pieces: list[Piece] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # step, loss, delta_loss, frac_above, frac_correct, elapsed
    p_history: list[np.ndarray] = field(default_factory=list)  # [N] float16 per step
    correct: np.ndarray | None = None
    first_divergence: int | None = None
    recalled_at: int | None = None  # first step whose teacher-forced argmax was all right
    summary: dict[str, Any] | None = None


@dataclass
class Job:
    id: str
    session: str
    specs: list[RunSpec]
    labels: list[str]
    status: str = "queued"  # queued | loading | running | done | stopped | failed
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    runs: list[RunLive] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "loading", "running")

    @property
    def max_steps(self) -> int:
        return max(s.train.max_steps for s in self.specs)


class Worker:
    """A FIFO of jobs, the training process that runs them one at a time, and the thread between the two."""

    def __init__(self, home: Path, preload: ModelSpec | None = None):
        self.home = Path(home)
        self.store = Store(self.home)
        self.jobs: list[Job] = []
        self.ready_models: set[str] = set()
        self.loading_error: str | None = None
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._inference: dict[tuple, Base] = {}
        self._current: Job | None = None
        self._closed = False
        self._proc = TrainingProcess(self.home, threads=_train_threads())
        if preload is not None:
            self._proc.send("preload", asdict(preload))
        self._thread = threading.Thread(target=self._dispatch, name="memcore-dispatch", daemon=True)
        self._thread.start()

    # --- called from page scripts ---------------------------------------------------------------------------

    def submit(self, specs: list[RunSpec], session: str, labels: list[str] | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex[:10], session=session, specs=list(specs), labels=labels or [s.train.method for s in specs])
        job.runs = [RunLive(label=lab, spec=s) for lab, s in zip(job.labels, job.specs)]
        with self._lock:
            self.jobs.append(job)
        return job

    def find(self, job_id: str | None) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def position(self, job: Job) -> int:
        """0 while the job runs; otherwise how many jobs are ahead of it."""
        if job.status != "queued":
            return 0
        return len([j for j in self.jobs if j.active and j.created <= job.created and j is not job])

    def stop(self, job: Job) -> None:
        with self._lock:
            job.stop_event.set()
            if job.status == "queued":
                job.status, job.finished = "stopped", time.time()
            elif job.active:
                self._proc.stop_job(job.id)

    def active_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.active]

    def is_model_ready(self, spec: ModelSpec) -> bool:
        return spec.name in self.ready_models

    def generate(self, run_id: str, prompt: str | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        """Greedy generation from a finished run's adapter, on an inference copy of its base model in this
        process (the training process keeps its own). See memcore.runner.generate_from_run."""
        from memcore.runner import generate_from_run, stored_run_spec

        spec = stored_run_spec(self.store, run_id)
        with self._gen_lock:
            key = (spec.model.name, spec.model.quant)
            if key not in self._inference:
                self._inference.clear()  # keep one inference model at a time
                self._inference[key] = load_base(spec.model, self.home)
            return generate_from_run(self.store, run_id, self._inference[key], prompt, max_new_tokens)

    # --- the dispatcher thread ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the dispatcher and the training process (tests; a server just exits)."""
        self._closed = True
        self._proc.close()

    def _dispatch(self) -> None:
        while not self._closed:
            with self._lock:
                if self._current is None:
                    nxt = next((j for j in self.jobs if j.status == "queued"), None)
                    if nxt is not None:
                        nxt.status, nxt.started = "loading", time.time()
                        self._current = nxt
                        self._proc.send("run", nxt.id, [s.to_dict() for s in nxt.specs], nxt.labels)
            msg = self._proc.receive(timeout=0.1)
            if msg is None:
                if not self._proc.alive and not self._closed:
                    self._crashed()
                continue
            self._handle(msg)

    def _crashed(self) -> None:
        """The training process died (killed, out of memory): fail its job and start a new process."""
        with self._lock:
            job, self._current = self._current, None
            if job is not None:
                job.status, job.error, job.finished = "failed", "the training process died (out of memory?)", time.time()
            self.ready_models.clear()
            self._proc = TrainingProcess(self.home, threads=_train_threads())
            self.store.mark_interrupted()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self.ready_models.add(msg[1])
            return
        if kind == "load_error":
            self.loading_error = msg[2]
            return
        job = self.find(msg[1])
        if job is None:
            return
        if kind == "started":
            _, _, i, run_id, pieces = msg
            with job.lock:
                job.runs[i].run_id, job.runs[i].pieces = run_id, pieces
                job.status = "running"
            self.ready_models.add(job.specs[i].model.name)
        elif kind == "report":
            _, _, i, r = msg
            with job.lock:
                _record(job.runs[i], r)
        elif kind == "done":
            _, _, status, error = msg
            with self._lock:
                job.status, job.error, job.finished = status, error, time.time()
                if self._current is job:
                    self._current = None


def _train_threads() -> int | None:
    """Leave one core to the page (and the browser) when training on the CPU; MEMCORE_TRAIN_THREADS overrides."""
    import os

    if os.environ.get("MEMCORE_TRAIN_THREADS"):
        return int(os.environ["MEMCORE_TRAIN_THREADS"])
    import torch

    if torch.cuda.is_available():
        return None
    return max(1, (os.cpu_count() or 2) - 1)


def _record(live: RunLive, r: dict[str, Any]) -> None:
    n = max(1, r["n_tokens"])
    row = {"step": r["step"], "loss": r["loss"], "delta_loss": r["delta_loss"], "frac_above": r["n_above"] / n,
           "frac_correct": r["n_correct"] / n, "elapsed": r["elapsed"]}
    if live.steps and live.steps[-1] == r["step"]:  # the final report re-measures the last state
        live.rows[-1], live.p_history[-1] = row, r["p"]
    else:
        live.steps.append(r["step"])
        live.rows.append(row)
        live.p_history.append(r["p"])
    live.correct = r["correct"]
    live.first_divergence = r["first_divergence"]
    if r["recalled"] and live.recalled_at is None:
        live.recalled_at = r["step"]
    if r["final"]:
        live.summary = r["summary"]
