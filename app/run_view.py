"""How the Memorize page draws a job: its status and progress, each run's live view (the passage token by token,
the probability histogram, the stubborn tokens' trajectories), the curves of all its runs, and the results.

A view is built from a snapshot copied under the job's lock, once per step and session: the page's refreshes
between two steps only resend it, so a refresh costs the same at step 10 and at step 10,000.
"""

from __future__ import annotations

import time
from typing import Any

import chain_view
import charts
import numpy as np
import pandas as pd
import streamlit as st
from common import error_text, get_store, get_tokenizer, get_worker, show_chart

from memcore.config import MemcoreError
from memcore.export import export_zip
from memcore.metrics import per_sample
from memcore.pieces import token_pieces


def snapshot(live: Any) -> dict[str, Any]:
    """What the page draws of a run, copied under the job's lock (the dispatcher thread records concurrently).
    Costs the same at step 10 and step 10,000: the run keeps a bounded history and running stubborn counts."""
    snap = dict(label=live.label, spec=live.spec, pieces=live.pieces, summary=live.summary,
                recalled_at=live.recalled_at, run_id=live.run_id, steps=[], rows=[],
                sample_lengths=live.sample_lengths, prompt_ids=live.prompt_ids, target_ids=live.target_ids,
                chained=live.chained, earlier_runs=list(live.earlier_runs), earlier_pieces=live.earlier_pieces,
                earlier_lengths=list(live.earlier_lengths),
                earlier_p=None if live.earlier_p is None else live.earlier_p.astype(np.float32),
                earlier_correct=None if live.earlier_correct is None else live.earlier_correct.copy(),
                lost_at=live.retention.lost_at, regained_at=live.retention.regained_at)
    if not live.steps:
        return snap
    stubborn_ever = [t["index"] for t in live.stubborn.top(6)]  # longest at or below τ so far
    kept = charts.thin(len(live.steps))
    snap.update(steps=[live.steps[i] for i in kept], rows=[live.rows[i] for i in kept], step=live.steps[-1],
                last_row=live.rows[-1], p=live.p.astype(np.float32),
                p_prev=None if live.p_prev is None else live.p_prev.astype(np.float32),
                trajectories=live.p_history[kept][:, stubborn_ever].astype(np.float32), stubborn_ever=stubborn_ever,
                first_divergence=live.first_divergence,
                correct=None if live.correct is None else live.correct.copy())
    return snap


def _run_view(snap: dict[str, Any], key: str, tau: float) -> dict[str, Any]:
    """The token view's HTML and the run's two charts as Vega-Lite specs, built once per step and session:
    the refreshes between two steps only resend them."""
    cache = st.session_state.setdefault("run_views", {})
    for other in [k for k in cache if k.split("-")[0] != key.split("-")[0]]:  # keep only this job's views
        del cache[other]
    hit = cache.get(key)
    if hit is not None and hit["step"] == snap["step"]:
        return hit
    p, prev = snap["p"], snap["p_prev"]
    crossed = (prev <= tau) & (p > tau) if prev is not None and len(prev) == len(p) else None  # since the previous step
    idx = snap["stubborn_ever"]
    stubborn = [i for i in idx if p[i] <= tau]  # flagged in the text while still below
    entries = len(snap.get("sample_lengths") or []) >= 2 and snap.get("correct") is not None
    places = entry_places(snap["spec"].model.name, snap.get("run_id"), snap["prompt_ids"], snap["target_ids"],
                          snap["sample_lengths"], idx) if entries else None
    layout = charts.trajectories_args(snap["steps"], idx, [snap["pieces"][i] for i in idx], tau, idx, places=places)
    view = {"step": snap["step"],
            "html": entries_view(snap["spec"].model.name, snap.get("run_id"), snap["sample_lengths"],
                                 snap["prompt_ids"], snap["target_ids"], p, snap["correct"], tau) if entries else
            charts.token_html(snap["pieces"], p, tau, crossed=crossed, stubborn=stubborn,
                              first_divergence=snap["first_divergence"]),
            "entries": entries,
            "histogram": charts.live_spec("histogram", charts.histogram_args(tau), charts.histogram_frames(p, tau)),
            "trajectories": charts.live_spec("trajectories", layout, charts.trajectories_frames(
                snap["steps"], np.asarray(snap["trajectories"]), list(range(len(idx))), layout[1]))}
    cache[key] = view
    return view


def entry_texts(model: str, run_id: str | None, prompts: list[list[int]], targets: list[list[int]]
                ) -> tuple[list[str], list[str]]:
    """Each sample's prompt as a short name ("Name: Ann Lee\nPhone:" -> "Ann Lee: ") and its answer, decoded once
    per run and session."""
    cache = st.session_state.setdefault("entry_texts", {})
    hit = cache.get(run_id)
    if hit is not None and len(hit[0]) == len(prompts):
        return hit
    try:
        tok = get_tokenizer(model)
    except MemcoreError:  # the run's model cannot be loaded here (a hub model, offline): entries by number
        return [f"#{i + 1}: " for i in range(len(prompts))], ["" for _ in targets]
    labels, answers = [], []
    for pr, tg in zip(prompts, targets):
        text = " ".join(tok.decode(pr, skip_special_tokens=True).split())
        if text.startswith("Name:") and text.endswith("Phone:"):  # the PhoneBook's own prompt
            text = text[len("Name:"):-len("Phone:")].strip() + ":"
        labels.append(text[-28:] + " ")
        answers.append(tok.decode(tg, skip_special_tokens=True).strip())
    cache.clear()  # one run's texts at a time: a book of thousands is kept once
    cache[run_id] = (labels, answers)
    return labels, answers


def entry_place(index: int, lengths: list[int]) -> tuple[int, int]:
    """(entry, position in its answer), both 0-based, of flat target token `index` in a run of samples whose
    answers are `lengths` tokens long. Raises IndexError past the last token."""
    ends = np.cumsum(lengths)
    entry = int(np.searchsorted(ends, index, side="right"))
    if index < 0 or entry >= len(lengths):
        raise IndexError(f"token {index} is outside the {int(ends[-1]) if len(ends) else 0} target tokens")
    return entry, index - (int(ends[entry - 1]) if entry else 0)


def entry_name(labels: list[str], entry: int, limit: int = 40) -> str:
    """An entry as the page names it: its number (1-based) and its prompt's short name ("#3 Ann Lee"), the name
    cut to `limit` characters."""
    name = labels[entry].strip().rstrip(":").strip()
    name = name if len(name) <= limit else name[: limit - 1] + "…"
    return f"#{entry + 1} {name}" if name and not name.startswith("#") else f"#{entry + 1}"


def entry_places(model: str, run_id: str | None, prompts: list[list[int]], targets: list[list[int]],
                 lengths: list[int], indices: list[int]) -> list[str]:
    """Where each flat target token of `indices` sits in a run of samples, for a chart's legend: its entry and its
    position in that entry's answer ("#3 Ann Lee, tok 2"; the answer's tokens counted from 1, a leading space's
    own token included)."""
    labels, _ = entry_texts(model, run_id, prompts, targets)
    return [f"{entry_name(labels, e, 14)}, tok {o + 1}" for e, o in (entry_place(int(i), lengths) for i in indices)]


def first_wrong_entry(model: str, run_id: str | None, prompts: list[list[int]], targets: list[list[int]],
                      lengths: list[int], index: int, piece: str, tense: str = "was") -> str:
    """The caption naming the first entry greedy decoding gets wrong, from the flat index of the first wrong
    target token and that token's text `piece`."""
    labels, _ = entry_texts(model, run_id, prompts, targets)
    entry, offset = entry_place(index, lengths)
    return (f"The first entry greedy decoding {tense} getting wrong: **{entry_name(labels, entry)}**, at token "
            f"{offset + 1} of its {lengths[entry]}-token answer ({piece!r}); the rest of that answer would be "
            "generated from a wrong prefix.")


def entry_generations(labels: list[str], answers: list[str], generated: list[str], target_ids: list[list[int]],
                      generated_ids: list[list[int]]) -> pd.DataFrame:
    """One row per entry: its name, its answer, what greedy decoding generated from its prompt, whether that is
    the answer token for token (compared by id, as exact recall is) and, where not, the answer's first token it
    gets wrong (1-based); wrong entries first, then by number."""
    # where each first goes astray, as the answer's token number (a leading space's token counted); None: recalled
    first = [next((k + 1 for k, t in enumerate(tgt) if k >= len(g) or g[k] != t), None)
             for g, tgt in zip(generated_ids, target_ids)]
    table = pd.DataFrame({"entry": [entry_name(labels, i) for i in range(len(labels))], "answer": answers,
                          "generated": generated, "recalled": [k is None for k in first],
                          "wrong from token": ["" if k is None else str(k) for k in first]})  # blank, not None
    return table.assign(_n=range(len(table))).sort_values(["recalled", "_n"]).drop(columns="_n")


def entries_view(model: str, run_id: str | None, lengths: list[int], prompts: list[list[int]],
                 targets: list[list[int]], p: np.ndarray, correct: np.ndarray, tau: float) -> str:
    """Many samples as a grid of entries (charts.entries_html), each coloured by its worst token's p, with the
    count recalled above it. p, correct: [N] over every sample's target tokens."""
    worst, right = per_sample(p, correct, lengths)
    labels, answers = entry_texts(model, run_id, prompts, targets)
    head = (f'<div style="margin:0 0 4px 0"><b>{int(right.sum()):,}</b> of {len(right):,} entries recalled '
            f'(every token of the answer right) · {int((worst > tau).sum()):,} with every token above τ'
            '<br><span style="color:#666;font-size:0.9em">✓ marks a recalled entry and the colour is its worst '
            'token\'s p, so a ✓ on red is recalled with a token still below τ.</span></div>')
    return head + charts.entries_html(labels, answers, worst, right, tau)


def render_run(snap: dict[str, Any], key: str, tau: float, show_tokens: bool = True, narrow: bool = False,
               live: bool = True) -> None:
    """One run's headline, where greedy decoding goes astray, its tokens coloured around τ and its two charts
    (side by side, or one above the other when the run has only a column of the page: compare mode). `live`:
    the run is still training (its words say "currently")."""
    if not snap["steps"]:
        st.info(f"{snap['label']}: waiting for its first step (loading the model and measuring the base loss, or "
                "queued) ...")
        return
    p, row = snap["p"], snap["last_row"]
    above, right = int(round(row["frac_above"] * len(p))), int(round(row["frac_correct"] * len(p)))
    st.markdown(f"**{snap['label']}** · step {row['step']} · **{above}/{len(p)}** tokens above τ · "
                f"argmax right {right}/{len(p)} · ΔL {row['delta_loss']:.3f}")
    fd = snap["first_divergence"]
    if fd is None:
        st.success("Every teacher-forced argmax is right: greedy decoding recites the whole text.")
    elif len(snap.get("sample_lengths") or []) >= 2:  # entries: each is recited from its own prompt
        st.caption(first_wrong_entry(snap["spec"].model.name, snap.get("run_id"), snap["prompt_ids"],
                                     snap["target_ids"], snap["sample_lengths"], fd, snap["pieces"][fd].label,
                                     "is" if live else "was"))
    else:
        when = "currently goes" if live else "goes"
        st.caption(f"Greedy decoding {when} astray at token #{fd} ({snap['pieces'][fd].label!r}); everything after "
                   "it would be generated from a wrong prefix.")
    view = _run_view(snap, key, tau)
    if show_tokens:
        st.html(view["html"])
        st.html(charts.legend_html(tau))
    if snap.get("chained"):
        chain_view.render_earlier(snap, key, tau, show_tokens)
    if view.get("entries") and snap["rows"] and "entries_recalled" in snap["rows"][-1]:
        hist = pd.DataFrame(snap["rows"])[["step", "entries_recalled", "entries_above"]]
        show_chart(charts.entries_chart(hist, len(snap["sample_lengths"])))
    if narrow:  # half a page each: side by side, the legends would leave each plot a sliver
        show_chart(view["histogram"])
        show_chart(view["trajectories"])
    else:
        c1, c2 = st.columns(2)
        show_chart(view["histogram"], c1)
        show_chart(view["trajectories"], c2)


def _curves(job_id: str, snaps: list[dict[str, Any]], tau: float) -> dict[str, Any]:
    """The curves of every run of the job as one Vega-Lite spec, rebuilt only when a run has a new step."""
    key = (job_id, tuple(s.get("step") for s in snaps))
    hit = st.session_state.get("curves_view")
    if hit is not None and hit[0] == key:
        return hit[1]
    hist = pd.concat([pd.DataFrame(s["rows"]).assign(run=s["label"]) for s in snaps if s["rows"]], ignore_index=True)
    spec = charts.live_spec("curves", charts.curves_args(hist, tau), charts.curves_frames(hist))
    st.session_state["curves_view"] = (key, spec)
    return spec


def _status(job: Any) -> None:
    """The job's status line: its place in the queue, loading, or why it ended early."""
    if job.status == "queued":
        n = get_worker().position(job)
        st.info(f"Queued: {n} job{'s' if n != 1 else ''} ahead of yours. It starts by itself when the device is free.")
    elif job.status == "loading":
        st.info("Loading the model and measuring the base loss ...")
    elif job.status == "failed":
        st.error(f"The run failed: {job.error}")
    elif job.status == "interrupted":
        st.warning(f"This job was interrupted ({job.error or 'the app stopped while it trained'}). Its runs keep "
                   "their steps, and their adapter and checkpoint as of the last save: resume them or run them again "
                   "from the Runs page.")
        first = next((r.run_id for r in job.runs if r.run_id), None)
        st.page_link("app_pages/runs.py", label="Open it on the Runs page", icon=":material/history:",
                     query_params={"run": first} if first else None)


def render_progress(job: Any) -> None:
    """A job's status line, its progress with the time left, and Stop while it is active. Cheap: reads only each
    run's latest step row."""
    with job.lock:
        rows = [r.rows[-1] for r in job.runs if r.rows]
        labels = [r.label for r in job.runs if r.rows]
        notes = [(r.label, n) for r in job.runs for n in r.notes if not r.summary]  # a summary lists its own
    _status(job)
    for label, note in notes:
        st.warning(f"{label}: {note}" if len(job.runs) > 1 else note)
    if rows:
        # the job's progress counts every run's steps (compare mode trains two), its time left from their pace
        done, total = sum(r["step"] for r in rows), job.max_steps * len(job.runs)
        train_s = sum(r["elapsed"] for r in rows)
        wall = (job.finished or time.time()) - (job.started or job.created)
        eta = ""
        if job.is_live and job.stop_requested:
            eta = " · stopping after the current step"
        elif job.is_live and done >= total:
            eta = " · finishing: final measurement, greedy check and save"
        elif job.is_live and done:
            eta = f" · at most {train_s / done * (total - done):.0f} s left"
        if len(job.runs) > 1:  # compare mode: each run's own step
            steps = "steps " + ", ".join(f"{lab} {r['step']}" for lab, r in zip(labels, rows)) + f" of {job.max_steps}"
        else:
            steps = f"step {rows[0]['step']}/{job.max_steps}"
        # a job that finished before its budget (recalled, converged) is whole: the bar says done, the text how soon
        whole = job.status == "done"
        st.progress(1.0 if whole else min(1.0, done / total),
                    text=f"{steps} · {wall:.1f} s elapsed{eta} · {job.status}"
                    + (" (before the budget)" if whole and done < total else ""))
    if job.is_live:
        if st.button("Stop", key=f"stop-{job.id}",
                     help="Stops after the current step; the adapter and metrics so far are kept"):
            get_worker().stop(job)
            st.toast("Stopping after the current step ...")


def render_runs(job: Any) -> list[dict[str, Any]]:
    """Every run's live view side by side and the curves of all of them; returns the snapshots drawn."""
    with job.lock:
        snaps = [snapshot(r) for r in job.runs]
    tau_job = job.specs[0].train.tau
    curves = _curves(job.id, snaps, tau_job) if any(s["rows"] for s in snaps) else None
    if len(snaps) == 1:
        render_run(snaps[0], f"{job.id}-0", tau_job, live=job.is_live)
    else:
        cols = st.columns(len(snaps))
        for i, (c, s) in enumerate(zip(cols, snaps)):
            with c:
                render_run(s, f"{job.id}-{i}", tau_job, narrow=True, live=job.is_live)
    if curves is not None:
        show_chart(curves)
    return snaps


def render_job(job: Any) -> None:
    """A job as it stands: status, progress, every run's view and the curves, and once it has ended, the
    results (the live page draws the first two parts in fragments of their own, see memorize.py)."""
    render_progress(job)
    snaps = render_runs(job)
    if not job.is_live:
        render_results(job, snaps)


def _flat(ids: list[Any]) -> list[int]:
    """Token ids of one sample, or of several (a PhoneBook: one list per entry) laid end to end."""
    return [t for g in ids for t in g] if ids and isinstance(ids[0], list) else ids


def race_verdict(at_step: list[tuple[int | None, str]]) -> tuple[str, str | None]:
    """Compare mode's verdict on runs of one text and one seed: (the headline, a caveat or None). `at_step` holds
    each run's (step of exact recall or None, label). The headline names the run that reached exact recall first
    and by how many steps (and % of the slower's steps); the caveat says that one seed is one draw, since the seed
    alone moves the step of exact recall on the default model and memft-ot ties sft over five seeds (the MemFT
    bench, README "What memcore finds on the default model")."""
    done = sorted((at, who) for at, who in at_step if at is not None)
    if not done:
        return "Neither run reached exact recall within the budget.", None
    step = done[0][0]
    first = [who for at, who in at_step if at == step]  # in the runs' order
    others = ", ".join(f"{who}: {'step ' + str(at) if at is not None else 'not recalled'}" for at, who in at_step)
    caveat = ("One seed each, so this is one draw: the seed alone moves the step of exact recall, and over five "
              "seeds on the default model memft-ot and sft reach it at the same step within the interval (README, What "
              "memcore finds on the default model). Run other seeds (the Seed box) before reading a difference between "
              "the methods into this.")
    if len(first) > 1:
        return f"**{' and '.join(first)}** reached exact recall at the same step, {step} ({others}).", caveat
    later = [at for at, who in done if at != step]
    if later:
        gap = later[0] - step
        ahead = (f"{gap:,} step{'s' if gap != 1 else ''} ({100 * gap / later[0]:.0f}%) ahead of the "
                 f"{'other' if len(at_step) == 2 else 'next'}")
    else:
        ahead = "the only one to get there within the budget"
    return f"**{first[0]}** reached exact recall first, at step {step}, {ahead} ({others}).", caveat


def render_results(job: Any, snaps: list[dict[str, Any]]) -> None:
    """Which run reached exact recall first (compare mode), then per run: its metrics, the greedy generation
    against the target, its notes, the adapter as a zip and a box to prompt the memorized model."""
    st.divider()
    st.subheader("Result")
    if len(snaps) > 1:
        verdict, caveat = race_verdict([(s["recalled_at"] if s["summary"] and s["summary"].recalled else None,
                                         s["label"]) for s in snaps])
        (st.success if verdict.startswith("**") else st.warning)(verdict)
        if caveat:
            st.caption(caveat)
    cols = st.columns(len(snaps))
    for c, s in zip(cols, snaps):
        with c:
            summ = s["summary"]
            if not summ:
                st.caption(f"{s['label']}: no summary ({job.status}).")
                continue
            st.markdown(f"**{s['label']}** · run `{summ.run_id}` · {summ.ending}")
            m1, m2, m3 = st.columns(3)
            m1.metric("Recalled verbatim", "yes" if summ.recalled else "no")
            m2.metric("Steps", summ.steps)
            m3.metric("ΔL (nats/token)", f"{summ.delta_loss:.3f}")
            m1.metric("P_eff", f"{summ.p_eff:,}")
            m2.metric("Bits stored", f"{summ.bits_stored:.0f}")
            m3.metric("Bits / parameter", f"{summ.bits_per_param:.2e}")
            if summ.earlier_tokens:
                chain_view.render_earlier_result(summ)
            gen = summ.generated_ids
            try:
                tok = get_tokenizer(s["spec"].model.name) if gen is not None else None
            except MemcoreError as e:  # a hub model not reachable from here: the rest of the run still shows
                tok = None
                st.caption(f"Greedy generation not shown: {e}")
            if tok is not None and len(s.get("sample_lengths") or []) >= 2 and len(gen) == len(s["sample_lengths"]):
                labels, answers = entry_texts(s["spec"].model.name, summ.run_id, s["prompt_ids"], s["target_ids"])
                st.caption("Greedy generation from each entry's prompt against its answer, the wrong ones first.")
                st.dataframe(entry_generations(labels, answers, [tok.decode(g, skip_special_tokens=True).strip()
                                                                     for g in gen], summ.target_ids, gen),
                             hide_index=True)
            elif tok is not None:
                flat_gen, flat_tgt = _flat(gen), _flat(summ.target_ids)
                st.caption("Greedy generation from the prompt, compared with the target: blue tokens match it, red "
                           "ones differ (the first difference outlined); hover a token for the target's.")
                st.html(charts.generation_diff_html(flat_tgt, flat_gen, s["pieces"], token_pieces(tok, flat_gen)))
            for note in summ.notes:
                st.warning(note)
            kind = "memcore bypass: bypass_config.json + safetensors" if summ.adapter == "bypass" else "PEFT"
            st.download_button(f"Download adapter ({kind}, zip)", data=adapter_zip(summ.run_id),
                               file_name=f"memcore-{summ.run_id}.zip", mime="application/zip",
                               key=f"dl-{summ.run_id}")
            with st.form(f"gen-{summ.run_id}"):
                q = st.text_input("Prompt the memorized model", value="",
                                  placeholder="leave empty to use the run's own prompt")
                if st.form_submit_button("Generate"):
                    try:
                        with st.spinner("generating ..."):
                            out = get_worker().generate(summ.run_id, q or None)
                        if not q and len(out["text"]) > 1:  # a PhoneBook: every entry from its own prompt
                            labels, answers = entry_texts(s["spec"].model.name, summ.run_id, s["prompt_ids"],
                                                          s["target_ids"])
                            st.caption(f"From each of the {len(out['text']):,} entries' own prompts:")
                            st.dataframe(entry_generations(labels, answers, [t.strip() for t in out["text"]],
                                                           summ.target_ids, out["generated"]), hide_index=True)
                        else:
                            own = "(the run's own prompt)"
                            st.text(f"{q or own} ⟶ {out['text'][0]}")
                    except Exception as e:
                        st.error(error_text(e))
            if (summ.status or "completed") in ("completed", "stopped") and len(snaps) == 1:
                chain_view.render_more(summ, s["spec"])


@st.cache_data(show_spinner=False, max_entries=8)
def adapter_zip(run_id: str) -> bytes:
    """The run's exported adapter (memcore.export: adapter, model card, summary, steps) as a zip, under adapter/."""
    return export_zip(get_store(), run_id)
