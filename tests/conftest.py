"""Shared fixtures: an isolated memcore home per test, the real default model (converted once per machine),
and tiny Llama models built in code for fast tests of mechanics."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The converted default model is cached across test sessions so only the first run pays the ~30 s conversion.
MODEL_CACHE = Path(os.environ.get("MEMCORE_TEST_CACHE", Path.home() / ".cache" / "memcore-tests"))


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Streamlit's AppTest runs its script as __main__ and leaves it there; a process spawned afterwards (the app's
    training process) would run that script again on start. Each test ends with the real __main__ back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from memcore.home import default_model_dir as convert

    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return convert(MODEL_CACHE, log=lambda m: None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model_dir: Path) -> Path:
    """A fresh MEMCORE_HOME whose models/ points at the shared converted default model."""
    h = tmp_path / "home"
    h.mkdir()
    (h / "models").symlink_to(default_model_dir.parent, target_is_directory=True)
    monkeypatch.setenv("MEMCORE_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def default_base(default_model_dir: Path):
    """The real default model, loaded once for the whole session (tests must detach their adapters)."""
    from memcore.config import ModelSpec
    from memcore.loading import load_base

    return load_base(ModelSpec(name=str(default_model_dir)))


def make_tiny_model(path: Path, tokenizer_dir: Path, layers: int = 4, hidden: int = 64, seed: int = 0,
                    context: int = 512) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A randomly initialized 4-layer Llama with the default model's tokenizer and a 512-token context."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_model_dir)


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path):
    from memcore.config import ModelSpec
    from memcore.loading import load_base

    return load_base(ModelSpec(name=str(tiny_model_dir)))


@pytest.fixture
def bypassed(tiny_base):
    """Yields a function that attaches an adapter to the shared tiny base (Base.adapted; by default the paper's bypass
    at rank 2), one at a time; the last one comes off when the test ends."""
    from contextlib import ExitStack

    from memcore.config import AdapterSpec

    held = ExitStack()

    def attach(spec=AdapterSpec(rank=2, layers="paper", kind="bypass"), seed=0):
        held.close()
        return held.enter_context(tiny_base.adapted(spec, seed=seed))

    with held:
        yield attach


@pytest.fixture
def hub_unreachable(tmp_path, monkeypatch):
    """No hub to reach (its endpoint a closed local port) and an empty local hub cache, as on an offline machine."""
    from huggingface_hub import constants

    import memcore.loading as loading

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import: the module's, not the env
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_REACH", {})
    return tmp_path / "hub"
