"""Engine benchmarks, each printed as a ratio against a baseline measured in the same run.

  (a) seconds per step: memcore's train_iter against a plain Hugging Face Trainer + PEFT loop
      (same model, text, rank, learning rate, steps), for all-layer LoRA and for the `paper` preset
  (b) steps and seconds to exact recall: memft-ot against sft, on the shipped short passages
  (c) cost of per-token tracking: train_iter (and the full runner writing the store) against the same
      loop with no tracking at all
  (d) peak memory (RSS on CPU, allocated GPU memory on CUDA) of each variant
  (e) the paper's regime: `paper` placement on random tokens (1,024 and 2,048) against HF Trainer + PEFT on the
      same single layer: s/step, cost growth with length, peak memory
  (f) memft-ot against sft, s/step in the same run
  (g) achieved FLOP/s of a memcore step (counted by torch's FlopCounterMode) against this machine's fp32
      matmul rate at the step's own shapes, measured in the same process
  (h) the law fit (both forms, intervals, leave-one-out) on 7x7 and 16x13 grids against the previous
      six-start algorithm (bench/law_reference.py)

Each measurement runs in its own subprocess so peak memory is its own. Usage:
    python bench/bench_engine.py [--steps 16] [--sample lighthouse] [--quick] [--sections acdefgh]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

WARMUP = 2  # steps excluded from per-step timing (allocator and kernel warm-up)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(args):
    from memcore.config import AdapterSpec, DataSpec, ModelSpec
    from memcore.data import build_samples, make_batch, read_sample
    from memcore.loading import load_base
    from memcore.placement import attach_adapter

    base = load_base(ModelSpec(quant=args.quant))
    tok = base.tokenizer
    if args.random_tokens:  # uniform over the vocabulary, seeded (the paper's random-token targets)
        import torch

        from memcore.data import Sample

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.model.config.vocab_size, (args.random_tokens,), generator=g).tolist()
        samples = [Sample([tok.bos_token_id if tok.bos_token_id is not None else 0], ids)]
    else:
        samples = build_samples(tok, DataSpec(text=read_sample(args.sample)), base.context_length)
    batch = make_batch(samples, tok.pad_token_id).to(base.device)
    spec = AdapterSpec(rank=args.rank, layers=args.layers)
    model = attach_adapter(base.model, spec, seed=0)
    return base, samples, batch, model


def per_step(times: list[float]) -> float:
    """Median seconds per step from step-end timestamps, skipping the warm-up steps."""
    import statistics

    t = times[WARMUP:]
    return statistics.median(b - a for a, b in zip(t, t[1:]))


def one_memcore(args) -> dict:
    from memcore.config import TrainSpec
    from memcore.train import train_iter

    base, samples, batch, model = _setup(args)
    stamps = []
    spec = TrainSpec(method=args.method, lr=args.lr, max_steps=args.steps, stop_when_recalled=False)
    for r in train_iter(model, batch, spec, pad_id=base.tokenizer.pad_token_id,
                        use_prefix_cache=not args.no_prefix_cache):
        if not r.final:
            stamps.append(time.perf_counter())
    out = {"s_per_step": per_step(stamps), "peak_mb": peak_memory_mb(), "final_loss": r.loss}
    if args.flops:
        out.update(step_flops(model, batch, spec, args))
    return out


def count_step_flops(model, batch, spec, use_prefix_cache: bool = True) -> int:
    """FLOPs of one training step's forward and backward as memcore's train_iter runs it (frozen-prefix cache,
    recomputed blocks, chunked head), counted by torch's FlopCounterMode (matmuls and attention)."""
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    from memcore import objectives as obj
    from memcore.measure import token_losses
    from memcore.train import FrozenPrefix, recomputed, use_recompute

    prefix = FrozenPrefix.maybe(model) if use_prefix_cache else None
    if prefix is not None:
        prefix.capture(model, batch)
    start = prefix.k if prefix is not None else 0
    with FlopCounterMode(display=False) as counter:
        with (prefix.installed() if prefix is not None else nullcontext(),
              recomputed(model, start) if use_recompute(model, batch, spec.recompute, start) else nullcontext()):
            loss, _ = token_losses(model, batch)
        obj.weighted_mean(loss, obj.sft_weights(loss.detach(), batch.target_mask)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_flops(model, batch, spec, args) -> dict:
    """One step's FLOPs (count_step_flops) and this machine's fp32 matmul rate at the step's largest shapes,
    both measured in this process."""
    import torch

    flops = count_step_flops(model, batch, spec, use_prefix_cache=not args.no_prefix_cache)
    cfg = model.config
    n = batch.input_ids.numel()
    rates = []
    for k, m in ((cfg.hidden_size, cfg.intermediate_size), (cfg.hidden_size, cfg.vocab_size)):
        a, b = torch.randn(min(n, 1024), k), torch.randn(k, m)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        rates.append(3 * 2 * a.shape[0] * k * m / (time.perf_counter() - t))
    return {"flops": flops, "matmul_flops_per_s": max(rates)}


def one_runner(args) -> dict:
    """The whole runner: train_iter plus writing every step's token history to the store."""
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.data import read_sample
    from memcore.runner import execute, prepare
    from memcore.store import Store

    spec = RunSpec(model=ModelSpec(quant=args.quant), adapter=AdapterSpec(rank=args.rank, layers=args.layers),
                   data=DataSpec(text=read_sample(args.sample)),
                   train=TrainSpec(method=args.method, lr=args.lr, max_steps=args.steps, stop_when_recalled=False))
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d))
        base, samples = prepare(spec)
        stamps = []
        execute(spec, store, base, samples, on_report=lambda r: None if r.final else stamps.append(time.perf_counter()))
    return {"s_per_step": per_step(stamps), "peak_mb": peak_memory_mb()}


def one_untracked(args) -> dict:
    """The same training loop with no tracking: mean loss straight from the logits, no per-token read-outs."""
    import torch
    import torch.nn.functional as F

    base, samples, batch, model = _setup(args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    stamps = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * (1 - step / args.steps)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=batch.keep, use_cache=False)
        logits = out.logits[:, -batch.keep:, :].float()
        loss = F.cross_entropy(logits[batch.target_mask], batch.labels[batch.target_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return {"s_per_step": per_step(stamps), "peak_mb": peak_memory_mb()}


def _peft_baseline(model, spec):
    """The baseline's adapter: stock PEFT LoRA on the same modules memcore adapts (get_peft_model)."""
    from peft import LoraConfig, get_peft_model

    from memcore.targets import target_module_regex

    regex, _, _ = target_module_regex(model, spec)
    return get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=regex,
                                            bias="none", task_type="CAUSAL_LM"))


def one_trainer(args) -> dict:
    """Baseline: transformers.Trainer + PEFT on the same single example, labels masked on the prompt."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    base, samples, batch, model = _setup(args)
    from memcore.config import AdapterSpec

    model = _peft_baseline(model.unload(), AdapterSpec(rank=args.rank, layers=args.layers))
    s = samples[0]
    ids = s.prompt_ids + s.target_ids
    example = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
               "labels": torch.tensor([-100] * len(s.prompt_ids) + s.target_ids)}
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=args.steps,
                                  learning_rate=args.lr,
                                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_strategy="no",
                                  save_strategy="no", report_to=[], disable_tqdm=True, seed=0, optim="adamw_torch",
                                  use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                                  dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=targs, train_dataset=[example], callbacks=[Stamp()])
        trainer.train()
    out = {"s_per_step": per_step(stamps), "peak_mb": peak_memory_mb()}
    if args.flops:
        out["flops"] = trainer_step_flops(model, example)
    return out


def trainer_step_flops(model, example: dict) -> int:
    """FLOPs of one step of the Trainer baseline (the model's forward with labels: all logits and the
    cross-entropy, then the backward), counted by torch's FlopCounterMode like count_step_flops."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    batch = {k: v[None].to(device) for k, v in example.items()}
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def work_ratio(m: dict, t: dict) -> str:
    """' work ratio 0.64x': memcore's FLOPs per step over the baseline's, when both were counted. Exact
    arithmetic at the same FLOP rate cannot make the time ratio smaller than this."""
    return f"   work ratio {m['flops'] / t['flops']:.2f}x" if "flops" in m and "flops" in t else ""


def one_recall(args) -> dict:
    """Steps and seconds until greedy decoding reproduces the passage."""
    from memcore.config import TrainSpec
    from memcore.train import train_iter

    base, samples, batch, model = _setup(args)
    spec = TrainSpec(method=args.method, lr=args.lr, max_steps=args.steps, stop_when_recalled=True)
    *_, r = train_iter(model, batch, spec, pad_id=base.tokenizer.pad_token_id)
    return {"steps": r.step, "seconds": r.elapsed - r.generate_seconds, "recalled": bool(r.generate_recalled),
            "tokens": r.n_tokens}


def one_fit(args) -> dict:
    """Seconds for `memcore fit`'s work (both forms, intervals, leave-one-out, AIC) on a synthetic grid,
    the fast fit against the previous six-start algorithm."""
    import importlib.util

    import numpy as np

    from memcore.law import FORMS, compare_forms, power_law

    spec = importlib.util.spec_from_file_location("law_reference", Path(__file__).resolve().parent / "law_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    n_r, n_l = (int(v) for v in args.grid.split("x"))
    ranks, lengths = np.geomspace(1, 512, n_r).round(), np.geomspace(50, 10000, n_l).round()
    r, ell = (v.ravel() for v in np.meshgrid(ranks, lengths))
    rng = np.random.default_rng(0)
    dl = power_law(np.array([r, ell]), 40.0, 0.45, 0.4, 0.2) * (1 + 0.03 * rng.standard_normal(r.size))
    t = time.perf_counter()
    compare_forms(r, ell, dl)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    for form in FORMS:
        ref.multistart_fit(form, r, ell, dl)
    return {"fast_s": fast, "reference_s": time.perf_counter() - t, "points": int(r.size)}


KINDS = {"fit": one_fit, "memcore": one_memcore, "runner": one_runner, "untracked": one_untracked,
         "trainer": one_trainer, "recall": one_recall}


def best(variants: dict[str, tuple[str, dict]], repeats: int) -> dict[str, dict]:
    """Each variant's fastest of `repeats` runs, the variants interleaved (A B C A B C ...) so that a busy
    moment on the machine cannot favour one of them; a busy moment only ever slows a run down."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (kind, kw) in variants.items():
            results[name].append(sub(kind, **kw))
    return {name: min(rs, key=lambda r: r["s_per_step"]) for name, rs in results.items()}


def sub(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--one", kind]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not False and v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", choices=list(KINDS))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sample", default="lighthouse")
    p.add_argument("--layers", default="all")
    p.add_argument("--method", default="sft")
    p.add_argument("--quant", default="none")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="runs of each timing variant; the fastest counts")
    p.add_argument("--quick", action="store_true", help="skip (b)")
    p.add_argument("--random-tokens", type=int, default=0, help="train on this many random tokens instead of --sample")
    p.add_argument("--flops", action="store_true", help="also count one step's FLOPs and this machine's matmul rate")
    p.add_argument("--grid", default="7x7", help="(h): ranks x lengths of the synthetic sweep")
    p.add_argument("--lengths", default="1024,2048", help="(e): random-token target lengths")
    p.add_argument("--long-steps", type=int, default=6, help="(e): steps per run at those lengths")
    p.add_argument("--sections", default="abcdefgh", help="which sections to run, e.g. 'eh'")
    args = p.parse_args()
    if args.one:
        print(json.dumps(KINDS[args.one](args)))
        return

    common = {"steps": args.steps, "rank": args.rank, "lr": args.lr, "sample": args.sample, "quant": args.quant}
    sec = args.sections
    print(f"memcore engine benchmark: sample={args.sample} rank={args.rank} steps={args.steps} quant={args.quant} "
          f"(median step time after {WARMUP} warm-up steps, fastest of {args.repeats} runs; "
          "run it on an idle machine)\n")
    rows = {}
    if "a" in sec or "d" in sec:
        print("(a) seconds per step, memcore train_iter vs HF Trainer + PEFT (ratio < 1: memcore faster)")
        for layers in ("all", "paper"):
            res = best({"trainer": ("trainer", {"layers": layers, "flops": True, **common}),
                        "memcore": ("memcore", {"layers": layers, "flops": True, **common})}, args.repeats)
            t, m = rows[layers] = (res["trainer"], res["memcore"])
            print(f"    layers={layers:<6} trainer {t['s_per_step']:.3f} s/step   "
                  f"memcore {m['s_per_step']:.3f} s/step   "
                  f"ratio {m['s_per_step'] / t['s_per_step']:.2f}x{work_ratio(m, t)}")
        m_nc = best({"nc": ("memcore", {"layers": "paper", "no_prefix_cache": True, **common})}, args.repeats)["nc"]
        print(f"    paper preset without the frozen-prefix cache: {m_nc['s_per_step']:.3f} s/step "
              f"(cache speed-up {m_nc['s_per_step'] / rows['paper'][1]['s_per_step']:.2f}x)")

    if "c" in sec:
        print("\n(c) cost of per-token tracking (sft, all layers)")
        res = best({k: (k, {"layers": "all", **common}) for k in ("untracked", "memcore", "runner")}, args.repeats)
        u, m, r = res["untracked"], res["memcore"], res["runner"]
        print(f"    untracked loop {u['s_per_step']:.3f} s/step   train_iter {m['s_per_step']:.3f} s/step   "
              f"overhead {100 * (m['s_per_step'] / u['s_per_step'] - 1):+.1f}%")
        print(f"    runner with store writes {r['s_per_step']:.3f} s/step   "
              f"overhead {100 * (r['s_per_step'] / u['s_per_step'] - 1):+.1f}%")

    if rows:
        print("\n(d) peak memory (MB; RSS on CPU, allocated on CUDA)")
        for layers in ("all", "paper"):
            t, m = rows[layers]
            print(f"    {layers + ':':<11} trainer {t['peak_mb']:.0f}   memcore {m['peak_mb']:.0f}   "
                  f"ratio {m['peak_mb'] / t['peak_mb']:.2f}x")

    long_rows = {}
    if "e" in sec:
        print("\n(e) paper placement, random tokens (sft), memcore vs HF Trainer + PEFT on the same single layer")
        for n in (int(v) for v in args.lengths.split(",")):
            kw = {**common, "layers": "paper", "random_tokens": n, "steps": args.long_steps, "lr": 1e-3}
            kw["flops"] = True
            res = best({"trainer": ("trainer", kw), "memcore": ("memcore", kw)}, 1)
            t, m = long_rows[n] = (res["trainer"], res["memcore"])
            print(f"    {n:>5} tokens  trainer {t['s_per_step']:.2f} s/step {t['peak_mb']:.0f} MB   "
                  f"memcore {m['s_per_step']:.2f} s/step {m['peak_mb']:.0f} MB   "
                  f"time ratio {m['s_per_step'] / t['s_per_step']:.2f}x   "
                  f"memory ratio {m['peak_mb'] / t['peak_mb']:.2f}x{work_ratio(m, t)}")
        if len(long_rows) >= 2:
            (n0, (t0, m0)), (n1, (t1, m1)) = sorted(long_rows.items())[:2]
            print(f"    cost growth {n0} -> {n1} tokens ({n1 / n0:.1f}x the length): "
                  f"memcore {m1['s_per_step'] / m0['s_per_step']:.2f}x, "
                  f"trainer {t1['s_per_step'] / t0['s_per_step']:.2f}x")

    if "f" in sec:
        print("\n(f) memft-ot vs sft, s/step in the same run (all layers)")
        res = best({meth: ("memcore", {**common, "layers": "all", "method": meth}) for meth in ("sft", "memft-ot")},
                   args.repeats)
        s_, o = res["sft"], res["memft-ot"]
        print(f"    sft {s_['s_per_step']:.3f} s/step   memft-ot {o['s_per_step']:.3f} s/step   "
              f"ratio {o['s_per_step'] / s_['s_per_step']:.3f}x")

    if "g" in sec:
        print("\n(g) achieved FLOP/s of a memcore step against this machine's fp32 matmul rate at the step's shapes")
        found = [("all layers", rows["all"][1])] if "all" in rows else []
        found += [(f"paper, {n} tokens", m) for n, (_, m) in long_rows.items()]
        if not found:
            print("    (needs (a) or (e))")
        for name, m in found:
            rate = m["flops"] / m["s_per_step"]
            print(f"    {name:<20} {m['flops'] / 1e9:7.1f} GFLOP/step  {rate / 1e9:6.1f} GFLOP/s achieved   "
                  "matmul rate "
                  f"{m['matmul_flops_per_s'] / 1e9:6.1f} GFLOP/s   {100 * rate / m['matmul_flops_per_s']:.0f}%")

    if "h" in sec:
        print("\n(h) law fit (both forms, intervals, leave-one-out, AIC) vs the previous six-start fit")
        for grid in (args.grid, "16x13"):
            f = sub("fit", grid=grid)
            print(f"    {grid:>5} grid ({f['points']} points)  fast {f['fast_s']:.2f} s   "
                  f"previous {f['reference_s']:.2f} s   "
                  f"ratio {f['fast_s'] / f['reference_s']:.3f}x")

    if not args.quick and "b" in sec:
        print("\n(b) steps and seconds to exact recall, memft-ot vs sft (max 100 steps, all layers)")
        for sample in ("lighthouse", "recipe", "orbit"):
            res = {meth: sub("recall", method=meth, **{**common, "sample": sample, "steps": 100})
                   for meth in ("sft", "memft-ot")}
            s, o = res["sft"], res["memft-ot"]
            print(f"    {sample:<11} ({s['tokens']} tokens)  sft {s['steps']} steps {s['seconds']:.1f} s "
                  f"{'recalled' if s['recalled'] else 'NOT recalled'}"
                  f"   memft-ot {o['steps']} steps {o['seconds']:.1f} s "
                  f"{'recalled' if o['recalled'] else 'NOT recalled'}"
                  f"   steps ratio {o['steps'] / max(1, s['steps']):.2f}x  "
                  f"time ratio {o['seconds'] / s['seconds']:.2f}x")


if __name__ == "__main__":
    main()
