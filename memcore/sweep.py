"""Grids of fixed-budget runs for the memory law: ranks × lengths × methods × seeds × noise fractions.

Every point is an ordinary run in the store, tagged with the sweep's id and the point's key, so re-running
the same sweep skips the points already completed and an interrupted sweep picks up where it stopped: a point
cut off mid-way continues from its last checkpoint.
Points train a fixed budget (no stop-when-recalled, no generate check: the teacher-forced argmax is exact),
memft-ot falls back to the mean loss when nothing is left below τ (the variant for fixed-budget sweeps).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from memcore.config import METHODS, MemcoreError, RunSpec
from memcore.records import RunSummary

SWEEP_DEFAULTS = {"ranks": (1, 2, 4, 8, 16), "lengths": (32, 64, 128, 256, 512), "methods": ("sft", "memft-ot"),
                  "seeds": (0,), "noises": (0.0,)}


HOW_NOT_WHAT = ("recompute", "history")  # TrainSpec fields left out of a sweep's id
# TrainSpec fields added after sweeps were first stored, left out of an id while at their default: a sweep (or
# frontier search) started before they existed keeps its id, and resumes, after an upgrade
ADDED_AT_DEFAULT = {"plateau_on": "delta_loss", "batch_size": None, "curriculum_epochs": None, "after": None,
                    "keep": False}


def identity(template: RunSpec) -> dict[str, Any]:
    """What of a sweep's template names it (its id's hash): every setting but how a point runs (HOW_NOT_WHAT)
    and the later settings at their defaults (ADDED_AT_DEFAULT)."""
    d = template.to_dict()
    for how in HOW_NOT_WHAT:  # settings that change how a point runs, not its numbers: same sweep
        d["train"].pop(how, None)
    for name, value in ADDED_AT_DEFAULT.items():
        if name in d["train"] and d["train"][name] == value:
            del d["train"][name]
    return d


@dataclass(frozen=True)
class SweepSpec:
    """A grid: the template every point shares, and the ranks, lengths, methods, seeds and noise fractions
    it varies. Validation names the bad value (MemcoreError)."""
    template: RunSpec  # what every point shares: model, adapter placement, data, training settings
    ranks: tuple[int, ...] = SWEEP_DEFAULTS["ranks"]
    lengths: tuple[int, ...] = SWEEP_DEFAULTS["lengths"]
    methods: tuple[str, ...] = SWEEP_DEFAULTS["methods"]
    seeds: tuple[int, ...] = SWEEP_DEFAULTS["seeds"]
    noises: tuple[float, ...] = SWEEP_DEFAULTS["noises"]
    name: str | None = None

    def __post_init__(self) -> None:
        for label, values in (("ranks", self.ranks), ("lengths", self.lengths), ("methods", self.methods),
                              ("seeds", self.seeds), ("noises", self.noises)):
            if not values:
                raise MemcoreError(f"a sweep needs at least one value for {label}")
        if any(r < 1 for r in self.ranks) or any(n < 1 for n in self.lengths):
            raise MemcoreError("sweep ranks and lengths must be >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise MemcoreError(f"unknown method {bad[0]!r} in the sweep; choose from {', '.join(METHODS)}")
        if any(not 0 <= x <= 1 for x in self.noises):
            raise MemcoreError("noise fractions must be in [0, 1]")

    @property
    def id(self) -> str:
        """Stable id: the name if given, else a hash of everything that defines the grid."""
        if self.name:
            return self.name
        template = identity(self.template)
        # keyed "base" as it always was, so a sweep keeps its id
        d = {"base": template, "ranks": self.ranks, "lengths": self.lengths, "methods": self.methods,
             "seeds": self.seeds, "noises": self.noises}
        return "sweep-" + hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Point:
    """One grid point: its key (JSON of its values), its full RunSpec and its values."""
    key: str
    spec: RunSpec
    values: dict[str, Any] = field(default_factory=dict)


def points(sweep: SweepSpec) -> list[Point]:
    """Every grid point as a full RunSpec (fixed budget, no early stop), in a deterministic order."""
    out = []
    b = sweep.template
    for method in sweep.methods:
        for seed in sweep.seeds:
            for noise in sweep.noises:
                for rank in sweep.ranks:
                    for length in sweep.lengths:
                        spec = replace(b, adapter=replace(b.adapter, rank=rank),
                                       data=replace(b.data, length=length, noise=noise, seed=seed),
                                       train=replace(b.train, method=method, seed=seed, stop_when_recalled=False,
                                                     verify=False, ot_when_empty="mean"))
                        values = {"method": method, "seed": seed, "noise": noise, "rank": rank, "length": length}
                        out.append(Point(key=json.dumps(values, sort_keys=True), spec=spec, values=values))
    return out


@dataclass
class PointResult:
    """What a sweep yields for each point as it lands: the grid values (method, seed, noise, rank, length), the
    run's summary (None when the point failed), the error of a failed point, and the seconds it took here
    (None on Ray, where it ran elsewhere)."""

    values: dict[str, Any]
    summary: RunSummary | None = None
    error: str | None = None
    run_id: str | None = None
    seconds: float | None = None

    @property
    def stopped(self) -> bool:
        """Cut off mid-way by a stop request: not a completed point (a re-run continues it)."""
        return self.summary is not None and self.summary.status == "stopped"


def completed_keys(store: Any, sweep: SweepSpec) -> set[str]:
    """The keys of the sweep's points already completed in the store."""
    return {r["label"] for r in store.runs(sweep=sweep.id, status="completed")}


def run_sweep(sweep: SweepSpec, store: Any, *, base: Any = None, should_stop: Callable[[], bool] | None = None,
              on_point: Callable[[int, int, PointResult], None] | None = None,
              batch: int | str = 1) -> Iterator[PointResult]:
    """Run the points not yet completed, yielding each one's result as it finishes.

    batch: how many points train together through one forward of the shared base (memcore.runner.execute_many;
    'auto' sizes it from memory, batch_size_for), each recorded exactly as if alone; 1 trains them one at a
    time. A stop request ends the points in training as 'stopped' (kept, not counted as completed; a re-run
    continues them from their checkpoints) and ends the sweep."""
    from memcore.runner import drain, execute, prepare, resume_iter

    todo = [p for p in points(sweep) if p.key not in completed_keys(store, sweep)]
    longest = max(sweep.lengths)
    base, samples = prepare(replace(sweep.template, data=replace(sweep.template.data, length=None)), base, store.home)
    available = min(len(s.target_ids) for s in samples)
    if longest > available:
        raise MemcoreError(f"the sweep asks for {longest} target tokens but the text has only {available}; "
                           "use a longer text or smaller --lengths")
    unfinished = resumable_points(store, sweep.id)
    if batch == "auto":
        batch = batch_size_for(base, sweep)
    if int(batch) > 1 and todo:
        yield from _run_batched(sweep, store, base, todo, unfinished, int(batch), should_stop, on_point)
        return
    for i, point in enumerate(todo):
        if should_stop is not None and should_stop():
            return
        t0 = time.perf_counter()
        if point.key in unfinished:  # cut off earlier with a checkpoint: go on from there
            base, stream = resume_iter(store, unfinished[point.key], base, should_stop=should_stop)
            summary = drain(stream)
        else:
            base, samples = prepare(point.spec, base, store.home)
            summary = execute(point.spec, store, base, samples, should_stop=should_stop, sweep=sweep.id,
                              label=point.key)
        result = PointResult(values=point.values, summary=summary, run_id=summary.run_id,
                             seconds=time.perf_counter() - t0)
        if on_point is not None:
            on_point(i + 1, len(todo), result)
        yield result


def _run_batched(sweep: SweepSpec, store: Any, base: Any, todo: list[Point], unfinished: dict[str, str], slots: int,
                 should_stop: Callable[[], bool] | None,
                 on_point: Callable[[int, int, PointResult], None] | None) -> Iterator[PointResult]:
    """The points trained `slots` at a time (memcore.runner.execute_many), shortest first so that runs in training
    together have lengths alike (little padding); a point cut off earlier resumes from its checkpoint."""
    from memcore.runner import BatchedRun, execute_many, prepare, stored_samples

    def runs() -> Iterator[BatchedRun]:
        for point in sorted(todo, key=lambda p: (p.values["length"], p.values["rank"])):
            rid = unfinished.get(point.key)
            if rid is not None:  # the tokens it was trained on, as stored
                yield BatchedRun(point.spec, stored_samples(store, rid), tag=point, run_id=rid, resume=True)
            else:
                _, samples = prepare(point.spec, base, store.home)
                yield BatchedRun(point.spec, samples, tag=point, sweep=sweep.id, label=point.key)

    done = 0
    for point, r in execute_many(runs(), store, base, slots=slots, max_rank=max(sweep.ranks),
                                 should_stop=should_stop):
        if not r.final:
            continue
        done += 1
        result = PointResult(values=point.values, summary=r.summary, run_id=r.summary.run_id, seconds=r.elapsed)
        if on_point is not None:
            on_point(done, len(todo), result)
        yield result


AUTO_BATCH_BYTES_CPU = 0.25  # share of the available memory 'auto' lets a batch's activations take
AUTO_BATCH_MAX = 64


def batch_size_for(base: Any, sweep: SweepSpec) -> int:
    """How many of the sweep's points to train at once ('--batch auto'): as many as fit, by their activations, in
    a quarter of the available memory (on CUDA half of the free device memory), between 1 and 64. A point's
    activations: (prompt + longest length) tokens × trained blocks × 24 × hidden × element size bytes (the
    estimate memcore.train.use_recompute makes), the trained blocks being those from the lowest adapted one."""
    import os

    import torch

    from memcore.blocks import layer_count
    from memcore.targets import adapter_layers

    cfg = base.model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    n_layers = layer_count(cfg) or 1
    lowest = min(adapter_layers(base.model, sweep.template.adapter))
    tokens = max(sweep.lengths) + 64  # the prompt's few tokens, generously
    per_point = tokens * (n_layers - lowest) * 24 * hidden * torch.finfo(base.dtype).bits // 8
    if base.device.type == "cuda":
        free = torch.cuda.mem_get_info(base.device)[0] * 0.5
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * AUTO_BATCH_BYTES_CPU
        except (ValueError, OSError):
            free = 2 * 2**30 * AUTO_BATCH_BYTES_CPU
    return int(max(1, min(AUTO_BATCH_MAX, free // max(1, per_point), len(points(sweep)))))


def resumable_points(store: Any, sweep_id: str) -> dict[str, str]:
    """Point label -> the newest run of that point of the sweep (or frontier search) `sweep_id` that stopped short
    with a checkpoint (resumable)."""
    from memcore.runner import RESUMABLE, checkpoint_path

    out = {}
    for r in store.runs(sweep=sweep_id):  # oldest first: the newest wins
        if r["status"] in RESUMABLE and checkpoint_path(store, r["id"]).is_file():
            out[r["label"]] = r["id"]
    return out


SWEEP_COLUMNS = ("rank", "length", "delta_loss", "p_eff", "method", "seed", "noise", "adapter", "base_loss",
                 "frac_above", "frac_correct", "token_accuracy", "verbatim_prefix", "exact_recall", "recalled",
                 "converged", "stop_reason", "bits_per_param", "source_bits_per_token", "samples", "samples_recalled",
                 "steps", "run_id")


def _source_bits(run: dict[str, Any], summary: RunSummary, store: Any, cache: dict[str, float | None]) -> float | None:
    if summary.source_bits_per_token is not None or not run["spec"].get("data", {}).get("random_tokens"):
        return summary.source_bits_per_token
    spec = RunSpec.from_dict(run["spec"])
    if spec.model.name not in cache:
        from memcore.loading import load_config, load_tokenizer
        from memcore.runner import source_bits

        cache[spec.model.name] = source_bits(spec, load_tokenizer(spec.model, store.home),
                                             load_config(spec.model, store.home).vocab_size)
    return cache[spec.model.name]


def sweep_table(store: Any, sweep_id: str) -> list[dict[str, Any]]:
    """One row per completed point (columns SWEEP_COLUMNS): the law's rank, length (tokens), delta_loss (nats per
    token), p_eff; the grid's method, seed, noise; and the recall figures: frac_above (share of tokens with
    p > τ), token_accuracy (share whose teacher-forced argmax is right; frac_correct is the same, kept for older
    readers), verbatim_prefix (tokens before the first wrong argmax), exact_recall (all right), converged and
    stop_reason (how the point stopped), bits_per_param, source_bits_per_token (information per target token:
    log2 of the ordinary vocabulary for random tokens, empty for text), samples and samples_recalled (entries of a
    PhoneBook, and how many are recalled entry by entry). Raises MemcoreError for a chain sweep (memcore sweep
    --chain), whose table is memcore.chain_sweep.chain_table."""
    from memcore.chain import is_chain_label

    rows = []
    bits_of: dict[str, float | None] = {}  # model -> log2 #ordinary tokens, for points stored before the summary had it
    for r in store.runs(sweep=sweep_id, status="completed"):
        if is_chain_label(r["label"]):
            from memcore.law import CHAIN_SWEEP

            raise MemcoreError(CHAIN_SWEEP.format(sweep=sweep_id))
        s, v = r["summary"], json.loads(r["label"])
        n = s.n_tokens
        rows.append({"rank": v["rank"], "length": n, "delta_loss": s.delta_loss, "p_eff": s.p_eff,
                     "method": v["method"], "seed": v["seed"], "noise": v["noise"], "adapter": s.adapter,
                     "base_loss": s.base_loss, "frac_above": s.n_above / n, "frac_correct": s.n_correct / n,
                     "token_accuracy": s.token_accuracy, "verbatim_prefix": s.verbatim_prefix,
                     "samples": s.samples, "samples_recalled": s.samples_recalled,
                     "exact_recall": bool(s.exact_recall), "recalled": s.recalled, "converged": bool(s.converged),
                     "stop_reason": s.stop_reason, "bits_per_param": s.bits_per_param,
                     "source_bits_per_token": _source_bits(r, s, store, bits_of), "steps": s.steps, "run_id": r["id"]})
    return rows
