"""Join a training stream to the run store: one function runs one RunSpec end to end.

``prepare`` loads the base model and tokenizes the data (every input error surfaces here, before any row
is written); ``execute`` attaches the adapter, streams ``train_iter`` into the store (flushing at most
about once a second), saves the adapter in standard PEFT format, and returns the summary.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Generator
from contextlib import ExitStack, suppress
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from memcore.config import MemcoreError, RunSpec, WriteFailed, is_write_error
from memcore.data import Sample, make_batch
from memcore.loading import Base, load_base
from memcore.measure import StepReport, base_losses
from memcore.metrics import StubbornCounter, bits_per_param
from memcore.pieces import Piece, token_pieces
from memcore.placement import p_eff, target_module_regex
from memcore.records import RunSummary, StepRow
from memcore.specs import preflight
from memcore.store import Store
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


def execute_iter(spec: RunSpec, store: Store, base: Base, samples: list[Sample], *, run_id: str | None = None,
                 should_stop: Callable[[], bool] | None = None, sweep: str | None = None, label: str | None = None,
                 resume: bool = False) -> Generator[StepReport, None, RunSummary]:
    """Train one run and record it, yielding each StepReport as it is stored; returns the summary.

    Every `spec.train.checkpoint_every` seconds (and when a run stops early) the steps so far are flushed and
    the adapter (PEFT folder) and a checkpoint of the loop's state are saved in the run's folder. With
    resume=True, `run_id` names a stored run that continues from its checkpoint (or from the start if it
    had none): its steps from the checkpoint on are dropped and the history goes on from there.
    Consumers that interleave several runs (the app's compare mode) advance several of these in turn."""
    if run_id is None:
        run_id = store.create_run(spec.to_dict(), sweep=sweep, label=label)
    kept = _Kept()
    tok = base.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = make_batch(samples, pad_id).to(base.device)
    adapter_dir = store.adapter_dir(run_id)
    adapter = ExitStack()  # holds the adapter on the shared base until the run's outcome is recorded
    try:
        ckpt = load_checkpoint(store, run_id) if resume else None
        kept.checkpoint = ckpt.step if ckpt else None
        if resume:
            store.truncate_steps(run_id, ckpt.step if ckpt else 0)
        store.set_status(run_id, "running")
        model = adapter.enter_context(base.adapted(spec.adapter, seed=spec.train.seed))
        n_params = p_eff(model)
        base_loss = base_losses(model, batch)
        targets = [s.target_ids for s in samples]
        pieces = token_pieces(tok, [t for ts in targets for t in ts])
        store.save_tokens(run_id, [s.prompt_ids for s in samples], targets, pieces,
                          base_loss[batch.target_mask].float().cpu().numpy())
        stubborn = StubbornCounter(len(pieces), spec.train.tau)
        earlier = store.replay(run_id) if ckpt else None  # a resumed run: the steps before its checkpoint
        for p in earlier.p if earlier is not None else []:
            stubborn.update(p)
        pending: list[StepRow] = []
        last_flush = time.monotonic()
        keep = None if spec.train.history == "full" else snapshot_steps(spec.train.max_steps)
        snapshots = len(earlier.steps) if earlier is not None else 0
        warnings: list[str] = []  # failed checkpoints, said with the next report

        def save(state: Checkpoint) -> None:
            """A checkpoint: the steps so far, the adapter, the loop's state. One that cannot be written is a
            warning, not the end of the run: training goes on and the next checkpoint tries again."""
            nonlocal pending
            store.write_steps(run_id, pending)  # a store that cannot be written ends the run (WriteFailed)
            pending = []
            try:
                save_adapter(model, adapter_dir, samples, spec)
                save_checkpoint(store, run_id, state)
                kept.checkpoint = state.step
            except WriteFailed as e:
                warnings.append(f"step {state.step}: {e}; training goes on and tries again at the next checkpoint")

        final: StepReport | None = None
        for r in train_iter(model, batch, spec.train, pad_id=pad_id, base_loss=base_loss, should_stop=should_stop,
                            resume=ckpt, checkpoint=save):
            r.run_id = run_id
            if warnings:  # the loop's notes: they reach the live view, the summary and the CLI
                r.notes.extend(warnings)
                warnings.clear()
            stubborn.update(r.p)
            row = StepRow.of(r)
            if keep is not None and not r.final and r.step not in keep:
                row.p = row.correct = None  # scalars only: a decimated history keeps no per-token snapshot here
            else:
                snapshots += 1
            pending.append(row)
            if r.final or time.monotonic() - last_flush >= FLUSH_SECONDS:
                store.write_steps(run_id, pending)
                pending, last_flush = [], time.monotonic()
            if r.final:
                final = r
            else:
                yield r
        assert final is not None
        if warnings:  # a checkpoint failed in the last step (a stopped run's own)
            final.notes.extend(warnings)
        save_adapter(model, adapter_dir, samples, spec)
        kept.adapter = True
        summary = _summary(run_id, spec, final, n_params, samples, adapter_dir, stubborn, base_loss[batch.target_mask],
                           pieces)
        summary.history, summary.snapshots = spec.train.history, snapshots
        summary.source_bits_per_token = source_bits(spec, tok, getattr(base.model.config, "vocab_size", None))
        summary.device, summary.dtype = base.device.type, str(base.dtype).removeprefix("torch.")
        if summary.delta_loss < 0:  # the loss rose: said where the run's result is read (CLI, app, card)
            summary.notes.append(f"the loss rose in training (ΔL {summary.delta_loss:.3f} nats/token, from "
                                 f"{summary.base_loss:.3f} to {summary.loss:.3f}): the learning rate "
                                 f"({spec.train.lr:g}) is probably too high for this adapter; try a lower one")
        status = "stopped" if final.stop_reason == "stopped" else "completed"
        summary.status = status
        store.set_status(run_id, status, summary=summary)
        if final.stop_reason in FINISHED:  # finished and recorded: nothing to resume
            checkpoint_path(store, run_id).unlink(missing_ok=True)
        try:  # a copy beside the adapter; the store holds the summary
            (adapter_dir.parent / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        except OSError as e:
            summary.notes.append(f"{WriteFailed.of('summary.json', adapter_dir.parent, e)}; the store has the summary")
        final.summary = summary
        yield final
        return summary
    except GeneratorExit:  # the consumer walked away mid-run
        store.set_status(run_id, "interrupted", error="abandoned by its consumer")
        raise
    except WriteFailed as e:  # said in one line: what could not be written, where, and what is kept
        failed = WriteFailed(e.what, e.where, e.reason)
        failed.args = (f"{e}; {kept.say(run_id)}",)
        with suppress(MemcoreError, OSError):  # the store may be what is full: the run then shows as interrupted
            store.set_status(run_id, "failed", error=str(failed))
        raise failed from None
    except BaseException as e:
        msg = str(e) if isinstance(e, MemcoreError) else f"{type(e).__name__}: {e}"
        with suppress(MemcoreError, OSError):
            store.set_status(run_id, "failed" if not isinstance(e, KeyboardInterrupt) else "stopped", error=msg)
        if not isinstance(e, (MemcoreError, KeyboardInterrupt)):
            with suppress(OSError):
                (store.runs_dir / run_id / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        adapter.close()


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
        raise MemcoreError(f"run {run_id} is {run['status']}; only {', '.join(RESUMABLE)} runs can be resumed")
    return run


def resume_iter(store: Store, run_id: str, base: Base | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Base, Generator[StepReport, None, RunSummary]]:
    """Continue a stored run that did not finish (interrupted, stopped or failed) from its last checkpoint, on
    the exact target tokens it was training on. Returns the base model used and the execute_iter stream.

    Raises MemcoreError if the run finished or is still live."""
    run = check_resumable(store, run_id)
    spec = RunSpec.from_dict(run["spec"])
    base, samples = prepare(spec, base, store.home)
    try:  # the tokens it was trained on, even if the tokenizer has changed since
        toks = store.tokens(run_id)
        samples = [Sample(p, t) for p, t in zip(toks["prompt_ids"], toks["target_ids"])]
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


def save_adapter(model: Any, path: Path, samples: list[Sample], spec: RunSpec) -> None:
    """Standard PEFT folder (adapter_config.json + adapter_model.safetensors; for the bypass adapter memcore's
    bypass_config.json + bypass_model.safetensors) and memcore.json saying which prompt and target the adapter
    memorized. (The tokenizer is the base model's: `memcore export` adds it to the folder it writes.)

    Written into a temporary folder first, then each file renamed into place: a run killed while saving, or a
    disk that fills up, keeps the previous save's files whole (a rename is atomic), never a half-written weights
    file. Raises WriteFailed naming the folder when it cannot be written."""
    import shutil
    import tempfile

    tmp = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=path.parent))
        model.save_pretrained(tmp)
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
    )


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
            toks = store.tokens(run_id)
            samples = [Sample(p, t) for p, t in zip(toks["prompt_ids"], toks["target_ids"])]
            gen = greedy_generate(model, samples, pad, max_new_tokens)
            return {"generated": gen, "targets": toks["target_ids"], "divergence": compare(gen, samples),
                    "text": [tok.decode(g) for g in gen]}
        gen = greedy_generate(model, [Sample(prompt_ids(tok, prompt), [0])], pad, max_new_tokens or 100)
        return {"generated": gen, "text": [tok.decode(gen[0])]}
