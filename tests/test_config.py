import math

import pytest

from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"targets": "bogus"}, "targets"), ({"targets": ()}, "targets"),
    ({"layers": "middle"}, "layers"), ({"layers": (-1,)}, "layers"),
])
def test_adapter_spec_rejects_bad_values_naming_them(kwargs, words):
    with pytest.raises(MemcoreError, match=words):
        AdapterSpec(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    ({"tau": 0}, "tau"), ({"tau": 1}, "tau"), ({"tau": 1.5}, "tau"), ({"tau": math.nan}, "tau"),
    ({"lr": 0}, "learning rate"), ({"lr": -1e-3}, "learning rate"), ({"lr": math.nan}, "learning rate"),
    ({"lr": "1e-3"}, "learning rate"),
    ({"max_steps": 0}, "max steps"), ({"max_steps": 1.5}, "max steps"), ({"method": "adam"}, "method"),
    ({"max_seconds": 0}, "max seconds"), ({"ot_when_empty": "maybe"}, "ot_when_empty"),
])
def test_train_spec_rejects_bad_values_naming_them(kwargs, words):
    with pytest.raises(MemcoreError, match=words):
        TrainSpec(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    ({"text": ""}, "empty"), ({"text": " \n\t "}, "empty"), ({"text": 42}, "string"),
    ({"text": "a", "phonebook": 3}, "exactly one .* got text and phonebook"), ({}, "exactly one .* got none"),
    ({"phonebook": 0}, "phonebook"),
    ({"text": "a", "noise": 1.5}, "noise"), ({"text": "a", "length": 0}, "length"),
])
def test_data_spec_rejects_bad_values(kwargs, words):
    with pytest.raises(MemcoreError, match=words):
        DataSpec(**kwargs)


def test_model_spec_rejects_unknown_quant_and_device():
    with pytest.raises(MemcoreError, match="quant"):
        ModelSpec(quant="fp8")
    with pytest.raises(MemcoreError, match="device"):
        ModelSpec(device="tpu")


def test_run_spec_round_trips_through_dict():
    spec = RunSpec(adapter=AdapterSpec(rank=4, layers=(3, 5), targets=("q_proj", "v_proj")),
                   data=DataSpec(text="hello"), train=TrainSpec(method="memft-sw", tau=0.7))
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_paper_preset_forces_alpha_equal_rank():
    assert AdapterSpec(rank=16, alpha=64, layers="paper").lora_alpha == 16
    assert AdapterSpec(rank=16, alpha=64).lora_alpha == 64
    assert AdapterSpec(rank=4).lora_alpha == 4
