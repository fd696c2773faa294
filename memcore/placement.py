"""Where an adapter goes on a model, putting it there and taking it off, and what it then costs.

Which blocks and linear layers an AdapterSpec names is memcore.targets' question. ``attach_adapter`` /
``load_adapter`` wrap a frozen base model (PEFT LoRA, or memcore's bypass for kind
'bypass') so that only the adapter trains; ``detach_adapter`` gives back the untouched base. Callers that hold
a ``memcore.loading.Base`` go through ``Base.adapted`` instead, which pairs the two.

Each attached model gets a ``Placement`` computed once, when it is attached: the blocks, the lowest block
with a trainable parameter, and whether anything below the blocks trains. The training loop's frozen-prefix
cache and block recomputation read it (``placement_of``) instead of scanning the module tree every time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from memcore.blocks import decoder_layers
from memcore.bypass import is_bypass_dir, load_bypass
from memcore.config import AdapterSpec
from memcore.stack import SlotModel


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
    MemcoreError as memcore.targets.target_module_regex does."""
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
