"""Wall time of the same small sweep on the local backend and on a local Ray instance, as a ratio.

    python bench/bench_sweep.py [--ranks 1 2 4 8] [--lengths 32 64] [--max-steps 5] [--num-cpus 2]

Each backend writes into its own scratch store; both use the default model and the `paper` placement.
Ray runs one point per CPU at once, each worker with its own copy of the model and one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from memcore.config import AdapterSpec, DataSpec, RunSpec, TrainSpec
    from memcore.data import read_sample
    from memcore.loading import load_base
    from memcore.store import Store
    from memcore.sweep import SweepSpec, run_sweep
    from memcore.sweep_ray import run_sweep_ray

    base = RunSpec(adapter=AdapterSpec(rank=1, layers="paper"), data=DataSpec(text=read_sample("long_archive")),
                   train=TrainSpec(max_steps=args.max_steps, lr=1e-2))
    sweep = SweepSpec(template=base, ranks=tuple(args.ranks), lengths=tuple(args.lengths), methods=("sft",),
                      name="bench")
    n = len(args.ranks) * len(args.lengths)
    from memcore.home import default_model_dir

    models = default_model_dir().parent  # both scratch stores share the converted default model
    with tempfile.TemporaryDirectory() as d:
        for sub in ("local", "ray"):
            (Path(d) / sub).mkdir()
            (Path(d) / sub / "models").symlink_to(models, target_is_directory=True)
        t0 = time.perf_counter()
        model = load_base(base.model)  # model loading counted for both backends
        list(run_sweep(sweep, Store(Path(d) / "local"), base=model))
        local = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        list(run_sweep_ray(sweep, Store(Path(d) / "ray")))
        on_ray = time.perf_counter() - t0
        ray.shutdown()
    print(f"sweep of {n} points ({args.max_steps} steps each): local {local:.1f} s   "
          f"ray ({args.num_cpus} CPUs) {on_ray:.1f} s   "
          f"ratio ray/local {on_ray / local:.2f}x")


if __name__ == "__main__":
    main()
