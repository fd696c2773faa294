"""Join a training stream to the run store: one function runs one RunSpec end to end.

``prepare`` loads the base model and tokenizes the data (every input error surfaces here, before any row
is written); ``execute`` attaches the adapter, streams ``train_iter`` into the store (flushing at most
about once a second), saves the adapter in standard PEFT format, and returns the summary.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from memcore.chain import Retention, chain_of, passage_parts
from memcore.config import MemcoreError, RunSpec, WriteFailed, is_write_error
from memcore.data import Batch, Sample, make_batch
from memcore.loading import Base, load_base
from memcore.measure import StepReport, base_losses
from memcore.metrics import StubbornCounter, bits_per_param
from memcore.pieces import Piece, token_pieces
from memcore.placement import p_eff
from memcore.records import RunSummary, StepRow
from memcore.specs import preflight
from memcore.store import Store
from memcore.targets import target_module_regex
from memcore.train import Checkpoint, train_iter

FLUSH_SECONDS = 1.0


def prepare(spec: RunSpec, base: Base | None = None, home: Path | None = None) -> tuple[Base, list[Sample]]:
    """Load (or reuse) the base model and tokenize the data, validating both (memcore.specs.preflight: token
    counts against the data's limit and the model's context, adapter layers against the model's blocks)."""
    if base is None or base.spec != spec.model:
        base = load_base(spec.model, home)
    vocab = base.model.get_input_embeddings().weight.shape[0]
    samples = preflight(spec, base.tokenizer, base.model.config, vocab_size=min(vocab, len(base.tokenizer))).samples
    target_module_regex(base.model, spec.adapter)  # refuses impossible layers/targets before any row is written
    return base, samples


@dataclass
class Earlier:
    """What a run trained after another (TrainSpec.after) measures beside its own targets: the chain of runs before
    it, oldest first (A, B for a run trained after B, itself trained after A), their target samples in that order,
    each run's target token count, and the folder of the adapter it starts from (its parent's, the last run)."""

    run_ids: list[str]
    samples: list[Sample]
    lengths: list[int]  # target tokens of each earlier run, in run_ids' order
    adapter_dir: Path
    note: str | None = None  # said with the run's first report (the earlier run had not finished)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)


# the model and placement a run trained after another keeps (option name, its value in a RunSpec)
CHAIN_SETTINGS = (("model", lambda s: s.model.name), ("adapter", lambda s: s.adapter.kind),
                  ("rank", lambda s: s.adapter.rank), ("layers", lambda s: s.adapter.layers),
                  ("targets", lambda s: s.adapter.targets), ("alpha", lambda s: s.adapter.alpha))


def earlier_of(store: Store, spec: RunSpec) -> Earlier | None:
    """The chain of runs `spec` is trained after (spec.train.after), or None. Raises MemcoreError, naming the run and
    the reason, when the run is unknown, still training, has no saved adapter, was trained on another model or
    placement (model, adapter kind, rank, layers, targets or alpha differ: each named with both values), or when
    the chain runs in a circle."""
    parent = spec.train.after
    if parent is None:
        return None
    run = store.run(parent)
    if run["status"] in ("queued", "running"):
        raise MemcoreError(f"run {parent} is still {run['status']}: train after it once it has finished or stopped")
    pspec = stored_run_spec(store, parent)
    diff = [f"{name} {get(spec)!s} (run {parent}: {get(pspec)!s})" for name, get in CHAIN_SETTINGS
            if get(spec) != get(pspec)]
    if diff:
        raise MemcoreError(f"--after {parent} continues that run's adapter, so the model and placement must be its "
                           "own; this run differs in " + ", ".join(diff))
    chain = [*chain_of(store, parent), parent]
    samples, lengths = [], []
    for rid in chain:
        own = stored_samples(store, rid)
        samples += own
        lengths.append(sum(len(x.target_ids) for x in own))
    note = None
    if run["status"] != "completed":
        note = (f"run {parent} did not finish (status {run['status']}): this run starts from the adapter it last "
                "saved")
    return Earlier(chain, samples, lengths, store.adapter_dir(parent), note)


def prompt_clash(samples: list[Sample], earlier: Earlier | None) -> str | None:
    """A note when a chained run conditions one of its targets on the same prompt tokens as an earlier target: from
    one prompt greedy decoding recites one text, so both cannot stay recalled verbatim. None when all differ."""
    if earlier is None:
        return None
    mine = {tuple(s.prompt_ids) for s in samples}
    same = [i for i, s in enumerate(earlier.samples) if tuple(s.prompt_ids) in mine]
    if not same:
        return None
    return ("this run's prompt is the same as an earlier run's: from one prompt greedy decoding recites one text, so "
            "the earlier one cannot stay recalled verbatim whatever the rank (give this run a --prompt of its own "
            "to keep both)")


class _Record:
    """One run's record in the store while it trains, whoever drives it (a run alone, or a batch of runs): its
    row and status, tokens, steps (flushed at most about once a second; a decimated history keeps per-token
    snapshots at a few hundred steps), checkpoints, adapter, summary, and the one line a failed write ends in.

    `write(state, folder)` writes an adapter state (memcore.stack.AdapterStack.state) as files into a folder."""

    def __init__(self, spec: RunSpec, store: Store, base: Base, samples: list[Sample],
                 write: Callable[[dict[str, Any], Path], None], *, run_id: str | None = None,
                 sweep: str | None = None, label: str | None = None, resume: bool = False) -> None:
        self.spec, self.store, self.base, self.samples, self.write = spec, store, base, samples, write
        self.run_id = run_id or store.create_run(spec.to_dict(), sweep=sweep, label=label)
        self.resume = resume
        self.kept = _Kept()
        self.adapter_dir = store.adapter_dir(self.run_id)
        self.pending: list[StepRow] = []
        self.warnings: list[str] = []  # failed checkpoints, said with the next report
        self.failing: int | None = None  # the step of the first checkpoint of a streak that could not be written
        self.last_flush = time.monotonic()
        self.keep = None if spec.train.history == "full" else snapshot_steps(spec.train.max_steps)
        self.earlier: Earlier | None = None  # set by the caller for a run trained after another
        self.first_loss: float | None = None  # the loss at its first recorded step (a chain starts off the base)
        self.retention = Retention()

    def open(self) -> Checkpoint | None:
        """Mark the run running; returns the checkpoint a resumed run goes on from (its later steps dropped), else
        None."""
        ckpt = load_checkpoint(self.store, self.run_id) if self.resume else None
        self.kept.checkpoint = ckpt.step if ckpt else None
        if self.resume:
            self.store.truncate_steps(self.run_id, ckpt.step if ckpt else 0)
        self.store.set_status(self.run_id, "running")
        self.ckpt_step = ckpt.step if ckpt else None
        return ckpt

    def begin(self, batch: Batch, base_loss: Any, n_params: int) -> None:
        """Store the run's tokens and base loss ([B, K] nats), before its first step is recorded."""
        self.n_params = n_params
        n_own = sum(len(s.target_ids) for s in self.samples)  # the earlier runs' targets follow its own
        self.base_flat = base_loss[batch.target_mask][:n_own]
        targets = [s.target_ids for s in self.samples]
        self.pieces = token_pieces(self.base.tokenizer, [t for ts in targets for t in ts])
        self.store.save_tokens(self.run_id, [s.prompt_ids for s in self.samples], targets, self.pieces,
                               self.base_flat.float().cpu().numpy())
        self.stubborn = StubbornCounter(len(self.pieces), self.spec.train.tau)
        before = self.store.replay(self.run_id) if self.ckpt_step is not None else None  # steps before it
        for p in before.p if before is not None else []:
            self.stubborn.update(p)
        self.snapshots = len(before.steps) if before is not None else 0
        if self.ckpt_step is not None and self.earlier is not None:
            for row in self.store.earlier_steps(self.run_id):
                self.retention.see(row)
            kept = self.store.steps(self.run_id)
            self.first_loss = kept[0].loss if kept else None

    def checkpoint(self, state: Checkpoint) -> None:
        """A checkpoint: the steps so far, the adapter, the loop's state. One that cannot be written is a
        warning, not the end of the run: training goes on and the next checkpoint tries again."""
        self.store.write_steps(self.run_id, self.pending)  # a store that cannot be written ends the run (WriteFailed)
        self.pending = []
        try:
            save_adapter(self.write, state.adapter, self.adapter_dir, self.samples, self.spec)
            save_checkpoint(self.store, self.run_id, state)
            self.kept.checkpoint = state.step
            if self.failing is not None:  # a streak of failures ended: said once, with the first failure's step
                self.warnings.append(f"step {state.step}: the checkpoint was written again (the ones since step "
                                     f"{self.failing} could not be)")
                self.failing = None
        except WriteFailed as e:
            if self.failing is None:  # the first of a streak; the next ones would say the same
                self.warnings.append(f"step {state.step}: {e}; training goes on and tries again at each checkpoint")
                self.failing = state.step

    def step(self, r: StepReport) -> None:
        """Record one report (the final one included)."""
        r.run_id = self.run_id
        if self.warnings:  # the loop's notes: they reach the live view, the summary and the CLI
            r.notes.extend(self.warnings)
            self.warnings.clear()
        self.stubborn.update(r.p)
        self.retention.see(r)
        if self.first_loss is None:
            self.first_loss = r.loss
        row = StepRow.of(r)
        if self.keep is not None and not r.final and r.step not in self.keep:
            row.p = row.correct = None  # scalars only: a decimated history keeps no per-token snapshot here
        else:
            self.snapshots += 1
        self.pending.append(row)
        if r.final or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.store.write_steps(self.run_id, self.pending)
            self.pending, self.last_flush = [], time.monotonic()

    def close(self, final: StepReport, adapter: dict[str, Any]) -> RunSummary:
        """Save the final adapter, write the summary and the status; returns the summary (also on final.summary)."""
        spec, store, run_id, base = self.spec, self.store, self.run_id, self.base
        save_adapter(self.write, adapter, self.adapter_dir, self.samples, spec)
        self.kept.adapter = True
        summary = _summary(run_id, spec, final, self.n_params, self.samples, self.adapter_dir, self.stubborn,
                           self.base_flat, self.pieces)
        summary.history, summary.snapshots = spec.train.history, self.snapshots
        if self.earlier is not None:
            _fill_retention(summary, final, self.earlier, spec, self.retention)
        vocab = getattr(base.model.config, "vocab_size", None)
        summary.source_bits_per_token = source_bits(spec, base.tokenizer, vocab)
        summary.device, summary.dtype = base.device.type, str(base.dtype).removeprefix("torch.")
        if self.earlier is None and summary.delta_loss < 0:  # the loss rose: said where the result is read
            summary.notes.append(f"the loss rose in training (ΔL {summary.delta_loss:.3f} nats/token, from "
                                 f"{summary.base_loss:.3f} to {summary.loss:.3f}): the learning rate "
                                 f"({spec.train.lr:g}) is probably too high for this adapter; try a lower one")
        elif self.earlier is not None and self.first_loss is not None and summary.loss > self.first_loss:
            # a chain starts from the earlier adapter, not the base: its own start is what the loss rose from
            summary.notes.append(f"the loss rose in training (from {self.first_loss:.3f} nats/token at its first "
                                 f"step to {summary.loss:.3f}): the learning rate ({spec.train.lr:g}) is probably "
                                 "too high for this adapter; try a lower one")
        status = "stopped" if final.stop_reason == "stopped" else "completed"
        summary.status = status
        store.set_status(run_id, status, summary=summary)
        if final.stop_reason in FINISHED:  # finished and recorded: nothing to resume
            checkpoint_path(store, run_id).unlink(missing_ok=True)
        try:  # a copy beside the adapter; the store holds the summary
            (self.adapter_dir.parent / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        except OSError as e:
            summary.notes.append(f"{WriteFailed.of('summary.json', self.adapter_dir.parent, e)}; the store has the "
                                 "summary")
        final.summary = summary
        return summary

    def fail(self, e: BaseException) -> BaseException:
        """Record how the run ended early (interrupted, failed or stopped) and return what to raise: a failed write
        as one line saying what could not be written, where, and what is kept."""
        store, run_id = self.store, self.run_id
        if isinstance(e, GeneratorExit):  # the consumer walked away mid-run
            with suppress(MemcoreError, OSError):
                store.set_status(run_id, "interrupted", error="abandoned by its consumer")
            return e
        if isinstance(e, WriteFailed):
            failed = WriteFailed(e.what, e.where, e.reason)
            failed.args = (f"{e}; {self.kept.say(run_id)}",)
            with suppress(MemcoreError, OSError):  # the store may be what is full: the run then shows as interrupted
                store.set_status(run_id, "failed", error=str(failed))
            return failed
        msg = str(e) if isinstance(e, MemcoreError) else f"{type(e).__name__}: {e}"
        with suppress(MemcoreError, OSError):
            store.set_status(run_id, "failed" if not isinstance(e, KeyboardInterrupt) else "stopped", error=msg)
        if not isinstance(e, (MemcoreError, KeyboardInterrupt)):
            with suppress(OSError):
                (store.runs_dir / run_id / "error.txt").write_text(traceback.format_exc())
        return e


def _writer(base: Base, stack: Any, adapter: Any) -> Callable[[dict[str, Any], Path], None]:
    """How a run's adapter state becomes files: its stack's writer, naming the base as the model records it."""
    name = getattr(base.model.config, "_name_or_path", None)
    return lambda state, folder: stack.write(state, folder, adapter, name)


def execute_iter(spec: RunSpec, store: Store, base: Base, samples: list[Sample], *, run_id: str | None = None,
                 should_stop: Callable[[], bool] | None = None, sweep: str | None = None, label: str | None = None,
                 resume: bool = False) -> Generator[StepReport, None, RunSummary]:
    """Train one run and record it, yielding each StepReport as it is stored; returns the summary.

    Every `spec.train.checkpoint_every` seconds (and when a run stops early) the steps so far are flushed and
    the adapter (PEFT folder) and a checkpoint of the loop's state are saved in the run's folder. With
    resume=True, `run_id` names a stored run that continues from its checkpoint (or from the start if it
    had none): its steps from the checkpoint on are dropped and the history goes on from there.
    Consumers that interleave several runs (the app's compare mode) advance several of these in turn."""
    tok = base.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    earlier = earlier_of(store, spec)  # a run trained after another: its targets measured too (refusals here)
    batch = make_batch(samples + (earlier.samples if earlier else []), pad_id).to(base.device)
    adapter = ExitStack()  # holds the adapter on the shared base until the run's outcome is recorded
    record = None
    try:
        model = adapter.enter_context(base.adapted(spec.adapter, seed=spec.train.seed))
        record = _Record(spec, store, base, samples, _writer(base, model.stack, spec.adapter), run_id=run_id,
                         sweep=sweep, label=label, resume=resume)
        record.earlier = earlier
        record.warnings += [n for n in (prompt_clash(samples, earlier), earlier and earlier.note) if n]
        init = model.stack.read(earlier.adapter_dir) if earlier else None
        base_loss = base_losses(model, batch)
        ckpt = record.open()
        record.begin(batch, base_loss, p_eff(model))
        final: StepReport | None = None
        for r in train_iter(model, batch, spec.train, pad_id=pad_id, base_loss=base_loss, should_stop=should_stop,
                            resume=ckpt, checkpoint=record.checkpoint, own_samples=len(samples), init_adapter=init):
            record.step(r)
            if r.final:
                final = r
            else:
                yield r
        assert final is not None
        if record.warnings:  # a checkpoint failed in the last step (a stopped run's own)
            final.notes.extend(record.warnings)
        summary = record.close(final, model.stack.state(0))
        yield final
        return summary
    except BaseException as e:
        if record is None:
            raise
        raised = record.fail(e)
        if raised is e:
            raise
        raise raised from None
    finally:
        adapter.close()


@dataclass
class BatchedRun:
    """One run for execute_many: its spec and samples, and its store bookkeeping (a new run, or `run_id` resumed
    from its checkpoint); `tag` names it in what execute_many yields."""

    spec: RunSpec
    samples: list[Sample]
    tag: Any = None
    run_id: str | None = None
    resume: bool = False
    sweep: str | None = None
    label: str | None = None


def execute_many(runs: Iterable[BatchedRun], store: Store, base: Base, *, slots: int, max_rank: int,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[Any, StepReport]]:
    """Train several runs together (memcore.train.train_many: one forward and one backward of the shared base per
    step, `slots` runs at a time, the next run taking a finished one's slot) and record each as execute_iter does,
    yielding (tag, StepReport) per run and step; a run's final report carries its summary. Every run shares the
    first run's model and adapter kind and placement (targets, layers); ranks up to `max_rank`. `runs` is read
    lazily, after the reports so far were consumed, and may give None for "nothing ready yet" (train_many).

    A failed write ends the batch with the one line execute_iter gives; the runs still training are marked
    interrupted (each resumes from its own checkpoint)."""
    from memcore.stack import AdapterStack

    runs = iter(runs)
    first = next(runs, None)
    if first is None:
        return
    tok = base.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stack = AdapterStack(base.model, first.spec.adapter, slots=slots, max_rank=max_rank)
    records: dict[int, tuple[BatchedRun, _Record]] = {}

    def inputs() -> Iterator[Any]:
        from memcore.train import RunInput

        for i, run in enumerate(itertools.chain([first], runs)):
            if run is None:  # nothing ready yet (a search waiting on its probes)
                yield None
                continue
            if should_stop is not None and should_stop():
                return
            earlier = earlier_of(store, run.spec)
            batch = make_batch(run.samples + (earlier.samples if earlier else []), pad_id).to(base.device)
            record = _Record(run.spec, store, base, run.samples, _writer(base, stack, run.spec.adapter),
                             run_id=run.run_id, sweep=run.sweep, label=run.label, resume=run.resume)
            record.earlier = earlier
            record.warnings += [n for n in (prompt_clash(run.samples, earlier), earlier and earlier.note) if n]
            records[i] = (run, record)
            ckpt = record.open()
            n_params = stack.p_eff_of(run.spec.adapter.rank)
            yield RunInput(batch=batch, spec=run.spec.train, adapter=run.spec.adapter, resume=ckpt,
                           checkpoint=record.checkpoint, should_stop=should_stop, tag=i, own_samples=len(run.samples),
                           init_adapter=stack.read(earlier.adapter_dir) if earlier else None,
                           started=lambda loss, record=record, batch=batch, n=n_params: record.begin(batch, loss, n))

    from memcore.train import train_many

    try:
        for i, r in train_many(base.model, stack, inputs(), pad_id=pad_id, slots=slots):
            run, record = records[i]
            record.step(r)
            if r.final:
                if record.warnings:
                    r.notes.extend(record.warnings)
                record.close(r, r.adapter)
                del records[i]
            yield run.tag, r
    except BaseException as e:
        for _, record in list(records.values()):  # each run still training: failed, stopped or interrupted
            record.fail(e)
        if not isinstance(e, WriteFailed):
            raise
        n = len(records)
        raise WriteFailed(e.what, e.where, f"{e.reason}; the {n} run{'s' if n != 1 else ''} training keep "
                          "their last checkpoints: free some space and run the same command again to resume them"
                          ) from None
    finally:
        stack.detach()


HISTORY_SNAPSHOTS = 300
FINISHED = ("recalled", "max_steps", "all_above_tau", "plateau")  # stop reasons of a run that has nothing left to do
# ... of a run that stopped because training had converged (recall alone is not)
CONVERGED = ("all_above_tau", "plateau")


def snapshot_steps(max_steps: int, n: int | None = None) -> frozenset[int]:
    """The steps a decimated history keeps per-token snapshots of (the final step is always added): every
    step if the budget has at most `n`, else log-spaced steps (dense early, where most tokens cross tau) and
    evenly spaced ones in equal numbers, step 0 and `max_steps` among them, as many as fit in n (default
    HISTORY_SNAPSHOTS; the two series overlap early, so each gets more than n/2 points)."""
    n = HISTORY_SNAPSHOTS if n is None else n
    if max_steps + 1 <= n:
        return frozenset(range(max_steps + 1))

    def both(m: int) -> frozenset[int]:
        geo = np.round(np.geomspace(1, max_steps + 1, m)).astype(int) - 1
        lin = np.round(np.linspace(0, max_steps, m)).astype(int)
        return frozenset(int(v) for v in np.concatenate([geo, lin]))

    lo, hi = n // 2, n  # both(n // 2) has at most n steps, both(n) at least n: the largest m that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(both(mid)) <= n else (lo, mid)
    return both(lo)


# --- checkpoints ------------------------------------------------------------------------------------------------


def checkpoint_path(store: Store, run_id: str) -> Path:
    """Where a run's resumable checkpoint lives (runs/<id>/checkpoint.pt)."""
    return store.runs_dir / run_id / "checkpoint.pt"


def save_checkpoint(store: Store, run_id: str, state: Checkpoint) -> None:
    """Write the state atomically (a temporary file renamed over the old one): a kill mid-write, or a full disk,
    leaves the previous checkpoint intact. Raises WriteFailed naming the file when it cannot be written."""
    import torch

    path = checkpoint_path(store, run_id)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({f.name: getattr(state, f.name) for f in fields(state)}, tmp)
        os.replace(tmp, path)
    except Exception as e:  # torch.save reports a full disk as a RuntimeError from its writer
        if not is_write_error(e):
            raise
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteFailed.of("the checkpoint", path, e) from None


def load_checkpoint(store: Store, run_id: str) -> Checkpoint | None:
    """The run's last checkpoint, or None if it never saved one. A damaged file is a MemcoreError."""
    import torch

    path = checkpoint_path(store, run_id)
    if not path.is_file():
        return None
    try:
        return Checkpoint(**torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise MemcoreError(f"the checkpoint of run {run_id} ({path}) cannot be read: {type(e).__name__}: {e}") from None


def resumable_step(store: Store, run_id: str) -> int | None:
    """The step a resume would continue from (None: no checkpoint, a resume starts over)."""
    ckpt = load_checkpoint(store, run_id)
    return None if ckpt is None else ckpt.step


RESUMABLE = ("interrupted", "stopped", "failed")


def check_resumable(store: Store, run_id: str) -> dict[str, Any]:
    """The stored run, if it can be resumed (interrupted, stopped or failed); else a MemcoreError saying why not."""
    run = store.run(run_id)
    if run["status"] not in RESUMABLE:
        raise MemcoreError(f"run {run_id} is {run['status']}; only {', '.join(RESUMABLE[:-1])} or {RESUMABLE[-1]} "
                           "runs can be resumed")
    return run


def stored_samples(store: Store, run_id: str) -> list[Sample]:
    """The exact prompt and target token ids a stored run trained on (whatever the tokenizer says today).
    Raises MemcoreError when the run has no tokens stored (it failed before measuring them)."""
    toks = store.tokens(run_id)
    return [Sample(p, t) for p, t in zip(toks["prompt_ids"], toks["target_ids"])]


def resume_iter(store: Store, run_id: str, base: Base | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Base, Generator[StepReport, None, RunSummary]]:
    """Continue a stored run that did not finish (interrupted, stopped or failed) from its last checkpoint, on
    the exact target tokens it was training on. Returns the base model used and the execute_iter stream.

    Raises MemcoreError if the run finished or is still live."""
    run = check_resumable(store, run_id)
    spec = RunSpec.from_dict(run["spec"])
    base, samples = prepare(spec, base, store.home)
    try:  # the tokens it was trained on, even if the tokenizer has changed since
        samples = stored_samples(store, run_id)
    except MemcoreError:
        pass  # it failed before its tokens were stored: start it from its spec
    return base, execute_iter(spec, store, base, samples, run_id=run_id, should_stop=should_stop, resume=True)


def execute(spec: RunSpec, store: Store, base: Base, samples: list[Sample], *,
            on_report: Callable[[StepReport], None] | None = None, **kwargs: Any) -> RunSummary:
    """execute_iter to the end, calling on_report for every step (the final one included)."""
    return drain(execute_iter(spec, store, base, samples, **kwargs), on_report)


def drain(gen: Generator[StepReport, None, RunSummary],
          on_report: Callable[[StepReport], None] | None = None) -> RunSummary:
    """Consume an execute_iter stream, calling on_report for every report; return the run's summary."""
    while True:
        try:
            r = next(gen)
        except StopIteration as done:
            return done.value
        if on_report is not None:
            on_report(r)


def save_adapter(write: Callable[[dict[str, Any], Path], None], state: dict[str, Any], path: Path,
                 samples: list[Sample], spec: RunSpec) -> None:
    """The adapter `state` (memcore.stack.AdapterStack.state) as files in `path` (`write` writes them: a stock PEFT
    folder, adapter_config.json + adapter_model.safetensors, or for the bypass memcore's bypass_config.json +
    bypass_model.safetensors), and memcore.json saying which prompt and target the adapter memorized. (The
    tokenizer is the base model's: `memcore export` adds it to the folder it writes.)

    Written into a temporary folder first, then each file renamed into place: a run killed while saving, or a
    disk that fills up, keeps the previous save's files whole (a rename is atomic), never a half-written weights
    file. Raises WriteFailed naming the folder when it cannot be written."""
    import shutil
    import tempfile

    tmp = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=path.parent))
        write(state, tmp)
        (tmp / "memcore.json").write_text(json.dumps({
            "prompt_ids": [s.prompt_ids for s in samples], "target_ids": [s.target_ids for s in samples],
            "spec": spec.to_dict()}))
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                dest = path / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    except Exception as e:
        if not is_write_error(e):
            raise
        raise WriteFailed.of("the adapter", path, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fill_retention(summary: RunSummary, final: StepReport, earlier: Earlier, spec: RunSpec,
                    seen: Retention) -> None:
    """Set a chained run's summary fields from its final report and what `seen` followed over its steps."""
    m = int(final.earlier_p.shape[0]) if final.earlier_p is not None else 0
    summary.after, summary.chain, summary.keep = spec.train.after, list(earlier.run_ids), bool(spec.train.keep)
    summary.earlier_tokens = m
    summary.earlier_above = final.earlier_above
    summary.earlier_correct = int(final.earlier_correct.sum()) if final.earlier_correct is not None else None
    summary.earlier_recalled = final.earlier_recalled
    summary.earlier_prefix = final.earlier_prefix
    summary.earlier_lost_at, summary.earlier_regained_at = seen.lost_at, seen.regained_at
    summary.rehearsal_share = seen.rehearsal_share
    summary.earlier_parts = passage_parts(final.earlier_p, final.earlier_correct, earlier.run_ids, earlier.lengths,
                                          spec.train.tau)


class _Kept:
    """What a run has on disk if it ends here: the step of its last good checkpoint, and whether its final
    adapter was saved; `say` puts it in words for the one line a failed write ends with."""

    def __init__(self) -> None:
        self.checkpoint: int | None = None
        self.adapter = False

    def say(self, run_id: str) -> str:
        if self.adapter:
            return "the trained adapter was saved before it; its steps are in the store"
        if self.checkpoint is not None:
            return (f"kept: the checkpoint at step {self.checkpoint} and the steps recorded before it; free some space "
                    f"and `memcore resume {run_id}` (or Resume on the app's Runs page) continues from there")
        return (f"no checkpoint was saved yet, so the training is lost; free some space and `memcore resume {run_id}` "
                "(or Resume on the app's Runs page) trains it again from step 0")


def _flat_or_nested(lists: list[list[int]]) -> list[int] | list[list[int]]:
    return lists[0] if len(lists) == 1 else lists


def _summary(run_id: str, spec: RunSpec, final: StepReport, n_params: int, samples: list[Sample], adapter_dir: Path,
             counter: StubbornCounter, base_loss: Any, pieces: list[Piece]) -> RunSummary:
    stubborn = counter.top()
    for s in stubborn:
        s["token"] = pieces[s["index"]].label
    generated = final.generated or []
    train_seconds = final.elapsed - final.generate_seconds
    verified = final.generate_recalled is not None
    return RunSummary(
        run_id=run_id,
        steps=final.step,
        stop_reason=final.stop_reason,
        recalled=bool(final.generate_recalled if verified else final.recalled),
        verified_by_generate=verified,
        teacher_forced_recalled=bool(final.recalled),
        first_divergence=final.generate_divergence if verified else final.first_divergence,
        teacher_forced_first_divergence=final.first_divergence,
        n_tokens=final.n_tokens,
        n_above=final.n_above,
        n_correct=final.n_correct,
        converged=final.stop_reason in CONVERGED,
        exact_recall=bool(final.recalled),
        token_accuracy=final.n_correct / final.n_tokens if final.n_tokens else 0.0,
        verbatim_prefix=final.n_tokens if final.first_divergence is None else final.first_divergence,
        adapter=spec.adapter.kind,
        base_loss=float(base_loss.mean()),
        loss=final.loss,
        delta_loss=final.delta_loss,
        p_eff=n_params,
        bits_stored=final.bits_stored,
        bits_per_param=bits_per_param(final.bits_stored, n_params),
        seconds_per_step=train_seconds / final.step if final.step else None,
        train_seconds=train_seconds,
        model=spec.model.name,
        quant=spec.model.quant,
        method=spec.train.method,
        tau=spec.train.tau,
        rank=spec.adapter.rank,
        adapter_dir=str(adapter_dir),
        prompt_ids=_flat_or_nested([s.prompt_ids for s in samples]),
        target_ids=_flat_or_nested([s.target_ids for s in samples]),
        generated_ids=_flat_or_nested(generated) if generated else None,
        stubborn_tokens=stubborn,
        notes=final.notes,
        samples=len(samples),
        samples_recalled=samples_recalled(final.correct, samples),
    )


def samples_recalled(correct: Any, samples: list[Sample]) -> int:
    """How many samples are recalled entry by entry: every teacher-forced argmax of the sample's target right.
    `correct` [N] bool over all samples' targets, sample 0's first."""
    from memcore.metrics import per_sample

    _, right = per_sample(np.ones(len(correct), np.float32), correct, [len(s.target_ids) for s in samples])
    return int(right.sum())


def source_bits(spec: RunSpec, tokenizer: Any, vocab_size: int | None = None) -> float | None:
    """Bits of information in one target token when the data say: log2 of the number of ordinary tokens for
    random-token targets (each drawn uniformly from them); None for text, whose information is not known."""
    if spec.data.random_tokens is None:
        return None
    from memcore.data import ordinary_token_ids

    return float(np.log2(len(ordinary_token_ids(tokenizer, vocab_size))))


def stored_run_spec(store: Store, run_id: str) -> RunSpec:
    """The spec of a finished run that has a saved adapter (else a MemcoreError saying why not)."""
    run = store.run(run_id)
    folder = store.adapter_dir(run_id)
    if not ((folder / "adapter_config.json").is_file() or (folder / "bypass_config.json").is_file()):
        raise MemcoreError(f"run {run_id} has no saved adapter (status {run['status']})")
    return RunSpec.from_dict(run["spec"])


def generate_from_run(store: Store, run_id: str, base: Base, prompt: str | None = None,
                      max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy generation with a stored run's adapter on `base` (which is given back unchanged).

    prompt None: continue the run's own prompts and compare with its targets ("divergence": the flat index
    of the first differing token, None if recalled verbatim). Otherwise continue BOS + prompt (100 tokens
    unless max_new_tokens says otherwise)."""
    from memcore.data import prompt_ids
    from memcore.measure import compare, greedy_generate

    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with base.adapted(store.adapter_dir(run_id)) as model:
        if prompt is None:
            samples = stored_samples(store, run_id)
            gen = greedy_generate(model, samples, pad, max_new_tokens)
            return {"generated": gen, "targets": [s.target_ids for s in samples], "divergence": compare(gen, samples),
                    "text": [tok.decode(g) for g in gen]}
        gen = greedy_generate(model, [Sample(prompt_ids(tok, prompt), [0])], pad, max_new_tokens or 100)
        return {"generated": gen, "text": [tok.decode(gen[0])]}
