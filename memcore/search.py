"""The verbatim-recall frontier by search: for each rank, the longest target recalled verbatim, found by bisection.

A grid spends most of its steps far from the frontier, and places it only between two of its lengths. The search
probes one length per rank (all seeds and methods of it at once), trains each probe until it is recalled (every
teacher-forced argmax right: greedy decoding reproduces the target, DESIGN.md §2), converged on a plateau, or the
step budget, and moves the rank's bracket [lo, hi] (lo: the longest length recalled, hi: the shortest not) in log ℓ:

- no probe yet: the start length (start_length · rank, a frontier linear in rank being the paper's finding);
- only recalled so far: twice lo (up to the longest the data hold); only failures so far: half of hi;
- both: the geometric mean of lo and hi, until hi / lo ≤ 1 + resolution (or hi = lo + 1 token).

A length counts as recalled when at least half of its seeds recall it (the recall rate crossing 1/2, as
memcore.frontier interpolates a grid). Its first ⌈seeds/2⌉ seeds train first: when they settle the verdict whatever
the others give (two of three agreeing), the others are not trained there, except at the bracket's two ends, which
get every seed, so the recall rates at the ends are over all of them (a third fewer probes at three seeds where
they agree, and the same bracket). Probes of every rank, method and seed train together through one stack
(memcore.runner.execute_many); each is an ordinary run in the store, tagged with the search's id as its sweep
and its point (method, seed, noise, rank, length) as its label, so `memcore fit`, `memcore frontier`, `predict
--verbatim` and the law page read a search like a sweep, and running the same search again reuses every probe
already completed (a probe cut off mid-way continues from its checkpoint).

Points that depend on a placed bracket (a benchmark's lengths around the frontier) can train beside the search
(`also`): they take the slots its probes leave free as soon as their bracket is placed, instead of waiting for
every bracket, in the same sweep; a probe that is also such a point trains once, its verdict taken when it ends.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from memcore.config import METHODS, MemcoreError, RunSpec

DEFAULT_RESOLUTION = 0.05  # the bracket's width at the end, hi / lo − 1
DEFAULT_START = 32  # tokens at rank 1 for the first probe (start_length · rank at other ranks)
PROGRESS_EVERY_S = 2.0  # while probes train, progress is also yielded this often
# what every probe sets itself (SearchSpec.probe_spec): left out of the search's id
PROBE_SETS = (("adapter", "rank"), ("data", "length"), ("data", "seed"), ("train", "method"), ("train", "seed"),
              ("train", "stop_when_recalled"), ("train", "verify"), ("train", "until"), ("train", "ot_when_empty"))


@dataclass(frozen=True)
class SearchSpec:
    """A frontier search: the template every probe shares (model, adapter kind and placement, data, training), the
    ranks, methods and seeds searched, the resolution (relative width of the final bracket), the lengths allowed
    (min_length to max_length tokens; max_length None: all the data hold) and the first probe's length at rank 1
    (tokens). Validation names the bad value (MemcoreError)."""

    template: RunSpec
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    methods: tuple[str, ...] = ("sft",)
    seeds: tuple[int, ...] = (0,)
    resolution: float = DEFAULT_RESOLUTION
    min_length: int = 1
    max_length: int | None = None
    start_length: int = DEFAULT_START
    name: str | None = None
    unit: str = "tokens"
    """What a length counts: 'tokens' of the target (the long-context benchmark), or 'entries' of a PhoneBook (the
    template's data a PhoneBook, its size the most entries searched, or JSONL pairs such as the paper's PB files,
    a probe of n entries taking their first n; capacity in facts)."""
    epochs: int | None = None
    """With unit='entries' and minibatches: each probe's step budget is this many epochs of its book (else the
    template's max_steps)."""

    def __post_init__(self) -> None:
        for label, values in (("ranks", self.ranks), ("methods", self.methods), ("seeds", self.seeds)):
            if not values:
                raise MemcoreError(f"a frontier search needs at least one value for {label}")
        if any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise MemcoreError(f"search ranks must be whole numbers >= 1, got {list(self.ranks)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise MemcoreError(f"unknown method {bad[0]!r} in the search; choose from {', '.join(METHODS)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise MemcoreError(f"the seeds repeat: {list(self.seeds)}")
        if len(set(self.ranks)) != len(self.ranks):
            raise MemcoreError(f"the ranks repeat: {list(self.ranks)}")
        if not (isinstance(self.resolution, int | float) and 0 < self.resolution <= 1):
            raise MemcoreError(f"the resolution is the final bracket's relative width, between 0 and 1 "
                               f"(0.05: within 5%), got {self.resolution!r}")
        if self.min_length < 1 or self.start_length < 1:
            raise MemcoreError("the search's lengths must be at least 1 token")
        if self.unit not in ("tokens", "entries"):
            raise MemcoreError(f"a search counts tokens or entries, got {self.unit!r}")
        if self.unit == "entries" and self.template.data.phonebook is None and self.template.data.pairs is None:
            raise MemcoreError("a search over entries needs PhoneBook data (a size: the most entries searched) or "
                               "JSONL pairs (their first n make a book of n)")
        if self.epochs is not None and (self.unit != "entries" or self.template.train.batch_size is None):
            raise MemcoreError("a budget in epochs needs a PhoneBook search trained in minibatches (--batch-size)")
        if self.max_length is not None and self.max_length < self.min_length:
            raise MemcoreError(f"the longest length ({self.max_length}) is below the shortest ({self.min_length})")

    @property
    def id(self) -> str:
        """The name if given, else a hash of the template (what every probe shares): searches of other ranks,
        seeds or resolutions on the same template share their probes."""
        if self.name:
            return self.name
        from memcore.sweep import identity

        template = identity(self.template)
        for part, key in PROBE_SETS:  # every probe sets these itself
            template[part].pop(key, None)
        if self.unit == "entries":  # the book's size is each probe's own
            template["data"].pop("phonebook", None)
            template["unit"], template["epochs"] = self.unit, self.epochs
        text = json.dumps({"frontier-search": template}, sort_keys=True, default=str)
        return "frontier-" + hashlib.sha1(text.encode()).hexdigest()[:10]

    def probe_spec(self, method: str, rank: int, length: int, seed: int) -> RunSpec:
        """The RunSpec of one probe: the template at this rank, length (tokens), method and seed, trained until
        recalled (by the teacher-forced argmax, no generate), converged or the budget."""
        t = self.template
        if self.unit == "entries":  # a book of `length` entries: generated, or the first of the file's
            data = replace(t.data, seed=seed, **({"pairs": t.data.pairs[:length]} if t.data.pairs is not None
                                                 else {"phonebook": length}))
        else:
            data = replace(t.data, length=length, seed=seed)
        steps = t.train.max_steps
        if self.epochs is not None:
            steps = self.epochs * math.ceil(length / t.train.batch_size)
        return replace(t, adapter=replace(t.adapter, rank=rank), data=data,
                       train=replace(t.train, method=method, seed=seed, stop_when_recalled=True, verify=False,
                                     until="converged", ot_when_empty="mean", max_steps=steps))

    def label(self, method: str, rank: int, length: int, seed: int) -> str:
        """A probe's label in the store: the JSON of its point, as a sweep's points are labelled."""
        values = {"method": method, "seed": seed, "noise": self.template.data.noise, "rank": rank, "length": length}
        return json.dumps(values, sort_keys=True)


@dataclass
class Bracket:
    """One (method, rank)'s search: lo, the longest length recalled (recall rate ≥ 1/2 over the seeds), hi, the
    shortest not recalled (tokens; None until probed), and every probed length's verdicts (seed -> recalled)."""

    method: str
    rank: int
    lo: int | None = None
    hi: int | None = None
    probed: dict[int, dict[int, bool]] = field(default_factory=dict)  # length -> seed -> recalled
    steps: int = 0  # optimizer steps its probes took

    def rate(self, length: int | None) -> float | None:
        """Share of seeds that recalled `length`, or None when it was not probed."""
        got = self.probed.get(length) if length is not None else None
        return sum(got.values()) / len(got) if got else None

    def seeds_at(self, length: int | None) -> int:
        """How many seeds have a verdict on `length` (the seeds its rate is over; 0 when not probed)."""
        return len(self.probed.get(length, {})) if length is not None else 0

    def record(self, length: int, recalled: bool | None = None) -> None:
        """Move the bracket by the verdict on `length`: `recalled`, or when None its seeds' recall rate ≥ 1/2."""
        if (self.rate(length) >= 0.5) if recalled is None else recalled:
            self.lo = length if self.lo is None else max(self.lo, length)
        else:
            self.hi = length if self.hi is None else min(self.hi, length)

    def next_length(self, search: SearchSpec, longest: int) -> int | None:
        """The length to probe next, or None when the bracket is narrow enough or pinned at an end."""
        lo, hi, shortest = self.lo, self.hi, search.min_length
        if lo is not None and lo >= longest or hi is not None and hi <= shortest:
            return None
        if lo is not None and hi is not None:
            if hi <= lo + 1 or hi / lo <= 1 + search.resolution + 1e-12:
                return None
            return min(hi - 1, max(lo + 1, round(math.sqrt(lo * hi))))
        if lo is not None:
            return min(longest, lo * 2)
        if hi is not None:
            return max(shortest, hi // 2)
        return min(longest, max(shortest, search.start_length * self.rank))

    def lengths_left(self, search: SearchSpec, longest: int) -> tuple[int, int]:
        """(fewest, most) lengths this bracket may still probe, the one in training included (its verdict not yet
        in): over every way the verdicts to come could fall, so the search ends within these counts whatever the
        frontier. Once both ends are known the most is a few (5 from a factor-2 bracket to 5%); while one is
        missing it counts doubling (or halving) to the end of the lengths allowed."""
        return _lengths_left(self.lo, self.hi, search.resolution, search.min_length, longest, search.start_length
                             * self.rank)

    def outcome(self, longest: int, shortest: int) -> tuple[str, float]:
        """('bracketed', geometric mean of lo and hi), ('at least', lo) when even the longest length the data hold
        is recalled, ('at most', hi) when not even the shortest allowed is, or ('open', nan) while unsettled."""
        if self.lo is not None and self.hi is not None:
            return "bracketed", math.sqrt(self.lo * self.hi)
        if self.lo is not None and self.lo >= longest:
            return "at least", float(self.lo)
        if self.hi is not None and self.hi <= shortest:
            return "at most", float(self.hi)
        return "open", math.nan


@functools.lru_cache(maxsize=4096)
def _lengths_left(lo: int | None, hi: int | None, resolution: float, shortest: int, longest: int,
                  start: int) -> tuple[int, int]:
    """Bracket.lengths_left over the bracket [lo, hi]: the next length, then the fewest and most of both verdicts."""
    spec = _Ends(resolution=resolution, min_length=shortest, start_length=start)
    length = Bracket("", 1, lo, hi).next_length(spec, longest)
    if length is None:
        return 0, 0
    recalled = _lengths_left(length if lo is None else max(lo, length), hi, resolution, shortest, longest, start)
    failed = _lengths_left(lo, length if hi is None else min(hi, length), resolution, shortest, longest, start)
    return 1 + min(recalled[0], failed[0]), 1 + max(recalled[1], failed[1])


@dataclass(frozen=True)
class _Ends:
    """What Bracket.next_length reads of a SearchSpec (at rank 1: start_length is the rank's own)."""

    resolution: float
    min_length: int
    start_length: int


@dataclass
class SearchProgress:
    """Where a search stands: probes completed (here and earlier), probes training now, steps spent (those of the
    probes in training included), seconds this time, and each (method, rank)'s bracket."""

    probes_done: int
    in_flight: int
    steps: int
    seconds: float
    brackets: list[Bracket]
    finished: bool = False
    stopped: bool = False
    probing: dict[tuple[str, int], int] = field(default_factory=dict)  # (method, rank) -> length in training
    probes_left: tuple[int, int] = (0, 0)  # (fewest, most) probes still to complete (trained, or read from a store
    # that holds another search's probes on the same template), those in training included
    seeds: int = 0  # seeds searched (an end's rate may be over fewer so far)
    also_done: int = 0  # points trained beside the search (FrontierSearch's `also`) completed this time
    also_in_flight: int = 0  # and those training now

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the counts and, per bracket, method, rank, lo, hi, the recall rates at lo and hi and the seeds
        each is over."""
        return {"probes_done": self.probes_done, "in_flight": self.in_flight, "steps": self.steps,
                "seconds": self.seconds, "finished": self.finished, "stopped": self.stopped,
                "probes_left": list(self.probes_left),
                "seeds": self.seeds, "also_done": self.also_done, "also_in_flight": self.also_in_flight,
                "brackets": [{"method": b.method, "rank": b.rank, "lo": b.lo, "hi": b.hi, "lo_rate": b.rate(b.lo),
                              "hi_rate": b.rate(b.hi), "lo_seeds": b.seeds_at(b.lo),
                              "hi_seeds": b.seeds_at(b.hi), "probes": len(b.probed), "steps": b.steps,
                              "probing": self.probing.get((b.method, b.rank))}
                             for b in self.brackets]}


@dataclass
class _Probe:
    bracket: Bracket
    length: int
    seed: int


@dataclass(frozen=True)
class _Also:
    """A point trained beside the search (FrontierSearch's `also`): (method, rank, length, seed)."""

    point: tuple[str, int, int, int]


class FrontierSearch:
    """Runs a SearchSpec into a store (see the module docstring). `run()` yields a SearchProgress after every
    completed probe; `brackets` holds the result.

    also: called with the brackets placed so far (no length left to probe), it returns the (method, rank, length,
    seed) points to train beside the search, in the search's sweep and with its labels (SearchSpec.probe_spec), at
    the search's ranks or below. They take a slot only when the search has no probe ready for it (once started,
    one runs to its end: a probe asked for meanwhile waits for the next free slot); one the search asks for while
    it trains is not trained twice (its verdict is taken when it ends), and the search does not finish before
    they do. Points already completed, asked for or training are skipped. Raises MemcoreError for a point of a
    rank above the search's (the batch's adapter stack holds up to its largest).

    also_run: with it, the points beside the search are runs of their own, not probes: also_run(point) gives each
    one's (RunSpec, label), a label no probe has (say, the point trained on another stopping rule), so one at a
    point the search probes trains beside that probe, and neither's verdict is taken for the other."""

    def __init__(self, search: SearchSpec, store: Any, base: Any = None, *, batch: int | str = "auto",
                 should_stop: Callable[[], bool] | None = None, hold: bool | None = None,
                 also: Callable[[list[Bracket]], Iterable[tuple[str, int, int, int]]] | None = None,
                 also_run: Callable[[tuple[str, int, int, int]], tuple[Any, str]] | None = None) -> None:
        from memcore.runner import prepare

        self.search, self.store, self.should_stop = search, store, should_stop
        whole = replace(search.template, data=replace(search.template.data, length=None))
        self.base, samples = prepare(whole, base, store.home)
        # hold a length's later seeds until its first ones split: on a CPU every run in the batch costs its own
        # compute, so a seed that cannot change the verdict is wasted; on a GPU a slot left empty is the waste, so
        # the held seeds fill free slots at once (hold=None: by the base's device)
        self.hold = (getattr(self.base.device, "type", "cpu") != "cuda") if hold is None else hold
        available = len(samples) if search.unit == "entries" else min(len(s.target_ids) for s in samples)
        if search.max_length is not None and search.max_length > available:
            raise MemcoreError(f"the search may go up to {search.max_length} {search.unit} but the data hold only "
                               f"{available}; give more data or a smaller longest length")
        self.longest = search.max_length or available
        if self.longest < search.min_length:
            raise MemcoreError(f"the data hold {available} target tokens, fewer than the shortest length "
                               f"{search.min_length}")
        self.brackets = [Bracket(m, r) for m in search.methods for r in sorted(search.ranks)]
        self.waiting: dict[tuple[str, int], int] = {}  # bracket -> the length whose verdict it waits for
        self.first: deque[_Probe] = deque()  # probes a verdict needs: the first seeds of a length, a bracket's ends
        self.held: deque[_Probe] = deque()  # the other seeds of a length: trained only if the first ones split
        self.asked: set[tuple[str, int, int, int]] = set()  # (method, rank, length, seed) queued, trained or known
        self.live: dict[int, _Probe] = {}  # probes in training
        self.in_flight = 0
        self.training: dict[int, int] = {}  # probe -> steps so far, while it trains
        self.also, self.also_run = also, also_run
        self.also_live: dict[tuple[str, int, int, int], _Also] = {}  # points beside the search, in training
        self.awaited: dict[tuple[str, int, int, int], Bracket] = {}  # of those, the ones a bracket asked for
        self.also_done = 0
        self.also_steps = 0  # steps of the points beside the search completed this time
        self.cut_steps = 0  # steps of probes stopped before their end, this time
        self.done = 0
        self.stopped = False
        self.batch = batch
        self.t0 = time.perf_counter()
        self._known = self._completed()

    # -- the store --

    def _completed(self) -> dict[str, Any]:
        """label -> the summary of the search's probes completed earlier."""
        return {r["label"]: r["summary"] for r in self.store.runs(sweep=self.search.id, status="completed")}

    # -- deciding --

    def _verdict(self, b: Bracket, length: int, seed: int, summary: Any, decide: bool = True) -> None:
        b.probed.setdefault(length, {})[seed] = bool(summary.exact_recall)
        b.steps += int(summary.steps)
        self.done += 1
        if decide:
            self._decide(b)

    def _decide(self, b: Bracket) -> bool:
        """Move `b` once the seeds back on the length it waits for settle the verdict whatever the others give
        (recalled by at least half of all the seeds, or failed by more than half), dropping that length's probes
        not yet started; until then, its remaining seeds are wanted first. True when the bracket moved."""
        key = (b.method, b.rank)
        length = self.waiting.get(key)
        if length is None:
            return False
        got, every = b.probed.get(length, {}), len(self.search.seeds)
        recalled = sum(got.values())
        if 2 * recalled < every <= 2 * (recalled + every - len(got)):  # the seeds to come still decide
            if len(got) >= -(-every // 2):  # the first seeds are back and split: the others are wanted now
                mine = [p for p in self.held if p.bracket is b and p.length == length]
                self.held = deque(p for p in self.held if not (p.bracket is b and p.length == length))
                self.first.extend(mine)
            return False
        del self.waiting[key]
        b.record(length, recalled=2 * recalled >= every)
        for q in (self.first, self.held):  # not needed any more, unless it becomes an end (then _advance asks again)
            for p in [p for p in q if p.bracket is b and p.length == length]:
                q.remove(p)
                self.asked.discard((b.method, b.rank, length, p.seed))
        return True

    def _ask(self, b: Bracket, length: int, seeds: list[int], first: int) -> bool:
        """Take the store's verdicts on `length` for `seeds` at once and queue the others: the first `first` of
        them to train, the rest held until the first ones split; True when a verdict came from the store."""
        found = False
        todo = []
        for seed in seeds:
            point = (b.method, b.rank, length, seed)
            if point in self.asked:
                continue
            self.asked.add(point)
            summary = self._known.get(self.search.label(b.method, b.rank, length, seed))
            if summary is not None:
                self._verdict(b, length, seed, summary, decide=False)  # the caller decides once all are read
                found = True
            elif point in self.also_live and self.also_run is None:  # training beside the search: its verdict is
                # taken when it ends
                self.awaited[point] = b
            else:
                todo.append(_Probe(b, length, seed))
        coming = sum(self.awaited.get((b.method, b.rank, length, sd)) is b for sd in seeds)
        first = max(0, first - len(b.probed.get(length, {})) - coming)  # the store's and those coming count
        self.first.extend(todo[:first])
        self.held.extend(todo[first:])
        return found

    def _advance(self) -> None:
        """Queue the next length of every bracket not waiting on one (its first ⌈seeds/2⌉ seeds to train, the others
        held: see `hold`), taking verdicts already in the store at once; once a bracket is narrow enough, queue the
        seeds its two ends still lack, so that their recall rates are over every seed."""
        seeds = list(self.search.seeds)
        moved = True
        while moved:
            moved = False
            for b in self.brackets:
                key = (b.method, b.rank)
                if key in self.waiting:
                    continue
                length = b.next_length(self.search, self.longest)
                if length is None:
                    for end in (b.lo, b.hi):
                        if end is not None:
                            self._ask(b, end, seeds, len(seeds))
                    continue
                self.waiting[key] = length
                self._ask(b, length, seeds, -(-len(seeds) // 2))
                moved = self._decide(b) or moved

    def _runs(self) -> Iterator[Any]:
        from memcore.runner import BatchedRun, prepare, stored_samples
        from memcore.sweep import resumable_points

        unfinished = resumable_points(self.store, self.search.id)
        while True:
            self._advance()
            if not self.first and self.held and (not self.hold or not (self.in_flight or self.awaited)):
                self.first.append(self.held.popleft())  # a free slot on a GPU (with nothing the search waits on
                # in training: never expected on a CPU)
            point = None if self.first else self._next_also()
            if self.first:
                p = self.first.popleft()
                self.live[id(p)] = p
                spec = self.search.probe_spec(p.bracket.method, p.bracket.rank, p.length, p.seed)
                label = self.search.label(p.bracket.method, p.bracket.rank, p.length, p.seed)
                self.in_flight += 1
                rid = unfinished.get(label)
                if rid is not None:  # cut off earlier: on the tokens it was trained on, from its checkpoint
                    yield BatchedRun(spec, stored_samples(self.store, rid), tag=p, run_id=rid, resume=True)
                else:
                    _, samples = prepare(spec, self.base, self.store.home)
                    yield BatchedRun(spec, samples, tag=p, sweep=self.search.id, label=label)
            elif point is not None:  # a slot the search leaves free: a point beside it
                tag = self.also_live[point] = _Also(point)
                spec, label = self._also_of(point)
                rid = unfinished.get(label)
                if rid is not None:
                    yield BatchedRun(spec, stored_samples(self.store, rid), tag=tag, run_id=rid, resume=True)
                else:
                    _, samples = prepare(spec, self.base, self.store.home)
                    yield BatchedRun(spec, samples, tag=tag, sweep=self.search.id, label=label)
            elif self.in_flight or self.also_live:
                yield None  # every bracket waits on probes in training
            else:
                return

    def _next_also(self) -> tuple[str, int, int, int] | None:
        """The next point beside the search to train (see `also`), or None."""
        if self.also is None:
            return None
        for point in self.also(self.placed()):
            point = (str(point[0]), int(point[1]), int(point[2]), int(point[3]))
            if point[1] > max(self.search.ranks):
                raise MemcoreError(f"a point beside the search at rank {point[1]}, above the search's largest rank "
                                   f"{max(self.search.ranks)}: the batch's adapter stack cannot hold it")
            if (self.also_run is not None or point not in self.asked) and point not in self.also_live \
                    and self._also_of(point)[1] not in self._known:
                return point
        return None

    def _also_of(self, point: tuple[str, int, int, int]) -> tuple[Any, str]:
        """(RunSpec, label) of a point beside the search: also_run's, else the probe's at that point."""
        if self.also_run is not None:
            return self.also_run(point)
        return self.search.probe_spec(*point), self.search.label(*point)

    def progress(self, finished: bool = False) -> SearchProgress:
        """The search as it stands (see SearchProgress)."""
        every, need = len(self.search.seeds), -(-len(self.search.seeds) // 2)
        fewest = most = 0
        for b in self.brackets:
            few, many = b.lengths_left(self.search, self.longest)
            length = self.waiting.get((b.method, b.rank))
            if length is not None and many:  # the length it waits for: the seeds back count
                back = len(b.probed.get(length, {}))
                fewest += (few - 1) * need + max(1, need - back)
                most += (many - 1) * every + every - back
            else:
                fewest, most = fewest + few * need, most + many * every
            for end in (b.lo, b.hi):  # an end now may stay one: the seeds it lacks are asked for at the close
                if end is not None and end != length:
                    lacking = sum((b.method, b.rank, end, seed) not in self.asked and seed not in b.probed.get(end, {})
                                  for seed in self.search.seeds)
                    most += lacking
                    fewest += lacking if not many else 0  # placed: its ends are final, so they will be asked for
        # probes asked for outside a length being decided (a settled length's later seeds, a bracket's ends), and
        # points beside the search a bracket asked for there: each still brings a verdict
        for p in [*self.live.values(), *self.first, *self.held]:
            if self.waiting.get((p.bracket.method, p.bracket.rank)) != p.length:
                fewest, most = fewest + 1, most + 1
        for point, b in self.awaited.items():
            if self.waiting.get((b.method, b.rank)) != point[2]:
                fewest, most = fewest + 1, most + 1
        return SearchProgress(probes_left=(fewest, most), seeds=every, probes_done=self.done, in_flight=self.in_flight,
                              steps=sum(b.steps for b in self.brackets) + sum(self.training.values())
                              + self.cut_steps + self.also_steps,
                              seconds=time.perf_counter() - self.t0,
                              brackets=self.brackets, finished=finished, stopped=self.stopped,
                              probing=dict(self.waiting), also_done=self.also_done,
                              also_in_flight=len(self.also_live))

    def _also_ended(self, tag: _Also, r: Any) -> bool:
        """Book a report of a point beside the search; True when it was its last (completed or cut off)."""
        if not r.final:
            self.training[id(tag)] = r.step
            return False
        self.training.pop(id(tag), None)
        self.also_live.pop(tag.point, None)
        b = self.awaited.pop(tag.point, None)
        if r.summary.status != "completed":  # cut off: it resumes from its checkpoint next time
            self.stopped = True
            self.cut_steps += int(r.summary.steps)
            if b is not None:
                self.asked.discard(tag.point)
            return True
        self._known[self._also_of(tag.point)[1]] = r.summary
        self.also_done += 1
        method, rank, length, seed = tag.point
        if b is not None:  # a probe too: the bracket's verdict (its steps counted there)
            self._verdict(b, length, seed, r.summary)
            return True
        # a seed an end lacks: taken there now, as a fresh read of the store would take it (a probe's own run only)
        for b in self.brackets if self.also_run is None else ():
            if (b.method, b.rank) == (method, rank) and length in (b.lo, b.hi) and seed not in b.probed.get(length, {}):
                self.asked.add(tag.point)
                self._verdict(b, length, seed, r.summary, decide=False)
                return True
        self.also_steps += int(r.summary.steps)
        return True

    def read(self) -> SearchProgress:
        """Take every verdict the store already holds, training nothing, and say where that leaves the search (the
        brackets, and the probes to go)."""
        self._advance()
        return self.progress()

    def placed(self) -> list[Bracket]:
        """The brackets with no length left to probe (within the resolution, or pinned at the shortest or longest
        length): their ends are final, though an end may still lack some seeds' verdicts (see unsettled)."""
        return [b for b in self.brackets if b.next_length(self.search, self.longest) is None]

    def unsettled(self) -> list[Bracket]:
        """The brackets with a probe still to train: a length whose verdict is awaited, or an end lacking seeds."""
        every = set(self.search.seeds)
        return [b for b in self.brackets if b.next_length(self.search, self.longest) is not None
                or any(end is not None and not every <= b.probed.get(end, {}).keys() for end in (b.lo, b.hi))]

    def slots(self) -> int:
        """Probes trained together: at most one length per bracket, all its seeds; 'auto' also bounds it by memory
        (memcore.sweep.batch_size_for at the longest length)."""
        most = len(self.brackets) * len(self.search.seeds)
        if self.batch == "auto":
            from memcore.sweep import SweepSpec, batch_size_for

            grid = SweepSpec(template=self.search.template, ranks=self.search.ranks, lengths=(self.longest,),
                             methods=self.search.methods, seeds=self.search.seeds)
            return max(1, min(most, batch_size_for(self.base, grid)))
        return max(1, min(most, int(self.batch)))

    def run(self) -> Iterator[SearchProgress]:
        """Train the probes the search needs, yielding its progress after each one completes (and every
        PROGRESS_EVERY_S seconds while probes train), and once more at the end (finished, or stopped: a stop
        request ends the probes in training as 'stopped', each resuming from its checkpoint when the same search
        runs again)."""
        from memcore.runner import execute_many

        self._advance()
        yield self.progress()
        said = time.perf_counter()
        for p, r in execute_many(self._runs(), self.store, self.base, slots=self.slots(),
                                 max_rank=max(self.search.ranks), should_stop=self.should_stop):
            if isinstance(p, _Also):  # a point beside the search: said when it ends, and every PROGRESS_EVERY_S
                if self._also_ended(p, r) or time.perf_counter() - said >= PROGRESS_EVERY_S:
                    said = time.perf_counter()
                    yield self.progress()
                continue
            if not r.final:
                self.training[id(p)] = r.step
                if time.perf_counter() - said >= PROGRESS_EVERY_S:  # long probes: say the steps going by
                    said = time.perf_counter()
                    yield self.progress()
                continue
            self.training.pop(id(p), None)
            self.live.pop(id(p), None)
            self.in_flight -= 1
            if r.summary.status != "completed":  # cut off: its steps count, its verdict waits for the next run
                self.stopped = True
                self.cut_steps += int(r.summary.steps)
                self.asked.discard((p.bracket.method, p.bracket.rank, p.length, p.seed))  # still to train
                continue
            self._verdict(p.bracket, p.length, p.seed, r.summary)
            said = time.perf_counter()
            yield self.progress()
        for p in self.live.values():  # taken for a slot after the stop request, never started
            self.asked.discard((p.bracket.method, p.bracket.rank, p.length, p.seed))
        for point in self.also_live:  # likewise beside the search: a bracket waiting on one asks again next time
            if self.awaited.pop(point, None) is not None:
                self.asked.discard(point)
        self.also_live.clear()
        self.live.clear()
        self.training.clear()
        self.in_flight = 0
        self._advance()  # a bracket the last verdicts moved: its next length or its ends' seeds are still to go
        self.stopped = self.stopped or bool(self.should_stop and self.should_stop())
        yield self.progress(finished=not self.stopped)


@dataclass
class SearchResult:
    """A finished (or stopped) search: per (method, rank) its bracket, ℓ* and recall rates at the bracket's ends;
    per method the fitted frontier ℓ*(r) = c·r^γ over every probe (memcore.frontier), with bits per parameter."""

    search_id: str
    progress: SearchProgress
    longest: int
    fits: dict[str, Any]  # method -> FrontierFit or None
    fit_errors: dict[str, str | None]
    probes: list[dict[str, Any]] = field(default_factory=list)  # memcore.sweep.sweep_table rows of every probe
    shortest: int = 1  # the shortest length the search allowed (a bracket pinned there is 'at most')

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (method, rank): method, rank, outcome ('bracketed', 'at least', 'at most', 'open'), ell_star
        (tokens), lo, hi, lo_rate, hi_rate (over the lo_seeds and hi_seeds seeds with a verdict), probes, steps, and
        where the method's fit exists fitted ell_star with its 95% interval and bits_per_param at the fitted ℓ*."""
        out = []
        for b in self.progress.brackets:
            kind, ell = b.outcome(self.longest, self.shortest)
            row = {"method": b.method, "rank": b.rank, "outcome": kind, "ell_star": ell, "lo": b.lo, "hi": b.hi,
                   "lo_rate": b.rate(b.lo), "hi_rate": b.rate(b.hi), "probes": len(b.probed), "steps": b.steps,
                   "lo_seeds": b.seeds_at(b.lo), "hi_seeds": b.seeds_at(b.hi)}
            fit = self.fits.get(b.method)
            if fit is not None:
                lo, hi = fit.ell_star_interval(b.rank)
                row |= {"fitted_ell_star": float(fit.ell_star(b.rank)), "fitted_interval": [lo, hi],
                        "bits_per_param": fit.bits_per_param(b.rank)}
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: search id, progress, per-rank rows and each method's fit (FrontierFit.to_dict)."""
        return {"search": self.search_id, "progress": self.progress.to_dict(), "longest": self.longest,
                "ranks": self.rows(), "fits": {m: f.to_dict() if f else None for m, f in self.fits.items()},
                "fit_errors": self.fit_errors}


def search_result(search: FrontierSearch, progress: SearchProgress, resamples: int | None = None) -> SearchResult:
    """The result of a search run so far: brackets from `progress`, fits from every probe in the store, each with
    `resamples` bootstrap resamples (default memcore.frontier.BOOTSTRAP)."""
    import pandas as pd

    from memcore.frontier import BOOTSTRAP, frontier_from_table
    from memcore.sweep import sweep_table

    df = pd.DataFrame(sweep_table(search.store, search.search.id))
    fits: dict[str, Any] = {}
    errors: dict[str, str | None] = {}
    for m in search.search.methods:
        if df.empty or m not in set(df["method"]):
            fits[m], errors[m] = None, "no probe completed"
            continue
        try:
            _, fits[m], errors[m] = frontier_from_table(df, m, resamples or BOOTSTRAP)
        except MemcoreError as e:
            fits[m], errors[m] = None, str(e)
    return SearchResult(search.search.id, progress, search.longest, fits, errors, df.to_dict("records"),
                        shortest=search.search.min_length)


def budget_notes(probes: list[dict[str, Any]]) -> list[str]:
    """A line per (method, rank) whose unrecalled probes mostly stopped at the step budget (still improving,
    neither recalled nor on a plateau): there the bracket says what the budget allows, not what the rank can hold.
    probes: memcore.sweep.sweep_table rows (rank, method, exact_recall, stop_reason, steps)."""
    out = []
    for method, rank in sorted({(r["method"], r["rank"]) for r in probes}):
        failed = [r for r in probes if r["rank"] == rank and r["method"] == method and not r["exact_recall"]]
        bound = [r for r in failed if r["stop_reason"] == "max_steps"]
        if failed and len(bound) * 2 > len(failed):
            out.append(f"rank {rank}: {len(bound)} of its {len(failed)} unrecalled probes stopped at the step budget "
                       f"({bound[0]['steps']} steps) still improving: its bracket is where the budget runs out, which "
                       "may be short of capacity; raise --max-steps to tell")
    return out


def grid_lengths(lo: float, hi: float, resolution: float = DEFAULT_RESOLUTION) -> list[int]:
    """The lengths (tokens) of a grid that places a frontier anywhere in [lo, hi] as finely as a search at
    `resolution`: geometric steps of (1 + resolution), whole tokens, no repeats."""
    out, x = [], float(lo)
    while x < hi * (1 + 1e-9):
        n = int(round(x))
        if not out or n > out[-1]:
            out.append(n)
        x *= 1 + resolution
    if out[-1] < hi:
        out.append(int(math.ceil(hi)))
    return out


def brackets_of(df: Any, method: str | None = None) -> list[dict[str, Any]]:
    """Each rank's bracket in a sweep table (a search's probes or a grid; optionally one method's rows): lo, the
    longest length recalled by at least half of its seeds; hi, the shortest length longer than lo recalled by fewer;
    ell_star their geometric mean (or the one end there is, tokens). Rows: rank, lo, hi, ell_star, lo_rate,
    hi_rate, lengths (how many lengths were measured at the rank)."""
    from memcore.frontier import recall_column
    from memcore.law import as_bool, method_rows

    d = method_rows(df, method) if method else df
    d = d.assign(_rec=as_bool(d[recall_column(d)]).astype(float))
    out = []
    for rank, g in d.groupby("rank"):
        rate = g.groupby("length")["_rec"].mean().sort_index()
        ok = [n for n, v in rate.items() if v >= 0.5]
        lo = max(ok) if ok else None
        above = [n for n, v in rate.items() if v < 0.5 and (lo is None or n > lo)]
        hi = min(above) if above else None
        ell = math.sqrt(lo * hi) if lo is not None and hi is not None else float(lo if lo is not None else hi)
        out.append({"rank": int(rank), "lo": lo, "hi": hi, "ell_star": ell,
                    "lo_rate": float(rate[lo]) if lo is not None else None,
                    "hi_rate": float(rate[hi]) if hi is not None else None, "lengths": int(len(rate))})
    return out
