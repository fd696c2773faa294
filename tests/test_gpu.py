"""The CUDA path: run where a GPU is present, skipped cleanly where not (CI has none)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memcore.config import AdapterSpec, TrainSpec
from memcore.data import Sample, make_batch
from memcore.head import chunked_head_loss
from memcore.placement import attach_adapter
from memcore.train import train_iter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would measure it")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "no CUDA device" in out.stdout


def test_the_grid_check_stops_a_benchmark_as_a_user_does_and_reads_what_it_trained(default_model_dir, tmp_path):
    """Rows 5-6 of the GPU check run a benchmark's grid command for a few seconds, stop it with SIGTERM and read its
    store and report: here on a tiny model on the CPU, so the check that runs on a GPU is known to work."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", default_model_dir, context=2048)
    flags = ["--model", str(model), "--ranks", "1", "2", "4", "--seeds", "0", "1", "2", "--max-steps", "400",
             "--lr", "0.1", "--plateau-window", "40"]
    r = gpu_check.row_benchmark("bench_memft.py", flags, 40)
    assert r["stopped_cleanly"], r["run_tail"]
    assert r["points"] > 0 and r["devices"] == ["cpu"] and r["steps"] > 0
    assert r["report_state"].startswith("interim"), r["report_state"]


@cuda
def test_chunked_head_on_cuda_matches_cpu():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 3000, bias=False).requires_grad_(False)
    h = torch.randn(300, 64)
    labels, mask = torch.randint(0, 3000, (300,)), torch.ones(300, dtype=torch.bool)
    ref, ref_c = chunked_head_loss(h, head, labels, mask)
    got, got_c = chunked_head_loss(h.cuda(), head.cuda(), labels.cuda(), mask.cuda())
    assert torch.allclose(got.cpu(), ref, atol=1e-4) and torch.equal(got_c.cpu(), ref_c)


@cuda
@pytest.mark.parametrize("method", ["sft", "memft-ot"])
def test_a_training_step_on_cuda_syncs_with_the_host_at_most_once(method):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(cfg).cuda().eval().requires_grad_(False)
    model = attach_adapter(base, AdapterSpec(rank=4), seed=0)
    batch = make_batch([Sample([1], torch.randint(3, 128, (40,)).tolist())], 0).to(torch.device("cuda"))
    spec = TrainSpec(method=method, lr=1e-2, max_steps=8, stop_when_recalled=False, verify=False, checkpoint_every=0)
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = train_iter(model, batch, spec)
        next(it), next(it)  # warm-up
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(4):
                seen = len(caught)
                next(it)
                counts.append(sum("synchroniz" in str(w.message) for w in caught[seen:]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert max(counts) <= 1, counts
