"""A training process: runs jobs (one or more RunSpecs advanced in turn) and streams their reports back.

Interactive front ends keep their own process free for drawing: a training step is thousands of small torch
ops, each of which must win back the GIL, so training in a thread next to a busy UI thread slows it many
times over. Here the model lives in a child process (spawned, CUDA-safe) that owns the device; the parent
sends commands on one queue and reads small messages (scalars and a float16 array per step) from another.

A job of kind 'frontier' is a frontier search (memcore.search): its one spec is the template, its label the
search's settings (search_label).

Jobs come from the queue in the run store (memcore.store, table jobs); the parent claims one and sends it.
Messages from the child:
  ("ready", model_name) | ("load_error", model_name, msg)
  ("started", job_id, index, run_id, pieces, step)  step: the first reported step (> 0 for a resumed run)
  ("report", job_id, index, row, summary)         every step: a memcore.records.StepRow; summary (a RunSummary)
                                                  on the final one, else None
  ("note", job_id, run_index, text)               a run's note when it happens (a checkpoint not written)
  ("search", job_id, progress)                    a frontier search's SearchProgress.to_dict() after each probe
  ("done", job_id, status, error)                 status: done | stopped | failed
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

MAX_CACHED_BASES = 3  # e.g. the default model and a compare copy, plus one other model


class Engine:
    """The child's state: a cache of loaded base models and the run store."""

    def __init__(self, home: Path):
        from memcore.store import Store

        self.home = Path(home)
        self.store = Store(self.home)
        self.bases: OrderedDict[tuple[Any, int], Any] = OrderedDict()  # (ModelSpec, copy index) -> Base

    def base(self, spec: Any, copy_index: int = 0) -> Any:
        """The loaded base model for a ModelSpec, cached (at most MAX_CACHED_BASES, least recently used dropped).
        copy_index > 0: an independent copy of it (the model deep-copied), for a run trained alongside copy 0."""
        from memcore.loading import load_base

        key = (spec, copy_index)
        if key not in self.bases:
            if copy_index:
                first = self.base(spec, 0)
                self.bases[key] = dataclasses.replace(first, model=copy.deepcopy(first.model))
            else:
                self.bases[key] = load_base(spec, self.home)
            while len(self.bases) > MAX_CACHED_BASES:
                self.bases.popitem(last=False)
        self.bases.move_to_end(key)
        return self.bases[key]

    def run_job(self, job_id: str, kind: str, spec_dicts: list[dict], labels: list[str], run_ids: list[str | None],
                out: Any, should_stop: Any) -> str:
        """Advance every run of the job by one step in turn until all have finished. Returns the status.

        kind 'train' starts new runs of the specs; 'resume' continues the stored runs `run_ids` from their
        checkpoints."""
        from memcore.config import RunSpec
        from memcore.records import StepRow
        from memcore.runner import execute_iter, prepare, resume_iter

        if kind == "frontier":
            return self.run_search(job_id, RunSpec.from_dict(spec_dicts[0]), labels[0], out, should_stop)
        gens = []
        for i, (d, label, rid) in enumerate(zip(spec_dicts, labels, run_ids)):
            spec = RunSpec.from_dict(d)
            if kind == "resume":
                _, gen = resume_iter(self.store, rid, self.base(spec.model, copy_index=i), should_stop=should_stop)
            else:
                base, samples = prepare(spec, self.base(spec.model, copy_index=i), self.home)
                gen = execute_iter(spec, self.store, base, samples, should_stop=should_stop, label=f"app:{label}")
            gens.append((i, gen))
        pending = list(gens)
        started: set[int] = set()
        said = [0] * len(gens)  # notes sent per run (a checkpoint that could not be written, say)
        while pending:
            for item in list(pending):
                i, gen = item
                try:
                    r = next(gen)
                except StopIteration:
                    pending.remove(item)
                    continue
                if i not in started:
                    started.add(i)
                    out.put(("started", job_id, i, r.run_id, self.store.tokens(r.run_id)["pieces"], r.step))
                for note in r.notes[said[i]:]:
                    out.put(("note", job_id, i, note))
                said[i] = len(r.notes)
                out.put(("report", job_id, i, StepRow.of(r), r.summary))
        return "stopped" if should_stop() else "done"


    def run_search(self, job_id: str, template: Any, label: str, out: Any, should_stop: Any) -> str:
        """A frontier search (memcore.search) of `template` with the settings in `label` (search_label's JSON),
        sending ("search", job_id, SearchProgress.to_dict() | {"search": id}) after every probe. Returns the
        status."""
        from memcore.search import FrontierSearch

        search = search_from_label(template, label)
        fs = FrontierSearch(search, self.store, self.base(template.model), batch="auto", should_stop=should_stop)
        progress = None
        for progress in fs.run():
            out.put(("search", job_id, progress.to_dict() | {"search": search.id, "longest": fs.longest}))
        return "stopped" if progress is None or progress.stopped else "done"


SEARCH_LABEL = "frontier search "


def search_label(ranks: Any, seeds: int, method: str, resolution: float, name: str | None = None) -> str:
    """A frontier-search job's label: what the search varies, as JSON after SEARCH_LABEL."""
    return SEARCH_LABEL + json.dumps({"ranks": list(ranks), "seeds": int(seeds), "method": method,
                                      "resolution": float(resolution), "name": name})


def search_from_label(template: Any, label: str) -> Any:
    """The memcore.search.SearchSpec a frontier-search job's template and label (search_label) describe."""
    from memcore.search import SearchSpec

    d = json.loads(label[len(SEARCH_LABEL):])
    return SearchSpec(template=template, ranks=tuple(d["ranks"]), methods=(d["method"],),
                      seeds=tuple(range(d["seeds"])), resolution=d["resolution"], name=d.get("name"))


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def serve(home: str, commands: Any, out: Any, control: Any, threads: int | None = None) -> None:
    """Child process main loop: ("preload", model_spec_dict) | ("run", job_id, kind, spec_dicts, labels, run_ids) \
| ("quit",).

    If the parent dies (the app server was killed), the run in progress stops after its step, keeps its
    adapter and checkpoint, is marked interrupted (so it can be resumed), and this process exits."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from memcore.config import MemcoreError, ModelSpec

    engine = Engine(Path(home))
    stopped: set[str] = set()

    def drain_control() -> None:
        while True:
            try:
                msg = control.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "stop":
                stopped.add(msg[1])

    while True:
        try:
            cmd = commands.get(timeout=1.0)
        except queue.Empty:
            if not _parent_alive():
                return
            continue
        if cmd[0] == "quit":
            return
        if cmd[0] == "preload":
            spec = ModelSpec(**cmd[1])
            try:
                engine.base(spec)
                out.put(("ready", spec.name))
            except Exception as e:
                out.put(("load_error", spec.name,
                         str(e) if isinstance(e, MemcoreError) else f"{type(e).__name__}: {e}"))
            continue
        if cmd[0] == "run":
            _, job_id, kind, spec_dicts, labels, run_ids = cmd
            drain_control()
            orphaned = [False]

            def should_stop(job_id: str = job_id, orphaned: list[bool] = orphaned) -> bool:
                drain_control()
                orphaned[0] = orphaned[0] or not _parent_alive()
                return job_id in stopped or orphaned[0]

            try:
                status = engine.run_job(job_id, kind, spec_dicts, labels, run_ids, out, should_stop)
                out.put(("done", job_id, status, None))
            except MemcoreError as e:
                out.put(("done", job_id, "failed", str(e)))
            except Exception as e:
                traceback.print_exc()
                out.put(("done", job_id, "failed", f"{type(e).__name__}: {e}"))
            if orphaned[0]:
                engine.store.interrupt_job(job_id, "the app server stopped while it trained")
                return


def trainer_lock(home: Path, device: str | None = None) -> Any:
    """The lock that one app process per memcore home and device holds while it trains (a file lock under
    home/locks, released by the operating system when its holder dies). Acquire with timeout=0 to try."""
    from filelock import FileLock

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(home) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"trainer-{device.replace(':', '-')}.lock"))


class TrainingProcess:
    """Parent-side handle on the child: start it, send commands, read messages, notice if it died."""

    def __init__(self, home: Path, threads: int | None = None):
        """threads: CPU threads for training (None: torch's default, every core). A front end that itself wants
        whole cores should pass fewer: two processes each spinning on every core make OpenMP's barriers crawl."""
        ctx = mp.get_context("spawn")
        self.commands, self.out, self.control = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=serve, args=(str(home), self.commands, self.out, self.control, threads),
                                   name="memcore-train", daemon=True)
        self.process.start()

    def send(self, *cmd: Any) -> None:
        """Queue a command for the child: ('preload', spec) | ('run', ...) | ('quit',)."""
        self.commands.put(cmd)

    def stop_job(self, job_id: str) -> None:
        """Ask the child to stop `job_id` after its current step."""
        self.control.put(("stop", job_id))

    def receive(self, timeout: float = 0.2) -> tuple | None:
        """The next message from the child, or None after `timeout` seconds."""
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def alive(self) -> bool:
        """Whether the child process is running."""
        return self.process.is_alive()

    def close(self, wait: float = 5.0) -> None:
        """Ask the child to quit; kill it after `wait` seconds (a child still starting up, importing torch, reads
        no command until it is done)."""
        if self.alive:
            self.send("quit")
            self.process.join(timeout=wait)
            if self.alive:
                self.process.kill()
