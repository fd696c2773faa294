"""Mechanics of the streaming core on a tiny random Llama (fast), and its contract on the real model."""

import math
from contextlib import ExitStack

import numpy as np
import pytest
import torch

from memcore.config import AdapterSpec, DataSpec, TrainSpec
from memcore.data import build_samples, make_batch
from memcore.measure import base_losses, token_losses
from memcore.placement import p_eff
from memcore.targets import target_module_regex
from memcore.train import FrozenPrefix, train_iter

TEXT = "Seven pale moths circled the lamp until the kettle sang and the window fogged over."


@pytest.fixture
def tiny(tiny_base):
    """Yields a function that attaches an adapter to the shared tiny base (Base.adapted), taking the previous one
    off first; the last one comes off when the test ends."""
    held = ExitStack()

    def attach(spec=AdapterSpec(rank=4), seed=0):
        held.close()
        return held.enter_context(tiny_base.adapted(spec, seed=seed))

    with held:
        yield attach


def _randomize_adapter(model, std):
    """Give every LoRA weight (B included, which starts at zero) a random value, so the adapter acts."""
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=std)


def _batch(base, text=TEXT, **kw):
    tok = base.tokenizer
    return make_batch(build_samples(tok, DataSpec(text=text, **kw)), tok.pad_token_id)


def test_p_eff_counts_lora_parameters_exactly(tiny, tiny_base):
    # tiny: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads -> k/v out 32; 4 layers
    m = tiny(AdapterSpec(rank=4, targets="all"))
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    expected = 4 * sum(4 * (i + o) for i, o in shapes.values())
    assert p_eff(m) == expected


def test_paper_preset_adapts_one_middle_layer_mlp(tiny_base):
    regex, chosen, layers = target_module_regex(tiny_base.model, AdapterSpec(rank=2, layers="paper"))
    assert layers == [2] and sorted(c.split(".")[-1] for c in chosen) == ["down_proj", "gate_proj", "up_proj"]


def test_rerun_with_same_seed_reproduces_numbers(tiny, tiny_base):
    b = _batch(tiny_base)
    spec = TrainSpec(method="sft", lr=1e-2, max_steps=4, stop_when_recalled=False)
    runs = []
    for _ in range(2):
        m = tiny(AdapterSpec(rank=4, dropout=0.1), seed=3)
        runs.append([(r.loss, r.delta_loss, r.p.tobytes()) for r in train_iter(m, b, spec)])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 5  # states after 0..4 updates


def test_reports_are_consistent(tiny, tiny_base):
    b = _batch(tiny_base)
    m = tiny()
    reports = list(train_iter(m, b, TrainSpec(method="sft", lr=5e-2, max_steps=6, stop_when_recalled=False)))
    assert [r.step for r in reports] == list(range(7)) and reports[-1].final and reports[-1].stop_reason == "max_steps"
    assert reports[0].delta_loss == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at zero: adapter on == off
    assert reports[-1].delta_loss > 0  # training lowered the loss
    for r in reports:
        assert r.n_tokens == b.n_targets
        # fp16 rounding
        assert r.n_above == int((r.p.astype(np.float32) > 0.5).sum()) or abs(r.n_above - (r.p > 0.5).sum()) <= 1
        assert r.n_correct == int(r.correct.sum())
        assert r.recalled == bool(r.correct.all())
        assert r.first_divergence == (None if r.recalled else int(np.argmin(r.correct)))
        assert r.bits_stored == pytest.approx(r.delta_loss * r.n_tokens / math.log(2), rel=1e-3, abs=1e-3)
    assert reports[-1].generate_recalled is not None and reports[-1].generated is not None


def test_cooperative_stop_and_time_limit(tiny, tiny_base):
    b = _batch(tiny_base)
    m = tiny()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    reports = list(train_iter(m, b, TrainSpec(method="sft", max_steps=50), should_stop=stop))
    assert reports[-1].stop_reason == "stopped" and reports[-1].step == 3
    reports = list(train_iter(m, b, TrainSpec(method="sft", max_steps=10_000, max_seconds=0.5)))
    assert reports[-1].stop_reason == "max_seconds" and reports[-1].step < 10_000


def test_memft_ot_skips_when_nothing_is_below_tau(tiny, tiny_base):
    b = _batch(tiny_base)
    m = tiny()
    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    # tau so small that every token is already "above" it: nothing to learn, so no update at all
    reports = list(train_iter(m, b, TrainSpec(method="memft-ot", tau=1e-12, max_steps=3, stop_when_recalled=False)))
    assert all(r.skipped and r.active == 0 for r in reports[:-1])
    after = [p for p in m.parameters() if p.requires_grad]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # with the 'mean' fallback the same situation trains on the plain mean loss
    reports = list(train_iter(m, b, TrainSpec(method="memft-ot", tau=1e-12, max_steps=3, stop_when_recalled=False,
                                              ot_when_empty="mean")))
    assert not any(r.skipped for r in reports[:-1]) and reports[-1].delta_loss > 0


def _grads(model, batch, tau, w=None):
    from memcore import objectives as obj

    model.zero_grad(set_to_none=True)
    loss, _ = token_losses(model, batch)
    if w is None:
        w = obj.ot_weights(loss.detach(), batch.target_mask, tau)
    obj.weighted_mean(loss, w).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], loss.detach(), w


def test_memft_ot_update_ignores_labels_of_tokens_above_the_cut(tiny, tiny_base):
    b = _batch(tiny_base)
    m = tiny()
    _randomize_adapter(m, 0.02)  # B non-zero, so that every LoRA parameter gets a gradient
    loss0, _ = token_losses(m, b)
    p = torch.exp(-loss0.detach())[b.target_mask]
    tau = float(p.median())  # about half the tokens are above the cut
    g1, loss, w = _grads(m, b, tau)
    above = (w == 0) & b.target_mask
    assert 0 < int(above.sum()) < b.n_targets
    labels = b.labels.clone()
    labels[above] = (labels[above] + 17) % 1000  # change the targets of the tokens above the cut only
    # (the weights come from the state before the update, as in train_iter; the changed labels then enter the loss)
    g2, _, _ = _grads(m, b.with_labels(labels), tau, w=w)
    assert all(torch.allclose(x, y, atol=0, rtol=0) for x, y in zip(g1, g2))
    # whereas changing a target below the cut does change the update
    below = torch.nonzero(w > 0)[0]
    labels2 = b.labels.clone()
    labels2[below[0], below[1]] = (labels2[below[0], below[1]] + 17) % 1000
    g3, _, _ = _grads(m, b.with_labels(labels2), tau, w=w)
    assert not all(torch.allclose(x, y) for x, y in zip(g1, g3))


def test_frozen_prefix_cache_matches_full_forward_and_gradients(tiny, tiny_base):
    b = _batch(tiny_base)
    m = tiny(AdapterSpec(rank=4, layers="paper"))
    _randomize_adapter(m, 0.05)
    prefix = FrozenPrefix.maybe(m)
    assert prefix is not None and prefix.k == 2
    prefix.capture(m, b)
    full, _ = token_losses(m, b)
    full.sum().backward()
    g_full = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    m.zero_grad(set_to_none=True)
    with prefix.installed():
        cached, _ = token_losses(m, b)
    cached.sum().backward()
    g_cached = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    assert torch.allclose(full, cached, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g_full, g_cached))
    # outside the context the blocks run normally again
    again, _ = token_losses(m, b)
    assert torch.allclose(again, full, atol=1e-6)
    assert FrozenPrefix.maybe(tiny(AdapterSpec(rank=2, layers="all"))) is None


def test_memft_sw_multi_sample_trains_with_curriculum(tiny, tiny_base):
    b = make_batch(build_samples(tiny_base.tokenizer, DataSpec(phonebook=5)), tiny_base.tokenizer.pad_token_id)
    m = tiny()
    reports = list(train_iter(m, b, TrainSpec(method="memft-sw", lr=5e-2, max_steps=10, stop_when_recalled=False)))
    n_per = [len(s.target_ids) for s in b.samples]
    # the first fifth of the budget trains only on the first sample: active tokens never exceed its length
    assert 0 < reports[0].active <= n_per[0]
    assert reports[-2].active > n_per[0]
    assert reports[-1].delta_loss > 0


def test_base_loss_is_measured_with_adapter_off(tiny_base):
    b = _batch(tiny_base)
    with tiny_base.adapted(AdapterSpec(rank=4)) as m:
        _randomize_adapter(m, 0.05)
        with_adapter, _ = token_losses(m, b)
        base = base_losses(m, b)
    assert not torch.allclose(with_adapter, base)
    plain, _ = token_losses(tiny_base.model, b)
    assert torch.allclose(base, plain, atol=1e-6)


def test_greedy_check_never_stops_early_on_an_eos(tmp_path, default_model_dir):
    """A model whose argmax is always its EOS token: HF generate stops after one token, the recall check must
    decode the whole target length (a target may legitimately contain that id)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memcore.data import Sample
    from memcore.measure import greedy_generate

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=0, bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit is 0, so the argmax is token 0: the EOS, at every position
    s = Sample([1, 5, 6], [0] * 12)
    hf = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=12, do_sample=False)[0, 3:].tolist()
    ours = greedy_generate(model, [s])[0]
    assert ours == [0] * 12 and len(hf) < 12  # generate stopped at the EOS; the check did not
    # ours is the argmax continuation, step by step
    ids = torch.tensor([s.prompt_ids + ours[:-1]])
    with torch.no_grad():
        argmax = model(input_ids=ids).logits[0, 2:].argmax(-1).tolist()
    assert argmax == ours


def test_many_samples_decode_as_batches_with_each_rows_own_tokens(default_base, monkeypatch):
    """A PhoneBook's recall check decodes its entries in left-padded batches: every entry gets exactly the tokens it
    gets decoded alone (prompts of different lengths, targets of different lengths, more entries than one batch)."""
    import memcore.measure as measure
    from memcore.data import Sample

    tok = default_base.tokenizer
    book = build_samples(tok, DataSpec(phonebook=7, seed=3))
    odd = [Sample(tok.encode("The capital of France is"), [0] * 5),
           Sample(tok.encode("Once upon a time, in a land far away, there lived a"), [0] * 9)]
    samples = book + odd
    assert len({len(s.prompt_ids) for s in samples}) >= 3  # really padded
    monkeypatch.setattr(measure, "DECODE_ROWS", 4)  # 9 samples: 3 batches
    model = default_base.model
    together = measure.greedy_generate(model, samples)
    alone = [measure.greedy_generate(model, [s])[0] for s in samples]
    assert together == alone and [len(g) for g in together] == [len(s.target_ids) for s in samples]


@pytest.mark.parametrize("method", ["sft", "memft-sw"])
def test_resuming_from_a_checkpoint_continues_exactly(tiny, tiny_base, method):
    """Stop at step 5 with a checkpoint, resume on a fresh adapter: the same reports as a run never stopped
    (adapter, AdamW moments, memft-sw's window and the dropout RNG all come back)."""
    b = _batch(tiny_base)
    spec = TrainSpec(method=method, lr=2e-2, max_steps=10, stop_when_recalled=False, verify=False)
    whole = [(r.step, r.loss, r.p.tobytes())
             for r in train_iter(tiny(AdapterSpec(rank=4, dropout=0.1), seed=3), b, spec)]

    saved = []
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] > 5

    first = list(train_iter(tiny(AdapterSpec(rank=4, dropout=0.1), seed=3), b, spec, should_stop=stop_after_five,
                            checkpoint=saved.append))
    assert first[-1].stop_reason == "stopped" and saved[-1].step == 5
    resumed = list(train_iter(tiny(AdapterSpec(rank=4, dropout=0.1), seed=99), b, spec, resume=saved[-1]))
    assert resumed[0].step == 5
    got = [(r.step, r.loss, r.p.tobytes()) for r in first[:-1]] + [(r.step, r.loss, r.p.tobytes()) for r in resumed]
    assert [g[0] for g in got] == [w[0] for w in whole]
    assert all(g[1] == pytest.approx(w[1], rel=1e-5) for g, w in zip(got, whole))


def test_checkpoints_are_taken_on_the_clock(tiny, tiny_base):
    b = _batch(tiny_base)
    saved = []
    spec = TrainSpec(method="sft", max_steps=6, stop_when_recalled=False, verify=False, checkpoint_every=1e-9)
    list(train_iter(tiny(), b, spec, checkpoint=saved.append))
    assert [c.step for c in saved] == [1, 2, 3, 4, 5, 6]  # at the top of every step after the first
    saved.clear()
    list(train_iter(tiny(), b, TrainSpec(method="sft", max_steps=6, stop_when_recalled=False, verify=False,
                                         checkpoint_every=0),
                    checkpoint=saved.append))
    assert saved == []  # 0: never (a run that reaches its budget needs none)
