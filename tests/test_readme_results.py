"""The README's "What memcore finds" tables say what the shipped tables in sample_data/paper say: the frontier
brackets per method and rank, the PhoneBook's largest books, and the PhoneBook's paired differences. A report
regenerated without the README following it fails here, instead of a reader finding two answers."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "sample_data" / "paper"


def _answer() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Where the answer stands")
    return text[start:text.index("\n## ", start)]


def _rows(section: str, first_cell: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header's first cell is `first_cell`: method -> its cells."""
    lines = section.splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith(f"| {first_cell} |"))
    out = {}
    for line in lines[head + 2:]:
        if not line.strip().startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def _ends(cell: str) -> tuple[int, int]:
    """'47-49 tokens (...)' or '**10** entries (10-11; ...)' -> (47, 49) / (10, 11)."""
    m = re.search(r"(\d+)-(\d+)", cell.replace("**", ""))
    assert m, cell
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(not (PAPER / "long_context_frontier.csv").is_file(), reason="no shipped long-context tables")
def test_the_readme_frontier_brackets_are_the_shipped_ones():
    front = pd.read_csv(PAPER / "long_context_frontier.csv").set_index(["method", "rank"])
    rows = _rows(_answer(), "method")  # the first such table: the frontier
    assert set(rows) == set(front.index.get_level_values("method"))
    for method, cells in rows.items():
        for rank, cell in ((1, cells[0]), (2, cells[1])):
            r = front.loc[(method, rank)]
            assert _ends(cell) == (int(r["lo"]), int(r["hi"])), (method, rank, cell)
            # bold, and only bold, where the bracket is placed (within the resolution, every seed at both ends)
            assert cell.startswith("**") == bool(r["settled"]), (method, rank, cell)


@pytest.mark.skipif(not (PAPER / "long_context.json").is_file(), reason="no shipped long-context tables")
def test_the_readme_says_when_the_long_context_tables_were_made():
    as_of = json.loads((PAPER / "long_context.json").read_text())["as_of"]  # '2026-12-01 22:37 UTC'
    assert f"As of {as_of} (`as_of` in `sample_data/paper/long_context.json`" in _answer()


@pytest.mark.skipif(not (PAPER / "phonebook_capacity.csv").is_file(), reason="no shipped PhoneBook tables")
def test_the_readme_phonebook_books_and_paired_differences_are_the_shipped_ones():
    section = _answer()
    cap = pd.read_csv(PAPER / "phonebook_capacity.csv").set_index(["method", "rank"])
    books = _rows(section[section.index("**PhoneBook"):], "method")
    for method, cells in books.items():
        for rank, cell in ((1, cells[0]), (2, cells[1])):
            r = cap.loc[(method, rank)]
            assert _ends(cell) == (int(r["lo"]), int(r["hi"])), (method, rank, cell)
    paired = pd.read_csv(PAPER / "phonebook_paired.csv")
    paired = paired[paired["measure"] == "entries_recalled"].set_index(["method", "rank"])
    said = _rows(section, "method − sft, entries recalled on the same book")
    assert set(said) == set(paired.index.get_level_values("method"))
    for method, cells in said.items():
        for rank, cell in ((1, cells[0]), (2, cells[1])):
            r = paired.loc[(method, rank)]
            mean, lo, hi, n = re.match(r"([+−-]?[\d.]+) \[([+−-]?[\d.]+), ([+−-]?[\d.]+)\] \((\d+) books\)",
                                       cell).groups()
            number = [float(x.replace("−", "-")) for x in (mean, lo, hi)]
            assert number == pytest.approx([r["mean"], r["lo"], r["hi"]], abs=0.051), (method, rank, cell)
            assert int(n) == int(r["n"])


@pytest.mark.skipif(not (PAPER / "long_context_law.csv").is_file(), reason="no shipped long-context tables")
def test_the_readme_law_past_the_frontier_is_the_shipped_one():
    """'12 for sft (α 95% interval [−14.7, +14.8]), 9 for memft-ot ([−20.7, +20.7]) and …': the points and α's
    interval per method, as long_context_law.csv has them."""
    law = pd.read_csv(PAPER / "long_context_law.csv").set_index("method")
    section = _answer()
    text = section[section.index("**The law past the frontier**"):]
    text = text[:text.index("\n- **")]
    said = {m: (int(n), float(lo.replace("−", "-")), float(hi.replace("−", "-")))
            for n, m, lo, hi in re.findall(r"(\d+) for ([\w-]+) \((?:α 95% interval )?\[([+−-]?[\d.]+), "
                                           r"([+−-]?[\d.]+)\]\)", " ".join(text.split()))}
    assert set(said) == set(law.index)
    for m, (n, lo, hi) in said.items():
        assert n == int(law.loc[m, "points"]), m
        assert (lo, hi) == pytest.approx((law.loc[m, "alpha_lo"], law.loc[m, "alpha_hi"]), abs=0.051), m


@pytest.mark.skipif(not (PAPER / "long_context_frontier.csv").is_file(), reason="no shipped long-context tables")
def test_the_readme_says_what_sft_recalled_at_each_rank_as_the_shipped_frontier():
    """The shipped sweep's paragraph: 'has sft recall 47 random tokens at rank 1 and 113 at rank 2'."""
    front = pd.read_csv(PAPER / "long_context_frontier.csv").set_index(["method", "rank"])
    text = " ".join((ROOT / "README.md").read_text().split())
    one, two = re.search(r"has sft recall (\d+) random tokens at rank 1 and (\d+) at rank 2", text).groups()
    assert (int(one), int(two)) == (int(front.loc[("sft", 1), "lo"]), int(front.loc[("sft", 2), "lo"]))


def _interval_cell(cell: str):
    """'+4.5 [+0.5, +8.9] (more)' or '49.0 [47.5, 52.0]' -> (4.5, 0.5, 8.9, 'more' or None); '—…' -> None."""
    m = re.match(r"([+−-]?[\d.]+) \[([+−-]?[\d.]+), ([+−-]?[\d.]+)\](?: \((\w+)\))?", cell)
    if not m:
        return None
    *numbers, verdict = m.groups()
    return (*(float(x.replace("−", "-")) for x in numbers), verdict)


@pytest.mark.skipif(not (PAPER / "long_context_frontier.csv").is_file(), reason="no shipped long-context tables")
def test_the_readme_fitted_frontiers_and_their_differences_are_the_shipped_ones():
    front = pd.read_csv(PAPER / "long_context_frontier.csv").set_index(["method", "rank"])
    section = _answer()
    for head, cols in (("fitted ℓ* [95%], tokens", ("fitted_ell_star", "fitted_lo", "fitted_hi", None)),
                       ("method − sft, fitted ℓ* (tokens)", ("minus_sft", "minus_sft_lo", "minus_sft_hi",
                                                             "minus_sft_verdict"))):
        rows = _rows(section, head)
        assert rows, head
        for method, cells in rows.items():
            for rank, cell in ((1, cells[0]), (2, cells[1])):
                r = front.loc[(method, rank)]
                said = _interval_cell(cell)
                if said is None:  # '—': nothing fitted there yet
                    assert pd.isna(r[cols[0]]), (method, rank, cell)
                    continue
                assert said[:3] == pytest.approx([r[c] for c in cols[:3]], abs=0.051), (method, rank, cell)
                if cols[3]:
                    assert said[3] == r[cols[3]], (method, rank, cell)


@pytest.mark.skipif(not (PAPER / "long_context_spot_frontier.csv").is_file(), reason="no frontier spot re-run shipped")
def test_the_readme_frontier_spot_is_the_shipped_one():
    """The frontier spot's table: ℓ* refitted over every seed, its difference from sft's, and the new seeds' recall
    at each end, as long_context_spot_frontier.csv has them."""
    spot = pd.read_csv(PAPER / "long_context_spot_frontier.csv")
    for rank in sorted(spot["rank"].unique()):
        _check_spot_rank(spot, int(rank))


def _check_spot_rank(spot: pd.DataFrame, rank: int) -> None:
    rows = _rows(_answer(), f"frontier spot, rank {rank}, seeds 0-4")
    assert set(rows) == set(spot.loc[spot["rank"] == rank, "method"]), rank
    for method, (fitted, minus, ends) in rows.items():
        r = spot[(spot["method"] == method) & (spot["rank"] == rank)]
        first = r.iloc[0]
        assert _interval_cell(fitted)[:3] == pytest.approx(
            [first["pooled_ell_star"], first["pooled_lo"], first["pooled_hi"]], abs=0.051), (method, fitted)
        said = _interval_cell(minus)
        if said is None:
            assert "pooled_minus_sft" not in r or pd.isna(first["pooled_minus_sft"]), (method, minus)
        else:
            assert said[:3] == pytest.approx([first["pooled_minus_sft"], first["pooled_minus_sft_lo"],
                                              first["pooled_minus_sft_hi"]], abs=0.051), (method, minus)
            assert said[3] == first["pooled_minus_sft_verdict"], (method, minus)
        assert ends == "; ".join(f"{e['length']}: {e['new_recalled']} of {e['new_runs']}" for _, e in r.iterrows())
