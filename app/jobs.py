"""One background worker per process that trains queued jobs one at a time, shared by every session.

The Streamlit script thread never trains: it submits a Job and polls its live view (``JobView``), which the
worker thread fills from memcore's streaming runner. A compare job advances two runs (sft and memft-ot on
the same text and seed) in alternation, each on its own copy of the base model, so both move live.
Base models are loaded once per process and kept (the most recent few).
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memcore.config import MemcoreError, ModelSpec, RunSpec
from memcore.models import Base, load_base
from memcore.runner import execute_iter, prepare
from memcore.store import Store

MAX_CACHED_BASES = 3  # default model: the training copy, a compare copy and an inference copy


@dataclass
class RunLive:
    """What the page shows of one run while it trains."""

    label: str
    spec: RunSpec
    run_id: str | None = None
    pieces: list[str] = field(default_factory=list)
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
    """A FIFO of jobs and the thread that runs them, one at a time."""

    def __init__(self, home: Path, preload: ModelSpec | None = None):
        self.home = Path(home)
        self.store = Store(self.home)
        self.jobs: list[Job] = []
        self._bases: OrderedDict[tuple, Base] = OrderedDict()
        self._cv = threading.Condition()
        self._gen_lock = threading.Lock()
        self.loading_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="memcore-worker", daemon=True)
        self._preload = preload
        self._thread.start()

    # --- called from page scripts ---------------------------------------------------------------------------

    def submit(self, specs: list[RunSpec], session: str, labels: list[str] | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex[:10], session=session, specs=list(specs),
                  labels=labels or [s.train.method for s in specs])
        job.runs = [RunLive(label=lab, spec=s) for lab, s in zip(job.labels, job.specs)]
        with self._cv:
            self.jobs.append(job)
            self._cv.notify_all()
        return job

    def find(self, job_id: str | None) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def position(self, job: Job) -> int:
        """0 while the job runs; otherwise how many jobs are ahead of it in the queue."""
        if job.status != "queued":
            return 0
        ahead = [j for j in self.jobs if j.active and j.created <= job.created and j is not job]
        return len(ahead)

    def stop(self, job: Job) -> None:
        job.stop_event.set()
        with self._cv:
            if job.status == "queued":
                job.status, job.finished = "stopped", time.time()

    def active_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.active]

    def is_model_ready(self, spec: ModelSpec) -> bool:
        return self._key(spec) + (0,) in self._bases

    def generate(self, run_id: str, prompt: str | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        """Greedy generation from a finished run's adapter, on a separate inference copy of its base model
        (training jobs keep theirs). prompt None: the run's own prompt, compared with its target."""
        import torch
        from peft import PeftModel

        from memcore.data import Sample
        from memcore.models import detach_adapter
        from memcore.train import compare, greedy_generate

        run = self.store.run(run_id)
        adapter = self.store.adapter_dir(run_id)
        if not (adapter / "adapter_config.json").is_file():
            raise MemcoreError(f"run {run_id} has no saved adapter (status {run['status']})")
        spec = RunSpec.from_dict(run["spec"])
        with self._gen_lock:
            base = self.base(spec.model, copy_index=-1)
            tok = base.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
            try:
                if prompt is None:
                    toks = self.store.tokens(run_id)
                    samples = [Sample(p, t) for p, t in zip(toks["prompt_ids"], toks["target_ids"])]
                    gen = greedy_generate(model, samples, pad, max_new_tokens)
                    return {"generated": gen, "targets": toks["target_ids"], "divergence": compare(gen, samples),
                            "text": [tok.decode(g) for g in gen]}
                ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(prompt, add_special_tokens=False)
                with torch.no_grad():
                    gen = greedy_generate(model, [Sample(ids, [0])], pad, max_new_tokens or 100)
                return {"generated": gen, "text": [tok.decode(gen[0])]}
            finally:
                base.model = detach_adapter(model)

    # --- the worker thread ----------------------------------------------------------------------------------

    @staticmethod
    def _key(spec: ModelSpec) -> tuple:
        return (spec.name, spec.quant, spec.device, spec.dtype, spec.trust_remote_code)

    def base(self, spec: ModelSpec, copy_index: int = 0) -> Base:
        """The base model for `spec` (loaded once per process); copy_index > 0 gives an independent copy."""
        key = self._key(spec) + (copy_index,)
        if key not in self._bases:
            if copy_index:  # another copy: for the second run of a compare job (1) or for inference (-1)
                first = self.base(spec, 0)
                self._bases[key] = Base(copy.deepcopy(first.model), first.tokenizer, first.source, first.device, first.dtype, first.spec)
            else:
                self._bases[key] = load_base(spec, self.home)
            while len(self._bases) > MAX_CACHED_BASES:
                self._bases.popitem(last=False)
        self._bases.move_to_end(key)
        return self._bases[key]

    def _loop(self) -> None:
        if self._preload is not None:
            try:
                self.base(self._preload)
            except Exception as e:  # shown on the page; jobs will retry and report it
                self.loading_error = str(e)
        while True:
            with self._cv:
                while not any(j.status == "queued" for j in self.jobs):
                    self._cv.wait()
                job = next(j for j in self.jobs if j.status == "queued")
                job.status, job.started = "loading", time.time()
            try:
                self._run(job)
            except Exception as e:
                job.error = str(e) if isinstance(e, MemcoreError) else f"{type(e).__name__}: {e}"
                job.status = "failed"
                if not isinstance(e, MemcoreError):
                    traceback.print_exc()
            finally:
                job.finished = time.time()

    def _run(self, job: Job) -> None:
        gens = []
        for i, (spec, live) in enumerate(zip(job.specs, job.runs)):
            base, samples = prepare(spec, self.base(spec.model, copy_index=i), self.home)
            live.pieces = [base.tokenizer.decode([t]) for s in samples for t in s.target_ids]
            gens.append(execute_iter(spec, self.store, base, samples, should_stop=job.stop_event.is_set, label=f"app:{live.label}"))
        job.status = "running"
        pending = list(range(len(gens)))
        while pending:  # advance every unfinished run by one step, in turn
            for i in list(pending):
                try:
                    r = next(gens[i])
                except StopIteration:
                    pending.remove(i)
                    continue
                with job.lock:
                    self._record(job.runs[i], r)
        job.status = "stopped" if job.stop_event.is_set() else "done"

    @staticmethod
    def _record(live: RunLive, r: Any) -> None:
        n = max(1, r.n_tokens)
        row = {"step": r.step, "loss": r.loss, "delta_loss": r.delta_loss, "frac_above": r.n_above / n,
               "frac_correct": r.n_correct / n, "elapsed": r.elapsed}
        live.run_id = r.run_id
        if live.steps and live.steps[-1] == r.step:  # the final report re-measures the last state
            live.rows[-1], live.p_history[-1] = row, r.p
        else:
            live.steps.append(r.step)
            live.rows.append(row)
            live.p_history.append(r.p)
        live.correct = r.correct
        live.first_divergence = r.first_divergence
        if r.recalled and live.recalled_at is None:
            live.recalled_at = r.step
        if r.final:
            live.summary = r.summary
