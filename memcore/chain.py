"""Runs trained one after another (TrainSpec.after): the chain behind a run, how its earlier passages fared while
it trained (lost and regained verbatim recall), and the whole chain as one story, passage by passage over the
steps of every run in it.

A chain A → B → C is C trained from B's adapter, B from A's. While B trains it measures A's targets as well (the
store's table earlier_steps); C measures A's and B's, laid end to end in chain order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from memcore.config import DataSpec, MemcoreError, RunSpec
from memcore.store import Store


def chain_of(store: Store, run_id: str) -> list[str]:
    """The runs `run_id` was trained after, oldest first, without `run_id` itself ([] for a run trained from the
    base). Raises MemcoreError when a run in it is unknown or the chain runs in a circle."""
    chain: list[str] = []
    rid = RunSpec.from_dict(store.run(run_id)["spec"]).train.after
    while rid is not None:
        if rid in chain or rid == run_id:
            raise MemcoreError(f"the chain of runs through {rid} runs in a circle")
        chain.append(rid)
        rid = RunSpec.from_dict(store.run(rid)["spec"]).train.after
    chain.reverse()
    return chain


def passage_parts(p: Any, correct: Any, run_ids: list[str], lengths: list[int], tau: float) -> list[dict[str, Any]]:
    """The earlier targets of a chained run (p and correct: [M], every earlier run's targets end to end in chain
    order, M = sum(lengths)) cut per run: {"run", "tokens", "above" (p > tau), "correct" (argmax right),
    "recalled" (all right), "prefix" (right in order before the first wrong)}; correct None leaves the last three
    None. Empty when p is missing or does not cover `lengths`."""
    if p is None or len(p) != sum(lengths):
        return []
    parts, at = [], 0
    for rid, n in zip(run_ids, lengths):
        part = {"run": rid, "tokens": n, "above": int((np.asarray(p[at:at + n], dtype=np.float32) > tau).sum()),
                "correct": None, "recalled": None, "prefix": None}
        if correct is not None:
            ok = [bool(c) for c in correct[at:at + n]]
            part.update(correct=sum(ok), recalled=all(ok), prefix=ok.index(False) if False in ok else n)
        parts.append(part)
        at += n
    return parts


def chain_pieces(store: Store, run_id: str) -> tuple[list[str], list[list[Any]]]:
    """The runs `run_id` was trained after (chain_of, oldest first) and each one's target tokens as text pieces
    (memcore.pieces.Piece), for drawing the earlier passages. Raises MemcoreError as chain_of and Store.tokens."""
    runs = chain_of(store, run_id)
    return runs, [store.tokens(rid)["pieces"] for rid in runs]


def is_chain_label(label: str | None) -> bool:
    """Whether a stored run's label marks it as a point of a chain sweep (memcore.chain_sweep: a first or second
    passage), whose runs are not points of the law."""
    return '"passage"' in (label or "")


class Retention:
    """How a chained run's earlier targets fare over its steps, fed one step at a time (StepReports or StepRows with
    step, earlier_recalled and rehearsal): `lost_at`, the first step at which they were no longer recalled verbatim
    after being recalled; `regained_at`, the first step after that at which they were recalled again; and the
    rehearsal share (the update weight on earlier targets, 0..1) of every step that trained."""

    def __init__(self) -> None:
        self.was: bool | None = None
        self.lost_at: int | None = None
        self.regained_at: int | None = None
        self.shares: list[float] = []

    def see(self, r: Any) -> None:
        """Take one step's measurement (steps in order; a repeated final step changes nothing)."""
        if r.earlier_recalled is None:
            return
        if self.was is True and not r.earlier_recalled and self.lost_at is None:
            self.lost_at = r.step
        if self.lost_at is not None and self.regained_at is None and r.earlier_recalled and r.step > self.lost_at:
            self.regained_at = r.step
        self.was = bool(r.earlier_recalled)
        if r.rehearsal is not None and not getattr(r, "final", False) and not getattr(r, "skipped", False):
            self.shares.append(float(r.rehearsal))

    @property
    def rehearsal_share(self) -> float:
        """Mean share of the update weight spent on earlier targets over the steps seen that trained (0 when none)."""
        return float(np.mean(self.shares)) if self.shares else 0.0


@dataclass
class ChainStory:
    """A chain told as one story: every passage's tokens above τ and verbatim recall over the steps of every run in
    the chain, on one step axis (a run's step s is story step start + s, its start the previous run's last step).

    rows: one dict per (story step, passage measured): story_step, run (the run training then), passage (the run
    whose targets were measured), above (tokens with p > τ), tokens, frac_above (0..1), recalled (every argmax
    right). starts: (story step, run id) where each run begins. events: (story step, passage, 'lost' | 'regained'),
    the steps at which a passage lost verbatim recall while a later run trained, and won it back."""

    runs: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    starts: list[tuple[int, str]] = field(default_factory=list)
    events: list[tuple[int, str, str]] = field(default_factory=list)


def chain_story(store: Store, run_id: str) -> ChainStory:
    """The chain ending at `run_id` (chain_of plus the run itself) as a ChainStory. A run's own passage is read from
    its steps; an earlier passage while a later run trained from that run's earlier_steps (split per passage from
    the per-token snapshots when there is more than one earlier passage, so a decimated history gives fewer points
    there). Raises MemcoreError when a run of the chain is unknown or never started."""
    runs = [*chain_of(store, run_id), run_id]
    lengths = {rid: sum(len(t) for t in store.tokens(rid)["target_ids"]) for rid in runs}
    story = ChainStory(runs)
    offset = 0
    for k, rid in enumerate(runs):
        story.starts.append((offset, rid))
        tau = RunSpec.from_dict(store.run(rid)["spec"]).train.tau
        own = store.steps(rid)
        for r in own:
            story.rows.append(_row(offset + r.step, rid, rid, r.n_above, r.n_tokens, r.recalled))
        earlier = runs[:k]
        if earlier:
            if len(earlier) == 1:
                for r in store.earlier_steps(rid):
                    story.rows.append(_row(offset + r.step, rid, earlier[0], r.earlier_above, r.earlier_tokens,
                                           r.earlier_recalled))
            else:
                for r in store.earlier_steps(rid, with_tokens=True):
                    for x in passage_parts(r.earlier_p, r.earlier_correct, earlier, [lengths[e] for e in earlier],
                                           tau):
                        story.rows.append(_row(offset + r.step, rid, x["run"], x["above"], x["tokens"],
                                               x["recalled"]))
        offset += own[-1].step if own else 0
    for passage in runs:  # lost / regained: only while a later run trained (its own training is learning it)
        was = None
        lost = False
        for r in sorted((r for r in story.rows if r["passage"] == passage and r["run"] != passage),
                        key=lambda r: r["story_step"]):
            if was is True and not r["recalled"] and not lost:
                story.events.append((r["story_step"], passage, "lost"))
                lost = True
            elif lost and r["recalled"] and was is False:
                story.events.append((r["story_step"], passage, "regained"))
                lost = False
            was = r["recalled"]
    return story


def _row(step: int, run: str, passage: str, above: int, tokens: int, recalled: bool) -> dict[str, Any]:
    return {"story_step": int(step), "run": run, "passage": passage, "above": int(above), "tokens": int(tokens),
            "frac_above": above / tokens if tokens else 0.0, "recalled": bool(recalled)}


def next_prompt(chain_length: int) -> str:
    """A prompt for the next passage of a chain `chain_length` runs long so far ('Recite passage 2.' after one run):
    a prompt of its own, since from one prompt greedy decoding can recite only one text."""
    return f"Recite passage {chain_length + 1}.\n"


def on_top(parent: RunSpec, parent_id: str, text: str, prompt: str, **train: Any) -> RunSpec:
    """The spec of a run memorizing `text` (conditioned on `prompt`) on top of run `parent_id`, whose spec is
    `parent`: the same model, placement and training settings, from its adapter (TrainSpec.after), with `train`'s
    changes (method, max_steps, keep, ...). Raises MemcoreError as the specs do (empty text, an unknown method)."""
    data = DataSpec(text=text, prompt=prompt, chat_template=parent.data.chat_template,
                    max_tokens=parent.data.max_tokens, seed=parent.data.seed)
    return replace(parent, data=data, train=replace(parent.train, after=parent_id, **train))
