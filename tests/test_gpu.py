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
