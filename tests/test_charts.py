"""Behaviour of the app's pure rendering helpers: token HTML (colours, markers, escaping) and Altair chart specs."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import charts
import numpy as np
import pandas as pd
import pytest

# ---------------------------------------------------------------------------
# helpers


class _Tokens(HTMLParser):
    """Collects every element start tag and, for each token span, its attributes and decoded text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.spans: list[dict] = []
        self._in_tok = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "span" and "mc-tok" in a.get("class", "").split():
            self.spans.append({"classes": a["class"].split(), "title": a.get("title", ""), "style": a.get("style", ""),
                               "text": "", "br": 0})
            self._in_tok = True
        elif tag == "br" and self._in_tok:
            self.spans[-1]["br"] += 1

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data):
        if self._in_tok:
            self.spans[-1]["text"] += data


def parse(html_text: str) -> _Tokens:
    parser = _Tokens()
    parser.feed(html_text)
    parser.close()
    return parser


def style_of(span: dict) -> dict[str, str]:
    return dict(part.split(":", 1) for part in span["style"].split(";") if part)


def data_of(spec: dict, sub: dict) -> list[dict]:
    return spec["datasets"][sub["data"]["name"]]


# ---------------------------------------------------------------------------
# prob_color / text colour


def test_prob_color_endpoints_and_centre():
    assert charts.prob_color(0.0, 0.5) == charts.RED == "#d7301f"
    assert charts.prob_color(0.5, 0.5) == charts.WHITE
    assert charts.prob_color(1.0, 0.5) == charts.BLUE == "#2166ac"
    # the centre follows tau, not 0.5
    assert charts.prob_color(0.9, 0.9) == charts.WHITE
    assert charts.prob_color(0.5, 0.9) != charts.WHITE


def test_prob_color_is_linear_on_each_side():
    # halfway between 0 and tau is halfway between red and white, per channel
    mid = charts.prob_color(0.25, 0.5)
    assert re.fullmatch(r"#[0-9a-f]{6}", mid)
    for k in (1, 3, 5):
        lo, hi, got = int(charts.RED[k:k + 2], 16), int(charts.WHITE[k:k + 2], 16), int(mid[k:k + 2], 16)
        assert abs(got - (lo + hi) / 2) <= 1
    up = charts.prob_color(0.75, 0.5)
    for k in (1, 3, 5):
        lo, hi, got = int(charts.WHITE[k:k + 2], 16), int(charts.BLUE[k:k + 2], 16), int(up[k:k + 2], 16)
        assert abs(got - (lo + hi) / 2) <= 1


def test_prob_color_clips_and_survives_degenerate_tau():
    assert charts.prob_color(-0.3, 0.5) == charts.RED
    assert charts.prob_color(1.7, 0.5) == charts.BLUE
    assert charts.prob_color(np.float32(1.0), 0.5) == charts.BLUE
    assert charts.prob_color(0.0, 0.0) == charts.WHITE
    assert charts.prob_color(0.5, 0.0) == charts.prob_color(0.5, 0.0)  # no ZeroDivisionError
    assert charts.prob_color(1.0, 1.0) == charts.WHITE


def test_text_stays_readable():
    assert charts.text_color(charts.RED) == charts.LIGHT_TEXT
    assert charts.text_color(charts.BLUE) == charts.LIGHT_TEXT
    assert charts.text_color(charts.WHITE) == charts.DARK_TEXT
    assert charts.text_color(charts.prob_color(0.45, 0.5)) == charts.DARK_TEXT


# ---------------------------------------------------------------------------
# token_html


def test_token_html_one_span_per_token_with_colour_and_title():
    pieces = ["The", " cat", " sat"]
    p = [0.0, 0.5, 1.0]
    out = charts.token_html(pieces, p, 0.5)
    assert out.startswith('<div class="mc-tokens"') and out.count("<div") == 1
    assert "white-space:pre-wrap" in out
    assert "<style" not in out
    spans = parse(out).spans
    assert [s["text"] for s in spans] == pieces  # spaces kept verbatim
    for i, (s, pi) in enumerate(zip(spans, p)):
        st = style_of(s)
        assert st["background"] == charts.prob_color(pi, 0.5)
        assert st["color"] == charts.text_color(st["background"])
        assert f"#{i}" in s["title"] and f"p={pi:.3f}" in s["title"]
    assert style_of(spans[0])["color"] == charts.LIGHT_TEXT and style_of(spans[1])["color"] == charts.DARK_TEXT


@pytest.mark.parametrize("evil", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                                  '" onmouseover="alert(1)', "a & b's"])
def test_token_html_escapes_user_text(evil):
    out = charts.token_html(["ok", evil], [0.9, 0.1], 0.5)
    parsed = parse(out)
    assert set(parsed.tags) <= {"div", "span"}  # no script/img element was created
    assert parsed.spans[1]["text"] == evil  # shown literally
    assert "<script" not in out and "<img" not in out
    assert 'onmouseover="' not in out


def test_token_html_whitespace_and_empty_tokens_stay_visible():
    spans = parse(charts.token_html(["a\nb", "", "  ", "x\r\ny"], [0.2] * 4, 0.5)).spans
    assert spans[0]["text"] == "a↵b" and spans[0]["br"] == 1
    assert spans[1]["text"] == "∅"
    assert spans[2]["text"] == "  "
    assert spans[3]["text"] == "x↵y" and spans[3]["br"] == 1


def test_token_html_markers():
    pieces = ["a", "b", "c", "d", "e"]
    p = [0.9, 0.6, 0.1, 0.2, 0.3]
    crossed = np.array([False, True, False, False, False])
    plain = parse(charts.token_html(pieces, p, 0.5)).spans
    spans = parse(charts.token_html(pieces, p, 0.5, crossed=crossed, stubborn=[np.int64(3)], first_divergence=2)).spans
    assert [("mc-crossed" in s["classes"]) for s in spans] == [False, True, False, False, False]
    assert "outline" in style_of(spans[1])
    assert [("mc-stubborn" in s["classes"]) for s in spans] == [False, False, False, True, False]
    assert "dashed" in style_of(spans[3])["text-decoration"]
    assert [("mc-diverge" in s["classes"]) for s in spans] == [False, False, True, False, False]
    assert "border-bottom" in style_of(spans[2])
    # tokens after the divergence look exactly as they would without it (the stubborn one only adds its underline)
    assert spans[4]["style"] == plain[4]["style"] and spans[4]["classes"] == plain[4]["classes"]
    assert spans[0]["style"] == plain[0]["style"]
    assert "border-bottom" not in style_of(spans[3])


def test_token_html_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"3.*2|2.*3"):
        charts.token_html(["a", "b", "c"], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        charts.token_html(["a", "b"], [0.1, 0.2], 0.5, crossed=[True])


def test_legend_html_labels_and_scale():
    out = charts.legend_html(0.7)
    assert "p=0" in out and "τ=0.7" in out and "p=1" in out
    assert charts.RED in out and charts.WHITE in out and charts.BLUE in out
    assert "70.0%" in out  # the white stop and the τ label sit at tau


def test_generation_diff_html_marks_matches_mismatches_and_missing():
    spans = parse(charts.generation_diff_html([1, 2, 3, 4], [1, 5, 6], ["A", " b", " c", " d"],
                                              ["A", " x", "<b>"])).spans
    assert [s["text"] for s in spans] == ["A", " x", "<b>", " d"]
    # only the first mismatch is singled out
    assert [c for s in spans for c in s["classes"] if c != "mc-tok"] == [
        "mc-match", "mc-mismatch", "mc-first-mismatch", "mc-mismatch", "mc-missing"]
    assert "expected ' b'" in spans[1]["title"] and spans[1]["title"].startswith("first mismatch")


# ---------------------------------------------------------------------------
# curves_chart


def _history(n: int = 3, run: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"step": np.arange(1, n + 1), "frac_above": np.linspace(0.1, 0.9, n),
                       "frac_correct": np.linspace(0.2, 1.0, n),
                       "loss": np.linspace(3.0, 0.5, n), "delta_loss": np.linspace(0.0, 2.5, n), "n_tokens": 10})
    return df.assign(run=run) if run else df


def test_curves_chart_two_panels_in_long_format():
    spec = charts.curves_chart(_history(3), 0.8).to_dict()
    left, right = spec["hconcat"]
    assert "τ = 0.8" in left["title"]
    assert left["encoding"]["y"]["scale"]["domain"] == [0, 1]
    assert left["encoding"]["color"]["field"] == "series" and left["encoding"]["color"]["title"] == "series"
    assert "strokeDash" not in left["encoding"]
    rows = data_of(spec, left)
    assert {r["series"] for r in rows} == {"above τ", "argmax correct"} and len(rows) == 6
    assert [r["value"] for r in rows if r["series"] == "above τ"] == pytest.approx([0.1, 0.5, 0.9])
    rows = data_of(spec, right)
    assert {r["series"] for r in rows} == {"loss", "ΔL"}
    assert [r["value"] for r in rows if r["series"] == "loss"] == pytest.approx([3.0, 1.75, 0.5])
    assert all("n_tokens" not in r for r in rows)  # unrelated columns are not shipped to the browser


def test_curves_chart_compares_runs_by_dash():
    hist = pd.concat([_history(2, "sft"), _history(2, "memft-ot")], ignore_index=True)
    spec = charts.curves_chart(hist, 0.5).to_dict()
    for panel in spec["hconcat"]:
        assert panel["encoding"]["strokeDash"]["field"] == "run"
        assert {r["run"] for r in data_of(spec, panel)} == {"sft", "memft-ot"}


def test_curves_chart_single_row_and_empty():
    spec = charts.curves_chart(_history(1), 0.5).to_dict()
    left = spec["hconcat"][0]
    assert left["mark"]["point"] is True  # a lone point must still be drawn
    assert len(data_of(spec, left)) == 2
    empty = charts.curves_chart(pd.DataFrame(), 0.5).to_dict()
    assert [data_of(empty, panel) for panel in empty["hconcat"]] == [[], []]


def test_curves_chart_tolerates_missing_and_nan_columns():
    hist = _history(2).drop(columns=["delta_loss"])
    hist.loc[0, "loss"] = np.nan
    spec = charts.curves_chart(hist, 0.5).to_dict()
    assert [r["value"] for r in data_of(spec, spec["hconcat"][1])] == pytest.approx([0.5])


# ---------------------------------------------------------------------------
# histogram_chart


def _bars_and_rule(spec: dict) -> tuple[dict, dict]:
    bars = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "bar")
    rule = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "rule")
    return bars, rule


def test_histogram_fixed_bins_counts_and_colours():
    p = [0.05, 0.05, 0.55, 0.95, 1.0, 1.0000001]
    spec = charts.histogram_chart(p, 0.5, bins=10).to_dict()
    bars, rule = _bars_and_rule(spec)
    rows = data_of(spec, bars)
    assert len(rows) == 10
    # 1.0 and float noise above it land in the last bin
    assert [r["tokens"] for r in rows] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert [r["lo"] for r in rows] == pytest.approx(np.linspace(0, 0.9, 10))
    assert {r["side"] for r in rows[:5]} == {"below τ"} and {r["side"] for r in rows[5:]} == {"above τ"}
    scale = bars["encoding"]["color"]["scale"]
    assert dict(zip(scale["domain"], scale["range"])) == {"below τ": charts.RED, "above τ": charts.BLUE}
    assert bars["encoding"]["x"]["title"] == "p(correct token)" and bars["encoding"]["y"]["title"] == "tokens"
    assert data_of(spec, rule) == [{"tau": 0.5}] and rule["encoding"]["x"]["field"] == "tau"
    assert "bin" not in bars["encoding"]["x"]  # altair must not re-bin


def test_histogram_edges_do_not_depend_on_data():
    a = charts.histogram_chart([0.1, 0.2], 0.3).to_dict()
    b = charts.histogram_chart(np.array([0.9], dtype=np.float32), 0.3).to_dict()
    edges = [[(r["lo"], r["hi"]) for r in data_of(s, _bars_and_rule(s)[0])] for s in (a, b)]
    assert edges[0] == edges[1] and len(edges[0]) == 20
    empty = charts.histogram_chart([], 0.3, bins=5).to_dict()
    assert [r["tokens"] for r in data_of(empty, _bars_and_rule(empty)[0])] == [0] * 5


# ---------------------------------------------------------------------------
# trajectories_chart


def test_trajectories_one_line_per_token_with_tau_rule():
    steps = [1, 2, 3]
    ph = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]], dtype=np.float32)
    spec = charts.trajectories_chart(steps, ph, [2, 0], [" world", "a very long token piece"], 0.6).to_dict()
    lines = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "line")
    rule = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "rule")
    rows = data_of(spec, lines)
    labels = list(dict.fromkeys(r["token"] for r in rows))
    assert labels[0] == "#2 ' world'"
    assert labels[1].startswith("#0 'a very") and len(labels[1]) <= 20
    assert [r["p"] for r in rows if r["token"] == labels[0]] == pytest.approx([0.3, 0.6, 0.9])
    assert [r["step"] for r in rows if r["token"] == labels[0]] == steps
    assert lines["encoding"]["y"]["scale"]["domain"] == [0, 1]
    assert lines["encoding"]["color"]["field"] == "token"
    assert data_of(spec, rule) == [{"tau": 0.6}] and rule["encoding"]["y"]["field"] == "tau"


def test_trajectories_empty_and_bad_input():
    spec = charts.trajectories_chart([1], np.array([[0.5]]), [], [], 0.5).to_dict()
    assert spec["mark"]["type"] == "text"
    assert data_of(spec, spec) == [{"text": "no stubborn tokens"}]
    with pytest.raises(ValueError):
        charts.trajectories_chart([1, 2], np.zeros((2, 3)), [0, 1], ["a"], 0.5)
    with pytest.raises(ValueError):
        charts.trajectories_chart([1, 2, 3], np.zeros((2, 3)), [0], ["a"], 0.5)


@pytest.mark.parametrize("n", [0, 1, 5, 200, 201, 1000, 10_001])
def test_thin_keeps_a_bounded_even_sample_with_the_last_point(n):
    idx = charts.thin(n)
    assert len(idx) <= charts.CHART_POINTS + 1 and idx == sorted(set(idx))
    if n:
        assert idx[0] == 0 and idx[-1] == n - 1
        gaps = {b - a for a, b in zip(idx[:-2], idx[1:-1])}
        assert len(gaps) <= 1  # evenly spaced (the last gap may be shorter)
    assert idx == list(range(n)) if n <= charts.CHART_POINTS else len(idx) >= charts.CHART_POINTS // 2


def test_a_users_run_far_off_the_surface_does_not_stretch_its_colour_scale():
    """The surface's colours span the fitted grid and the sweep's points; a user's run at ΔL 8 (the sweep's
    points reach 0.5) is drawn in the end colour instead of washing the surface out."""
    def predict(r, ell):
        return 0.1 * np.asarray(r, float) ** 0.5 * np.asarray(ell, float) ** -0.2

    ranks, lengths = pd.Series([1.0, 2.0, 4.0, 8.0]), pd.Series([32.0, 64.0, 128.0, 256.0])
    grid = charts.law_grid(predict, ranks, lengths)
    assert grid["r_lo"].min() == pytest.approx(1.0) and grid["rank"].min() > 1  # no cell at rank 0.7 to hover
    assert grid["r_hi"].max() == pytest.approx(8 * 1.4) and grid["l_lo"].min() == pytest.approx(32 / 1.4)
    assert charts.law_grid(predict, [0.5, 2.0], lengths)["r_lo"].min() == pytest.approx(0.5 / 1.4)  # P_eff-like
    sweep = pd.DataFrame({"rank": ranks, "length": lengths, "delta_loss": [0.1, 0.2, 0.4, 0.5], "kind": "sweep"})
    mine = pd.DataFrame({"rank": [2.0], "length": [64.0], "delta_loss": [8.0], "kind": ["your runs"]})
    observed = pd.concat([sweep, mine], ignore_index=True)
    observed = observed.assign(predicted=predict(observed["rank"], observed["length"]))
    spec = charts.law_surface_chart(grid, observed, "t").to_dict()
    domains = [v["scale"]["domain"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") == "delta_loss"
               and isinstance(v.get("scale"), dict) and "domain" in v["scale"]]
    assert domains and all(d[1] == pytest.approx(max(0.5, float(grid.delta_loss.max()))) for d in domains)
    kinds = [v["scale"]["domain"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") == "kind"
             and isinstance(v.get("scale"), dict)]
    assert kinds and all(k == ["sweep", "your runs"] for k in kinds)  # no 'this session' in the legend: none drawn


def _point_scale_sizes(scale: dict) -> list[float]:
    """The size Vega gives each domain value of a discrete size scale (a point scale: its range read as [start,
    stop], the values spaced evenly inside it with half a step of padding at each end)."""
    n, rng = len(scale["domain"]), scale["range"]
    if len(rng) < 2:
        return [math.nan] * n  # no stop: Vega draws NaN, nothing
    start, stop = rng[0], rng[-1]
    step = (stop - start) / n
    return [start + step * (i + 0.5) for i in range(n)]


@pytest.mark.parametrize("kinds", [["sweep"], ["sweep", "your runs"], ["sweep", "your runs", "this session"]])
def test_the_sweeps_points_are_drawn_on_the_surface_with_or_without_a_users_runs(kinds):
    """Before a user has runs of their own (or with the overlay off) the sweep's points are the only kind: each
    kind, that one alone included, gets a size a point can be seen at, larger for a user's runs than the sweep's."""
    def predict(r, ell):
        return 0.1 * np.asarray(r, float) ** 0.5 * np.asarray(ell, float) ** -0.2

    ranks, lengths = pd.Series([1.0, 2.0, 4.0]), pd.Series([32.0, 64.0, 128.0])
    observed = pd.DataFrame({"rank": ranks, "length": lengths, "delta_loss": [0.1, 0.2, 0.4],
                             "kind": (kinds * 3)[:3]})
    observed = observed.assign(predicted=predict(observed["rank"], observed["length"]))
    spec = charts.law_surface_chart(charts.law_grid(predict, ranks, lengths), observed, "t").to_dict()
    size = next(v["scale"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") == "kind"
                and isinstance(v.get("scale"), dict) and v.get("legend") is not None and "range" in v["scale"]
                and isinstance(v["scale"]["range"][0], (int, float)))
    sizes = _point_scale_sizes(size)
    assert size["domain"] == kinds and all(x >= 60 for x in sizes), sizes
    assert sizes == sorted(sizes)


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# live_spec: the page's fast path draws exactly what the chart functions draw


def _same_chart(live: dict, full: dict) -> None:
    strip = lambda spec: {k: v for k, v in spec.items() if k != "datasets"}  # noqa: E731
    assert strip(live) == strip(full)
    assert set(live["datasets"]) == set(full["datasets"])
    for name, data in live["datasets"].items():
        got = data.to_dict("records") if isinstance(data, pd.DataFrame) else data
        pd.testing.assert_frame_equal(pd.DataFrame(got), pd.DataFrame(full["datasets"][name]), check_dtype=False)


def test_live_specs_equal_the_chart_functions_and_differ_between_steps_only_in_data():
    rng = np.random.default_rng(0)
    hist = _history(5).assign(run="sft")
    steps, ph = [1, 2, 3], rng.random((3, 4))
    labels = [" a", " b"]
    for p in (rng.random(40), rng.random(40)):
        _same_chart(charts.live_spec("histogram", charts.histogram_args(0.4), charts.histogram_frames(p, 0.4)),
                    charts.stable_spec(charts.histogram_chart(p, 0.4)))
    args = charts.trajectories_args(steps, [0, 2], labels, 0.5, token_ids=[7, 9])
    _same_chart(charts.live_spec("trajectories", args, charts.trajectories_frames(steps, ph, [0, 2], args[1])),
                charts.stable_spec(charts.trajectories_chart(steps, ph, [0, 2], labels, 0.5, token_ids=[7, 9])))
    _same_chart(charts.live_spec("curves", charts.curves_args(hist, 0.5), charts.curves_frames(hist)),
                charts.stable_spec(charts.curves_chart(hist, 0.5)))
    # two steps of a run: the same spec, new data (the page swaps the data into the chart it drew)
    a = charts.live_spec("histogram", charts.histogram_args(0.4), charts.histogram_frames(rng.random(40), 0.4))
    b = charts.live_spec("histogram", charts.histogram_args(0.4), charts.histogram_frames(rng.random(40), 0.4))
    assert {k: v for k, v in a.items() if k != "datasets"} == {k: v for k, v in b.items() if k != "datasets"}
    assert not a["datasets"]["bins"].equals(b["datasets"]["bins"])


def test_stable_spec_names_datasets_by_use_not_by_content():
    a = charts.stable_spec(charts.law_slices_chart(
        pd.DataFrame({"rank": [1, 2], "length": [64, 64], "delta_loss": [1.0, 2.0]}),
        pd.DataFrame({"rank": [1, 2], "length": [64, 64], "delta_loss": [1.1, 1.9]}), "t"))
    b = charts.stable_spec(charts.law_slices_chart(  # other content over the same span (the axis follows the span)
        pd.DataFrame({"rank": [1, 2], "length": [64, 64], "delta_loss": [2.0, 1.0]}),
        pd.DataFrame({"rank": [1, 2], "length": [64, 64], "delta_loss": [1.9, 1.1]}), "t"))
    assert sorted(a["datasets"]) == sorted(b["datasets"]) and all(n.startswith("data") for n in a["datasets"])
    assert json.dumps({k: v for k, v in a.items() if k != "datasets"}, sort_keys=True) == \
        json.dumps({k: v for k, v in b.items() if k != "datasets"}, sort_keys=True)


def _surface_layers(spec: dict) -> list[dict]:
    return spec.get("layer", [])


def test_the_surface_is_grey_where_the_law_runs_past_what_the_runs_reach():
    """Cells predicted above the data's own ceiling (saturated runs: ΔL capped by the base loss) are drawn grey and
    kept off the colour scale, instead of colouring the saturated corner up to ΔL 50."""
    def predict(r, ell):
        return 60.0 * np.asarray(r, float) ** 0.9 * np.asarray(ell, float) ** -0.5

    ranks, lengths = pd.Series([1.0, 2.0, 4.0]), pd.Series([16.0, 64.0, 192.0])
    grid = charts.law_grid(predict, ranks, lengths)
    observed = pd.DataFrame({"rank": ranks, "length": lengths, "delta_loss": [14.0, 13.0, 12.0], "kind": "sweep"})
    observed = observed.assign(predicted=predict(observed["rank"], observed["length"]))
    assert grid.delta_loss.max() > 30  # the fitted form's own corner
    spec = charts.law_surface_chart(grid, observed, "t", ceiling=14.0).to_dict()
    greys = [lay for lay in _surface_layers(spec) if lay.get("mark", {}).get("color") == "#d9d9d9"]
    assert len(greys) == 1
    domains = [v["scale"]["domain"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") == "delta_loss"
               and isinstance(v.get("scale"), dict) and "domain" in v["scale"]]
    assert domains and all(d[1] <= 14.0 + 1e-9 for d in domains)
    grey_rows = spec["datasets"][greys[0]["data"]["name"]]
    assert grey_rows and all(row["delta_loss"] > 14.0 for row in grey_rows)
    # the grey is named on the chart itself, in a legend entry of its own
    legends = [v["legend"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") == "state" and "legend" in v]
    assert legends and legends[0] is not None and spec.get("resolve", {}).get("scale", {}).get("color") == \
        "independent"
    # every layer's axes span the whole grid, the grey corner included: the shortest lengths sat under grey cells,
    # and a domain taken from the coloured cells alone cut their ticks off
    ys = [v["scale"]["domain"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") in ("l_lo", "length")
          and isinstance(v.get("scale"), dict)]
    assert ys and all(d == pytest.approx([grid.l_lo.min(), grid.l_hi.max()]) for d in ys)
    xs = [v["scale"]["domain"] for v in _walk(spec) if isinstance(v, dict) and v.get("field") in ("r_lo", "rank")
          and isinstance(v.get("scale"), dict)]
    assert xs and all(d == pytest.approx([grid.r_lo.min(), grid.r_hi.max()]) for d in xs)
    axes = {v["field"]: v["axis"] for v in _walk(spec) if isinstance(v, dict) and v.get("axis")}
    assert axes["r_lo"]["values"] == [1, 2, 4]  # whole ranks: no 0.8 from the padding below rank 1
    ticks = axes["l_lo"]["values"]  # round lengths, a few, inside the grid's lengths
    assert 3 <= len(ticks) <= 6 and grid.l_lo.min() <= ticks[0] < ticks[-1] <= grid.l_hi.max()


def test_rank_ticks_are_whole_ranks():
    assert charts.rank_ticks(0.71, 5.6) == [1, 2, 4]
    assert charts.rank_ticks(0.71, 2.8) == [1, 2]  # fewer than three powers of two: every whole rank
    assert charts.rank_ticks(1.4, 2.8) == [2]
    assert charts.rank_ticks(0.7, 90) == [1, 2, 4, 8, 16, 32, 64]


def test_your_runs_diamonds_sit_left_of_the_cells_numbers_on_their_rows_middle():
    """Left of the number, clear of it, and on the row's middle: with 30-pixel rows a diamond set above the middle
    sat on the border between two lengths."""
    cells = pd.DataFrame({"rank": [1, 1, 2, 2], "length": [32, 64, 32, 64], "exact_recall": [1.0, 0.0, 1.0, 1.0]})
    mine = pd.DataFrame({"rank": [1.1], "length": [30], "label": ["your run x"], "exact_recall": [1.0]})
    spec = charts.recall_heatmap(cells, "exact_recall", "t", mine=mine).to_dict()
    marks = [lay["mark"] for lay in spec["layer"]]
    kinds = [m["type"] if isinstance(m, dict) else m for m in marks]
    assert kinds == ["rect", "point", "text"]  # the numbers are drawn last, over the diamond
    diamond = marks[1]
    assert diamond["shape"] == "diamond" and diamond["xOffset"] <= -30 and not diamond.get("yOffset")


def test_methods_that_tie_on_capacity_are_both_visible():
    per_rank = pd.DataFrame([{"rank": r, "bits_per_param": 0.53, "kind": f"{m} fitted"}
                             for m in ("memft-ot", "sft") for r in (1, 2, 4)])
    spec = charts.capacity_chart(per_rank, {"knowledge": 2.0}).to_dict()
    rows = [row for rows in spec["datasets"].values() for row in rows if "rank" in row]
    drawn = {k: sorted(r["drawn"] for r in rows if r["kind"] == k) for k in ("memft-ot fitted", "sft fitted")}
    assert drawn["memft-ot fitted"] != drawn["sft fitted"]  # the same values at different x: both lines show
    assert all(r["rank"] in (1, 2, 4) for r in rows)  # the tooltip keeps the true rank
    assert all(abs(np.log(r["drawn"] / r["rank"])) < 0.07 for r in rows)


def test_the_capacity_references_are_told_apart_and_named_on_the_chart():
    """The two reference capacities (2 and 3.6 bits/param) differ in dash as well as shade, and each is named in
    text over its own line, so a reader need not match two grey dashes to a legend."""
    per_rank = pd.DataFrame([{"rank": r, "bits_per_param": 0.7, "kind": "sft fitted"} for r in (1, 2, 4)])
    refs = {"knowledge": 2.0, "random data": 3.6}
    spec = charts.capacity_chart(per_rank, refs).to_dict()
    line = next(lay for lay in spec["layer"] if (lay["mark"] if isinstance(lay["mark"], str)
                                                 else lay["mark"]["type"]) == "line")
    dashes = line["encoding"]["strokeDash"]["scale"]["range"]
    assert len(dashes) == 2 and dashes[0] != dashes[1]
    text = next(lay for lay in spec["layer"] if (lay["mark"] if isinstance(lay["mark"], str)
                                                 else lay["mark"]["type"]) == "text")
    named = {row["kind"]: row["bits_per_param"] for row in spec["datasets"][text["data"]["name"]]}
    assert named == {"2 bits/param: knowledge": 2.0, "3.6 bits/param: random data": 3.6}  # one label a line


def test_the_replays_curves_mark_the_shown_step():
    hist = pd.DataFrame({"step": [0, 1, 2, 3], "loss": [3.0, 2.0, 1.0, 0.5], "delta_loss": [0, 1.0, 2.0, 2.5],
                         "frac_above": [0, 0.2, 0.6, 1.0], "frac_correct": [0, 0.3, 0.7, 1.0], "run": "sft"})
    spec = charts.curves_chart(hist, 0.5, mark_step=2).to_dict()
    rules = [lay for panel in spec["hconcat"] for lay in panel.get("layer", [])
             if (lay.get("mark") == "rule" or (isinstance(lay.get("mark"), dict) and lay["mark"]["type"] == "rule"))
             and lay.get("encoding", {}).get("x", {}).get("field") == "step"]
    assert len(rules) == 2  # one in each panel
    assert all(spec["datasets"][r["data"]["name"]] == [{"step": 2}] for r in rules)
    assert "hconcat" in charts.curves_chart(hist, 0.5).to_dict()  # unmarked: as before


def test_a_thousand_entries_are_one_small_cell_each_with_user_text_inert():
    from memcore.metrics import per_sample

    rng = np.random.default_rng(0)
    lengths = [11] * 1000
    p = rng.uniform(0, 1, 11000).astype(np.float32)
    correct = np.ones(11000, bool)
    correct[5 * 11 + 3] = False  # entry 5 has one wrong token
    p[7 * 11:8 * 11] = 0.9  # entry 7 is above τ everywhere
    worst, right = per_sample(p, correct, lengths)
    assert right.sum() == 999 and not right[5] and worst[7] == pytest.approx(0.9) and worst.shape == (1000,)
    with pytest.raises(ValueError, match="add up"):
        per_sample(p, correct, [11] * 999)
    names = [f"<script>alert({i})</script> Lee:" for i in range(1000)]
    html_ = charts.entries_html(names, [" 0123456789"] * 1000, worst, right, 0.5)
    assert html_.count('class="mc-entry') == 1000 and html_.count("mc-recalled") == 999
    assert "<script>" not in html_ and "&lt;script&gt;" in html_
    # one small <div> an entry: a 1,000-entry book is a page of about 0.4 MB at most, not a strip of 11,000 spans
    assert len(html_) < 1000 * 400
    chart = charts.entries_chart(pd.DataFrame({"step": [0, 1, 2], "entries_recalled": [0, 3, 9],
                                               "entries_above": [0, 1, 7]}), 1000, mark_step=1).to_dict()
    assert "layer" in chart  # the steps with the chosen step marked


def test_live_rows_count_entries_recalled_and_above_tau():
    from jobs import RunLive

    from memcore.config import DataSpec, RunSpec, TrainSpec
    from memcore.records import StepRow

    live = RunLive(label="pb", spec=RunSpec(data=DataSpec(phonebook=3), train=TrainSpec(tau=0.5)),
                   sample_lengths=[2, 3, 1])
    p = np.array([0.9, 0.8, 0.2, 0.9, 0.9, 0.6], np.float32)
    correct = np.array([True, True, True, True, True, False])
    live.record(StepRow(step=0, loss=1.0, delta_loss=0.1, n_above=4, n_correct=5, n_tokens=6, active=6,
                        recalled=False, first_divergence=5, elapsed=1.0, lr=0.01, skipped=False, p=p, correct=correct))
    assert live.entries and live.rows[-1]["entries_recalled"] == 2 and live.rows[-1]["entries_above"] == 2


def test_retention_chart_keeps_strategies_that_land_on_the_same_point_apart():
    """Every seed recalled under both keep strategies: the same (fill, recalled); each is drawn a little to its own
    side with a dash of its own, the tooltip still gives the true fill."""
    cells = pd.DataFrame([{"rank": 1, "first_length": 16, "second_length": 8, "strategy": s, "fill": 0.61,
                           "kept": k, "kept_lo": k, "kept_hi": k, "recalled": 1.0, "second_steps": 30.0,
                           "rehearsal": 0.6, "seeds": 3} for s, k in [("keep-sft", 0.9), ("keep-memft-ot", 0.67),
                                                                      ("none", 0.0)]])
    spec = charts.retention_chart(cells, "recalled").to_dict()
    rows = next(iter(spec["datasets"].values()))
    shown = {r["strategy"]: r["shown_fill"] for r in rows if "strategy" in r}
    assert len(set(shown.values())) == 3 and all(abs(v - 0.61) < 0.05 for v in shown.values())
    assert {r["fill"] for r in rows if "strategy" in r} == {0.61}
    point = next(layer for layer in spec["layer"] if layer["mark"].get("type", layer["mark"]) == "point")
    assert {"field": "fill", "type": "quantitative", "format": ".2f"}.items() <= next(
        t for t in point["encoding"]["tooltip"] if t.get("field") == "fill").items()
    line = next(layer for layer in spec["layer"] if layer["mark"].get("type", layer["mark"]) == "line")
    assert len({json.dumps(d) for d in line["encoding"]["strokeDash"]["scale"]["range"]}) == 3
    # every seed recalled sits at 1.0: inside the plot, not on its edge where half of each marker was cut off
    assert point["encoding"]["y"]["scale"]["domain"][1] > 1.0 and point["encoding"]["y"]["axis"]["values"][-1] == 1.0
    assert spec["title"] == "seeds still reciting A, after the second passage"


def test_the_live_chain_chart_gives_the_earlier_passage_the_first_colour_as_the_story_does():
    """While B trains on top of A, A takes the first colour (blue) and B the second, as on the Runs page's story."""
    import chain_view

    rows = [{"step": s, "frac_above": 0.1 * s, "recalled": False, "earlier_above": 16 - s, "earlier_tokens": 16,
             "earlier_recalled": s == 0} for s in range(3)]
    spec = charts.chain_chart(chain_view.chain_history(rows, "earlier passage")).to_dict()
    scales = [enc["color"]["scale"] for layer in spec["layer"] for enc in [layer.get("encoding", {})]
              if "color" in enc and enc["color"].get("field") == "passage"]
    assert scales and scales[0]["domain"] == ["earlier passage", "this passage"]
    assert scales[0]["range"][0] == "#1f77b4"



def test_the_chain_charts_event_labels_sit_above_the_lines_held_at_one():
    """A passage held at every token above τ draws its line at 1.0; the events' labels (a passage lost, the next
    run starting) go in a strip above it, stacked when steps are close, inside the plot and off the lines."""
    history = pd.DataFrame([{"step": s, "passage": p, "frac_above": 1.0, "recalled": True}
                            for s in range(0, 50, 5) for p in ("A", "B")])
    events = pd.DataFrame({"step": [10, 12, 14, 30, 31], "label": ["B starts", "A lost", "A back", "x", "y"]})
    spec = charts.chain_chart(history, events).to_dict()
    top = max(d["domain"][1] for d in (enc["y"]["scale"] for layer in spec["layer"]
                                       for enc in [layer.get("encoding", {})] if "scale" in enc.get("y", {})))
    text = next(layer for layer in spec["layer"] if (layer["mark"] if isinstance(layer["mark"], str)
                                                     else layer["mark"]["type"]) == "text"
                and layer["encoding"]["text"]["field"] == "label")
    ys = [row["y"] for row in spec["datasets"][text["data"]["name"]]]
    assert text["mark"]["baseline"] == "bottom" and all(1.0 < y < top for y in ys)  # each label's foot above 1.0
    assert len(set(ys[:4])) == 4  # close steps: stacked, not drawn over each other

def test_an_open_frontier_bracket_is_drawn_as_a_bound_not_as_a_frontier():
    """A bracket with only its recalled end (no failure yet) is a lower bound: drawn as an upward triangle, told
    apart from a closed bracket's ℓ*, so that '≥ 32' never reads as 'ℓ* = 32'."""
    brackets = pd.DataFrame([{"source": "sft", "rank": 1, "lo": 38, "hi": 40, "ell_star": 39.0},
                             {"source": "sft", "rank": 2, "lo": 64, "hi": None, "ell_star": None},
                             {"source": "memft-ot", "rank": 1, "lo": None, "hi": 8, "ell_star": None}])
    spec = charts.frontier_brackets_chart(brackets).to_dict()
    rows = next(v for v in spec["datasets"].values() if len(v) == 3)
    bound = {(r["source"], r["rank"]): r["bound"] for r in rows}
    assert bound == {("sft", 1): "ℓ* between the ends", ("sft", 2): "at least (nothing failed yet)",
                     ("memft-ot", 1): "at most (nothing recalled yet)"}
    shape = next(layer["encoding"]["shape"] for layer in spec["layer"] if "shape" in layer["encoding"])
    assert shape["scale"]["range"] == ["circle", "triangle-up", "triangle-down"]
    closed = charts.frontier_brackets_chart(brackets.iloc[:1]).to_dict()  # every bracket closed: no triangles
    shape = next(layer["encoding"]["shape"] for layer in closed["layer"] if "shape" in layer["encoding"])
    assert shape["scale"]["range"] == ["circle"] and shape["scale"]["domain"] == ["ℓ* between the ends"]


def test_a_paired_cell_of_fewer_seeds_does_not_squeeze_the_others():
    """A search end still being completed has 2 seeds and a paired-t interval many times wider than the 3-seed cells:
    the axis spans the cells with every seed, and the wide one is drawn up to the edge with an arrow where its
    interval goes on, its mean (when past the edge) as an open point at the edge, and its numbers written there;
    a cell of one seed has no interval, and its numbers say so instead of printing nan."""
    rows = [{"method": "memft-ot", "rank": 1, "length": n, "measure": "steps", "mean": m, "lo": lo, "hi": hi, "n": k,
             "verdict": "tie"} for n, m, lo, hi, k in ((32, -2.0, -11.0, 7.0, 3), (45, 9.0, -190.0, 180.0, 2),
                                                       (64, -3.3, -17.7, 11.0, 3), (91, 429.5, -4608.5, 5467.5, 2),
                                                       (108, -87.0, -480.9, 306.9, 2),
                                                       (118, -806.0, float("nan"), float("nan"), 1))]
    spec = charts.paired_chart(pd.DataFrame(rows), "steps", "steps to exact recall").to_dict()
    span = 17.7 * 1.1
    domains = [layer["encoding"]["x"]["scale"]["domain"] for layer in spec["layer"][1:]]
    assert all(abs(d[1] - span) < 1e-9 and d[0] == -d[1] for d in domains)
    data = {name: rows for name, rows in spec["datasets"].items()}

    def layer_rows(layer):
        return data[layer["data"]["name"]]

    drawn = {}  # length -> (where its bar runs, its mean's point: filled or open)
    for layer in spec["layer"][1:]:
        mark = layer["mark"]
        for r in layer_rows(layer):
            if mark["type"] == "rule":
                drawn.setdefault(r["length"], {})["bar"] = (r["lo_shown"], r["hi_shown"])
            elif mark["type"] == "point" and "shape" not in layer["encoding"]:
                drawn.setdefault(r["length"], {})["mean"] = (r["mean_shown"], mark.get("filled", False))
            elif mark["type"] == "point":
                drawn.setdefault(r["length"], {}).setdefault("arrows", set()).add(r["arrow"])
            elif mark["type"] == "text":
                drawn.setdefault(r["length"], {})["numbers"] = r["numbers"]
                drawn[r["length"]]["written_at"] = r["at"]
    assert drawn[32] == {"bar": (-11.0, 7.0), "mean": (-2.0, True)}  # inside: as it is, no arrow, no numbers
    assert drawn[45]["bar"] == (-span, span) and drawn[45]["mean"] == (9.0, True)
    assert drawn[45]["arrows"] == {"triangle-left", "triangle-right"}
    assert drawn[45]["numbers"] == "+9.0 [−190.0, +180.0]"  # one decimal for all three
    assert drawn[91]["mean"] == (span, False)  # the mean itself is past the edge: an open point at the edge
    assert drawn[91]["numbers"] == "+430 [−4608, +5468]" and drawn[91]["written_at"] == span
    assert drawn[108]["mean"] == (-span, False) and drawn[108]["written_at"] == -span  # by the edge its mean is past
    assert drawn[118] == {"mean": (-span, False), "numbers": "−806.0 (one seed, no interval)", "written_at": -span}


def test_a_cell_pooled_with_a_spot_re_run_is_a_diamond_and_does_not_make_the_others_fewer_seeds():
    """The spot re-run's pooled cell (5 seeds: the benchmark's 3 and the spot's 2) is drawn after its own cell as a
    diamond; the 3-seed cells stay solid (fewer seeds means fewer than the benchmark's own), the axis spans it too,
    and a cell of its own with 2 seeds is still dashed."""
    from benchmark_view import with_pooled

    paired = pd.DataFrame([{"method": "memft-sw", "rank": 1, "length": n, "measure": "steps", "mean": m, "lo": lo,
                            "hi": hi, "n": k, "verdict": "tie", "where": "search probe"}
                           for n, m, lo, hi, k in ((32, 8.0, -0.6, 16.6, 3), (64, 2.0, -5.0, 9.0, 3),
                                                   (45, 5.0, -50.0, 60.0, 2))])
    spot = pd.DataFrame([{"method": "memft-sw", "rank": 1, "length": 32, "measure": "steps", "new_seeds": "3,4",
                          "pooled_n": 5, "pooled_mean": 12.0, "pooled_lo": 3.4, "pooled_hi": 20.6,
                          "pooled_verdict": "loses"}])
    drawn = with_pooled(paired, spot)
    assert list(zip(drawn["length"], drawn["pooled"], drawn["n"])) == [(32, False, 3), (32, True, 5), (64, False, 3),
                                                                      (45, False, 2)]
    spec = charts.paired_chart(drawn, "steps", "steps to exact recall").to_dict()
    y = next(layer["encoding"]["y"] for layer in spec["layer"][1:] if "y" in layer["encoding"])
    assert y["sort"][:2] == ["memft-sw · r1 · ℓ=32 (search probe)", "memft-sw · r1 · ℓ=32 (search probe, with seeds "
                                                                     "3, 4)"]
    rule = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "rule" and "x2" in layer["encoding"])
    assert rule["encoding"]["strokeDash"]["condition"]["test"] == "datum.n < 3 && !datum.pooled"
    point = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "point" and layer["mark"]["filled"])
    assert point["encoding"]["shape"]["condition"] == {"test": "datum.pooled", "value": "diamond"}
    assert abs(spec["layer"][1]["encoding"]["x"]["scale"]["domain"][1] - 20.6 * 1.1) < 1e-9  # the pooled cell fits


def test_a_paired_chart_of_zero_differences_keeps_a_readable_scale():
    """Every method recalls every seed below the frontier, so exact recall differs by 0 points in every cell: the
    axis spans the least span asked for (10 points for a share), not ±1, and a wider cell still widens it."""
    rows = [{"method": m, "rank": 1, "length": 24, "measure": "exact_recall", "mean": 0.0, "lo": 0.0, "hi": 0.0,
             "n": 3, "verdict": "tie"} for m in ("memft-ot", "memft-sw")]
    spec = charts.paired_chart(pd.DataFrame(rows), "exact_recall", "exact recall", least_span=10.0).to_dict()
    assert spec["layer"][1]["encoding"]["x"]["scale"]["domain"] == [-10.0, 10.0]
    rows[0].update(lo=-20.0, hi=20.0)
    spec = charts.paired_chart(pd.DataFrame(rows), "exact_recall", "exact recall", least_span=10.0).to_dict()
    assert spec["layer"][1]["encoding"]["x"]["scale"]["domain"] == [-22.0, 22.0]


def test_the_frontier_chart_labels_a_tick_below_its_lowest_bracket_end_and_above_its_highest():
    """A bracket of 47-49 tokens (sft at rank 1) sat under the axis's lowest label (48): the axis now reaches out to
    a labelled tick (1 or 1.5 × a power of 2) on either side of every bracket end."""
    brackets = pd.DataFrame([{"source": "sft", "rank": 1, "lo": 47, "hi": 49, "ell_star": 48.0},
                             {"source": "sft", "rank": 2, "lo": 108, "hi": 118, "ell_star": 112.9}])
    spec = charts.frontier_brackets_chart(brackets).to_dict()
    y = next(layer["encoding"]["y"] for layer in spec["layer"] if layer["encoding"]["y"]["field"] == "ell_star")
    ticks, (low, high) = y["axis"]["values"], y["scale"]["domain"]
    assert min(ticks) <= 47 and max(ticks) >= 118 and low <= min(ticks) and high >= max(ticks)
    assert ticks == [32, 48, 64, 96, 128]  # 32 below 47; 128 above 118


def test_a_bracket_placed_within_a_few_percent_shows_both_ends_as_caps():
    """47-49 tokens is shorter than the point at ℓ*: each known end gets a cap (an error bar's), an open bracket
    only the end it has."""
    brackets = pd.DataFrame([{"source": "sft", "rank": 1, "lo": 47, "hi": 49, "ell_star": 48.0},
                             {"source": "memft-ot", "rank": 2, "lo": 80, "hi": None, "ell_star": None}])
    spec = charts.frontier_brackets_chart(brackets).to_dict()
    caps = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "tick")
    rows = spec["datasets"][caps["data"]["name"]]
    assert sorted((r["source"], r["rank"], r["end_y"], r["end"]) for r in rows) == [
        ("memft-ot", 2, 80.0, "longest recalled"), ("sft", 1, 47.0, "longest recalled"),
        ("sft", 1, 49.0, "shortest not recalled")]
    assert caps["mark"]["orient"] == "horizontal" and caps["encoding"]["y"]["field"] == "end_y"


def test_the_benchmark_frontier_chart_draws_the_fitted_ell_star_with_its_interval():
    """The verdicts rest on the fitted ℓ* and its interval, not on the bracket's middle: with fitted_lo/hi the circle
    is the fit's (here below its bracket's recalled end, as where an end's seeds split), its 95% interval a thin line
    beside the bar, the axis reaches it, and the legend names it; without them the circle stays between the ends."""
    brackets = pd.DataFrame([{"source": "memft-sw", "rank": 1, "lo": 54, "hi": 56, "ell_star": 53.9,
                              "fitted_lo": 48.8, "fitted_hi": 55.9},
                             {"source": "sft", "rank": 2, "lo": 113, "hi": 118, "ell_star": 115.6,
                              "fitted_lo": 111.0, "fitted_hi": 131.0}])
    spec = charts.frontier_brackets_chart(brackets).to_dict()
    line = next(layer for layer in spec["layer"] if layer["encoding"]["x"]["field"] == "x_fit")
    rows = spec["datasets"][line["data"]["name"]]
    assert [(r["source"], r["fitted_lo"], r["fitted_hi"]) for r in rows] == [("memft-sw", 48.8, 55.9),
                                                                           ("sft", 111.0, 131.0)]
    assert all(r["x_fit"] > r["x"] for r in rows)  # beside the bracket, not over it
    y = next(layer["encoding"]["y"] for layer in spec["layer"] if layer["encoding"]["y"]["field"] == "ell_star")
    assert y["scale"]["domain"][1] >= 131.0 and y["scale"]["domain"][0] <= 48.8
    assert "fitted ℓ* (thin line: its 95% interval)" in json.dumps(spec, ensure_ascii=False)
    plain = charts.frontier_brackets_chart(brackets.drop(columns=["fitted_lo", "fitted_hi"])).to_dict()
    assert "ℓ* between the ends" in json.dumps(plain, ensure_ascii=False) and "x_fit" not in json.dumps(plain)


def test_the_law_slices_chart_labels_its_log_axis_up_to_the_data():
    """ΔL from 5 to 14.6 nats: a log axis labelled only at its round values showed 6-10 with the saturated points
    at 14 above the last label; now the axis holds every point with room and is labelled near its top."""
    observed = pd.DataFrame({"rank": [1, 1, 2, 2], "length": [16, 128, 16, 128], "delta_loss": [14.6, 5.2, 14.5, 7.9]})
    curves = pd.DataFrame({"rank": [1, 1], "length": [16, 128], "delta_loss": [14.0, 5.0]})
    spec = charts.law_slices_chart(observed, curves, "sft: ΔL against length").to_dict()
    y = spec["layer"][1]["encoding"]["y"]
    low, high = y["scale"]["domain"]
    assert low < 5.0 and high > 14.6
    assert max(y["axis"]["values"]) >= 14.6 / 1.5 and min(y["axis"]["values"]) <= 6
    assert charts.log_ticks(4.5, 16.4) == [5, 6, 8, 10, 15]


def test_a_users_runs_on_the_frontier_chart_sit_by_their_methods_bracket_in_its_colour():
    """Runs of two methods at one rank are told apart: each diamond is outlined in its method's colour (the same as
    that method's bracket) and nudged to its bracket's side; the tooltip names run, method and recall in words."""
    brackets = pd.DataFrame([{"source": "sft", "rank": 1, "lo": 48, "hi": 50, "ell_star": 49.0},
                             {"source": "memft-ot", "rank": 1, "lo": 52, "hi": 54, "ell_star": 53.0}])
    runs = pd.DataFrame({"rank": [1, 1, 1], "length": [40, 60, 45], "label": ["a", "b", "c"],
                         "recalled": [True, False, True], "method": ["sft", "memft-ot", "memft-sw"]})
    spec = charts.frontier_brackets_chart(brackets, runs).to_dict()
    colour = next(layer["encoding"]["color"]["scale"] for layer in spec["layer"] if "color" in layer["encoding"])
    of = dict(zip(colour["domain"], colour["range"]))
    mine = next(layer for layer in spec["layer"] if "stroke" in layer["encoding"])
    outline = dict(zip(mine["encoding"]["stroke"]["scale"]["domain"], mine["encoding"]["stroke"]["scale"]["range"]))
    assert outline["sft"] == of["sft"] and outline["memft-ot"] == of["memft-ot"] and of["sft"] != of["memft-ot"]
    assert outline["memft-sw"] == "black"  # a method without a bracket on this chart
    drawn = {r["method"]: r["x"] for r in spec["datasets"][mine["data"]["name"]]}
    bars = {r["source"]: r["x"] for r in next(v for v in spec["datasets"].values() if len(v) == 2 and "source" in v[0])}
    assert drawn["sft"] == bars["sft"] and drawn["memft-ot"] == bars["memft-ot"] and drawn["memft-sw"] == 1.0
    titles = [t.get("title", t["field"]) for t in mine["encoding"]["tooltip"]]
    assert titles == ["run", "method", "rank", "target tokens", "recall"]
    # a run at a rank no bracket has widens the rank axis instead of falling off it
    wide = charts.frontier_brackets_chart(brackets, runs.assign(rank=[1, 1, 8])).to_dict()
    lo, hi = next(layer["encoding"]["x"]["scale"]["domain"] for layer in wide["layer"]
                  if layer["encoding"]["x"].get("scale", {}).get("domain"))
    assert lo < 1 and hi > 8


def test_chart_tooltips_name_what_they_show_and_labels_have_none():
    """Hovering a heatmap cell (its rect or its number) names the measure as the chart's title does, not the column
    (delta_loss); the chain chart's passage names and event labels do not pop up their internal fields (y)."""
    cells = pd.DataFrame({"rank": [1, 1, 2, 2], "length": [32, 64, 32, 64], "delta_loss": [9.0, 7.0, 12.0, 10.0]})
    spec = charts.recall_heatmap(cells, "delta_loss", "ΔL (nats/token)", fmt=".1f").to_dict()
    for layer in spec["layer"]:
        tips = layer["encoding"]["tooltip"]
        assert [t.get("title", t["field"]) for t in tips] == ["rank", "target tokens", "ΔL (nats/token)"]
    history = pd.DataFrame([{"step": s, "passage": p, "frac_above": 0.5, "recalled": s > 20}
                            for s in range(0, 50, 5) for p in ("A", "B")])
    events = pd.DataFrame({"step": [10], "label": ["B starts"]})
    chain = charts.chain_chart(history, events).to_dict()
    for layer in chain["layer"]:
        tips = layer["encoding"].get("tooltip")
        fields = [t["field"] for t in tips] if isinstance(tips, list) else []
        assert "y" not in fields and "shown_fill" not in fields
        if (layer["mark"] if isinstance(layer["mark"], str) else layer["mark"]["type"]) == "text":
            assert tips == {"value": None} or [t.get("title") for t in tips] == ["event", None]
