"""MemFT against SFT on the default model, settled with intervals: the long-context benchmark (the paper's r100,
random tokens, at its placement with the bypass adapter), converged.

    python bench/bench_memft.py run    [--home DIR] [--keep DIR] [--ranks 1 2] [--seeds 0 1 2] [--max-steps 2000]
    python bench/bench_memft.py report [--home DIR] [--out DIR]      (the same settings flags as run)
    python bench/bench_memft.py spot   --seeds 3 4 [--paired CSV]    (the shipped cells again with other seeds)
    python bench/bench_memft.py spot   --frontier --seeds 3 4        (the placed brackets' ends again, other seeds)
    python bench/bench_memft.py window [--seeds 0] [--points CSV]    (the plateau rule against the same points
                                                                      trained on without it)
    python bench/bench_memft.py compare --csv SWEEP.csv     (equal-step means of a sweep table, no intervals)

`run` does two stages into a memcore store under --home (resumable: run it again after a stop and nothing
finished is trained twice):
  1. per method (sft, memft-ot, memft-sw) and rank, ℓ*(r) placed within --resolution by memcore's frontier search
     (memcore.search), every seed trained on its own random tokens (seed s: the same tokens for every method);
  2. around sft's frontier ℓ*_sft(r) (the bracket's geometric mean): 0.5·ℓ* (steps to exact recall) and 1.5·ℓ*,
     2·ℓ* (past the frontier, trained to a plateau), every method and seed at the same lengths and data.
Every completed point is also kept under --keep (default sample_data/paper/long_context_runs/<search id>, one gzipped
JSON per point: its row, scalar steps and tokens; no adapter weights or per-token history) and read back into a
fresh --home before anything trains, so the experiment resumes from what a clone holds as well as from its store;
kept.json there adds up the wall time every `run` spent.
Every point trains until recalled (teacher-forced argmax: greedy decoding reproduces the target), until a
plateau judged alike for every method (--until converged --plateau-on recall: neither the tokens above τ nor
the argmax-right tokens reached a new best in --plateau-window steps), or --max-steps.

`report` prints and writes (under --out) the frontier per method with the recall rate at the bracket's ends and
bits per parameter, the paired MemFT − SFT differences per rank and measure with 95% intervals (paired t over
seeds: memcore.frontier.paired_differences), and the memory law fitted on the plateau ΔL past the frontier.
Every setting is a flag, so the paper's grid on a GPU is the same command with --ranks 1 2 4 8 16 --seeds 0 1 2
3 4 --lr 1e-2 (and --adapter lora for the LoRA cross-check).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "sample_data" / "sweeps" / "capacity_bypass_random.csv"
METHODS = ("sft", "memft-ot", "memft-sw")
KEEP = ROOT / "sample_data" / "paper" / "long_context_runs"
KEEP_SPOT = ROOT / "sample_data" / "paper" / "long_context_spot_runs"  # the spot re-run's own seeds
KEEP_SPOT_FRONTIER = ROOT / "sample_data" / "paper" / "long_context_spot_frontier_runs"  # spot --frontier's
KEEP_WINDOW = ROOT / "sample_data" / "paper" / "long_context_window_runs"  # the plateau rule's check
POOL = 1280  # random tokens drawn per seed; a point trains on the first `length` of them
AROUND = (0.5, 1.5, 2.0)  # lengths as multiples of sft's ℓ*(r): below, and past the frontier
# bootstrap resamples of the report's and the spot's frontier fits: with memcore's default 300 the 2.5% end of a
# difference's interval moved by up to 2.9 tokens with the resampling's seed alone (8 seeds, on the frontier spot's
# five-seed pool), enough to turn a verdict; with 2,000, by 0.3 at most (3 seeds)
RESAMPLES = 2000
ABOUT = {  # each command's --help
    "run": "Train the search (stage 1) and, beside it as soon as sft's frontier at a rank is placed, the points "
           "around that frontier (stage 2) into --home, resuming from "
           "what --home and --keep hold; SIGTERM or Ctrl-C stops after the current step.",
    "report": "Print the tables of the search the settings flags name (the same flags as its run; --home and "
              "--keep only say where it lies) and, with --out, write them as CSV.",
    "spot": "Train the shipped paired table's cells again with other --seeds and say whether each difference "
            "falls inside the shipped interval; with --frontier, train both ends of every placed bracket again with "
            "them and check the shipped fitted frontier.",
    "window": "Check the plateau rule: train again, without it (until recalled or --max-steps), the points it "
              "stopped nearest each frontier, and say how many would have gone on to recall.",
}


def settings(args: argparse.Namespace):
    """The SearchSpec every stage shares (its id names the store's sweep)."""
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.search import SearchSpec

    # one pool of random tokens per seed, whatever the ranks (the search's id, and so what it resumes, is the
    # template's): enough for 2·ℓ* at rank 16 (ℓ* ≈ 40 r on the default model's bypass)
    data = DataSpec(random_tokens=POOL)
    if args.jsonl:  # the paper's own r100 (or r0-r80) file: one long target, the same for every seed
        data = DataSpec(pairs=read_pairs(args.jsonl, "long-context", args.jsonl_fields, args.jsonl_line))
    targets = "mlp" if args.adapter == "lora" else None
    adapter = AdapterSpec(kind=args.adapter, rank=1, layers="paper", dropout=0.1,
                          **({"targets": targets} if targets else {}))
    template = RunSpec(model=ModelSpec(name=args.model) if args.model else ModelSpec(), adapter=adapter,
                       data=data,
                       train=TrainSpec(max_steps=args.max_steps, lr=args.lr, until="converged", plateau_on="recall",
                                       plateau_window=args.plateau_window, history="decimated"))
    return SearchSpec(template=template, ranks=tuple(args.ranks), methods=tuple(args.methods),
                      seeds=tuple(args.seeds), resolution=args.resolution)


def read_pairs(path: str, want: str, fields: str | None = None,
               line: int | None = None) -> tuple[tuple[str, str], ...]:
    """The (prompt, target) pairs of a JSONL file in one of the paper's layouts (memcore.data.read_jsonl).

    want: 'long-context' (question/matching lines, of which the first or the `line`-th is taken: one target) or
    'phonebook' (query/target lines: every line an entry). `fields` 'PROMPT,TARGET' names other keys (then every
    line is a sample; with want='long-context', `line` picks one, else the first). Raises MemcoreError naming what
    is wrong with the file, and the other benchmark when the file is in its layout."""
    from memcore.config import MemcoreError
    from memcore.data import read_jsonl

    keys = None
    if fields:
        keys = tuple(k.strip() for k in fields.split(","))
        if len(keys) != 2 or not all(keys):
            raise MemcoreError(f"--jsonl-fields takes two key names, PROMPT,TARGET; got {fields!r}")
    data = read_jsonl(path, keys, line if line is not None else (1 if keys and want == "long-context" else None))
    other = {"long-context": ("phonebook", "bench/bench_phonebook.py"),
             "phonebook": ("long-context", "bench/bench_memft.py")}[want]
    if data.layout == other[0]:
        raise MemcoreError(f"{path} is in the paper's {other[0]} layout ({data.fields[0]} -> {data.fields[1]}): it "
                           f"belongs to {other[1]} --jsonl, not this benchmark")
    if want == "phonebook" and len(data.pairs) < 2:
        raise MemcoreError(f"{path} holds {len(data.pairs)} entry: a PhoneBook search needs several")
    print(f"{path}: {data.layout} layout, {len(data.pairs)} sample{'s' if len(data.pairs) != 1 else ''}"
          + (f"; {data.note}" if data.note else ""), flush=True)
    return data.pairs


def main_of(command, args) -> int:
    """Run a benchmark command; a MemcoreError (bad file, impossible setting) is one line naming it, exit 2."""
    from memcore.config import MemcoreError

    try:
        return command(args)
    except MemcoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def open_home(home: Path):
    """A memcore store under `home`, the converted default model linked in rather than converted again."""
    from memcore.home import default_model_dir
    from memcore.store import Store

    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():  # the converted default model, shared rather than converted again
        (home / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
    return Store(home)


KEEP_EVERY_S = 30.0  # points still training are kept (their checkpoints copied out) this often


def run_search(fs, t0: float, prefix: str = "", on_progress=None):
    """Run a FrontierSearch to its end, printing a line each time a probe completes (seconds since t0, probes done,
    training and to go, steps, every bracket); returns its last SearchProgress. `on_progress()` (the Keeper) is
    called when a point completes and otherwise at most every KEEP_EVERY_S seconds, not at every progress the
    search yields (every 2 s): each call reads the whole sweep from the store."""
    done, kept_at = None, time.perf_counter()
    for p in fs.run():
        if on_progress is not None and ((p.probes_done, p.also_done) != done
                                        or time.perf_counter() - kept_at >= KEEP_EVERY_S):
            kept_at = time.perf_counter()
            on_progress()
        if (p.probes_done, p.also_done) != done:
            done = p.probes_done, p.also_done
            beside = (f" (and {points_word(p.also_done)} around sft's frontier, {p.also_in_flight} training)"
                      if p.also_done or p.also_in_flight else "")
            print(f"[{time.perf_counter() - t0:6.0f} s] {prefix}{p.probes_done} probes done, {p.in_flight} training, "
                  f"{p.probes_left[0]}-{p.probes_left[1]} to go{beside}, {p.steps} steps   "
                  + "  ".join(f"{b.method}/r{b.rank}: [{b.lo}, {b.hi}]" for b in p.brackets), flush=True)
    return p


def reference_lengths(brackets, method: str = "sft") -> dict[int, float]:
    """rank -> ℓ* of `method`'s bracket (geometric mean of its ends; its one end when pinned)."""
    out = {}
    for b in brackets:
        if b.method != method:
            continue
        if b.lo is not None and b.hi is not None:
            out[b.rank] = math.sqrt(b.lo * b.hi)
        elif b.lo is not None or b.hi is not None:
            out[b.rank] = float(b.lo or b.hi)
    return out


def around_points(search, brackets, longest: int = POOL) -> list[tuple[str, int, int, int, float]]:
    """(method, rank, length, seed, factor) of stage 2: every method and seed at AROUND × sft's ℓ*(r), for the
    ranks where `brackets` (the placed ones: FrontierSearch.placed) hold sft's; none past `longest` (the tokens the
    data hold: a longer point would train on the same ones)."""
    ref = reference_lengths(brackets)
    out = []
    for f in AROUND:  # a factor at every placed rank before the next factor: 2 × ℓ* is the last to come
        for rank, ell in sorted(ref.items()):
            n = max(1, round(f * ell))
            if n > longest:
                continue
            for m in search.methods:
                for s in search.seeds:
                    out.append((m, rank, n, s, f))
    return out


def stage2_left(search, fs, store) -> list[tuple[int, float]]:
    """(length, factor) of every stage-2 point not completed yet: those of the ranks where sft's frontier is placed,
    less the ones the store holds, and every point of the ranks where it is not, at AROUND × sft's ℓ* so far (the
    geometric mean of its bracket's ends, 0 when it has none yet)."""
    placed = fs.placed()
    done = {r["label"] for r in store.runs(sweep=search.id, status="completed")}
    out = [(n, f) for m, rank, n, sd, f in around_points(search, placed, fs.longest)
           if around_label(search, m, rank, n, sd) not in done]
    so_far = reference_lengths(fs.brackets)
    for rank in sorted(set(search.ranks) - {b.rank for b in placed if b.method == "sft"}):
        ell = so_far.get(rank, 0.0)
        out += [(min(fs.longest, max(1, round(f * ell))), f) for f in AROUND
                for _ in search.methods for _ in search.seeds]
    return out


def around_run(search):
    """point -> (RunSpec, label) of a stage-2 point (method, rank, length, seed): the search's probe there trained on
    the common budget instead of the plateau rule (until recalled or the step budget, for every method alike), and
    labelled as the probe with "until": "budget", so the search never takes one for a probe nor a probe for one."""
    from dataclasses import replace

    def run_of(point):
        spec = search.probe_spec(*point)
        return replace(spec, train=replace(spec.train, until="budget")), around_label(search, *point)
    return run_of


def around_label(search, method: str, rank: int, length: int, seed: int) -> str:
    """The store label of a stage-2 point (see around_run)."""
    return json.dumps({**json.loads(search.label(method, rank, length, seed)), "until": "budget"}, sort_keys=True)


def is_around(label: str) -> bool:
    """Whether a store label is a stage-2 point's (around_label), not a search probe's."""
    try:
        return json.loads(label).get("until") == "budget"
    except (ValueError, AttributeError):
        return False


def points_table(store, search_id: str):
    """memcore.sweep.sweep_table of a search's completed points as a DataFrame, with `around`: True for stage 2's
    points (trained on the common budget, around_label), False for the search's probes."""
    import pandas as pd

    from memcore.sweep import sweep_table

    df = pd.DataFrame(sweep_table(store, search_id))
    kind = {r["id"]: is_around(r["label"]) for r in store.runs(sweep=search_id, status="completed")}
    return df.assign(around=[kind.get(rid, False) for rid in df["run_id"]]) if len(df) else df.assign(around=[])


def runs_to_train(items, run_of, known) -> list[tuple]:
    """(item, RunSpec, label) of each of `items` whose run (`run_of(item)` -> (RunSpec, label)) is not among the
    `known` (completed) labels, one per label, in order. A run is told apart by its label, not by its point: the
    same (method, rank, length, seed) as a search probe (plateau rule) and as a stage-2 point (common budget) is two
    runs."""
    todo = {}
    for item in items:
        spec, label = run_of(item)
        if label not in known and label not in todo:
            todo[label] = (item, spec, label)
    return list(todo.values())


def train_points(store, search, fs, points, stop, keep, t0: float, stage: str, what: str, run_of=None) -> None:
    """Train the points of `search` that `store` has not completed, together (a stopped one resuming from its
    checkpoint), printing a line as each ends; `keep()` after each and every 30 s. `run_of(item)` gives each of
    `points`' (RunSpec, label); by default an item is a (method, rank, length, seed) point and its run the
    search's probe there."""
    from memcore.runner import BatchedRun, execute_many, prepare, stored_samples
    from memcore.sweep import resumable_points

    known = {r["label"] for r in store.runs(sweep=search.id, status="completed")}
    unfinished = resumable_points(store, search.id)
    run_of = run_of or (lambda point: (search.probe_spec(*point), search.label(*point)))
    todo = runs_to_train(points, run_of, known)
    print(f"[{time.perf_counter() - t0:6.0f} s] {stage}: {points_word(len(todo))} {what} to train", flush=True)

    def runs():
        for _, spec, label in todo:
            rid = unfinished.get(label)
            if rid is not None:
                yield BatchedRun(spec, stored_samples(store, rid), tag=label, run_id=rid, resume=True)
            else:
                _, samples = prepare(spec, fs.base, store.home)
                yield BatchedRun(spec, samples, tag=label, sweep=search.id, label=label)

    if not todo:
        return
    left, kept_at = len(todo), time.perf_counter()
    for tag, r in execute_many(runs(), store, fs.base, slots=fs.slots(), max_rank=max(search.ranks),
                               should_stop=stop):
        if not r.final:
            if time.perf_counter() - kept_at >= KEEP_EVERY_S:  # checkpoints of points still training
                kept_at = time.perf_counter()
                keep()
            continue
        keep()
        left -= 1
        print(f"[{time.perf_counter() - t0:6.0f} s] {stage}: {tag} -> {r.summary.stop_reason} at step "
              f"{r.summary.steps}, {left} left", flush=True)


def run(args: argparse.Namespace) -> int:
    from kept import Keeper, StopOnSignal, restore

    from memcore.search import FrontierSearch

    store = open_home(args.home)
    search = settings(args)
    args.keep = args.keep or KEEP / search.id
    t0 = time.perf_counter()
    print(f"search {search.id} into {args.home}: ranks {list(search.ranks)}, methods {list(search.methods)}, "
          f"seeds {list(search.seeds)}; {restore(store, args.keep)} points read back from {args.keep}", flush=True)
    keep = Keeper(store, search.id, args.keep, "bench/bench_memft.py", sys.argv[1:], t0)
    stop = StopOnSignal()
    fs = FrontierSearch(search, store, batch=args.batch, should_stop=stop,  # stage 2 beside it, rank by rank
                        also=lambda placed: [point[:4] for point in around_points(search, placed, fs.longest)],
                        also_run=around_run(search))
    p = run_search(fs, t0, "stage 1: ", keep)
    if p.stopped:
        print(keep.ended(stopped=True), flush=True)
        return 1
    points = [(m, rank, n, sd) for m, rank, n, sd, _ in around_points(search, fs.placed(), fs.longest)]
    train_points(store, search, fs, points, stop, keep, t0, "stage 2", "around the frontier",
                 run_of=around_run(search))
    print(keep.ended(stopped=stop()), flush=True)
    return 1 if stop() else 0


def spot(args: argparse.Namespace) -> int:
    """Re-run the shipped table's cells with other seeds and say, per cell and measure, whether the new seeds'
    paired difference (method − sft) falls inside the shipped 95% interval."""
    import pandas as pd
    from kept import restore

    from memcore.frontier import paired_differences

    if args.frontier:
        return spot_frontier(args)
    shipped = pd.read_csv(args.paired) if Path(args.paired).is_file() else pd.DataFrame()
    if shipped.empty:
        print(f"no shipped paired table at {args.paired}: run `bench_memft.py report --out DIR` first", file=sys.stderr)
        return 2
    store, search, keep, stop, fs, t0 = spot_setup(args, Path(args.paired), KEEP_SPOT)
    shipped = shipped[shipped["lo"].notna() & shipped["hi"].notna()]  # a cell of one seed has no interval to check
    if "where" not in shipped:
        shipped = shipped.assign(where="search probe")
    shipped = shipped.assign(around=shipped["where"].astype(str) != "search probe")  # a stage-2 cell: on the budget
    cells = shipped[["method", "rank", "length", "around"]].drop_duplicates()
    around, probe = around_run(search), (lambda point: (search.probe_spec(*point), search.label(*point)))
    points = [((m, int(rank), int(n), sd), bool(a)) for _, (meth, rank, n, a) in cells.iterrows()
              for m in ("sft", meth) for sd in search.seeds]  # (point, a stage-2 cell?): a length can be both
    train_points(store, search, fs, points, stop, keep, t0, "spot", "of the shipped cells",
                 run_of=lambda item: (around if item[1] else probe)(item[0]))
    keep()
    if stop():
        print("stopped; run the same command to go on", flush=True)
        return 1
    restore(store, KEEP / search.id)  # the shipped seeds' points, for the pooled estimate beside each check
    every = points_table(store, search.id)
    df = every[every["seed"].isin(search.seeds)]
    inside = outside = 0
    checks = []
    print(f"\n## The shipped 95% intervals (seeds of {shown(args.paired)}) against seeds {list(search.seeds)}")
    for _, c in shipped.iterrows():
        here = df[(df["rank"] == c["rank"]) & (df["length"] == c["length"]) & (df["around"] == c["around"])]
        if c["measure"] == "steps":  # steps to exact recall: where both recalled, as the shipped table
            here = here[here["exact_recall"].astype(bool)]
        new = paired_differences(here, [c["measure"]]) if len(here) else pd.DataFrame()
        new = new[new["method"] == c["method"]] if len(new) else new
        where = f"{c['method']:<9} r{c['rank']} ℓ={c['length']:<4} {c['measure']:<15}"
        if new.empty:
            print(f"  {where} no pair of the new seeds to compare (not recalled by both?)")
            continue
        mean = float(new["mean"].iloc[0])
        ok = pd.notna(c["lo"]) and c["lo"] <= mean <= c["hi"]
        inside, outside = inside + ok, outside + (not ok)
        both = every[(every["rank"] == c["rank"]) & (every["length"] == c["length"]) & (every["around"] == c["around"])]
        if c["measure"] == "steps":
            both = both[both["exact_recall"].astype(bool)]
        pooled = paired_differences(both, [c["measure"]])
        pooled = pooled[pooled["method"] == c["method"]]
        pool = (f"; all {int(pooled['n'].iloc[0])} seeds: {float(pooled['mean'].iloc[0]):+.3f} "
                f"[{float(pooled['lo'].iloc[0]):+.3f}, {float(pooled['hi'].iloc[0]):+.3f}] {pooled['verdict'].iloc[0]}"
                if len(pooled) else "")
        print(f"  {where} new {mean:+9.3f} (n={int(new['n'].iloc[0])})  shipped [{c['lo']:+.3f}, {c['hi']:+.3f}]  "
              f"{'inside' if ok else 'OUTSIDE'}{pool}")
        checks.append({"method": c["method"], "rank": int(c["rank"]), "length": int(c["length"]),
                       "measure": c["measure"], "new_seeds": ",".join(map(str, search.seeds)), "new_mean": mean,
                       "new_n": int(new["n"].iloc[0]), "shipped_lo": c["lo"], "shipped_hi": c["hi"], "inside": bool(ok),
                       **({"pooled_n": int(pooled["n"].iloc[0]), "pooled_mean": float(pooled["mean"].iloc[0]),
                           "pooled_lo": float(pooled["lo"].iloc[0]), "pooled_hi": float(pooled["hi"].iloc[0]),
                           "pooled_verdict": pooled["verdict"].iloc[0]} if len(pooled) else {})})
    print(f"\n{inside} inside, {outside} outside the shipped intervals ({time.perf_counter() - t0:.0f} s). A shipped "
          "interval is one for the mean over its own seeds: a mean over other, fewer seeds strays outside it more "
          "often than 5% of the time, so read the pooled interval beside it.")
    if checks:
        table = Path(args.paired).with_name("long_context_spot.csv")
        pd.DataFrame(checks).to_csv(table, index=False)
        print(f"wrote {shown(table)}")
    return 0


def shipped_seeds(shipped: Path) -> tuple[int, ...]:
    """The seeds of the benchmark whose report wrote `shipped` (long_context.json beside it), else run's default."""
    return tuple(int(s) for s in _meta_of(shipped.with_name("long_context.json")).get("seeds") or (0, 1, 2))


def spot_seeds_problem(new, shipped) -> str | None:
    """Why `new` seeds cannot spot-check a table made with `shipped` seeds (none given, or some the same), else None."""
    if not new:
        return f"spot needs other seeds than the benchmark's own ({', '.join(map(str, shipped))}): e.g. --seeds 3 4"
    if same := sorted(set(new) & set(shipped)):
        return (f"seed{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} "
                f"{'are' if len(same) > 1 else 'is'} the benchmark's own (its seeds: {', '.join(map(str, shipped))}): "
                "a spot re-run needs other seeds")
    return None


def spot_setup(args: argparse.Namespace, shipped: Path, keep_root: Path):
    """(store, search, keep, stop, fs, t0) of a spot re-run of the report table `shipped` with other --seeds: its own
    store and kept folder (`keep_root`/<search id>, the new seeds' points only), and a note when these settings
    are not the shipped table's."""
    from kept import Keeper, StopOnSignal, restore

    from memcore.search import FrontierSearch

    store = open_home(args.home)
    search = settings(args)
    side = _meta_of(shipped.with_name("long_context.json"))
    if side.get("search") and side["search"] != search.id:
        print(f"note: these settings are search {search.id}, the shipped table's are {side['search']} "
              f"({side.get('command') or 'its command'}): the comparison holds only for the same settings",
              flush=True)
    args.keep = args.keep or keep_root / search.id
    t0 = time.perf_counter()
    print(f"spot re-run of {shown(shipped)} with seeds {list(search.seeds)}; {restore(store, args.keep)} points "
          f"read back from {shown(args.keep)}", flush=True)
    keep = Keeper(store, search.id, args.keep, "bench/bench_memft.py", sys.argv[1:], t0,
                  seeds=set(search.seeds))  # never the shipped seeds, read back into this store afterwards
    stop = StopOnSignal()
    return store, search, keep, stop, FrontierSearch(search, store, batch=args.batch, should_stop=stop), t0


def bracket_ends(frontier, methods, ranks) -> list[tuple[str, int, str, int]]:
    """(method, rank, 'lo' or 'hi', length) of both ends of every placed bracket (`settled`) in a report's frontier
    table, for these methods and ranks, in the table's order."""
    placed = frontier[frontier["settled"].astype(bool) & frontier["method"].isin(list(methods))
                      & frontier["rank"].isin(list(ranks)) & frontier["lo"].notna() & frontier["hi"].notna()]
    return [(r["method"], int(r["rank"]), end, int(r[end])) for _, r in placed.iterrows() for end in ("lo", "hi")]


def frontier_spot(df, ends, new_seeds, sft_placed, shipped_seeds=(0, 1, 2)) -> pd.DataFrame:
    """The frontier's spot check, one row per bracket end of `ends` (bracket_ends): the search's probes there
    (`df`: points_table; stage-2 points are not probes) recalled by `shipped_seeds` (the benchmark's) and by
    `new_seeds`; the recall probability there on the frontier fitted to the shipped seeds' points (p_fit, with its
    95% bootstrap band p_lo..p_hi) and whether the new count is a plausible draw from it (`inside`:
    memcore.frontier.recall_count_inside; None without new runs); and, per (method, rank), ℓ* refitted over every
    shipped point and every new one at the ends (`pooled_*`, tokens, 95% interval; the new seeds' other points and
    other seeds are left out, so the check stands on its own points) with its difference from sft's
    (`pooled_minus_sft*`, at the ranks in `sft_placed`, where sft's bracket is placed, as the report gives it),
    beside the shipped seeds' own (`shipped_*`). Every fit is memcore.frontier.frontier_from_table over a method's
    points, as the report fits it."""
    import pandas as pd

    from memcore.config import MemcoreError
    from memcore.frontier import frontier_from_table, recall_count_inside
    from memcore.law import as_bool

    at_ends = {(m, rank, length) for m, rank, _, length in ends}
    probe_at_end = pd.Series([(m, r, n) in at_ends and not a for m, r, n, a in
                              zip(df["method"], df["rank"], df["length"], df["around"].astype(bool))], index=df.index)
    df = df[df["seed"].isin(list(shipped_seeds)) | (df["seed"].isin(list(new_seeds)) & probe_at_end)]
    new = df["seed"].isin(list(new_seeds))
    recalled = as_bool(df["exact_recall"])
    methods = list(dict.fromkeys(["sft"] + [m for m, *_ in ends]))

    def fits(rows):
        out = {}
        for m in methods:
            try:
                out[m] = frontier_from_table(rows, m, RESAMPLES)[1] if m in set(rows["method"]) else None
            except MemcoreError:
                out[m] = None
        return out

    shipped, pooled = fits(df[~new]), fits(df)
    out = []
    for m, rank, end, length in ends:
        here = (df["method"] == m) & (df["rank"] == rank) & (df["length"] == length) & ~df["around"].astype(bool)
        row = {"method": m, "rank": rank, "end": end, "length": length,
               "shipped_recalled": int(recalled[here & ~new].sum()), "shipped_runs": int((here & ~new).sum()),
               "new_seeds": ",".join(map(str, new_seeds)), "new_recalled": int(recalled[here & new].sum()),
               "new_runs": int((here & new).sum()), "p_fit": None, "p_lo": None, "p_hi": None, "inside": None}
        if shipped[m] is not None:
            row["p_fit"], row["p_lo"], row["p_hi"] = shipped[m].recall_probability(rank, length)
            if row["new_runs"]:
                row["inside"] = recall_count_inside(row["new_recalled"], row["new_runs"], row["p_lo"], row["p_hi"])
        for kind, f in (("shipped", shipped), ("pooled", pooled)):
            if f[m] is None:
                continue
            row[f"{kind}_ell_star"] = float(f[m].ell_star(rank))
            row[f"{kind}_lo"], row[f"{kind}_hi"] = f[m].ell_star_interval(rank)
            if rank in sft_placed:
                row |= minus_sft(f, m, rank, prefix=f"{kind}_")
        out.append(row)
    return pd.DataFrame(out)


def spot_frontier(args: argparse.Namespace) -> int:
    """Train both ends of every placed bracket (at --ranks, for --methods) again with other --seeds, as the search's
    own probes (its plateau rule and budget), and say whether each end's new recall count is a plausible draw from
    the frontier fitted to the shipped seeds; then the frontier refitted over every seed and each method's ℓ* minus
    sft's (frontier_spot). Writes long_context_spot_frontier.csv beside the shipped frontier table."""
    import pandas as pd
    from kept import restore

    path = Path(args.paired).with_name("long_context_frontier.csv")
    frontier = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if frontier.empty:
        print(f"no shipped frontier table at {path} (spot --frontier reads the report's frontier table from the "
              "folder of --paired): run `bench_memft.py report --out DIR` first", file=sys.stderr)
        return 2
    ends = bracket_ends(frontier, args.methods, args.ranks)
    if not ends:
        placed = bracket_ends(frontier, frontier["method"].unique(), frontier["rank"].unique())
        print(f"no placed bracket in {shown(path)} at ranks {args.ranks} for {args.methods}; placed: "
              + (", ".join(sorted({f'{m} at rank {r}' for m, r, *_ in placed})) or "none yet"), file=sys.stderr)
        return 2
    store, search, keep, stop, fs, t0 = spot_setup(args, path, KEEP_SPOT_FRONTIER)
    points = [(m, rank, length, sd) for m, rank, _, length in ends for sd in search.seeds]
    train_points(store, search, fs, points, stop, keep, t0, "spot", "at the placed brackets' ends")
    keep()
    if stop():
        print("stopped; run the same command to go on", flush=True)
        return 1
    restore(store, KEEP / search.id)  # the shipped seeds' points: the fit they give, and the refit over all
    df = points_table(store, search.id)
    sft_placed = {rank for m, rank, *_ in bracket_ends(frontier, ["sft"], frontier["rank"].unique())}
    table = frontier_spot(df, ends, search.seeds, sft_placed, shipped_seeds(path))
    seeds = " ".join(map(str, search.seeds))
    print(f"\n## Each placed bracket's ends: seeds {seeds} against the frontier fitted to the shipped seeds (its "
          "recall probability there, 95% band; inside = the new count's exact interval meets the band)")
    for _, r in table.iterrows():
        p = "no fit" if pd_isna(r["p_fit"]) else f"P(recall) {r['p_fit']:.2f} [{r['p_lo']:.2f}, {r['p_hi']:.2f}]"
        verdict = "no new run" if pd_isna(r["inside"]) else "inside" if r["inside"] else "OUTSIDE"
        print(f"  {r['method']:<9} r{r['rank']} ℓ={r['length']:<4} ({r['end']})  shipped {r['shipped_recalled']} of "
              f"{r['shipped_runs']}  new {r['new_recalled']} of {r['new_runs']}  {p}  {verdict}")
    every = sorted(set(shipped_seeds(path)) | set(search.seeds))
    print(f"\n## ℓ* refitted over seeds {' '.join(map(str, every))} (the shipped seeds' own fit in brackets)")
    for (m, rank), r in table.groupby(["method", "rank"], sort=False):
        r = r.iloc[0]
        if pd_isna(r.get("pooled_ell_star")):
            continue
        line = (f"  {m:<9} r{rank} fitted ℓ* {r['pooled_ell_star']:.1f} [{r['pooled_lo']:.1f}, {r['pooled_hi']:.1f}]"
                + (f" (shipped {r['shipped_ell_star']:.1f} [{r['shipped_lo']:.1f}, {r['shipped_hi']:.1f}])"
                   if not pd_isna(r.get("shipped_ell_star")) else ""))
        if not pd_isna(r.get("pooled_minus_sft")):
            line += (f"; minus sft {r['pooled_minus_sft']:+.1f} [{r['pooled_minus_sft_lo']:+.1f}, "
                     f"{r['pooled_minus_sft_hi']:+.1f}] {r['pooled_minus_sft_verdict']}")
            if not pd_isna(r.get("shipped_minus_sft")):
                line += (f" (shipped {r['shipped_minus_sft']:+.1f} [{r['shipped_minus_sft_lo']:+.1f}, "
                         f"{r['shipped_minus_sft_hi']:+.1f}] {r['shipped_minus_sft_verdict']})")
        print(line)
    checked = table["inside"].dropna()
    print(f"\n{int(checked.sum())} of {len(checked)} ends inside ({time.perf_counter() - t0:.0f} s)")
    out = path.with_name("long_context_spot_frontier.csv")
    table.to_csv(out, index=False)
    print(f"wrote {shown(out)}")
    return 0


def point_order(x: tuple) -> tuple:
    """Sort key of a (method, rank, length, seed, ...) point: METHODS' order (others after), then rank, then seed."""
    return METHODS.index(x[0]) if x[0] in METHODS else len(METHODS), x[1], x[3]


def plateau_stops(points):
    """The rows of the report's points table that stopped on the plateau rule without recall."""
    return points[(points["stop_reason"] == "plateau") & ~points["exact_recall"].astype(bool)]


def window_points(points, seeds=None) -> list[tuple[str, int, int, int, int]]:
    """The points the plateau rule stopped nearest each frontier: per (method, rank), the not-recalled points that
    stopped on the plateau at the shortest such length (the bracket's upper end, where a cut that came too soon
    would move the frontier), of `seeds` when given. points: the report's points table (method, rank, length,
    seed, exact_recall, stop_reason, steps). Returns (method, rank, length, seed, the step it stopped at)."""
    p = plateau_stops(points)
    if seeds is not None:
        p = p[p["seed"].isin(seeds)]
    out = []
    for (m, rank), d in p.groupby(["method", "rank"], sort=False):
        at = d[d["length"] == d["length"].min()]
        out += [(m, int(rank), int(n), int(sd), int(st)) for n, sd, st in zip(at["length"], at["seed"], at["steps"])]
    return sorted(out, key=point_order)


def frontier_differences(fits, rows) -> dict[tuple[str, int], dict]:
    """(method, rank) -> minus_sft, minus_sft_lo, minus_sft_hi (tokens) and minus_sft_verdict ('more', 'fewer',
    'tie') of memcore.frontier.frontier_difference, for every method other than sft at the ranks where both its
    bracket and sft's are placed (rows: SearchResult.rows() with `settled`) and both have a fit."""
    placed = [(r["method"], r["rank"]) for r in rows if r.get("settled") and r.get("fitted_lo") is not None]
    out = {}
    for m, rank in placed:  # in the rows' order (the search's methods, then rank)
        if ("sft", rank) in placed and (d := minus_sft(fits, m, rank)):
            out[(m, rank)] = d
    return out


def minus_sft(fits, method: str, rank: int, prefix: str = "") -> dict:
    """{prefix}minus_sft, _lo, _hi (tokens) and _verdict of memcore.frontier.frontier_difference between `method`'s
    fit and sft's at `rank` (fits: method -> FrontierFit or None); empty for sft itself, a method without a fit, or
    fits without bootstrap resamples to compare."""
    from memcore.config import MemcoreError
    from memcore.frontier import frontier_difference

    if method == "sft" or fits.get(method) is None or fits.get("sft") is None:
        return {}
    try:
        d, lo, hi, verdict = frontier_difference(fits[method], fits["sft"], rank)
    except MemcoreError:
        return {}
    return {f"{prefix}minus_sft": d, f"{prefix}minus_sft_lo": lo, f"{prefix}minus_sft_hi": hi,
            f"{prefix}minus_sft_verdict": verdict}


def decisive_points(points, frontier, seeds: int) -> list[tuple[str, int, int, int, int]]:
    """The points whose verdict, if the plateau rule cut them short, would move a bracket: at each bracket's
    shortest length not recalled (hi), the seeds it stopped on the plateau without recall, where one of them
    recalling would bring that length to at least half the `seeds` (the search's majority: then hi is recalled
    and the frontier lies further out). A cut can only turn a failure into a recall, so the bracket's other end
    and lengths held by a wider margin cannot move. points: the report's points table (with around and
    stop_reason); frontier: its frontier table (method, rank, hi). Returns (method, rank, length, seed, the step
    it stopped at), as window_points."""
    probes = points[~points["around"].astype(bool)] if "around" in points else points
    out = []
    for _, b in frontier.iterrows():
        if b["hi"] != b["hi"]:  # no failure yet: nothing the rule stopped there
            continue
        at = probes[(probes["method"] == b["method"]) & (probes["rank"] == b["rank"])
                    & (probes["length"] == int(b["hi"]))]
        recalled = int(at["exact_recall"].astype(bool).sum())
        if recalled + 1 < seeds / 2:
            continue
        held = plateau_stops(at)
        out += [(b["method"], int(b["rank"]), int(n), int(sd), int(st))
                for n, sd, st in zip(held["length"], held["seed"], held["steps"])]
    return sorted(out, key=point_order)


def diverged_at(a, b) -> int | None:
    """The first step at which two runs' curves differ, over the steps both recorded: a and b are step rows (step,
    n_above, n_correct); None when they agree at every such step. Two copies of a point (same data, start and
    dropout stream) follow the same curve until the floating-point order of some sum differs (another thread count,
    another kernel), and from there their own ways."""
    mine = {x.step: (x.n_above, x.n_correct) for x in a}
    for x in b:
        if x.step in mine and mine[x.step] != (x.n_above, x.n_correct):
            return int(x.step)
    return None


def window_kind(recalled: bool, steps: int, stopped_at: int, split: int | None, have_copy: bool) -> str:
    """What a point trained on without the plateau rule says of the rule: 'held' (not recalled by the budget
    either), 'cut short' (recalled after the step the rule stopped the run's copy, on the same curve up to there:
    the rule cut a point that would have recalled), 'diverged' (recalled, but its curve left the copy's before that
    step, so it is the same point on another floating-point path, not the rule's doing), or 'recalled (no copy to
    compare)'. split: the step the two curves first differ (diverged_at), None if they never do."""
    if not recalled:
        return "held"
    if not have_copy:
        return "recalled (no copy to compare)"
    return "cut short" if (split is None or split > stopped_at) and steps > stopped_at else "diverged"


def window(args: argparse.Namespace) -> int:
    """Train the plateau-stopped points nearest each frontier again without the plateau rule (until recalled or
    --max-steps) and count how many go on to recall: the share of such points the window cut short, with a 95%
    Clopper-Pearson interval; each point's steps beyond its plateau stop and its longest wait for a new best."""
    from dataclasses import replace

    import pandas as pd
    from kept import Keeper, StopOnSignal, restore

    from memcore.frontier import end_of_budget_words, gained_after_stop, gained_words, stood_at_end, window_tally
    from memcore.search import FrontierSearch
    from memcore.train import waits_for_a_new_best

    table = Path(args.points)
    if not table.is_file():
        print(f"no points table at {table}: run `bench_memft.py report --out DIR` first", file=sys.stderr)
        return 2
    every = pd.read_csv(table)
    points = plateau_stops(every)
    if args.decisive:
        front = table.with_name("long_context_frontier.csv")
        if not front.is_file():
            print(f"no frontier table at {front} beside {table}: run `bench_memft.py report --out DIR` first",
                  file=sys.stderr)
            return 2
        seeds = int(every.groupby(["method", "rank", "length"])["seed"].nunique().max())  # the search's seeds
        chosen = decisive_points(every, pd.read_csv(front), seeds)
        chosen = [c for c in chosen if not args.seeds or c[3] in args.seeds]
    else:
        chosen = window_points(points, set(args.seeds) if args.seeds else None)
    chosen = [c for c in chosen if c[0] in args.methods and c[1] in args.ranks]  # --methods, --ranks choose which
    if not chosen:
        print(f"no point in {shown(table)} stopped on the plateau without recall: nothing to check")
        return 0
    args.seeds = sorted({sd for *_, sd, _ in chosen})
    store = open_home(args.home)
    main = settings(args)
    search = replace(main, name=f"{main.id}-window")  # its own sweep: never taken for the run's points

    def run_of(point):  # the run's probe, with the plateau rule dropped: until recalled or the budget
        spec = main.probe_spec(*point)
        return replace(spec, train=replace(spec.train, until="budget")), search.label(*point)

    args.keep = args.keep or KEEP_WINDOW / search.id
    t0 = time.perf_counter()
    print(f"the plateau rule against {len(chosen)} points it stopped (from {shown(table)}), trained again without it "
          f"up to {args.max_steps} steps; {restore(store, args.keep)} points read back from {shown(args.keep)}",
          flush=True)
    keep = Keeper(store, search.id, args.keep, "bench/bench_memft.py", sys.argv[1:], t0)
    stop = StopOnSignal()
    fs = FrontierSearch(search, store, batch=args.batch, should_stop=stop)
    train_points(store, search, fs, [c[:4] for c in chosen], stop, keep, t0, "window", "without the rule",
                 run_of=run_of)
    if stop():
        print(keep.ended(stopped=True), flush=True)
        return 1
    print(keep.ended(stopped=False), flush=True)
    done = {r["label"]: r for r in store.runs(sweep=search.id, status="completed")}
    with tempfile.TemporaryDirectory() as d:  # the run's own copies of the points, to compare curves with
        ran = open_home(Path(d))
        restore(ran, args.run_keep or KEEP / main.id)
        theirs = {r["label"]: ran.steps(r["id"]) for r in ran.runs(sweep=main.id, status="completed")}
    rows = []
    print(f"\n## The plateau rule ({args.plateau_window} steps without a new best) against the same points trained "
          f"on without it")
    stops = {main.label(m, int(rank), int(n), int(sd)): (m, int(rank), int(n), int(sd), int(st))
             for m, rank, n, sd, st in zip(points["method"], points["rank"], points["length"], points["seed"],
                                           points["steps"])}
    earlier = [stops[lab] for lab in done if lab in stops and stops[lab] not in chosen]  # checked by an earlier call
    at = [points[c] if c in points else [None] * len(points) for c in ("delta_loss", "token_accuracy", "frac_above")]
    at_stop = {main.label(m, int(rank), int(n), int(sd)): (dl, acc, above)  # the run's copy where the rule stopped it
               for m, rank, n, sd, dl, acc, above in zip(points["method"], points["rank"], points["length"],
                                                         points["seed"], *at)}
    for m, rank, n, sd, stopped_at in chosen + earlier:
        r = done.get(search.label(m, rank, n, sd))
        if r is None:
            continue
        s = r["summary"]
        mine = store.steps(r["id"])
        waits, _ = waits_for_a_new_best((x.step, x.n_above, x.n_correct) for x in mine)
        label = main.label(m, rank, n, sd)
        split = diverged_at(theirs[label], mine) if label in theirs else None
        same = label in theirs and (split is None or split > stopped_at)
        kind = window_kind(bool(s.exact_recall), int(s.steps), stopped_at, split, label in theirs)
        rows.append({"method": m, "rank": rank, "length": n, "seed": sd, "window": args.plateau_window,
                     "plateau_stop": stopped_at,
                     "recalled": bool(s.exact_recall), "steps": int(s.steps), "stop_reason": s.stop_reason,
                     "longest_wait": max(waits, default=0), "frac_above": s.n_above / s.n_tokens,
                     "token_accuracy": s.token_accuracy, "diverged_at": split, "kind": kind,
                     "delta_loss": s.delta_loss, "stop_delta_loss": at_stop[label][0],
                     "stop_token_accuracy": at_stop[label][1], "stop_frac_above": at_stop[label][2],
                     **stood_at_end(mine, args.plateau_window)})  # the rows read above, not read again
        path = ("the same curve as the run's copy up to its stop" if same else
                f"its curve left the run's copy's at step {split}" if split is not None else "no copy to compare")
        print(f"  {m:<9} r{rank} ℓ={n:<4} seed {sd}: stopped by the rule at step {stopped_at}; without it "
              + (f"recalled at step {s.steps}" if s.exact_recall else f"not recalled by step {s.steps} "
                 f"({s.stop_reason}; {s.token_accuracy:.1%} of tokens argmax-right)")
              + f"; {path}; longest wait for a new best {max(waits, default=0)} steps: {kind}")
    df = pd.DataFrame(rows)
    if df.empty:
        return 0
    t = window_tally(df)
    k, n, cut = t.recalled, t.n, t.cut
    print(f"\n{k} of {n} points the rule stopped recalled without it. {cut} of {n} were cut short by the rule (the "
          f"same curve up to its stop, recalled after it; 95% Clopper-Pearson interval on the share the rule cuts "
          f"there: {t.cut_lo:.0%}-{t.cut_hi:.0%})"
          + (f"; {k - cut} recalled on a diverged path (the same point, data and start, whose curve left the run's "
             "copy's before its stop: near the frontier a verdict turns on floating-point order)" if k - cut else "")
          + f". {time.perf_counter() - t0:.0f} s")
    gained = gained_after_stop(df)
    if len(gained):
        print(f"From the rule's stop to the budget, the points held (not recalled either way) gained: "
              f"{gained_words(gained)}.")
    held = df[~df["recalled"].astype(bool)]
    if len(held):
        print(f"Where the held points stood at the {args.max_steps}-step budget:")
        print("\n".join(end_of_budget_words(held, args.plateau_window)))
    out = table.with_name("long_context_window.csv")
    df.to_csv(out, index=False)
    print(f"wrote {shown(out)}")
    return 0


def report(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from kept import restore

    from memcore.frontier import (
        end_of_budget,
        end_of_budget_words,
        gained_after_stop,
        gained_words,
        paired_differences,
        window_tally,
    )
    from memcore.law import comparable_settings
    from memcore.search import FrontierSearch, search_result

    store = open_home(args.home)
    search = settings(args)
    args.keep = args.keep or KEEP / search.id
    restore(store, args.keep)
    fs = FrontierSearch(search, store, batch=1)
    fs.read()  # every verdict already in the store: nothing trained
    result = search_result(fs, fs.progress(), RESAMPLES)
    df = points_table(store, search.id)
    if not df.empty:
        df = df[df["seed"].isin(search.seeds)]  # a spot re-run's other seeds are not this table's
    if df.empty:
        print(f"no completed points of search {search.id} (the settings given: report takes the same settings flags "
              f"as run) in {args.home} or {args.keep}: run `bench_memft.py run` first.{kept_searches(KEEP)}")
        return 1
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    print(f"search {search.id}: {len(df)} completed points ({df['steps'].sum()} steps)")

    rows = result.rows()
    unsettled = set(still_open(fs))
    within = f"{search.resolution:.0%}"
    print(f"\n## ℓ*(r) per method: the longest length recalled by at least half the seeds and the shortest not, "
          f"{'placed within ' + within if not unsettled else 'so far (not yet within ' + within + ')'}; "
          "the recall rate over the seeds at each end; bits per parameter there (against 2, Allen-Zhu & Li, and "
          "3.6, Morris et al.)")
    for r in rows:
        r |= probing_of(fs, r["method"], r["rank"])
        r["settled"] = f"{r['method']}/r{r['rank']}" not in unsettled
        if not r["settled"]:  # no fit through brackets still moving (it once put memft-sw's ℓ*(2) at 47,001 tokens):
            fit = result.fits.get(r["method"])  # at the longest recalled so far, a lower bound
            per_token = fit.capacity_bits_per_token if fit is not None else None
            r["fitted_ell_star"] = r["fitted_interval"] = None
            r["bits_per_param"] = (r["lo"] * per_token / (r["rank"] * fit.p_eff_per_rank)
                                   if per_token and fit.p_eff_per_rank and r["lo"] else None)
    for r in rows:  # the fitted ℓ* with its 95% interval, and each method's minus sft's where both are placed
        ci = r.pop("fitted_interval", None)
        r["fitted_lo"], r["fitted_hi"] = (float(ci[0]), float(ci[1])) if ci else (None, None)
    diffs = frontier_differences(result.fits, rows)
    for r in rows:
        r |= diffs.get((r["method"], r["rank"]), {})
    fr = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, list | tuple | dict)} for r in rows])
    for r in rows:
        words = bracket_words(r["lo"], r["hi"], r["lo_rate"], r["hi_rate"],
                              seeds=(r["lo_seeds"], r["hi_seeds"], len(search.seeds)))
        words += training_words(r, f"{r['probing']} tokens")
        bpp = r.get("bits_per_param")
        print(f"  {r['method']:<9} rank {r['rank']}: {words}"
              + ("" if bpp is None else f"; {bpp:.3f} bits/param" if r["settled"] else
                 f"; at least {bpp:.3f} bits/param (at {r['lo']} tokens)")
              + (f"; fitted ℓ* {r['fitted_ell_star']:.1f} [{r['fitted_lo']:.1f}, {r['fitted_hi']:.1f}]"
                 if r.get("fitted_lo") is not None else ""))
    print("  (fitted ℓ*: P(recalled) = σ(k·(a + γ ln r − ln ℓ)) by maximum likelihood over every probe of the "
          "method, each run a draw, with a 95% bootstrap interval; only where the bracket is placed)")
    if diffs:
        print("\n## ℓ* method − sft, tokens (the fitted frontiers; 95% bootstrap interval of the difference, the two "
              "methods' resamples independent)")
        for (m, rank), d in diffs.items():
            print(f"  {m:<9} rank {rank}: {d['minus_sft']:+6.1f} [{d['minus_sft_lo']:+6.1f}, "
                  f"{d['minus_sft_hi']:+6.1f}]  {d['minus_sft_verdict']}")

    ref = reference_lengths(fs.placed())  # a rank's stage 2 trains once sft's frontier there is placed
    df["where"] = [_where(rank, n, ref) if a else "" for rank, n, a in zip(df["rank"], df["length"], df["around"])]
    stage2 = df[df["around"] & (df["where"] != "")]
    probes = df[~df["around"] & df["exact_recall"].astype(bool)]
    tables = []
    if len(probes):
        print("\n## Steps to exact recall on the search's probes, method − sft on the same seeds (where both recalled; "
              "mean, 95% paired-t interval)")
        on_probes = paired_differences(probes, ["steps"]).assign(where="search probe")
        tables.append(on_probes)
        for _, r in on_probes.iterrows():
            print(f"  {r['method']:<9} r{r['rank']} ℓ={r['length']:<4} {r['mean']:+8.1f} {interval(r, '+8.1f')}  "
                  f"({r['method_mean']:.1f} vs {r['baseline_mean']:.1f} steps, {seeds_word(r['n'])})  {r['verdict']}")
    print("\n## Paired differences around sft's frontier (stage 2: 0.5, 1.5 and 2 times its ℓ*, every method trained "
          f"until recalled or the common {args.max_steps}-step budget), method − sft on the same seeds and data "
          "(mean, 95% paired-t interval)")
    if stage2.empty:
        print("  none yet: a rank's points train once sft's frontier there is placed")
    measures = {"below": ["steps", "exact_recall"],
                "past": ["token_accuracy", "frac_above", "verbatim_prefix", "delta_loss"]}
    for kind, cols in measures.items():
        d = stage2[stage2["where"].str.startswith("0.5") == (kind == "below")]
        if d.empty:
            continue
        t = paired_differences(d, cols, by=("rank", "length", "where"))
        tables.append(t)
        for _, r in t.iterrows():
            print(f"  {r['method']:<9} r{r['rank']} ℓ={r['length']:<4} ({r['where']:>6}) {r['measure']:<15} "
                  f"{r['mean']:+9.3f} {interval(r, '+9.3f')}  ({r['method_mean']:.3f} vs {r['baseline_mean']:.3f}, "
                  f"{seeds_word(r['n'])})  {r['verdict']}")
    past = stage2[~stage2["where"].str.startswith("0.5") & ~stage2["exact_recall"].astype(bool)]
    ends = end_of_budget(store, past["run_id"], args.plateau_window)
    df = df.join(ends, on="run_id") if len(ends) else df.assign(open_wait=np.nan, late_delta_loss=np.nan,
                                                                 on_plateau=np.nan)
    if len(ends):
        print(f"  Past the frontier, where the points stood at the {args.max_steps}-step budget (the rule's "
              f"{args.plateau_window}-step window read at the end):")
        print("\n".join(end_of_budget_words(df, args.plateau_window)))
    if len(stage2) and not any(len(t) and (t["where"] != "search probe").any() for t in tables):
        print(f"  {points_word(len(stage2))} so far ("
              + ", ".join(f"{m} r{rank} at {n} tokens ×{len(g)}" for (m, rank, n), g in
                          stage2.groupby(["method", "rank", "length"], sort=False))
              + "): no other method beside sft on the same seeds yet, so nothing to pair")
    paired = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()

    open_ = still_open(fs)
    stage2 = stage2_left(search, fs, store)
    if not open_ and not stage2:
        state = "complete"
    else:
        parts = ([f"{len(open_)} frontier{'s' if len(open_) != 1 else ''} not yet placed within "
                  f"{search.resolution:.0%} with every seed at both ends ({', '.join(open_)})"] if open_ else []) \
            + ([f"{points_word(len(stage2))} of stage 2 still to train (at "
                + " and ".join(f"{f:g} × sft's ℓ*" for f in sorted({f for _, f in stage2})) + ")"] if stage2 else [])
        left = to_go(fs, ledger_of(args.keep), df, stage2, past_steps=args.max_steps)
        state = f"interim: {' and '.join(parts)}; {left}"
    rule = plateau_rule_check(store, df, args.plateau_window)
    print(f"\n## The plateau rule against the curves (a point stops after {args.plateau_window} steps without a new "
          "best in tokens above τ or argmax-right tokens)")
    for _, r in rule.iterrows():
        print(f"  {r['method']:<9} {r['points']:>3} points ran on to recall or the budget: the longest wait for a new "
              f"best {r['longest_wait']} steps ({r['longest_before_recall']} on one that went on to recall; a point's "
              f"longest: median {r['median_longest']:.0f}; past half the window in {r['over_half']} of "
              f"{r['points']}); {r['cut_short']} would have been cut short by the window. "
              f"{points_word(r['plateau_stops'])} stopped on it; of {r['failed']} not recalled, "
              f"{r['budget_stops']} ran out of the {args.max_steps}-step budget instead.")
    print("  (Points trained under a window run on only while every wait is shorter than it, so these curves bound "
          "how near the tail comes to it, and a shorter --plateau-window here asks what that one would have cut; "
          "whether the window cut points that would have recalled is what `bench_memft.py window` measures, by "
          "training the points it stopped again without it.)")
    checked = (out or ROOT / "sample_data" / "paper") / "long_context_window.csv"
    if checked.is_file():
        w = pd.read_csv(checked)
        t = window_tally(w)
        late = [f"{m} r{rank} ℓ={ell} seed {sd} (stopped at step {a}, recalled at {b}: {kind})"
                for m, rank, ell, sd, a, b, kind in zip(w["method"], w["rank"], w["length"], w["seed"],
                                                        w["plateau_stop"], w["steps"], t.kinds) if kind != "held"]
        print(f"  The window check ({shown(checked)}): {t.recalled} of {t.n} points the rule stopped nearest a "
              f"frontier recalled without it, {t.cut} of them cut short by the rule (95% Clopper-Pearson interval on "
              f"the share it cuts there: {t.cut_lo:.0%}-{t.cut_hi:.0%}){': ' + ', '.join(late) if late else ''}.")
        gained = gained_after_stop(w)
        if len(gained):
            print(f"  From the rule's stop to the {args.max_steps}-step budget, the points it held (not recalled "
                  f"either way) gained: {gained_words(gained)}. Fidelity past the frontier, read where the rule "
                  "stops, may understate a method by about that much.")

    print("\n## The law past the frontier (points not recalled: stage 2's, all trained to the common "
          f"{args.max_steps}-step budget as the paper's runs are, once a method has enough; until then the search's "
          "failed probes that stopped on a plateau)")
    lines, law = law_past_frontier(df, search.methods, args.max_steps)
    print("\n".join(lines))
    print(f"\n{state}")
    if out:
        df.drop(columns=["run_id"]).to_csv(out / "long_context_points.csv", index=False)
        fr.to_csv(out / "long_context_frontier.csv", index=False)
        paired.to_csv(out / "long_context_paired.csv", index=False)
        law.to_csv(out / "long_context_law.csv", index=False)
        rule.to_csv(out / "long_context_plateau_rule.csv", index=False)
        ledger = ledger_of(args.keep)
        side = {"search": search.id, "settings": comparable_settings(search.template), "ranks": list(search.ranks),
                "methods": list(search.methods), "seeds": list(search.seeds), "resolution": search.resolution,
                "points": int(len(df)), "steps": int(df["steps"].sum()), "state": state,
                "plateau_window": args.plateau_window,
                "command": ledger.get("command"), "wall_s": ledger.get("wall_s"), "as_of": as_of(),
                "note": f"{len(df)} points of search {search.id}, seeds {', '.join(map(str, search.seeds))}, "
                        f"{hours_of(ledger.get('wall_s'))} of training on this CPU, as of {as_of()}"}
        (out / "long_context.json").write_text(json.dumps(side, indent=2) + "\n")
        print(f"\nwrote {out}/long_context_{{points,frontier,paired,law,plateau_rule}}.csv and long_context.json")
    return 0


LAW_COLUMNS = ["method", "points", "form", "C", "alpha", "alpha_lo", "alpha_hi", "beta", "beta_lo", "beta_hi",
               "alpha_over_beta", "alpha_over_beta_lo", "alpha_over_beta_hi", "b", "r2", "fitted_on", "regime"]


def law_past_frontier(df, methods, budget: int = 2000) -> tuple[list[str], pd.DataFrame]:
    """The law per method on its points past the frontier (not recalled), as the paper fits it. Once stage 2 gives a
    method 6 or more past the frontier on a grid that identifies α and β (memcore.law.grid_problem: 4+ (rank, length)
    cells, not one length per rank, which 1.5 × ℓ* alone at every rank would be), on those alone: every method trained
    the same `budget` steps there, as the paper's runs are, so memcore.law.fit_all fits them all and its regime says
    they stopped at the budget. Until then on the search's failed probes, where fit_all takes the ones that stopped on a
    plateau short of saturation when there are 6 or more (else says which it fell back to). df: the report's points
    (method, rank, length, delta_loss in nats per token, exact_recall, stop_reason, around). Returns the report's lines
    and one row per fitted method (LAW_COLUMNS: the power law's C, α and β with 95% intervals, b, R², the points, which
    ones, and the regime); a method with fewer than 6 such points on such a grid, or whose fit fails, gets a line saying
    why."""
    import pandas as pd

    from memcore.config import MemcoreError
    from memcore.law import fit_all, grid_problem

    def enough(d):  # 6 points on a grid that identifies α and β (not one length per rank: memcore.law.grid_problem)
        return len(d) >= 6 and grid_problem(d["rank"], d["length"]) is None

    lines, rows = [], []
    around = df["around"].astype(bool) if "around" in df else pd.Series(False, index=df.index)
    past = df[~df["exact_recall"].astype(bool)]
    for m in methods:
        mine = past[past["method"] == m]
        d = mine[around[mine.index]]
        which = f"stage 2's points past the frontier, every one trained to recall or the {budget}-step budget"
        if not enough(d):
            d = mine[~around[mine.index]]
            which = ("the search's failed probes (stage 2's points past the frontier are fewer than 6 so far, or "
                     "on fewer than 4 (rank, length) cells, or one length per rank)")
        if not enough(d):
            lines.append(f"  {m}: {points_word(len(d))} not recalled: too few to fit (need 6 on at least 4 (rank, "
                         "length) cells, 2+ ranks and 2+ lengths, not one length per rank)")
            continue
        try:
            fits = fit_all(d)
        except MemcoreError as e:
            lines.append(f"  {m}: {points_word(len(d))} not recalled: no fit ({e})")
            continue
        f, p, ci = fits.main, fits.main.params, fits.main.intervals
        form = (f"ΔL = {p['C']:.3g}·r^{p['alpha']:.3f}·ℓ^-{p['beta']:.3f} + {p['b']:.3g}" if f.form == "power" else
                f"ΔL = {p['M']:.3g}·(1 − exp(−{p['C']:.3g}·r^{p['alpha']:.3f}·ℓ^-{p['beta']:.3f}))")
        ratio = f.alpha_over_beta or (math.nan, math.nan, math.nan)
        exchange = ("" if f.alpha_over_beta is None else
                    f", α/β {ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}] (at equal ΔL ℓ ∝ r^(α/β): doubling the "
                    f"rank reaches {2 ** ratio[0]:.2f}× the tokens)")
        lines.append(f"  {m}: {form}; α {_ci(f, 'alpha')}, β {_ci(f, 'beta')}{exchange}, R² {f.r2:.3f}; on {which}: "
                     f"{fits.fitted_on}; "
                     f"the data prefer the {fits.preferred} form{'' if fits.clear_preference else ' (not clearly)'}; "
                     f"{(fits.fitted_regime or fits.regime).describe()} (of the points fitted)"
                     + "".join(f"; note: {n}" for n in f.notes))
        rows.append({"method": m, "points": f.n, "form": f.form, "C": p.get("C"), "alpha": p["alpha"],
                     "alpha_lo": ci["alpha"][0], "alpha_hi": ci["alpha"][1], "beta": p["beta"],
                     "beta_lo": ci["beta"][0], "beta_hi": ci["beta"][1], "alpha_over_beta": ratio[0],
                     "alpha_over_beta_lo": ratio[1], "alpha_over_beta_hi": ratio[2], "b": p.get("b"), "r2": f.r2,
                     "fitted_on": f"{which}: {fits.fitted_on}", "regime": (fits.fitted_regime or fits.regime).label})
    return lines, pd.DataFrame(rows, columns=LAW_COLUMNS)


def plateau_rule_check(store, df, window: int):
    """Per method, over the points that did not stop on the plateau rule (they ran on to recall or the budget, so
    their whole curve is known): how long they waited for a new best in tokens above τ or argmax-right tokens
    (memcore.train.waits_for_a_new_best), and how many a window of `window` steps would have stopped before a later
    gain. Returns a DataFrame: method, points, longest_wait (steps, over every point), longest_before_recall
    (over the points that went on to recall: a wait the window must not cut, or the verdict changes),
    median_longest (the median over points of each point's longest wait), over_half (points whose longest wait
    passed half the window: how near the tail comes to it), cut_short, plateau_stops, and of the points not
    recalled (failed) how many ran out of the step budget instead (budget_stops: still improving, so their length
    is not shown to be past what the adapter can hold, only past what the budget reaches)."""
    import numpy as np
    import pandas as pd

    from memcore.train import waits_for_a_new_best

    rows = []
    for m, d in df.groupby("method", sort=False):
        longest, recalled = [], []
        ran_on = d[d["stop_reason"] != "plateau"]
        failed = ~d["exact_recall"].astype(bool)
        for rid, ok in zip(ran_on["run_id"], ran_on["exact_recall"].astype(bool)):
            w, _ = waits_for_a_new_best((s.step, s.n_above, s.n_correct) for s in store.steps(rid))
            longest.append(max(w, default=0))
            if ok:
                recalled.append(longest[-1])
        rows.append({"method": m, "points": len(ran_on), "longest_wait": max(longest, default=0),
                     "longest_before_recall": max(recalled, default=0),
                     "median_longest": float(np.median(longest)) if longest else 0.0,
                     "over_half": sum(x > window / 2 for x in longest),
                     "cut_short": sum(x > window for x in longest),
                     "plateau_stops": int((d["stop_reason"] == "plateau").sum()),
                     "failed": int(failed.sum()),
                     "budget_stops": int((failed & (d["stop_reason"] == "max_steps")).sum())})
    return pd.DataFrame(rows)


def probing_of(fs, method: str, rank: int) -> dict:
    """The length a bracket of a FrontierSearch (its verdicts read) waits on, with the seeds back on it and how many
    of them recalled it: probing, probing_back, probing_recalled (None, 0, 0 when it waits on none)."""
    length = fs.waiting.get((method, rank))
    b = next(b for b in fs.brackets if (b.method, b.rank) == (method, rank))
    got = b.probed.get(length, {}) if length is not None else {}
    return {"probing": length, "probing_back": len(got), "probing_recalled": int(sum(got.values()))}


def training_words(r: dict, what: str) -> str:
    """'; <what> in training (k of n seeds back recalled it)' for a row with probing_of's fields, '' when the
    bracket waits on no length."""
    if r["probing"] is None:
        return ""
    back = r["probing_back"]
    return f"; {what} in training" + (f" ({r['probing_recalled']} of {seeds_word(back)} back recalled it)"
                                      if back else "")


def as_of() -> str:
    """Now, as the tables' JSON says when they were written (UTC, to the minute)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def interval(r, fmt: str) -> str:
    """A paired row's 95% interval as '[lo, hi]', or 'no interval' when one seed is all there is."""
    if pd_isna(r["lo"]) or pd_isna(r["hi"]):
        return "(no interval)"
    return f"[{r['lo']:{fmt}}, {r['hi']:{fmt}}]"


def pd_isna(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def seeds_word(n) -> str:
    return f"{int(n)} seed{'s' if int(n) != 1 else ''}"


def points_word(n) -> str:
    return f"{int(n)} point{'s' if int(n) != 1 else ''}"


ONE = {"tokens": "token", "entries": "entry"}


def bracket_words(lo, hi, lo_rate, hi_rate, unit: str = "tokens", seeds: tuple[int, int, int] | None = None) -> str:
    """A bracket as a reader reads it: both ends with the recall rate over the seeds at each, or the bound known so
    far, or 'not probed yet'. seeds: (seeds with a verdict at lo, at hi, seeds searched), to say where an end's
    rate is over fewer seeds so far (the search trains an end's other seeds when its bracket closes)."""
    def rate(x, n):
        if x is None:
            return "—"
        if seeds is None or n is None:
            return f"{float(x):.0%} of the seeds"
        return f"{round(float(x) * n)} of {seeds_word(n)}" + (" so far" if n < seeds[2] else "")

    n_lo, n_hi = (seeds[0], seeds[1]) if seeds else (None, None)
    if lo is not None and hi is not None:
        return (f"ℓ* between {lo} and {hi} {unit} (recalled by {rate(lo_rate, n_lo)} at {lo}, {rate(hi_rate, n_hi)} "
                f"at {hi})")
    if lo is not None:
        return f"ℓ* ≥ {lo} {unit} (recalled by {rate(lo_rate, n_lo)} at {lo}; nothing longer has failed)"
    if hi is not None and hi <= 1:
        return f"nothing recalled, not even 1 {ONE.get(unit, unit)} ({rate(hi_rate, n_hi)} recalled it)"
    if hi is not None:
        return f"ℓ* < {hi} {unit} (recalled by {rate(hi_rate, n_hi)} at {hi}; nothing shorter was recalled)"
    return "not probed yet"


def kept_searches(folder: Path) -> str:
    """A line per search kept under `folder`: its id and the command that made it (so a report can be pointed at
    it), or '' when none."""
    found = [f"\n  {d.name}: {ledger_of(d).get('command', '(no command kept)')}" for d in sorted(Path(folder).glob("*"))
             if d.is_dir() and (d / "kept.json").is_file()]
    return ("\nKept searches, each reported by its own command's settings:" + "".join(found)) if found else ""


def still_open(fs) -> list[str]:
    """'method/rN' of every bracket of a FrontierSearch (its verdicts read) with a probe still to train."""
    return [f"{b.method}/r{b.rank}" for b in fs.unsettled()]


def to_go(fs, ledger: dict, done, stage2=(), unit: str = "token", past_steps: float | None = None) -> str:
    """'between A and B probes (and N points beside them) to go (about X-Y h at this search's pace so far ...)', or
    'the search's probes done, the N points to go (...)' once no probe is left, for a
    FrontierSearch whose verdicts are read, `done` its completed points (a DataFrame with length, steps and
    exact_recall), `stage2` the (length, factor) of other points still to train. '' when nothing is left.

    A point's cost is taken as its length × its steps (a step's compute grows with the tokens it trains on), at
    the kept wall time (seconds) over the completed points' length-steps. A probe to come costs what the points at
    the open brackets' ends cost; another point, its length × `past_steps` (default: the mean steps of the points
    not recalled) past the frontier (factor above 1), or × the mean steps of the points recalled below it. Points
    in training when the time was kept count as nothing done, so the pace errs slow."""
    fewest, most = fs.progress().probes_left
    if most == 0 and not len(stage2):
        return ""
    count = f"{fewest} probes" if fewest == most else f"between {fewest} and {most} probes"
    if len(stage2):
        count = ("the search's probes done, those points" if most == 0
                 else f"{count} and {points_word(len(stage2))} beside them")
    wall = ledger.get("wall_s")
    if done is None or not len(done) or not wall:
        return f"{count} to go"
    cost = done["length"].astype(float) * done["steps"].astype(float)
    pace = float(wall) / float(cost.sum())  # seconds per length-step
    ends = [(b.method, b.rank, end) for b in fs.unsettled() for end in (b.lo, b.hi) if end is not None]
    at_ends = cost[[(m, r, n) in ends for m, r, n in zip(done["method"], done["rank"], done["length"])]]
    probe = float((at_ends if len(at_ends) else cost).mean())
    recalled = done["exact_recall"].astype(bool)
    steps_past = past_steps if past_steps is not None else float(done.loc[~recalled, "steps"].mean()) \
        if (~recalled).any() else float(done["steps"].mean())
    steps_below = float(done.loc[recalled, "steps"].mean()) if recalled.any() else float(done["steps"].mean())
    others = sum(n * (steps_past if f > 1 else steps_below) for n, f in stage2)
    lo, hi = (fewest * probe + others) * pace / 3600, (most * probe + others) * pace / 3600
    overall = (f"about {hours_span(lo, hi)} at this search's pace so far: {pace * 1000:.2f} s per 1,000 {unit}-steps "
               f"on this CPU, a point costing its length × its steps")
    now = recent_pace(ledger)
    if now is None:
        return f"{count} to go ({overall})"
    rate, hours = now
    f = rate / pace
    return (f"{count} to go (about {hours_span(lo * f, hi * f)} at the pace of the latest runs, {rate * 1000:.2f} s "
            f"per 1,000 {unit}-steps over their last {hours:.1f} h; {overall}, restarts, work cut off and a shared "
            "machine included)")


def hours_span(lo: float, hi: float) -> str:
    """'15-17 h', or '15 h' when the two round alike."""
    return f"{lo:.0f} h" if f"{lo:.0f}" == f"{hi:.0f}" else f"{lo:.0f}-{hi:.0f} h"


def recent_pace(ledger: dict, least_s: float = 3 * 3600.0) -> tuple[float, float] | None:
    """(seconds per length-step, hours it is read over) of the latest invocations in kept.json's `recent` list
    (bench/kept.py Ledger): their wall over the length × steps their points advanced, going back from the last
    one until at least `least_s` seconds; None when those hold less (or no work recorded). Three hours by
    default, so one short invocation that shared the machine with a test run does not set the pace alone."""
    wall = work = 0.0
    for r in reversed([r for r in ledger.get("recent", []) if isinstance(r, dict)]):
        w, k = float(r.get("wall_s") or 0), float(r.get("work") or 0)
        if k <= 0:
            continue
        wall, work = wall + w, work + k
        if wall >= least_s:
            break
    return (wall / work, wall / 3600) if wall >= least_s and work > 0 else None


def shown(path) -> str:
    """A path as the repository names it when it lies inside, else as given."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _meta_of(path: Path) -> dict:
    """A JSON file beside the tables (long_context.json, kept.json) as a dict, {} when missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def ledger_of(folder: Path) -> dict:
    """The kept points' kept.json (command, wall_s, invocations), {} when there is none."""
    return _meta_of(Path(folder) / "kept.json")


def hours_of(seconds) -> str:
    return "an unknown time" if seconds is None else f"{seconds / 3600:.1f} h"


def _where(rank: int, length: int, ref: dict[int, float]) -> str:
    """'0.5ℓ*', '1.5ℓ*', '2ℓ*' for a stage-2 length of this rank, '' otherwise."""
    ell = ref.get(rank)
    for f in AROUND:
        if ell is not None and length == max(1, round(f * ell)):
            return f"{f:g}ℓ*"
    return ""


def _ci(fit, name: str) -> str:
    ci = fit.intervals.get(name)
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(no interval)"


def compare(args: argparse.Namespace) -> int:
    """Each method against sft at equal steps on a sweep table: per (method, rank, length) cell the seed means, the
    cells where MemFT does not win marked, then the overall means and ratios (no intervals: see `report`)."""
    from memcore.frontier import method_comparison
    from memcore.law import read_law_csv

    df = read_law_csv(args.csv)
    cells, overall = method_comparison(df, "sft")
    seeds = df.groupby(["method", "rank", "length"]).size().min()
    print(f"{args.csv}: {len(df)} points, at least {seeds} seed(s) per cell; both methods get the same step budget "
          "(a point run --until converged stops earlier once converged: 'steps' is what it used)")
    print(f"{'method':<9} {'rank':>4} {'len':>5} | {'recall':>6} {'sft':>6} | {'tok acc':>7} {'sft':>6} | "
          f"{'prefix':>6} {'sft':>6} | {'steps':>5} {'sft':>5} | wins")

    def pair(r, c: str, f: str) -> str:
        return f"{r[c]:{f}} {r[c + '_sft']:{f}}" if c in r else f"{'-':>6} {'-':>6}"

    for _, r in cells.iterrows():
        print(f"{r['method']:<9} {r['rank']:>4} {r['length']:>5} | {pair(r, 'exact_recall', '>6.2f')} | "
              f"{pair(r, 'token_accuracy', '>6.3f')} | {pair(r, 'verbatim_prefix', '>6.1f')} | "
              f"{pair(r, 'steps', '>5.0f')} | {r.get('wins', '-')}")
    for _, o in overall.iterrows():
        print(f"\n{o['method']} vs sft over {o['cells']} cells (means; ratio = {o['method']} / sft):")
        for c in ("exact_recall", "token_accuracy", "verbatim_prefix", "frac_above", "delta_loss", "steps"):
            if c in overall.columns:
                print(f"  {c:<16} {o[c]:8.3f} vs {o[f'{c}_sft']:8.3f}   ratio {o[f'{c}_ratio']:.3f}")
        if "wins" in cells.columns:
            lost = cells[(cells["method"] == o["method"]) & (cells["wins"] == "no")]
            where = ", ".join(f"r={r}/ℓ={ell}" for r, ell in zip(lost["rank"], lost["length"])) or "nowhere"
            print(f"  does not win at: {where}")
    return 0


def store_flags(p: argparse.ArgumentParser, home: str, keep: str, jsonl: str, fields: str) -> None:
    """The flags both benchmarks' commands share: --home (default <tmp>/`home`), --keep (default `keep`/<search id>),
    --jsonl (help `jsonl`), --jsonl-fields (the paper's keys `fields`) and --model."""
    p.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / home,
                   help="the memcore store the benchmark trains into and resumes from (default: %(default)s)")
    p.add_argument("--keep", type=Path, help=f"completed points kept here and read back into --home (default: "
                                             f"{keep}/<the search's id>)")
    p.add_argument("--jsonl", metavar="FILE", help=jsonl)
    p.add_argument("--jsonl-fields", metavar="PROMPT,TARGET",
                   help=f"other key names for --jsonl (default: the paper's {fields})")
    p.add_argument("--model", help="a hub id or local folder (default: memcore's default model)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "spot", "window"):
        p = sub.add_parser(name, description=ABOUT[name])
        kept_at = {"spot": "_spot_runs/<the search's id>; with --frontier "
                           "sample_data/paper/long_context_spot_frontier_runs",
                   "window": "_window_runs"}.get(name, "_runs")
        store_flags(p, {"spot": "memcore-bench-memft-spot", "window": "memcore-bench-memft-window"}.get(
                        name, "memcore-bench-memft"), f"sample_data/paper/long_context{kept_at}",
                    jsonl="the paper's own long-context file (question/matching lines: its r100 or r0-r80) instead "
                          "of random tokens; every seed then trains on the same target",
                    fields="question,matching")
        p.add_argument("--jsonl-line", type=int, metavar="N", help="the N-th line of --jsonl (default: the first)")
        p.add_argument("--adapter", choices=["bypass", "lora"], default="bypass",
                       help="bypass (the paper's) or lora on the MLP of the same layer")
        p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                       help="adapter ranks (default: %(default)s, what fits this benchmark's CPU budget; the search "
                            "is the same whatever the ranks, so adding one goes on from the kept points)")
        p.add_argument("--seeds", type=int, nargs="+", default=None if name in ("window", "spot") else [0, 1, 2],
                       help="seeds; seed s draws the same random tokens for every method (default: "
                            + {"window": "every seed the rule stopped there)",
                               "spot": "none: give seeds other than the benchmark's, e.g. 3 4)"}.get(name,
                                                                                         "%(default)s)"))
        p.add_argument("--methods", nargs="+", default=list(METHODS),
                       help="methods; sft is the baseline (default: %(default)s)")
        p.add_argument("--max-steps", type=int, default=2000, help="step budget per point (default: %(default)s)")
        p.add_argument("--lr", type=float, default=3e-2,
                       help="learning rate (default: %(default)s; the paper's 1e-2 on a GPU)")
        p.add_argument("--plateau-window", type=int, default=200,
                       help="steps without a new best in tokens above τ or argmax-right tokens that end a point "
                            "(default: %(default)s)")
        p.add_argument("--resolution", type=float, default=0.05,
                       help="the frontier is placed within this fraction of its length (default: %(default)s)")
        if name != "report":
            p.add_argument("--batch", default="auto",
                           help="points trained together: a number or auto (default: %(default)s)")
        if name == "report":
            p.add_argument("--out", help="write the tables as CSV files here")
        if name == "window":
            p.add_argument("--run-keep", type=Path, help="the run's kept points, whose curves the check compares "
                                                         "with (default: sample_data/paper/long_context_runs/<id>)")
            p.add_argument("--points", default=str(ROOT / "sample_data" / "paper" / "long_context_points.csv"),
                           help="the report's points table whose plateau stops are checked (default: %(default)s)")
            p.add_argument("--decisive", action="store_true",
                           help="check the plateau stops whose recall would move a bracket (at its shortest length "
                                "not recalled, where one more seed recalling makes half), from the frontier table "
                                "beside --points, instead of the stops nearest each frontier")
        if name == "spot":
            p.add_argument("--paired", default=str(ROOT / "sample_data" / "paper" / "long_context_paired.csv"),
                           help="the shipped paired table whose cells are re-run (default: %(default)s)")
            p.add_argument("--frontier", action="store_true",
                           help="re-run both ends of every placed bracket instead (long_context_frontier.csv in the "
                                "folder of --paired) and check them against its fitted frontier, then refit over "
                                "both seed sets; writes long_context_spot_frontier.csv there, replacing it")
    c = sub.add_parser("compare")
    c.add_argument("--csv", default=str(SHIPPED), help="a sweep table (default: the shipped capacity sweep)")
    args = ap.parse_args()
    if args.cmd == "spot" and (problem := spot_seeds_problem(args.seeds, shipped_seeds(Path(args.paired)))):
        ap.error(problem)
    if getattr(args, "batch", "auto") != "auto":
        args.batch = int(args.batch)
    return main_of({"run": run, "report": report, "spot": spot, "window": window, "compare": compare}[args.cmd],
                   args)


if __name__ == "__main__":
    raise SystemExit(main())
