import numpy as np
import pytest

from memcore.config import MemcoreError
from memcore.law import FUNCS, JACOBIANS, compare_forms, fit_all, fit_law, power_law, saturating_law, smallest_rank

RANKS = np.array([1, 2, 4, 8, 16])
LENGTHS = np.array([32, 64, 128, 256, 512])
R, L = (a.ravel().astype(float) for a in np.meshgrid(RANKS, LENGTHS))
TRUE = {"C": 4.5, "alpha": 0.5, "beta": 0.38, "b": -0.44}


def test_noise_free_fit_recovers_parameters_within_one_percent():
    dl = power_law(np.array([R, L]), **TRUE)
    fit = fit_law(R, L, dl)
    for k, v in TRUE.items():
        assert fit.params[k] == pytest.approx(v, rel=0.01), k
    assert fit.r2 > 0.9999 and fit.rmse < 1e-6 and fit.loo_rmse < 1e-4


@pytest.mark.parametrize("form, params", [("power", (4.5, 0.5, 0.38, -0.44)), ("saturating", (3.0, 0.8, 0.9, 0.65)),
                                          ("power", (0.2, -1.5, 2.0, 1.0)), ("saturating", (12.0, 40.0, -0.3, 1.7))])
def test_the_jacobian_the_fit_is_given_is_the_laws_derivative(form, params):
    """The optimizer trusts these derivatives instead of differencing the law: a wrong one would steer every fit
    (and its covariance, so its intervals) off. Checked against central differences over the grid."""
    x = np.array([R, L])
    jac = JACOBIANS[form](x, *params)
    assert jac.shape == (len(R), 4)
    for i in range(4):
        h = 1e-6 * max(1.0, abs(params[i]))
        up, down = list(params), list(params)
        up[i] += h
        down[i] -= h
        numeric = (FUNCS[form](x, *up) - FUNCS[form](x, *down)) / (2 * h)
        np.testing.assert_allclose(jac[:, i], numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max() + 1e-9,
                                   err_msg=f"{i}")


def test_noisy_fit_covers_the_truth_with_its_intervals():
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        dl = power_law(np.array([R, L]), **TRUE) + rng.normal(0, 0.02, size=R.shape)
        fit = fit_law(R, L, dl)
        covered += all(fit.intervals[k][0] <= v <= fit.intervals[k][1] for k, v in TRUE.items())
    assert covered >= 16  # 95% intervals: most noisy replicates cover all four true values


def test_aic_prefers_the_form_that_generated_the_data():
    x = np.array([R, L])
    sat = saturating_law(x, M=3.0, C=0.8, alpha=0.9, beta=0.65)
    fits, best = compare_forms(R, L, sat)
    assert best == "saturating" and fits["saturating"].r2 > fits["power"].r2
    pw = power_law(x, **TRUE) + np.random.default_rng(1).normal(0, 0.01, R.shape)
    assert compare_forms(R, L, pw)[1] == "power"


@pytest.mark.parametrize("r, ell, dl, words", [
    ([1, 2, 4], [32, 64, 128], [0.1, 0.2, 0.3], "too few points"),
    ([4] * 8, [32, 64, 128, 256, 32, 64, 128, 256], np.linspace(0.1, 1, 8), "degenerate grid"),
    ([1, 2, 4, 8] * 2, [64] * 8, np.linspace(0.1, 1, 8), "degenerate grid"),
    # each rank at 1.5 × its own frontier: ℓ ∝ r, so only α − β is identified, however many seeds
    (np.repeat([1, 2, 4, 8], 3), np.repeat([72, 144, 288, 576], 3), np.linspace(0.1, 1, 12), r"ℓ ∝ r\^1.00"),
    ([1, 2, 4, 8] * 2, [30, 60, 120, 240] * 2, np.linspace(0.1, 1, 8), "only α − 1.00·β"),
    ([1] * 3 + [2] * 3 + [1] * 2, [72] * 3 + [173] * 3 + [96] * 2, np.linspace(0.1, 1, 8), "3 distinct"),
    ([0, 2, 4, 8, 1, 2, 4, 8], [32] * 4 + [64] * 4, np.linspace(0.1, 1, 8), "positive"),
    ([1, 2, 4, 8, 1, 2, 4, 8], [32] * 4 + [-64] * 4, np.linspace(0.1, 1, 8), "positive"),
    ([1, 2, 4, 8, 1, 2, 4, 8], [32] * 4 + [64] * 4, [0.5] * 8, "nothing to fit"),
    ([1, 2, 4, 8, 1, 2, 4, 8], [32] * 4 + [64] * 4, [0.1, np.nan] * 4, "non-finite"),
])
def test_bad_data_gets_a_clear_error(r, ell, dl, words):
    with pytest.raises(MemcoreError, match=words):
        fit_law(np.array(r, float), np.array(ell, float), np.array(dl, float))


def test_prediction_and_inversion_agree():
    fit = fit_law(R, L, power_law(np.array([R, L]), **TRUE))
    target = float(fit.predict(6, 200))
    r = smallest_rank(fit, 200, target)
    assert r == 6 and fit.predict(r - 1, 200) < target
    assert smallest_rank(fit, 200, 1e6) is None
    d = fit.to_dict()
    assert {"C", "alpha", "beta", "b", "r2", "C_ci", "alpha_ci", "beta_ci", "b_ci"} <= set(d)


def test_fit_and_predict_from_a_csv_on_the_command_line(tmp_path, capsys, monkeypatch):
    import json

    import pandas as pd

    from memcore.cli import main

    monkeypatch.setenv("MEMCORE_HOME", str(tmp_path / "home"))
    dl = power_law(np.array([R, L]), **TRUE) + np.random.default_rng(3).normal(0, 0.01, R.shape)
    csv = tmp_path / "grid.csv"
    pd.DataFrame({"rank": R, "length": L, "delta_loss": dl, "p_eff": R * 6336}).to_csv(csv, index=False)
    assert main(["fit", "--csv", str(csv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k, v in TRUE.items():
        lo, hi = out[f"{k}_ci"]
        assert lo <= v <= hi and out[k] == pytest.approx(v, abs=0.1)
    assert out["r2"] > 0.99 and out["comparison"]["preferred"] in ("power", "saturating")
    assert out["p_eff_fit"]["alpha"] == pytest.approx(out["alpha"], rel=1e-3)  # P_eff ∝ r: same exponents
    assert main(["predict", "--csv", str(csv), "--rank", "8", "--length", "128", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["delta_loss"]
    assert pred == pytest.approx(power_law(np.array([[8.0], [128.0]]), **TRUE)[0], abs=0.05)
    (tmp_path / "bad.csv").write_text("rank,length\n1,2\n")
    assert main(["fit", "--csv", str(tmp_path / "bad.csv")]) == 2
    assert "lacks column(s) delta_loss" in capsys.readouterr().err
    (tmp_path / "text.csv").write_text("rank,length,delta_loss\n1,2,x\n2,4,0.1\n")
    assert main(["fit", "--csv", str(tmp_path / "text.csv")]) == 2
    assert "non-numeric" in capsys.readouterr().err


FIELD = __import__("pathlib").Path(__file__).resolve().parent / "field"


def test_a_spreadsheet_csv_reads_like_a_plain_one(tmp_path):
    """Semicolons, decimal commas, a BOM, CRLF and an extra column (the field file), then other dialects."""
    from memcore.law import read_law_csv

    df = read_law_csv(FIELD / "law_excel_semicolon.csv")
    assert list(df.columns[:3]) == ["rank", "length", "delta_loss"] and len(df) == 16
    assert df["delta_loss"].iloc[0] == pytest.approx(0.37592) and df["rank"].dtype.kind in "if"
    plain = tmp_path / "plain.csv"
    df.to_csv(plain, index=False)
    again = read_law_csv(plain)
    cols = ["rank", "length", "delta_loss"]
    assert np.allclose(again[cols].to_numpy(), df[cols].to_numpy())
    tab = tmp_path / "tab.tsv"
    tab.write_bytes("Rank\tLength\t Delta_Loss \n1\t32\t0,5\n2\t32\t0,7\n".encode("cp1252"))
    assert read_law_csv(tab)["delta_loss"].tolist() == [0.5, 0.7]
    # the same bytes as an upload
    assert read_law_csv((FIELD / "law_excel_semicolon.csv").read_bytes(), name="upload.csv")["length"].iloc[-1] == 256


def test_a_csv_that_really_lacks_columns_names_what_it_found(tmp_path):
    from memcore.config import MemcoreError
    from memcore.law import read_law_csv

    f = tmp_path / "x.csv"
    f.write_text("\ufeffr;len;dl\r\n1;32;0,4\r\n")
    with pytest.raises(MemcoreError,
                       match=r"lacks column\(s\) rank, length, delta_loss; found 3 column\(s\): r, len, dl"):
        read_law_csv(f)
    f.write_text("")
    with pytest.raises(MemcoreError, match="empty"):
        read_law_csv(f)


def test_fit_on_the_field_spreadsheet_csv_from_the_command_line(tmp_path, capsys, monkeypatch):
    import json

    from memcore.cli import main

    monkeypatch.setenv("MEMCORE_HOME", str(tmp_path / "home"))
    assert main(["fit", "--csv", str(FIELD / "law_excel_semicolon.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 16 and out["r2"] > 0.99 and 0.3 < out["alpha"] < 0.7


def _multistart_reference(form, r, ell, dl):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "law_reference.py"
    spec = importlib.util.spec_from_file_location("law_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.multistart_fit(form, r, ell, dl)


@pytest.mark.parametrize("form", ["power", "saturating"])
@pytest.mark.parametrize("method", ["sft", "memft-ot"])
def test_the_fast_fit_agrees_with_the_multistart_fit_on_the_shipped_sweep(form, method):
    import pandas as pd

    from memcore.law import PARAMS

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    df = pd.read_csv(root / "sample_data" / "sweeps" / "default_smollm2_135m.csv")
    d = df[df["method"] == method]
    r, ell, dl = (d[c].to_numpy(float) for c in ("rank", "length", "delta_loss"))
    popt, se, sse, loo = _multistart_reference(form, r, ell, dl)
    fit = fit_law(r, ell, dl, form)
    for name, v in zip(PARAMS[form], popt):
        assert fit.params[name] == pytest.approx(v, rel=1e-3), name  # 3 significant figures
    assert fit.rmse == pytest.approx(np.sqrt(sse / len(dl)), rel=1e-3)
    assert fit.loo_rmse == pytest.approx(loo, rel=1e-3)
    from scipy import stats

    t = stats.t.ppf(0.975, len(dl) - 4)
    for name, v, s in zip(PARAMS[form], popt, se):
        lo, hi = fit.intervals[name]
        assert lo == pytest.approx(v - t * s, rel=1e-3, abs=1e-6) and hi == pytest.approx(v + t * s, rel=1e-3, abs=1e-6)


def test_european_thousands_separators_and_excel_sep_hint(tmp_path):
    """1.024 in a decimal-comma file is a thousand and twenty-four tokens, not one; "sep=;" names the delimiter;
    a fraction of a token or rank is refused instead of fitted."""
    from memcore.config import MemcoreError
    from memcore.law import read_law_csv

    f = tmp_path / "eu.csv"
    f.write_text("sep=;\nrank;length;delta_loss;p_eff\n1;512;0,116;6.336\n1;1.024;0,1;6.336\n2;2.048;0,12;12.672\n\n"
                 "2;512;x;12.672\n",
                 encoding="utf-8")
    with pytest.raises(MemcoreError, match=r"delta_loss .* 1 empty or non-numeric value\(s\) \(line 7\)"):
        read_law_csv(f)  # the blank line is counted: line 7 is the one with x
    f.write_text(f.read_text().replace(";x;", ";0,2;"))
    df = read_law_csv(f)
    assert df["length"].tolist() == [512, 1024, 2048, 512] and df["p_eff"].tolist() == [6336, 6336, 12672, 12672]
    assert df["delta_loss"].tolist() == pytest.approx([0.116, 0.1, 0.12, 0.2])
    g = tmp_path / "frac.csv"
    g.write_text("rank,length,delta_loss\n1,1.024,0.5\n2,64,0.4\n")
    with pytest.raises(MemcoreError,
                       match=r"length .* whole numbers, .* such as 1\.024 \(line 2\); is a thousands separator"):
        read_law_csv(g)


# --- the table a fit reads, fit_all, a user's runs beside a sweep -------------------------------------------------


def _store_with_runs(tmp_path, runs):
    """A store holding fake finished runs: (method, rank, n_tokens, delta_loss, adapter, status, sweep, data)."""
    from memcore.config import AdapterSpec, DataSpec, RunSpec, TrainSpec
    from memcore.records import RunSummary
    from memcore.store import Store

    store = Store(tmp_path / "home")
    for method, rank, n, dl, adapter, status, sweep, data in runs:
        spec = RunSpec(adapter=AdapterSpec(rank=rank, kind=adapter), train=TrainSpec(method=method),
                       data=DataSpec(random_tokens=n) if data == "random" else DataSpec(text="some text"))
        rid = store.create_run(spec.to_dict(), sweep=sweep, label=None)
        summary = RunSummary.from_dict(dict(
            run_id=rid, n_tokens=n, delta_loss=dl, p_eff=100 * rank, n_above=n // 2, n_correct=n // 4, recalled=False,
            exact_recall=dl is not None and dl > 1, stop_reason="max_steps", bits_per_param=0.01, adapter=adapter,
            steps=3, first_divergence=0, base_loss=2.0, loss=1.0, bits_stored=1.0, seconds_per_step=0.1,
            train_seconds=0.3, model="m", quant=None, method=method, tau=0.5, rank=rank, adapter_dir="",
            prompt_ids=[1], target_ids=[2] * n, generated_ids=None))
        store.set_status(rid, status, summary=summary if status == "completed" else None)
    return store


def test_law_table_from_a_csv_keeps_the_asked_methods_rows_and_names_a_missing_column(tmp_path):
    from memcore.law import law_table

    f = tmp_path / "grid.csv"
    f.write_text("rank,length,delta_loss,method\n1,32,0.5,sft\n2,32,0.7,sft\n1,32,0.6,memft-ot\n")
    df, notes = law_table(f, method="sft")
    assert df["method"].tolist() == ["sft", "sft"] and df["delta_loss"].tolist() == [0.5, 0.7] and notes == []
    assert len(law_table(f)[0]) == 3  # no method asked: every row
    plain = tmp_path / "plain.csv"
    plain.write_text("rank,length,delta_loss\n1,32,0.5\n2,32,0.7\n")
    assert len(law_table(plain, method="sft")[0]) == 2  # no method column: the rows cannot be told apart, all kept
    short = tmp_path / "short.csv"
    short.write_text("rank,length,exact_recall\n1,32,1\n")
    with pytest.raises(MemcoreError, match=r"short.csv lacks column\(s\) delta_loss; found 3 column\(s\)"):
        law_table(short)
    assert law_table(short, required=("rank", "length"))[0]["exact_recall"].tolist() == [1]  # what the frontier needs
    with pytest.raises(MemcoreError, match="give a CSV file of them or a store of runs"):
        law_table()


def test_runs_table_reads_completed_runs_filters_them_and_notes_mixed_adapters(tmp_path):
    from memcore.law import RUN_COLUMNS, law_table, runs_table

    store = _store_with_runs(tmp_path, [
        ("sft", 1, 32, 0.5, "lora", "completed", None, "text"),
        ("sft", 2, 64, 1.5, "lora", "completed", None, "random"),
        ("memft-ot", 4, 32, 0.9, "bypass", "completed", None, "text"),
        ("sft", 8, 32, None, "lora", "completed", None, "text"),  # no ΔL: not a law point
        ("sft", 8, 32, 0.1, "lora", "failed", None, "text"),  # not completed
    ])
    df, notes = runs_table(store)
    assert tuple(df.columns) == RUN_COLUMNS and sorted(df["rank"]) == [1, 2, 4]
    row = df[df["rank"] == 2].iloc[0]
    assert row[["length", "delta_loss", "p_eff", "frac_above", "token_accuracy"]].tolist() == [64, 1.5, 200, 0.5, 0.25]
    assert bool(row["exact_recall"]) and row["data"] == "random_tokens" and row["method"] == "sft"
    assert [n.split(";")[0] for n in notes] == ["the store's runs mix adapters (bypass, lora)",
                                                "the store's runs mix kinds of data (random_tokens, text)"]
    sft, notes = law_table(store=store, method="sft")  # the method filter goes to the store's query
    assert sorted(sft["rank"]) == [1, 2] and len(notes) == 1 and "kinds of data" in notes[0]
    with pytest.raises(MemcoreError, match=r"no completed runs match in the store"):
        runs_table(store, method="memft-sw")


def test_fit_all_reports_the_power_form_and_says_which_form_the_data_prefer():
    import pandas as pd

    from memcore.law import LawFits, fit_all

    sat = saturating_law(np.array([R, L]), M=3.0, C=0.8, alpha=0.9, beta=0.65)
    table = pd.DataFrame({"rank": R, "length": L, "delta_loss": sat, "p_eff": R * 100})
    fits = fit_all(table, with_p_eff=True)
    assert set(fits.forms) == {"power", "saturating"} and fits.preferred == "saturating"
    assert fits.main is fits.forms["power"]  # the paper's form is reported first even when the data prefer the other
    assert fits.p_eff is not None and fits.p_eff.x_name == "p_eff" and fits.p_eff.form == "power"
    assert "table does not say which points converged" in fits.fitted_on and not fits.regime.known
    out = fits.to_dict()
    assert out["form"] == "power" and out["comparison"]["preferred"] == "saturating"
    assert list(out)[-4:] == ["p_eff_fit", "regime", "fitted_on", "fitted_regime"] and out["p_eff_fit"]["x"] == "p_eff"
    assert "p_eff_fit" not in fit_all(table).to_dict()  # only when asked for
    only_sat = LawFits({"saturating": fits.forms["saturating"]}, "saturating", fits.regime, fits.fitted_on)
    assert only_sat.main.form == "saturating"  # no power fit: the preferred form is reported
    with pytest.raises(MemcoreError, match=r"lacks column\(s\) delta_loss; found: rank, length"):
        fit_all(table[["rank", "length"]])
    with pytest.raises(MemcoreError, match="too few points"):
        fit_all(table.head(4))


def test_one_method_picks_memft_ot_from_a_mixed_table_and_says_so():
    import pandas as pd

    from memcore.law import method_rows, one_method

    df = pd.DataFrame({"method": ["sft", "memft-ot", "sft"], "rank": [1, 2, 3]})
    rows, m, note = one_method(df, None)
    assert m == "memft-ot" and rows["rank"].tolist() == [2] and "holds memft-ot, sft; using memft-ot" in note
    rows, m, note = one_method(df, "sft")
    assert m == "sft" and rows["rank"].tolist() == [1, 3] and note is None
    rows, m, note = one_method(df[df["method"] == "sft"], None)
    assert m == "sft" and len(rows) == 2 and note is None
    assert one_method(df.drop(columns="method"), None)[1:] == (None, None)
    assert method_rows(df, "sft")["rank"].tolist() == [1, 3] and len(method_rows(df, None)) == 3
    assert len(method_rows(df.drop(columns="method"), "sft")) == 3


def test_own_runs_and_how_they_differ_from_a_sweep(tmp_path):
    from memcore.config import RunSpec
    from memcore.law import OWN_RUN_COLUMNS, comparable_settings, own_runs, sweep_mismatches

    store = _store_with_runs(tmp_path, [
        ("sft", 2, 64, 1.5, "lora", "completed", None, "text"),
        ("memft-ot", 4, 32, 0.5, "bypass", "completed", None, "random"),
        ("sft", 8, 32, 0.4, "lora", "completed", "a-sweep", "random"),  # a sweep's point: not the user's own
        ("sft", 8, 32, 0.4, "lora", "failed", None, "text"),
    ])
    own = own_runs(store)
    assert tuple(own.columns) == OWN_RUN_COLUMNS and own["rank"].tolist() == [2, 4]
    assert own["token_accuracy"].tolist() == [0.25, 0.25] and own["exact_recall"].tolist() == [1.0, 0.0]
    sweep_spec = RunSpec.from_dict(store.runs(sweep="a-sweep")[0]["spec"])
    ref = comparable_settings(sweep_spec)
    assert ref["adapter"] == "lora" and ref["data"] == "random tokens" and ref["lr"] == sweep_spec.train.lr
    notes = sweep_mismatches(store, ref)
    first, second = own["run_id"]
    assert notes == [f"run {first} differs from the sweep in data text (sweep: random tokens)",
                     f"run {second} differs from the sweep in adapter bypass (sweep: lora)"]
    assert sweep_mismatches(store, {"model": ref["model"]}) == []  # only the sweep's own keys are compared


def test_which_points_are_fitted_is_said_in_plain_words():
    import pandas as pd

    from memcore.law import law_points

    rows = [{"rank": r, "length": n, "delta_loss": 1.0 / n * r, "stop_reason": "max_steps"}
            for r in (1, 2, 4) for n in (32, 64, 128)]
    _, how = law_points(pd.DataFrame(rows))
    assert how == "fitted on the 9 unsaturated points (none converged on a plateau short of saturation)"
    rows[0]["stop_reason"] = "plateau"
    _, how = law_points(pd.DataFrame(rows))
    assert "only 1 point converged on a plateau short of saturation, fewer than 6" in how
    _, how = law_points(pd.DataFrame(rows[:3]))
    assert how == "fitted on all 3 points (only 3 points are unsaturated)"
    _, how = law_points(pd.DataFrame([dict(r, stop_reason="recalled") for r in rows[:4]]))
    assert how == "fitted on all 4 points (none is unsaturated)"


def test_the_regime_said_is_that_of_the_points_fitted_not_the_tables_majority():
    """A sweep mostly saturated is fitted on its unsaturated points; when those all stopped at the step budget the
    fit is budget-bound, and the words say so instead of leading with 'saturated' for a fit that leaves every
    saturated point out. With enough points converged on a plateau it is capacity-bound, as the paper fits."""
    import pandas as pd

    from memcore.law import fit_all

    rng = np.random.default_rng(0)
    rows = [{"rank": r, "length": n, "delta_loss": 3.0 * r ** 0.5 * n ** -0.3 + rng.normal(0, 0.01),
             "stop_reason": "max_steps"} for r in (1, 2, 4) for n in (32, 64, 128)]
    rows += [{"rank": r, "length": n, "delta_loss": 14.0, "stop_reason": "recalled"}
             for r in (1, 2, 4) for n in (4, 8, 16, 20)]  # 12 of 21 saturated: the table's majority
    fits = fit_all(pd.DataFrame(rows))
    assert fits.regime.label == "saturated"
    words = fits.regime_words()
    assert words.startswith("How its points stopped: 0% converged on a plateau, 57% saturated")
    assert ("Fitted on the 9 unsaturated points (none converged on a plateau short of saturation): all 9 stopped "
            "at the step budget, so the fit is **budget-bound (optimization)**") in words
    assert fits.to_dict()["fitted_regime"]["budget_bound"] == 9
    for row in rows[:7]:
        row["stop_reason"] = "plateau"  # 7 converged, 2 at the budget: the paper's points
    words = fit_all(pd.DataFrame(rows)).regime_words()
    assert ("Fitted on the 7 converged, unsaturated points (as the paper does): all 7 converged on a plateau, so "
            "the fit is **capacity-bound (converged)**: as the paper fits its law.") in words


def test_a_fit_says_when_its_points_tell_its_parameters_apart_and_when_not():
    """Healthy exponents get no note; where ΔL barely depends on rank and length, parameters trade off and the fit
    says so, instead of offering the shipped 300-step sweep's sft C = 137 [−834, 1175] as a finding."""
    from pathlib import Path

    import pandas as pd

    noisy = power_law(np.array([R, L]), **TRUE) + np.random.default_rng(2).normal(0, 0.02, R.shape)
    assert fit_law(R, L, noisy).notes == []
    flat = 12.0 + np.random.default_rng(3).normal(0, 0.05, R.shape)  # no dependence at all
    assert any("not pinned down" in n for n in fit_law(R, L, flat).notes)
    sweep = pd.read_csv(Path(__file__).resolve().parent.parent / "sample_data" / "sweeps" /
                        "capacity_bypass_random.csv")
    notes = {m: fit_all(sweep[sweep["method"] == m]).main.notes for m in ("sft", "memft-ot")}  # as `memcore fit`
    assert notes["memft-ot"] == []
    note, = notes["sft"]
    assert note.startswith("C, alpha, beta and b trade off against each other") and "not pinned down" in note


def test_alpha_over_beta_is_pinned_where_alpha_and_beta_are_not(tmp_path, capsys, monkeypatch):
    """Points like the bench's stage 2 past the frontier (two ranks, two lengths each, ΔL near-linear in ln r and
    ln ℓ): C trades off against b, α and β are not pinned, yet their ratio, the exponent of the lines of equal ΔL,
    is, and recovers the truth; `memcore fit` prints it and says what it means; a law whose ΔL does not fall with
    length has no such line."""
    import json

    import pandas as pd

    from memcore.cli import main
    from memcore.law import capacity_exponent

    r = np.repeat([1.0, 1.0, 2.0, 2.0], 3)
    ell = np.repeat([72.0, 96.0, 173.0, 231.0], 3)
    truth = 7.5 / 7.0  # ΔL = 40 + 7.5 ln r − 7 ln ℓ: constant along ℓ ∝ r^(7.5/7)
    dl = 40 + 7.5 * np.log(r) - 7.0 * np.log(ell) + np.random.default_rng(5).normal(0, 0.15, r.shape)
    fit = fit_law(r, ell, dl)
    lo_a, hi_a = fit.intervals["alpha"]
    assert lo_a < 0 < hi_a and hi_a - lo_a > 4 * abs(fit.params["alpha"])  # α alone: not pinned
    ratio, lo, hi = fit.alpha_over_beta
    assert lo < truth < hi and hi - lo < 0.5 and ratio == pytest.approx(fit.params["alpha"] / fit.params["beta"])
    assert any("α/β" in n for n in fit.notes)  # the note points the reader at the ratio
    # 4 cells for 4 parameters: the fit comes close to each cell's mean (well inside the points' scatter, sd 0.15),
    # so its R² says little of the law's shape
    means = pd.Series(dl).groupby([r, ell]).mean()
    assert fit.predict(*map(np.array, zip(*means.index))) == pytest.approx(means.to_numpy(), abs=0.05)
    assert any("sit on only 4 (rank, length) cells, as many as the law has parameters" in n for n in fit.notes)
    five = np.append(r, 4.0), np.append(ell, 300.0)
    assert not any("cells, as many as" in n for n in
                   fit_law(*five, np.append(dl, 40 + 7.5 * np.log(4.0) - 7.0 * np.log(300.0))).notes)
    monkeypatch.setenv("MEMCORE_HOME", str(tmp_path / "home"))
    csv = tmp_path / "stage2.csv"
    pd.DataFrame({"rank": r, "length": ell, "delta_loss": dl}).to_csv(csv, index=False)
    assert main(["fit", "--csv", str(csv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha_over_beta_ci"][0] < truth < out["alpha_over_beta_ci"][1]
    assert main(["fit", "--csv", str(csv)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("α/β"))
    assert f"doubling the rank reaches {2 ** out['alpha_over_beta']:.2f}× the tokens at the same ΔL" in line
    names = ("C", "alpha", "beta", "b")
    assert capacity_exponent(names, np.array([1.0, 0.5, -0.1, 0.0]), np.eye(4), 2.0) is None  # ΔL rises with ℓ
    assert capacity_exponent(names, np.array([1.0, 0.5, 0.25, 0.0]), np.full((4, 4), np.nan), 2.0) is None
