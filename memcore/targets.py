"""Which blocks and which linear layers an AdapterSpec names on a given model.

An AdapterSpec names blocks ('all', 'paper' or indices) and linear layers (a role preset or module names);
``target_module_regex`` turns that into the exact target set (a PEFT-style full-name regex), refusing what the
model does not have. Used by memcore.stack to build adapters and by the runner and sweeps to describe them.
"""

from __future__ import annotations

import re

from torch import nn

from memcore.blocks import ROLES, decoder_layers, is_mixture_of_experts, layers_path, linear_names, module_role
from memcore.config import AdapterSpec, MemcoreError


def paper_layer(n_layers: int) -> int:
    """The single layer the 'paper' preset adapts: two thirds of the way up (layer 20 of 30)."""
    return min(n_layers - 1, (2 * n_layers) // 3)


def adapter_layers(model: nn.Module, spec: AdapterSpec) -> list[int]:
    """Indices of the blocks an adapter spec places on ('all', 'paper' or explicit), ascending.

    Raises MemcoreError naming the first layer index the model does not have."""
    n = len(decoder_layers(model))
    if spec.layers == "all":
        return list(range(n))
    if spec.layers == "paper":
        return [paper_layer(n)]
    bad = [i for i in spec.layers if i >= n]
    if bad:
        raise MemcoreError(f"layer {bad[0]} does not exist: this model has layers 0..{n - 1}")
    return sorted(set(spec.layers))


def target_module_regex(model: nn.Module, spec: AdapterSpec) -> tuple[str, list[str], list[int]]:
    """A full-name regex selecting exactly the adapted linear layers, with their relative names (as in one
    block: 'mlp.down_proj') and the block indices.

    The 'paper' layers with targets 'all' mean the MLP. Raises MemcoreError naming the missing module, a preset
    that matches nothing (listing the block's linear layers), or an MLP of experts that are not linear layers."""
    idx = adapter_layers(model, spec)
    block = decoder_layers(model)[idx[0]]
    available = linear_names(block)
    targets = "mlp" if spec.layers == "paper" and spec.targets == "all" else spec.targets
    if targets == "all":
        chosen = available
    elif targets in ROLES:
        chosen = [a for a in available if module_role(block, a) == targets]
        if not chosen and targets == "mlp" and is_mixture_of_experts(block):
            raise MemcoreError("this model's MLP is a mixture of experts whose experts are not linear layers; "
                               f"use --targets attn or name modules; linear layers: {', '.join(available)}")
    else:
        chosen = [a for a in available if a in targets or a.split(".")[-1] in targets]
        missing = [t for t in targets if not any(a == t or a.split(".")[-1] == t for a in available)]
        if missing:
            raise MemcoreError(f"no module named {missing[0]!r} in this model's blocks; "
                               f"available: {', '.join(available)}")
    if not chosen:
        raise MemcoreError(f"target preset {targets!r} matches no linear layer; available: {', '.join(available)}")
    prefix = re.escape(layers_path(model))
    regex = rf"{prefix}\.({'|'.join(str(i) for i in idx)})\.({'|'.join(re.escape(c) for c in chosen)})"
    return regex, chosen, idx
