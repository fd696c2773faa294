"""Pure rendering helpers for the app: token heat-maps as HTML strings and Altair charts.

Nothing here imports streamlit, so every function can be tested by inspecting its output.
Styles are inline on each element because Streamlit may strip <style> blocks from st.html.
"""

from __future__ import annotations

import copy
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from memcore.pieces import Piece

RED = "#d7301f"  # p far below tau: the model does not predict this token yet
WHITE = "#f7f7f7"  # p == tau: on the threshold
BLUE = "#2166ac"  # p far above tau: memorized
GREEN = "#1a9850"  # outline for tokens that just crossed tau
DIVERGE = "#b2182b"  # bottom border where greedy decoding first goes wrong
GREY = "#bdbdbd"  # p is NaN (not measured)
DARK_TEXT = "#111111"
LIGHT_TEXT = "#ffffff"

FRAC_SERIES = {"frac_above": "above τ", "frac_correct": "argmax correct"}
LOSS_SERIES = {"loss": "loss", "delta_loss": "ΔL"}


# ---------------------------------------------------------------------------
# colours


# a method's colour wherever methods are compared (the capacity chart's fitted marks, the benchmark's brackets)
METHOD_COLOURS = {"sft": "#0068c9", "memft-ot": "#ff2b2b", "memft-sw": "#29b09d"}
METHOD_LIGHT = {"sft": "#83c9ff", "memft-ot": "#ffabab", "memft-sw": "#7defa1"}  # their interpolated marks

def _rgb(hex_color: str) -> tuple[int, int, int]:
    return int(hex_color[1:3], 16), int(hex_color[3:5], 16), int(hex_color[5:7], 16)


def _mix(a: str, b: str, t: float) -> str:
    """Linear blend of two '#rrggbb' colours, t=0 -> a, t=1 -> b."""
    ra, rb = _rgb(a), _rgb(b)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ra, rb))


def prob_color(p: float, tau: float) -> str:
    """Diverging colour centred at tau: [0, tau] maps red..white, [tau, 1] maps white..blue. Returns '#rrggbb'."""
    p = float(p)
    if np.isnan(p):
        return GREY
    p = min(max(p, 0.0), 1.0)
    if p <= tau:
        return _mix(RED, WHITE, p / tau) if tau > 0 else WHITE
    return _mix(WHITE, BLUE, (p - tau) / (1.0 - tau)) if tau < 1 else BLUE


def _luminance(hex_color: str) -> float:
    """WCAG relative luminance, used to pick a readable text colour."""
    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in _rgb(hex_color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color(background: str) -> str:
    """White text on saturated backgrounds, dark text on light ones (0.18 is where both contrasts are equal)."""
    return LIGHT_TEXT if _luminance(background) < 0.18 else DARK_TEXT


# ---------------------------------------------------------------------------
# HTML


def _piece_html(piece: str) -> str:
    """Escaped token text with visible whitespace: newlines become '↵' plus a real line break, empty tokens '∅'."""
    if piece == "":
        return "∅"
    text = html.escape(piece, quote=True)  # user text: never let it become markup
    return text.replace("\r\n", "\n").replace("\n", "↵<br>")


def _span(text_html: str, background: str, title: str, classes: list[str], extra_style: str = "") -> str:
    style = f"background:{background};color:{text_color(background)};padding:0 1px;border-radius:2px;{extra_style}"
    return (f'<span class="{" ".join(classes)}" title="{html.escape(title, quote=True)}" style="{style}">'
            f'{text_html}</span>')


_CONTAINER_STYLE = ("white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.9em;"
                    "line-height:1.9")


def _as_piece(piece: Piece | str) -> Piece:
    return piece if isinstance(piece, Piece) else Piece(text=piece)


def _piece_title(i: int, piece: Piece) -> str:
    """Hover text naming the token: its index, and for a token that holds part of a split character, which
    part of which character and its bytes."""
    title = f"#{i}"
    if piece.parts > 1:
        title += f" · part {piece.part} of {piece.parts} of {piece.char!r}"
    if piece.data and (piece.parts > 1 or "\ufffd" in piece.text):
        title += f" · bytes {piece.hex}"
    return title


def _piece_body(piece: Piece) -> tuple[str, str]:
    """(escaped HTML, extra style) for a token: its text, or a muted continuation mark."""
    if piece.continues:
        return html.escape(piece.shown), "opacity:0.65;font-size:0.8em;"
    return _piece_html(piece.text), ""


def token_html(pieces: Sequence[Piece | str], p: Sequence[float], tau: float, crossed: Sequence[bool] | None = None,
               stubborn: Iterable[int] = (), first_divergence: int | None = None) -> str:
    """The passage token by token, each coloured by p(correct token) relative to tau, in one <div class="mc-tokens">.

    A token that only continues a character split over several tokens shows a continuation mark (class mc-cont);
    the character itself sits on the token that holds its first byte, so the texts still read as the passage."""
    if len(p) != len(pieces):
        raise ValueError(f"token_html: len(pieces)={len(pieces)} but len(p)={len(p)}")
    if crossed is not None and len(crossed) != len(pieces):
        raise ValueError(f"token_html: len(pieces)={len(pieces)} but len(crossed)={len(crossed)}")
    stubborn = {int(i) for i in stubborn}
    spans = []
    for i, raw in enumerate(pieces):
        piece = _as_piece(raw)
        pi = float(p[i])
        body, style = _piece_body(piece)
        classes, title = ["mc-tok"], f"{_piece_title(i, piece)} p={pi:.3f}"
        if piece.continues:
            classes.append("mc-cont")
        if crossed is not None and bool(crossed[i]):
            classes.append("mc-crossed")
            style += f"outline:2px solid {GREEN};outline-offset:-1px;"
            title += " · crossed τ"
        if i in stubborn:
            classes.append("mc-stubborn")
            style += "text-decoration:underline dashed;text-underline-offset:3px;"
            title += " · ⚑ stubborn"
        if first_divergence is not None and i == first_divergence:
            classes.append("mc-diverge")
            style += f"border-bottom:3px solid {DIVERGE};"
            title += " · greedy decoding diverges here"
        spans.append(_span(body, prob_color(pi, tau), title, classes, style))
    return f'<div class="mc-tokens" style="{_CONTAINER_STYLE}">{"".join(spans)}</div>'


ENTRY_VIEW_FROM = 2  # a run of at least this many samples is drawn as a grid of entries, not one strip of tokens


def entries_html(labels: Sequence[str], answers: Sequence[str], worst_p: Sequence[float], recalled: Sequence[bool],
                 tau: float) -> str:
    """Many samples (a PhoneBook) as a grid of entries in one <div class="mc-entries">: each cell holds the entry's
    prompt (its name) and its answer, coloured by its worst token's p against τ, ✓ when every token of it is
    recalled. Every text is escaped (user data). Sized for thousands of entries: one small <div> each."""
    if not (len(labels) == len(answers) == len(worst_p) == len(recalled)):
        raise ValueError("entries_html: labels, answers, worst_p and recalled differ in length")
    cells = []
    for i, (name, ans, w, ok) in enumerate(zip(labels, answers, worst_p, recalled)):
        bg = prob_color(float(w), tau)
        title = html.escape(f"#{i} {name} →{ans} · worst token p={float(w):.3f}"
                            + (" · recalled" if ok else " · not recalled"), quote=True)
        mark = "✓ " if ok else ""
        cells.append(f'<div class="mc-entry{" mc-recalled" if ok else ""}" title="{title}" style="background:{bg};'
                     f'color:{text_color(bg)};padding:1px 4px;border-radius:3px;overflow:hidden;white-space:nowrap;'
                     f'text-overflow:ellipsis">{mark}{html.escape(name)}<b>{html.escape(ans)}</b></div>')
    return ('<div class="mc-entries" style="display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));'
            f'gap:2px;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.78em">{"".join(cells)}</div>')


def entries_chart(history: pd.DataFrame, n_entries: int, mark_step: int | None = None) -> alt.Chart:
    """Entries recalled (every token's argmax right) and entries above τ (every token's p > τ) over the steps:
    `history` with columns step, entries_recalled, entries_above; the y axis spans 0..n_entries."""
    long = history.melt(id_vars=["step"], value_vars=["entries_recalled", "entries_above"], var_name="series",
                        value_name="entries")
    long["series"] = long["series"].map({"entries_recalled": "recalled (argmax right)",
                                       "entries_above": "every token above τ"})
    chart = _line_mark(alt.Chart(long), long["step"].nunique()).encode(
        x=alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("entries:Q", title=f"entries of {n_entries:,}", scale=alt.Scale(domain=[0, max(1, n_entries)])),
        color=alt.Color("series:N", title=None,  # at the side: a bottom legend eats the chart's height
                        scale=alt.Scale(domain=["recalled (argmax right)", "every token above τ"],
                                        range=[BLUE, GREEN])),
        tooltip=["step:Q", alt.Tooltip("series:N", title="measure"), alt.Tooltip("entries:Q", title="entries")]
    ).properties(height=220, title="Entries recalled over the steps")
    if mark_step is not None:
        rule = alt.Chart(pd.DataFrame({"step": [mark_step]})).mark_rule(strokeDash=[4, 3], color="#555").encode(
            x="step:Q")
        chart = chart + rule
    return chart


def legend_html(tau: float) -> str:
    """A colour bar for token_html with labels 'p=0', 'τ=<tau>' (placed at tau) and 'p=1'."""
    pos = min(max(float(tau), 0.0), 1.0) * 100
    bar = (f'<div style="height:10px;border-radius:3px;'
           f'background:linear-gradient(to right, {RED} 0%, {WHITE} {pos:.1f}%, {BLUE} 100%)"></div>')
    label = 'style="position:absolute;top:0;{}"'
    labels = (f'<div style="position:relative;height:1.3em;font-size:0.8em">'
              f'<span {label.format("left:0")}>p=0</span>'
              f'<span {label.format(f"left:{pos:.1f}%;transform:translateX(-50%)")}>τ={tau}</span>'
              f'<span {label.format("right:0")}>p=1</span></div>')
    return f'<div class="mc-legend" style="max-width:320px">{bar}{labels}</div>'


def generation_diff_html(target_ids: Sequence[int], generated_ids: Sequence[int], target: Sequence[Piece | str],
                         generated: Sequence[Piece | str]) -> str:
    """Generated tokens against the target position by position (compared by token id): matches blue,
    mismatches red, missing target tokens struck out. target/generated: the pieces of each id sequence."""
    spans = []
    first_seen = False
    for i, raw in enumerate(generated):
        piece = _as_piece(raw)
        want = _as_piece(target[i]) if i < len(target) else None
        ok = i < len(target_ids) and target_ids[i] == generated_ids[i]
        title = _piece_title(i, piece) + " " + (
            "matches" if ok else ("beyond the target" if want is None else f"expected {want.label!r}"))
        first = not ok and not first_seen  # where greedy decoding left the target: everything after follows from it
        first_seen = first_seen or first
        body, style = _piece_body(piece)
        spans.append(_span(body, BLUE if ok else RED, ("first mismatch, " if first else "") + title,
                           ["mc-tok", "mc-match" if ok else "mc-mismatch"] + (["mc-first-mismatch"] if first else []),
                           style + ("outline:3px solid #000;" if first else "")))
    for i in range(len(generated), len(target)):  # generation stopped early: show what is missing
        body, style = _piece_body(_as_piece(target[i]))
        spans.append(_span(body, WHITE, f"#{i} missing from the generation", ["mc-tok", "mc-missing"],
                           style + "text-decoration:line-through;opacity:0.6;"))
    return f'<div class="mc-tokens" style="{_CONTAINER_STYLE}">{"".join(spans)}</div>'


# ---------------------------------------------------------------------------
# charts

CHART_POINTS = 200  # most steps a chart of a run draws (evenly spaced, the latest included)


_HASHED = re.compile(r"data-[0-9a-f]{16,}")  # the name Altair gives an inline dataset: a hash of its values


def stable_spec(chart: alt.TopLevelMixin | dict) -> dict:
    """The chart's Vega-Lite spec with its inline datasets named by where they are used (data0, data1, ...)
    instead of by a hash of their values (datasets the chart names itself keep their names).

    Altair names each dataset after its contents, so every live update would change the spec itself and the
    browser would build the chart again from scratch. With stable names, two updates of a chart differ only
    in their datasets, which Streamlit sends apart from the spec, and the page swaps the data into the chart
    it already drew."""
    spec = chart if isinstance(chart, dict) else chart.to_dict(validate=False)
    datasets = spec.get("datasets")
    if not datasets:
        return spec
    names: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and data.get("name") in datasets and _HASHED.fullmatch(data["name"]):
                old = data["name"]
                names.setdefault(old, f"data{len(names)}")
                node["data"] = {**data, "name": names[old]}
            for k, v in node.items():
                if k != "datasets":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    spec["datasets"] = {names.get(k, k): v for k, v in datasets.items()}
    return spec


def thin(n: int, limit: int = CHART_POINTS) -> list[int]:
    """Indices of at most about `limit` evenly spaced items out of n, always with the last (for long runs)."""
    if n <= limit:
        return list(range(n))
    k = -(-n // limit)
    return list(range(0, n, k)) + ([n - 1] if (n - 1) % k else [])


def _line_mark(chart: alt.Chart, n_steps: int) -> alt.Chart:
    # a line through one point draws nothing, so show points until there are two steps
    return chart.mark_line(point=n_steps <= 1)


def _records(df: pd.DataFrame) -> list[dict]:
    """A frame as JSON-safe records (NaN as null, numpy numbers as Python ones), as a spec's dataset."""
    return json.loads(df.to_json(orient="records", double_precision=15))


def _with_data(template: alt.TopLevelMixin, frames: dict[str, pd.DataFrame]) -> alt.TopLevelMixin:
    """A chart whose layers read named datasets, with those datasets filled in (an ordinary Altair chart)."""
    return template.properties(datasets={name: _records(df) for name, df in frames.items()})


@lru_cache(maxsize=64)
def _template_spec(kind: str, *args: Any) -> dict:
    return stable_spec(TEMPLATES[kind](*args).to_dict(validate=False))


def live_spec(kind: str, args: tuple, frames: dict[str, pd.DataFrame]) -> dict:
    """The Vega-Lite spec of chart `kind` (see TEMPLATES) for the page to draw: the chart is built with Altair
    once per `args`, and each new step only puts its data frames (sent as Arrow by Streamlit) into the
    datasets. The same as ``stable_spec`` of the chart function's result, at a fraction of the cost."""
    spec = copy.deepcopy(_template_spec(kind, *args))  # Streamlit edits the spec it is given
    spec["datasets"] = {**spec.get("datasets", {}), **frames}
    return spec


def _long(history: pd.DataFrame, series: dict[str, str], has_run: bool) -> pd.DataFrame:
    """Melt the wanted metric columns into (step, [run], series, value); missing columns and NaNs are skipped."""
    ids = ["step", "run"] if has_run else ["step"]
    cols = [c for c in series if c in history.columns]
    if history.empty or "step" not in history.columns or not cols:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in [*ids, "series", "value"]})
    df = history[ids + cols].copy()
    if has_run:
        df["run"] = df["run"].astype(str)
    df = df.melt(id_vars=ids, value_vars=cols, var_name="series", value_name="value").dropna(subset=["value"])
    df["series"] = df["series"].map(series)
    return df


def _panel(name: str, series: dict[str, str], has_run: bool, n_steps: int, title: str, unit_y: bool) -> alt.Chart:
    y_scale = alt.Scale(domain=[0, 1]) if unit_y else alt.Scale(zero=False)
    enc = dict(x=alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1)),
               y=alt.Y("value:Q", title=None, scale=y_scale),
               # legends under each panel: at the side, two panels and their legends overflow the page
               color=alt.Color("series:N", title="series", sort=list(series.values()),
                               legend=alt.Legend(orient="bottom", direction="horizontal")),
               tooltip=["step:Q", alt.Tooltip("series:N", title="measure"), alt.Tooltip("value:Q", format=".4f")]
               + (["run:N"] if has_run else []))
    if has_run:  # which line is which run, in each panel
        enc["strokeDash"] = alt.StrokeDash("run:N", title="run", legend=alt.Legend(orient="bottom",
                                                                                 direction="horizontal"))
    return _line_mark(alt.Chart(alt.NamedData(name)), n_steps).encode(**enc).properties(title=title, width=300,
                                                                                      height=220)


def curves_args(history: pd.DataFrame, tau: float) -> tuple:
    """What the curves chart's layout depends on (its data aside): tau, whether runs are compared, one step."""
    n_steps = history["step"].nunique() if "step" in history.columns else 0
    return float(tau), "run" in history.columns, n_steps <= 1


def curves_frames(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The curves chart's datasets: the [0, 1] fractions and the losses, each in long format."""
    has_run = "run" in history.columns
    return {"fractions": _long(history, FRAC_SERIES, has_run), "losses": _long(history, LOSS_SERIES, has_run)}


def _curves_template(tau: float, has_run: bool, one_step: bool) -> alt.TopLevelMixin:
    n = 1 if one_step else 2
    left = _panel("fractions", FRAC_SERIES, has_run, n, f"tokens above τ = {tau} and argmax correct", unit_y=True)
    right = _panel("losses", LOSS_SERIES, has_run, n, "loss and ΔL (nats/token)", unit_y=False)
    return alt.hconcat(left, right).resolve_scale(color="independent", strokeDash="independent")


def curves_chart(history: pd.DataFrame, tau: float, mark_step: int | None = None) -> alt.Chart:
    """Two panels against step: share of tokens above tau / argmax correct (y in [0, 1]), and loss / ΔL.

    A `run` column, when present, separates runs by stroke dash so two methods can be compared on one chart.
    mark_step: a step to mark with a vertical rule in both panels (the step a replay shows)."""
    chart = _curves_template(*curves_args(history, tau))
    if mark_step is not None:
        rule = alt.Chart(pd.DataFrame({"step": [mark_step]})).mark_rule(color="#444", strokeWidth=2).encode(
            x="step:Q", tooltip=[alt.Tooltip("step:Q", title="shown step")])
        chart = alt.hconcat(*(alt.layer(panel, rule) for panel in chart.hconcat)).resolve_scale(
            color="independent", strokeDash="independent")
    return _with_data(chart, curves_frames(history))


def histogram_args(tau: float, bins: int = 20) -> tuple:
    """What the histogram's layout depends on: tau and the number of bins."""
    if bins < 1:
        raise ValueError(f"histogram_chart: bins must be >= 1, got {bins}")
    return float(tau), int(bins)


def histogram_frames(p: Sequence[float], tau: float, bins: int = 20) -> dict[str, pd.DataFrame]:
    """The histogram's datasets: token counts per fixed bin of p on [0, 1] with their side of tau, and tau."""
    histogram_args(tau, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)  # fixed edges so bars stay put between live updates
    values = np.asarray(p, dtype=np.float64).ravel()
    values = np.clip(values[~np.isnan(values)], 0.0, 1.0)  # float noise past 1.0 would otherwise be dropped
    counts, _ = np.histogram(values, bins=edges)
    mid = (edges[:-1] + edges[1:]) / 2
    return {"bins": pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "tokens": counts.astype(int), "zero": 0,
                                  "side": np.where(mid > tau, "above τ", "below τ")}),
            "tau": pd.DataFrame({"tau": [float(tau)]})}


def _histogram_template(tau: float, bins: int) -> alt.TopLevelMixin:
    bars = alt.Chart(alt.NamedData("bins")).mark_bar().encode(
        x=alt.X("lo:Q", title="p(correct token)", scale=alt.Scale(domain=[0, 1])),
        x2="hi:Q",
        y=alt.Y("tokens:Q", title="tokens", axis=alt.Axis(format="d", tickMinStep=1)),
        y2="zero:Q",  # with a ranged x, a bar needs its baseline spelled out or it is drawn as a sliver
        color=alt.Color("side:N", title=None, scale=alt.Scale(domain=["below τ", "above τ"], range=[RED, BLUE])),
        tooltip=[alt.Tooltip("lo:Q", title="p from", format=".2f"), alt.Tooltip("hi:Q", title="p to", format=".2f"),
                 alt.Tooltip("tokens:Q", title="tokens")],
    )
    rule = alt.Chart(alt.NamedData("tau")).mark_rule(color="black", strokeDash=[4, 3]).encode(x="tau:Q")
    return alt.layer(bars, rule).properties(title=f"token probabilities (τ = {tau})", height=220)


def histogram_chart(p: Sequence[float], tau: float, bins: int = 20) -> alt.Chart:
    """Histogram of p(correct token) over fixed edges on [0, 1], bars red below tau and blue above, with a rule \
at tau."""
    return _with_data(_histogram_template(*histogram_args(tau, bins)), histogram_frames(p, tau, bins))


def _matrix(x, n_rows: int, name: str, dtype=np.float64) -> np.ndarray:
    """x as an [S, N] array whose S matches the number of steps (a single 1-D row is accepted for one step)."""
    m = np.asarray(x, dtype=dtype)
    if m.ndim == 1 and n_rows == 1:
        m = m[None, :]
    if m.ndim == 1 and m.size == 0:
        m = m.reshape(0, 0)
    if m.ndim != 2 or m.shape[0] != n_rows:
        raise ValueError(f"{name} has shape {m.shape} but there are {n_rows} steps")
    return m


def _token_label(i: int, piece: Piece | str, limit: int = 20) -> str:
    label = f"#{i} {_as_piece(piece).label!r}"
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _place_label(place: str, piece: Piece | str, limit: int = 32) -> str:
    tail = f" {_as_piece(piece).label!r}"
    room = max(limit - len(tail), 8)
    return (place if len(place) <= room else place[: room - 1] + "…") + tail


def trajectories_args(steps: Sequence[int], indices: Sequence[int], labels: Sequence[Piece | str], tau: float,
                      token_ids: Sequence[int] | None = None, places: Sequence[str] | None = None) -> tuple:
    """What the trajectories chart's layout depends on: tau, the lines' names (their order), one step. `places`
    names where each token sits when "#index" would not (an entry of a PhoneBook: "#3 Ann Lee, tok 2")."""
    if len(labels) != len(indices):
        raise ValueError(f"trajectories_chart: len(indices)={len(indices)} but len(labels)={len(labels)}")
    if places is not None:
        names = [_place_label(pl, lab) for pl, lab in zip(places, labels)]
        return float(tau), tuple(names), len(steps) <= 1
    names = [_token_label(int(t), lab) for t, lab in zip(token_ids if token_ids is not None else indices, labels)]
    return float(tau), tuple(names), len(steps) <= 1


def trajectories_frames(steps: Sequence[int], p_history: np.ndarray, indices: Sequence[int],
                        names: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The trajectories chart's datasets: (step, p, token) per selected column of p_history [S, N], and tau."""
    if len(indices) == 0:
        return {}
    ph = _matrix(p_history, len(steps), "p_history")
    step_col = np.asarray(steps, dtype=np.int64)
    # no steps yet: empty lines rather than indexing columns of an empty matrix
    return {"lines": pd.concat([pd.DataFrame({"step": step_col, "p": ph[:, int(i)] if len(step_col) else np.empty(0),
                                              "token": name})
                                for i, name in zip(indices, names)], ignore_index=True)}


def _trajectories_template(tau: float, names: tuple[str, ...], one_step: bool) -> alt.TopLevelMixin:
    if not names:
        return alt.Chart(pd.DataFrame({"text": ["no stubborn tokens"]})).mark_text(size=14).encode(
            text="text:N").properties(title="stubborn tokens", height=220)
    lines = _line_mark(alt.Chart(alt.NamedData("lines")), 1 if one_step else 2).encode(
        x=alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("p:Q", title="p(correct token)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("token:N", title="token", sort=list(names), legend=alt.Legend(labelLimit=260)),
        tooltip=["token:N", "step:Q", alt.Tooltip("p:Q", format=".3f")],
    )
    rule = alt.Chart(pd.DataFrame({"tau": [float(tau)]})).mark_rule(color="black", strokeDash=[4, 3]).encode(y="tau:Q")
    return alt.layer(lines, rule).properties(title=f"stubborn tokens vs τ = {tau}", height=220)


def trajectories_chart(steps: Sequence[int], p_history: np.ndarray, indices: Sequence[int],
                       labels: Sequence[Piece | str], tau: float, token_ids: Sequence[int] | None = None,
                       places: Sequence[str] | None = None) -> alt.Chart:
    """p(correct token) over steps for the selected columns `indices` of p_history [S, N] (one line each), with
    a rule at tau. Lines are named '#i piece', i being token_ids[k] if given (p_history holds only the selected
    tokens' columns), else the column index; or 'place piece' where `places` names each (trajectories_args)."""
    args = trajectories_args(steps, indices, labels, tau, token_ids, places=places)
    frames = trajectories_frames(steps, p_history, indices, args[1])
    template = _trajectories_template(*args)
    return _with_data(template, frames) if frames else template


TEMPLATES = {"curves": _curves_template, "histogram": _histogram_template, "trajectories": _trajectories_template}


# --- memory law -------------------------------------------------------------------------------------------------


def law_grid(predict, ranks: Sequence[float], lengths: Sequence[float], n: int = 40) -> pd.DataFrame:
    """Cells of the fitted surface on log-spaced rank × length axes, padded by a factor 1.4 beyond the points: each
    cell's edges and predicted ΔL. The padding stops at rank 1 when every rank is whole (1 or more): no adapter has
    rank 0.7, so no cell (or tooltip) offers one; points at rank 1 then sit on the chart's left edge."""
    r_edges = np.geomspace(max(min(ranks) / 1.4, 1.0) if min(ranks) >= 1 else min(ranks) / 1.4, max(ranks) * 1.4,
                           n + 1)
    l_edges = np.geomspace(min(lengths) / 1.4, max(lengths) * 1.4, n + 1)
    rc, lc = np.sqrt(r_edges[:-1] * r_edges[1:]), np.sqrt(l_edges[:-1] * l_edges[1:])  # geometric centres
    R, L = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    R, L = R.ravel(), L.ravel()
    return pd.DataFrame({"r_lo": r_edges[R], "r_hi": r_edges[R + 1], "l_lo": l_edges[L], "l_hi": l_edges[L + 1],
                         "rank": rc[R], "length": lc[L], "delta_loss": np.asarray(predict(rc[R], lc[L]), dtype=float)})


def law_surface_chart(grid: pd.DataFrame, observed: pd.DataFrame, title: str, bands: int = 9,
                      ceiling: float | None = None) -> alt.Chart:
    """The fitted surface as a banded heatmap over log rank × log length, with observed runs as points on the
    same colour scale (tooltip: observed, predicted, residual). observed needs rank, length, delta_loss,
    predicted and kind ('sweep', 'your runs', 'this session'); the last two are drawn larger.

    ceiling: the most ΔL the data reach (nats per token; a saturated run's ΔL is its base loss). Cells the
    law predicts beyond it are drawn grey, as saturated, instead of extending the colours to values no run has."""
    # the colours span the surface and the sweep's own points: a user's run far off the grid is drawn in the end
    # colour (its tooltip keeps the value) instead of stretching the scale until the surface is one colour
    sweep = observed[observed["kind"] == "sweep"] if len(observed) else observed
    # the axes span the whole grid, grey cells included (taken after the split below they stopped at the coloured
    # cells, and the axis ticks under the grey went missing)
    xs = alt.Scale(type="log", domain=[float(grid.r_lo.min()), float(grid.r_hi.max())], nice=False)
    ys = alt.Scale(type="log", domain=[float(grid.l_lo.min()), float(grid.l_hi.max())], nice=False)
    beyond = grid[grid.delta_loss > ceiling] if ceiling is not None else grid.iloc[:0]
    grid = grid[grid.delta_loss <= ceiling] if ceiling is not None else grid
    lo = float(np.nanmin([grid.delta_loss.min() if len(grid) else np.inf,
                          sweep.delta_loss.min() if len(sweep) else np.inf]))
    hi = float(np.nanmax([grid.delta_loss.max() if len(grid) else -np.inf,
                          sweep.delta_loss.max() if len(sweep) else -np.inf]))
    color = alt.Scale(type="quantize", domain=[lo, hi], scheme="viridis", nice=False, zero=False)
    # ticks a reader can use: whole ranks (powers of two, as LoRA ranks go; no 0.8 from the padding below rank 1)
    # and round lengths
    r_ticks = rank_ticks(float(xs.domain[0]), float(xs.domain[1]))
    heat = alt.Chart(grid).mark_rect(opacity=0.9).encode(
        x=alt.X("r_lo:Q", scale=xs, title="adapter rank r (log)", axis=alt.Axis(values=r_ticks, format="d")),
        x2="r_hi:Q",
        y=alt.Y("l_lo:Q", scale=ys, title="target tokens ℓ (log)",
                axis=alt.Axis(values=log_ticks(float(ys.domain[0]), float(ys.domain[1]), most=6), format=".3~g",
                              labelOverlap=False)),
        y2="l_hi:Q",
        color=alt.Color("delta_loss:Q", scale=color, title="ΔL (nats/token)",
                        legend=alt.Legend(format=".2f", tickCount=bands)),
        tooltip=[alt.Tooltip("rank:Q", format=".1f"), alt.Tooltip("length:Q", title="length (tokens)", format=".0f"),
                 alt.Tooltip("delta_loss:Q", title="fitted ΔL", format=".3f")])
    layers = [heat]
    if len(beyond):
        layers.append(alt.Chart(beyond.assign(state=f"beyond the data's ΔL ({ceiling:.2f}): saturated")).mark_rect(
            color="#d9d9d9", opacity=0.9).encode(
            x=alt.X("r_lo:Q", scale=xs), x2="r_hi:Q", y=alt.Y("l_lo:Q", scale=ys), y2="l_hi:Q",
            # its own legend entry, under the plot, so the grey is named on the chart and not only in a caption
            color=alt.Color("state:N", scale=alt.Scale(range=["#d9d9d9"]),
                            legend=alt.Legend(title=None, orient="bottom", symbolType="square", labelLimit=0)),
            tooltip=[alt.Tooltip("rank:Q", format=".1f"),
                     alt.Tooltip("length:Q", title="length (tokens)", format=".0f"),
                     alt.Tooltip("delta_loss:Q", title="fitted ΔL (not reached)", format=".3f"),
                     alt.Tooltip("state:N", title="there")]))
    if len(observed):
        obs = observed.assign(residual=observed.delta_loss - observed.predicted)
        # below the plot: beside the ΔL bar it is cut off
        legend = alt.Legend(title="runs", orient="bottom", direction="horizontal")
        # the legend lists only the kinds drawn (no 'your runs' before there are any)
        looks = {"sweep": (110, "circle"), "your runs": (220, "diamond"), "this session": (360, "triangle-up")}
        drawn = [k for k in looks if k in set(obs["kind"])]
        # a discrete size scale is a point scale, whose range Vega reads as [start, stop]: one size alone has no stop
        # and draws every point (and its legend symbol) at size NaN, so a lone kind gets [size, size]
        sizes = [looks[k][0] for k in drawn] * (2 if len(drawn) == 1 else 1)
        size = alt.Size("kind:N", scale=alt.Scale(domain=drawn, range=sizes), legend=legend)
        shape = alt.Shape("kind:N", scale=alt.Scale(domain=drawn, range=[looks[k][1] for k in drawn]), legend=legend)
        layers.append(alt.Chart(obs).mark_point(filled=True, stroke="black", strokeWidth=0.8, opacity=1).encode(
            x=alt.X("rank:Q", scale=xs), y=alt.Y("length:Q", scale=ys),
            color=alt.Color("delta_loss:Q", scale=color, legend=None),
            size=size, shape=shape,
            tooltip=[alt.Tooltip("kind:N", title="point"), "rank:Q", alt.Tooltip("length:Q", title="length (tokens)"),
                     alt.Tooltip("delta_loss:Q", title="observed ΔL", format=".3f"),
                     alt.Tooltip("predicted:Q", title="fitted ΔL", format=".3f"),
                     alt.Tooltip("residual:Q", title="observed − fitted", format="+.3f")]))
    chart = alt.layer(*layers).properties(title=title, height=360)
    return chart.resolve_scale(color="independent") if len(beyond) else chart


def rank_ticks(low: float, high: float) -> list[int]:
    """Whole-number ticks for a log rank axis from `low` to `high`: the powers of two inside (1, 2, 4, 8, ...), or
    every whole rank when fewer than three powers of two fit (ranks 1-5: 1, 2, 3, 4, 5)."""
    powers = [2 ** k for k in range(0, 20) if low <= 2 ** k <= high]
    return powers if len(powers) >= 3 else [k for k in range(max(1, math.ceil(low)), math.floor(high) + 1)]


def log_ticks(low: float, high: float, most: int = 8) -> list[float]:
    """Round tick values (1, 1.5, 2, 3, 4, 5, 6, 8 × a power of ten) between low and high (> 0) for a log axis,
    thinned to at most `most`, the top one kept, so the axis is labelled up to its data."""
    steps = (1, 1.5, 2, 3, 4, 5, 6, 8)
    k0, k1 = math.floor(math.log10(low)), math.ceil(math.log10(high))
    vals = [round(m * 10 ** k, 10) for k in range(k0, k1 + 1) for m in steps if low <= m * 10 ** k <= high]
    while len(vals) > most:
        vals = vals[::-1][::2][::-1]  # every other one, counted from the top
    return vals


def law_slices_chart(observed: pd.DataFrame, curves: pd.DataFrame, title: str,
                     ceiling: float | None = None) -> alt.Chart:
    """ΔL against length on log–log axes, one colour per rank: observed points and fitted curves (the curves cut
    at `ceiling`, the most ΔL the data reach, where the law's form runs on past saturation)."""
    obs = observed[observed.delta_loss > 0]
    cur = curves[(curves.delta_loss > 0) & (curves.delta_loss <= (ceiling if ceiling is not None else np.inf))]
    # the axes span the data (not rounded out to powers of ten, which left the points in a corner), with room at
    # each end and labelled ticks up to the top (a log axis labels only its round values: 6-10 under points at 14)
    shown = pd.concat([obs["delta_loss"], cur["delta_loss"]]).astype(float)
    low, high = (float(shown.min()) / 1.12, float(shown.max()) * 1.12) if len(shown) else (0.1, 10.0)
    ticks = log_ticks(low, high)
    lengths = pd.concat([obs["length"], cur["length"]]).astype(float)
    left, right = (float(lengths.min()) / 1.08, float(lengths.max()) * 1.08) if len(lengths) else (1.0, 100.0)
    enc = dict(x=alt.X("length:Q", scale=alt.Scale(type="log", nice=False, domain=[left, right]),
                       title="target tokens ℓ (log)", axis=alt.Axis(format=".3~g", values=log_ticks(left, right))),
               y=alt.Y("delta_loss:Q", scale=alt.Scale(type="log", nice=False, domain=[low, high]),
                       title="ΔL (nats/token, log)", axis=alt.Axis(format=".3~g", values=ticks)),
               color=alt.Color("rank:O", title="rank", scale=alt.Scale(scheme="viridis")))
    lines = alt.Chart(cur).mark_line().encode(**enc)
    pts = alt.Chart(obs).mark_point(filled=True, size=60).encode(
        **enc, tooltip=["rank:Q", alt.Tooltip("length:Q", title="length (tokens)"),
                       alt.Tooltip("delta_loss:Q", title="observed ΔL (nats/token)", format=".3f")])
    return alt.layer(lines, pts).properties(title=title, height=300)


def frontier_layer(ranks: Sequence[float], ell_star: Sequence[float], grid: pd.DataFrame,
                   lo: Sequence[float] | None = None, hi: Sequence[float] | None = None) -> alt.Chart:
    """The verbatim-recall frontier ℓ*(r) drawn over law_surface_chart's axes (a white line, its interval as a
    band): below it the fitted frontier predicts verbatim recall, above it not."""
    xs = alt.Scale(type="log", domain=[float(grid.r_lo.min()), float(grid.r_hi.max())], nice=False)
    ys = alt.Scale(type="log", domain=[float(grid.l_lo.min()), float(grid.l_hi.max())], nice=False)
    ys_clip = (float(grid.l_lo.min()), float(grid.l_hi.max()))
    df = pd.DataFrame({"rank": list(ranks), "ell_star": np.clip(list(ell_star), *ys_clip)})
    layers = []
    if lo is not None and hi is not None:
        band = df.assign(lo=np.clip(list(lo), *ys_clip), hi=np.clip(list(hi), *ys_clip))
        layers.append(alt.Chart(band).mark_area(opacity=0.25, color="white").encode(
            x=alt.X("rank:Q", scale=xs), y=alt.Y("lo:Q", scale=ys), y2="hi:Q"))
    layers.append(alt.Chart(df).mark_line(color="white", strokeWidth=3, strokeDash=[6, 3]).encode(
        x=alt.X("rank:Q", scale=xs), y=alt.Y("ell_star:Q", scale=ys),
        tooltip=[alt.Tooltip("rank:Q", format=".1f"),
                 alt.Tooltip("ell_star:Q", title="frontier ℓ* (tokens)", format=".0f")]))
    return alt.layer(*layers)


def recall_heatmap(cells: pd.DataFrame, value: str, title: str, fmt: str = ".2f",
                   domain: tuple[float, float] | None = None, scheme: str = "viridis",
                   mine: pd.DataFrame | None = None) -> alt.Chart:
    """One sweep quantity over rank × length as labelled cells (ordinal axes, as the paper draws its heatmaps).
    cells: rank, length and `value` (the seed mean). mine: the user's runs (rank, length, value, label) drawn as
    black-ringed diamonds on the cell nearest in log rank and log length."""
    scale = alt.Scale(scheme=scheme, domain=list(domain) if domain else alt.Undefined)
    x = alt.X("rank:O", title="rank r", sort="ascending", axis=alt.Axis(labelAngle=0))
    y = alt.Y("length:O", title="target tokens ℓ", sort="descending",
              axis=alt.Axis(labelOverlap=False))  # every row named: a reader should not count rows
    base = alt.Chart(cells)
    tips = ["rank:O", alt.Tooltip("length:O", title="target tokens"),
            alt.Tooltip(f"{value}:Q", title=title, format=fmt)]
    heat = base.mark_rect().encode(x=x, y=y, color=alt.Color(f"{value}:Q", scale=scale, title=None, legend=None),
                                   tooltip=tips)
    text = base.mark_text(fontSize=12).encode(
        x=x, y=y, text=alt.Text(f"{value}:Q", format=fmt), tooltip=tips,
        color=alt.condition(alt.datum[value] > ((domain[0] + domain[1]) / 2 if domain else cells[value].median()),
                            alt.value("black"), alt.value("white")))
    layers = [heat, text]
    if mine is not None and len(mine) and value in mine:
        rr, ll = (np.array(sorted(cells[c].unique()), float) for c in ("rank", "length"))
        mine = mine.assign(run_rank=mine["rank"], run_length=mine["length"],
                           rank=[rr[np.argmin(abs(np.log(rr) - np.log(x)))] for x in mine["rank"]],
                           length=[ll[np.argmin(abs(np.log(ll) - np.log(x)))] for x in mine["length"]])
        # left of the cell's number, on its row's middle: inside the cell however short the rows are
        layers.insert(1, alt.Chart(mine).mark_point(shape="diamond", size=110, stroke="black", strokeWidth=1.5,
                                                    fill="white", filled=True, opacity=1, xOffset=-34,
                                                    yOffset=0).encode(
            x=x, y=y, tooltip=["label:N", alt.Tooltip("run_rank:Q", title="its rank"),
                               alt.Tooltip("run_length:Q", title="its tokens"),
                               alt.Tooltip(f"{value}:Q", title="its value", format=fmt)]))
    return alt.layer(*layers).properties(title=title, height=240)


def capacity_chart(per_rank: pd.DataFrame, references: dict[str, float]) -> alt.Chart:
    """Bits per trainable parameter at the verbatim frontier, by rank (markers: measured and fitted, one shape per
    method), against reference capacities (dashed lines), on one y scale.
    per_rank: rank, bits_per_param, kind ("<method> fitted" / "<method> interpolated"). Each kind is drawn a
    little apart in rank (×0.94 … ×1.06; the tooltip keeps the true rank), so methods that tie stand side by side
    instead of one hiding the other."""
    ranks = sorted(per_rank["rank"].unique())
    kinds = list(dict.fromkeys(per_rank["kind"]))
    nudge = {k: 1.06 ** (i - (len(kinds) - 1) / 2) for i, k in enumerate(kinds)}
    methods = [k.split()[0] for k in per_rank["kind"]]
    per_rank = per_rank.assign(drawn=[r * nudge[k] for r, k in zip(per_rank["rank"], per_rank["kind"])],
                               method=methods, bits_per_param=per_rank["bits_per_param"].astype(float))
    lo_r, hi_r = float(min(ranks)) / 1.15, float(max(ranks)) * 1.15
    refs = pd.DataFrame([{"drawn": r, "bits_per_param": float(v), "kind": f"{v:g} bits/param: {k}"}
                         for k, v in references.items() for r in (lo_r, hi_r)])
    top = float(max(per_rank["bits_per_param"].max() * 1.1, max(references.values(), default=0) * 1.1, 4.0))
    x = alt.X("drawn:Q", scale=alt.Scale(type="log", nice=False, domain=[lo_r, hi_r]),
              axis=alt.Axis(values=[float(r) for r in ranks], format="d"), title="rank r (log)")
    y = alt.Y("bits_per_param:Q", scale=alt.Scale(domain=[0, top]), title="bits / parameter")
    # at the side: a bottom legend eats the height
    ref_kinds = list(dict.fromkeys(refs["kind"]))
    def kind_colour(kind: str) -> str:
        method, how = (kind.split() + [""])[:2]
        return (METHOD_COLOURS if how != "interpolated" else METHOD_LIGHT).get(method, "#9467bd")

    color = alt.Color("kind:N", title=None, legend=alt.Legend(labelLimit=360),
                      scale=alt.Scale(domain=[*kinds, *ref_kinds],
                                      range=[kind_colour(k) for k in kinds] + ["#444444", "#8c6d31"][:len(ref_kinds)]))
    shapes = {"sft": "square", "memft-ot": "circle", "memft-sw": "triangle-up"}
    shape = alt.Shape("kind:N", legend=None, scale=alt.Scale(
        domain=[*kinds, *ref_kinds], range=[shapes.get(k.split()[0], "diamond") for k in kinds] + ["stroke"] *
        len(ref_kinds)))
    # the references told apart by dash as well as shade, and each named on the chart over its line's left end
    dashes = alt.StrokeDash("kind:N", legend=None, scale=alt.Scale(
        domain=ref_kinds, range=[[6, 4], [2, 3], [10, 3, 2, 3]][:len(ref_kinds)]))
    lines = alt.Chart(refs).mark_line().encode(x=x, y=y, color=color, strokeDash=dashes,
                                               tooltip=[alt.Tooltip("kind:N", title="reference")])
    names = alt.Chart(refs[refs["drawn"] == lo_r]).mark_text(align="left", baseline="bottom", dx=4, dy=-2,
                                                               fontSize=11, color="#444").encode(
        x=x, y=y, text="kind:N")
    marks = alt.Chart(per_rank).mark_point(filled=True, size=90, opacity=0.9).encode(
        x=x, y=y, color=color, shape=shape,
        tooltip=[alt.Tooltip("kind:N", title="method"), "rank:Q",
                 alt.Tooltip("bits_per_param:Q", title="bits per parameter", format=".3f")])
    return alt.layer(lines, names, marks).properties(title="capacity at the verbatim-recall frontier", height=280)




def frontier_brackets_chart(brackets: pd.DataFrame, runs: pd.DataFrame | None = None) -> alt.Chart:
    """Verbatim-recall frontiers as brackets per rank, one colour per source (a search, a shipped sweep): a bar from
    the longest length recalled (lo) to the shortest not recalled (hi), and a point at ℓ* between them. brackets:
    rank, lo, hi, ell_star (tokens), source; lo or hi may be missing (an open end is drawn to the point alone,
    a triangle pointing the way the frontier may still lie; a bracket with neither end is left out). Log axes,
    sources nudged apart in rank so that equal brackets both show. runs (optional): a user's runs placed against
    the brackets, columns rank, length (target tokens), label and recalled (bool): a filled black diamond when
    recalled verbatim, a hollow one when not. Optional fitted_lo, fitted_hi: the 95% interval of a fitted ℓ*
    (ell_star then being the fit's, which may lie outside a narrow bracket where an end's seeds split), drawn as a
    thin line just right of the bracket."""
    df = brackets.copy()
    df["ell_star"] = df["ell_star"].fillna(df["lo"]).fillna(df["hi"])
    df = df[df["ell_star"].notna()]
    sources = list(dict.fromkeys(df["source"]))
    nudge = {s: 1.06 ** (i - (len(sources) - 1) / 2) for i, s in enumerate(sources)}
    df["x"] = [r * nudge[s] for r, s in zip(df["rank"], df["source"])]
    df["lo_y"] = df["lo"].fillna(df["ell_star"])
    df["hi_y"] = df["hi"].fillna(df["ell_star"])
    # a user's runs at ranks the brackets lack widen the axis rather than fall off it
    ranks = sorted({float(r) for r in df["rank"]} | ({float(r) for r in runs["rank"]} if runs is not None else set()))
    xscale = alt.Scale(type="log", domain=[ranks[0] / 1.4, ranks[-1] * 1.4], nice=False)
    x = alt.X("x:Q", scale=xscale, title="rank r", axis=alt.Axis(values=ranks, grid=False))
    shown = [*df["lo_y"], *df["hi_y"], *(runs["length"] if runs is not None and len(runs) else []),
             *[v for c in ("fitted_lo", "fitted_hi") if c in df for v in df[c].dropna()]]
    grid = sorted({b * 2 ** k for b in (1, 1.5) for k in range(24)})
    least, most = float(min(shown)), float(max(shown))
    # the data's span, not a decade's, reaching out to a labelled tick on either side of every bracket end
    low = min(least / 1.25, max((v for v in grid if v <= least), default=least / 1.25))
    high = max(most * 1.25, min((v for v in grid if v >= most), default=most * 1.25))
    span = alt.Scale(type="log", domain=[low, high], nice=False)
    ticks = [v for v in grid if low <= v <= high]
    y = alt.Y("ell_star:Q", scale=span, title="ℓ* (tokens, log)", axis=alt.Axis(values=ticks, grid=False))
    spare = iter(c for c in ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
                 if c not in {METHOD_COLOURS.get(s) for s in sources})
    palette = [METHOD_COLOURS.get(s) or next(spare, "#7f7f7f") for s in sources]  # a method keeps its colour
    color = alt.Color("source:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=400),
                      scale=alt.Scale(domain=sources, range=palette))
    tips = ["source:N", "rank:Q", alt.Tooltip("lo:Q", title="longest recalled"),
            alt.Tooltip("hi:Q", title="shortest not recalled"), alt.Tooltip("ell_star:Q", title="ℓ*", format=".1f")]
    bars = alt.Chart(df).mark_rule(strokeWidth=3).encode(
        x=x, y=alt.Y("lo_y:Q", scale=span, axis=alt.Axis(values=ticks, grid=False)), y2="hi_y:Q",
        color=color, tooltip=tips)
    # a cap at each known end, as on an error bar: a bracket placed within a few percent is shorter than the
    # point at ℓ*, and its ends would otherwise hide under it
    ends = pd.concat([df[df["lo"].notna()].assign(end_y=df["lo"], end="longest recalled"),
                      df[df["hi"].notna()].assign(end_y=df["hi"], end="shortest not recalled")])
    caps = alt.Chart(ends).mark_tick(orient="horizontal", thickness=2, size=16).encode(
        x=x, y=alt.Y("end_y:Q", scale=span, axis=alt.Axis(values=ticks, grid=False)), color=color,
        tooltip=tips + ["end:N"])
    fitted = {"fitted_lo", "fitted_hi"} <= set(df.columns) and df["fitted_lo"].notna().any()
    kinds = ["fitted ℓ* (thin line: its 95% interval)" if fitted else "ℓ* between the ends",
             "at least (nothing failed yet)", "at most (nothing recalled yet)"]
    df["bound"] = [kinds[0] if pd.notna(lo) and pd.notna(hi) else kinds[1] if pd.notna(lo) else kinds[2]
                   for lo, hi in zip(df["lo"], df["hi"])]
    marks = dict(zip(kinds, ["circle", "triangle-up", "triangle-down"]))
    drawn = [k for k in kinds if k in set(df["bound"])]  # the legend names only the shapes on the chart
    shape = alt.Shape("bound:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=400),
                      scale=alt.Scale(domain=drawn, range=[marks[k] for k in drawn]))
    points = alt.Chart(df).mark_point(filled=True, size=50).encode(x=x, y=y, color=color, shape=shape,
                                                                   tooltip=tips + ["bound:N"])
    layers = [bars, caps, points]
    if fitted:
        fit = df[df["fitted_lo"].notna() & df["fitted_hi"].notna()].assign(
            x_fit=lambda d: d["x"] * 1.035)  # beside the bracket, not over it
        layers.insert(0, alt.Chart(fit).mark_rule(strokeWidth=1.2).encode(
            x=alt.X("x_fit:Q", scale=xscale, title="rank r", axis=alt.Axis(values=ranks, grid=False)),
            y=alt.Y("fitted_lo:Q", scale=span, axis=alt.Axis(values=ticks, grid=False)), y2="fitted_hi:Q",
            color=color, tooltip=tips + [alt.Tooltip("fitted_lo:Q", title="fitted ℓ* 95% lo", format=".1f"),
                                         alt.Tooltip("fitted_hi:Q", title="fitted ℓ* 95% hi", format=".1f")]))
    if runs is not None and len(runs):
        # a run of a method the chart draws sits beside that method's bracket, outlined in its colour
        method = runs["method"] if "method" in runs else pd.Series([None] * len(runs), index=runs.index)
        mine = runs.assign(x=[float(r) * nudge.get(m, 1.0) for r, m in zip(runs["rank"], method)],
                           ell_star=runs["length"].astype(float), method=method.fillna("other"),
                           how=["recalled verbatim" if bool(r) else "not recalled" for r in runs["recalled"]])
        kinds_mine = list(dict.fromkeys(mine["method"]))
        outline = alt.Stroke("method:N", legend=None, scale=alt.Scale(
            domain=kinds_mine, range=[palette[sources.index(m)] if m in sources else "black" for m in kinds_mine]))
        layers.append(alt.Chart(mine).mark_point(shape="diamond", size=120, strokeWidth=2.5).encode(
            x=x, y=y, stroke=outline,
            fill=alt.Fill("how:N", title="your runs", legend=alt.Legend(orient="right", labelLimit=400),
                          scale=alt.Scale(domain=["recalled verbatim", "not recalled"], range=["black", "white"])),
            tooltip=[alt.Tooltip("label:N", title="run"), alt.Tooltip("method:N", title="method"), "rank:Q",
                     alt.Tooltip("length:Q", title="target tokens"), alt.Tooltip("how:N", title="recall")]))
    return alt.layer(*layers).properties(height=320)


def edge_numbers(mean: float, lo: float, hi: float) -> str:
    """'+m [lo, hi]' written at a paired chart's edge, all three in the same decimals (none from 1,000 up, one from
    1, three below), true minus signs; '+m (one seed, no interval)' where the interval is missing."""
    finite = np.isfinite(lo) and np.isfinite(hi)
    top = max(abs(x) for x in ((mean, lo, hi) if finite else (mean,)))
    k = 0 if top >= 1000 else 1 if top >= 1 else 3
    return (f"{mean:+.{k}f} [{lo:+.{k}f}, {hi:+.{k}f}]" if finite else
            f"{mean:+.{k}f} (one seed, no interval)").replace("-", "−")


def paired_chart(paired: pd.DataFrame, measure: str, title: str, least_span: float = 1.0) -> alt.Chart:
    """One measure's paired differences (method − baseline on the same seeds) as a point at the mean with its 95%
    interval, one row per (method, rank, length) cell, a rule at 0; coloured by verdict (wins green, loses red,
    tie grey, one seed light grey, no interval drawn). paired: memcore.frontier.paired_differences rows (method,
    rank, length, measure, mean, lo, hi, n, verdict; optional where, and pooled: True for a row that pools the
    cell's seeds with a spot re-run's, drawn as a diamond and never dashed for its extra seeds). least_span: the
    axis reaches at least this far either side of 0 (in the measure's units), so cells that all differ by 0 sit on
    a scale that says how small that is."""
    d = paired[paired["measure"] == measure].copy()
    d["pooled"] = d["pooled"].astype(bool) if "pooled" in d else False
    where = d["where"].astype(str) if "where" in d else pd.Series([""] * len(d), index=d.index)
    d["cell"] = [f"{m} · r{r} · ℓ={ell}" + (f" ({w})" if w else "")
                 for m, r, ell, w in zip(d["method"], d["rank"], d["length"], where)]
    d[["lo", "hi"]] = d[["lo", "hi"]].astype(float)
    palette = {"wins": "#2ca02c", "tie": "#7f7f7f", "loses": "#d62728", "one seed": "#c7c7c7"}
    verdicts = [v for v in palette if v in set(d["verdict"])]  # the legend names only what is drawn
    color = alt.Color("verdict:N", title="against sft", legend=alt.Legend(orient="right"),
                      scale=alt.Scale(domain=verdicts, range=[palette[v] for v in verdicts]))
    y = alt.Y("cell:N", title=None, sort=list(d["cell"]), axis=alt.Axis(labelLimit=320))
    tips = ["cell:N", alt.Tooltip("mean:Q", format="+.3f"), alt.Tooltip("lo:Q", format="+.3f", title="95% lo"),
            alt.Tooltip("hi:Q", format="+.3f", title="95% hi"), alt.Tooltip("n:Q", title="seeds"), "verdict:N"]
    # the axis spans the cells with every seed: a cell of fewer seeds (paired only where both methods recalled, or
    # a stage-2 cell still training) has an interval many times wider, which would squeeze the rest to a dot. Such
    # a cell is drawn up to the edge with an arrow there (the interval goes on), its mean at the edge as an open
    # point when the mean itself lies past it, and its numbers written beside the edge; the tooltip gives them all.
    own = d[~d["pooled"]]  # the benchmark's own seeds: the most of them sets what 'fewer seeds' means
    most = int(own["n"].max()) if len(own) else int(d["n"].max()) if len(d) else 0
    full = d[(d["n"] >= most) | d["pooled"]] if len(d) else d
    span = full[["mean", "lo", "hi"]].abs().max().max()
    span = max(float(span) * 1.1 if np.isfinite(span) and span > 0 else 0.0, least_span)
    d["lo_shown"], d["hi_shown"] = d["lo"].clip(-span, span), d["hi"].clip(-span, span)
    d["mean_shown"] = d["mean"].astype(float).clip(-span, span)
    scale = alt.Scale(domain=[-span, span], nice=False)
    x = alt.X("mean_shown:Q", title=title, scale=scale, axis=alt.Axis(tickCount=8))  # labels apart at any width
    zero = alt.Chart(pd.DataFrame({"mean_shown": [0.0]})).mark_rule(color="black", strokeDash=[4, 3]).encode(x=x)
    bars = alt.Chart(d[d["lo"].notna()]).mark_rule(strokeWidth=2, clip=True).encode(  # fewer seeds: dashed
        x=alt.X("lo_shown:Q", scale=scale, title=title), x2="hi_shown:Q", y=y, color=color, tooltip=tips,
        strokeDash=alt.condition(f"datum.n < {most} && !datum.pooled", alt.value([5, 4]), alt.value([1, 0])))
    past = d["mean"].astype(float).abs() > span
    marks = {"x": x, "y": y, "color": color, "tooltip": tips}
    if d["pooled"].any():  # a cell pooled with a spot re-run's seeds: a diamond
        marks["shape"] = alt.condition("datum.pooled", alt.value("diamond"), alt.value("circle"))
    points = alt.Chart(d[~past]).mark_point(filled=True, size=60, clip=True).encode(**marks)
    layers = [zero, bars, points]
    if past.any():  # a mean past the edge: an open point at the edge
        layers.append(alt.Chart(d[past]).mark_point(filled=False, size=60, strokeWidth=2, clip=False).encode(
            x=x, y=y, color=color, tooltip=tips))
    ends = pd.DataFrame([{**r, "edge": side * span, "arrow": shape} for r in d.to_dict("records")
                         for side, shape, beyond in ((-1, "triangle-left", r["lo"] < -span),
                                                     (1, "triangle-right", r["hi"] > span)) if beyond])
    if len(ends):
        layers.append(alt.Chart(ends).mark_point(filled=True, size=70, clip=False).encode(
            x=alt.X("edge:Q", scale=scale, title=title), y=y, color=color, tooltip=tips,
            shape=alt.Shape("arrow:N", scale=alt.Scale(domain=["triangle-left", "triangle-right"],
                                                       range=["triangle-left", "triangle-right"]), legend=None)))
        off = d[(d["lo"] < -span) | (d["hi"] > span) | past].copy()
        off["numbers"] = [edge_numbers(m, lo, hi) for m, lo, hi in zip(off["mean"], off["lo"], off["hi"])]
        left = off["mean"].astype(float) < -span  # written at the edge its mean lies past (else the right one)
        for side, rows in ((-1, off[left]), (1, off[~left])):
            if len(rows):
                layers.append(alt.Chart(rows.assign(at=side * span)).mark_text(
                    align="left" if side < 0 else "right", baseline="bottom", dx=-8 * side, dy=-3, fontSize=11,
                    color="#333").encode(x=alt.X("at:Q", scale=scale, title=title), y=y, text="numbers:N",
                                         tooltip=tips))
    # the height Streamlit fits the whole chart into (axis, its title and the four-line legend included)
    return alt.layer(*layers).properties(height=max(170, 30 * len(d) + 90))


def chain_chart(history: pd.DataFrame, events: pd.DataFrame | None = None, mark_step: int | None = None,
                title: str = "Each passage over the steps") -> alt.Chart:
    """Passages trained one after another (memcore.chain), each as a line of its tokens above τ (share, 0..1) and,
    under the lines, a band per passage that is blue while it is recalled verbatim (every teacher-forced argmax
    right). One chart (not a concatenation), so it takes the page's width.

    history: step, passage (its name), frac_above (0..1), recalled (bool), one row per passage and step measured.
    events: step, label: steps to mark with a dashed rule and their label (a passage losing or winning back
    verbatim recall, the next run starting). mark_step: a step to mark with a solid rule (the step a replay shows)."""
    d = history.sort_values(["passage", "step"]).copy()
    d["recalled"] = d["recalled"].astype(bool)
    d["recall"] = np.where(d["recalled"], "recalled verbatim", "not recalled")
    gap = float(np.median(np.diff(np.unique(d["step"])))) if d["step"].nunique() > 1 else 1.0
    d["next"] = d.groupby("passage")["step"].shift(-1).fillna(d["step"] + gap)  # a band cell spans to the next step
    passages = list(dict.fromkeys(history["passage"]))
    band = 0.12  # each passage's recall band, under y = 0
    row = {p: i for i, p in enumerate(passages)}
    d["band_hi"] = [-0.03 - band * row[p] for p in d["passage"]]
    d["band_lo"] = d["band_hi"] - band * 0.8
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    color = alt.Color("passage:N", title=None, sort=passages, legend=alt.Legend(orient="bottom", labelLimit=400),
                      scale=alt.Scale(domain=passages, range=(palette * 4)[:len(passages)]))
    y_lo = -0.03 - band * len(passages)
    # the events' labels get a strip of their own above 1.0 (stacked up to 4 deep when steps are close), so they
    # do not sit on the lines of passages held at 1.0, and the top line does not run along the plot's edge
    levels = min(4, len(events)) if events is not None else 0
    y_scale = alt.Scale(domain=[y_lo, 1.04 + 0.07 * levels], nice=False)
    x = alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1))
    y = alt.Y("frac_above:Q", scale=y_scale, title="share above τ",  # short: a long title squeezes the plot
              axis=alt.Axis(values=[0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    lines = _line_mark(alt.Chart(d), d["step"].nunique()).encode(
        x=x, y=y, color=color, tooltip=["passage:N", "step:Q", alt.Tooltip("frac_above:Q", format=".3f",
                                                                           title="above τ"), "recall:N"])
    bands = alt.Chart(d).mark_rect().encode(
        x="step:Q", x2="next:Q", y=alt.Y("band_lo:Q", scale=y_scale), y2="band_hi:Q",
        fill=alt.Fill("recall:N", title=None, legend=alt.Legend(orient="bottom"),
                      scale=alt.Scale(domain=["recalled verbatim", "not recalled"], range=[BLUE, "#e6e6e6"])),
        tooltip=["passage:N", "step:Q", "recall:N"])
    names = pd.DataFrame({"passage": passages, "step": [d["step"].min()] * len(passages),
                          "y": [-0.03 - band * row[p] - band * 0.4 for p in passages]})
    labels = alt.Chart(names).mark_text(align="left", baseline="middle", dx=3, fontSize=10, color="#333").encode(
        x="step:Q", y=alt.Y("y:Q", scale=y_scale), text="passage:N", tooltip=alt.value(None))
    layers = [bands, labels, lines]
    if events is not None and len(events):
        ev = events.reset_index(drop=True).copy()
        ev["y"] = [1.03 + 0.07 * (i % levels) for i in range(len(ev))]  # the first lowest, later ones stacked up
        layers.append(alt.Chart(ev).mark_rule(strokeDash=[5, 3], color="#444").encode(
            x="step:Q", tooltip=[alt.Tooltip("label:N", title="event"), "step:Q"]))
        layers.append(alt.Chart(ev).mark_text(align="left", baseline="bottom", dx=4, fontSize=11, color="#222").encode(
            x="step:Q", y=alt.Y("y:Q", scale=y_scale), text="label:N",
            tooltip=[alt.Tooltip("label:N", title="event"), "step:Q"]))
    if mark_step is not None:
        layers.append(alt.Chart(pd.DataFrame({"step": [mark_step]})).mark_rule(color="#444", strokeWidth=2).encode(
            x="step:Q", tooltip=[alt.Tooltip("step:Q", title="shown step")]))
    return alt.layer(*layers).resolve_scale(color="independent").properties(
        height=380 + 24 * len(passages), title=title)  # the whole chart: title, axes and legends included


STRATEGY_COLORS = {"none": "#d62728", "keep-sft": "#1f77b4", "keep-memft-ot": "#2ca02c"}


def retention_chart(cells: pd.DataFrame, measure: str = "kept") -> alt.Chart:
    """A first passage's retention after a second one, against capacity: per strategy (colour) and rank (shape),
    `measure` (kept: share of its tokens above τ, with the seeds' least..most as a bar; recalled: share of seeds
    reciting it verbatim) against fill = (ℓ_A + ℓ_B)/ℓ*(r), a line through each strategy's points per rank, and a
    dashed rule at fill 1 (the verbatim-recall frontier). cells: memcore.chain_sweep.retention_against_capacity."""
    d = cells.sort_values(["strategy", "rank", "fill"]).copy()
    d["ranks"] = "r = " + d["rank"].astype(str)
    strategies = [s for s in STRATEGY_COLORS if s in set(d["strategy"])] + sorted(
        set(d["strategy"]) - set(STRATEGY_COLORS))
    # strategies often land on the same value (every seed recalled): each is drawn a little to the side of its fill
    # (the tooltip gives the true one) and with a dash of its own, so that none hides another
    nudge = {s: (i - (len(strategies) - 1) / 2) * 0.025 for i, s in enumerate(strategies)}
    d["shown_fill"] = d["fill"] + d["strategy"].map(nudge)
    color = alt.Color("strategy:N", title="strategy", sort=strategies,
                      legend=alt.Legend(orient="bottom", symbolType="circle", symbolStrokeWidth=0),
                      scale=alt.Scale(domain=strategies,
                                      range=[STRATEGY_COLORS.get(s, "#7f7f7f") for s in strategies]))
    top = max(2.0, float(d["fill"].max()) * 1.1)
    x = alt.X("shown_fill:Q", title="(ℓ_A + ℓ_B) / ℓ*(r): both passages against the frontier",
              scale=alt.Scale(domain=[0, top], nice=False))
    title = {"kept": "A's tokens still above τ", "recalled": "seeds still reciting A"}[measure]
    # a little room above 1 so the points of a passage kept whole are not cut by the plot's edge
    y_scale = alt.Scale(domain=[0, 1.06], nice=False)
    y_axis = alt.Axis(values=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    y = alt.Y(f"{measure}:Q", title=title, scale=y_scale, axis=y_axis)
    tips = ["strategy:N", "rank:Q", alt.Tooltip("first_length:Q", title="ℓ_A"),
            alt.Tooltip("second_length:Q", title="ℓ_B"), alt.Tooltip("fill:Q", format=".2f"),
            alt.Tooltip("kept:Q", format=".3f"), alt.Tooltip("recalled:Q", format=".2f"),
            alt.Tooltip("second_steps:Q", format=".0f", title="steps of the second"),
            alt.Tooltip("rehearsal:Q", format=".1%", title="rehearsal share"), "seeds:Q"]
    base = alt.Chart(d)
    dash = alt.StrokeDash("strategy:N", sort=strategies, legend=None,
                          scale=alt.Scale(domain=strategies, range=[[1, 0], [6, 3], [2, 2]][:len(strategies)]
                                          + [[4, 2, 1, 2]] * max(0, len(strategies) - 3)))
    layers = [base.mark_line(opacity=0.6).encode(x=x, y=y, color=color, strokeDash=dash, detail="ranks:N"),
              base.mark_point(filled=True, size=70).encode(
                  x=x, y=y, color=color, shape=alt.Shape("ranks:N", title="rank", legend=alt.Legend(orient="bottom")),
                  tooltip=tips)]
    if measure == "kept":
        spread = alt.Y("kept_lo:Q", scale=y_scale, axis=y_axis, title=title)  # the seeds' least..most as a bar
        layers.insert(0, base.mark_rule(opacity=0.5).encode(x=x, y=spread, y2="kept_hi:Q", color=color))
    front = pd.DataFrame({"shown_fill": [1.0], "label": ["frontier ℓ*(r)"]})
    layers.append(alt.Chart(front).mark_rule(strokeDash=[6, 4], color="#444").encode(x="shown_fill:Q",
                                                                                     tooltip=alt.value(None)))
    layers.append(alt.Chart(front).mark_text(align="center", dy=-8, color="#444").encode(
        x="shown_fill:Q", y=alt.value(0), text="label:N",  # above the plot, clear of the points
        tooltip=alt.value(None)))
    return alt.layer(*layers).properties(height=340, title=f"{title}, after the second passage")
