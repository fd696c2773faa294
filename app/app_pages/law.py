"""Memory law: the fitted surface ΔL = C·r^α·ℓ^(−β) + b over rank and length, with runs overlaid."""

import json
import math
from pathlib import Path

import charts
import numpy as np
import pandas as pd
import streamlit as st
from common import error_text, get_store, get_worker, show_chart

from memcore.config import MemcoreError
from memcore.law import compare_forms, read_law_csv, smallest_rank
from memcore.sweep import sweep_table

SHIPPED = Path(__file__).resolve().parent.parent.parent / "sample_data" / "sweeps"

st.title("Memory law")
st.caption("ΔL = C · r^α · ℓ^(−β) + b: the loss reduction after a fixed training budget, as a function of LoRA rank r "
           "and the number of memorized tokens ℓ. Fitted by bounded least squares (scipy) from a variable-projection grid start, with 95% intervals.")

store = get_store()
sources: dict[str, pd.DataFrame] = {}
for f in sorted(SHIPPED.glob("*.csv")):
    sources[f"shipped: {f.stem}"] = read_law_csv(f)
for sid in sorted({r["sweep"] for r in store.runs() if r["sweep"]}):
    rows = sweep_table(store, sid)
    if rows:
        sources[f"your sweep: {sid}"] = pd.DataFrame(rows)
upload = st.file_uploader("Or upload a CSV of law points (columns rank, length, delta_loss; optional method, p_eff)",
                          type=["csv", "tsv", "txt"], key="law_upload")
if upload is not None:
    try:
        sources[f"upload: {upload.name}"] = read_law_csv(upload.getvalue(), name=upload.name)
    except MemcoreError as e:
        st.error(str(e))
if not sources:
    st.info("No sweep data yet: run `memcore sweep` (see the README) to build one, or upload a CSV.")
    st.stop()
uploaded = next((k for k in sources if k.startswith("upload: ")), None)
if uploaded is not None and st.session_state.get("law_last_upload") != uploaded:  # a new upload: show it
    st.session_state["law_last_upload"] = st.session_state["law_source"] = uploaded
name = st.selectbox("Sweep data", list(sources), key="law_source")
data = sources[name]
methods = sorted(data["method"].unique()) if "method" in data else ["all points"]


@st.cache_data(show_spinner="fitting ...", max_entries=32)
def fit_method(table: pd.DataFrame, method: str):
    d = table[table["method"] == method] if "method" in table else table
    fits, preferred = compare_forms(d["rank"].to_numpy(float), d["length"].to_numpy(float), d["delta_loss"].to_numpy(float))
    return fits, preferred


fits = {}
for m in methods:
    try:
        fits[m] = fit_method(data, m)
    except MemcoreError as e:
        st.warning(f"{m}: {e}")
if not fits:
    st.stop()

# --- parameters, side by side --------------------------------------------------------------------------------
st.subheader("Fitted parameters")
cols = st.columns(len(fits))
for c, (m, (fs, preferred)) in zip(cols, fits.items()):
    with c:
        fit = fs["power"] if "power" in fs else fs[preferred]
        d = data[data["method"] == m] if "method" in data else data
        table = pd.DataFrame([{"parameter": k, "value": v, "95% low": fit.intervals[k][0], "95% high": fit.intervals[k][1]}
                              for k, v in fit.params.items()])
        st.markdown(f"**{m}** · {fit.n} points · R² **{fit.r2:.3f}** · RMSE {fit.rmse:.3f} · leave-one-out RMSE {fit.loo_rmse:.3f}")
        st.dataframe(table, hide_index=True, width="stretch", column_config={k: st.column_config.NumberColumn(format="%.4f")
                                                                               for k in ("value", "95% low", "95% high")})
        aics = ", ".join(f"{f} {x.aic:.1f}" for f, x in fs.items())
        st.caption(f"AIC ({aics}): the data prefer the **{preferred}** form"
                   + (f" (R² {fs[preferred].r2:.3f})" if preferred != fit.form else ""))
        if "frac_above" in d:
            sat = float((d["frac_above"] >= 0.99).mean())
            regime = "capacity-bound" if sat < 0.2 else ("mixed" if sat < 0.6 else "saturated: the law degenerates")
            st.caption(f"{sat:.0%} of points have every token above τ (regime: {regime}).")
        if "bits_per_param" in d:
            cap = d.groupby("rank")["bits_per_param"].max()
            st.caption("capacity, best bits per trainable parameter by rank: " + ", ".join(f"r{int(r)} {v:.4f}" for r, v in cap.items()))

# --- surface with runs overlaid ---------------------------------------------------------------------------------
st.subheader("Surface")
method = st.radio("Method", list(fits), horizontal=True, key="law_method")
fs, preferred = fits[method]
fit = fs["power"] if "power" in fs else fs[preferred]
d = data[data["method"] == method] if "method" in data else data
observed = d[["rank", "length", "delta_loss"]].assign(kind="sweep")
mine = [r for r in store.runs(status="completed")  # a CSV without a method column: runs of every method
        if not r["sweep"] and r["summary"] and (r["method"] == method or "method" not in data)]
session_runs = set()
job = get_worker().find(st.query_params.get("job"))
if job is not None:
    session_runs = {live.run_id for live in job.runs if live.run_id}
extra = pd.DataFrame([{"rank": r["rank"], "length": r["summary"]["n_tokens"], "delta_loss": r["summary"]["delta_loss"],
                       "kind": "this session" if r["id"] in session_runs else "your runs"} for r in mine],
                     columns=["rank", "length", "delta_loss", "kind"])
show_mine = st.toggle("Overlay your own runs", value=True, key="law_mine")
if show_mine and len(extra):
    observed = pd.concat([observed, extra], ignore_index=True)
    st.caption("Your runs may use other budgets, placements or stop rules than the sweep; their distance from the surface shows how much that matters.")
observed = observed.assign(predicted=fit.predict(observed["rank"].to_numpy(float), observed["length"].to_numpy(float)))
grid = charts.law_grid(fit.predict, observed["rank"], observed["length"])
show_chart(charts.law_surface_chart(grid, observed, f"{method}: fitted ΔL (R² {fit.r2:.3f})"))

ranks = sorted(d["rank"].unique())
ls = np.geomspace(d["length"].min(), d["length"].max(), 40)
curves = pd.DataFrame([{"rank": r, "length": x, "delta_loss": float(fit.predict(r, x))} for r in ranks for x in ls])
show_chart(charts.law_slices_chart(d[["rank", "length", "delta_loss"]], curves, f"{method}: ΔL against length, one line per rank"))

# --- what if ---------------------------------------------------------------------------------------------------
st.subheader("What if")
c1, c2, c3 = st.columns(3)
r_in = int(c1.number_input("Rank", min_value=1, max_value=4096, value=8, key="wi_rank"))
l_in = int(c2.number_input("Length (tokens)", min_value=1, max_value=1_000_000, value=256, key="wi_len"))
target = c3.number_input("Target ΔL (nats/token)", min_value=0.0, max_value=20.0, value=1.0, step=0.1, key="wi_target")
pred = float(fit.predict(r_in, l_in))
per_rank = (d["p_eff"] / d["rank"]).median() if "p_eff" in d else math.nan
bits = pred * l_in / math.log(2)
st.markdown(f"Predicted ΔL at rank {r_in}, {l_in} tokens: **{pred:.3f}** nats/token"
            + (f" ≈ {bits:,.0f} bits over P_eff ≈ {per_rank * r_in:,.0f} parameters = **{bits / (per_rank * r_in):.4f} bits/param**"
               if per_rank == per_rank else ""))
r_lo, r_hi, l_lo, l_hi = d["rank"].min(), d["rank"].max(), d["length"].min(), d["length"].max()
if not (r_lo <= r_in <= r_hi and l_lo <= l_in <= l_hi):
    st.caption(f"Rank {r_in} and {l_in} tokens lie outside the fitted points (ranks {r_lo:g}–{r_hi:g}, lengths {l_lo:g}–{l_hi:g}): "
               "this is an extrapolation of the law.")
try:
    need = smallest_rank(fit, l_in, target)
    st.markdown(f"Smallest rank predicted to reach ΔL {target:g} at {l_in} tokens: **{need if need is not None else 'none up to 4096'}**")
except Exception as e:
    st.error(error_text(e))
with st.expander("Fit as JSON"):
    st.code(json.dumps(fit.to_dict(), indent=1))
