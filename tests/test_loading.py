"""A loaded Base: adapters go on and come off only through Base.adapted, and caches of loaded bases key them by
their (frozen) ModelSpec."""

from __future__ import annotations

import pytest
import torch

from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec
from memcore.data import build_samples, make_batch
from memcore.train import token_losses


def _batch(base):
    tok = base.tokenizer
    return make_batch(build_samples(tok, DataSpec(text="Seven pale moths circled the lamp.")), tok.pad_token_id)


def _adapter_params(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith((".A", ".B")) or "lora_" in n or "bypass_" in n]


@pytest.mark.parametrize("kind", ["lora", "bypass"])
def test_adapted_takes_the_adapter_off_even_when_the_block_fails(tiny_base, kind):
    b = _batch(tiny_base)
    plain, _ = token_losses(tiny_base.model, b)
    with pytest.raises(RuntimeError, match="inside"):
        with tiny_base.adapted(AdapterSpec(rank=2, layers="paper", kind=kind), seed=1) as m:
            assert _adapter_params(m)
            for p in m.parameters():
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.3)
            assert not torch.allclose(token_losses(m, b)[0], plain)
            raise RuntimeError("inside")
    assert _adapter_params(tiny_base.model) == []
    assert not any(p.requires_grad for p in tiny_base.model.parameters()) and not tiny_base.model.training
    assert torch.equal(token_losses(tiny_base.model, b)[0], plain)


def test_adapted_refuses_a_bad_placement_before_touching_the_base(tiny_base):
    with pytest.raises(MemcoreError, match="layer 99 does not exist"):
        with tiny_base.adapted(AdapterSpec(rank=2, layers=(99,))):
            pass
    assert _adapter_params(tiny_base.model) == []


def test_adapted_loads_a_saved_lora_folder_frozen(tiny_base, tmp_path):
    b = _batch(tiny_base)
    with tiny_base.adapted(AdapterSpec(rank=2, targets="mlp"), seed=0) as m:
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        trained, _ = token_losses(m, b)
        m.save_pretrained(tmp_path / "ad")
    with tiny_base.adapted(tmp_path / "ad") as again:
        assert torch.allclose(token_losses(again, b)[0], trained, atol=1e-6)
        assert not any(p.requires_grad for p in again.parameters())
    assert _adapter_params(tiny_base.model) == []


def test_a_model_spec_is_a_cache_key():
    a, b = ModelSpec(name="default"), ModelSpec(name="default")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert len({a, ModelSpec(quant="nf4"), ModelSpec(dtype="float32"), ModelSpec(trust_remote_code=True)}) == 4


def test_the_training_process_caches_bases_by_spec_and_copy(home, tiny_model_dir, monkeypatch):
    import memcore.loading as loading
    from memcore import service

    loads = []
    real = loading.load_base
    monkeypatch.setattr(loading, "load_base", lambda spec, h=None: loads.append(spec) or real(spec, h))
    engine = service.Engine(home)
    spec = ModelSpec(name=str(tiny_model_dir))
    first = engine.base(spec)
    assert engine.base(ModelSpec(name=str(tiny_model_dir))) is first and loads == [spec]  # an equal spec hits
    second = engine.base(spec, copy_index=1)
    assert second is not first and second.model is not first.model and second.tokenizer is first.tokenizer
    assert second.spec == spec and len(loads) == 1  # a copy is a deep copy, not a second load
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))
    engine.base(ModelSpec(name=str(tiny_model_dir), dtype="float32"))
    engine.base(ModelSpec(name=str(tiny_model_dir), dtype="bfloat16"))
    assert len(loads) == 3 and len(engine.bases) == service.MAX_CACHED_BASES
    assert (spec, 0) not in engine.bases  # the least recently used went first
    engine.store.close()


@pytest.mark.parametrize("load", ["load_tokenizer", "load_config", "load_base"])
def test_a_hub_model_that_cannot_be_reached_is_named_with_what_to_do(hub_unreachable, load):
    import memcore.loading as loading

    with pytest.raises(MemcoreError, match=r"cannot load model 'someone/no-such-model': it is not a local folder and "
                                           r"the Hugging Face hub is unreachable \(offline\?\); use the default model"):
        getattr(loading, load)(ModelSpec(name="someone/no-such-model"))


def test_a_hub_model_already_in_the_local_hub_cache_loads_with_the_hub_unreachable(hub_unreachable, tiny_model_dir):
    import shutil

    from memcore.loading import load_base, load_config, load_tokenizer

    # the hub cache's layout: models--{org}--{name}/snapshots/{commit}/ with refs/main naming the commit
    repo = hub_unreachable / "models--someone--tiny-llama"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = ModelSpec(name="someone/tiny-llama")
    assert load_config(spec).num_hidden_layers == 4
    assert load_tokenizer(spec)("Seven pale moths").input_ids
    base = load_base(spec)
    assert base.source == "someone/tiny-llama" and not any(p.requires_grad for p in base.model.parameters())
