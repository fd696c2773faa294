"""Memory law: the fitted surface ΔL = C·r^α·ℓ^(−β) + b over rank and length, with runs overlaid."""

import json
import math
from pathlib import Path

import altair as alt
import benchmark_view
import charts
import numpy as np
import pandas as pd
import retention_view
import search_view
import streamlit as st
from common import error_text, get_store, get_worker, show_chart

from memcore.config import MemcoreError, RunSpec
from memcore.frontier import (
    REFERENCE_BITS_PER_PARAM,
    frontier_from_table,
    has_recall,
    recall_cells,
    smallest_verbatim_rank,
)
from memcore.law import (
    LawFits,
    comparable_settings,
    fit_all,
    method_rows,
    own_runs,
    read_law_csv,
    smallest_rank,
    sweep_mismatches,
)
from memcore.sweep import sweep_table

SHIPPED = Path(__file__).resolve().parent.parent.parent / "sample_data" / "sweeps"


st.title("Memory law")
st.caption("ΔL = C · r^α · ℓ^(−β) + b: the loss reduction after training, as a function of adapter rank r "
           "and the number of memorized tokens ℓ. Fitted by bounded least squares (scipy) from a variable-projection "
           "grid start, with 95% intervals, on the points that converged short of full recall (as the paper does) "
           "where the sweep says how its points stopped and has enough of them, else on every point short of it; "
           "each method's fit says which.")
_shipped_budget = (benchmark_view.read_meta(SHIPPED / "capacity_bypass_random.json").get("settings") or {}).get(
    "max steps")  # the sweep the law is fitted on by default
if (answer := benchmark_view.summary_words(sweep_budget=_shipped_budget)) is not None:
    st.info(answer)
with st.expander("Terms on this page"):
    st.markdown(benchmark_view.terms_markdown())

search_view.render()

store = get_store()
sources: dict[str, pd.DataFrame] = {}
settings: dict[str, dict] = {}  # what each sweep trained with, to compare a user's runs against
# the paper's regime first
for f in sorted(SHIPPED.glob("*.csv"), key=lambda f: (not f.stem.startswith("capacity"), f.stem)):
    sources[f"shipped: {f.stem}"] = read_law_csv(f)
    side = f.with_suffix(".json")
    if side.is_file():
        settings[f"shipped: {f.stem}"] = json.loads(side.read_text()).get("settings", {})
for sid in sorted({r["sweep"] for r in store.runs() if r["sweep"]}):
    try:
        rows = sweep_table(store, sid)
    except MemcoreError:  # a chain sweep: shown under "Memory that keeps changing", not as law points
        continue
    if rows:
        sources[f"your sweep: {sid}"] = pd.DataFrame(rows)
        first = store.run(rows[0]["run_id"])
        settings[f"your sweep: {sid}"] = comparable_settings(RunSpec.from_dict(first["spec"]))
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
# methods in one order on every part of the page: sft first, then memft-ot, memft-sw, then any other
ORDER = ("sft", "memft-ot", "memft-sw")
methods = (sorted(data["method"].unique(), key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
           if "method" in data else ["all points"])


@st.cache_data(show_spinner="fitting ...", max_entries=32)
def fit_method(table: pd.DataFrame, method: str) -> LawFits:
    return fit_all(method_rows(table, method))


@st.cache_data(show_spinner="fitting the recall frontier ...", max_entries=32)
def frontier_of(table: pd.DataFrame, method: str):
    return frontier_from_table(table, method if "method" in table else None)


fits: dict[str, LawFits] = {}
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
for c, (m, lf) in zip(cols, fits.items()):
    with c:
        fit = lf.main
        rows = [{"parameter": k, "value": v, "95% low": fit.intervals[k][0], "95% high": fit.intervals[k][1]}
                for k, v in fit.params.items()]
        if fit.alpha_over_beta is not None:  # the exponent of the lines of equal ΔL: pinned where α and β are not
            ratio, lo, hi = fit.alpha_over_beta
            rows.append({"parameter": "alpha/beta", "value": ratio, "95% low": lo, "95% high": hi})
        table = pd.DataFrame(rows)
        st.markdown(f"**{m}** · {fit.n} points · R² **{fit.r2:.3f}** · RMSE {fit.rmse:.3f} · "
                    f"leave-one-out RMSE {fit.loo_rmse:.3f}")
        st.dataframe(table, hide_index=True, width="stretch",
                     column_config={k: st.column_config.NumberColumn(format="%.4f")
                                    for k in ("value", "95% low", "95% high")})
        if fit.alpha_over_beta is not None:
            ratio, lo, hi = fit.alpha_over_beta
            bound = "budget-bound" in (lf.fitted_regime or lf.regime).label
            st.caption(f"alpha/beta: ΔL stays the same along ℓ ∝ r^(α/β), so at the same ΔL doubling the rank reaches "
                       f"{2 ** ratio:.2f}× the tokens (95% {2 ** lo:.2f}× to {2 ** hi:.2f}×; 2× would be in "
                       "proportion to the adapter's parameters)"
                       + (": at this fit's step budget, since its points are budget-bound, not at capacity."
                          if bound else "."))
        aics = ", ".join(f"{f} {x.aic:.1f}" for f, x in lf.forms.items())
        st.caption(f"AIC ({aics}): {lf.preference()}"
                   + (f" (R² {lf.forms[lf.preferred].r2:.3f})" if lf.preferred != fit.form and lf.clear_preference
                      else ""))
        st.caption(lf.regime_words())
        for note in fit.notes:
            st.caption(f"Note: {note}.")
        d = method_rows(data, m)
        if "bits_per_param" in d:
            cap = d.groupby("rank")["bits_per_param"].max()
            st.caption("most bits stored per trainable parameter by any point, by rank (ΔL-based, recalled or not; "
                       "the frontier's capacity below counts recalled tokens only): "
                       + ", ".join(f"r{int(r)} {v:.4g}" for r, v in cap.items()))

# --- surface with runs overlaid ---------------------------------------------------------------------------------
st.subheader("Surface")
method = st.radio("Method", list(fits), horizontal=True, key="law_method")
fit = fits[method].main
d = method_rows(data, method)
observed = d[["rank", "length", "delta_loss"]].assign(kind="sweep")
own = own_runs(store)
mine = method_rows(own, method if "method" in data else None)  # a CSV without a method column: runs of every method
session_runs = set()
job = get_worker().find(st.query_params.get("job"))
if job is not None:
    session_runs = {live.run_id for live in job.runs if live.run_id}
extra = mine[["rank", "length", "delta_loss"]].assign(
    kind=["this session" if rid in session_runs else "your runs" for rid in mine["run_id"]])
show_mine = st.toggle("Overlay your own runs", value=True, key="law_mine")
if show_mine and len(extra):
    observed = pd.concat([observed, extra], ignore_index=True)
    st.caption("Your runs may use other budgets, placements or stop rules than the sweep; their distance from the "
               "surface shows how much that matters.")
observed = observed.assign(predicted=fit.predict(observed["rank"].to_numpy(float), observed["length"].to_numpy(float)))
grid = charts.law_grid(fit.predict, observed["rank"], observed["length"])
ceiling = float(d["delta_loss"].max())  # the most ΔL this sweep reaches: past it the points are saturated
surface = charts.law_surface_chart(grid, observed, f"{method}: fitted ΔL (R² {fit.r2:.3f})", ceiling=ceiling)
if (grid["delta_loss"] > ceiling).any():
    st.caption(f"Grey: where the fitted law predicts more than the {ceiling:.2f} nats/token the sweep's points reach; "
               "there the runs are saturated (every token memorized, ΔL capped by the base loss) and the power form "
               "runs on past what any adapter can gain.")
def front_for(table: pd.DataFrame, m: str):
    """The recall frontier of method m in the table (frontier_of's triple), or None where it has no recall column or
    no frontier can be read from it."""
    if not has_recall(table):
        return None
    try:
        return frontier_of(table, m)
    except MemcoreError:
        return None


front = front_for(data, method)
if front is not None and front[1] is not None:
    ffit = front[1]
    rr = np.geomspace(float(grid.r_lo.min()), float(grid.r_hi.max()), 30)
    band = [ffit.ell_star_interval(x) for x in rr]
    surface = alt.layer(surface, charts.frontier_layer(rr, ffit.ell_star(rr), grid, [b[0] for b in band],
                                                       [b[1] for b in band]))
    st.caption("White dashed line: the verbatim-recall frontier ℓ*(r) fitted from the same sweep (band: 95% interval); "
               "below it the whole target is predicted to be recalled verbatim.")
show_chart(surface)

ranks = sorted(d["rank"].unique())
ls = np.geomspace(d["length"].min(), d["length"].max(), 40)
curves = pd.DataFrame([{"rank": r, "length": x, "delta_loss": float(fit.predict(r, x))} for r in ranks for x in ls])
show_chart(charts.law_slices_chart(d[["rank", "length", "delta_loss"]], curves,
                                   f"{method}: ΔL against length, one line per rank", ceiling=ceiling))

# --- recall: low loss is not high accuracy ------------------------------------------------------------------------
if has_recall(data):
    st.subheader("Recall: low loss is not high accuracy")
    st.caption("Seed means over the grid, one column per method. Token accuracy is the share of target tokens whose "
               "teacher-forced argmax is right; exact recall is the share of seeds whose whole target is reproduced "
               "verbatim. The recall boundary is sharp and does not follow the ΔL contours.")
    shown = [m for m in ORDER if m in methods] or methods
    cell_tables = {m: recall_cells(method_rows(data, m)) for m in shown}
    mine_cells = own.assign(label=[f"your run {rid} ({m})" for rid, m in zip(own["run_id"], own["method"])])[
        ["rank", "length", "label", "method", "delta_loss", "token_accuracy", "exact_recall"]]
    dl_hi = max(float(t["delta_loss"].max()) for t in cell_tables.values())
    for value, label, fmt, dom in (("delta_loss", "ΔL (nats/token)", ".2f", (0.0, dl_hi)),
                                   ("token_accuracy", "token accuracy", ".2f", (0.0, 1.0)),
                                   ("exact_recall", "exact recall (share of seeds)", ".2f", (0.0, 1.0))):
        cols = st.columns(len(shown))
        for c, m in zip(cols, shown):
            t = cell_tables[m]
            if value not in t:
                continue
            with c:  # a user's run sits on the sweep cell nearest to it
                mine_m = mine_cells[mine_cells["method"] == m] if "method" in data else mine_cells
                show_chart(charts.recall_heatmap(t, value, f"{m}: {label}", fmt, dom,
                                                 mine=mine_m if show_mine else None))
    if show_mine and len(mine_cells):
        st.caption("Diamonds: your own runs of each panel's method, on the nearest sweep cell (hover for their own "
                   "rank, length and values).")
        ref = settings.get(name)
        if ref:
            notes = sweep_mismatches(store, ref)
            if notes:
                st.warning("Your runs were not trained like the sweep, so they need not fall on its cells:\n\n- "
                           + "\n- ".join(notes[:8]) + (f"\n- … and {len(notes) - 8} more" if len(notes) > 8 else ""))

    # --- frontier and capacity ---------------------------------------------------------------------------------
    st.subheader("Verbatim-recall frontier and capacity")
    fcols = st.columns(len(shown))
    cap_rows = []
    for c, m in zip(fcols, shown):
        with c:
            try:
                per_rank, ffit, why = frontier_of(data, m)
            except MemcoreError as e:
                st.warning(f"{m}: {e}")
                continue
            rows = []
            for p in per_rank:
                sym = {"at least": "≥", "at most": "≤"}.get(p.bound, "≈")
                row = {"rank": p.rank, "ℓ* (recall rate crosses 1/2)": f"{sym} {p.ell_star:.3g}",
                       "bits/param there": (f"{p.bits_per_param:.3f}" if p.bits_per_param is not None
                                            else "— (no bits or P_eff column)")}
                if ffit is not None:
                    lo, hi = ffit.ell_star_interval(p.rank)
                    row["fitted ℓ*"] = f"{float(ffit.ell_star(p.rank)):.3g} [{lo:.3g}, {hi:.3g}]"
                    cap_rows.append({"rank": p.rank, "bits_per_param": ffit.bits_per_param(p.rank),
                                     "kind": f"{m} fitted"})
                if p.bits_per_param is not None:
                    cap_rows.append({"rank": p.rank, "bits_per_param": p.bits_per_param, "kind": f"{m} interpolated"})
                rows.append(row)
            gamma_lo, gamma_hi = ffit.gamma_interval if ffit else (None, None)
            st.markdown(f"**{m}**" + (f" · ℓ*(r) = {math.exp(ffit.a):.3g} · r^{ffit.gamma:.2f} "
                                        f"(γ 95% [{gamma_lo:.2f}, {gamma_hi:.2f}])" if ffit else ""))
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
            if ffit is None:
                st.caption(f"No fitted frontier: {why}")
            else:
                for n in ffit.notes:
                    st.caption(n)
            if {"stop_reason", "exact_recall", "steps"} <= set(data.columns):
                mine = data[data["method"] == m]
                failed = mine[~mine["exact_recall"].astype(bool)]
                bound = failed[failed["stop_reason"] == "max_steps"]
                if len(failed) and 2 * len(bound) > len(failed):
                    st.info(f"{len(bound)} of the {len(failed)} points not recalled stopped at the step budget "
                               f"({int(bound['steps'].max())} steps) still improving: this frontier is where that "
                               "budget runs out, which may be short of capacity. The benchmark below trains each "
                               "point up to 2,000 steps and to a plateau.")
    cap = pd.DataFrame([r for r in cap_rows if r["bits_per_param"] is not None])
    if len(cap):
        show_chart(charts.capacity_chart(cap, REFERENCE_BITS_PER_PARAM))
        by = cap.assign(method=cap["kind"].str.split().str[0], how=cap["kind"].str.split().str[1])
        wide = by.pivot_table(index=["rank", "how"], columns="method", values="bits_per_param")
        if wide.shape[1] > 1 and np.allclose(wide.to_numpy(), wide.to_numpy()[:, :1], rtol=1e-6, equal_nan=True):
            st.caption(f"{' and '.join(wide.columns)} tie at every rank here (their markers are drawn slightly apart "
                       "in rank to show both): this sweep does not tell their capacities apart.")
        st.caption("Bits stored = the bits per token the recalled points' loss fell by (Σ (base loss − loss) / ln 2 "
                   "over their target tokens), capped at what a token carries (log2 of the vocabulary for random "
                   "tokens: a base model worse than uniform loses more than that without storing more), times the "
                   "frontier length, divided by P_eff. References: about 2 bits/param for knowledge (Allen-Zhu & Li), "
                   "3.6 for random data (Morris et al. 2025).")

benchmark_view.render(store)
retention_view.render(store)

# --- what if ---------------------------------------------------------------------------------------------------
@st.fragment
def what_if(fits: dict[str, LawFits], data: pd.DataFrame, shown: str, name: str) -> None:
    """The what-if section, as a fragment: a change to its inputs reruns it alone, in a moment, instead of the whole
    page (every fit and chart above, about ten seconds on a CPU, with the old answer greyed out meanwhile). Its
    method starts at the one shown under Surface (`shown`) and has its own picker."""
    st.subheader("What if")
    names = list(fits)
    method = (st.radio("Method", names, index=names.index(shown), horizontal=True, key=f"wi_method-{name}-{shown}")
              if len(names) > 1 else shown)
    fit = fits[method].main
    d = method_rows(data, method)
    ceiling = float(d["delta_loss"].max())  # the most ΔL this method's points reach, as under Surface
    front = front_for(data, method)
    c1, c2, c3 = st.columns(3)
    # it opens on one of the sweep's own points, the one whose fitted ΔL is nearest the median and short of
    # saturation: inside the data, with a number to read (a guess such as rank 8 × 256 may lie outside it, a short
    # length at saturation); a new sweep resets it
    points = d.dropna(subset=["rank", "length", "delta_loss"]).drop_duplicates(["rank", "length"])
    pred_at = pd.Series([float(fit.predict(r, n)) for r, n in zip(points["rank"], points["length"])],
                        index=points.index, dtype=float)
    inside = pred_at[(pred_at > 0) & (pred_at < ceiling)]  # where the fit answers with a number to read
    order = (inside - d["delta_loss"].median()).abs().sort_values(kind="stable").index if len(inside) else []
    r0 = int(points.loc[order[0], "rank"]) if len(order) else 8
    l0 = int(round(float(points.loc[order[0], "length"]))) if len(order) else 256
    r_in = int(c1.number_input("Rank", min_value=1, max_value=4096, value=min(max(r0, 1), 4096), key=f"wi_rank-{name}"))
    l_in = int(c2.number_input("Length (tokens)", min_value=1, max_value=1_000_000, value=min(max(l0, 1), 1_000_000),
                               key=f"wi_len-{name}"))
    # a default the sweep makes non-trivial: nine tenths of the most ΔL it reaches (1.0 on a short-budget text sweep,
    # about 12 nats on random tokens, where a target of 1 is met by every rank); a new sweep resets it
    target = c3.number_input("Target ΔL (nats/token)", min_value=0.0, max_value=50.0,
                             value=round(0.9 * ceiling, 1) if ceiling > 0 else 1.0, step=0.1, key=f"wi_target-{name}")
    pred = float(fit.predict(r_in, l_in))
    st.caption(f"With the {method} fit."
               + (" Its parameters are not pinned down by its points (the note under Fitted parameters): read its "
                  "predictions inside the ranks and lengths it was fitted on, not its values; outside them it "
                  "extrapolates." if any("not pinned down" in n for n in fit.notes) else ""))
    per_rank = (d["p_eff"] / d["rank"]).median() if "p_eff" in d else math.nan
    bits = pred * l_in / math.log(2)
    carries = front[1].source_bits if front is not None and front[1] is not None else None  # bits a token carries
    # a base model worse than uniform on the tokens loses more than it stores: count no more than a token carries
    capped = bool(carries) and pred / math.log(2) > carries
    if capped:
        bits = carries * l_in
    if pred <= 0:  # the fitted form crosses zero outside its data: no stored bits to count
        st.markdown(f"Predicted ΔL at rank {r_in}, {l_in} tokens: **{pred:.3f}** nats/token, which no adapter can "
                    "reach (ΔL below 0 means worse than the base model): the law does not hold this far out.")
    elif pred > ceiling:  # past what the sweep's runs reach: they are saturated there, ΔL capped by the base loss
        st.markdown(f"Predicted ΔL at rank {r_in}, {l_in} tokens: **{pred:.3f}** nats/token, more than the "
                    f"{ceiling:.2f} the sweep's runs ever reach: there the runs are saturated (every token memorized, "
                    "ΔL capped by the base loss), so read it as **saturated**, not as a number to count bits from.")
    else:
        st.markdown(f"Predicted ΔL at rank {r_in}, {l_in} tokens: **{pred:.3f}** nats/token"
                    + (f" ≈ {bits:,.0f} bits over P_eff ≈ {per_rank * r_in:,.0f} parameters = "
                       f"**{bits / (per_rank * r_in):.4f} bits/param**" if per_rank == per_rank else "")
                    + (f" (counted at the {carries:.2f} bits a token carries: ΔL / ln 2 is more than that, because the "
                       "base model is worse than uniform on these tokens, and no more can be stored)"
                       if capped and per_rank == per_rank else ""))
    r_lo, r_hi, l_lo, l_hi = d["rank"].min(), d["rank"].max(), d["length"].min(), d["length"].max()
    outside = ([f"rank {r_in} (fitted ranks {r_lo:g}–{r_hi:g})"] if not r_lo <= r_in <= r_hi else []) + \
        ([f"{l_in} tokens (fitted lengths {l_lo:g}–{l_hi:g})"] if not l_lo <= l_in <= l_hi else [])
    if outside:
        st.caption(f"{' and '.join(outside).capitalize()} lie{'s' if len(outside) == 1 else ''} outside the fitted "
                   "points: this is an extrapolation of the law.")
    try:
        need = smallest_rank(fit, l_in, target) if target <= ceiling else None
        if target > ceiling:
            st.markdown(f"A target ΔL of {target:g} is more than the {ceiling:.2f} the sweep's runs ever reach (a run "
                        "cannot gain more than its base loss): **no rank** is predicted to reach it.")
        else:
            st.markdown(f"Smallest rank predicted to reach ΔL {target:g} at {l_in} tokens with {method}: "
                        f"**{need if need is not None else 'none up to 4096'}**"
                        + (f" (above the fitted ranks {r_lo:g}–{r_hi:g}: an extrapolation of the law)"
                           if need is not None and need > r_hi else ""))
    except Exception as e:
        st.error(error_text(e))
    if front is not None:
        st.markdown("**Smallest rank to recall ℓ tokens verbatim**")
        v_len = int(st.number_input("Tokens to recall verbatim", min_value=1, max_value=1_000_000, value=64,
                                    key="wi_verbatim"))
        if (bench := benchmark_view.benchmark_rank_words(method, v_len)) is not None:
            st.markdown(bench)  # trained on to the paper's budget: the answer to lead with where it has one
            if (every := benchmark_view.benchmark_rank_table(v_len)) is not None and len(every) > 1:
                st.caption(f"The benchmark's answer for {v_len} tokens with each method it trained (where no rank "
                           "reaches it, the row gives the most any rank recalled):")
                st.dataframe(every, hide_index=True)
        budget = (settings.get(name) or {}).get("max steps")
        if front[1] is None:
            st.info(f"No verbatim what-if for {method}: {front[2]}")
        else:
            ans = smallest_verbatim_rank(front[1], v_len)
            hi = ans.interval[1] if ans.interval[1] is not None else "unbounded"
            said = (f"this sweep's frontier ℓ*(r) (at its {budget:,}-step budget, " if budget else
                    "this sweep's frontier ℓ*(r) (") + "fitted over every rank, so it also extrapolates)"
            st.markdown(("By " if bench is None else "Beside it, by ") + said + f": the smallest rank predicted to "
                        f"recall **{v_len}** tokens verbatim with {method} is **{ans.rank}** (95% interval "
                        f"{ans.interval[0]}–{hi}).")
            if bench is not None:
                st.caption("Where the two differ, go by the benchmark: it trains each point to the paper's budget, "
                           f"where the {budget or 'short'}-step sweep stops short of capacity and so asks for more "
                           "rank; the sweep's answer only reaches past the ranks the benchmark trained.")
            for n in ans.notes:
                st.warning(n)


what_if(fits, data, method, name)
with st.expander("Fit as JSON"):
    st.code(json.dumps(fit.to_dict(), indent=1))
