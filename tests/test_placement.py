"""Adapter presets (all, attn, mlp, paper) by module role on many architectures, each built tiny in code:
the right linear layers are chosen, PEFT attaches, a step trains, and the frozen-prefix cache stays exact."""

from __future__ import annotations

import pytest
import torch

from memcore.blocks import decoder_layers, module_role
from memcore.config import AdapterSpec, MemcoreError, TrainSpec
from memcore.data import Sample, make_batch
from memcore.measure import token_losses
from memcore.placement import attach_adapter, detach_adapter, placement_of
from memcore.targets import target_module_regex
from memcore.train import FrozenPrefix, train_iter

V = 96  # vocabulary of the tiny models


def _configs():
    import transformers as T

    small = dict(vocab_size=V)
    return {
        # name: (config, attention linear layers, MLP linear layers)
        "llama": (T.LlamaConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2),
                  {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
                  {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        "qwen2": (T.Qwen2Config(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2),
                  {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
                  {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        "gemma": (T.GemmaConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                  {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
                  {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        "gpt2": (T.GPT2Config(**small, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
                 {"attn.c_attn", "attn.c_proj"}, {"mlp.c_fc", "mlp.c_proj"}),
        "gpt_neox": (T.GPTNeoXConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, bos_token_id=1, eos_token_id=2),
                     {"attention.query_key_value", "attention.dense"}, {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
        "opt": (T.OPTConfig(**small, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0),
                {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}, {"fc1", "fc2"}),
        "phi": (T.PhiConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
                {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"},
                {"mlp.fc1", "mlp.fc2"}),
        "falcon": (T.FalconConfig(**small, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, bos_token_id=1,
                                  eos_token_id=2),
                   {"self_attention.query_key_value", "self_attention.dense"},
                   {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
        "gptj": (T.GPTJConfig(**small, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=1,
                              eos_token_id=2),
                 {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}, {"mlp.fc_in", "mlp.fc_out"}),
        "bloom": (T.BloomConfig(**small, hidden_size=32, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2),
                  {"self_attention.query_key_value", "self_attention.dense"},
                  {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
        "mpt": (T.MptConfig(**small, d_model=32, n_layers=4, n_heads=4, expansion_ratio=2),
                {"attn.Wqkv", "attn.out_proj"}, {"ffn.up_proj", "ffn.down_proj"}),
        "phi3": (T.Phi3Config(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 {"self_attn.qkv_proj", "self_attn.o_proj"}, {"mlp.gate_up_proj", "mlp.down_proj"}),
    }


ARCHS = sorted(_configs())


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    out = {}
    for name, (cfg, attn, mlp) in _configs().items():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).eval()
        m.requires_grad_(False)
        out[name] = (m, attn, mlp)
    return out


def _batch():
    g = torch.Generator().manual_seed(1)
    return make_batch([Sample([1, 5, 7], torch.randint(3, V, (24,), generator=g).tolist())], pad_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_pick_layers_by_role(models, arch):
    model, attn, mlp = models[arch]
    assert len(decoder_layers(model)) == 4
    block = decoder_layers(model)[0]
    assert {n for n in attn | mlp if module_role(block, n) == "attn"} == attn
    assert {n for n in attn | mlp if module_role(block, n) == "mlp"} == mlp
    for targets, want in (("attn", attn), ("mlp", mlp), ("all", attn | mlp)):
        _, chosen, idx = target_module_regex(model, AdapterSpec(targets=targets))
        assert set(chosen) == want and idx == [0, 1, 2, 3], (targets, chosen)
    _, chosen, idx = target_module_regex(model, AdapterSpec(layers="paper"))
    assert set(chosen) == mlp and idx == [2]  # two thirds up: layer 2 of 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["attn", "mlp", "all", "paper"])
def test_every_preset_attaches_and_trains(models, arch, preset):
    model, attn, mlp = models[arch]
    spec = AdapterSpec(rank=2, layers="paper") if preset == "paper" else AdapterSpec(rank=2, targets=preset)
    peft_model = attach_adapter(model, spec, seed=0)
    try:
        adapted = set(peft_model.stack.modules)
        trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
        assert adapted and trainable == {id(p) for p in peft_model.stack.parameters()}
        batch = _batch()
        reports = list(train_iter(peft_model, batch, TrainSpec(method="sft", lr=5e-2, max_steps=3, verify=False,
                                                               stop_when_recalled=False)))
        assert reports[-1].final and reports[-1].step == 3
        assert reports[-1].loss < reports[0].loss  # the adapter learned something
        if preset == "paper":  # the frozen-prefix cache gives the same losses as the full forward
            prefix = FrozenPrefix.maybe(peft_model)
            assert prefix is not None and prefix.k == 2
            prefix.capture(peft_model, batch)
            full, _ = token_losses(peft_model, batch)
            with prefix.installed():
                cached, _ = token_losses(peft_model, batch)
            assert torch.allclose(full, cached, atol=1e-5)
    finally:
        models[arch] = (detach_adapter(peft_model), attn, mlp)


def test_a_mixture_of_experts_mlp_is_refused_with_a_reason():
    import transformers as T

    cfg = T.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(MemcoreError, match="mixture of experts"):
        target_module_regex(model, AdapterSpec(targets="mlp"))
    _, chosen, _ = target_module_regex(model, AdapterSpec(targets="attn"))
    assert set(chosen) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


def test_the_placement_is_scanned_once_when_the_adapter_is_attached(models, monkeypatch):
    """The frozen-prefix cache and block recomputation read the Placement recorded at attach time: with the block
    scan broken after attaching they still work, and detaching forgets it."""
    import memcore.blocks as blocks
    import memcore.placement as placement
    import memcore.train as train
    from memcore.train import recomputed, use_recompute

    model, attn, mlp = models["llama"]
    peft_model = attach_adapter(model, AdapterSpec(rank=2, layers=(1, 3)), seed=0)
    try:
        p = placement_of(peft_model)
        assert p is placement_of(peft_model) and p.layers is decoder_layers(model)
        assert p.lowest_adapted == 1 and not p.trainable_below_blocks

        def no_rescan(_model):
            raise AssertionError("the blocks were scanned again")

        for module in (blocks, placement, train):  # wherever a scan could come from
            if hasattr(module, "decoder_layers"):
                monkeypatch.setattr(module, "decoder_layers", no_rescan)
        monkeypatch.setattr(placement.Placement, "of", classmethod(lambda cls, m: no_rescan(m)))
        prefix = FrozenPrefix.maybe(peft_model)
        assert prefix is not None and prefix.k == 1 and prefix.layers is p.layers
        assert use_recompute(peft_model, _batch(), "auto", 1) is False
        with recomputed(peft_model, 1):
            assert all("forward" in vars(b) for b in list(p.layers)[1:])
        monkeypatch.undo()
    finally:
        models["llama"] = (detach_adapter(peft_model), attn, mlp)
    assert placement_of(peft_model) is not p  # forgotten at detach: a fresh scan


def test_something_trainable_below_the_blocks_rules_out_the_frozen_prefix(models):
    """A model memcore did not attach (here: weights unfrozen by hand) is scanned afresh each time."""
    model, _, _ = models["llama"]
    try:
        decoder_layers(model)[2].mlp.down_proj.weight.requires_grad_(True)
        prefix = FrozenPrefix.maybe(model)
        assert prefix is not None and prefix.k == 2
        model.get_input_embeddings().weight.requires_grad_(True)
        assert placement_of(model).trainable_below_blocks and placement_of(model).lowest_adapted == 2
        assert FrozenPrefix.maybe(model) is None
    finally:
        model.requires_grad_(False)
