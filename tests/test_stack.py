"""Many runs' adapters on one base: each row goes through its own slot, a slot computes exactly its rank-r adapter
(zero padding stays zero), saved slots load as stock PEFT or bypass adapters with the same outputs, and SlotAdamW
updates each slot as its own torch AdamW would."""

from __future__ import annotations

import copy

import pytest
import torch

from memcore.config import AdapterSpec, ModelSpec
from memcore.loading import load_base
from memcore.stack import AdapterStack, SlotAdamW


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base(ModelSpec(name=str(tiny_model_dir)))


def _ids(n_rows: int, T: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 1000, (n_rows, T), generator=g)


def _randomize(stack: AdapterStack, slot: int, seed: int) -> None:
    """Non-zero A and B within the slot's rank (training would get there); padding stays zero."""
    g = torch.Generator().manual_seed(seed)
    r = stack.slots[slot].rank
    with torch.no_grad():
        for m in stack.modules.values():
            m.A[slot, :, :r] = torch.randn(m.d_in, r, generator=g) * 0.2
            m.B[slot, :r, :] = torch.randn(r, m.d_out, generator=g) * 0.2


@pytest.mark.parametrize("kind", ["lora", "bypass"])
def test_each_row_goes_through_its_own_slot_as_if_alone(tiny, kind):
    model = copy.deepcopy(tiny.model)
    specs = [AdapterSpec(kind=kind, rank=r, layers=(1, 2), dropout=0.0) for r in (1, 2, 4)]
    stack = AdapterStack(model, specs[0], slots=3, max_rank=4)
    for s, spec in enumerate(specs):
        stack.assign(s, spec, seed=s)
        _randomize(stack, s, seed=10 + s)
    ids = _ids(3)
    stack.set_rows([0, 1, 2])
    with torch.no_grad():
        together = model(input_ids=ids).logits
    for s, spec in enumerate(specs):  # the same adapter alone, in a stack of one slot of exactly its rank
        alone_model = copy.deepcopy(tiny.model)
        alone = AdapterStack(alone_model, spec, slots=1, max_rank=spec.rank)
        alone.assign(0, spec, seed=s)
        alone.load(0, stack.state(s))
        alone.set_rows([0])
        with torch.no_grad():
            one = alone_model(input_ids=ids[s:s + 1]).logits
        torch.testing.assert_close(together[s:s + 1], one, rtol=1e-5, atol=1e-5)
    with stack.disabled(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    base = stack.detach()
    assert not any(p.requires_grad for p in base.parameters())
    assert not any("SlotAdapter" in type(m).__name__ for m in base.modules())


def test_padding_beyond_a_slots_rank_stays_zero_under_training(tiny):
    model = copy.deepcopy(tiny.model)
    spec = AdapterSpec(rank=1, layers=(0, 3))
    stack = AdapterStack(model, spec, slots=2, max_rank=4)
    stack.assign(0, spec, seed=0)
    stack.assign(1, AdapterSpec(rank=4, layers=(0, 3)), seed=1)
    opt = SlotAdamW(stack.parameters(), 2)
    ids = _ids(2)
    stack.set_rows([0, 1])
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step([0, 1], [1e-2, 1e-2], [0.0, 0.0])
    for m in stack.modules.values():
        assert m.A[0, :, 1:].abs().max() == 0 and m.B[0, 1:, :].abs().max() == 0
        assert m.B[0, :1, :].abs().max() > 0 and m.B[1].abs().max() > 0  # both trained


def test_a_saved_lora_slot_loads_in_stock_peft_with_the_same_outputs(tiny, tmp_path):
    from peft import PeftModel

    model = copy.deepcopy(tiny.model)
    spec = AdapterSpec(rank=4, alpha=8.0, targets="all", layers=(1, 3))
    stack = AdapterStack(model, AdapterSpec(rank=4, targets="all", layers=(1, 3)), slots=2, max_rank=4)
    stack.assign(0, AdapterSpec(rank=2, targets="all", layers=(1, 3)), seed=0)
    stack.assign(1, spec, seed=1)
    _randomize(stack, 1, seed=7)
    stack.set_rows([1])
    ids = _ids(1)
    with torch.no_grad():
        mine = model(input_ids=ids).logits
    stack.save(1, tmp_path / "peft", spec, base_name="tiny")
    peft = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert stack.p_eff(1) == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)


def test_a_saved_bypass_slot_loads_in_memcores_bypass_with_the_same_outputs(tiny, tmp_path):
    from memcore.bypass import load_bypass

    model = copy.deepcopy(tiny.model)
    spec = AdapterSpec(kind="bypass", rank=3, layers="paper")
    stack = AdapterStack(model, spec, slots=1, max_rank=3)
    stack.assign(0, spec, seed=4)
    _randomize(stack, 0, seed=5)
    stack.set_rows([0])
    ids = _ids(2)
    stack.set_rows([0, 0])
    with torch.no_grad():
        mine = model(input_ids=ids).logits
    stack.save(0, tmp_path / "bp", spec, base_name="tiny")
    loaded = load_bypass(copy.deepcopy(tiny.model), tmp_path / "bp")
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert stack.p_eff(0) == 2 * 3 * 64 * 1


def test_slot_adamw_moves_each_slot_as_its_own_torch_adamw(tiny):
    """Two slots, different learning rates and weight decays, one of them skipping a step: each slot ends where a
    torch.optim.AdamW of its own (over the same gradients) ends."""
    p = torch.nn.Parameter(torch.randn(2, 5, 3))
    opt = SlotAdamW([p], 2)
    refs = [torch.nn.Parameter(p[s].detach().clone()) for s in range(2)]
    ref_opts = [torch.optim.AdamW([refs[0]], lr=1e-2, weight_decay=0.0),
                torch.optim.AdamW([refs[1]], lr=3e-3, weight_decay=0.1)]
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        grad = torch.randn(2, 5, 3, generator=g)
        p.grad = grad.clone()
        moving = [0, 1] if step != 2 else [0]  # slot 1 skips step 2 (memft-ot with nothing below τ)
        opt.step(moving, [1e-2, 3e-3][: len(moving)] if moving == [0, 1] else [1e-2], [0.0, 0.1][: len(moving)])
        for s in moving:
            refs[s].grad = grad[s].clone()
            ref_opts[s].step()
    for s in range(2):
        torch.testing.assert_close(p[s].detach(), refs[s].detach(), rtol=1e-6, atol=1e-7)
    assert opt.steps == [5, 4]


def test_dropout_masks_come_from_each_slots_own_generator(tiny):
    model = copy.deepcopy(tiny.model)
    spec = AdapterSpec(kind="bypass", rank=2, layers=(2,), dropout=0.5)
    stack = AdapterStack(model, spec, slots=2, max_rank=2)
    stack.assign(0, spec, seed=0)
    stack.assign(1, spec, seed=0)  # the same run twice: the same masks, whatever the other rows do
    _randomize(stack, 0, 1)
    stack.load(1, stack.state(0))
    ids = _ids(1).repeat(2, 1)
    stack.set_rows([0, 1])
    stack.set_dropout(True)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out[0], out[1])
    stack.new_forward()
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert not torch.allclose(out, again)  # a new forward draws new masks
