"""The anatomy of a transformers causal LM: where its transformer blocks are, and what each linear layer in a
block does (attention or MLP), across the families transformers ships.

Pure scans of a module tree: nothing here changes a model. Both adapters (PEFT LoRA in memcore.placement,
the bypass in memcore.bypass) find their blocks here, so neither imports the other to do so.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memcore.config import MemcoreError

# Module roles across the families transformers ships. A linear layer belongs to the attention or the MLP by
# the class of the container it sits in (LlamaAttention, GPT2MLP, MptMLP, ...), else by its container's name,
# else (OPT puts fc1/fc2 straight in the block) by its own name.
_ATTN_CLASS_WORDS = ("attention", "attn")
_MLP_CLASS_WORDS = ("mlp", "feedforward", "ffn", "moe", "expert")
_ATTN_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj", "query_key_value", "query", "key",
               "value", "c_attn", "wqkv", "w_pack", "q", "k", "v", "o", "qkv", "in_proj", "dense"}
_MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "fc_in", "fc_out", "c_fc",
              "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "wi", "wo", "wi_0", "wi_1", "ff_proj", "ff_out"}
ROLES = ("attn", "mlp")


LAYER_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
CONTEXT_KEYS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
FALLBACK_CONTEXT = 2048  # tokens, where a config names no context length


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def layer_count(config: Any) -> int | None:
    """A model config's number of transformer blocks (the first positive integer among LAYER_KEYS), or None
    where the config does not say."""
    return _config_int(config, LAYER_KEYS)


def context_length(config: Any) -> int:
    """A model config's context window in tokens: the first positive integer among CONTEXT_KEYS, else
    FALLBACK_CONTEXT (2048)."""
    return _config_int(config, CONTEXT_KEYS) or FALLBACK_CONTEXT


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, bottom to top: the first ModuleList as long as the config's layer count
    (model.layers for Llama, transformer.h for GPT-2, model.decoder.layers for OPT); where the config does not
    say, the longest ModuleList. A mixture of experts keeps its experts in longer lists, hence the config first.

    Works on a bare model and on one wrapped by an adapter (the wrapper's modules include the model's).
    Raises MemcoreError when the model has no ModuleList at all."""
    lists = [mod for _, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    n = layer_count(getattr(model, "config", None))
    matching = [m for m in lists if len(m) == n]
    best = matching[0] if matching else max(lists, key=len, default=None)
    if best is None:
        raise MemcoreError("cannot find the transformer blocks of this model to place an adapter on")
    return best


def layers_path(model: nn.Module) -> str:
    """The dotted name of the blocks' ModuleList inside `model` ('model.layers' for Llama)."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise MemcoreError("cannot locate the transformer blocks by name")


def is_linear(mod: nn.Module) -> bool:
    """A linear layer an adapter can sit on: nn.Linear, GPT-2's Conv1D, or a bitsandbytes 4/8-bit linear."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def linear_names(block: nn.Module) -> list[str]:
    """Relative names of the linear layers inside one block ('self_attn.q_proj', 'mlp.down_proj', ...)."""
    return [name for name, mod in block.named_modules() if is_linear(mod)]


def module_role(block: nn.Module, name: str) -> str | None:
    """'attn' or 'mlp' for a linear layer of a block (by relative name), or None where neither is evident."""
    parts = name.split(".")
    containers = [block.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
    for container, cname in zip(reversed(containers), reversed(parts[:-1])):
        cls = type(container).__name__.lower()
        if any(w in cls for w in _ATTN_CLASS_WORDS) or any(w in cname.lower() for w in _ATTN_CLASS_WORDS):
            return "attn"
        if any(w in cls for w in _MLP_CLASS_WORDS) or any(w in cname.lower() for w in _MLP_CLASS_WORDS):
            return "mlp"
    leaf = parts[-1].lower()
    if leaf in _MLP_NAMES:
        return "mlp"
    if leaf in _ATTN_NAMES:
        return "attn"
    return None


def is_mixture_of_experts(block: nn.Module) -> bool:
    """Does the block route its MLP through experts (Mixtral, Qwen-MoE, ...)?"""
    return any(w in type(m).__name__.lower() for _, m in block.named_modules() for w in ("moe", "expert"))
