"""The paper's own adapter: one rank-r bypass around the MLP of a block, out = MLP(x) + dropout(x)·A·B.

Source: "How LoRA Remembers? A Parametric Memory Law for LLM Finetuning" (arXiv 2605.30260), its released
experiments (DESIGN.md §2, §3c): A [hidden, r] kaiming-uniform, B [r, hidden] zero (so the adapted model starts
as the base exactly), no α/r scaling, dropout on the bypass input. A is initialised as PEFT initialises
``lora_A`` (kaiming-uniform with a = √5, fan-in = hidden), so the two adapters start from the same scale.
P_eff = r · 2 · hidden per adapted block (1,152 at rank 1 on the default model's 576-wide blocks).

``BypassModel`` wraps a base causal LM with the handful of methods memcore uses on a PEFT model
(``disable_adapter``, ``save_pretrained``, ``unload``, ``get_base_model``), so the training loop, tracking,
sweeps, the fit and replay treat both adapters alike. It saves as ``bypass_model.safetensors`` plus
``bypass_config.json``; it is not a PEFT adapter, and export to PEFT is refused (config.MemcoreError).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memcore.blocks import decoder_layers
from memcore.config import AdapterSpec, MemcoreError

CONFIG_NAME = "bypass_config.json"
WEIGHTS_NAME = "bypass_model.safetensors"
_MLP_WORDS = ("mlp", "feedforward", "feed_forward", "ffn")


class MLPBypass(nn.Module):
    """Wraps a block's MLP: forward(x) = mlp(x) + (dropout(x) @ A @ B), computed in fp32 and cast back.

    Shapes: x [B, T, hidden]; A [hidden, r]; B [r, hidden]. With ``enabled`` False it is the MLP alone."""

    def __init__(self, mlp: nn.Module, hidden: int, rank: int, dropout: float, device: torch.device) -> None:
        super().__init__()
        self.mlp = mlp
        self.bypass_A = nn.Parameter(torch.empty(hidden, rank, device=device, dtype=torch.float32))
        self.bypass_B = nn.Parameter(torch.zeros(rank, hidden, device=device, dtype=torch.float32))
        # PEFT's lora_A init on the transposed [r, hidden] view: kaiming-uniform, a = sqrt(5), fan-in = hidden
        nn.init.kaiming_uniform_(self.bypass_A.data.T, a=math.sqrt(5))
        self.bypass_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """MLP(x) + dropout(x)·A·B for x [..., hidden]; same shape out."""
        out = self.mlp(x, *args, **kwargs)
        if not self.enabled:
            return out
        h = self.bypass_dropout(x.to(self.bypass_A.dtype)) @ self.bypass_A @ self.bypass_B
        return out + h.to(out.dtype)


def mlp_of(block: nn.Module) -> tuple[str, nn.Module]:
    """The (attribute name, module) of a block's MLP: the child whose name or class says mlp / feed-forward.

    Raises MemcoreError where the block has none (OPT keeps fc1/fc2 directly in the block)."""
    for name, child in block.named_children():
        cls = type(child).__name__.lower()
        if any(w in name.lower() or w in cls for w in _MLP_WORDS):
            return name, child
    raise MemcoreError("the bypass adapter needs a block with an MLP module; "
                       f"this model's blocks ({type(block).__name__}) "
                       f"have {', '.join(n for n, _ in block.named_children())}; use the LoRA adapter")


class BypassModel(nn.Module):
    """A base causal LM with MLPBypass modules on some blocks; only A and B are trainable.

    Calls go to the base model; attributes it lacks (config, generation_config, ...) are read from the base."""

    def __init__(self, base: nn.Module, spec: AdapterSpec, layers: list[int], hidden: int) -> None:
        super().__init__()
        self.base_model = base
        self.spec = spec
        self.layer_indices = layers
        self.hidden = hidden

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, bypasses included (same arguments and outputs)."""
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (its MLPs carry the bypasses)."""
        return self.base_model

    def bypasses(self) -> list[MLPBypass]:
        """The MLPBypass modules, bottom block first."""
        return [m for m in self.base_model.modules() if isinstance(m, MLPBypass)]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model alone while inside (used for the base loss and for ΔL)."""
        mods = self.bypasses()
        for m in mods:
            m.enabled = False
        try:
            yield
        finally:
            for m in mods:
                m.enabled = True

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """{'layers.<i>.A': [hidden, r], 'layers.<i>.B': [r, hidden]} on the CPU, fp32."""
        out = {}
        for i in self.layer_indices:
            m = _bypass_in(decoder_layers(self.base_model)[i])
            out[f"layers.{i}.A"] = m.bypass_A.detach().cpu().contiguous()
            out[f"layers.{i}.B"] = m.bypass_B.detach().cpu().contiguous()
        return out

    def save_pretrained(self, path: str | Path) -> None:
        """Write bypass_config.json (rank, dropout, layers, hidden, base model) and bypass_model.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state(), str(path / WEIGHTS_NAME))
        cfg = {"adapter": "bypass", "rank": self.spec.rank, "dropout": self.spec.dropout, "layers": self.layer_indices,
               "hidden": self.hidden, "base_model_name_or_path": getattr(self.base_model, "name_or_path", None),
               "formula": "out = MLP(x) + dropout(x) @ A @ B"}
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))

    def unload(self) -> nn.Module:
        """Put the original MLPs back and give back the untouched base model."""
        layers = decoder_layers(self.base_model)
        for i in self.layer_indices:
            name, mod = mlp_of(layers[i])
            if isinstance(mod, MLPBypass):
                setattr(layers[i], name, mod.mlp)
        return self.base_model


def _bypass_in(block: nn.Module) -> MLPBypass:
    _, mod = mlp_of(block)
    if not isinstance(mod, MLPBypass):
        raise MemcoreError("this block carries no bypass adapter")
    return mod


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[1])


def attach_bypass(model: nn.Module, spec: AdapterSpec, layers: list[int], seed: int = 0) -> BypassModel:
    """Wrap the MLP of each block in `layers` with a rank-`spec.rank` bypass; freeze everything else.

    Seeded (torch.manual_seed(seed)) so that A repeats. Raises MemcoreError if a block has no MLP module."""
    blocks = decoder_layers(model)
    hidden = _hidden_size(model)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.requires_grad_(False)
    for i in layers:
        name, mlp = mlp_of(blocks[i])
        bypass = MLPBypass(mlp, hidden, spec.rank, spec.dropout, device)
        bypass.train(mlp.training)  # follow the base's mode: an eval-mode base gets no dropout until training asks
        setattr(blocks[i], name, bypass)
    return BypassModel(model, spec, list(layers), hidden)


def is_bypass_dir(path: str | Path) -> bool:
    """Whether `path` holds a saved bypass adapter (its bypass_config.json)."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_bypass(model: nn.Module, path: str | Path) -> BypassModel:
    """Attach a saved bypass adapter (from save_pretrained) to `model`.

    Raises MemcoreError when the folder's files are missing or do not fit this model (hidden size, layers)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
        weights = load_file(str(path / WEIGHTS_NAME))
    except (OSError, ValueError) as e:
        raise MemcoreError(f"cannot read the bypass adapter in {path}: {e}") from None
    hidden = _hidden_size(model)
    if cfg.get("hidden") != hidden:
        raise MemcoreError(f"the bypass adapter in {path} is for hidden size {cfg.get('hidden')}, "
                           f"this model has {hidden}")
    spec = AdapterSpec(rank=int(cfg["rank"]), dropout=float(cfg.get("dropout", 0.0)), layers=tuple(cfg["layers"]),
                       kind="bypass")
    wrapped = attach_bypass(model, spec, list(cfg["layers"]))
    with torch.no_grad():
        for i in cfg["layers"]:
            m = _bypass_in(decoder_layers(model)[i])
            m.bypass_A.copy_(weights[f"layers.{i}.A"])
            m.bypass_B.copy_(weights[f"layers.{i}.B"])
    return wrapped.eval()
