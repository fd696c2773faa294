"""Where an adapter goes on a model, putting it there and taking it off, and what it then costs.

An AdapterSpec names blocks ('all', 'paper' or indices) and linear layers (a role preset or module names);
``target_module_regex`` turns that into the exact PEFT target set, refusing what the model does not have.
``attach_adapter`` / ``load_adapter`` wrap a frozen base model (PEFT LoRA, or memcore's bypass for kind
'bypass') so that only the adapter trains; ``detach_adapter`` gives back the untouched base. Callers that hold
a ``memcore.loading.Base`` go through ``Base.adapted`` instead, which pairs the two.

Each attached model gets a ``Placement`` computed once, when it is attached: the blocks, the lowest block
with a trainable parameter, and whether anything below the blocks trains. The training loop's frozen-prefix
cache and block recomputation read it (``placement_of``) instead of scanning the module tree every time.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from memcore.blocks import ROLES, decoder_layers, is_mixture_of_experts, layers_path, linear_names, module_role
from memcore.bypass import is_bypass_dir, load_bypass
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


@dataclass(frozen=True, eq=False)
class Placement:
    """Where an attached adapter sits, scanned once per attached model."""

    layers: nn.ModuleList  # the transformer blocks, bottom to top
    lowest_adapted: int | None  # index of the lowest block holding a trainable parameter; None: no block trains
    trainable_below_blocks: bool  # something outside the blocks (embeddings, say) trains

    @classmethod
    def of(cls, model: nn.Module) -> Placement:
        """Scan `model` (adapter attached) for its blocks and where its trainable parameters sit."""
        layers = decoder_layers(model)
        lowest = next((i for i, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())), None)
        inside = {id(p) for p in layers.parameters()}
        below = any(p.requires_grad and id(p) not in inside for p in model.parameters())
        return cls(layers, lowest, below)


_PLACEMENTS: weakref.WeakKeyDictionary[nn.Module, Placement] = weakref.WeakKeyDictionary()


def placement_of(model: nn.Module) -> Placement:
    """The Placement recorded when `model` was attached (attach_adapter, load_adapter); for a model memcore did
    not attach (a bare base, an adapter wrapped by hand), a fresh scan, not recorded. Weights unfrozen by hand
    after attaching are not seen: the record describes the adapter as attached."""
    found = _PLACEMENTS.get(model)
    return found if found is not None else Placement.of(model)


def _placed(model: Any) -> Any:
    _PLACEMENTS[model] = Placement.of(model)
    return model


def attach_adapter(model: nn.Module, spec: AdapterSpec, seed: int = 0) -> Any:
    """Put a fresh adapter of `spec` on `model` (memcore.stack.SlotModel: the LoRA or bypass of one run, a stack
    of one slot); only the adapter trains, in fp32 whatever the base dtype. A is drawn from a generator seeded
    with `seed`, so runs reproduce; it saves as a stock PEFT adapter (LoRA) or memcore's bypass files.

    The model is changed in place (its target modules wrapped): give it back with detach_adapter. Raises
    MemcoreError as target_module_regex does."""
    from memcore.stack import SlotModel

    return _placed(SlotModel(model, spec, seed=seed))


def load_adapter(model: nn.Module, path: str | Path) -> Any:
    """A saved adapter folder (PEFT LoRA, or memcore's bypass) attached to `model`, in eval mode, nothing
    trainable. Give the model back with detach_adapter. Raises MemcoreError for an unreadable bypass folder."""
    if is_bypass_dir(path):
        return _placed(load_bypass(model, path))
    from peft import PeftModel

    return _placed(PeftModel.from_pretrained(model, str(path)).eval())


def detach_adapter(adapted: Any) -> nn.Module:
    """Remove the adapter (LoRA layers or bypasses) and give back the untouched base model, frozen, in eval
    mode, so it can be reused. Use the returned model: unloading is not guaranteed to be in place."""
    _PLACEMENTS.pop(adapted, None)
    base = adapted.unload()
    base.requires_grad_(False)
    base.eval()
    return base


def p_eff(model: nn.Module) -> int:
    """Effective parameters: the exact number of trainable (adapter) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
