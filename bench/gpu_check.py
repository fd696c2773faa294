"""The GPU path, measured: one script, a few minutes, on a CUDA machine with no internet.

    bash bench/gpu_check.sh [--out DIR]      (installs wheels carried in .whl/ if any, then runs this)

Rows (each printed as it finishes, all written to DIR/gpu_check.json):
  1. the default model (SmolLM2-135M, converted from the GGUF in the repository), all-layer LoRA r=8 on the
     lighthouse passage, in float32, bfloat16 and nf4 (bitsandbytes): s/step, tokens/s, peak GPU memory,
     host syncs per step (torch.cuda.set_sync_debug_mode), achieved TFLOP/s (FlopCounterMode) against the
     GPU's dense bf16 peak;
  2. a Llama-style ~1.1B model built in code from a config (random weights: throughput only), bfloat16,
     2,048 random target tokens, all-layer LoRA r=8 and the `paper` placement; LoRA weights are checked to
     stay float32 under the bf16 base;
  3. one short capacity point (256 random tokens, `paper` placement, rank 1, sft, 30 steps, float32) whose
     ΔL and tokens above tau are compared with the CPU run's numbers in bench/gpu_check_expected.json
     (written by `python bench/gpu_check.py --cpu-reference` on a CPU machine);
  4. a sweep of 32 bypass points (ranks 1, 2, 4, 8 × 8 seeds, 48 random tokens, 30 steps) one point at a time
     and as one batch: points per hour and the ratio (target >= 10x), host syncs per batched step, and the
     largest ΔL difference between the two;
  5. the paper's long-context grid (`bench/bench_memft.py run --ranks 1 2 4 8 16 --seeds 0 1 2 3 4 --lr 1e-2`, the
     command the README gives for a GPU) for --bench-seconds into a scratch store, stopped with SIGTERM as a user
     stops it: the device its points trained on, points and steps per hour, whether it stopped cleanly and its
     report's hours to go (points beside the search, `hold=False`, and the batched loop on CUDA, end to end);
  6. the same for the PhoneBook grid (`bench/bench_phonebook.py run --ranks 1 2 4 8 16 32 64 --seeds 0 1 2`).
Rows 5 and 6 alone: `--only grid,phonebook` (the checks of the paper's two benchmarks on a GPU).

CUDA-only parts are skipped with a message where no GPU is present; rows whose packages are missing (gguf,
bitsandbytes) say so and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # memcore, and bench_engine's FLOP counter
warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPECTED = Path(__file__).resolve().parent / "gpu_check_expected.json"
DENSE_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}
CAPACITY = dict(tokens=256, rank=1, steps=30, lr=1e-2)


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, v in DENSE_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import torch

    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(model, batch, spec, pad_id: int, device) -> dict:
    """Train `spec.max_steps` steps; median s/step after 2 warm-up steps, peak memory, syncs per step, FLOPs."""
    import torch
    from bench_engine import count_step_flops

    from memcore.train import train_iter

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps, syncs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps_iter = train_iter(model, batch, spec, pad_id=pad_id)
        while True:
            seen = len(caught)
            if cuda:  # count the syncs inside the step only, not the timing's own synchronize below
                torch.cuda.set_sync_debug_mode("warn")
            try:
                r = next(steps_iter)
            except StopIteration:
                break
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            syncs.append(sum("synchroniz" in str(w.message) for w in caught[seen:]))
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[2:-1], stamps[3:-1])] or [float("nan")]
    s_per_step = statistics.median(steps)
    flops = count_step_flops(model, batch, spec)
    return {"s_per_step": s_per_step, "tokens_per_s": batch.input_ids.numel() / s_per_step,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "syncs_per_step": statistics.median(syncs[3:-1]) if len(syncs) > 4 else None,
            "tflop_per_step": flops / 1e12, "tflops": flops / s_per_step / 1e12, "final_loss": r.loss,
            "delta_loss": r.delta_loss, "n_above": r.n_above, "n_tokens": r.n_tokens}


def row_default(kind: str, device) -> dict:
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, TrainSpec
    from memcore.data import build_samples, make_batch, read_sample
    from memcore.loading import load_base

    dtype, quant = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "nf4": ("bfloat16", "nf4")}[kind]
    base = load_base(ModelSpec(dtype=dtype, quant=quant, device=str(device)))
    tok = base.tokenizer
    samples = build_samples(tok, DataSpec(text=read_sample("lighthouse")), base.context_length)
    batch = make_batch(samples, tok.pad_token_id).to(base.device)
    spec = TrainSpec(method="sft", lr=2e-3, max_steps=20, stop_when_recalled=False, verify=False)
    with base.adapted(AdapterSpec(rank=8), seed=0) as model:
        return measure(model, batch, spec, tok.pad_token_id, base.device)


def row_llama_1b(layers: str, device) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memcore.config import AdapterSpec, TrainSpec
    from memcore.data import Sample, make_batch
    from memcore.placement import attach_adapter, detach_adapter

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    base.requires_grad_(False)
    batch = make_batch([Sample([1], random_ids(2048, cfg.vocab_size))], 0).to(device)
    model = attach_adapter(base, AdapterSpec(rank=8, layers=layers), seed=0)
    lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    spec = TrainSpec(method="sft", lr=1e-3, max_steps=12, stop_when_recalled=False, verify=False)
    out = measure(model, batch, spec, 0, torch.device(device))
    out["params_b"] = sum(p.numel() for p in base.parameters()) / 1e9
    out["lora_dtypes"] = lora_dtypes
    detach_adapter(model)
    del base, model
    torch.cuda.empty_cache()
    return out


def row_capacity(device) -> dict:
    from memcore.config import AdapterSpec, ModelSpec, TrainSpec
    from memcore.data import Sample, make_batch
    from memcore.loading import load_base

    base = load_base(ModelSpec(dtype="float32", device=str(device)))
    ids = random_ids(CAPACITY["tokens"], base.model.config.vocab_size)
    bos = base.tokenizer.bos_token_id or 0
    batch = make_batch([Sample([bos], ids)], 0).to(base.device)
    spec = TrainSpec(method="sft", lr=CAPACITY["lr"], max_steps=CAPACITY["steps"], stop_when_recalled=False,
                     verify=False)
    with base.adapted(AdapterSpec(rank=CAPACITY["rank"], layers="paper"), seed=0) as model:
        return measure(model, batch, spec, 0, base.device)


BATCHED = dict(points=32, tokens=48, steps=30)
GRIDS = {  # row -> (script, the README's flags for the paper's grid on a GPU)
    "grid": ("bench_memft.py", ["--ranks", "1", "2", "4", "8", "16", "--seeds", "0", "1", "2", "3", "4",
                                "--lr", "1e-2"]),
    "phonebook": ("bench_phonebook.py", ["--ranks", "1", "2", "4", "8", "16", "32", "64", "--seeds", "0", "1", "2"]),
}


def row_batched_sweep(device) -> dict:
    """The same 32-point bypass sweep (ranks 1, 2, 4, 8 × seeds 0..7, 48 random tokens, 30 steps each, dropout
    off) one point at a time and as one batch, each into a scratch store: points per hour, the ratio, host syncs
    per step of the batched loop, the largest |ΔL| difference between the two."""
    import tempfile

    import torch

    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.loading import load_base
    from memcore.store import Store
    from memcore.sweep import SweepSpec, run_sweep

    template = RunSpec(model=ModelSpec(dtype="float32", device=str(device)),
                       adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.0),
                       data=DataSpec(random_tokens=BATCHED["tokens"]),
                       train=TrainSpec(max_steps=BATCHED["steps"], lr=3e-2, checkpoint_every=0, history="decimated"))
    sweep = SweepSpec(template=template, ranks=(1, 2, 4, 8), lengths=(BATCHED["tokens"],), methods=("sft",),
                      seeds=tuple(range(BATCHED["points"] // 4)), name="gpu-batched")
    base = load_base(template.model)
    out = {}
    for label, batch in (("solo", 1), ("batched", BATCHED["points"])):
        with tempfile.TemporaryDirectory() as d:
            home = Path(d)
            (home / "models").symlink_to(Path(os.environ["MEMCORE_HOME"]) / "models", target_is_directory=True)
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if label == "batched" and cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                t = time.perf_counter()
                results = list(run_sweep(sweep, Store(home), base=base, batch=batch))
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode(0)
                seconds = time.perf_counter() - t
            syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
            out[label] = {"seconds": seconds, "points_per_hour": 3600 * len(results) / seconds,
                          "syncs": syncs, "delta_loss": {json.dumps(r.values, sort_keys=True): r.summary.delta_loss
                                                         for r in results}}
    diff = max(abs(out["solo"]["delta_loss"][k] - v) for k, v in out["batched"]["delta_loss"].items())
    ratio = out["batched"]["points_per_hour"] / out["solo"]["points_per_hour"]
    steps = BATCHED["steps"] + 1
    print(f"  solo {out['solo']['points_per_hour']:.0f} points/h, batched {out['batched']['points_per_hour']:.0f} "
          f"points/h: {ratio:.1f}x (target >= 10x); host syncs per batched step {out['batched']['syncs'] / steps:.1f}; "
          f"largest |ΔL difference| {diff:.2e} nats", flush=True)
    return {"ratio": ratio, "solo_points_per_hour": out["solo"]["points_per_hour"],
            "batched_points_per_hour": out["batched"]["points_per_hour"],
            "syncs_per_batched_step": out["batched"]["syncs"] / steps, "max_delta_loss_diff": diff,
            "s_per_step": out["batched"]["seconds"] / steps, "tokens_per_s": BATCHED["points"] * BATCHED["tokens"]
            * steps / out["batched"]["seconds"],
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "syncs_per_step": out["batched"]["syncs"] / steps, "tflops": 0.0}


def row_benchmark(script: str, flags: list[str], seconds: float) -> dict:
    """A benchmark's `run` (bench/`script` with `flags`) for `seconds` into a scratch --home and --keep, then
    SIGTERM, as a user stops it, and its `report`. Returns the devices its completed points trained on, points and
    steps (and per hour of this row's wall time), whether it stopped cleanly (its "stopped after" line and exit 1
    within 300 s of the signal, or "done in" and exit 0 if it finished first), the report's last line (its state
    and hours to go) and the run's last lines."""
    import signal
    import subprocess
    import tempfile

    from memcore.store import Store

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as d:
        where = ["--home", str(Path(d) / "home"), "--keep", str(Path(d) / "keep")]
        cmd = [sys.executable, str(ROOT / "bench" / script), "run", *where, *flags]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            proc.communicate(timeout=seconds)  # a grid this size does not finish in a check's seconds
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        wall = time.perf_counter() - t
        lines = (out or "").strip().splitlines()
        stopped = any(ln.startswith("stopped after") for ln in lines[-3:])  # exit 1: stopped, resumable
        clean = (proc.returncode == 1 and stopped) or (proc.returncode == 0 and any(ln.startswith("done in")
                                                                                      for ln in lines[-3:]))
        rep = subprocess.run([sys.executable, str(ROOT / "bench" / script), "report", *where, *flags],
                             capture_output=True, text=True, timeout=300, env=env)
        runs = Store(Path(d) / "home").runs(status="completed")
        steps = sum(int(r.get("steps") or 0) for r in runs)
        devices = sorted({str(getattr(r.get("summary"), "device", "?")) for r in runs})
    state = [ln for ln in rep.stdout.strip().splitlines() if ln.strip()][-1:] or [rep.stderr.strip()[-300:]]
    print(f"  {script} run {' '.join(flags)}: {len(runs)} points ({steps} steps) in {wall:.0f} s on "
          f"{', '.join(devices) or 'nothing completed'}: {3600 * len(runs) / wall:.0f} points/h, "
          f"{3600 * steps / wall:.0f} steps/h; stopped {'cleanly' if clean else 'NOT cleanly'} "
          f"(exit {proc.returncode})\n    report: {state[0][:400]}", flush=True)
    return {"points": len(runs), "steps": steps, "wall_s": wall, "points_per_hour": 3600 * len(runs) / wall,
            "steps_per_hour": 3600 * steps / wall, "devices": devices, "stopped_cleanly": clean,
            "exit": proc.returncode, "report_state": state[0], "run_tail": lines[-8:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if it is not in the built-in table")
    p.add_argument("--cpu-reference", action="store_true",
                   help="run only the capacity point on CPU and write the expected numbers")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: default,llama,capacity,batched,grid,"
                                              "phonebook")
    p.add_argument("--only", default="", help="comma-separated rows to run, the others skipped")
    p.add_argument("--bench-seconds", type=float, default=75.0,
                   help="seconds each benchmark grid (rows 5, 6) trains before it is stopped (default: %(default)s)")
    args = p.parse_args()

    import torch

    if args.cpu_reference:
        res = row_capacity(torch.device("cpu"))
        EXPECTED.write_text(json.dumps({**CAPACITY, "delta_loss": res["delta_loss"], "n_above": res["n_above"],
                                        "final_loss": res["final_loss"], "s_per_step_cpu": res["s_per_step"]},
                                       indent=2) + "\n")
        print(f"wrote {EXPECTED}: ΔL {res['delta_loss']:.4f} nats, {res['n_above']}/{res['n_tokens']} above tau")
        return
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops)
    home = Path(os.environ.setdefault("MEMCORE_HOME", "/tmp/memcore-gpu-check"))
    print(f"gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, dense bf16 peak "
          f"{peak or 'unknown'} TFLOP/s, MEMCORE_HOME {home}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak, "rows": {}}
    rows = ("default", "llama", "capacity", "batched", "grid", "phonebook")
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(","))) | (set(rows) - only if only else set())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a check cut off by its time limit still leaves what it measured
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))

    def report(label: str, fn, *a) -> None:
        t = time.perf_counter()
        try:
            r = fn(*a)
        except Exception as e:  # one row's failure (a missing package, an old GPU) must not hide the others
            results["rows"][label] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            save()
            print(f"  {label:<28} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        results["rows"][label] = r
        save()
        if "report_state" in r:  # a benchmark grid: it printed its own line
            print(f"  {label:<28} [{time.perf_counter() - t:.0f} s]", flush=True)
            return
        util = f"{100 * r['tflops'] / peak:.1f}% of peak" if peak else "peak unknown"
        mem = f"{r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") is not None else "n/a"
        print(f"  {label:<28} {r['s_per_step'] * 1000:8.1f} ms/step  {r['tokens_per_s']:9.0f} tok/s  peak {mem:>9}  "
              f"syncs/step {r['syncs_per_step']}  {r['tflops']:.2f} TFLOP/s ({util})  [{time.perf_counter() - t:.0f} s]"
              + (f"  LoRA {r['lora_dtypes']}" if "lora_dtypes" in r else ""), flush=True)

    if "default" not in skip:
        print("1. default model, all-layer LoRA r=8, lighthouse passage, sft", flush=True)
        for kind in ("float32", "bfloat16", "nf4"):
            report(f"default {kind}", row_default, kind, device)
    if "llama" not in skip:
        print("2. Llama-style ~1.1B built in code, bf16, 2,048 random tokens", flush=True)
        for layers in ("all", "paper"):
            report(f"llama-1.1b {layers}", row_llama_1b, layers, "cuda")
    if "capacity" not in skip:
        print("3. capacity point against the CPU run", flush=True)
        report("capacity point fp32", row_capacity, device)
        r = results["rows"].get("capacity point fp32", {})
        if "delta_loss" in r and EXPECTED.is_file():
            exp = json.loads(EXPECTED.read_text())
            same = (abs(r["delta_loss"] - exp["delta_loss"]) <= 0.02 * abs(exp["delta_loss"])
                    and abs(r["n_above"] - exp["n_above"]) <= 3)
            results["capacity_matches_cpu"] = same
            print(f"  GPU ΔL {r['delta_loss']:.4f} vs CPU {exp['delta_loss']:.4f} nats; above tau {r['n_above']} vs "
                  f"{exp['n_above']}: {'MATCH' if same else 'DIFFERENT'} (within 2% and 3 tokens)", flush=True)
    if "batched" not in skip:
        print(f"4. a sweep of {BATCHED['points']} bypass points one at a time and as one batch", flush=True)
        report("batched sweep", row_batched_sweep, device)
    for n, row in ((5, "grid"), (6, "phonebook")):
        if row not in skip:
            script, flags = GRIDS[row]
            print(f"{n}. the paper's {'long-context' if row == 'grid' else 'PhoneBook'} grid for "
                  f"{args.bench_seconds:.0f} s, then stopped", flush=True)
            report(f"{row} benchmark", row_benchmark, script, flags, args.bench_seconds)
    save()
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
