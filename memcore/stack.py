"""Many runs' adapters on one frozen base: every adapted module holds one adapter per slot, and each row of a
batch is routed through its run's slot, so N runs train through one forward and one backward of the base.

    out_row = base(x_row) + scale_s · (drop_s(x_row) · A_s) · B_s        s = the slot of the row's run

A_s [in, R] and B_s [R, out] are slices of tensors stacked over slots, [S, in, R] and [S, R, out], R the largest
rank of the stack: a slot of rank r < R keeps zeros in columns r.. of A and rows r.. of B. Those zeros stay zero
in training (their gradients are x·A_pad = 0 and B_pad = 0, AdamW moves nothing with a zero gradient), so a slot
computes exactly its rank-r adapter. Two kinds, as memcore.config.AdapterSpec names them:
  - 'lora' (PEFT's LoRA): wraps each target linear layer; scale = alpha / r; saved as a stock PEFT adapter.
  - 'bypass' (the paper's, memcore.bypass): wraps each chosen block's MLP, in = out = hidden, no scaling.
A is initialised as PEFT initialises lora_A (kaiming-uniform with a = √5: uniform in ±1/√in), B at zero, from a
generator seeded by the run's seed, so a run's start does not depend on which slot or batch it lands in.

Dropout draws its masks from a generator of the slot's own (seeded by the run), once per module per forward,
and keeps them until the next forward: a block recomputed in the backward sees the same masks, and one run's
masks never depend on the others'. ``AdapterStack`` owns all of it: slots, routing, the enabled switch (the base
alone, for the base loss), a slot's weights in and out, saving a slot as PEFT or bypass files, and taking every
module off again. ``SlotAdamW`` is AdamW (torch.optim.AdamW's update, Loshchilov & Hutter 2019) per slot: its own
learning rate, weight decay and step count, and a slot whose run skips an update is left as it was.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memcore.blocks import decoder_layers, layers_path
from memcore.config import AdapterSpec, MemcoreError

ADAPTER_DTYPE = torch.float32  # adapters train in fp32 whatever the base's dtype


def _features(mod: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer: nn.Linear and bitsandbytes' (in_features), GPT-2's Conv1D (nx, nf)."""
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        return int(mod.in_features), int(mod.out_features)
    if type(mod).__name__ == "Conv1D":
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    raise MemcoreError(f"cannot place an adapter on a {type(mod).__name__}: not a linear layer")


@dataclass
class _Slot:
    """What one slot holds: the run's rank, scale and dropout, and its dropout generator."""

    rank: int
    scale: float
    dropout: float
    generator: torch.Generator | None


@dataclass
class _Route:
    """The rows of the current batch: the slot of each row, and the dropout masks drawn in this forward."""

    rows: torch.Tensor  # [Rows] long, the slot of each batch row
    single: int | None  # the one slot every row belongs to, else None
    scale: torch.Tensor  # [Rows] fp32, each row's slot's scale
    dropout: bool  # dropout on in this forward
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # id(module) -> [Rows, T, in] mask, this forward


class SlotAdapter(nn.Module):
    """A module (a linear layer, or a block's MLP for the bypass) plus one low-rank adapter per slot.

    forward(x, ...) -> base(x, ...) + scale · (drop(x) @ A[slot]) @ B[slot] for each row of x [Rows, T, in]."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, slots: int, rank: int, device: torch.device,
                 stack: AdapterStack) -> None:
        super().__init__()
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.A = nn.Parameter(torch.zeros(slots, d_in, rank, device=device, dtype=ADAPTER_DTYPE))
        self.B = nn.Parameter(torch.zeros(slots, rank, d_out, device=device, dtype=ADAPTER_DTYPE))
        object.__setattr__(self, "_stack", stack)  # not a submodule: the stack is not part of the model

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        route = self._stack.route
        if route is None:  # switched off: the base alone
            return out
        h = x.to(ADAPTER_DTYPE)
        if route.single is not None:  # every row in one slot: any shape of x will do
            if route.dropout:
                h = h * self._stack.mask(self, route, h)
            delta = (h @ self.A[route.single]) @ self.B[route.single] * route.scale[0]
            return out + delta.to(out.dtype)
        rows = route.rows.shape[0]
        flat = x.dim() == 2  # OPT lays a block's rows end to end before its MLP: [rows·T, in]
        if flat and x.shape[0] % rows == 0:
            h = h.view(rows, -1, self.d_in)
        elif x.dim() != 3 or x.shape[0] != rows:
            raise MemcoreError(f"an adapter stack routes {rows} rows but a module saw input of shape "
                               f"{tuple(x.shape)}: this model reshapes its batch inside a block")
        if route.dropout:
            h = h * self._stack.mask(self, route, h)
        delta = torch.bmm(torch.bmm(h, self.A.index_select(0, route.rows)), self.B.index_select(0, route.rows))
        delta = delta * route.scale[:, None, None]
        return out + (delta.reshape(out.shape) if flat else delta).to(out.dtype)


class AdapterStack:
    """Slots of adapters of one kind and placement on a frozen base model, and the routing of batch rows to them.

    `model` is changed in place (its target modules wrapped) until ``detach``. `spec` gives the kind and the
    placement (targets, layers) every slot shares; each slot then takes a run's rank (up to `max_rank`), alpha,
    dropout and seed in ``assign``. Raises MemcoreError as memcore.targets.target_module_regex does, or when a
    module is not a linear layer."""

    def __init__(self, model: nn.Module, spec: AdapterSpec, slots: int, max_rank: int) -> None:
        from memcore.targets import adapter_layers, target_module_regex

        if slots < 1 or max_rank < 1:
            raise MemcoreError(f"an adapter stack needs at least one slot and rank 1, got {slots} and {max_rank}")
        self.model, self.kind, self.n_slots, self.max_rank = model, spec.kind, slots, max_rank
        self.placement = spec
        self.device = next(model.parameters()).device
        self.route: _Route | None = None
        self.slots: list[_Slot | None] = [None] * slots
        self._dropout_on = False
        model.requires_grad_(False)
        self.modules: dict[str, SlotAdapter] = {}  # full module name -> its wrapper, in model order
        if spec.kind == "bypass":
            from memcore.bypass import _hidden_size, mlp_of

            hidden = _hidden_size(model)
            prefix = layers_path(model)
            for i in adapter_layers(model, spec):
                block = decoder_layers(model)[i]
                name, mlp = mlp_of(block)
                wrapped = SlotAdapter(mlp, hidden, hidden, slots, max_rank, self.device, self)
                setattr(block, name, wrapped)
                self.modules[f"{prefix}.{i}.{name}"] = wrapped
        else:
            regex, _, _ = target_module_regex(model, spec)
            self.regex = regex
            names = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
            for name in names:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                base = getattr(parent, child)
                d_in, d_out = _features(base)
                wrapped = SlotAdapter(base, d_in, d_out, slots, max_rank, self.device, self)
                setattr(parent, child, wrapped)
                self.modules[name] = wrapped
        if not self.modules:
            raise MemcoreError("the adapter placement matches no module of this model")

    # --- slots ---------------------------------------------------------------------------------------------------

    def assign(self, slot: int, adapter: AdapterSpec, seed: int) -> None:
        """Give `slot` a fresh adapter of `adapter`'s rank, scale and dropout: A kaiming-uniform (±1/√in, PEFT's
        lora_A init) from a generator seeded with `seed`, B zero. Raises MemcoreError for a rank above the stack's
        or a placement unlike the stack's."""
        if adapter.kind != self.kind or adapter.layers != self.placement.layers or (
                self.kind == "lora" and adapter.targets != self.placement.targets):
            raise MemcoreError("runs batched together must share the adapter kind, layers and targets")
        if adapter.rank > self.max_rank:
            raise MemcoreError(f"rank {adapter.rank} is above this stack's largest rank {self.max_rank}")
        r = adapter.rank
        scale = 1.0 if self.kind == "bypass" else adapter.lora_alpha / r
        init = torch.Generator(device="cpu").manual_seed(int(seed))
        gen = None
        if adapter.dropout > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) + 1_000_003)
        with torch.no_grad():
            for m in self.modules.values():
                bound = 1.0 / math.sqrt(m.d_in)
                a = (torch.rand(r, m.d_in, generator=init, dtype=torch.float64) * 2 - 1) * bound  # [r, in] as lora_A
                m.A[slot].zero_()
                m.A[slot, :, :r] = a.T.to(ADAPTER_DTYPE)
                m.B[slot].zero_()
        self.slots[slot] = _Slot(r, scale, float(adapter.dropout), gen)

    def release(self, slot: int) -> None:
        """Free a slot (its weights zeroed); a later assign may take it."""
        with torch.no_grad():
            for m in self.modules.values():
                m.A[slot].zero_()
                m.B[slot].zero_()
        self.slots[slot] = None

    def free_slots(self) -> list[int]:
        """Slots no run holds."""
        return [i for i, s in enumerate(self.slots) if s is None]

    def p_eff(self, slot: int) -> int:
        """Trainable parameters of the slot's adapter: r · (in + out) summed over the adapted modules."""
        return self.p_eff_of(self._slot(slot).rank)

    def p_eff_of(self, rank: int) -> int:
        """Trainable parameters of an adapter of `rank` on this stack's placement: rank · Σ (in + out)."""
        return sum(rank * (m.d_in + m.d_out) for m in self.modules.values())

    def _slot(self, slot: int) -> _Slot:
        s = self.slots[slot]
        if s is None:
            raise MemcoreError(f"slot {slot} holds no adapter")
        return s

    # --- routing ---------------------------------------------------------------------------------------------------

    def set_rows(self, row_slots: Sequence[int]) -> None:
        """Route the next forwards' batch rows: row i goes through slot row_slots[i]."""
        rows = torch.tensor(list(row_slots), dtype=torch.long, device=self.device)
        scale = torch.tensor([self._slot(s).scale for s in row_slots], dtype=ADAPTER_DTYPE, device=self.device)
        single = row_slots[0] if len(set(row_slots)) == 1 else None
        self._row_slots = list(row_slots)
        self.route = _Route(rows, single, scale, self._dropout_on and self._any_dropout())

    def _any_dropout(self) -> bool:
        return any(self._slot(s).dropout > 0 for s in set(self._row_slots))

    def set_dropout(self, on: bool) -> None:
        """Dropout on (training forwards) or off (measuring the adapter as it is) from the next forward; on, each
        forward draws fresh masks from each slot's own generator (kept for any recomputation of that forward)."""
        self._dropout_on = on
        if self.route is not None:
            want = on and self._any_dropout()
            if want != self.route.dropout:
                self.route.dropout = want
                self.route.masks.clear()

    @contextmanager
    def routed(self, row_slots: Sequence[int], dropout: bool = False) -> Iterator[None]:
        """Inside the block, rows go through `row_slots` (dropout off unless asked); the routing and the dropout
        switch are put back on the way out (a run's own forward, e.g. its generate check, in a batch's loop)."""
        saved_route, saved_rows, saved_on = self.route, getattr(self, "_row_slots", None), self._dropout_on
        self._dropout_on = dropout
        self.set_rows(row_slots)
        try:
            yield
        finally:
            self.route, self._dropout_on = saved_route, saved_on
            if saved_rows is not None:
                self._row_slots = saved_rows

    def new_forward(self) -> None:
        """Forget this forward's dropout masks: the next forward draws new ones."""
        if self.route is not None:
            self.route.masks.clear()

    def mask(self, module: SlotAdapter, route: _Route, like: torch.Tensor) -> torch.Tensor:
        """The dropout mask [Rows, T, in] of `module` in this forward (drawn once per forward, per slot from its own
        generator, rows in order; scaled by 1/(1-p) as nn.Dropout does; ones where the slot has no dropout)."""
        key = id(module)
        m = route.masks.get(key)
        if m is not None and m.shape == like.shape:
            return m
        if route.single is not None:  # one slot: one mask over the whole input, whatever its shape
            slot = self._slot(route.single)
            m = torch.empty_like(like).bernoulli_(1.0 - slot.dropout, generator=slot.generator) / (1.0 - slot.dropout)
            route.masks[key] = m
            return m
        m = torch.ones_like(like)
        for s in sorted(set(self._row_slots)):
            slot = self._slot(s)
            if slot.dropout <= 0:
                continue
            idx = [i for i, t in enumerate(self._row_slots) if t == s]
            keep = torch.empty((len(idx), *like.shape[1:]), device=like.device, dtype=like.dtype)
            keep.bernoulli_(1.0 - slot.dropout, generator=slot.generator)
            m[idx] = keep / (1.0 - slot.dropout)
        route.masks[key] = m
        return m

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model alone inside the block (for the base loss, ΔL's reference)."""
        route, self.route = self.route, None
        try:
            yield
        finally:
            self.route = route

    def disable_adapter(self) -> Any:
        """PEFT's name for ``disabled`` (memcore.measure.base_losses calls it on any adapted model)."""
        return self.disabled()

    # --- weights in and out ------------------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """The stacked trainable tensors, A and B of each module in model order ([S, in, R], [S, R, out])."""
        return [p for m in self.modules.values() for p in (m.A, m.B)]

    def parameter_names(self) -> list[str]:
        """The names ``state`` gives the tensors of ``parameters``, in the same order."""
        return [f"{n}.{k}" for n in self.modules for k in ("A", "B")]

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's adapter on the CPU, by module: '<module>.A' [in, r] and '<module>.B' [r, out], fp32."""
        r = self._slot(slot).rank
        out = {}
        for name, m in self.modules.items():
            out[f"{name}.A"] = m.A[slot, :, :r].detach().to("cpu", copy=True)
            out[f"{name}.B"] = m.B[slot, :r, :].detach().to("cpu", copy=True)
        return out

    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Put a slot's adapter (as ``state`` gives it) back into an assigned slot. Raises MemcoreError when
        `state` does not fit this stack (other modules or shapes)."""
        r = self._slot(slot).rank
        want = {f"{n}.{k}" for n in self.modules for k in ("A", "B")}
        if set(state) != want:
            odd = sorted(set(state) ^ want)[:1]
            raise MemcoreError(f"the saved adapter does not fit this placement (e.g. {odd})")
        with torch.no_grad():
            for name, m in self.modules.items():
                a, b = state[f"{name}.A"], state[f"{name}.B"]
                if tuple(a.shape) != (m.d_in, r) or tuple(b.shape) != (r, m.d_out):
                    raise MemcoreError(f"the saved adapter of {name} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                       f"this slot takes ({m.d_in}, {r}), ({r}, {m.d_out})")
                m.A[slot].zero_()
                m.B[slot].zero_()
                m.A[slot, :, :r] = a.to(m.A.device, ADAPTER_DTYPE)
                m.B[slot, :r, :] = b.to(m.B.device, ADAPTER_DTYPE)

    def save(self, slot: int, path: str | Path, adapter: AdapterSpec, base_name: str | None) -> None:
        """Write the slot's adapter as files that load without this stack (``write``)."""
        self.write(self.state(slot), path, adapter, base_name)

    def write(self, state: dict[str, torch.Tensor], path: str | Path, adapter: AdapterSpec,
              base_name: str | None) -> None:
        """Write an adapter of this stack's placement (``state``, as ``state`` gives a slot's; the slot may have
        been freed since) as files that load without it: for LoRA a stock PEFT adapter (adapter_config.json +
        adapter_model.safetensors, PeftModel.from_pretrained loads it), for the bypass memcore's
        bypass_config.json + bypass_model.safetensors (memcore.bypass.load_bypass loads it)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "bypass":
            from memcore.bypass import CONFIG_NAME, WEIGHTS_NAME

            layers = [int(n.split(".")[-2]) for n in self.modules]
            tensors = {f"layers.{i}.{k}": state[f"{n}.{k}"].contiguous() for i, n in zip(layers, self.modules)
                       for k in ("A", "B")}
            save_file(tensors, str(path / WEIGHTS_NAME))
            d = next(iter(self.modules.values())).d_in
            cfg = {"adapter": "bypass", "rank": adapter.rank, "dropout": adapter.dropout, "layers": layers,
                   "hidden": d, "base_model_name_or_path": base_name, "formula": "out = MLP(x) + dropout(x) @ A @ B"}
            (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
            return
        from peft import LoraConfig

        conv1d = any(type(m.base).__name__ == "Conv1D" for m in self.modules.values())
        cfg = LoraConfig(r=adapter.rank, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.dropout,
                         target_modules=self.regex, bias="none", task_type="CAUSAL_LM", fan_in_fan_out=conv1d,
                         base_model_name_or_path=base_name)
        cfg.save_pretrained(str(path))
        tensors = {}
        for name in self.modules:  # PEFT's names: lora_A.weight [r, in], lora_B.weight [out, r]
            tensors[f"base_model.model.{name}.lora_A.weight"] = state[f"{name}.A"].T.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = state[f"{name}.B"].T.contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    def read(self, path: str | Path) -> dict[str, torch.Tensor]:
        """An adapter folder ``write`` wrote (or PEFT saved) as a slot's state ('<module>.A' [in, r], '<module>.B'
        [r, out], fp32 on the CPU), to ``load`` into a slot of this placement. Raises MemcoreError when the folder
        holds no adapter of this stack's kind, or one for other modules."""
        from safetensors.torch import load_file

        path = Path(path)
        if self.kind == "bypass":
            from memcore.bypass import WEIGHTS_NAME

            f = path / WEIGHTS_NAME
            if not f.is_file():
                raise MemcoreError(f"{path} holds no bypass adapter ({WEIGHTS_NAME} missing)")
            tensors = load_file(str(f))
            by_layer = {int(n.split(".")[-2]): n for n in self.modules}
            state = {}
            for key, t in tensors.items():
                _, i, k = key.split(".")
                if int(i) not in by_layer:
                    raise MemcoreError(f"{path} holds a bypass on layer {i}, which this placement does not have")
                state[f"{by_layer[int(i)]}.{k}"] = t.float()
            return state
        f = path / "adapter_model.safetensors"
        if not f.is_file():
            raise MemcoreError(f"{path} holds no LoRA adapter (adapter_model.safetensors missing)")
        state = {}
        for key, t in load_file(str(f)).items():  # PEFT's names: lora_A.weight [r, in], lora_B.weight [out, r]
            name = key.removeprefix("base_model.model.")
            for part, k in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
                if name.endswith(part):
                    state[f"{name.removesuffix(part)}.{k}"] = t.T.float().contiguous()
        return state

    def detach(self) -> nn.Module:
        """Put every wrapped module back and give back the untouched base model, frozen, in eval mode."""
        for name, wrapped in self.modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, wrapped.base)
        self.modules.clear()
        self.route = None
        self.model.requires_grad_(False)
        self.model.eval()
        return self.model


class SlotAdamW:
    """AdamW over stacked adapter tensors [S, ...], one optimizer per slot in effect: each slot has its own
    learning rate, weight decay, moments and step count, and only the slots named in ``step`` move.

    The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments):
        p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)                t = the slot's own step count"""

    def __init__(self, params: list[nn.Parameter], slots: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * slots

    def zero_grad(self) -> None:
        """Drop every gradient (set_to_none)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: Sequence[int], lrs: Sequence[float], weight_decays: Sequence[float]) -> None:
        """One AdamW update of the named slots, each with its own learning rate and weight decay."""
        if not slots:
            return
        b1, b2 = self.betas
        dev = self.params[0].device
        idx = torch.tensor(list(slots), dtype=torch.long, device=dev)
        for s in slots:
            self.steps[s] += 1
        t = torch.tensor([self.steps[s] for s in slots], dtype=torch.float64)
        lr = torch.tensor(list(lrs), dtype=torch.float64)
        wd = torch.tensor(list(weight_decays), dtype=torch.float64)
        step_size = (lr / (1 - b1 ** t)).to(dev, ADAPTER_DTYPE)
        bc2_sqrt = torch.sqrt(1 - b2 ** t).to(dev, ADAPTER_DTYPE)
        decay = (1 - lr * wd).to(dev, ADAPTER_DTYPE)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad.index_select(0, idx)
            pm, mm, vm = p.index_select(0, idx), m.index_select(0, idx), v.index_select(0, idx)
            pm.mul_(decay.view(shape))
            mm.lerp_(g, 1 - b1)
            vm.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vm.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
            pm.addcdiv_(mm, denom * (1 / step_size).view(shape), value=-1.0)
            p.index_copy_(0, idx, pm)
            m.index_copy_(0, idx, mm)
            v.index_copy_(0, idx, vm)

    def state(self, slot: int, names: list[str], rank: int) -> dict[str, Any]:
        """The slot's optimizer state on the CPU: its step count and the two moments by tensor name, `names`
        naming the stacked tensors in order ('<module>.A' / '.B', as AdapterStack.state does), trimmed to the
        slot's `rank`."""
        out: dict[str, Any] = {"step": self.steps[slot], "exp_avg": {}, "exp_avg_sq": {}}
        for i, name in enumerate(names):
            for key, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                t = store[i][slot]
                t = t[:, :rank] if name.endswith(".A") else t[:rank, :]
                out[key][name] = t.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load(self, slot: int, state: dict[str, Any], names: list[str], rank: int) -> None:
        """Put back a slot's optimizer state as ``state`` gave it."""
        self.steps[slot] = int(state["step"])
        for i, name in enumerate(names):
            for key, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                store[i][slot].zero_()
                t = state[key][name].to(store[i].device, store[i].dtype)
                if name.endswith(".A"):
                    store[i][slot, :, :rank] = t
                else:
                    store[i][slot, :rank, :] = t

    def reset(self, slot: int) -> None:
        """A fresh start for a slot (a new run takes it): zero moments, step count 0."""
        self.steps[slot] = 0
        with torch.no_grad():
            for m, v in zip(self.exp_avg, self.exp_avg_sq):
                m[slot].zero_()
                v[slot].zero_()


class SlotModel(nn.Module):
    """One run's adapter on a base model, as a model: a stack of one slot whose rows all go through slot 0. What
    memcore.placement.attach_adapter gives a single run (the training loop treats it as a batch of one), with the
    methods memcore calls on an adapted model (disable_adapter, save_pretrained, get_base_model, unload).

    Calls go to the base model; attributes it lacks (config, generation_config, ...) are read from the base."""

    def __init__(self, base: nn.Module, spec: AdapterSpec, seed: int = 0) -> None:
        super().__init__()
        self.base_model = base
        object.__setattr__(self, "stack", AdapterStack(base, spec, slots=1, max_rank=spec.rank))
        object.__setattr__(self, "adapter_spec", spec)
        object.__setattr__(self, "adapter_seed", seed)
        self.stack.assign(0, spec, seed)
        self.stack.set_rows([0])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def _route(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        route = self.stack.route
        if ids is not None and route is not None and route.rows.shape[0] != ids.shape[0]:
            self.stack.set_rows([0] * ids.shape[0])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward with the adapter on every row (same arguments and outputs)."""
        self._route(args, kwargs)
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (its adapted modules carry the slots)."""
        return self.base_model

    def disable_adapter(self) -> Any:
        """The base model alone while inside (the base loss, ΔL's reference)."""
        return self.stack.disabled()

    def save_pretrained(self, path: str | Path) -> None:
        """The adapter as stock PEFT files (LoRA) or memcore's bypass files (AdapterStack.save)."""
        base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        self.stack.save(0, path, self.adapter_spec, base_name)

    def unload(self) -> nn.Module:
        """Take the adapter off: the untouched base model."""
        return self.stack.detach()
