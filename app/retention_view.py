"""The law page's section on memory that keeps changing: a first passage's retention after a second one goes into
the same adapter (memcore sweep --chain), per strategy, against capacity: (ℓ_A + ℓ_B) over the verbatim-recall
frontier ℓ*(r) of the shipped capacity sweep. Reads the shipped chain sweep (sample_data/chains) or one in the
store."""

from __future__ import annotations

import json
from pathlib import Path

import charts
import pandas as pd
import streamlit as st
from common import show_chart

from memcore.chain import is_chain_label
from memcore.chain_sweep import chain_table, retention_against_capacity
from memcore.config import MemcoreError
from memcore.frontier import frontier_from_table
from memcore.law import read_law_csv

ROOT = Path(__file__).resolve().parent.parent / "sample_data"
SHIPPED_CHAINS = ROOT / "chains" / "chains_bypass_random.csv"
CAPACITY = ROOT / "sweeps" / "capacity_bypass_random.csv"
COMMAND = ("memcore sweep --chain --adapter bypass --dropout 0.1 --lr 3e-2 --max-steps 300 --until converged "
           "--plateau-on recall --ranks 1 2 --first-lengths 16 --lengths 8 16 32 64 --seeds 0 1 2 --out chains.csv")


@st.cache_data(show_spinner=False)
def _frontier_slope() -> tuple[float, str]:
    """(ℓ*(r) per unit rank as the shipped capacity sweep's fit gives it at rank 1, what it is), sft's frontier."""
    fit = frontier_from_table(read_law_csv(CAPACITY), "sft")[1]
    if fit is None:
        raise MemcoreError("the shipped capacity sweep has no fitted frontier")
    return float(fit.ell_star(1.0)), f"sft's fitted frontier on {CAPACITY.name}"


def _stored_chain_sweeps(store) -> list[str]:
    """Ids of the chain sweeps in the store (runs labelled with a passage), newest last."""
    out = []
    for r in store.runs():
        if r["sweep"] and r["sweep"] not in out and is_chain_label(r["label"]):
            out.append(r["sweep"])
    return out


def render(store) -> None:
    """The section: source choice, the retention charts against capacity and the table behind them."""
    st.subheader("Memory that keeps changing: a second passage on top of the first")
    st.caption("A first passage A of ℓ_A random tokens is memorized; then a second, B, of ℓ_B goes into the same "
               "adapter, with A only measured (none), or rehearsed under sft or memft-ot (keep). Capacity bounds what "
               "rehearsal can keep: both passages fit while (ℓ_A + ℓ_B)/ℓ*(r) < 1. Without rehearsal nothing "
               "protects A, however much room is left: B's gradient overwrites it.")
    sources = {}
    if SHIPPED_CHAINS.is_file():
        sources[f"shipped: {SHIPPED_CHAINS.stem}"] = None
    for sid in _stored_chain_sweeps(store):
        sources[f"your chain sweep: {sid}"] = sid
    if not sources:
        st.info(f"No chain sweep yet. Run one (on this CPU about an hour), then reload: `{COMMAND}`")
        return
    pick = st.selectbox("Chain sweep", list(sources), key="chain_source")
    if sources[pick] is None:
        table = pd.read_csv(SHIPPED_CHAINS)
        side = SHIPPED_CHAINS.with_suffix(".json")
        if side.is_file():
            about = json.loads(side.read_text())
            st.caption(f"Made with `{about.get('command', COMMAND)}` ({about.get('wall', '?')} on "
                       f"{about.get('machine', 'this CPU')}); the frontier ℓ*(r) from the shipped capacity "
                       "sweep at the same settings.")
    else:
        table = pd.DataFrame(chain_table(store, sources[pick]))
        st.caption("Your chain sweep; the frontier ℓ*(r) is the shipped capacity sweep's (default model, the paper's "
                   "bypass, random tokens, lr 3e-2): on other settings read the fill as a rough guide.")
    if table.empty:
        st.info("This chain sweep has no finished chains yet.")
        return
    try:
        slope, what = _frontier_slope()
        cells = retention_against_capacity(table, lambda r: slope * r)
    except MemcoreError as e:
        st.warning(str(e))
        return
    st.caption(f"ℓ*(r) = {slope:.1f}·r tokens ({what}). Each point: the mean over the seeds whose first passage was "
               "recalled when its own run ended; bars span the seeds' least and most.")
    c1, c2 = st.columns(2)
    show_chart(charts.retention_chart(cells, "kept"), c1)
    show_chart(charts.retention_chart(cells, "recalled"), c2)
    left = len(table) - int(table["first_recalled"].astype(bool).sum())
    if left:
        st.caption(f"{left} chain(s) left out: their first passage was not recalled when its own run ended.")
    shown = cells.rename(columns={"first_length": "ℓ_A", "second_length": "ℓ_B", "fill": "(ℓ_A+ℓ_B)/ℓ*",
                                  "kept": "A above τ", "recalled": "A recalled", "second_steps": "steps of B",
                                  "second_recalled": "B recalled", "rehearsal": "rehearsal share"})
    st.dataframe(shown.drop(columns=["kept_lo", "kept_hi"]), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("(ℓ_A+ℓ_B)/ℓ*", "A above τ", "A recalled", "B recalled",
                                          "rehearsal share")} | {"steps of B": st.column_config.NumberColumn(
                                              format="%.0f")})
