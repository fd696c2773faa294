"""Runs: every run in the store; filter, export as CSV, replay one step by step, delete with confirmation."""

import chain_view
import charts
import numpy as np
import pandas as pd
import streamlit as st
from common import error_text, get_store, get_worker, session_id, show_chart
from run_view import entries_view, entry_places, first_wrong_entry

from memcore.config import RunSpec
from memcore.metrics import per_sample, stubborn_tokens
from memcore.runner import RESUMABLE, resumable_step

job_id = st.query_params.get("job")
if job_id and get_worker().find(job_id) is not None:  # a job's URL as a page switch may leave it: watch the job
    st.switch_page("app_pages/memorize.py", query_params={"job": job_id})
st.title("Runs")
store = get_store()
store.mark_interrupted()
runs = store.runs()
if not runs:
    st.info("No runs yet. Start one on the Memorize page (or with `memcore train`).")
    st.stop()


def _table(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in runs:
        s, train = r["summary"], r["spec"].get("train", {})
        after = train.get("after")
        rows.append({"run": r["id"], "status": r["status"], "model": r["model"],
                     "adapter": r["spec"].get("adapter", {}).get("kind", "lora"), "method": r["method"],
                     # blank rather than "None" for a run that is not on top of another
                     "after": after or "", "rehearsed": ("yes" if train.get("keep") else "no") if after else "",
                     "rank": r["rank"],
                     "tau": train.get("tau"), "tokens": r["length"], "steps": r["steps"],
                     "recalled": s.recalled if s else None, "ΔL": s.delta_loss if s else None,
                     "bits/param": s.bits_per_param if s else None, "s/step": s.seconds_per_step if s else None,
                     "label": r["label"], "sweep": r["sweep"],
                     # to the second: the export's timestamps read as times, not as nanosecond counts
                     "created": pd.to_datetime(round(r["created"]), unit="s"), "error": r["error"]})
    return pd.DataFrame(rows)


df = _table(runs)
c1, c2, c3 = st.columns(3)
methods = c1.multiselect("Method", sorted(df["method"].dropna().unique()), key="f_method")
models = c2.multiselect("Model", sorted(df["model"].dropna().unique()), key="f_model")
statuses = c3.multiselect("Status", sorted(df["status"].unique()), key="f_status")
view = df
if methods:
    view = view[view["method"].isin(methods)]
if models:
    view = view[view["model"].isin(models)]
if statuses:
    view = view[view["status"].isin(statuses)]
view = view.sort_values("created", ascending=False)
st.dataframe(view, hide_index=True, width="stretch", placeholder="—",  # a queued run has no tokens or ΔL yet
             column_config={"ΔL": st.column_config.NumberColumn(format="%.3f"),
                            "bits/param": st.column_config.NumberColumn(format="%.2e"),
                            "s/step": st.column_config.NumberColumn(format="%.2f")})
st.download_button("Export table as CSV", view.to_csv(index=False).encode(), file_name="memcore-runs.csv",
                   mime="text/csv")

st.divider()
ids = list(view["run"])
if not ids:
    st.stop()
wanted = st.query_params.get("run")  # links from the Memorize page open a given run
if wanted in ids and "picked" not in st.session_state:
    st.session_state["picked"] = wanted
elif st.session_state.get("picked") not in ids:  # the newest run with steps to replay, not one still queued
    started = view.loc[view["status"] != "queued", "run"]
    st.session_state["picked"] = started.iloc[0] if len(started) else ids[0]
picked = st.selectbox("Open a run", ids, key="picked",
                      format_func=lambda i: f"{i} · {df.set_index('run').loc[i, 'method']} · "
                                            f"{df.set_index('run').loc[i, 'status']}")
run = store.run(picked)
spec = run["spec"]
st.markdown(f"**{picked}** · {run['status']} · model `{run['model']}` · "
            f"{run['spec'].get('adapter', {}).get('kind', 'lora')} · {run['method']} · rank {run['rank']} · "
            f"τ {spec['train']['tau']} · lr {spec['train']['lr']:g}")
if run["error"]:
    st.error(run["error"])
later = [r["id"] for r in runs if r["spec"].get("train", {}).get("after") == picked]
if later:
    st.caption("Trained on top of this run: " + ", ".join(f"`{r}`" for r in later) + " (open one to replay the chain).")
if run["status"] in RESUMABLE:
    step = resumable_step(store, picked)
    c1, c2, _ = st.columns([1, 1, 3])
    again = RunSpec.from_dict(spec)
    resume_label = f"Resume from step {step}" if step is not None else "Resume (no checkpoint: from step 0)"
    if c1.button(resume_label, key=f"resume-{picked}", type="primary",
                 help="Continue this run from its last checkpoint (saved every few minutes and when it stops), "
                      "its history going on from there"):
        job = get_worker().submit([again], session_id(), labels=[run["method"]], kind="resume", run_ids=[picked])
        st.switch_page("app_pages/memorize.py", query_params={"job": job.id})
    if c2.button("Run again", key=f"again-{picked}", help="A new run with the same settings and text, from step 0"):
        job = get_worker().submit([again], session_id(), labels=[run["method"]])
        st.switch_page("app_pages/memorize.py", query_params={"job": job.id})

if run["status"] in ("completed", "stopped") and run["summary"] is not None:
    chain_view.render_more(run["summary"], RunSpec.from_dict(spec), switch=True)

try:
    replay = store.replay(picked)
except Exception as e:
    replay = None
    st.warning(f"No token history to replay: {error_text(e)}")

if replay is not None and len(replay.steps):
    tau = float(spec["train"]["tau"])
    decimated = len(replay.steps) < replay.steps[-1] + 1
    if decimated:
        st.caption(f"This run kept a decimated token history: {len(replay.steps)} snapshots of its "
                   f"{replay.steps[-1]:,} steps, denser early (sweeps keep about 300 unless run with --full-history); "
                   "the slider offers the steps kept. The charts of loss and tokens above τ have every step.")
        chosen = st.select_slider("Step", options=replay.steps, value=replay.steps[-1], key=f"step-{picked}")
        i = replay.steps.index(chosen)
    else:
        i = st.slider("Step", min_value=0, max_value=len(replay.steps) - 1, value=len(replay.steps) - 1,
                      key=f"step-{picked}", format="%d") if len(replay.steps) > 1 else 0
    p = replay.p[i]
    correct = replay.correct[i]
    wrong = np.flatnonzero(~correct)
    fd = int(wrong[0]) if len(wrong) else None
    crossed = (replay.p[i - 1] <= tau) & (p > tau) if i > 0 else None
    stubborn_ever = [s["index"] for s in stubborn_tokens(replay.p[: i + 1], tau, k=6)]
    stubborn = [k for k in stubborn_ever if p[k] <= tau]
    rows = store.steps(picked)
    stored = next((row for row in rows if row.step == replay.steps[i]), None)
    # the trainer's own count: the replayed p is float16, where 0.5002 reads as 0.5 and no longer counts above τ
    n_above = stored.n_above if stored is not None else int((p > tau).sum())
    tokens = store.tokens(picked)
    lengths = tokens["sample_lengths"] or [len(t) for t in tokens["target_ids"]]
    many = len(lengths) >= 2  # a PhoneBook: a grid of entries instead of one strip
    st.markdown(f"step **{replay.steps[i]}** · {n_above}/{len(p)} tokens above τ · "
                f"argmax right {int(correct.sum())}/{len(p)}"
                + (" · recalled verbatim" if fd is None else "" if many else
                   f" · greedy decoding diverges at token #{fd}"))
    if many and fd is not None:  # named by entry, as in the live view
        st.caption(first_wrong_entry(spec["model"]["name"], picked, tokens["prompt_ids"], tokens["target_ids"],
                                     lengths, fd, replay.pieces[fd].label))
    if many:
        st.html(entries_view(spec["model"]["name"], picked, lengths, tokens["prompt_ids"], tokens["target_ids"], p,
                             correct, tau))
    else:
        st.html(charts.token_html(replay.pieces, p, tau, crossed=crossed, stubborn=stubborn, first_divergence=fd))
    st.html(charts.legend_html(tau))
    if spec["train"].get("after"):  # trained on top of another run: the earlier passage then, and the chain's story
        chain_view.render_earlier_at(store, picked, replay.steps[i], tau)
        chain_view.render_story(store, picked, replay.steps[i])
    if many:
        counts = [per_sample(replay.p[k], replay.correct[k], lengths) for k in range(len(replay.steps))]
        show_chart(charts.entries_chart(pd.DataFrame({"step": replay.steps,
                                                      "entries_recalled": [int(r.sum()) for _, r in counts],
                                                      "entries_above": [int((w > tau).sum()) for w, _ in counts]}),
                                        len(lengths), mark_step=replay.steps[i]))
    c1, c2 = st.columns(2)
    show_chart(charts.histogram_chart(p, tau), c1)
    shown = charts.thin(i + 1)
    show_chart(charts.trajectories_chart([replay.steps[k] for k in shown], replay.p[shown], stubborn_ever,
                                         [replay.pieces[k] for k in stubborn_ever], tau,
                                         places=entry_places(spec["model"]["name"], picked, tokens["prompt_ids"],
                                                             tokens["target_ids"], lengths, stubborn_ever)
                                         if many else None), c2)
    hist = pd.DataFrame([row.scalar_dict() for row in rows])
    if not hist.empty:
        hist = hist.iloc[charts.thin(len(hist))]
        hist = hist.assign(frac_above=hist.n_above / hist.n_tokens, frac_correct=hist.n_correct / hist.n_tokens,
                           run=run["method"])
        show_chart(charts.curves_chart(hist, tau, mark_step=replay.steps[i]))

with st.expander("Delete this run"):
    sure = st.checkbox(f"Yes, delete run {picked} and its adapter for good", key=f"sure-{picked}")
    if st.button("Delete", disabled=not sure, key=f"del-{picked}"):
        if run["status"] in ("running", "queued"):
            st.error("This run is still training; stop it first.")
        else:
            store.delete_run(picked)
            st.toast(f"Deleted run {picked}")
            st.rerun()
