"""Behaviour on the real default model (SmolLM2-135M-Instruct, shipped offline): memorization that a user
can verify independently of memcore."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memcore.cli import main
from memcore.data import read_sample
from memcore.store import Store

pytestmark = pytest.mark.slow

INDEPENDENT_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
s = json.loads(sys.argv[1])
cfg = json.load(open(s["adapter_dir"] + "/adapter_config.json"))
base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
model = PeftModel.from_pretrained(base, s["adapter_dir"]).eval()
ids = torch.tensor([s["prompt_ids"]])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(s["target_ids"]), do_sample=False)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


def test_memft_ot_memorizes_a_sample_passage_and_stock_peft_recites_it(home, capsys):
    code = main(["train", "--sample", "lighthouse", "--method", "memft-ot", "--tau", "0.5", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "completed"
    # defaults bring a ~100-token passage to exact recall within 50 steps, confirmed by a real generate
    assert summary["recalled"] is True and summary["teacher_forced_recalled"] is True
    assert summary["stop_reason"] == "recalled" and summary["steps"] <= 50
    assert summary["first_divergence"] is None and summary["generated_ids"] == summary["target_ids"]
    assert summary["delta_loss"] > 0 and summary["bits_stored"] > 0
    assert summary["bits_per_param"] == pytest.approx(summary["bits_stored"] / summary["p_eff"])

    # a fresh process with stock transformers + peft reproduces the passage token for token
    out = subprocess.run([sys.executable, "-c", INDEPENDENT_CHECK, json.dumps(summary)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == summary["target_ids"]

    # every recorded position: p > 0.5 implies the teacher-forced argmax is the target (the 0.5 phase transition)
    store = Store(home)
    replay = store.replay(summary["run_id"])
    assert replay.p.shape == (summary["steps"] + 1, len(summary["target_ids"]))
    above = replay.p > 0.5
    assert above.any() and not np.any(above & ~replay.correct)
    # and the recorded history ends where the summary says
    assert replay.correct[-1].all() and not replay.correct[0].all()
    steps = store.steps(summary["run_id"])
    assert [s.n_above for s in steps][-1] == summary["n_above"]

    # `memcore generate` on the run recites it as well
    assert main(["generate", summary["run_id"]]) == 0
    io = capsys.readouterr()
    assert "recalled verbatim: yes" in io.err
    assert io.out.strip() == read_sample("lighthouse").strip()


def test_sft_reaches_recall_too_but_memft_ot_trains_fewer_tokens(home, capsys):
    main(["train", "--sample", "orbit", "--method", "sft", "--json"])
    sft = json.loads(capsys.readouterr().out)
    assert sft["recalled"] is True
    steps = Store(home).steps(sft["run_id"])
    assert all(s.active == s.n_tokens for s in steps[:-1])  # sft weighs every token every step


def test_nf4_qlora_trains_on_cpu(home, capsys):
    pytest.importorskip("bitsandbytes")
    res = {}
    for quant in ("nf4", "none"):
        code = main(["train", "--sample", "orbit", "--quant", quant, "--max-steps", "6", "--full-budget", "--json"])
        res[quant] = json.loads(capsys.readouterr().out)
        assert code == 0 and res[quant]["steps"] == 6 and res[quant]["quant"] == quant
    # QLoRA on the 4-bit base learns about as fast as LoRA on the float base
    assert res["nf4"]["delta_loss"] > 0.5 * res["none"]["delta_loss"] > 0


FIELD = Path(__file__).resolve().parent / "field"  # inputs people reported against tools like this one


@pytest.mark.parametrize("name", ["special_tokens.txt", "cjk_emoji.txt"])
def test_field_texts_are_memorized_verbatim_and_stored_as_their_characters(home, capsys, name):
    f = FIELD / name
    text = f.read_text(encoding="utf-8")
    assert main(["train", "--text-file", str(f), "--max-steps", "60", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    # recalled in the usual number of steps, confirmed by greedy decoding, with no disagreement
    assert s["recalled"] is True and s["stop_reason"] == "recalled" and s["steps"] <= 30, s
    assert s["notes"] == [] and s["generated_ids"] == s["target_ids"]
    pieces = Store(home).tokens(s["run_id"])["pieces"]
    assert "".join(p.text for p in pieces) == text and not any("\ufffd" in p.label for p in pieces)
    assert main(["show", s["run_id"]]) == 0
    assert "\ufffd" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_whose_loss_rose_says_so(home, capsys):
    """A learning rate far too high makes the loss rise: the summary says so and what to try, not just ΔL < 0."""
    from memcore.cli import main

    assert main(["train", "--sample", "lighthouse", "--length", "20", "--lr", "0.5", "--method", "sft",
                 "--max-steps", "4", "--full-budget", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["delta_loss"] < 0
    assert any(n.startswith("the loss rose in training (ΔL -") and "learning rate (0.5) is probably too high" in n
               for n in s["notes"])
