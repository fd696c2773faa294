"""The Memory law page's "Find the frontier for this model": a frontier search (memcore.search) as a queued job,
its progress while it trains (probes done, each rank's bracket), Stop, and its result drawn beside the shipped
capacity sweep's frontier."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import charts
import pandas as pd
import streamlit as st
from common import bounded_number, default_model_name, error_text, get_worker, session_id, show_chart
from inputs import parse_lr

from memcore.config import METHODS, MemcoreError, RunSpec
from memcore.data import list_samples, read_sample
from memcore.law import read_law_csv
from memcore.search import brackets_of, budget_notes
from memcore.service import search_from_label, search_label
from memcore.specs import run_spec
from memcore.sweep import sweep_table

SHIPPED_CAPACITY = (Path(__file__).resolve().parent.parent / "sample_data" / "sweeps"
                    / "capacity_bypass_random.csv")
RANK_CHOICES = (1, 2, 4, 8, 16, 32, 64)
RESOLUTIONS = {"2%": 0.02, "5%": 0.05, "10%": 0.1, "20%": 0.2}


def _template(model: str, adapter: str, source: str, tokens: int, sample: str, text: str, method: str,
              max_steps: int, lr: float) -> RunSpec:
    """The search's template: the settings every probe shares. Raises MemcoreError naming a bad value."""
    data: dict[str, Any] = ({"random_tokens": int(tokens)} if source == "random tokens" else
                            {"text": read_sample(sample)} if source == "a sample passage" else {"text": text})
    if source == "my text" and not text.strip():
        raise MemcoreError("paste the text to search on, or choose random tokens or a sample passage")
    return run_spec(data | {"model": model.strip() or "default", "adapter": adapter, "layers": "paper",
                            "dropout": 0.1, "method": method, "lr": lr,
                            "max_steps": int(max_steps), "until": "converged", "stop_when_recalled": True,
                            "history": "decimated"})


def _form() -> None:
    c1, c2, c3 = st.columns(3)
    model = c1.text_input("Model", value=default_model_name(), key="fs_model",
                          help="'default', a hub id or a local folder: the model whose frontier is searched")
    adapter = c2.radio("Adapter", ("bypass", "lora"), horizontal=True, key="fs_adapter",
                       help="bypass: the paper's rank-r bypass around one block's MLP; lora: LoRA on that block's "
                       "linear layers. Both on the paper's layer (two thirds of the way up)")
    method = c3.selectbox("Method", METHODS, key="fs_method")
    ranks = st.multiselect("Ranks", RANK_CHOICES, default=[1, 2, 4], key="fs_ranks")
    c1, c2, c3 = st.columns(3)
    source = c1.radio("Data", ("random tokens", "a sample passage", "my text"), key="fs_source",
                      help="what the probes memorize: its first ℓ tokens at each probe")
    tokens = sample = text = None
    out_of_range: list[str] = []  # number boxes outside their bounds (bounded_number), refused at the button
    if source == "random tokens":
        tokens = bounded_number(c2, "Random tokens (the longest length probed)", 8, 8192, out_of_range, value=192,
                                key="fs_tokens", help="each seed draws its own uniformly random ordinary tokens")
    elif source == "a sample passage":
        names = list_samples()
        sample = c2.selectbox("Sample", names, index=names.index("long_archive") if "long_archive" in names else 0,
                              key="fs_sample")
    else:
        text = c2.text_area("Text", key="fs_text", height=100)
    seeds = int(bounded_number(c3, "Seeds", 1, 8, out_of_range, value=2, key="fs_seeds",
                               help="probes per length; a length counts as recalled by at least half of them"))
    c1, c2, c3 = st.columns(3)
    max_steps = int(bounded_number(c1, "Step budget per probe", 10, 5000, out_of_range, value=300,
                                   key="fs_steps",
                                   help="each probe trains until recalled, converged on a plateau, or this"))
    lr_text = c2.text_input("Learning rate", "3e-2", key="fs_lr")
    res = c3.selectbox("Resolution", list(RESOLUTIONS), index=1, key="fs_res",
                       help="each rank's search stops once its bracket is this narrow (shortest failed / longest "
                       "recalled)")
    if st.button("Find the frontier", type="primary", key="fs_start"):
        lr, why = parse_lr(lr_text)
        try:
            if why:
                raise MemcoreError(why)
            if out_of_range:
                raise MemcoreError("; ".join(out_of_range))
            if not ranks:
                raise MemcoreError("choose at least one rank")
            template = _template(model, adapter, source, tokens or 0, sample or "", text or "", method, max_steps, lr)
            label = search_label(sorted(ranks), seeds, method, RESOLUTIONS[res])
            search_from_label(template, label)  # refuses bad settings here, before queueing
        except MemcoreError as e:
            st.error(error_text(e))
            return
        job = get_worker().submit([template], session_id(), labels=[label], kind="frontier")
        st.query_params["search_job"] = job.id
        st.rerun()


def _shipped_brackets(method: str) -> list[dict[str, Any]]:
    df = read_law_csv(SHIPPED_CAPACITY)
    if method not in set(df["method"]):
        return []
    return [b | {"source": f"shipped sweep ({method}, bypass on the default model, 8 lengths)"}
            for b in brackets_of(df, method)]


def _table(brackets: list[dict[str, Any]], seeds: int = 0) -> pd.DataFrame:
    """A row per rank: the bracket, the length in training, the recall rate at each end (and over how many of the
    `seeds` where fewer so far: the search trains an end's other seeds when its bracket closes)."""
    def rate(n, r, k):
        return f"{n}: {r:.0%}" + (f" ({k} of {seeds} seeds so far)" if k is not None and 0 < k < seeds else "")

    rows = []
    for b in brackets:
        lo, hi = b.get("lo"), b.get("hi")
        where = (f"{lo} – {hi}" if lo is not None and hi is not None else f"≥ {lo}" if lo is not None
                 else f"< {hi}" if hi is not None else "not yet known")
        if b.get("probing"):
            where += f" (probing {b['probing']})"
        rates = "; ".join(rate(n, r, k) for n, r, k in ((lo, b.get("lo_rate"), b.get("lo_seeds")),
                                                           (hi, b.get("hi_rate"), b.get("hi_seeds")))
                          if n is not None and r is not None)
        rows.append({"rank": b["rank"], "ℓ* between (tokens)": where, "recall rate at the ends": rates or "—",
                     "lengths probed": b.get("probes", b.get("lengths")), "steps": str(b.get("steps", ""))})
    return pd.DataFrame(rows)


def _progress(job_id: str) -> None:
    job = get_worker().find(job_id)
    if job is None:
        st.warning(f"No frontier search job {job_id} in this memcore home.")
        return
    template, label = job.specs[0], job.labels[0]
    search = search_from_label(template, label)
    p = job.search
    if job.status == "queued":
        n = get_worker().position(job)
        st.info(f"Queued: {n} job{'s' if n != 1 else ''} ahead. It starts by itself when the device is free.")
    elif job.status == "loading":
        st.info("Loading the model and laying out the first probes ...")
    elif job.status == "failed":
        st.error(f"The search failed: {job.error}")
    elif job.status == "interrupted":
        st.warning(f"The search was interrupted ({job.error or 'the app stopped'}); start it again with the same "
                   "settings to go on: finished probes are reused.")
    if p is not None and job.is_live:
        wall = time.time() - (job.started or job.created)
        fewest, most = p.get("probes_left") or (p["in_flight"], p["in_flight"])
        st.progress(1.0 if p["finished"] else min(0.95, p["probes_done"] / max(1, p["probes_done"] + fewest)),
                    text=f"{p['probes_done']} probe{'s' if p['probes_done'] != 1 else ''} done · "
                    f"{p['in_flight']} training · {fewest if fewest == most else f'{fewest}-{most}'} to go · "
                    f"{p['steps']:,} steps · "
                    f"{wall:.0f} s elapsed" + (" · stopping after the current step" if job.stop_requested else ""))
        st.dataframe(_table(p["brackets"], p.get("seeds", 0)), hide_index=True, width="stretch")
    if job.is_live:
        if st.button("Stop", key=f"fs-stop-{job.id}",
                     help="Stops after the current step; finished probes are kept and reused by the same search"):
            get_worker().stop(job)
            st.toast("Stopping after the current step ...")
        return
    rows = sweep_table(get_worker().store, search.id)
    if not rows:
        st.info("Stopped before any probe finished." if job.status != "done" else "The search trained nothing.")
    elif job.status == "stopped":
        st.warning("Stopped: the brackets below are where the search had got to; continue it to narrow them.")
    if job.status in ("stopped", "interrupted", "failed") and st.button(
            "Continue this search", key=f"fs-again-{job.id}",
            help="Queue the same search again: finished probes are reused, cut-off ones go on from their checkpoints"):
        again = get_worker().submit([template], session_id(), labels=[label], kind="frontier")
        st.query_params["search_job"] = again.id
        st.rerun()
    if not rows:
        return
    df = pd.DataFrame(rows)
    method = search.methods[0]
    steps = df[df["method"] == method].groupby("rank")["steps"].sum()
    mine = [b | {"steps": f"{int(steps.get(b['rank'], 0)):,}"} for b in brackets_of(df, method)]
    st.markdown(f"**Frontier of {template.model.name}** ({template.adapter.kind}, {method}, "
                f"{len(search.seeds)} seed{'s' if len(search.seeds) != 1 else ''}): {len(rows)} probes, "
                f"{int(df['steps'].sum()):,} steps. Its probes are the sweep **{search.id}**, selectable below "
                "under Sweep data, where the fit and the frontier read them like any sweep.")
    st.dataframe(_table(mine), hide_index=True, width="stretch")
    for note in budget_notes([r for r in rows if r["method"] == method]):
        st.warning(note.replace("--max-steps", "the step budget"))
    shown = [b | {"source": f"this search ({search.id})"} for b in mine] + _shipped_brackets(method)
    show_chart(charts.frontier_brackets_chart(pd.DataFrame(shown)))
    st.caption("Each bar runs from the longest target recalled verbatim to the shortest not recalled (recall rate "
               "over seeds crossing 1/2), the point at ℓ* between them. The shipped sweep is a grid: its bars span "
               "two of its lengths.")
    if st.button("Show this search below", key=f"fs-show-{job.id}"):
        st.session_state["law_source"] = f"your sweep: {search.id}"
        st.rerun()


@st.fragment(run_every=1.0)
def _live(job_id: str) -> None:
    job = get_worker().find(job_id)
    _progress(job_id)
    if job is not None and not job.is_live and st.session_state.get("fs_was_live") == job_id:
        st.session_state["fs_was_live"] = None
        st.rerun()  # finished: a full rerun lists the new sweep under Sweep data
    if job is not None and job.is_live:
        st.session_state["fs_was_live"] = job_id


def render() -> None:
    """The section: the form, or the search this page follows (?search_job=...) with its progress and result."""
    job_id = st.query_params.get("search_job")
    job = get_worker().find(job_id) if job_id else None
    with st.expander("Find the frontier for this model", expanded=job is not None):
        st.caption("For each rank, the longest target the model recalls verbatim, found by bisection in length: "
                   "each probe trains until recalled, converged on a plateau or the step budget, probes of every "
                   "rank and seed train together, and each rank stops once its bracket is narrow enough. About a "
                   "sixth of the steps a grid at the same resolution takes, but a probe that fails trains its whole "
                   "budget: on a 2-core CPU, ranks 1, 2 and 4 with two seeds took about 2 h at 300 steps (the "
                   "README's numbers). A short budget places the frontier where that budget runs out, which may be "
                   "short of capacity; the benchmark below trains up to 2,000 steps.")
        if job is None:
            _form()
            return
        if job.is_live:
            _live(job.id)
        else:
            _progress(job.id)
        if st.button("New search", key="fs_new"):
            del st.query_params["search_job"]
            st.rerun()
