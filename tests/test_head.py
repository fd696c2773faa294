"""The chunked LM head gives the plain computation's losses, argmax and gradients, on its own, through a model,
on architectures whose logits are post-processed (where it must step aside), and with blocks recomputed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memcore import objectives as obj
from memcore.config import AdapterSpec, TrainSpec
from memcore.data import Sample, make_batch
from memcore.head import chunked_head_loss, head_for
from memcore.measure import token_losses
from memcore.placement import attach_adapter, detach_adapter
from memcore.train import recomputed, train_iter, use_recompute


def _plain(h, head, labels, mask):
    logits = F.linear(h, head.weight, head.bias).float()
    loss = F.cross_entropy(logits, labels, reduction="none") * mask
    return loss, (logits.argmax(-1) == labels) & mask


@pytest.mark.parametrize("rows,cols", [(1, 500), (7, 64), (64, 7), (1000, 10000), (33, 499)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_matches_plain_loss_argmax_and_gradient(rows, cols, bias):
    """Any tile shape (one row, one tile, tiles that do not divide the vocabulary) gives the plain numbers."""
    torch.manual_seed(0)
    n, hidden, vocab = 150, 32, 500
    head = torch.nn.Linear(hidden, vocab, bias=bias).requires_grad_(False)
    h = (torch.randn(n, hidden) * 2).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,))
    labels[:20] = F.linear(h[:20], head.weight, head.bias).argmax(-1)  # some rows argmax-correct
    mask = torch.rand(n) > 0.2
    w = torch.rand(n) * (torch.rand(n) > 0.4)  # weights as a method would set them, many zero

    loss, correct = chunked_head_loss(h, head, labels, mask, rows=rows, cols=cols)
    (w * loss).sum().backward()
    g_chunked, h.grad = h.grad.clone(), None
    ref_loss, ref_correct = _plain(h, head, labels, mask)
    (w * ref_loss).sum().backward()

    assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, ref_correct) and int(correct.sum()) >= 10
    assert torch.allclose(g_chunked, h.grad, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(g_chunked[~mask]) == 0


def test_a_wrong_guess_of_the_training_rows_costs_time_not_correctness():
    """Rows expected not to train that do get weight are recomputed in the backward."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 200).requires_grad_(False)
    h = torch.randn(40, 16, requires_grad=True)
    labels, mask = torch.randint(0, 200, (40,)), torch.ones(40, dtype=torch.bool)
    for train_rows in (torch.zeros(40, dtype=torch.bool), torch.rand(40) > 0.5, None):
        h.grad = None
        loss, _ = chunked_head_loss(h, head, labels, mask, train_rows=train_rows, rows=9, cols=60)
        loss.mean().backward()
        g = h.grad.clone()
        h.grad = None
        _plain(h, head, labels, mask)[0].mean().backward()
        assert torch.allclose(g, h.grad, atol=1e-6)


def test_the_accelerator_variant_without_row_indexing_gives_the_same_gradient(monkeypatch):
    import memcore.head as head_module

    monkeypatch.setattr(head_module, "all_rows_at_once", lambda device: True)
    torch.manual_seed(4)
    head = torch.nn.Linear(16, 200).requires_grad_(False)
    h = torch.randn(40, 16, requires_grad=True)
    labels, mask, w = torch.randint(0, 200, (40,)), torch.rand(40) > 0.3, torch.rand(40)
    loss, _ = chunked_head_loss(h, head, labels, mask, train_rows=torch.zeros(40, dtype=torch.bool), rows=7)
    (w * loss).sum().backward()
    g, h.grad = h.grad.clone(), None
    (w * _plain(h, head, labels, mask)[0]).sum().backward()
    assert torch.allclose(g, h.grad, atol=1e-6)


def test_no_grad_pass_gives_the_same_numbers():
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    h, labels, mask = torch.randn(50, 16), torch.randint(0, 300, (50,)), torch.ones(50, dtype=torch.bool)
    with torch.no_grad():
        loss, correct = chunked_head_loss(h, head, labels, mask, rows=8, cols=64)
    ref, ref_c = _plain(h, head, labels, mask)
    assert not loss.requires_grad
    assert torch.allclose(loss, ref, atol=1e-5) and torch.equal(correct, ref_c)


def _tiny(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    return m.requires_grad_(False)


def _batch(vocab=96, n=30):
    g = torch.Generator().manual_seed(3)
    return make_batch([Sample([1, 5], torch.randint(3, vocab, (n,), generator=g).tolist()),
                       Sample([1, 5, 9, 4], torch.randint(3, vocab, (n - 6,), generator=g).tolist())], pad_id=0)


def _lora_grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    loss, correct = token_losses(model, batch, chunked=chunked)
    w = obj.sft_weights(loss.detach(), batch.target_mask)
    obj.weighted_mean(loss, w).backward()
    return loss.detach(), correct, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_token_losses_through_a_model_match_the_plain_head():
    import transformers as T

    base = _tiny(T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2))
    m = attach_adapter(base, AdapterSpec(rank=4), seed=0)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    b = _batch()
    assert head_for(m, lambda keep: m(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                      position_ids=b.position_ids, logits_to_keep=keep)) is not None
    l1, c1, g1 = _lora_grads(m, b, chunked=True)
    l2, c2, g2 = _lora_grads(m, b, chunked=False)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.equal(c1, c2)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(g1, g2))
    detach_adapter(m)


def test_a_model_that_soft_caps_its_logits_keeps_the_plain_head():
    """Gemma-2 soft-caps logits after the head: the numerical check sees it and the model's own logits are used."""
    import transformers as T

    base = _tiny(T.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5))
    b = _batch()
    assert head_for(base, lambda keep: base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                            position_ids=b.position_ids, logits_to_keep=keep)) is None
    loss, _ = token_losses(base, b)
    ref, _ = token_losses(base, b, chunked=False)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert float(loss[b.target_mask].max()) < 0.5 * 2 + 5  # capped logits: losses near ln(96), not the raw ones


def test_recomputed_blocks_give_the_same_training_run_with_dropout():
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    b = _batch()
    runs = []
    for setting in ("off", "on"):
        m = attach_adapter(_tiny(cfg), AdapterSpec(rank=4, dropout=0.3, layers="paper"), seed=0)
        spec = TrainSpec(method="sft", lr=5e-2, max_steps=4, stop_when_recalled=False, verify=False, recompute=setting)
        assert use_recompute(m, b, setting, 0) is (setting == "on")
        reports = list(train_iter(m, b, spec))
        runs.append(([r.loss for r in reports], [r.n_correct for r in reports]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6) and runs[0][1] == runs[1][1]
    assert runs[0][0][-1] < runs[0][0][0] - 0.05  # it trained


def test_recompute_auto_turns_on_for_long_inputs_only():
    import transformers as T

    m = _tiny(T.LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2))
    short = make_batch([Sample([1], list(range(3, 90)))], pad_id=0)
    long = make_batch([Sample([1], [5] * 30000)], pad_id=0)
    assert not use_recompute(m, short, "auto", 0)
    assert use_recompute(m, long, "auto", 0)
    assert not use_recompute(m, long, "off", 0)
    with recomputed(m, 1):  # blocks get wrapped and unwrapped again
        assert all("forward" in vars(blk) for blk in m.model.layers[1:])
    assert not any("forward" in vars(blk) for blk in m.model.layers)


def test_large_logits_whose_maximum_moves_between_tiles_stay_exact():
    """The online softmax rescales its running sum when a later tile holds a larger logit: with logits in the
    hundreds (exp would overflow without the running maximum) the losses and gradients still match."""
    torch.manual_seed(5)
    vocab = 300
    head = torch.nn.Linear(8, vocab, bias=True).requires_grad_(False)
    head.bias[:] = torch.linspace(0, 400, vocab)  # the maximum sits in the last tile for most rows
    h = (torch.randn(12, 8) * 30).requires_grad_(True)
    labels, mask = torch.randint(0, vocab, (12,)), torch.ones(12, dtype=torch.bool)
    loss, correct = chunked_head_loss(h, head, labels, mask, rows=5, cols=41)
    loss.sum().backward()
    g, h.grad = h.grad.clone(), None
    ref, ref_c = _plain(h, head, labels, mask)
    ref.sum().backward()
    assert torch.isfinite(loss).all() and float(loss.detach().max()) > 50
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-3) and torch.equal(correct, ref_c)
    assert torch.allclose(g, h.grad, rtol=1e-4, atol=1e-4)
