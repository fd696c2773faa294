"""Frozen, validated descriptions of a run: which model, which adapter, which data, how to train.

Every field is checked in ``__post_init__`` so that a bad value fails before any model is loaded,
with a message that names the field and the value.  The field docstrings double as CLI help text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Method = Literal["sft", "memft-ot", "memft-sw"]
Quant = Literal["none", "nf4", "int8"]
OtWhenEmpty = Literal["skip", "mean"]
Recompute = Literal["auto", "on", "off"]
History = Literal["full", "decimated"]
AdapterKind = Literal["lora", "bypass"]
Until = Literal["budget", "converged"]
PlateauOn = Literal["delta_loss", "recall"]
ADAPTERS: tuple[str, ...] = ("lora", "bypass")

METHODS: tuple[str, ...] = ("sft", "memft-ot", "memft-sw")
QUANTS: tuple[str, ...] = ("none", "nf4", "int8")
TARGET_PRESETS: tuple[str, ...] = ("attn", "mlp", "all")
DEFAULT_MODEL = "default"
DEFAULT_PROMPT = "Recite the passage.\n"


class MemcoreError(Exception):
    """A problem the user can fix; its message is shown as one line, without a traceback."""


class TooManyTokens(MemcoreError):
    """The data hold more target tokens than the configured maximum. The message names the count, the limit and
    the command line's flag that raises it; the app, which has no such flag, says it in its own words."""

    def __init__(self, total: int, limit: int) -> None:
        self.total, self.limit = total, limit
        super().__init__(f"the text is {total} target tokens, more than the configured maximum of {limit} "
                         "(raise --max-tokens or shorten the text; nothing is truncated silently)")


MAX_TOTAL_TARGET_TOKENS = 262_144  # many samples together (the paper's largest PhoneBook is 256k answer tokens)


class WriteFailed(MemcoreError):
    """A file or the run store could not be written (a full disk, a quota, a read-only or failing file system).
    Its message names what, where and why: "could not write the adapter to /.../adapter (No space left on
    device)"; whoever catches it adds what was kept."""

    def __init__(self, what: str, where: Any, reason: str) -> None:
        self.what, self.where, self.reason = what, str(where), reason
        super().__init__(f"could not write {what} to {where} ({reason})")

    @classmethod
    def of(cls, what: str, where: Any, err: BaseException) -> WriteFailed:
        """From the error a write raised (is_write_error): the OS's reason where the error carries one (an
        OSError's strerror, "os error 28" in a safetensors message), else "No space left on device" when the file
        system has less than 1 MB free (torch.save's own words for it are "unexpected pos ..."), else the text."""
        import os
        import re
        import shutil

        reason = getattr(err, "strerror", None)
        code = re.search(r"os error (\d+)", str(err))
        if not reason and code:
            reason = os.strerror(int(code.group(1)))
        if not reason:
            folder = Path(where)
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            try:
                if shutil.disk_usage(folder).free < 1 << 20:
                    reason = os.strerror(28)  # ENOSPC
            except OSError:
                pass
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return cls(what, where, reason or first)


def is_write_error(err: BaseException) -> bool:
    """Whether an error raised while writing a file is the file system's refusal (a full disk, a quota, a read-only
    or failing device): an OSError, a RuntimeError from torch.save's writer, or safetensors' SafetensorError."""
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise MemcoreError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ModelSpec:
    """Which base model, and how it is loaded (quantization, device, dtype). Frozen: a cache key."""
    name: str = DEFAULT_MODEL
    """'default' (SmolLM2-135M-Instruct, shipped offline), a Hugging Face model id, or a local directory."""
    quant: Quant = "none"
    """Base-model quantization through bitsandbytes: none, nf4 (QLoRA) or int8."""
    device: str = "auto"
    """'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """'auto' (fp32 on CPU, bf16 on CUDA), 'float32', 'bfloat16' or 'float16'."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless asked for."""

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and self.name.strip() != "",
              f"model must be a non-empty name, got {self.name!r}")
        _need(self.quant in QUANTS, f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        _need(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _need(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
              f"device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter: kind (PEFT LoRA or the paper's bypass), rank, scaling, dropout, and where it goes."""
    rank: int = 8
    """Adapter rank r (of the LoRA or of the bypass)."""
    alpha: float | None = None
    """LoRA alpha; unset means alpha = rank, so the update scaling alpha/r is 1 at every rank (LoRA only)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (LoRA or bypass)."""
    targets: str | tuple[str, ...] = "all"
    """'attn', 'mlp', 'all' (linear layers of each block), or module names such as q_proj,v_proj (LoRA only)."""
    layers: str | tuple[int, ...] = "all"
    """'all', 'paper' (one layer at 2/3 depth, MLP projections, alpha = rank), or layer indices such as 0,5,9."""
    kind: AdapterKind = "lora"
    """'lora' (PEFT LoRA on the chosen linear layers) or 'bypass' (the paper's adapter: out = MLP(x) + x·A·B on
    the MLP of each chosen layer, no scaling; targets and alpha do not apply; saved by memcore, not PEFT)."""

    def __post_init__(self) -> None:
        _need(self.kind in ADAPTERS, f"adapter must be one of {', '.join(ADAPTERS)}, got {self.kind!r}")
        _need(_is_int(self.rank) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        _need(self.alpha is None or (_is_number(self.alpha) and self.alpha > 0),
              f"alpha must be a positive number, got {self.alpha!r}")
        _need(_is_number(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            _need(self.targets in TARGET_PRESETS,
                  f"targets must be one of {', '.join(TARGET_PRESETS)} or a list of module names, got {self.targets!r}")
        else:
            _need(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets),
                  f"targets must be a non-empty list of module names, got {self.targets!r}")
        if isinstance(self.layers, str):
            _need(self.layers in ("all", "paper"),
                  f"layers must be 'all', 'paper' or a list of layer indices, got {self.layers!r}")
        else:
            _need(len(self.layers) > 0 and all(_is_int(i) and i >= 0 for i in self.layers),
                  "layers must be layer indices >= 0 (like 0,5,9), got "
                  + (",".join(map(str, self.layers)) if self.layers else "none"))

    @property
    def lora_alpha(self) -> float:
        """The LoRA alpha PEFT gets: `alpha`, else the rank (scaling 1); the rank at the paper placement."""
        return float(self.rank if self.alpha is None or self.layers == "paper" else self.alpha)


@dataclass(frozen=True)
class DataSpec:
    """What is memorized: exactly one source (text, sample, pairs, phonebook, random tokens), its prompt and
    length, optional noise. Validation names the bad value (MemcoreError)."""
    text: str | None = None
    """The passage to memorize (all of it is the target)."""
    prompt: str | None = DEFAULT_PROMPT
    """Text the target is conditioned on but not trained on. Empty: the target follows the BOS token alone."""
    phonebook: int | None = None
    """Instead of a passage: a PhoneBook of this many 'Name:' -> 10-digit number entries."""
    pairs: tuple[tuple[str, str], ...] | None = None
    """Instead of a passage: (prompt, target) samples trained together as one batch (read from JSONL)."""
    random_tokens: int | None = None
    """Instead of a passage: this many token ids drawn uniformly from the vocabulary's ordinary tokens (seeded by
    the seed): the paper's r100 data."""
    length: int | None = None
    """Keep only the first this many target tokens (of each sample, for a PhoneBook)."""
    noise: float = 0.0
    """Fraction of target tokens replaced by random tokens (seeded by the seed)."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template as a user turn."""
    seed: int = 0
    """Seed for the PhoneBook generator and the noise."""
    max_tokens: int = 2048
    """Largest number of target tokens of one passage (of each sample, when there are several: a PhoneBook or
    JSONL pairs, whose total is bounded by memory instead); longer text is refused, never truncated silently."""

    def __post_init__(self) -> None:
        given = [k for k in ("text", "phonebook", "pairs", "random_tokens") if getattr(self, k) is not None]
        _need(len(given) == 1,
              "give exactly one of a text, a phonebook size, prompt/target pairs or a random-token count, "
              f"got {' and '.join(given) if given else 'none'}")
        if self.pairs is not None:
            _need(isinstance(self.pairs, tuple) and len(self.pairs) >= 1,
                  "pairs must be a non-empty list of (prompt, target)")
            for i, pair in enumerate(self.pairs):
                _need(isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair),
                      f"pair {i + 1} must be a (prompt, target) pair of strings, got {pair!r}")
                _need(pair[1].strip() != "", f"pair {i + 1} has an empty target: nothing to memorize")
        if self.random_tokens is not None:
            _need(_is_int(self.random_tokens) and self.random_tokens >= 1,
                  f"random tokens must be an integer >= 1, got {self.random_tokens!r}")
        if self.text is not None:
            _need(isinstance(self.text, str), f"text must be a string, got {type(self.text).__name__}")
            _need(self.text.strip() != "", "the text is empty (or only whitespace): nothing to memorize")
        if self.phonebook is not None:
            _need(_is_int(self.phonebook) and 1 <= self.phonebook <= 10_000,
                  f"phonebook entries must be an integer in [1, 10000], got {self.phonebook!r}")
        _need(self.prompt is None or isinstance(self.prompt, str),
              f"prompt must be a string, got {type(self.prompt).__name__}")
        _need(self.length is None or (_is_int(self.length) and self.length >= 1),
              f"length must be an integer >= 1, got {self.length!r}")
        _need(_is_number(self.noise) and 0 <= self.noise <= 1,
              f"noise must be a fraction in [0, 1], got {self.noise!r}")
        _need(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _need(_is_int(self.max_tokens) and self.max_tokens >= 1,
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")


@dataclass(frozen=True)
class TrainSpec:
    """How it is trained: method, τ, optimizer settings, budget, stop rules, memft-sw's window."""
    method: Method = "memft-ot"
    """sft (mean cross-entropy), memft-ot (threshold only) or memft-sw (sliding window)."""
    tau: float = 0.5
    """Probability threshold τ: a token counts as memorized once p(correct) > τ."""
    lr: float = 2e-3
    """AdamW learning rate (decays linearly to 0 over the step budget, no warmup)."""
    max_steps: int = 200
    """The step budget: most optimizer updates."""
    max_seconds: float | None = None
    """Stop after this much wall time (the adapter so far is kept)."""
    stop_when_recalled: bool = True
    """Stop as soon as greedy decoding reproduces every target token."""
    verify: bool = True
    """Confirm the final recall with a real greedy generate (sweeps turn it off: the teacher-forced argmax is exact)."""
    ot_when_empty: OtWhenEmpty = "skip"
    """memft-ot when every token is above τ: 'skip' the update, or fall back to the plain 'mean' loss."""
    window: int = 50
    """memft-sw base window W in tokens."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed for adapter initialisation and dropout."""
    curriculum_stages: int = 5
    """memft-sw only, with several samples: train on the first 1/K, 2/K, ... of them, in K stages."""
    batch_size: int | None = None
    """Samples trained per step (minibatches of a PhoneBook, in an order reshuffled every epoch); the reports
    still cover every sample: those trained this step measured afresh, the others as they were when last
    trained. Unset: every sample in every step. With memft-sw the curriculum then admits whole samples by
    epoch."""
    curriculum_epochs: tuple[int, ...] | None = None
    """memft-sw with minibatches: the epochs at which each curriculum stage but the last ends, e.g. 20,40,60,80 (the
    paper's PhoneBook at 1-2k answer tokens); unset: the stages share the step budget equally."""
    after: str | None = None
    """Start from this run's final adapter instead of a fresh one (a run id, a unique prefix or 'last'; the model
    and placement are taken from it) and measure its targets, and those of the runs it was trained after, at every
    step beside the new ones: what the new text does to the old."""
    keep: bool = False
    """With --after: rehearse, i.e. train on the earlier runs' targets as well as this run's (under memft-ot an
    earlier token carries weight only while it is below τ); without it they are measured, never trained."""
    checkpoint_every: float = 180.0
    """Save the adapter and optimizer state every this many seconds (0: never), so a killed run can resume."""
    history: History = "full"
    """Per-token replay history kept in the store: every step ('full'), or at most about 300 snapshots, denser
    early, plus the final step ('decimated': what sweeps keep unless asked). Scalars are kept for every step."""
    until: Until = "budget"
    """'budget': train the step budget (stopping early once recalled, unless the full budget is asked for);
    'converged': also stop once every target token is above τ, or once ΔL has gained less than the plateau
    tolerance over the plateau window (a plateau); the step budget stays the cap."""
    plateau_window: int = 100
    """Steps over which a plateau is judged (until converged)."""
    plateau_tol: float = 0.01
    """ΔL gain, in nats per token, below which the plateau window counts as a plateau (until converged)."""
    plateau_on: PlateauOn = "delta_loss"
    """What a plateau is judged on (until converged): 'delta_loss', ΔL gaining less than the plateau tolerance over
    the plateau window; 'recall', neither the tokens above τ nor the argmax-right tokens reaching a new best in the
    plateau window. 'recall' treats the methods alike (memft-ot's ΔL flattens by design once its tokens sit just
    above τ, so a ΔL plateau stops it earlier than sft in the same state of recall)."""
    recompute: Recompute = "auto"
    """Recompute the trained blocks' activations in the backward instead of keeping them: less memory at long
    targets for about one more forward; 'auto' turns it on when their activations would take over 768 MB."""

    def __post_init__(self) -> None:
        _need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _need(_is_number(self.tau) and 0 < self.tau < 1, f"tau must be strictly between 0 and 1, got {self.tau!r}")
        _need(_is_number(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr!r}")
        _need(_is_int(self.max_steps) and self.max_steps >= 1,
              f"max steps must be an integer >= 1, got {self.max_steps!r}")
        _need(self.max_seconds is None or (_is_number(self.max_seconds) and self.max_seconds > 0),
              f"max seconds must be a positive number, got {self.max_seconds!r}")
        _need(self.ot_when_empty in ("skip", "mean"), f"ot_when_empty must be skip or mean, got {self.ot_when_empty!r}")
        _need(_is_int(self.window) and self.window >= 1, f"window must be an integer >= 1, got {self.window!r}")
        _need(_is_number(self.weight_decay) and self.weight_decay >= 0,
              f"weight decay must be >= 0, got {self.weight_decay!r}")
        _need(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _need(_is_int(self.curriculum_stages) and self.curriculum_stages >= 1,
              f"curriculum stages must be >= 1, got {self.curriculum_stages!r}")
        _need(self.batch_size is None or (_is_int(self.batch_size) and self.batch_size >= 1),
              f"batch size must be a whole number of samples >= 1, got {self.batch_size!r}")
        if self.curriculum_epochs is not None:
            e = self.curriculum_epochs
            shown = ",".join(map(str, e)) if isinstance(e, tuple) else repr(e)
            _need(isinstance(e, tuple) and all(_is_int(x) and x >= 1 for x in e)
                  and all(a < b for a, b in zip(e, e[1:])),
                  f"--curriculum-epochs must be increasing whole numbers >= 1, like 20,40,60,80; got {shown}")
            _need(len(e) == self.curriculum_stages - 1,
                  f"--curriculum-epochs gives the epoch at which each stage but the last ends: "
                  f"{self.curriculum_stages} stages need {self.curriculum_stages - 1} numbers, got {len(e)} ({shown}); "
                  f"give {self.curriculum_stages - 1}, or set --curriculum-stages {len(e) + 1}")
            _need(self.batch_size is not None,
                  "--curriculum-epochs counts epochs of minibatches: give --batch-size N as well")
        _need(self.after is None or (isinstance(self.after, str) and self.after.strip() != ""),
              f"--after takes a run id, got {self.after!r}")
        _need(isinstance(self.keep, bool), f"keep must be true or false, got {self.keep!r}")
        _need(not self.keep or self.after is not None,
              "--keep rehearses the targets of the run given by --after: give --after RUN as well")
        _need(_is_number(self.checkpoint_every) and self.checkpoint_every >= 0,
              f"checkpoint interval must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        _need(self.history in ("full", "decimated"), f"history must be full or decimated, got {self.history!r}")
        _need(self.until in ("budget", "converged"), f"until must be budget or converged, got {self.until!r}")
        _need(_is_int(self.plateau_window) and self.plateau_window >= 2,
              f"plateau window must be an integer >= 2 steps, got {self.plateau_window!r}")
        _need(_is_number(self.plateau_tol) and self.plateau_tol >= 0,
              f"plateau tolerance must be >= 0 nats, got {self.plateau_tol!r}")
        _need(self.plateau_on in ("delta_loss", "recall"),
              f"plateau_on must be delta_loss or recall, got {self.plateau_on!r}")
        _need(self.recompute in ("auto", "on", "off"), f"recompute must be auto, on or off, got {self.recompute!r}")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run; stored as JSON with the run."""

    model: ModelSpec = field(default_factory=ModelSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(text="x"))
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples as lists), as the run store keeps it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """A RunSpec from `to_dict` output (lists back to tuples; unknown keys ignored, missing ones default).

        Raises MemcoreError when a value fails validation."""
        def frozen(v: Any) -> Any:  # JSON lists back to the tuples the frozen specs hold
            return tuple(frozen(x) for x in v) if isinstance(v, list) else v

        def build(kind: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in fields(kind)}
            kw = {k: frozen(v) for k, v in values.items() if k in names}
            return kind(**kw)

        return cls(model=build(ModelSpec, d.get("model", {})), adapter=build(AdapterSpec, d.get("adapter", {})),
                   data=build(DataSpec, d.get("data", {})), train=build(TrainSpec, d.get("train", {})))
