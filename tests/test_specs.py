"""memcore.specs: one way from plain settings to RunSpecs (CLI and app), and the preflight against a model."""

from dataclasses import fields
from types import SimpleNamespace

import pytest

from memcore.blocks import context_length, layer_count
from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.data import encode_text
from memcore.specs import (
    OPTIONS,
    check_layers,
    default,
    field_docs,
    option_help,
    option_type,
    parse_keys,
    parse_layers,
    parse_targets,
    preflight,
    run_spec,
    run_specs,
)

SPECS = (ModelSpec, AdapterSpec, DataSpec, TrainSpec)


def test_every_spec_field_is_an_option_with_its_dataclass_default_and_a_docstring():
    for cls in SPECS:
        docs = field_docs(cls)
        for f in fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring to serve as help"
    assert {n for n, places in OPTIONS.items() if len(places) > 1} == {"seed"}  # the one option that sets two fields
    assert OPTIONS["model"] == ((ModelSpec, "name"),) and OPTIONS["adapter"] == ((AdapterSpec, "kind"),)
    assert (default("rank"), default("lr"), default("max_steps"), default("method")) == (8, 2e-3, 200, "memft-ot")
    assert default("rank") == AdapterSpec().rank and default("tau") == TrainSpec().tau
    assert default("model") == ModelSpec().name and default("prompt") == DataSpec(text="x").prompt
    assert option_help("rank") == "Adapter rank r (of the LoRA or of the bypass)." and "AdamW" in option_help("lr")


def test_settings_left_out_take_the_dataclass_defaults():
    assert run_spec({"text": "x"}) == RunSpec(data=DataSpec(text="x"))
    spec = run_spec({"text": "x", "adapter": "bypass"})
    assert spec.adapter.layers == "paper" and spec.adapter.kind == "bypass"  # the bypass is one layer's adapter
    assert run_spec({"text": "x", "adapter": "bypass", "layers": None}).adapter.layers == "paper"
    assert run_spec({"text": "x", "layers": None}).adapter.layers == "all"


def test_settings_reach_their_fields_and_seed_sets_both_seeds():
    spec = run_spec({"random_tokens": 12, "model": "m", "quant": "nf4", "rank": 2, "layers": "0, 3 5",
                     "targets": "q_proj,v_proj", "seed": 7, "method": "sft", "tau": 0.7, "until": "converged",
                     "prompt": None})
    assert spec.model == ModelSpec(name="m", quant="nf4")
    assert spec.adapter == AdapterSpec(rank=2, layers=(0, 3, 5), targets=("q_proj", "v_proj"))
    assert spec.data == DataSpec(random_tokens=12, seed=7, prompt=None)
    assert spec.train == TrainSpec(method="sft", tau=0.7, until="converged", seed=7)


def test_compare_mode_gives_one_spec_per_method_alike_otherwise():
    a, b = run_specs({"text": "x", "rank": 4}, methods=["sft", "memft-ot"])
    assert (a.train.method, b.train.method) == ("sft", "memft-ot")
    assert a.adapter == b.adapter and a.data == b.data and a.model == b.model
    assert run_specs({"text": "x", "method": "memft-sw"}) == [run_spec({"text": "x", "method": "memft-sw"})]


@pytest.mark.parametrize("settings, words", [
    ({"text": "x", "layers": "x,y"}, "layers must be 'all', 'paper' or layer indices like 0,5,9, got 'x,y'"),
    ({"text": "x", "layers": "3,-1"}, "layers must be layer indices >= 0 (like 0,5,9), got 3,-1"),
    ({"text": "x", "adapter": "bypass", "alpha": 4.0}, "--alpha and --targets apply to LoRA"),
    ({"text": "x", "adapter": "bypass", "targets": "attn"}, "--alpha and --targets apply to LoRA"),
    ({"text": "x", "rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"text": "x", "layers": "1,,2"}, "layers '1,,2' has an empty item"),
    ({"text": "x", "layers": "1,2,"}, "layers '1,2,' has an empty item"),
    ({"text": "x", "layers": "3,5,3"}, "layers '3,5,3' lists 3 twice"),
    ({"text": "x", "targets": "q_proj,,v_proj"}, "targets 'q_proj,,v_proj' has an empty item"),
    ({"text": "x", "rnak": 4}, "unknown setting 'rnak'"),
    ({}, "give exactly one of"),
    ({"text": "x", "phonebook": 3}, "got text and phonebook"),
])
def test_bad_settings_are_refused_naming_the_value(settings, words):
    with pytest.raises(MemcoreError) as e:
        run_spec(settings)
    assert words in str(e.value)


def test_list_parsers():
    assert parse_layers("paper") == "paper" and parse_layers(" all ") == "all"
    assert parse_layers("0,5,9") == parse_layers("0 5 9") == parse_layers([0, 5, 9]) == (0, 5, 9)
    assert parse_targets("mlp") == "mlp" and parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_keys("") is None and parse_keys(" query , target ") == ("query", "target")
    with pytest.raises(MemcoreError, match="two names, PROMPT,TARGET; got 'a,b,c'"):
        parse_keys("a,b,c")


def test_option_types_come_from_the_annotations():
    assert option_type("rank") == (int, None) and option_type("alpha") == (float, None)
    assert option_type("quant") == (str, ("none", "nf4", "int8"))
    assert option_type("method")[1] == ("sft", "memft-ot", "memft-sw")
    assert option_type("layers") == (str, None) and option_type("length") == (int, None)
    assert option_type("chat_template") == (bool, None)


def test_context_length_and_layer_count_read_every_key_models_read():
    assert context_length(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2
    assert context_length(SimpleNamespace(seq_length=4096, max_position_embeddings=None)) == 4096
    assert context_length(SimpleNamespace()) == 2048  # what training assumes where the config is silent
    assert layer_count(SimpleNamespace(num_hidden_layers=30)) == 30 and layer_count(SimpleNamespace(n_layer=12)) == 12
    assert layer_count(SimpleNamespace()) is None
    check_layers(AdapterSpec(layers=(0, 3)), 4)
    check_layers(AdapterSpec(layers=(99,)), None)  # unknown layer count: nothing to check against
    with pytest.raises(MemcoreError, match=r"layer 4 does not exist: this model has layers 0\.\.3"):
        check_layers(AdapterSpec(layers=(1, 4, 7)), 4)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_preflight_counts_target_tokens_and_checks_them_against_the_model(tokenizer):
    cfg = SimpleNamespace(max_position_embeddings=512, num_hidden_layers=4)
    ok = preflight(run_spec({"text": "one two three four five", "layers": "1,3"}), tokenizer, cfg)
    assert ok.n_tokens == len(encode_text(tokenizer, "one two three four five"))
    assert (ok.context_length, ok.n_layers) == (512, 4) and sum(len(s.target_ids) for s in ok.samples) == ok.n_tokens
    assert preflight(run_spec({"random_tokens": 12}), tokenizer, cfg).n_tokens == 12

    with pytest.raises(MemcoreError, match=r"layer 4 does not exist: this model has layers 0\.\.3"):
        preflight(run_spec({"text": "one two", "layers": "4"}), tokenizer, cfg)
    n = preflight(run_spec({"text": "word " * 100, "max_tokens": 5000}), tokenizer, cfg).n_tokens
    with pytest.raises(MemcoreError, match=rf"the text is {n} target tokens, more than the configured maximum of 50"):
        preflight(run_spec({"text": "word " * 100, "max_tokens": 50}), tokenizer, cfg)
    gpt2_like = SimpleNamespace(n_positions=64, n_layer=2)  # a context named as GPT-2 names it is still checked
    with pytest.raises(MemcoreError, match=r"more than the model's context of 64 tokens"):
        preflight(run_spec({"text": "word " * 100}), tokenizer, gpt2_like)
