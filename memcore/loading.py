"""Load a base causal LM (the embedded default, a hub id or a local directory), optionally quantized, frozen.

``load_base(spec)`` resolves the ModelSpec's name to what ``from_pretrained`` takes (``resolve_source``),
its device and dtype (fp32 on CPU, bf16 on CUDA unless asked otherwise), and returns a ``Base``: the model in
eval mode with every weight frozen, its tokenizer (with a pad token), and the facts the rest of memcore needs.
Every failure is a MemcoreError that says what to do: a missing folder, an unreachable hub (probed first, so
an offline machine fails fast from the local hub cache), remote code not trusted, bitsandbytes missing.

A Base is loaded once and reused by many runs: an adapter goes on and comes off again only through
``Base.adapted``, so ``Base.model`` is always the bare base model outside that block. Caches of loaded bases
key them by their ModelSpec (frozen, hashable).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memcore.blocks import context_length, decoder_layers
from memcore.config import AdapterSpec, MemcoreError, ModelSpec
from memcore.home import DEFAULT_ALIASES, default_model_dir
from memcore.placement import attach_adapter, detach_adapter, load_adapter


def resolve_device(spec: ModelSpec) -> torch.device:
    """The device a spec asks for: 'auto' is cuda if a GPU is present, else cpu.

    Raises MemcoreError naming the device when a CUDA device is asked for and none is available."""
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
    """Is bitsandbytes installed and importable (a broken install counts as absent)?"""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Base:
    """A loaded base model with what the rest of memcore needs to know about it.

    Outside an ``adapted`` block `model` is the bare, frozen base (inside one the adapter's layers sit in it);
    only ``adapted`` replaces it, with what taking the adapter off gives back."""

    model: Any
    tokenizer: Any
    source: str  # directory or hub id that PEFT records as base_model_name_or_path
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (from its config; 2048 where the config does not say)."""
        return context_length(self.model.config)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(decoder_layers(self.model))

    @contextmanager
    def adapted(self, adapter: AdapterSpec | str | Path, *, seed: int = 0) -> Iterator[Any]:
        """The base with an adapter attached, for the duration of the block; the adapter comes off again on the
        way out, whatever happens inside (an error, a generator closed mid-run).

        adapter: an AdapterSpec (a fresh adapter, initialized from `seed`, trainable) or the folder of a saved
        one (PEFT LoRA or memcore's bypass, eval mode, nothing trainable). Yields the PEFT model or BypassModel.
        Raises MemcoreError as memcore.placement.attach_adapter / load_adapter do, before anything is changed."""
        if isinstance(adapter, AdapterSpec):
            model = attach_adapter(self.model, adapter, seed=seed)
        else:
            model = load_adapter(self.model, adapter)
        try:
            yield model
        finally:
            self.model = detach_adapter(model)


def resolve_source(spec: ModelSpec, home: Path | None = None) -> str:
    """Map a model name to what from_pretrained takes: the default cache dir (converted on first use), a local
    dir (absolute), or a hub id (unchanged).

    Raises MemcoreError when a name that looks like a path does not exist or has no config.json."""
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
    """One line for a failed hub load: 'unreachable (offline?)' when the error chain says so, else its first line."""
    text = f"{type(err).__name__}: {err}"
    chain = err
    while chain is not None:
        text += f" {type(chain).__name__} {chain}"
        chain = chain.__cause__ or chain.__context__
    offline_words = ("offline", "connect", "resolve", "network", "timed out", "temporary failure", "max retries",
                     "localentrynotfound", "cannot find the requested files")
    if os.environ.get("HF_HUB_OFFLINE") or any(w in text.lower() for w in offline_words):
        return MemcoreError(f"cannot load model '{name}': it is not a local folder and the Hugging Face hub is "
                            "unreachable (offline?); use the default model or a local model directory")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MemcoreError(f"cannot load model '{name}': {first}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub's host be resolved and reached within `timeout` seconds? False at once with
    HF_HUB_OFFLINE set (fails fast where there is no network). An answer is kept for 30 seconds, so a page
    that loads a tokenizer and a config in turn probes once."""
    import socket
    import time
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    kept = _REACH.get(host)
    if kept is not None and time.monotonic() - kept[0] < 30.0:
        return kept[1]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            reached = True
    except OSError:
        reached = False
    _REACH[host] = (time.monotonic(), reached)
    return reached


_REACH: dict[str, tuple[float, bool]] = {}


def _from_source(name: str, source: str, load: Any, **kwargs: Any) -> Any:
    """`load(source, **kwargs)` (a from_pretrained), from the local hub cache alone when `source` is a hub id
    and the hub is unreachable, so an offline machine answers in seconds rather than after a minute of
    retries; every failure becomes a MemcoreError naming `name` (the model as the user wrote it)."""
    if not Path(source).is_dir() and not hub_reachable():
        kwargs["local_files_only"] = True  # use the local hub cache if it has the model; no slow retries
    try:
        return load(source, **kwargs)
    except MemcoreError:
        raise
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MemcoreError(f"model '{name}' ships its own code; "
                               "rerun with --trust-remote-code if you trust it") from None
        raise _hub_error(name, e) from None
    except (OSError, KeyError) as e:
        raise _hub_error(name, e) from None


def load_tokenizer(spec: ModelSpec, home: Path | None = None) -> Any:
    """The tokenizer of `spec`'s model alone (no weights): for counting target tokens before anything loads.

    Raises MemcoreError as load_base does (a missing folder, the hub unreachable with no cached copy, remote
    code not trusted), within seconds."""
    from transformers import AutoTokenizer

    return _from_source(spec.name, resolve_source(spec, home), AutoTokenizer.from_pretrained,
                        trust_remote_code=spec.trust_remote_code)


def load_config(spec: ModelSpec, home: Path | None = None) -> Any:
    """The config of `spec`'s model alone (no weights): its context length, layer count and vocabulary size.

    Raises MemcoreError as load_tokenizer does."""
    from transformers import AutoConfig

    return _from_source(spec.name, resolve_source(spec, home), AutoConfig.from_pretrained,
                        trust_remote_code=spec.trust_remote_code)


def load_base(spec: ModelSpec, home: Path | None = None) -> Base:
    """Load tokenizer and model for `spec` onto its device, frozen, in eval mode (quantized through
    bitsandbytes for quant nf4 / int8).

    Raises MemcoreError: bitsandbytes missing for a quantized load, remote code not trusted, the model not
    found locally with the hub unreachable, or any other load failure (its first line)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(spec, home)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.quant != "none":
        if not bitsandbytes_available():
            raise MemcoreError(f"--quant {spec.quant} needs bitsandbytes, which is not installed or fails to import: "
                               "`pip install bitsandbytes`")
        from transformers import BitsAndBytesConfig

        if spec.quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    tokenizer = load_tokenizer(spec, home)
    model = _from_source(spec.name, source, AutoModelForCausalLM.from_pretrained, **kwargs)
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
