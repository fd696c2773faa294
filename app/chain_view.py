"""How the app draws runs trained one after another (memcore.chain): a chained run's earlier passage beside its own
while it trains and in its results, "Memorize more on top of this" on a finished run, and on the Runs page the
whole chain replayed as one story."""

from __future__ import annotations

import copy
from typing import Any

import charts
import numpy as np
import pandas as pd
import streamlit as st
from common import (
    MAX_PASTE_CHARS,
    bounded_number,
    error_text,
    get_worker,
    preflight_counts,
    session_id,
    show_chart,
)

from memcore.chain import passage_parts
from memcore.config import MemcoreError


def earlier_name(runs: list[str]) -> str:
    """How the page names a chained run's earlier targets: 'the earlier passage (run A)' or, for a longer chain,
    'the earlier passages (runs A, B)'."""
    if len(runs) == 1:
        return f"the earlier passage (run {runs[0]})"
    return "the earlier passages (runs " + ", ".join(runs) + ")" if runs else "the earlier passage"


def chain_history(rows: list[dict[str, Any]], earlier: str) -> pd.DataFrame:
    """A chained run's step rows (RunLive rows with frac_above, recalled, earlier_above, earlier_tokens,
    earlier_recalled) as charts.chain_chart's history: one row per passage and step, the earlier passage first (so
    that it takes the first colour, as the oldest passage does in the chain story on the Runs page)."""
    own = [{"step": r["step"], "passage": "this passage", "frac_above": r["frac_above"],
            "recalled": bool(r.get("recalled", False))} for r in rows]
    old = [{"step": r["step"], "passage": earlier, "frac_above": r["earlier_above"] / max(1, r["earlier_tokens"]),
            "recalled": bool(r["earlier_recalled"])} for r in rows if r.get("earlier_tokens")]
    return pd.DataFrame(old + own)


def retention_events(lost_at: int | None, regained_at: int | None, earlier: str = "earlier") -> pd.DataFrame:
    """The steps to mark on a chained run's chart: where its earlier passage lost verbatim recall and won it back."""
    ev = []
    if lost_at is not None:
        ev.append({"step": lost_at, "label": f"{earlier} lost at step {lost_at}"})
    if regained_at is not None:
        ev.append({"step": regained_at, "label": f"{earlier} recalled again at step {regained_at}"})
    return pd.DataFrame(ev, columns=["step", "label"])


def render_earlier(snap: dict[str, Any], key: str, tau: float, show_tokens: bool = True) -> None:
    """A chained run's earlier passage beside its own: the count above τ and whether it is still recalled, its tokens
    coloured by p (blue above τ, turning red as they fall below), and the chart of both passages over the steps
    with the step it lost verbatim recall (and won it back) marked."""
    row = snap["last_row"]
    name = earlier_name(snap["earlier_runs"])
    m = row.get("earlier_tokens")
    if not m:
        return
    lost, back = snap["lost_at"], snap["regained_at"]
    state = "still recalled verbatim" if row["earlier_recalled"] else "no longer recalled verbatim"
    when = (f" · lost at step {lost}" if lost is not None else "") + (
        f", recalled again at step {back}" if back is not None else "")
    share = row.get("rehearsal")
    rehearse = f" · {share:.0%} of this step's update weight on it" if snap["spec"].train.keep and share is not None \
        else ""
    st.markdown(f"**{name[0].upper() + name[1:]}** · **{row['earlier_above']}/{m}** tokens above τ · {state}{when}"
                f"{rehearse}")
    p, pieces = snap["earlier_p"], snap["earlier_pieces"]
    if show_tokens and p is not None and len(pieces) == len(p):
        render_passages(snap["earlier_runs"], snap.get("earlier_lengths") or [], pieces, p,
                        snap.get("earlier_correct"), tau)
    cache = st.session_state.setdefault("chain_views", {})
    hit = cache.get(key)
    if hit is None or hit[0] != snap["step"]:  # built once per step: the refreshes between two steps resend it
        hist = chain_history(snap["rows"], "earlier passage")
        chart = charts.chain_chart(hist, retention_events(lost, back), title="This passage and the earlier one")
        hit = cache[key] = (snap["step"], charts.stable_spec(chart))
    show_chart(copy.deepcopy(hit[1]))


def render_passages(runs: list[str], lengths: list[int], pieces: list[Any], p: np.ndarray,
                    correct: np.ndarray | None, tau: float) -> None:
    """The earlier targets' tokens coloured by p against τ (p, correct: [M], laid end to end in chain order): one
    passage alone as one strip; a longer chain as one strip per run, each named with its own count above τ and
    whether it is still recalled verbatim (every argmax right; memcore.chain.passage_parts), so passages never run
    together."""
    parts = passage_parts(p, correct, runs, lengths, tau) if len(runs) >= 2 and len(lengths) == len(runs) else []
    if not parts:
        st.html(charts.token_html(pieces, p, tau))
        return
    at = 0
    for x in parts:
        part = slice(at, at + x["tokens"])
        at += x["tokens"]
        state = {None: "", True: " · recalled verbatim", False: " · not recalled verbatim"}[x["recalled"]]
        st.caption(f"run {x['run']}: {x['above']}/{x['tokens']} tokens above τ{state}")
        st.html(charts.token_html(pieces[part], p[part], tau))


def render_earlier_result(summ: Any) -> None:
    """A finished chained run's earlier passages: tokens above τ and recall at the end, where recall was lost and won
    back, and the share of the update weight rehearsal took."""
    name = earlier_name(summ.chain)
    m = summ.earlier_tokens
    st.markdown(f"**{name[0].upper() + name[1:]}** at the end")
    e1, e2, e3 = st.columns(3)
    e1.metric("Still recalled", "yes" if summ.earlier_recalled else "no")
    e2.metric("Tokens above τ", f"{summ.earlier_above}/{m}")
    e3.metric("Verbatim prefix", f"{summ.earlier_prefix}/{m}")
    e1.metric("Lost at step", "never" if summ.earlier_lost_at is None else summ.earlier_lost_at)
    e2.metric("Recalled again at", "-" if summ.earlier_regained_at is None else summ.earlier_regained_at)
    e3.metric("Rehearsal share", f"{summ.rehearsal_share or 0:.1%}" if summ.keep else "not rehearsed",
              help="mean share of the update weight spent on the earlier targets over the steps trained (--keep)")


def render_more(summ: Any, spec: Any, switch: bool = False) -> None:
    """'Memorize more on top of this': a next passage trained from this run's adapter (memcore train --after), the
    earlier passage measured at every step beside it, rehearsed or not. `switch`: open the new job on the Memorize
    page (from the Runs page)."""
    from memcore.chain import next_prompt, on_top
    from memcore.config import METHODS

    with st.expander("Memorize more on top of this", expanded=False):
        st.caption("A second passage goes into the same adapter, starting from this run's. This run's passage is "
                   "measured at every step beside it: watch its tokens turn from blue to red as they fall below τ. "
                   "Rehearsing trains on it as well (under memft-ot only its tokens that fell below τ carry weight). "
                   f"The model, adapter (rank {spec.adapter.rank}) and the other training settings are this run's: "
                   f"learning rate {spec.train.lr:g}, τ {spec.train.tau:g}, dropout {spec.adapter.dropout:g}.")
        with st.form(f"more-{summ.run_id}", enter_to_submit=False):  # a key press must not start a training run
            rid = summ.run_id
            text = st.text_area("Next passage", height=120, placeholder="Paste the next text to memorize ...",
                                key=f"more-text-{rid}")
            prompt = st.text_area("Its prompt (a prompt of its own: from one prompt only one text can be recited)",
                                  value=next_prompt(len(summ.chain) + 1), height=68, key=f"more-prompt-{rid}")
            c1, c2, c3 = st.columns(3)
            method = c1.selectbox("Method", METHODS, index=METHODS.index(spec.train.method), key=f"more-method-{rid}")
            out_of_range: list[str] = []
            steps = int(bounded_number(c2, "Step budget", 1, 10_000, out_of_range, value=spec.train.max_steps,
                                       key=f"more-steps-{rid}"))
            keep = c3.checkbox("Rehearse the earlier passage", value=False, key=f"more-keep-{rid}",
                               help="train on the earlier passage as well (--keep); unticked it is only measured")
            if st.form_submit_button("Start on top of this run", type="primary", key=f"more-start-{rid}"):
                try:
                    if out_of_range:
                        raise MemcoreError("; ".join(out_of_range))
                    if len(text) > MAX_PASTE_CHARS:
                        raise MemcoreError(f"The passage is {len(text):,} characters; the app accepts up to "
                                           f"{MAX_PASTE_CHARS:,}.")
                    new = on_top(spec, summ.run_id, text, prompt, method=method, max_steps=steps, keep=keep)
                    preflight_counts(new.model.name, new.data, new.adapter.layers)
                except Exception as e:
                    st.error(f"Cannot start: {error_text(e)}")
                    return
                job = get_worker().submit([new], session_id(), labels=[f"{method} on top of {summ.run_id}"])
                if switch:  # from the Runs page: watch it on the Memorize page
                    st.switch_page("app_pages/memorize.py", query_params={"job": job.id})
                st.query_params["job"] = job.id
                st.rerun()


def story_frames(story: Any, names: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A memcore.chain.ChainStory as charts.chain_chart's (history, events), passages and runs named by `names`
    (run id -> 'A: run 1a2b…')."""
    hist = pd.DataFrame([{"step": r["story_step"], "passage": names[r["passage"]], "frac_above": r["frac_above"],
                          "recalled": r["recalled"]} for r in story.rows])
    ev = [{"step": at, "label": f"{names[rid].split(':')[0]} starts"} for at, rid in story.starts[1:]]
    ev += [{"step": at, "label": f"{names[rid].split(':')[0]} {'lost' if kind == 'lost' else 'recalled again'}"}
           for at, rid, kind in story.events]
    return hist, pd.DataFrame(ev, columns=["step", "label"])


def render_story(store: Any, run_id: str, shown_step: int | None = None) -> dict[str, str] | None:
    """On the Runs page, a chained run's whole chain as one story: which run was trained on top of which, each
    passage's tokens above τ and verbatim recall over the steps of every run in it (one step axis), each run's
    start and every loss and win-back of recall marked, and the step the replay shows (`shown_step`, this run's).
    Returns the passages' names (run id -> name), or None when the run is not part of a chain."""
    from memcore.chain import chain_story

    try:
        story = chain_story(store, run_id)
    except MemcoreError as e:  # an earlier run deleted, say
        st.warning(f"The chain behind this run cannot be drawn: {e}")
        return None
    if len(story.runs) < 2:
        return None
    names = {rid: f"{chr(ord('A') + i)}: run {rid}" for i, rid in enumerate(story.runs)}
    st.markdown("**A chain of runs**, each trained on top of the one before: "
                + " → ".join(f"`{names[r]}`" for r in story.runs))
    hist, events = story_frames(story, names)
    start = story.starts[-1][0]
    chart = charts.chain_chart(hist, events, None if shown_step is None else start + shown_step,
                               title="The chain as one story: each passage over the steps of every run")
    show_chart(chart)
    return names


def render_earlier_at(store: Any, run_id: str, step: int, tau: float) -> None:
    """On the Runs page, a chained run's earlier passages as they stood at `step` of its replay: their tokens
    coloured by p against τ, with the count above τ and whether they were still recalled verbatim."""
    from memcore.chain import chain_pieces

    row = next((r for r in store.earlier_steps(run_id, with_tokens=True, after=step - 1) if r.step == step), None)
    if row is None:
        st.caption("The earlier passage has no per-token snapshot at this step.")
        return
    try:
        runs, per_run = chain_pieces(store, run_id)
    except MemcoreError:
        runs, per_run = [], []
    pieces, lengths = [piece for ps in per_run for piece in ps], [len(ps) for ps in per_run]
    name = earlier_name(runs)
    state = "still recalled verbatim" if row.earlier_recalled else "not recalled verbatim"
    st.markdown(f"{name[0].upper() + name[1:]} at step **{step}** · {row.earlier_above}/{row.earlier_tokens} tokens "
                f"above τ · {state}")
    if len(pieces) == len(row.earlier_p):
        render_passages(runs, lengths, pieces, row.earlier_p.astype("float32"), row.earlier_correct, tau)
