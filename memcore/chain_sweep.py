"""Sweeps over chains: how much of a first passage survives a second one trained into the same adapter, against
capacity. For every rank r, first length ℓ_A and seed a first passage A is memorized; on top of it (TrainSpec.after)
a second passage B of every length ℓ_B is trained under every strategy:

    none            B alone, A only measured (sft)
    keep-sft        A rehearsed with B, every token of both trained (sft)
    keep-memft-ot   A rehearsed with B under memft-ot: a token carries weight only while it is below τ

Both passages are random tokens (the paper's r100 data: no knowledge to lean on, so capacity is all there is), A
drawn with the point's seed and B with another, each after a prompt of its own. Every run is an ordinary run of the
store tagged with the sweep's id, so the same command resumes: finished points are skipped, a point cut off mid-way
continues from its checkpoint. The capacity law predicts A survives while (ℓ_A + ℓ_B) stays under the frontier ℓ*(r).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from memcore.chain import next_prompt
from memcore.config import MemcoreError, RunSpec
from memcore.sweep import Point, PointResult, identity, resumable_points

STRATEGIES: dict[str, tuple[str, bool]] = {"none": ("sft", False), "keep-sft": ("sft", True),
                                           "keep-memft-ot": ("memft-ot", True)}
"""Strategy -> (the second passage's method, whether the first is rehearsed)."""

SECOND_SEED = 100_003  # the second passage's random tokens are drawn with seed + SECOND_SEED: never the first's


@dataclass(frozen=True)
class ChainSweepSpec:
    """A grid of chains A → B. template: what every run shares (model, adapter placement, training settings; its
    data random tokens, its prompt the first passage's). Validation names the bad value (MemcoreError)."""

    template: RunSpec
    ranks: tuple[int, ...] = (1, 2)
    first_lengths: tuple[int, ...] = (16,)
    second_lengths: tuple[int, ...] = (8, 16, 32, 64)
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    seeds: tuple[int, ...] = (0,)
    name: str | None = None

    def __post_init__(self) -> None:
        for label, values in (("ranks", self.ranks), ("first lengths", self.first_lengths),
                              ("lengths", self.second_lengths), ("strategies", self.strategies),
                              ("seeds", self.seeds)):
            if not values:
                raise MemcoreError(f"a chain sweep needs at least one value for {label}")
        if any(r < 1 for r in self.ranks) or any(n < 1 for n in (*self.first_lengths, *self.second_lengths)):
            raise MemcoreError("chain sweep ranks and lengths must be >= 1")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise MemcoreError(f"unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
        if self.template.data.random_tokens is None:
            raise MemcoreError("a chain sweep draws both passages as random tokens (the paper's r100 data, so that "
                               "capacity is all that counts): give --random-tokens (any count; the lengths set it) "
                               "or no data flag")
        if self.template.train.after is not None:
            raise MemcoreError("a chain sweep trains its own first passages: drop --after")

    @property
    def id(self) -> str:
        """Stable id: the name if given, else a hash of everything that defines the grid."""
        if self.name:
            return self.name
        d = {"chains": identity(self.template), "ranks": self.ranks, "first": self.first_lengths,
             "second": self.second_lengths, "strategies": self.strategies, "seeds": self.seeds}
        return "chains-" + hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def first_points(self) -> list[Point]:
        """A first passage per rank, first length and seed: trained from a fresh adapter until recalled (or its
        budget), with the template's method."""
        t = self.template
        out = []
        for seed in self.seeds:
            for rank in self.ranks:
                for n in self.first_lengths:
                    values = {"passage": "first", "rank": rank, "first_length": n, "seed": seed}
                    spec = replace(t, adapter=replace(t.adapter, rank=rank),
                                   data=replace(t.data, random_tokens=n, length=None, seed=seed),
                                   train=replace(t.train, seed=seed, stop_when_recalled=True, verify=False))
                    out.append(Point(key=json.dumps(values, sort_keys=True), spec=spec, values=values))
        return out

    def second_points(self, first_runs: dict[str, str]) -> list[Point]:
        """A second passage per first point, second length and strategy, trained on top of the first's run
        (`first_runs`: first point key -> its run id; points whose first has no run yet are left out)."""
        t = self.template
        out = []
        for first in self.first_points():
            rid = first_runs.get(first.key)
            if rid is None:
                continue
            seed = first.values["seed"]
            for n in self.second_lengths:
                for strategy in self.strategies:
                    method, keep = STRATEGIES[strategy]
                    values = {**first.values, "passage": "second", "second_length": n, "strategy": strategy}
                    data = replace(first.spec.data, random_tokens=n, seed=seed + SECOND_SEED,
                                   prompt=next_prompt(1) if t.data.prompt != next_prompt(1) else next_prompt(2))
                    spec = replace(first.spec, data=data,
                                   train=replace(first.spec.train, method=method, keep=keep, after=rid))
                    out.append(Point(key=json.dumps(values, sort_keys=True), spec=spec, values=values))
        return out


def _completed(store: Any, sweep_id: str) -> dict[str, str]:
    """Point key -> run id of the sweep's completed points."""
    return {r["label"]: r["id"] for r in store.runs(sweep=sweep_id, status="completed")}


def run_chain_sweep(sweep: ChainSweepSpec, store: Any, *, base: Any = None,
                    should_stop: Callable[[], bool] | None = None, batch: int | str = "auto",
                    on_point: Callable[[Point, Any], None] | None = None,
                    ray: dict[str, Any] | None = None) -> Iterator[tuple[Point, PointResult]]:
    """Train the sweep's points not yet completed, the first passages, then the second ones on top of them, and
    yield (point, its PointResult: the final RunSummary, or the error of a point that failed) as each finishes (a
    stopped point's summary has status 'stopped'). Here (ray None) each group trains `batch` at a time
    (memcore.runner.execute_many; 'auto': as many as fit, memcore.sweep.batch_size_for); with ray (keyword arguments
    of memcore.sweep_ray.run_points_ray: address, cpus_per_run, gpus_per_run, retries) every point is a Ray task
    of `batch` points ('auto': 8) that carries the first passage's run to its worker, and the finished runs land in
    this store. A stop request ends the points in training as 'stopped' (a re-run continues them; on Ray, what is in
    flight is cancelled and re-runs whole) and ends the sweep. Raises MemcoreError when Ray is asked for and missing
    or unreachable."""
    from memcore.runner import BatchedRun, execute_many, prepare, stored_samples
    from memcore.sweep import SweepSpec, batch_size_for

    if ray is not None:
        from memcore.sweep_ray import run_points_ray

    def local(todo: list[Point]) -> Iterator[tuple[Point, PointResult]]:
        nonlocal base, batch
        base, _ = prepare(sweep.first_points()[0].spec, base, store.home)
        if batch == "auto":
            longest = max(sweep.first_lengths) + max(sweep.second_lengths)
            grid = SweepSpec(template=sweep.template, ranks=sweep.ranks, lengths=(longest,))
            batch = max(1, min(batch_size_for(base, grid), len(sweep.seeds) * len(sweep.ranks)
                               * len(sweep.strategies) * len(sweep.first_lengths) * len(sweep.second_lengths)))
        unfinished = resumable_points(store, sweep.id)

        def runs() -> Iterator[BatchedRun]:
            for p in todo:
                rid = unfinished.get(p.key)
                if rid is not None:
                    yield BatchedRun(p.spec, stored_samples(store, rid), tag=p, run_id=rid, resume=True)
                else:
                    _, samples = prepare(p.spec, base, store.home)
                    yield BatchedRun(p.spec, samples, tag=p, sweep=sweep.id, label=p.key)

        for p, r in execute_many(runs(), store, base, slots=int(batch), max_rank=max(sweep.ranks),
                                 should_stop=should_stop):
            if r.final:
                yield p, PointResult(values=p.values, summary=r.summary, run_id=r.summary.run_id)

    def remote(todo: list[Point]) -> Iterator[tuple[Point, PointResult]]:
        by_key = {p.key: p for p in todo}
        for result in run_points_ray(todo, store, sweep.id, should_stop=should_stop, batch=batch, **(ray or {})):
            yield by_key[json.dumps(result.values, sort_keys=True)], result

    def phase(todo: list[Point]) -> Iterator[tuple[Point, PointResult]]:
        todo = sorted(todo, key=lambda p: (p.values.get("second_length", 0), p.values["rank"]))  # little padding
        for p, result in (local(todo) if ray is None else remote(todo)):
            if on_point is not None:
                on_point(p, result)
            yield p, result

    done = _completed(store, sweep.id)
    firsts = [p for p in sweep.first_points() if p.key not in done]
    if firsts:
        yield from phase(firsts)
    if should_stop is not None and should_stop():
        return
    done = _completed(store, sweep.id)
    seconds = [p for p in sweep.second_points(done) if p.key not in done]
    if seconds:
        yield from phase(seconds)


CHAIN_COLUMNS = ("rank", "first_length", "second_length", "strategy", "seed", "first_recalled", "first_steps",
                 "retained_above", "retained_recalled", "retained_prefix", "lost_at", "regained_at", "second_steps",
                 "second_recalled", "second_above", "rehearsal_share", "stop_reason", "first_run", "run_id")


def chain_table(store: Any, sweep_id: str) -> list[dict[str, Any]]:
    """One row per completed chain (columns CHAIN_COLUMNS): the grid's rank, first_length and second_length (target
    tokens), strategy, seed; whether the first passage was recalled when its own run ended and in how many steps;
    its retention once the second has trained: retained_above (share of its tokens with p > τ, 0..1),
    retained_recalled (every argmax right: greedy decoding recites it), retained_prefix (tokens recalled in order
    before the first wrong one), lost_at and regained_at (the second run's step its verbatim recall was lost and
    won back, empty: never); the second passage's steps, recall and share of tokens above τ; rehearsal_share (mean
    share of the update weight spent on the first passage, 0..1)."""
    runs = {r["id"]: r for r in store.runs(sweep=sweep_id, status="completed")}
    rows = []
    for rid, r in runs.items():
        v = json.loads(r["label"])
        if v.get("passage") != "second":
            continue
        s = r["summary"]
        first = runs.get(s.after) or store.run(s.after)
        fs = first["summary"]
        m = s.earlier_tokens or 0
        rows.append({"rank": v["rank"], "first_length": fs.n_tokens, "second_length": s.n_tokens,
                     "strategy": v["strategy"], "seed": v["seed"], "first_recalled": bool(fs.exact_recall),
                     "first_steps": fs.steps, "retained_above": (s.earlier_above or 0) / m if m else None,
                     "retained_recalled": bool(s.earlier_recalled), "retained_prefix": s.earlier_prefix,
                     "lost_at": s.earlier_lost_at, "regained_at": s.earlier_regained_at, "second_steps": s.steps,
                     "second_recalled": bool(s.exact_recall), "second_above": s.n_above / max(1, s.n_tokens),
                     "rehearsal_share": s.rehearsal_share, "stop_reason": s.stop_reason, "first_run": s.after,
                     "run_id": rid})
    rows.sort(key=lambda x: (x["rank"], x["first_length"], x["second_length"], x["strategy"], x["seed"]))
    return rows


def retention_against_capacity(table: Any, ell_star: Callable[[Any], Any]) -> Any:
    """The chain table (chain_table rows, or its CSV as a DataFrame) summed up per rank, first length, second length
    and strategy over the seeds whose first passage was recalled when its own run ended (retention of a passage never
    learned says nothing), against capacity: fill = (ℓ_A + ℓ_B) / ℓ*(r), ℓ*(r) in tokens from `ell_star` (ranks
    array -> frontier lengths, e.g. a memcore.frontier.FrontierFit's ell_star). Columns: rank, first_length,
    second_length, strategy, fill, seeds, kept (mean share of the first passage's tokens above τ, 0..1), kept_lo and
    kept_hi (least and most over the seeds), recalled (share of seeds still reciting it verbatim), second_steps
    (mean), second_recalled (share of seeds), rehearsal (mean share of the update weight on the first passage).
    Raises MemcoreError when no first passage was recalled."""
    import numpy as np
    import pandas as pd

    df = pd.DataFrame(table)
    if df.empty:
        raise MemcoreError("the chain table has no rows")
    learned = df[df["first_recalled"].astype(bool)]
    if learned.empty:
        raise MemcoreError("no first passage was recalled at the end of its own run: nothing to retain (give the "
                           "first passages more steps, or shorter --first-lengths)")
    keys = ["rank", "first_length", "second_length", "strategy"]
    out = learned.groupby(keys, as_index=False).agg(
        seeds=("seed", "size"), kept=("retained_above", "mean"), kept_lo=("retained_above", "min"),
        kept_hi=("retained_above", "max"), recalled=("retained_recalled", "mean"),
        second_steps=("second_steps", "mean"), second_recalled=("second_recalled", "mean"),
        rehearsal=("rehearsal_share", "mean"))
    star = np.asarray(ell_star(out["rank"].to_numpy(float)), dtype=float)
    out.insert(4, "fill", (out["first_length"] + out["second_length"]) / star)
    return out
