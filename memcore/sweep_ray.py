"""The Ray backend for sweeps: each grid point is a Ray task; results travel back to the driver's store.

A task trains its point into a scratch store on the worker (which needs none of the driver's disk), then
returns the whole run as data (rows and adapter files); the driver imports it into its own store, so a Ray
sweep leaves exactly what a local one does. Plain tasks rather than Ray Tune trials: a sweep point is a
single fixed-budget run with nothing to schedule adaptively, and tasks keep the dependency to ray core.
A point that fails is retried up to `retries` times by Ray, then recorded as failed with its error; the
rest of the sweep goes on. Stopping stops scheduling and cancels what is in flight; only finished points
are written, so the store stays consistent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memcore.config import MemcoreError, ModelSpec, RunSpec
from memcore.store import Store
from memcore.sweep import Point, PointResult, SweepSpec, completed_keys, points

_BASES: dict[ModelSpec, Any] = {}  # per worker process: base models loaded once
RAY_AUTO_BATCH = 8  # points a task trains together with --batch auto (the worker's memory is not known here)


def ray_available() -> bool:
    """Whether Ray can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def train_point(spec_dict: dict[str, Any], sweep_id: str, key: str) -> dict[str, Any]:
    """Runs on a Ray worker: train one point into a scratch store and return the run as data."""
    return train_points([spec_dict], sweep_id, [key])[0]


def train_points(spec_dicts: list[dict[str, Any]], sweep_id: str, keys: list[str],
                 earlier: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Runs on a Ray worker: train several points together (memcore.runner.execute_many; one alone is
    execute's run) into a scratch store and return each run as data, in the order given. earlier: the runs the
    points are trained on top of (TrainSpec.after, with the whole chain behind them) as the driver exported them
    (with_paths), imported into the scratch store first so that a chained point starts from its parent's adapter
    and measures the earlier targets as it would on the driver."""
    import warnings

    warnings.filterwarnings("ignore")
    from memcore.home import memcore_home
    from memcore.loading import resolve_source
    from memcore.runner import BatchedRun, execute, execute_many, prepare

    specs = [RunSpec.from_dict(d) for d in spec_dicts]
    home = memcore_home()
    base = _BASES.get(specs[0].model)
    prepared = []
    for spec in specs:
        base, samples = prepare(spec, base, home)
        prepared.append(samples)
    _BASES[specs[0].model] = base
    with tempfile.TemporaryDirectory(prefix="memcore-point-") as scratch:
        store = Store(Path(scratch))
        model_here = resolve_source(specs[0].model, home)
        for payload in earlier or []:
            import_with_paths(store, payload, model_here)
        if len(specs) == 1:
            run_ids = [execute(specs[0], store, base, prepared[0], sweep=sweep_id, label=keys[0]).run_id]
        else:
            runs = [BatchedRun(s, smp, tag=i, sweep=sweep_id, label=k)
                    for i, (s, smp, k) in enumerate(zip(specs, prepared, keys))]
            ids: dict[int, str] = {}
            for i, r in execute_many(runs, store, base, slots=len(runs), max_rank=max(s.adapter.rank for s in specs)):
                if r.final:
                    ids[i] = r.summary.run_id
            run_ids = [ids[i] for i in range(len(runs))]
        payloads = []
        for rid in run_ids:
            payloads.append(with_paths(store, rid, model_here))
        store.close()
    return payloads


def with_paths(store: Store, run_id: str, model_folder: str) -> dict[str, Any]:
    """A run exported as data (Store.export_run) with the paths in it that the other side rewrites to its own
    (`worker_paths`: this store's runs folder and `model_folder`, the model's folder here; import_with_paths)."""
    payload = store.export_run(run_id)
    payload["worker_paths"] = {"runs": str(store.runs_dir), "model": model_folder}
    return payload


def import_with_paths(store: Store, payload: dict[str, Any], model_folder: str) -> str:
    """Add a run that with_paths exported elsewhere to `store`, its paths rewritten to this store's runs folder and
    `model_folder` (the model's folder here); the payload itself is left as it was. Returns the run id."""
    payload = dict(payload)
    there = payload.pop("worker_paths")
    return store.import_run(payload, rewrite={there["runs"]: str(store.runs_dir), there["model"]: model_folder})


def _connect(address: str | None) -> Any:
    """Ray, initialized (a new local instance, or the cluster at `address`). Raises MemcoreError when Ray is not
    installed or the cluster cannot be reached."""
    if not ray_available():
        raise MemcoreError("--backend ray needs Ray: pip install 'memcore[ray]' (or pip install 'ray>=2.30')")
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except Exception as e:
            raise MemcoreError(f"cannot connect to Ray at {address or 'a new local instance'}: "
                               f"{str(e).splitlines()[0]}") from None
    return ray


def run_sweep_ray(sweep: SweepSpec, store: Store, *, address: str | None = None, cpus_per_run: float = 1,
                  gpus_per_run: float = 0, retries: int = 2, should_stop: Callable[[], bool] | None = None,
                  task: Callable[..., list[dict[str, Any]]] | None = None,
                  batch: int | str = 1) -> Iterator[PointResult]:
    """Run the missing points as Ray tasks, `batch` points per task trained together (auto: 8); yield each point's
    result (with `error` when its task failed) as it lands."""
    todo = sorted((p for p in points(sweep) if p.key not in completed_keys(store, sweep)),
                  key=lambda p: (p.values["length"], p.values["rank"]))  # lengths alike in a task: little padding
    yield from run_points_ray(todo, store, sweep.id, address=address, cpus_per_run=cpus_per_run,
                              gpus_per_run=gpus_per_run, retries=retries, should_stop=should_stop, task=task,
                              batch=batch)


def run_points_ray(todo: list[Point], store: Store, sweep_id: str, *, address: str | None = None,
                   cpus_per_run: float = 1, gpus_per_run: float = 0, retries: int = 2,
                   should_stop: Callable[[], bool] | None = None,
                   task: Callable[..., list[dict[str, Any]]] | None = None,
                   batch: int | str = 1) -> Iterator[PointResult]:
    """Train `todo` (points of sweep `sweep_id`, in this order) as Ray tasks of `batch` points each (auto: 8) and
    import each finished run into `store`, yielding its result as it lands; a task that fails after `retries`
    records its points as failed runs (PointResult.error) and the rest go on. A chained point (TrainSpec.after)
    travels with its chain's runs, so a worker needs none of this store's disk. Raises MemcoreError when Ray is
    missing or unreachable."""
    ray = _connect(address)
    from memcore.chain import chain_of
    from memcore.loading import resolve_source

    per_task = RAY_AUTO_BATCH if batch == "auto" else int(batch)
    remote = ray.remote(task or train_points).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                                      max_retries=retries, retry_exceptions=True)

    local_model: dict[str, str] = {}

    def model_here(spec: RunSpec) -> str:  # the model's folder on this machine, resolved once per model
        if spec.model.name not in local_model:
            local_model[spec.model.name] = resolve_source(spec.model, store.home)
        return local_model[spec.model.name]

    def chains(group: list[Point]) -> dict[str, Any]:
        ids: list[str] = []
        for p in group:
            if p.spec.train.after is not None:
                ids += [r for r in [*chain_of(store, p.spec.train.after), p.spec.train.after] if r not in ids]
        return {"earlier": [with_paths(store, r, model_here(group[0].spec)) for r in ids]} if ids else {}

    pending: dict[Any, list[Any]] = {}
    queue = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
    window = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_run, 1e-9)))
    try:
        while queue or pending:
            while queue and len(pending) < window and not (should_stop and should_stop()):
                group = queue.pop(0)
                pending[remote.remote([p.spec.to_dict() for p in group], sweep_id, [p.key for p in group],
                                      **chains(group))] = group
            if should_stop and should_stop():
                queue.clear()
                if not pending:
                    return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                group = pending.pop(ref)
                try:
                    payloads = ray.get(ref)
                except Exception as e:  # retries exhausted: record the failure, go on
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    for p in group:
                        rid = store.create_run(p.spec.to_dict(), status="failed", sweep=sweep_id, label=p.key)
                        store.set_status(rid, "failed", error=f"after {retries} retries: {msg}")
                        yield PointResult(values=p.values, error=msg, run_id=rid)
                    continue
                for p, payload in zip(group, payloads):
                    rid = import_with_paths(store, payload, model_here(p.spec))
                    yield PointResult(values=p.values, summary=store.run(rid)["summary"], run_id=rid)
    finally:
        for ref in pending:
            ray.cancel(ref)
