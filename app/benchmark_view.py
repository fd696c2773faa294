"""The law page's benchmark section: the paper's two benchmarks as `bench/bench_memft.py report --out` and
`bench/bench_phonebook.py report --out` wrote them (sample_data/paper by default, or the folder named by
MEMCORE_BENCHMARK_DIR): per method the verbatim-recall frontier with its bracket, the paired MemFT − SFT
differences with 95% intervals, the law fitted past the frontier and the PhoneBook's capacity in facts, with the
user's own runs placed against the frontier."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import charts
import pandas as pd
import streamlit as st
from common import show_chart

from memcore.config import MemcoreError
from memcore.frontier import end_of_budget_summary, gained_after_stop, gained_words, point_gains, window_tally
from memcore.law import as_bool, own_runs, sweep_mismatches

SHIPPED_PAPER = Path(__file__).resolve().parent.parent / "sample_data" / "paper"
ORDER = ("sft", "memft-ot", "memft-sw")
MEASURES = {  # paired measure -> what the axis says
    "steps": "steps to exact recall (fewer is better)",
    "exact_recall": "exact recall (% of seeds, differences in points; higher is better)",
    "token_accuracy": "token accuracy (% of tokens, differences in points; higher is better)",
    "frac_above": "tokens with p > τ (% of tokens, differences in points; higher is better)",
    "verbatim_prefix": "verbatim prefix (tokens; longer is better)",
    "delta_loss": "ΔL (nats/token; higher is better)",
}
SHARES = ("exact_recall", "token_accuracy", "frac_above")  # fractions in the tables, shown in percent (points)
PAIRED_VALUES = ("mean", "lo", "hi", "method_mean", "baseline_mean")  # long_context_paired.csv's values
SPOT_VALUES = ("new_mean", "shipped_lo", "shipped_hi", "pooled_mean", "pooled_lo", "pooled_hi")  # _spot.csv's
COMMANDS = ("python bench/bench_memft.py run && python bench/bench_memft.py report --out sample_data/paper",
            "python bench/bench_phonebook.py run && python bench/bench_phonebook.py report --out sample_data/paper")


def folder() -> Path:
    """Where the benchmark tables are read from: $MEMCORE_BENCHMARK_DIR, else the shipped sample_data/paper."""
    env = os.environ.get("MEMCORE_BENCHMARK_DIR")
    return Path(env).expanduser() if env else SHIPPED_PAPER


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:  # written with nothing in it yet (a law with too few points to fit)
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        st.warning(f"Could not read {path.name}: {e}")
        return None
    return df if len(df) else None


def read_meta(path: Path) -> dict:
    """A report's side JSON (note, state, command, wall_s), {} when missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def _ends(lo, hi) -> str:
    lo = None if lo is None or (isinstance(lo, float) and math.isnan(lo)) else int(lo)
    hi = None if hi is None or (isinstance(hi, float) and math.isnan(hi)) else int(hi)
    if lo is not None and hi is not None:
        return f"{lo} – {hi}"
    return f"≥ {lo}" if lo is not None else f"< {hi}" if hi is not None else "not yet known"


def _rate(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.0%}"


def spot_seeds(table: pd.DataFrame) -> list[int]:
    """The new seeds a spot table (long_context_spot.csv, long_context_spot_frontier.csv) was trained with, from its
    new_seeds cells ('3,4'), sorted."""
    return sorted({int(x) for cell in table["new_seeds"].astype(str) for x in cell.split(",") if x.strip()})


def in_points(table: pd.DataFrame, columns=PAIRED_VALUES) -> pd.DataFrame:
    """A paired or spot table with its share measures (SHARES: fractions 0..1 as the report writes them) in percent,
    so a difference reads in percentage points: `columns` of the rows whose measure is a share, times 100. The other
    measures (steps, tokens, nats) are left as they are; a table without a measure column is returned unchanged."""
    if "measure" not in table:
        return table
    out = table.copy()
    share = out["measure"].isin(SHARES)
    for c in columns:
        if c in out:
            out[c] = out[c].astype(float).where(~share, out[c].astype(float) * 100)
    return out


def with_pooled(paired: pd.DataFrame, spot: pd.DataFrame | None) -> pd.DataFrame:
    """The paired rows to chart, each cell the spot re-run pooled over every seed (bench_memft.py spot) right after
    it as a row of its own: pooled True, its mean, interval, seeds and verdict over the benchmark's seeds and the
    spot's together, its `where` naming the spot's seeds. paired: long_context_paired.csv rows; spot:
    long_context_spot.csv (None or without pooled values: the paired rows alone, pooled False)."""
    out = paired.assign(pooled=False)
    if spot is None or "pooled_mean" not in spot or not spot["pooled_mean"].notna().any():
        return out
    rows = []
    for _, r in out.iterrows():
        rows.append(r.to_dict())
        at = spot[(spot["method"] == r["method"]) & (spot["rank"] == r["rank"]) & (spot["length"] == r["length"])
                  & (spot["measure"] == r["measure"]) & spot["pooled_mean"].notna()]
        if len(at):
            p = at.iloc[0]
            where = f"{r['where']}, " if isinstance(r.get("where"), str) and r.get("where") else ""
            rows.append({**r.to_dict(), "mean": p["pooled_mean"], "lo": p["pooled_lo"], "hi": p["pooled_hi"],
                         "n": int(p["pooled_n"]), "verdict": p["pooled_verdict"], "pooled": True,
                         "where": f"{where}with seeds {str(p['new_seeds']).replace(',', ', ')}"})
    return pd.DataFrame(rows)


def frontier_table(front: pd.DataFrame, unit: str = "tokens", seeds: int = 0) -> pd.DataFrame:
    """The frontier rows as a reader reads them: method, rank, the bracket, the recall rate at its ends and bits
    per parameter. front: long_context_frontier.csv / phonebook_capacity.csv rows (method, rank, lo, hi, lo_rate,
    hi_rate; optional bits_per_param, and settled: False while the search still trains there, when bits per
    parameter at the longest recalled so far is a lower bound; lo_seeds, hi_seeds: the seeds each end's rate is
    over, said where fewer than the `seeds` searched so far; probing, probing_back, probing_recalled: the length in
    training and its seeds back)."""
    def recalled(rate, k) -> str:  # "2 of 3", "2 of 2 so far" (of the seeds with a verdict), or the rate alone
        if rate is None or pd.isna(rate):
            return "—"
        if k is None or pd.isna(k) or not k:
            return _rate(rate)
        return f"{round(float(rate) * k)} of {int(k)}" + (" so far" if seeds and k < seeds else "")

    def training(r) -> str:  # the length in training and its seeds back, short enough for the column's width
        n = r.get("probing")
        if n is None or pd.isna(n):
            return "—"
        back = int(r.get("probing_back") or 0)
        return f"{int(n)}" + (f": {int(r.get('probing_recalled') or 0)} of {back} recalled" if back else "")

    rows = []
    for _, r in front.iterrows():
        row = {"method": r["method"], "rank": int(r["rank"]), f"frontier ({unit})": _ends(r["lo"], r["hi"]),
               "seeds recalling each end": f"{recalled(r.get('lo_rate'), r.get('lo_seeds'))} · "
                                           f"{recalled(r.get('hi_rate'), r.get('hi_seeds'))}"}
        if "probing" in front:
            row[f"in training ({unit})"] = training(r)
        bpp = r.get("bits_per_param")
        bound = "settled" in r and not pd.isna(r["settled"]) and not bool(r["settled"])
        row["bits/param"] = "—" if bpp is None or pd.isna(bpp) else f"{'≥ ' if bound else ''}{float(bpp):.3f}"
        if "fitted_lo" in front:  # the logistic fit's ℓ* with its interval, and the method's minus sft's
            ok = pd.notna(r.get("fitted_lo")) and pd.notna(r.get("fitted_ell_star"))
            row[f"fitted ℓ* [95%] ({unit})"] = (f"{r['fitted_ell_star']:.1f} [{r['fitted_lo']:.1f}, "
                                               f"{r['fitted_hi']:.1f}]" if ok else "—")
        if "minus_sft" in front:
            d = r.get("minus_sft")
            row["− sft [95%]"] = ("—" if d is None or pd.isna(d) else
                                  f"{signed(d, 'ell_star')} [{signed(r['minus_sft_lo'], 'ell_star')}, "
                                  f"{signed(r['minus_sft_hi'], 'ell_star')}] {r['minus_sft_verdict']}")
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired differences as a reader reads them: named columns, the interval as one cell with its verdict
    beside it (the seeds and the two means after: on a narrow screen those are the ones cut off), 3 significant
    digits."""
    rows = []
    for _, r in paired.iterrows():
        rows.append({"method − sft": r["method"], "cell": f"r{int(r['rank'])} · {int(r['length'])} tokens"
                     + (f" · {r['where']}" if r.get("where") else ""),
                     "measure": MEASURES.get(r["measure"], r["measure"]),
                     "difference [95% interval]": f"{signed(r['mean'], r['measure'])} " + (
                         f"[{signed(r['lo'], r['measure'])}, {signed(r['hi'], r['measure'])}]" if pd.notna(r["lo"])
                         else "(one seed)"), "verdict": r["verdict"],
                     "method / sft": f"{plain(r['method_mean'], r['measure'])} / "
                                     f"{plain(r['baseline_mean'], r['measure'])}",
                     "seeds": int(r["n"])})
    return pd.DataFrame(rows)


def benchmark_rank_words(method: str, tokens: int) -> str | None:
    """What the long-context benchmark (up to its step budget and a plateau, unlike the 300-step sweep the law
    is fitted on) says of the rank `method` needs to recall `tokens` random tokens verbatim: the smallest rank
    whose bracket's recalled end reaches it, or the most any rank recalled so far. None when there is no
    benchmark table or no row for `method`."""
    front = _read(folder() / "long_context_frontier.csv")
    if front is None or "method" not in front or method not in set(front["method"]):
        return None
    d = front[front["method"] == method].sort_values("rank")
    meta = read_meta(folder() / "long_context.json")
    budget = (meta.get("settings") or {}).get("max steps")
    where = (f"The long-context benchmark (random tokens, up to {budget:,} steps and a plateau"
             if budget else "The long-context benchmark (random tokens, trained to a plateau") + \
        (", interim" if str(meta.get("state", "")).startswith("interim") else "") + ")"
    def fitted(r) -> str:  # the fitted ℓ* with its interval, where the report has one
        span = _fitted_span(r)
        return f"; fitted ℓ*, where its chance of recall crosses 1/2: {span}" if span else ""

    def seeds(r) -> str:  # "2 of 3 seeds" at the recalled end, where the report says
        k = _seeds_recalling(r)
        return f" ({k} seeds there)" if k else ""

    enough = d[d["lo"].notna() & (d["lo"] >= tokens)]
    if len(enough):
        r = enough.iloc[0]
        ends = f"{int(r['lo'])}–{int(r['hi'])}" if pd.notna(r["hi"]) else f"at least {int(r['lo'])}"
        return (f"{where}: **rank {int(r['rank'])}** holds {tokens} tokens verbatim with {method}: it recalled "
                f"{int(r['lo'])}{seeds(r)} (its frontier there: {ends} tokens{fitted(r)}).")
    known = d[d["lo"].notna()]
    if not len(known):
        return f"{where}: {method} has recalled nothing yet."
    best = known.sort_values("lo").iloc[-1]
    guess = ""  # ℓ* grows about in proportion to rank (the paper's linear frontier): a rough rank past the trained
    top = d[d["fitted_ell_star"].notna()].sort_values("rank") if "fitted_ell_star" in d else d.iloc[:0]
    if len(top):
        r = top.iloc[-1]
        per = float(r["fitted_ell_star"]) / float(r["rank"])
        guess = (f" At its fitted {per:.0f} tokens per rank (rank {int(r['rank'])}'s ℓ*), that is about **rank "
                 f"{math.ceil(tokens / per)}**, a guess past what it trained.")
    return (f"{where}: no rank it searches ({', '.join(str(int(x)) for x in d['rank'])}) has {method} recalling "
            f"{tokens} tokens; the most is {int(best['lo'])} at rank {int(best['rank'])}{seeds(best)}, so more "
            f"than that takes a higher rank than it trained.{guess}")


def benchmark_rank_table(tokens: int) -> pd.DataFrame | None:
    """The long-context benchmark's answer to "what rank recalls `tokens` tokens verbatim?" for every method it
    trained (sft, memft-ot, memft-sw), one row each: the smallest rank whose bracket's recalled end reaches
    `tokens` ("above N" when no rank it searched, up to N, does; "not known yet" while a rank has recalled nothing
    yet), the recalled end there (or, where no rank reaches `tokens`, the most any rank recalled) with its
    seeds, and the fitted ℓ* (tokens) with its 95% interval at that rank. None when there is no benchmark
    frontier table."""
    front = _read(folder() / "long_context_frontier.csv")
    if front is None or not {"method", "rank", "lo"} <= set(front):
        return None
    rows = []
    for method in _order(front["method"]):
        d = front[front["method"] == method].sort_values("rank")
        enough, known = d[d["lo"].notna() & (d["lo"] >= tokens)], d[d["lo"].notna()]
        r = enough.iloc[0] if len(enough) else known.sort_values("lo").iloc[-1] if len(known) else d.iloc[-1]
        rank = str(int(r["rank"])) if len(enough) else f"above {int(d['rank'].max())}" \
            if len(known) == len(d) else "not known yet"  # a rank that has recalled nothing yet is still searching
        rows.append({
            "method": method,
            "smallest rank": rank,
            "recalled end (tokens)": "—" if pd.isna(r["lo"]) else f"{int(r['lo'])} at rank {int(r['rank'])}",
            "seeds recalling it": _seeds_recalling(r),
            "fitted ℓ* [95%]": _fitted_span(r)})
    return pd.DataFrame(rows)


def _fitted_span(r) -> str:
    """A frontier row's fitted ℓ* with its 95% interval, '115.6 [110.5, 121.1]' (tokens), '' where it has none."""
    if pd.isna(r.get("fitted_ell_star")) or pd.isna(r.get("fitted_lo")):
        return ""
    return f"{r['fitted_ell_star']:.1f} [{r['fitted_lo']:.1f}, {r['fitted_hi']:.1f}]"


def _seeds_recalling(r) -> str:
    """'2 of 3': the seeds that recalled a frontier row's recalled end, '' where the table does not say."""
    k, rate = r.get("lo_seeds"), r.get("lo_rate")
    return "" if k is None or pd.isna(k) or pd.isna(rate) else f"{round(float(rate) * k)} of {int(k)}"


ANCHOR = "memft-against-sft"  # the benchmark section's heading, linked from the top of the law page


TERMS = (  # the words the law page uses, each in a line, for a reader who has not read the paper
    ("τ (tau)", "the probability threshold a target token must clear: a token is 'above τ' when the model, shown "
     "the text before it, gives it more than τ (0.5 by default)."),
    ("sft", "plain fine-tuning: the mean cross-entropy over every target token (the baseline)."),
    ("memft-ot", "MemFT, threshold only: the gradient goes only to the tokens still below τ."),
    ("memft-sw", "MemFT, sliding window: weights from each token's distance to τ, concentrated on a window after "
     "the first token the model gets wrong, which moves along as the text is learnt."),
    ("verbatim recall", "the whole target reproduced: every token is the model's top (argmax) choice given the "
     "true text before it."),
    ("ℓ* and the frontier", "the longest target a rank recalls verbatim: the bracket is the longest length most "
     "seeds recalled and the shortest they did not; the fitted ℓ* is where a logistic fit of recall against "
     "length crosses 1/2, with a bootstrap 95% interval."),
    ("ΔL", "the loss reduction training bought, base loss − final loss, in nats per target token (a nat is "
     "1/ln 2 ≈ 1.44 bits)."),
    ("the law: C, α, β, b", "ΔL = C · r^α · ℓ^(−β) + b, fitted over runs at several ranks r and lengths ℓ: α says "
     "how fast ΔL grows with rank, β how fast it falls with length, and α/β how much longer a target the same ΔL "
     "reaches at a higher rank (ℓ ∝ r^(α/β)); R² is the share of ΔL's spread the fit explains, AIC compares it "
     "with a saturating form (lower is better)."),
    ("saturated, budget-bound, capacity-bound", "how a run stopped: saturated, every token above τ or recalled (ΔL "
     "then capped by the base loss); budget-bound, at the step budget still improving (ΔL then measures how far "
     "the budget got); capacity-bound, on a plateau short of recall (where the paper fits its law). A fit's "
     "regime is that of the points it is fitted on."),
    ("P_eff and bits/param", "the adapter's trainable parameters (the bypass: 2 · rank · hidden size), and the "
     "information stored per parameter: the recalled tokens' loss reduction in bits (Σ ΔL / ln 2), counted at no "
     "more than a token carries (log2 of the vocabulary, 15.58 bits, for random tokens)."),
    ("verbatim prefix", "how many target tokens, from the start, the model gets right (argmax) before its first "
     "mistake."),
    ("paired difference, paired-t", "method − sft on the same seeds and data, seed by seed; its 95% interval is the "
     "paired t interval over the seeds. 'wins', 'loses' or 'more', 'fewer' where it excludes 0, else a tie."),
    ("bypass adapter", "the paper's adapter: one rank-r path around one layer's MLP (out = MLP(x) + x·A·B)."),
    ("search probe, stage 1", "a run at one (method, rank, length, seed) that bisection placed to find the "
     "bracket; it trains until recalled, a plateau or the step budget."),
    ("stage 2, 0.5ℓ*, 1.5ℓ*, 2ℓ*", "points at those multiples of sft's ℓ*, every method on the same seeds: "
     "below the frontier, steps to recall; past it, what each method holds at the step budget."),
    ("plateau rule", "stop a run after 200 steps without a new best in tokens above τ or argmax-right tokens, "
     "alike for every method."),
    ("spot re-run", "cells or bracket ends trained again with seeds the benchmark did not use, to check its "
     "intervals."),
    ("ℓ_A, ℓ_B, rehearsal share", "in the section on a second passage: the first passage's and the second's "
     "lengths in tokens, and the share of each update's weight that went to keeping the first (0 without "
     "rehearsal)."),
    ("diverged", "a re-run of the same point whose loss curve parted from the first run's early (floating-point "
     "order), so the two are two draws, not one."),
)


def terms_markdown() -> str:
    """The law page's glossary (TERMS) as a markdown list."""
    def plain(text: str) -> str:  # ℓ*'s star is not markdown's emphasis
        return text.replace("*", "\\*")

    return "\n".join(f"- **{plain(term)}**: {plain(words)}" for term, words in TERMS)


def _marked(verdict: str) -> str:
    """A frontier verdict for the top box: 'more' or 'fewer' in bold, a tie plain."""
    return verdict if verdict == "tie" else f"**{verdict}**"


def summary_words(front: pd.DataFrame | None = None, meta: dict | None = None,
                  sweep_budget: int | None = None, spot: pd.DataFrame | None = None) -> str | None:
    """The long-context benchmark's answer in one paragraph for the top of the law page: per method and rank the
    fitted verbatim-recall frontier ℓ* (tokens) and, for MemFT, its difference from sft's with the verdict, the
    budget and seeds it was trained with, and a link to the section below. front: long_context_frontier.csv (read
    from folder() when None); meta: long_context.json; sweep_budget: the step budget of the shipped sweep the page's
    law is fitted on, said when it is shorter than the benchmark's; spot: long_context_spot_frontier.csv (the
    frontier's spot re-run), whose differences refitted over every seed are given under the table. The difference
    is also given in percent of sft's ℓ*. None when there is no benchmark table or nothing placed."""
    if front is None:
        front = _read(folder() / "long_context_frontier.csv")
        meta = read_meta(folder() / "long_context.json")
        spot = _read(folder() / "long_context_spot_frontier.csv")
    meta = meta or {}
    if front is None or not {"method", "rank"} <= set(front.columns):
        return None
    col = "fitted_ell_star" if "fitted_ell_star" in front else "ell_star"
    placed = front[front[col].notna()] if col in front else front.iloc[:0]
    if not len(placed):
        return None
    ranks = sorted({int(r) for r in placed["rank"]})
    rows = [f"| ℓ* (tokens) | {' | '.join(f'rank {r}' for r in ranks)} |", f"|---|{'---:|' * len(ranks)}"]
    for m in _order(placed["method"]):
        cells = []
        for rank in ranks:
            at = placed[(placed["method"] == m) & (placed["rank"] == rank)]
            if not len(at):
                cells.append("—")
                continue
            r = at.iloc[0]
            cell = (_fitted_span(r) or f"{float(r[col]):.1f}") if col == "fitted_ell_star" else f"{float(r[col]):.1f}"
            if pd.notna(r.get("minus_sft")):
                base = placed[(placed["method"] == "sft") & (placed["rank"] == rank)]
                pct = (f", {100 * float(r['minus_sft']) / float(base.iloc[0][col]):+.0f}%".replace("-", "−")
                       if len(base) and float(base.iloc[0][col]) > 0 else "")
                span = difference(r) if pd.notna(r.get("minus_sft_lo")) else signed(r["minus_sft"], "ell_star")
                cell += f" ({span}{pct}: {_marked(r['minus_sft_verdict'])})"
            cells.append(cell)
        rows.append(f"| {m} | {' | '.join(cells)} |")
    budget = (meta.get("settings") or {}).get("max steps")
    seeds = meta.get("seeds") or []
    how = ", ".join(x for x in (f"up to {budget:,} steps" if budget else "",
                                f"{len(seeds)} seeds" if seeds else "") if x)
    interim = str(meta.get("state", "")).startswith("interim")
    pooled = ""
    if spot is not None and {"pooled_minus_sft", "new_seeds"} <= set(spot.columns) \
            and spot["pooled_minus_sft"].notna().any():
        said = spot[spot["pooled_minus_sft"].notna()].drop_duplicates(["method", "rank"])
        new = " and ".join(map(str, spot_seeds(said)))
        pooled = (f" With seeds {new} added at the bracket ends (the frontier's spot re-run), refitted "
                  "over every seed: " + "; ".join(
                      f"{r['method']} at rank {int(r['rank'])} {difference(r, 'pooled')} "
                      + _marked(r["pooled_minus_sft_verdict"])
                      for _, r in said.iterrows()) + ".")
    return (f"**What the long-context benchmark finds on this model**{f' ({how})' if how else ''}: the fitted "
            "verbatim-recall frontier ℓ*, the length of random tokens at which a rank's chance of verbatim recall "
            "crosses 1/2, with its 95% interval; in parentheses MemFT's difference from sft's in tokens with its 95% "
            "interval, in percent, and its verdict (more or fewer where the interval excludes 0, else a tie).\n\n"
            + "\n".join(rows)
            + "\n\n" + _overall(placed) + (pooled.strip() + " " if pooled else "")
            + f"[Its intervals, the fidelity past the frontier and the law there are below](#{ANCHOR})"
            + (" (interim: a snapshot of a benchmark not yet finished)" if interim else "") + "."
            + (f" The shipped sweep the law below is fitted on stops at {sweep_budget:,} steps, so its frontier sits "
               "shorter and does not tell the methods apart." if sweep_budget and budget and sweep_budget < budget
               else ""))


def _overall(placed: pd.DataFrame) -> str:
    """The top box's answer to "does MemFT hold more than SFT?" in one sentence, from the frontier verdicts: each
    MemFT method's cells counted as more, tie and fewer, and the answer: yes only where every cell is 'more'.
    '' when no cell has a verdict."""
    said = []
    for m in _order(placed["method"]):
        v = placed.loc[placed["method"] == m, "minus_sft_verdict"].dropna() \
            if "minus_sft_verdict" in placed else pd.Series(dtype=str)
        if not len(v):
            continue
        ranks = placed.loc[v.index, "rank"].astype(int)
        parts = [f"{w} at rank{'s' if (v == w).sum() > 1 else ''} "
                 f"{', '.join(str(x) for x in ranks[v == w])}" for w in ("more", "tie", "fewer") if (v == w).any()]
        parts = [p.replace("tie at", "the same at") for p in parts]
        said.append(f"{m} {'holds ' if not said else ''}"
                    + (" and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]))
    if not said:
        return ""
    wins = all(placed["minus_sft_verdict"].dropna() == "more") if "minus_sft_verdict" in placed else False
    head = "**So MemFT holds more than SFT at every rank here**, as the paper claims:" if wins else \
        "**So, unlike the paper's claim, MemFT does not hold more than SFT at every rank here**:"
    return f"{head} {'; '.join(said)}. "


def window_words(checked: pd.DataFrame) -> str:
    """The plateau rule's check (bench_memft.py window: the points it stopped nearest each frontier, trained again
    without it) in words: how many recalled, how many of those the rule had cut short (the same curve up to its
    stop) and how many took another floating-point path, what a cut means for the brackets, and, per method, what
    the points it held gained from its stop to the budget. window_table gives each point."""
    t = window_tally(checked)
    k, n, cut, kinds = t.recalled, t.n, t.cut, t.kinds
    window = f"{int(checked['window'].iloc[0])} steps" if "window" in checked else "its window"
    diverged = int((kinds == "diverged").sum())
    words = (f"The plateau rule ({window} without a new best) against points it stopped at the frontiers (the "
             f"nearest each, and those whose recall would move a bracket), trained again without it up to the step "
             f"budget (`python bench/bench_memft.py window`, `--decisive`): "
             f"{k} of {n} recalled, {cut} of them cut short by the rule (the share it cuts there: 95% "
             f"Clopper-Pearson interval {t.cut_lo:.0%}–{t.cut_hi:.0%})"
             + (f", {diverged} on a path that had left the run's copy before the rule stopped it" if diverged else "")
             + ("" if k else ", so the rule did not move these brackets' upper ends") + "; each point in the table.")
    notes = []
    if cut:
        notes.append("Where the rule cut a point that would have recalled, that bracket's upper end may be too short "
                     "and its frontier is a lower bound.")
    if diverged:
        notes.append("Diverged: the same point (data, start, dropout) whose curve left the run's copy's before the "
                     "rule stopped it, so near the frontier a seed's verdict turns on floating-point order (the "
                     "batch it trained in), not on the rule; the search keeps the run's verdict.")
    gained = gained_after_stop(checked)
    if len(gained):
        notes.append(f"From the rule's stop to the budget, the points it held (not recalled either way) gained: "
                     f"{gained_words(gained)}. So the points past the frontier (stage 2) train to the common budget "
                     "instead of stopping on the rule.")
    return " ".join([words, *notes])


def window_table(checked: pd.DataFrame) -> pd.DataFrame:
    """The plateau rule's check point by point, as a reader reads it: the point (method, rank, tokens, seed), the
    step the rule stopped the run's copy at, what training on without it did (recalled at a step, with the point's
    kind: cut short or diverged; or held to the budget), the step its curve left the copy's where it did, and for a
    held point what it gained from the stop to the budget (ΔL in percent of its value at the stop, token accuracy
    and tokens above τ in percentage points) and whether it stood on a plateau there (its on_plateau, as the
    check wrote it beside open_wait; 'improving' with the steps since its last best where that was not its last
    step). checked: long_context_window.csv (bench_memft.py window); the at-stop and at-budget columns are
    optional."""
    kinds = window_tally(checked).kinds
    try:
        gains = point_gains(checked)
    except KeyError:  # a table written before the at-stop values were kept
        gains = pd.DataFrame(float("nan"), index=checked.index, columns=["dl", "acc", "above"])

    def gain(v, held: bool, unit: str = "") -> str:  # a held point's gain, '—' for a recalled one or none known
        return "—" if not held or pd.isna(v) else f"{v:+.1f}{unit}".replace("-", "−")

    rows = []
    for (i, r), kind, recalled in zip(checked.iterrows(), kinds, as_bool(checked["recalled"])):
        held = not bool(recalled)
        row = {"method": r["method"], "rank": int(r["rank"]), "tokens": int(r["length"]), "seed": int(r["seed"]),
               "rule's stop": int(r["plateau_stop"]) if pd.notna(r.get("plateau_stop")) else None,
               "without the rule": (f"held to {int(r['steps']):,}" if held else
                                    f"recalled at {int(r['steps']):,}: {kind}"),
               "apart from": int(r["diverged_at"]) if pd.notna(r.get("diverged_at")) else None}

        row["ΔL gain"] = gain(gains.at[i, "dl"], held, "%")
        row["accuracy gain"] = gain(gains.at[i, "acc"], held)
        row["above τ gain"] = gain(gains.at[i, "above"], held)
        wait = r.get("open_wait")
        row["at the budget"] = ("—" if not held or wait is None or pd.isna(wait) else
                                "on a plateau" if as_bool(pd.Series([r.get("on_plateau")]))[0] else
                                "improving" if int(wait) == 0 else f"improving ({int(wait)} steps since best)")
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(_order(out["method"]))}
    return out.sort_values(["method", "rank", "tokens", "seed"], key=lambda c: c.map(order) if c.name == "method"
                           else c, kind="stable").reset_index(drop=True)


BOOK_MEASURES = {"entries_recalled": "entries recalled", "share_recalled": "share of the book recalled"}


def book_paired_table(paired: pd.DataFrame) -> pd.DataFrame:
    """The PhoneBook's method − sft on the same books (bench_phonebook.same_books: per rank, over every book size
    and seed both searches trained) as a reader reads it: the interval in one cell, the books paired, the verdict."""
    rows = []
    for _, r in paired.iterrows():
        digits = 1 if r["measure"] == "entries_recalled" else 2

        def f(x, digits=digits) -> str:
            return "—" if pd.isna(x) else f"{float(x):+.{digits}f}".replace("-", "−")

        rows.append({"method − sft": r["method"], "rank": int(r["rank"]),
                     "measure": BOOK_MEASURES.get(r["measure"], r["measure"]),
                     "difference [95% interval]": f"{f(r['mean'])} " + (f"[{f(r['lo'])}, {f(r['hi'])}]"
                                                                        if pd.notna(r["lo"]) else "(one book)"),
                     "method / sft": f"{r['method_mean']:.{digits}f} / {r['baseline_mean']:.{digits}f}",
                     "books": int(r["n"]), "verdict": r["verdict"]})
    return pd.DataFrame(rows)


def plateau_window(meta: dict) -> int:
    """The plateau rule's window in steps, as long_context.json (meta) gives it; 200 where it does not."""
    return int(meta.get("plateau_window") or 200)


def budget_words(points: pd.DataFrame, meta: dict) -> str:
    """What budget_table shows, in one caption: where the points past the frontier stood at the step budget, and
    that points still rising there are read at the budget. meta: long_context.json."""
    window = plateau_window(meta)
    budget = (meta.get("settings") or {}).get("max steps")
    past = points[points["open_wait"].notna()]
    on = int(past["on_plateau"].astype(bool).sum())
    still = on < len(past)
    return (f"Past the frontier, where the points stood at the {f'{budget:,}-step ' if budget else ''}budget: {on} "
            f"of {len(past)} on a plateau (no new best in tokens above τ or argmax-right tokens for {window}+ "
            "steps), per method in the table."
            + (" Points still rising there give what the budget reaches, as the paper's runs do, not a plateau: "
               "the fidelity and the law past the frontier are read at the budget." if still else ""))


def budget_table(points: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Per method, where its points past the frontier stood at the step budget (the points table's open_wait,
    late_delta_loss, on_plateau and delta_loss, as memcore.frontier.end_of_budget wrote them): how many, how many
    on a plateau by the rule's window, the steps since their last best (median, least), and their ΔL's rise over
    the last window of steps (median, nats per token and percent of the final ΔL). meta: long_context.json."""
    window = plateau_window(meta)
    summary = end_of_budget_summary(points)
    rows = []
    for m in _order(summary["method"]):
        r = summary[summary["method"] == m].iloc[0]
        rows.append({"method": m, "points": int(r["points"]), "on a plateau": int(r["on_plateau"]),
                     "steps since last best (median, least)": f"{r['wait_median']:.0f}, {int(r['wait_least'])}",
                     f"ΔL rise over the last {window} steps (median)":
                         "—" if pd.isna(r["late_median"]) else f"{r['late_median']:+.3f} nats"
                         + ("" if pd.isna(r["late_share"]) else f" ({r['late_share']:+.1%})")})
    return pd.DataFrame(rows)


def law_table(law: pd.DataFrame) -> pd.DataFrame:
    """The law past the frontier as a reader reads it: per method the exponents with their 95% intervals in one
    cell each, α/β (the exponent of the lines of equal ΔL) where the table has it (a report from before it was
    added does not), R², the points fitted and the regime they were in (which points, in words: law_caption)."""
    def exponent(r, k: str) -> str:
        if pd.isna(r.get(k)):
            return "—"
        lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
        return (f"{r[k]:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else "")).replace("-", "−")

    ratio = "alpha_over_beta" in law
    return pd.DataFrame([{"method": r["method"], "α (rank) [95%]": exponent(r, "alpha"),
                          "β (length) [95%]": exponent(r, "beta"),
                          **({RATIO: exponent(r, "alpha_over_beta")} if ratio else {}),
                          "R²": f"{r['r2']:.3f}", "points": int(r["points"]), "regime": r.get("regime", "")}
                         for _, r in law.iterrows()])


RATIO = "α/β (ℓ ∝ r^(α/β) at equal ΔL) [95%]"


def law_caption(law: pd.DataFrame) -> str:
    """Which points each method's law was fitted on, in words (once when every method's are alike)."""
    said = {m: str(w) for m, w in zip(law["method"], law.get("fitted_on", pd.Series([""] * len(law)))) if w and
            pd.notna(w)}
    if not said:
        return ""
    if len(set(said.values())) == 1 and len(said) == len(law):
        words = next(iter(said.values()))
        return f"{words[:1].upper()}{words[1:]}."  # not str.capitalize, which lowers the rest (ΔL, ℓ*)
    return " ".join(f"{m}: {w}." for m, w in said.items())


DECIMALS = {"steps": 1, "verbatim_prefix": 1, "ell_star": 1, **dict.fromkeys(SHARES, 1)}  # 3 for nats


def signed(x, measure: str = "") -> str:
    """A difference as a reader reads it: the measure's decimals, a true minus sign, '—' when missing."""
    if x is None or pd.isna(x):
        return "—"
    return f"{float(x):+.{DECIMALS.get(measure, 3)}f}".replace("-", "−")


def plain(x, measure: str = "") -> str:
    """A mean as a reader reads it, in the measure's decimals."""
    return "—" if x is None or pd.isna(x) else f"{float(x):.{DECIMALS.get(measure, 3)}f}"


def show_spot(spot: pd.DataFrame) -> None:
    """The spot re-run (bench_memft.py spot: the shipped cells trained again with other seeds): how many fell inside
    the shipped intervals, and the verdict pooled over every seed, per method and cell."""
    seeds = ", ".join(sorted(set(str(s) for s in spot["new_seeds"])))
    inside = int(spot["inside"].astype(bool).sum())
    lines = [f"**Spot re-run with seeds {seeds}**: {inside} of {len(spot)} differences fall inside the shipped 95% "
             "intervals (a mean over other, fewer seeds strays outside more often than 5%). Pooled over every seed:"]
    for _, r in spot.iterrows():
        if pd.isna(r.get("pooled_mean")):
            continue
        lines.append(f"- {r['method']} − sft, r{int(r['rank'])} · {int(r['length'])} tokens, "
                     f"{MEASURES.get(r['measure'], r['measure'])}: {signed(r['pooled_mean'], r['measure'])} "
                     f"[{signed(r['pooled_lo'], r['measure'])}, {signed(r['pooled_hi'], r['measure'])}] over "
                     f"{int(r['pooled_n'])} seeds, "
                     f"**{r['pooled_verdict']}**")
    st.markdown("\n".join(lines))


def difference(r, kind: str = "") -> str:
    """'+d [lo, hi]' of a row's `kind`_minus_sft columns (a frontier spot row's 'shipped' or 'pooled'; '' for the
    frontier table's own minus_sft), in tokens, one decimal, true minus signs."""
    col = f"{kind}_minus_sft" if kind else "minus_sft"
    return (f"{signed(r[col], 'ell_star')} [{signed(r[f'{col}_lo'], 'ell_star')}, "
            f"{signed(r[f'{col}_hi'], 'ell_star')}]")


def frontier_spot_words(table: pd.DataFrame, front: pd.DataFrame | None = None) -> str:
    """The frontier's spot re-run (bench_memft.py spot --frontier: every placed bracket's ends trained again with
    other seeds) in words: how many ends' new recall counts the shipped seeds' fitted frontier makes plausible, each
    end that it does not, and ℓ* refitted over every seed with each method's difference from sft's beside the
    shipped one. front: the benchmark's frontier table now (long_context_frontier.csv); where its difference from
    sft has moved since the spot ran (the benchmark went on: more points, another fit), both are given, each named."""
    seeds = spot_seeds(table)
    ranks = sorted({int(r) for r in table["rank"]})
    command = (f"python bench/bench_memft.py spot --frontier --seeds {' '.join(map(str, seeds))} "
               f"--ranks {' '.join(map(str, ranks))}")
    checked = table[table["inside"].notna()]
    inside = int(checked["inside"].astype(bool).sum())
    out = [f"Frontier spot re-run with seeds {', '.join(map(str, seeds))} (`{command}`): at {inside} of "
           f"{len(checked)} bracket ends the new seeds' recall is a plausible draw from the frontier fitted to the "
           "benchmark's own seeds (its exact interval meets the fit's 95% band of P(recall) there: with few new seeds "
           "a weak check)"]
    for _, r in checked[~checked["inside"].astype(bool)].iterrows():
        out.append(f"not at {r['method']} r{int(r['rank'])} · {int(r['length'])} tokens: {int(r['new_recalled'])} of "
                   f"{int(r['new_runs'])} recalled where the fit gives P(recall) {r['p_fit']:.2f} "
                   f"[{r['p_lo']:.2f}, {r['p_hi']:.2f}]")
    refit = []
    for (m, rank), r in table.groupby(["method", "rank"], sort=False):
        r = r.iloc[0]
        if pd.isna(r.get("pooled_ell_star")):
            continue
        words = f"{m} r{int(rank)} ℓ* {r['pooled_ell_star']:.1f} [{r['pooled_lo']:.1f}, {r['pooled_hi']:.1f}]"
        if pd.notna(r.get("pooled_minus_sft")):
            words += f", − sft {difference(r, 'pooled')} **{r['pooled_minus_sft_verdict']}**"
            if pd.notna(r.get("shipped_minus_sft")):
                now = None
                if front is not None and "minus_sft" in front:
                    at = front[(front["method"] == m) & (front["rank"] == rank)]
                    now = at.iloc[0] if len(at) and pd.notna(at.iloc[0]["minus_sft"]) else None
                moved = now is not None and any(abs(float(now[f"minus_sft{k}"]) - float(r[f"shipped_minus_sft{k}"]))
                                                >= 0.05 for k in ("", "_lo", "_hi"))
                words += (f" (the benchmark's seeds alone{', on its points when the spot ran' if moved else ''}: "
                          f"{difference(r, 'shipped')} {r['shipped_minus_sft_verdict']}"
                          + (f"; refitted since on the points it has now, as in the table above: "
                             f"{difference(now)} {now['minus_sft_verdict']}" if moved else "") + ")")
        refit.append(words)
    line = "; ".join(out) + "."
    if refit:
        line += (" Refitted over the benchmark's points and the new seeds' at the ends (tokens, 95% interval): "
                 + "; ".join(refit) + ".")
    return line


def frontier_spot_table(table: pd.DataFrame) -> pd.DataFrame:
    """The frontier's spot re-run end by end, as a reader reads it: each placed bracket's end (the longest length
    recalled, the shortest not), how many of the benchmark's seeds and of the new ones recalled it, the recall
    probability the benchmark's own fit gives there with its 95% band, and whether the new count is a plausible
    draw from it (its exact interval meets the band). table: long_context_spot_frontier.csv (bench_memft.py spot
    --frontier)."""
    def count(r, k: str) -> str:
        return "—" if pd.isna(r.get(f"{k}_recalled")) else f"{int(r[f'{k}_recalled'])} of {int(r[f'{k}_runs'])}"

    inside = as_bool(table["inside"].fillna(False))
    return pd.DataFrame([{"method": r["method"], "rank": int(r["rank"]),
                          "end": {"lo": "longest recalled", "hi": "shortest not recalled"}.get(str(r["end"]),
                                                                                             str(r["end"])),
                          "tokens": int(r["length"]), "benchmark's seeds": count(r, "shipped"),
                          "new seeds": count(r, "new"),
                          "fit's P(recall) [95%]": ("—" if pd.isna(r.get("p_fit")) else
                                                    f"{r['p_fit']:.2f} [{r['p_lo']:.2f}, {r['p_hi']:.2f}]"),
                          "plausible": "—" if pd.isna(r["inside"]) else "yes" if ok else "no"}
                         for (_, r), ok in zip(table.iterrows(), inside)])


def verdict_line(paired: pd.DataFrame, method: str, spot: pd.DataFrame | None = None) -> str:
    """One sentence: over how many (cell, measure) pairs `method` wins, ties or loses against sft; with the spot
    re-run's table, also how its cells come out pooled over every seed (which can overturn a tie on fewer seeds)."""
    d = paired[paired["method"] == method]
    counts = d["verdict"].value_counts()
    parts = [f"wins {counts.get('wins', 0)}", f"ties {counts.get('tie', 0)}", f"loses {counts.get('loses', 0)}"]
    if counts.get("one seed", 0):
        parts.append(f"{counts['one seed']} with one seed only")
    n = len(d)
    line = f"**{method} − sft**: of {n} comparison{'s' if n != 1 else ''} it " + ", ".join(parts) + "."
    pooled = spot[(spot["method"] == method) & spot["pooled_verdict"].notna()] if spot is not None else None
    if pooled is not None and len(pooled):
        c = pooled["pooled_verdict"].value_counts()
        line += (f" Pooled with the spot re-run over {int(pooled['pooled_n'].max())} seeds, of its {len(pooled)} "
                 f"cell{'s' if len(pooled) != 1 else ''} it "
                 f"wins {c.get('wins', 0)}, ties {c.get('tie', 0)}, loses **{c.get('loses', 0)}**.")
    return line


def render(store) -> None:
    """Draw the section; a note with the commands when no tables have been written yet."""
    where = folder()
    st.subheader("MemFT against SFT, with intervals", anchor=ANCHOR)
    front = _read(where / "long_context_frontier.csv")
    paired = _read(where / "long_context_paired.csv")
    law = _read(where / "long_context_law.csv")
    book = _read(where / "phonebook_capacity.csv")
    meta = read_meta(where / "long_context.json")
    if front is None and book is None:
        st.info(f"No benchmark tables in {where} yet. They come from\n\n```\n{COMMANDS[0]}\n{COMMANDS[1]}\n```\n\n"
                "(hours on a CPU; the README says how long and how to run the paper's grid on a GPU).")
        return
    st.caption(f"From {where}" + (f" · {meta['note']}" if meta.get("note") else "") + ". Random tokens at the "
               "paper's placement (bypass adapter); the search's probes trained until recalled, on a plateau of "
               "tokens above τ and argmax-right tokens, or at the step budget, and the points around sft's frontier "
               "until recalled or the step budget (the paper's), every method alike; the same seeds (and so the same "
               "data) for every method.")
    for what, m in (("The long-context benchmark", meta),
                    ("The PhoneBook benchmark", read_meta(where / "phonebook.json"))):
        if str(m.get("state", "")).startswith("interim"):
            st.warning(f"{what} is not finished: {m['state'].removeprefix('interim: ')}. Its tables are a snapshot "
                       "of the points trained so far (nothing is training now unless you started it); "
                       f"`{m.get('command') or 'its run command'}` goes on from where it stopped, on this machine or "
                       "any other, since the finished points and checkpoints come with the repository.")
    if front is not None:
        front = front.assign(method=pd.Categorical(front["method"], _order(front["method"]), ordered=True)) \
            .sort_values(["method", "rank"]).assign(method=lambda d: d["method"].astype(str))
        st.markdown("**Verbatim-recall frontier per method**: a bar, capped at each end, runs from the longest "
                    "length most seeds recalled to the shortest they did not; the circle is the fitted ℓ* (where the "
                    "fitted chance of recall crosses 1/2, which can sit just outside a narrow bracket when an end's "
                    "seeds split), with its 95% interval as a thin line beside the bar; while only one end is known, "
                    "a triangle marks the bound (up: at least that long; down: shorter than that).")
        fit = front["fitted_ell_star"] if "fitted_ell_star" in front else pd.Series(float("nan"), index=front.index)
        has_ci = {"fitted_lo", "fitted_hi"} <= set(front.columns)
        brackets = front.assign(source=front["method"], ell_star=[  # the fit's ℓ* where there is one
            f if has_ci and pd.notna(f) else math.sqrt(lo * hi) if pd.notna(lo) and pd.notna(hi) else
            (lo if pd.notna(lo) else hi) for f, lo, hi in zip(fit, front["lo"], front["hi"])])
        mine = own_runs(store)
        show_mine = st.toggle("Place your own runs", value=len(mine) > 0, key="bench_mine")
        runs = None
        if show_mine and not len(mine):
            st.caption("No runs of your own in this store yet: a run trained on the Memorize page is placed here "
                       "(against its method's bracket at its rank), recalled or not.")
        if show_mine and len(mine):
            runs = mine.assign(label=[f"your run {rid} ({m})" for rid, m in zip(mine["run_id"], mine["method"])],
                               recalled=mine["exact_recall"] > 0.5)
            settings = meta.get("settings")
            notes = [n.replace("from the sweep in", "from the benchmark in").replace("(sweep:", "(benchmark:")
                     for n in (sweep_mismatches(store, settings) if settings else [])]
            if notes:
                st.caption("Some of your runs were not trained like the benchmark, so they need not agree with its "
                           "brackets: " + "; ".join(notes[:4]) + (f"; … and {len(notes) - 4} more" if len(notes) > 4
                                                                 else "") + ".")
        if brackets["ell_star"].notna().any():
            show_chart(charts.frontier_brackets_chart(brackets, runs))
        st.dataframe(frontier_table(front, seeds=len(meta.get("seeds") or [])), hide_index=True, width="stretch")
        if "settled" in front and not front["settled"].astype(bool).all():
            st.caption("Bits per parameter: at the frontier once it is placed; while the search still trains there, "
                       "at the longest length recalled so far (≥: a lower bound), or — where none is known yet. In "
                       "training: the length the search trains there now, and how many of its seeds back recalled "
                       "it.")
        if (checked := _read(where / "long_context_window.csv")) is not None and len(checked):
            try:
                words, table = window_words(checked), window_table(checked)
            except (MemcoreError, KeyError, ValueError, TypeError) as e:  # a table from another tool or hand-edited
                st.warning(f"Could not read long_context_window.csv as a window check: {e}")
            else:
                st.caption(words)
                with st.expander(f"The plateau rule's check, point by point ({len(table)} points)"):
                    st.dataframe(table, hide_index=True, width="stretch", height=38 + 35 * len(table))
                    st.caption("Rule's stop: the step the rule stopped the search's own copy of the point at. "
                               "Without the rule: trained on from the start to the step budget, recalled at a step "
                               "(cut short: on the copy's curve; diverged: on another) or held to the budget. Apart "
                               "from: the step where the new run's curve first left that copy's. Gains, for the "
                               "points held: from the rule's stop to the budget, ΔL in percent of its value at the "
                               "stop, token accuracy and tokens above τ in percentage points. At the budget: on a "
                               "plateau by the rule, or still improving (with the steps since its last best where "
                               "that was not its last step).")
        if (spotted := _read(where / "long_context_spot_frontier.csv")) is not None and len(spotted):
            try:
                words, ends, seeds = (frontier_spot_words(spotted, front), frontier_spot_table(spotted),
                                      spot_seeds(spotted))
            except (KeyError, ValueError, TypeError) as e:  # a table from another tool or hand-edited
                st.warning(f"Could not read long_context_spot_frontier.csv as a frontier spot re-run: {e}")
            else:
                st.markdown(words)
                with st.expander(f"The frontier spot re-run, end by end ({len(ends)} ends, new seeds "
                                 f"{', '.join(map(str, seeds))})"):
                    st.dataframe(ends, hide_index=True, width="stretch", height=38 + 35 * len(ends))  # every end
    if paired is not None:
        st.markdown("**Paired differences, method − sft** on the same seeds and data: mean with a 95% paired-t "
                    "interval (Student's t, n − 1 degrees of freedom). Green: the method wins (the interval "
                    "excludes 0 on the better side); red: it loses; grey: a tie.")
        paired = in_points(paired)
        spot = _read(where / "long_context_spot.csv")
        spot = in_points(spot, SPOT_VALUES) if spot is not None else None
        for m in _order(paired["method"]):
            st.markdown(verdict_line(paired, m, spot))
        drawn = with_pooled(paired, spot)
        for measure in [c for c in MEASURES if c in set(paired["measure"])]:
            show_chart(charts.paired_chart(drawn, measure, MEASURES[measure],
                                           least_span=10.0 if measure in SHARES else 1.0))  # 10 points
        if drawn["pooled"].any():
            st.caption("A diamond is a cell pooled over the benchmark's seeds and the spot re-run's (its row says "
                       "which seeds): the same cell as the row above it, its verdict over every seed.")
        if (paired["n"] < paired["n"].max()).any():
            st.caption("A cell with fewer seeds (dashed: steps are paired only over the seeds both methods "
                       "recalled, so near the frontier a cell may keep two or one; a stage-2 cell may still be "
                       "training) has a much wider interval: it is drawn up to the chart's edge, an arrow there where "
                       "it goes on (an open point at the edge when its mean lies past it too), with its numbers "
                       "written at the edge; the paired table gives it whole.")
        if set(paired.get("where", pd.Series(dtype=str)).astype(str)) <= {"search probe"}:
            st.caption("So far these are the search's own probes: steps to exact recall where both methods recalled "
                       "the same seeds' tokens. Fidelity past the frontier (token accuracy, tokens above τ, verbatim "
                       "prefix, ΔL at 1.5 and 2 times sft's ℓ*) is measured at a rank once sft's frontier there is "
                       "placed.")
        if (points := _read(where / "long_context_points.csv")) is not None and "open_wait" in points \
                and points["open_wait"].notna().any():
            st.caption(budget_words(points, meta))
            window = plateau_window(meta)
            st.dataframe(budget_table(points, meta), hide_index=True, width="stretch", column_config={
                "steps since last best (median, least)": st.column_config.TextColumn(help=(
                    "Steps from each point's last new best (in tokens above τ or argmax-right tokens) to the step "
                    f"budget: the median over the method's points past the frontier, then the least. {window} or "
                    "more is a plateau by the rule; fewer means the point was still gaining when the budget ran "
                    "out."))})
        with st.expander("The paired table"):
            # the measure's name in full (its unit with it), not cut at the column's default width
            st.dataframe(paired_table(paired), hide_index=True, width="stretch", height=38 + 35 * len(paired),
                         column_config={"measure": st.column_config.TextColumn(width="large")})
        if spot is not None:
            show_spot(spot)
    if law is not None:
        st.markdown("**The law past the frontier** (ΔL of the points not recalled, per method: stage 2's, trained "
                    "to the common budget, once a method has six on a grid that tells rank from length (at least "
                    "four (rank, length) cells, two lengths at some rank, not one per rank); until then the "
                    "search's failed probes, stopped on a plateau):")
        st.dataframe(law_table(law), hide_index=True, width="stretch")
        if caption := law_caption(law):
            st.caption(caption)
        if "alpha_over_beta" in law:
            st.caption("α/β is the exponent of the law's lines of equal ΔL: ΔL is the same wherever r^α·ℓ^(−β) is, "
                       "so at the same ΔL doubling the rank reaches 2^(α/β) times the tokens (α/β = 1: twice, in "
                       "proportion to the adapter's parameters; a budget-bound law says this of what the step budget "
                       "reaches). The points can pin it where they do not pin α and β (a large C trading off against "
                       "b); its interval is the delta method's.")
        on_probes = "fitted_on" in law and law["fitted_on"].astype(str).str.contains("failed probes").any()
        if on_probes:
            st.caption("Until the points at 1.5 and 2 × sft's ℓ* are trained at both ranks, a method's law is on "
                       "the search's own failed probes, all just past the frontier: the lengths barely vary, so the "
                       "exponents are loose (read their intervals) and the fit is not yet the law.")
        if front is not None and len(law) < front["method"].nunique():
            st.caption("A method missing here has fewer than six points past its frontier on a grid that tells rank "
                       "from length so far; the points around sft's frontier give them.")
    elif front is not None:
        st.caption("The law past the frontier is not fitted yet: it needs six points past the frontier per method, "
                   "at four or more (rank, length) cells with two lengths at some rank, which the points around "
                   "sft's frontier give.")
    if book is None:
        st.caption(f"No PhoneBook tables in {where} yet: `{COMMANDS[1]}` makes them (capacity in facts per method "
                   "and rank).")
    else:
        st.markdown("**PhoneBook capacity in facts**: the largest book recalled entry by entry, per method and rank "
                    "(a 10-digit number carries 33.2 bits).")
        book_meta = read_meta(where / "phonebook.json")
        table = frontier_table(book, unit="entries", seeds=len(book_meta.get("seeds") or [])).rename(
            columns={"frontier (entries)": "largest book recalled (entries = facts)"})
        if "most_recalled" in book:
            table["most in a book (bits/param)"] = [
                "—" if pd.isna(n) else f"{n:g} of {int(at)}" + (f" ({b:.3f})" if pd.notna(b) else "")
                for n, at, b in zip(book["most_recalled"], book["most_recalled_book"],
                                    book.get("most_recalled_bits_per_param", pd.Series([None] * len(book))))]
        st.dataframe(table, hide_index=True, width="stretch")
        if "most_recalled" in book:
            st.caption("The most entries any book had recalled (mean over its seeds) is a second reading of capacity "
                       "in facts: a book larger than the largest recalled whole still holds entries, and a larger "
                       "book is not always the one that holds the most (its epoch budget and last, partial minibatch "
                       "change with its size).")
        book_paired = _read(where / "phonebook_paired.csv")
        if book_paired is not None and len(book_paired):
            st.markdown("**MemFT against SFT on the same books**: method − sft per rank, over every book size and "
                        "seed both searches trained (the seed draws the book, so the same entries), with a 95% "
                        "paired-t interval over those books.")
            st.dataframe(book_paired_table(book_paired), hide_index=True, width="stretch")
            st.caption("The books paired are the ones both searches happened to probe, near their own capacities: "
                       "the comparison holds on those books, not on every size.")
        rule = _read(where / "phonebook_plateau_rule.csv")
        if rule is not None and {"failed", "budget_stops"} <= set(rule.columns) and rule["failed"].sum() \
                and (rule["budget_stops"] == rule["failed"]).all():
            epochs = book_meta.get("epochs", "its")
            st.caption(f"Every probe not recalled ran out of its {epochs} epochs while still improving (none stopped "
                       f"on a plateau): these capacities are what {epochs} epochs reach, lower bounds on what the "
                       "adapter can hold.")
        if book_meta.get("note"):
            done = (f" Complete: made by `{book_meta['command']}`." if book_meta.get("state") == "complete"
                    and book_meta.get("command") else "")
            st.caption(f"From {where} · {book_meta['note']}.{done}")

