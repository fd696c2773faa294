"""The two records a run leaves: one StepRow per optimizer step, one RunSummary at its end.

The store writes and reads them (steps table + token_steps blobs; the runs table's summary JSON), the trainer
process sends StepRows to the app, and the CLI, the app, sweeps and the law read both by attribute. A
RunSummary read from an older store may lack fields added since; ``RunSummary.from_dict`` fills them from
what the older summary had (e.g. exact recall from teacher-forced recall), so no reader repeats that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EARLIER_FIELDS = ("earlier_above", "earlier_correct_n", "earlier_tokens", "earlier_recalled", "earlier_prefix",
                  "rehearsal", "earlier_p", "earlier_correct")
"""The StepRow fields a run trained after others sets (Store.earlier_steps reads them back)."""


@dataclass
class StepRow:
    """One optimizer step of a run as recorded: the adapter after `step` updates.

    p: [N] float16 probability of the correct token per target token (None: a decimated history stored only
    the scalars here). correct: [N] bool, teacher-forced argmax == target. N = n_tokens, in sample order."""

    step: int  # optimizer updates applied
    loss: float  # mean cross-entropy over target tokens, nats
    delta_loss: float  # base loss minus loss, nats per token
    n_above: int  # tokens with p > tau
    n_correct: int  # tokens whose argmax is right
    n_tokens: int
    active: int  # tokens that carried weight in the update taken from this state
    recalled: bool  # every argmax right
    first_divergence: int | None  # first wrong position (flat index), None when recalled
    elapsed: float  # seconds since training started
    lr: float
    skipped: bool  # no update taken (nothing below tau)
    p: np.ndarray | None = None
    correct: np.ndarray | None = None
    final: bool = False  # the run's last report (sent live only; the store keeps the summary instead)
    # a run trained after another: the earlier runs' targets (M tokens) at this step, and the share of the update
    # weight spent rehearsing them (None on a run without earlier targets)
    earlier_above: int | None = None
    earlier_correct_n: int | None = None
    earlier_tokens: int | None = None
    earlier_recalled: bool | None = None
    earlier_prefix: int | None = None
    rehearsal: float | None = None
    earlier_p: np.ndarray | None = None  # [M] float16 (None where p is None)
    earlier_correct: np.ndarray | None = None  # [M] bool

    @classmethod
    def of(cls, report: Any) -> StepRow:
        """The row of a memcore.measure.StepReport."""
        row = cls(step=report.step, loss=report.loss, delta_loss=report.delta_loss, n_above=report.n_above,
                  n_correct=report.n_correct, n_tokens=report.n_tokens, active=report.active,
                  recalled=bool(report.recalled), first_divergence=report.first_divergence, elapsed=report.elapsed,
                  lr=report.lr, skipped=bool(report.skipped), p=report.p, correct=report.correct, final=report.final)
        if getattr(report, "earlier_p", None) is not None:
            row.earlier_above, row.earlier_tokens = report.earlier_above, int(report.earlier_p.shape[0])
            row.earlier_correct_n = int(report.earlier_correct.sum())
            row.earlier_recalled, row.earlier_prefix = bool(report.earlier_recalled), report.earlier_prefix
            row.rehearsal = report.rehearsal
            row.earlier_p, row.earlier_correct = report.earlier_p, report.earlier_correct
        return row

    @property
    def chained(self) -> bool:
        """Whether the row measures earlier runs' targets too."""
        return self.earlier_tokens is not None

    @property
    def frac_above(self) -> float:
        """Share of target tokens with p > tau."""
        return self.n_above / max(1, self.n_tokens)

    @property
    def token_accuracy(self) -> float:
        """Share of target tokens whose teacher-forced argmax is right."""
        return self.n_correct / max(1, self.n_tokens)

    def scalars(self) -> tuple:
        """The values of STEP_COLUMNS, in order, as the store's steps table holds them (flags as 0/1)."""
        return tuple(int(v) if isinstance(v, bool) else v for v in (getattr(self, c) for c in STEP_COLUMNS))

    def scalar_dict(self) -> dict[str, Any]:
        """STEP_COLUMNS -> value, as scalars() (one CSV or table row)."""
        return dict(zip(STEP_COLUMNS, self.scalars()))

    @classmethod
    def from_scalars(cls, values: tuple) -> StepRow:
        """A row from the values of STEP_COLUMNS in order (as the store holds them), without p and correct."""
        d = dict(zip(STEP_COLUMNS, values))
        d["recalled"], d["skipped"] = bool(d["recalled"]), bool(d["skipped"])
        return cls(**d)


# why a run stopped, in words (RunSummary.stop_reason -> what a reader is told)
STOP_WORDS: dict[str, str] = {"recalled": "recalled verbatim", "max_steps": "reached its step budget",
                              "all_above_tau": "every token above τ", "plateau": "ΔL reached a plateau",
                              "max_seconds": "reached its time limit", "stopped": "stopped"}

# the scalar columns of the store's steps table, in order (p and correct live in token_steps)
STEP_COLUMNS: tuple[str, ...] = ("step", "loss", "delta_loss", "n_above", "n_correct", "n_tokens", "active", "recalled",
                                 "first_divergence", "elapsed", "lr", "skipped")


@dataclass
class RunSummary:
    """What a finished (or stopped) run holds: how and why it stopped, recall, the law's numbers, cost, and
    what was trained. Stored as JSON in the run store and as summary.json next to the adapter.

    Recall: `recalled` and `first_divergence` are confirmed by greedy decoding when `verified_by_generate`,
    else they are the teacher-forced ones (also kept as teacher_forced_*). `exact_recall`, `token_accuracy`
    and `verbatim_prefix` are the teacher-forced figures a sweep compares."""

    run_id: str
    steps: int  # optimizer updates applied
    stop_reason: str | None  # recalled | all_above_tau | plateau | max_steps | max_seconds | stopped
    recalled: bool
    verified_by_generate: bool
    teacher_forced_recalled: bool
    first_divergence: int | None
    teacher_forced_first_divergence: int | None
    n_tokens: int
    n_above: int  # tokens with p > tau at the end
    n_correct: int  # tokens whose argmax is right at the end
    converged: bool  # stopped because training converged (all_above_tau or plateau)
    exact_recall: bool  # every teacher-forced argmax right
    token_accuracy: float  # n_correct / n_tokens
    verbatim_prefix: int  # tokens before the first wrong argmax (n_tokens when recalled)
    adapter: str  # lora | bypass
    base_loss: float  # mean base-model loss over the targets, nats per token
    loss: float  # nats per token
    delta_loss: float  # base_loss - loss, nats per token
    p_eff: int  # trainable parameters
    bits_stored: float  # sum over tokens of (base loss - loss) / ln 2, bits
    bits_per_param: float
    seconds_per_step: float | None  # training time per step, greedy checks excluded
    train_seconds: float
    model: str
    quant: str | None
    method: str
    tau: float
    rank: int
    adapter_dir: str
    prompt_ids: list  # [ids] for one sample, [[ids], ...] for several
    target_ids: list
    generated_ids: list | None
    stubborn_tokens: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    history: str = "full"  # full | decimated: the per-token snapshots kept in the store
    snapshots: int | None = None  # steps with a per-token snapshot
    source_bits_per_token: float | None = None  # log2 of the ordinary vocabulary for random tokens; None for text
    samples: int = 1  # samples trained together (PhoneBook entries, JSONL pairs)
    samples_recalled: int | None = None  # samples whose every teacher-forced argmax is right (None: stored before)
    status: str | None = None  # the run's status when the summary was written
    device: str | None = None  # where it trained: cpu, cuda (None in older summaries)
    dtype: str | None = None  # the base model's compute dtype: float32, bfloat16, ... (None in older summaries)
    # a run trained after another (TrainSpec.after): the chain and how the earlier runs' targets fared
    after: str | None = None  # the run it started from
    chain: list[str] = field(default_factory=list)  # every earlier run, oldest first (after is the last)
    keep: bool = False  # the earlier targets were rehearsed (trained) as well
    earlier_tokens: int | None = None  # the earlier runs' target tokens
    earlier_above: int | None = None  # of them with p > tau at the end
    earlier_correct: int | None = None  # of them with the argmax right at the end
    earlier_recalled: bool | None = None  # every earlier argmax right at the end (teacher-forced: greedy decoding)
    earlier_prefix: int | None = None  # earlier tokens recalled in order before the first wrong one, at the end
    earlier_lost_at: int | None = None  # the step the earlier targets first lost verbatim recall (None: never)
    earlier_regained_at: int | None = None  # the step they were recalled again after that (None: never)
    rehearsal_share: float | None = None  # mean share of the update weight on earlier targets over the steps trained
    # the same at the end per earlier run (chain order): {"run", "tokens", "above", "correct", "recalled", "prefix"}
    earlier_parts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept on a round trip)

    @property
    def ending(self) -> str:
        """How the run ended, in words: its status, and why when the status does not say it ("completed: recalled
        verbatim", "completed: reached its time limit", "stopped")."""
        why = STOP_WORDS.get(self.stop_reason or "", self.stop_reason)
        status = self.status or ("stopped" if self.stop_reason in ("stopped", "max_seconds") else "completed")
        if not why or why == status:
            return status
        return f"{status}: {why}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, fields in declaration order, then `extra`'s keys."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        """A summary from its stored JSON, older layouts included: fields added since are derived from what the
        older summary had. Raises KeyError when a field that every version wrote is missing."""
        d = dict(d)
        n = d["n_tokens"]
        first = d.get("teacher_forced_first_divergence", d.get("first_divergence"))
        d.setdefault("teacher_forced_recalled", d["recalled"])
        d.setdefault("teacher_forced_first_divergence", first)
        d.setdefault("verified_by_generate", True)  # older summaries: recall was always checked by generate
        d.setdefault("converged", False)
        d.setdefault("exact_recall", bool(d["teacher_forced_recalled"]))
        d.setdefault("token_accuracy", d["n_correct"] / n if n else 0.0)
        d.setdefault("verbatim_prefix", n if first is None else first)
        d.setdefault("adapter", "lora")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in known and k != "extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={**d.get("extra", {}), **extra})
