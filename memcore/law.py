"""The Parametric Memory Law: fit, uncertainty, model comparison, prediction and inversion.

    power law:   ΔL(r, ℓ) = C · r^α · ℓ^(−β) + b
    saturating:  ΔL(r, ℓ) = M · (1 − exp(−C · r^α · ℓ^(−β)))

r is the LoRA rank (or P_eff), ℓ the number of memorized target tokens, ΔL the loss reduction after a fixed
budget. Fits are bounded nonlinear least squares started from the best cell of a variable-projection grid
(the parameters the law is linear in solved exactly for each (α, β)), with 95% intervals from the Jacobian at
the optimum, R², RMSE, leave-one-out error (each refit warm-started from the full fit) and AIC.

Every consumer (CLI, app, benchmarks) reads its points through law_table (a law CSV, or a store's completed
runs, as one DataFrame) and fits them with fit_all (the regime, the points fitted, each form, the one the data
prefer, and the form reported: the power law when it was fitted, else the preferred one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memcore.config import MemcoreError, RunSpec

if TYPE_CHECKING:
    import pandas as pd

    from memcore.store import Store

FORMS = ("power", "saturating")
PARAMS = {"power": ("C", "alpha", "beta", "b"), "saturating": ("M", "C", "alpha", "beta")}


def power_law(x: np.ndarray, C: float, alpha: float, beta: float, b: float) -> np.ndarray:
    """ΔL = C · r^α · ℓ^(−β) + b, x = (r, ℓ)."""
    r, ell = x
    return C * np.power(r, alpha) * np.power(ell, -beta) + b


def saturating_law(x: np.ndarray, M: float, C: float, alpha: float, beta: float) -> np.ndarray:
    """ΔL = M · (1 − exp(−C · r^α · ℓ^(−β))): the power law's growth, capped at the achievable reduction M."""
    r, ell = x
    return M * (1.0 - np.exp(-C * np.power(r, alpha) * np.power(ell, -beta)))


def power_law_jacobian(x: np.ndarray, C: float, alpha: float, beta: float, b: float) -> np.ndarray:
    """[n, 4] ∂ΔL/∂(C, α, β, b) at x = (r, ℓ) [2, n]: with z = r^α · ℓ^(−β), (z, C·z·ln r, −C·z·ln ℓ, 1)."""
    r, ell = x
    z = np.power(r, alpha) * np.power(ell, -beta)
    return np.column_stack([z, C * z * np.log(r), -C * z * np.log(ell), np.ones_like(z)])


def saturating_law_jacobian(x: np.ndarray, M: float, C: float, alpha: float, beta: float) -> np.ndarray:
    """[n, 4] ∂ΔL/∂(M, C, α, β) at x = (r, ℓ) [2, n]: with z = r^α · ℓ^(−β) and e = exp(−C·z),
    (1 − e, M·z·e, M·C·z·e·ln r, −M·C·z·e·ln ℓ)."""
    r, ell = x
    z = np.power(r, alpha) * np.power(ell, -beta)
    e = np.exp(-C * z)
    g = M * C * z * e
    return np.column_stack([-np.expm1(-C * z), M * z * e, g * np.log(r), -g * np.log(ell)])


FUNCS: dict[str, Callable[..., np.ndarray]] = {"power": power_law, "saturating": saturating_law}
# given to the optimizer so it does not difference each law numerically (one call per parameter per step)
JACOBIANS: dict[str, Callable[..., np.ndarray]] = {"power": power_law_jacobian, "saturating": saturating_law_jacobian}


@dataclass
class LawFit:
    """One fitted form of the law: parameters with 95% intervals, R², RMSE and leave-one-out RMSE (nats
    per token), AIC, the number of points, and notes."""
    form: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # 95%
    r2: float
    rmse: float
    loo_rmse: float  # leave-one-out prediction error
    aic: float
    n: int
    x_name: str = "rank"
    notes: list[str] = field(default_factory=list)
    # α/β with its 95% interval (see capacity_exponent); None where β ≤ 0 or the covariance is not finite
    alpha_over_beta: tuple[float, float, float] | None = None

    def predict(self, r: float | np.ndarray, length: float | np.ndarray) -> np.ndarray:
        """ΔL (nats per token) at rank (or P_eff) `r` and length `length` (tokens), broadcast."""
        return FUNCS[self.form](np.array([np.asarray(r, float), np.asarray(length, float)]), *self.params.values())

    def to_dict(self) -> dict:
        """JSON form: form, x, the parameters, r2, rmse, loo_rmse, aic, n, intervals, notes."""
        d = {"form": self.form, "x": self.x_name, **self.params, "r2": self.r2, "rmse": self.rmse,
             "loo_rmse": self.loo_rmse, "aic": self.aic, "n": self.n,
             "intervals": {k: list(v) for k, v in self.intervals.items()}, "notes": self.notes}
        for k, (lo, hi) in self.intervals.items():
            d[f"{k}_ci"] = [lo, hi]
        if self.alpha_over_beta is not None:
            d["alpha_over_beta"], *ci = self.alpha_over_beta
            d["alpha_over_beta_ci"] = ci
        return d


def capacity_exponent(names, popt: np.ndarray, pcov: np.ndarray, t: float) -> tuple[float, float, float] | None:
    """α/β and its 95% interval: the exponent of the law's lines of equal ΔL. Both forms depend on r and ℓ only
    through r^α·ℓ^(−β), so ΔL is constant along ℓ ∝ r^(α/β): doubling the rank multiplies the length held at a
    given ΔL by 2^(α/β) (1: in proportion to the adapter's parameters). The ratio is pinned where α and
    β are not: when C trades off against b, α and β scale together and their ratio stays. Interval by the delta
    method, (α/β) ± t·√(g·Σ·g) with g = (1/β, −α/β²) and Σ the (α, β) block of `pcov` (the fit's covariance, k × k
    in `names` order), `t` the Student t quantile the parameters' intervals use. None where β ≤ 0 (ΔL not falling
    with length: no such line) or the covariance is not finite."""
    i, j = names.index("alpha"), names.index("beta")
    alpha, beta = float(popt[i]), float(popt[j])
    block = pcov[np.ix_([i, j], [i, j])]
    if beta <= 0 or not np.all(np.isfinite(block)):
        return None
    g = np.array([1.0 / beta, -alpha / beta ** 2])
    half = t * math.sqrt(max(float(g @ block @ g), 0.0))
    ratio = alpha / beta
    return ratio, ratio - half, ratio + half


def grid_problem(r, ell, n_params: int = 4) -> str | None:
    """Why the law's rank and length exponents cannot both be identified from points at these (rank, length)
    cells, or None when they can. r, ell: shape (n,), positive (ranks or P_eff; lengths in tokens). The law has
    `n_params` parameters (4 in either form), so the points need:
      - at least 2 distinct ranks and 2 distinct lengths;
      - at least n_params distinct (rank, length) cells (a cell's seeds are replicates: they add no equation);
      - cells not on one line in (log r, log ℓ): where ℓ = k·r^γ on every cell (say, each rank at 1.5 × its own
        frontier), r^α·ℓ^(−β) = k^(−β)·r^(α − γβ), so only α − γβ is identified, whatever the number of cells."""
    r, ell = np.asarray(r, float), np.asarray(ell, float)
    if len(np.unique(r)) < 2 or len(np.unique(ell)) < 2:
        return (f"degenerate grid: need at least 2 distinct ranks and 2 distinct lengths (got {len(np.unique(r))} "
                f"and {len(np.unique(ell))}); α and β cannot both be identified")
    cells = np.unique(np.column_stack([r, ell]), axis=0)
    if len(cells) < n_params:
        return (f"degenerate grid: {len(cells)} distinct (rank, length) cells, fewer than the law's {n_params} "
                "parameters (seeds at one cell are replicates); add a length at some rank")
    x = np.column_stack([np.ones(len(cells)), np.log(cells[:, 0]), np.log(cells[:, 1])])
    s = np.linalg.svd(x, compute_uv=False)
    if s[-1] <= 1e-9 * s[0]:
        gamma = float(np.polyfit(np.log(cells[:, 0]), np.log(cells[:, 1]), 1)[0])
        return (f"degenerate grid: every length is the same power of its rank (ℓ ∝ r^{gamma:.2f} on all "
                f"{len(cells)} cells), so only α − {gamma:.2f}·β can be identified, not α and β; add a second "
                "length at some rank")
    return None


def _validate_points(r: np.ndarray, ell: np.ndarray, dl: np.ndarray, n_params: int) -> None:
    if not (len(r) == len(ell) == len(dl)):
        raise MemcoreError(f"rank, length and delta_loss must have the same number of values "
                           f"({len(r)}, {len(ell)}, {len(dl)})")
    for name, v in (("rank", r), ("length", ell), ("delta_loss", dl)):
        if not np.all(np.isfinite(v)):
            raise MemcoreError(f"{name} has missing or non-finite values")
    if np.any(r <= 0) or np.any(ell <= 0):
        raise MemcoreError("rank and length must be positive (the law takes their logarithms)")
    if len(dl) < n_params + 2:
        raise MemcoreError(f"too few points to fit the law: {len(dl)} given, at least {n_params + 2} needed")
    problem = grid_problem(r, ell, n_params)
    if problem:
        raise MemcoreError(problem)
    if np.ptp(dl) == 0:
        raise MemcoreError("every delta_loss is the same: there is nothing to fit")


def _bounds(form: str, dl: np.ndarray) -> tuple[list[float], list[float]]:
    big = 10 * max(float(np.max(np.abs(dl))), 1e-6)
    if form == "power":
        return [0.0, -5.0, -5.0, -big], [np.inf, 5.0, 5.0, big]
    return [float(np.max(dl)) * 0.999 if np.max(dl) > 0 else 0.0, 0.0, -5.0, -5.0], [np.inf, np.inf, 5.0, 5.0]


def _grid_start(form: str, x: np.ndarray, dl: np.ndarray) -> np.ndarray:
    """A start near the global optimum by variable projection: on a grid of (α, β) (and, for the saturating
    form, the scale c = ln C) the parameters the law is linear in (C and b; M) are solved exactly, and the
    cell with the least squared error wins. Costs one vectorised pass instead of many nonlinear fits."""
    lr, ll = np.log(x[0]), np.log(x[1])
    lo, hi = _bounds(form, dl)
    if form == "power":
        alphas, betas = np.linspace(-5, 5, 81), np.linspace(-5, 5, 81)
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.exp(alphas[:, None, None] * lr - betas[None, :, None] * ll)  # [A, B, n] = r^α ℓ^-β
            zc = z - z.mean(-1, keepdims=True)
            yc = dl - dl.mean()
            C = np.clip((zc * yc).sum(-1) / (zc * zc).sum(-1), 0.0, None)  # [A, B] least squares slope, C >= 0
            b = np.clip(dl.mean() - C * z.mean(-1), lo[3], hi[3])
            sse = ((C[..., None] * z + b[..., None] - dl) ** 2).sum(-1)
        sse = np.where(np.isfinite(sse), sse, np.inf)
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        return np.array([C[i, j], alphas[i], betas[j], b[i, j]])
    alphas, betas = np.linspace(-5, 5, 21), np.linspace(-5, 5, 21)
    u = alphas[:, None, None] * lr - betas[None, :, None] * ll  # [A, B, n]: ln(r^α ℓ^-β)
    best = (np.inf, None)
    for c in np.linspace(-12, 12, 49):  # C·r^α·ℓ^-β spans e^-12 .. e^12 times the grid's own scale
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            g = -np.expm1(-np.exp(np.clip(c + u, -50, 50)))  # 1 - exp(-C z)
            M = np.clip((g * dl).sum(-1) / (g * g).sum(-1), lo[0], None)  # [A, B] exact M (>= the largest ΔL)
            sse = ((M[..., None] * g - dl) ** 2).sum(-1)
        sse = np.where(np.isfinite(sse), sse, np.inf)
        k = np.argmin(sse)
        if sse.flat[k] < best[0]:
            i, j = np.unravel_index(k, sse.shape)
            best = (sse.flat[k], np.array([M[i, j], math.exp(c), alphas[i], betas[j]]))
    return best[1]


def _least_squares(form: str, x: np.ndarray, dl: np.ndarray,
                   start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounded nonlinear least squares (scipy curve_fit, trust region) from `start`, else from the variable
    projection grid's best cell. Returns (parameters, covariance) or None if it does not converge."""
    from scipy.optimize import curve_fit

    lo, hi = _bounds(form, dl)
    p0 = _grid_start(form, x, dl) if start is None else start
    if p0 is None or not np.all(np.isfinite(p0)):
        return None
    p0 = np.clip(p0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    try:
        popt, pcov = curve_fit(FUNCS[form], x, dl, p0=p0, bounds=(lo, hi), maxfev=20000, jac=JACOBIANS[form])
    except (RuntimeError, ValueError):
        return None
    sse = float(np.sum((FUNCS[form](x, *popt) - dl) ** 2))
    return (popt, pcov) if np.isfinite(sse) else None


def loose_parameters(names, popt, intervals: dict[str, tuple[float, float]], pcov: np.ndarray,
                     wide: float = 4.0, tied: float = 0.99) -> list[str]:
    """A note naming the parameters these points do not tell apart: those in a pair correlated beyond `tied` (|ρ|,
    from the covariance pcov, k × k in `names` order) where either has a 95% interval that holds 0 and is more
    than `wide` times its estimate. The power law's C and b are such a pair where r^α·ℓ^(−β) barely varies over
    the points; with α and β near 0 as well, C·r^α·ℓ^(−β) + b ≈ (C + b) + C·α·ln r − C·β·ln ℓ and all four are.
    Then only combinations are fitted. [] when there is none; a parameter merely consistent with 0 (a tight
    interval around a small value, uncorrelated) is not one."""
    sd = np.sqrt(np.clip(np.diag(pcov), 1e-300, np.inf))
    corr = pcov / np.outer(sd, sd)

    def loose(i: int) -> bool:
        lo, hi = intervals[names[i]]
        return lo < 0 < hi and hi - lo > wide * abs(popt[i])

    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))
             if abs(corr[i, j]) > tied and (loose(i) or loose(j))]
    if not pairs:
        return []
    tangled = sorted({k for pair in pairs for k in pair})
    named = [names[k] for k in tangled]
    listed = ", ".join(named[:-1]) + f" and {named[-1]}"
    most = max(abs(corr[i, j]) for i, j in pairs)
    exponents = {"alpha", "beta"} & set(named)
    free = [names[k] for k in tangled if loose(k)]
    free_words = free[0] if len(free) == 1 else ", ".join(free[:-1]) + f" and {free[-1]}"
    return [f"{listed} trade off against each other (|correlation| up to {most:.3f}), and {free_words} "
            f"{'is' if len(free) == 1 else 'are'} not pinned down (95% interval holding 0, over {wide:g} times the "
            "estimate): these points fit combinations of them, not each one, so read the fit's "
            + ("predictions and α/β (the exponent of its lines of equal ΔL), not these values or their intervals"
               if exponents else
               "predictions and the exponents' intervals, not these values")]


def fit_law(r: np.ndarray, length: np.ndarray, delta_loss: np.ndarray, form: str = "power",
            x_name: str = "rank") -> LawFit:
    """Fit one form of the law to points at rank (or P_eff) `r` and `length` (tokens), `delta_loss` in nats per
    token, all of shape [n]: the parameters with 95% t intervals from the Jacobian, R², RMSE, leave-one-out RMSE,
    AIC, α/β with its interval (capacity_exponent) and notes on parameters the points do not pin down. Raises
    MemcoreError if the data cannot identify the form or no start converges."""
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would cost half a second to import

    if form not in FORMS:
        raise MemcoreError(f"unknown law form {form!r}; choose from {', '.join(FORMS)}")
    r, ell, dl = (np.asarray(v, dtype=float) for v in (r, length, delta_loss))
    names = PARAMS[form]
    _validate_points(r, ell, dl, len(names))
    x = np.array([r, ell])
    res = _least_squares(form, x, dl)
    if res is None:
        raise MemcoreError(f"the {form} law did not converge from any starting point")
    popt, pcov = res
    pred = FUNCS[form](x, *popt)
    sse = float(np.sum((pred - dl) ** 2))
    n, k = len(dl), len(names)
    sst = float(np.sum((dl - dl.mean()) ** 2))
    r2 = 1.0 - sse / sst
    t = float(stdtrit(max(1, n - k), 0.975))
    se = np.sqrt(np.clip(np.diag(pcov), 0, np.inf)) if np.all(np.isfinite(pcov)) else np.full(k, np.inf)
    intervals = {nm: (float(v - t * s), float(v + t * s)) for nm, v, s in zip(names, popt, se)}
    loo = []
    for i in range(n):  # each leave-one-out fit starts from the full fit's optimum, which is close
        keep = np.arange(n) != i
        sub = _least_squares(form, x[:, keep], dl[keep], start=popt)
        if sub is not None:
            loo.append(float(FUNCS[form](x[:, i:i + 1], *sub[0])[0] - dl[i]))
    aic = n * math.log(max(sse, 1e-300) / n) + 2 * k
    notes = []
    cells = len(np.unique(np.column_stack([r, ell]), axis=0))
    if cells <= k < n:  # seeds at a cell are replicates: k cells and k parameters leave the shape untested
        notes.append(f"these {n} points sit on only {cells} (rank, length) cells, as many as the law has parameters: "
                     "it can come close to every cell's mean whatever the law's shape, so R² measures mostly how the "
                     "points scatter within their cells, not whether the law is right (one more cell would test it)")
    if not np.all(np.isfinite(se)):
        notes.append("the parameter covariance could not be estimated: intervals are unbounded")
    else:
        notes += loose_parameters(names, popt, intervals, pcov)
    return LawFit(form=form, params=dict(zip(names, map(float, popt))), intervals=intervals, r2=r2,
                  rmse=math.sqrt(sse / n), loo_rmse=math.sqrt(np.mean(np.square(loo))) if loo else math.nan, aic=aic,
                  n=n, x_name=x_name, notes=notes, alpha_over_beta=capacity_exponent(names, popt, pcov, t))


def compare_forms(r: np.ndarray, length: np.ndarray, delta_loss: np.ndarray,
                  x_name: str = "rank") -> tuple[dict[str, LawFit], str]:
    """Fit every form; return the fits and the name of the one the data prefer (lowest AIC)."""
    fits = {}
    errors = []
    for form in FORMS:
        try:
            fits[form] = fit_law(r, length, delta_loss, form, x_name)
        except MemcoreError as e:
            errors.append(f"{form}: {e}")
    if not fits:
        reasons = {e.split(": ", 1)[1] for e in errors}
        raise MemcoreError(reasons.pop() if len(reasons) == 1 else "; ".join(errors))  # the data's fault: say it once
    return fits, min(fits, key=lambda f: fits[f].aic)


LAW_COLUMNS = ("rank", "length", "delta_loss")
NUMERIC_COLUMNS = ("rank", "length", "delta_loss", "p_eff", "seed", "noise")
MAX_CSV_BYTES = 50_000_000


def read_law_csv(source: str | Path | bytes, name: str | None = None,
                 required: tuple[str, ...] = LAW_COLUMNS) -> pd.DataFrame:
    """A CSV of law points (columns rank, length, delta_loss; optional p_eff, method, seed, ...) as a DataFrame,
    whatever spreadsheet wrote it: any Unicode encoding (memcore.textio; cp1252 last), LF or CRLF, delimiter
    , ; tab or | (read off the header line), and decimal commas where the delimiter is not a comma. Column names
    are matched without case or surrounding spaces. source: a path, or the file's bytes (an upload; `name` names
    it in messages).

    `required`: the columns that must be present and filled (the law's three by default).

    Raises MemcoreError naming the file and what is wrong: unreadable, empty, missing columns (with the columns
    that were found) or values that are not numbers (with how many and where)."""
    import csv
    import io

    import pandas as pd

    from memcore.textio import decode_text, read_user_file

    what = name or str(source) if not isinstance(source, bytes) else (name or "the CSV")
    if isinstance(source, bytes):  # spreadsheets on Windows save "CSV" in the ANSI code page: cp1252 comes last
        text = decode_text(source, what, legacy="cp1252")
    else:
        text = read_user_file(source, "CSV file", MAX_CSV_BYTES, legacy="cp1252")
    physical = text.splitlines()
    numbered = [(i + 1, ln) for i, ln in enumerate(physical) if ln.strip()]  # (line number, text) of non-blank lines
    if not numbered:
        raise MemcoreError(f"{what} is empty")
    hint = re.fullmatch(r'\s*"?sep=(.)"?\s*', numbered[0][1])  # Excel's "sep=;" first line names the delimiter
    if hint:
        numbered = numbered[1:]
        if not numbered:
            raise MemcoreError(f"{what} is empty")
    header_line = numbered[0][0]
    if hint:
        sep = hint.group(1)
    else:
        try:
            sep = csv.Sniffer().sniff(numbered[0][1], delimiters=",;\t|").delimiter
        except csv.Error:
            sep = ","  # a single column: nothing to sniff
    body = "\n".join(ln for _, ln in numbered[1:20])
    decimal = "," if sep != "," and re.search(r"\d,\d", body) else "."
    try:  # with decimal commas, a dot groups thousands (1.024 is 1024), as the same spreadsheets write it
        df = pd.read_csv(io.StringIO(text), sep=sep, decimal=decimal, thousands="." if decimal == "," else None,
                         skipinitialspace=True, skiprows=header_line - 1)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MemcoreError(f"cannot read {what} as CSV: {first}") from None
    df.columns = [str(c).strip().lower().replace(" ", "_") for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = ", ".join(df.columns) or "none"
        raise MemcoreError(f"{what} lacks column(s) {', '.join(missing)}; found {len(df.columns)} column(s): {found} "
                           f"(read with delimiter {sep!r}; needs {', '.join(required)}, optional p_eff, method, seed)")
    data_lines = [n for n, _ in numbered[1:]]  # the file line of each row (pandas skips blank lines too)

    def where(bad: np.ndarray) -> str:
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(data_lines[i]) if i < len(data_lines) else "?" for i in rows[:5])
        return f"line{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > 5 else ''}"

    for c in NUMERIC_COLUMNS:
        if c in df.columns:
            raw = df[c]
            if not pd.api.types.is_numeric_dtype(raw) and decimal == ",":
                # a column pandas left as text: read its numbers the same way
                raw = (raw.astype(str).str.replace(".", "", regex=False).str.replace(",", ".", regex=False)
                       .where(df[c].notna()))
            values = pd.to_numeric(raw, errors="coerce")
            bad = values.isna() & df[c].notna()
            if c in required:
                bad |= values.isna()
            if bad.any():
                raise MemcoreError(f"column {c} of {what} has {int(bad.sum())} empty or non-numeric value(s) "
                                   f"({where(bad.to_numpy())})")
            df[c] = values
    for c in ("rank", "length", "p_eff"):  # counts: a fraction here is a misread number, not data
        if c in df.columns:
            frac = (df[c] % 1 != 0).to_numpy()
            if frac.any():
                first = df[c].to_numpy()[frac][0]
                raise MemcoreError(f"column {c} of {what} must hold whole numbers, but has {int(frac.sum())} "
                                   f"fraction(s) such as {first:g} ({where(frac)}); is a thousands separator read "
                                   "as a decimal point?")
    return df


def smallest_rank(fit: LawFit, length: float, target_delta_loss: float, max_rank: int = 4096) -> int | None:
    """The smallest integer rank predicted to reach target ΔL at this length (None if none up to max_rank)."""
    ranks = np.arange(1, max_rank + 1)
    pred = fit.predict(ranks, np.full(len(ranks), float(length)))
    ok = np.flatnonzero(pred >= target_delta_loss)
    return int(ranks[ok[0]]) if len(ok) else None


# --- regime: where a sweep's points stand, and which of them the law is fitted on -----------------------------

# a run that stopped with its target memorized: every token above τ, or recalled verbatim (stop when recalled)
SATURATED_REASONS = ("all_above_tau", "recalled")


@dataclass
class Regime:
    """How a sweep's points ended. saturated: every target token above τ (memorized; ΔL is capped by the base
    loss); converged: stopped on a ΔL plateau short of that (capacity binds: where the paper fits its law);
    budget-bound: stopped at the step budget still improving (ΔL then measures speed, not capacity)."""

    n: int
    saturated: int
    converged: int
    budget_bound: int
    label: str
    known: bool  # False when the table says nothing about how points stopped (assumed fixed-budget)

    def shares(self) -> dict[str, float]:
        """Share of points saturated, converged and budget-bound (0..1 each)."""
        return {k: getattr(self, k) / self.n if self.n else 0.0 for k in ("saturated", "converged", "budget_bound")}

    def shares_words(self) -> str:
        """How the points stopped, in shares: '0% converged on a plateau, 62% saturated (...), 38% stopped at the
        step budget', with a word when the table does not say."""
        s = self.shares()
        head = (f"{s['converged']:.0%} converged on a plateau, "
                f"{s['saturated']:.0%} saturated (every token above τ or recalled), "
                f"{s['budget_bound']:.0%} stopped at the step budget")
        if not self.known:
            head += " (the table has no stop_reason or converged column: points are taken as fixed-budget runs)"
        return head

    def describe(self) -> str:
        """One line naming the regime and the shares behind it."""
        return f"regime: {self.label} — {self.shares_words()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the counts, label, known and shares."""
        return {"n": self.n, "saturated": self.saturated, "converged": self.converged,
                "budget_bound": self.budget_bound, "label": self.label, "known": self.known, "shares": self.shares()}


def as_bool(s: pd.Series) -> np.ndarray:
    """A CSV column of booleans as a bool array [n]: numbers (> 0.5) or words (true/1/yes, any case)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        return s.to_numpy().astype(float) > 0.5
    return s.astype(str).str.strip().str.lower().isin(("true", "1", "yes")).to_numpy()


def point_states(df: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """Per row: 'saturated', 'converged' or 'budget', read from stop_reason (else converged + frac_above, else
    frac_above alone, with every unsaturated point taken as budget-bound). Returns (states [n], known)."""
    n = len(df)
    above = df["frac_above"].to_numpy(float) >= 1.0 if "frac_above" in df.columns else np.zeros(n, bool)
    if "stop_reason" in df.columns:
        reason = df["stop_reason"].astype(str).to_numpy()
        sat = np.isin(reason, SATURATED_REASONS) | above
        conv = (reason == "plateau") & ~sat
        known = True
    elif "converged" in df.columns:
        c = df["converged"]
        sat, conv, known = above, as_bool(c) & ~above, True
    else:
        sat, conv, known = above, np.zeros(n, bool), False
    return np.where(sat, "saturated", np.where(conv, "converged", "budget")), known


def regime(df: pd.DataFrame) -> Regime:
    """The regime a sweep table is in, from how its points stopped (see Regime). The label names the majority:
    'budget-bound (optimization)', 'capacity-bound (converged)', 'saturated', or 'mixed' when none has half."""
    states, known = point_states(df)
    n = len(states)
    counts = {k: int((states == k).sum()) for k in ("saturated", "converged", "budget")}
    labels = {"budget": "budget-bound (optimization)", "converged": "capacity-bound (converged)",
              "saturated": "saturated"}
    top = max(counts, key=lambda k: counts[k])
    label = labels[top] if n and counts[top] * 2 > n else "mixed"
    return Regime(n, counts["saturated"], counts["converged"], counts["budget"], label, known)


def law_points(df: pd.DataFrame, min_points: int = 6) -> tuple[pd.DataFrame, str]:
    """The rows the law is fitted on, and a sentence saying which: the paper fits converged, unsaturated points;
    when fewer than `min_points` of those exist, every unsaturated point; when those are too few as well, all
    points (each fallback said in the sentence)."""
    states, known = point_states(df)
    conv = df[states == "converged"]
    if known and len(conv) >= min_points:
        return conv, f"fitted on the {len(conv)} converged, unsaturated points (as the paper does)"
    unsat = df[states != "saturated"]
    if len(unsat) >= min_points:
        if not known:
            why = "the table does not say which points converged"
        elif len(conv) == 0:
            why = "none converged on a plateau short of saturation"
        else:
            why = f"only {_points(len(conv))} converged on a plateau short of saturation, fewer than {min_points}"
        return unsat, f"fitted on the {len(unsat)} unsaturated points ({why})"
    have = "none is" if len(unsat) == 0 else f"only {_points(len(unsat))} {'is' if len(unsat) == 1 else 'are'}"
    return df, f"fitted on all {len(df)} points ({have} unsaturated)"


def _points(n: int) -> str:
    return f"{n} point{'s' if n != 1 else ''}"


# --- tables: the points a fit reads, and every form fitted to them ----------------------------------------------

RUN_COLUMNS = ("rank", "length", "delta_loss", "p_eff", "method", "seed", "frac_above", "token_accuracy",
               "exact_recall", "stop_reason", "bits_per_param", "adapter", "data", "source_bits_per_token")


def method_rows(df: pd.DataFrame, method: str | None) -> pd.DataFrame:
    """The rows of one method; the whole table when method is None or the table has no method column."""
    return df[df["method"] == method] if method is not None and "method" in df.columns else df


def one_method(df: pd.DataFrame, asked: str | None) -> tuple[pd.DataFrame, str | None, str | None]:
    """The rows of one method, for an answer that must not mix methods: the asked one, else (when the table mixes
    methods) memft-ot or the first in order. Returns (rows, the method or None when the table names none, a note
    saying which was picked when the table mixed them and none was asked, else None)."""
    if "method" not in df.columns or df["method"].nunique() <= 1:
        return df, (df["method"].iloc[0] if "method" in df.columns and len(df) else asked), None
    if asked:
        return df[df["method"] == asked], asked, None
    methods = sorted(df["method"].unique())
    pick = "memft-ot" if "memft-ot" in methods else methods[0]
    return df[df["method"] == pick], pick, f"the table holds {', '.join(methods)}; using {pick} (choose with --method)"


CHAIN_SWEEP = ("{sweep} is a chain sweep (memcore sweep --chain): its runs are first passages and passages "
               "trained on top of them, not points of the law; its table is the first passage's retention "
               "(memcore sweep --chain ... --out, or the law page's 'Memory that keeps changing')")
"""What is said when a chain sweep is read as law points."""


def runs_table(store: Store, *, method: str | None = None, model: str | None = None,
               sweep: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The store's completed runs (of `method`, `model` and `sweep` where given) as law points, one row per run
    with a ΔL, columns RUN_COLUMNS: rank, length (target tokens), delta_loss (nats per token), p_eff (trainable
    parameters), method, seed, frac_above (share of tokens with p > τ), token_accuracy (share whose teacher-forced
    argmax is right), exact_recall (bool), stop_reason, bits_per_param, adapter (lora, bypass, ...), data
    (random_tokens, pairs, phonebook or text) and source_bits_per_token (information per target token where the
    run knows it: random tokens).

    Returns (table, notes): a note for each of adapter and data that the runs mix, since points trained
    differently need not lie on one law. Raises MemcoreError when no completed run matches."""
    import pandas as pd

    from memcore.chain import is_chain_label

    rows, chained = [], 0
    for r in store.runs(method=method, model=model, status="completed", sweep=sweep):
        s = r["summary"]
        if sweep and is_chain_label(r["label"]):
            raise MemcoreError(CHAIN_SWEEP.format(sweep=sweep))
        if r["spec"]["train"].get("after"):  # started from another run's adapter: not a point of the law
            chained += 1
            continue
        if s and s.delta_loss is not None:
            n = s.n_tokens
            data = next((k for k in ("random_tokens", "pairs", "phonebook") if r["spec"]["data"].get(k)), "text")
            rows.append({"rank": r["rank"], "length": n, "delta_loss": s.delta_loss, "p_eff": s.p_eff,
                         "method": r["method"], "seed": r["seed"], "frac_above": s.n_above / n,
                         "token_accuracy": s.n_correct / n, "exact_recall": bool(s.exact_recall),
                         "stop_reason": s.stop_reason, "bits_per_param": s.bits_per_param, "adapter": s.adapter,
                         "data": data, "source_bits_per_token": s.source_bits_per_token})
    df = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if df.empty:
        raise MemcoreError("no completed runs match in the store (see `memcore runs`), or give --csv FILE"
                           + (f" ({chained} trained on top of another run are not law points)" if chained else ""))
    notes = []
    if chained:
        notes.append(f"{chained} run(s) trained on top of another (--after) left out: their ΔL starts from an adapter "
                     "that already holds another passage, so they are not points of the law")
    for col, what in (("adapter", "adapters"), ("data", "kinds of data")):
        kinds = sorted(df[col].unique())
        if len(kinds) > 1:
            notes.append(f"the store's runs mix {what} ({', '.join(kinds)}); points trained differently need not lie "
                         "on one law or frontier: fit one sweep's CSV (`memcore sweep --out`) for a clean answer")
    return df, notes


def law_table(csv: str | Path | None = None, store: Store | None = None, *, method: str | None = None,
              model: str | None = None, sweep: str | None = None,
              required: tuple[str, ...] = LAW_COLUMNS) -> tuple[pd.DataFrame, list[str]]:
    """The one table the law and frontier fits read: the CSV file `csv` when given (read_law_csv, which must hold
    the `required` columns; only `method`'s rows when it has a method column; model and sweep do not apply to a
    CSV), else the completed runs in `store` (runs_table, filtered by method, model and sweep). Columns as
    read_law_csv and runs_table: rank, length (target tokens), delta_loss (nats per token), optional p_eff,
    method, seed and the recall and stop columns.

    Returns (table, notes for the reader). Raises MemcoreError: the CSV's problems as read_law_csv words them, no
    completed run matching in the store, or neither a CSV nor a store given."""
    if csv:
        return method_rows(read_law_csv(csv, required=required), method), []
    if store is None:
        raise MemcoreError("no law points: give a CSV file of them or a store of runs")
    return runs_table(store, method=method, model=model, sweep=sweep)


@dataclass
class LawFits:
    """Every form of the law fitted to one table's points (fit_all)."""

    forms: dict[str, LawFit]  # form -> its fit, for each form that could be fitted
    preferred: str  # the form the data prefer (lowest AIC)
    regime: Regime  # how the table's points stopped
    fitted_on: str  # which points the forms were fitted on, in a sentence (law_points)
    p_eff: LawFit | None = None  # the main form again in x = P_eff (fit_all with_p_eff)
    p_eff_error: str | None = None  # why that fit failed
    notes: list[str] = field(default_factory=list)  # what a reader of the fit must know about its points
    fitted_regime: Regime | None = None  # how the points the law is fitted on stopped (a subset of regime's)

    def regime_words(self) -> str:
        """How the table's points stopped, which of them the law is fitted on, and the regime of those, in Markdown:
        the table's majority alone misleads when it is exactly what the fit leaves out (a sweep mostly saturated,
        fitted on its unsaturated points, all stopped at the step budget, is a budget-bound fit). E.g. "How its
        points stopped: 0% converged on a plateau, 62% saturated (...), 38% stopped at the step budget. Fitted on
        the 18 unsaturated points (...): all 18 stopped at the step budget, so the fit is **budget-bound
        (optimization)**: its ΔL measures how far the step budget got, not capacity." """
        head = f"How its points stopped: {self.regime.shares_words()}. {self.fitted_on[:1].upper()}{self.fitted_on[1:]}"
        f = self.fitted_regime
        if f is None or not f.n:
            return head + "."
        what = {"budget-bound (optimization)": "its ΔL measures how far the step budget got, not capacity",
                "capacity-bound (converged)": "as the paper fits its law",
                "saturated": "ΔL there is capped by the base loss, not by capacity",
                "mixed": "its points stopped in more than one way"}.get(f.label, "")
        counts = [(k, how) for k, how in ((f.converged, "converged on a plateau"),
                                          (f.budget_bound, "stopped at the step budget"), (f.saturated, "saturated"))
                  if k]
        said = f"all {f.n} {counts[0][1]}" if len(counts) == 1 else ", ".join(f"{k} {how}" for k, how in counts)
        return f"{head}: {said}, so the fit is **{f.label}**" + (f": {what}." if what else ".")

    @property
    def clear_preference(self) -> bool:
        """Whether the preferred form wins by an AIC gap of at least 2 (below that the data support both about
        equally: Burnham & Anderson 2002)."""
        aics = sorted(f.aic for f in self.forms.values())
        return len(aics) < 2 or aics[1] - aics[0] >= 2

    def preference(self) -> str:
        """The comparison in words: which form the data prefer, or that they do not tell the forms apart."""
        if self.clear_preference:
            return f"the data prefer the {self.preferred} form"
        return "the data do not tell the forms apart (AIC within 2)"

    @property
    def main(self) -> LawFit:
        """The fit reported first: the power law (the paper's form) when it was fitted, else the preferred form."""
        return self.forms["power"] if "power" in self.forms else self.forms[self.preferred]

    def to_dict(self) -> dict[str, Any]:
        """main.to_dict(), then comparison (aic and r2 per form, preferred, each form's to_dict), p_eff_fit (its
        to_dict, or {"error": why}) when it was attempted, regime (the whole table's Regime.to_dict), fitted_on and
        fitted_regime (the fitted points' Regime.to_dict)."""
        out = self.main.to_dict()
        out["comparison"] = {"aic": {f: fit.aic for f, fit in self.forms.items()},
                             "r2": {f: fit.r2 for f, fit in self.forms.items()},
                             "preferred": self.preferred, "clear": self.clear_preference,
                             "forms": {f: fit.to_dict() for f, fit in self.forms.items()}}
        if self.p_eff is not None:
            out["p_eff_fit"] = self.p_eff.to_dict()
        elif self.p_eff_error is not None:
            out["p_eff_fit"] = {"error": self.p_eff_error}
        out["regime"], out["fitted_on"] = self.regime.to_dict(), self.fitted_on
        if self.fitted_regime is not None:
            out["fitted_regime"] = self.fitted_regime.to_dict()
        out["notes"] = [*self.notes, *out.get("notes", [])]
        return out


def fit_all(df: pd.DataFrame, *, with_p_eff: bool = False) -> LawFits:
    """Fit every form of the law to a table of points: its regime, the points the law is fitted on
    (law_points), each form (compare_forms) and the one the data prefer. df: rank, length (target tokens),
    delta_loss (nats per token); optional p_eff (trainable parameters) and stop_reason, converged, frac_above
    (how each point stopped). With with_p_eff and more than one P_eff value among the fitted points, the main
    form is fitted again with x = P_eff; its failure is kept in p_eff_error, not raised.

    Raises MemcoreError naming the missing column(s) when rank, length or delta_loss is absent, and when no form
    can be fitted (too few points, a degenerate grid, non-finite values: fit_law's messages)."""
    missing = [c for c in LAW_COLUMNS if c not in df.columns]
    if missing:
        raise MemcoreError(f"the table lacks column(s) {', '.join(missing)}; found: {', '.join(map(str, df.columns))}")
    reg = regime(df)
    pts, how = law_points(df)
    r, length, dl = (pts[c].to_numpy(float) for c in LAW_COLUMNS)
    forms, preferred = compare_forms(r, length, dl)
    fits = LawFits(forms, preferred, reg, how, notes=negative_delta_loss(pts), fitted_regime=regime(pts))
    if with_p_eff and "p_eff" in pts.columns and pts["p_eff"].notna().all() and pts["p_eff"].nunique() > 1:
        try:
            fits.p_eff = fit_law(pts["p_eff"].to_numpy(float), length, dl, fits.main.form, x_name="p_eff")
        except MemcoreError as e:
            fits.p_eff_error = str(e)
    return fits


def negative_delta_loss(df: pd.DataFrame) -> list[str]:
    """A note naming the points whose ΔL is below 0 (the loss rose in training: a diverged run, or a learning
    rate too high), which a fit takes as they are; no note when there are none."""
    bad = df[df["delta_loss"] < 0]
    if bad.empty:
        return []
    shown = ", ".join(f"rank {r:g} length {n:g} (ΔL {d:.3f})" for r, n, d in
                      bad[["rank", "length", "delta_loss"]].to_numpy(float)[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return [f"{len(bad)} point{'s' if len(bad) != 1 else ''} with a negative ΔL, where the loss rose in training (a "
            f"diverged run? too high a learning rate?): {shown}{more}; fitted as "
            f"{'it is: drop or rerun it if it' if len(bad) == 1 else 'they are: drop or rerun them if they'} failed"]


# --- a user's own runs beside a sweep -----------------------------------------------------------------------------

OWN_RUN_COLUMNS = ("run_id", "method", "rank", "length", "delta_loss", "token_accuracy", "exact_recall")


def own_runs(store: Store) -> pd.DataFrame:
    """The store's completed runs outside any sweep (a user's own), one row each, columns OWN_RUN_COLUMNS: run_id,
    method, rank, length (target tokens), delta_loss (nats per token), token_accuracy (share of target tokens
    whose teacher-forced argmax is right) and exact_recall (1.0 when the whole target was recalled, else 0.0)."""
    import pandas as pd

    rows = [{"run_id": r["id"], "method": r["method"], "rank": r["rank"], "length": s.n_tokens,
             "delta_loss": s.delta_loss, "token_accuracy": s.n_correct / s.n_tokens,
             "exact_recall": float(bool(s.exact_recall))}
            for r in store.runs(status="completed")
            if not r["sweep"] and not r["spec"]["train"].get("after") and (s := r["summary"])]
    return pd.DataFrame(rows, columns=list(OWN_RUN_COLUMNS))


def comparable_settings(spec: RunSpec) -> dict[str, Any]:
    """The settings that decide where a run lands on a sweep's grid, in words a reader compares: adapter, layers,
    data (random tokens, JSONL pairs, PhoneBook or text), lr, dropout, max steps, until and model. A shipped
    sweep's JSON side file holds the same keys under "settings"."""
    d = spec.data
    data = ("random tokens" if d.random_tokens is not None else "JSONL pairs" if d.pairs is not None
            else "PhoneBook" if d.phonebook is not None else "text")
    return {"adapter": spec.adapter.kind, "layers": str(spec.adapter.layers), "data": data, "lr": spec.train.lr,
            "dropout": spec.adapter.dropout, "max steps": spec.train.max_steps, "until": spec.train.until,
            "model": spec.model.name}


def sweep_mismatches(store: Store, sweep_settings: dict[str, Any]) -> list[str]:
    """For each of the user's own completed runs (outside any sweep) trained unlike a sweep, one line naming the
    run and each differing setting with the sweep's value, e.g. "run 2026... differs from the sweep in adapter
    lora (sweep: bypass)". sweep_settings: the sweep's comparable_settings (keys it lacks are not compared)."""
    notes = []
    for r in store.runs(status="completed"):
        if r["sweep"] or not r["summary"]:
            continue
        diff = [f"{k} {v!s} (sweep: {sweep_settings[k]!s})"
                for k, v in comparable_settings(RunSpec.from_dict(r["spec"])).items()
                if k in sweep_settings and v != sweep_settings[k]]
        if diff:
            notes.append(f"run {r['id']} differs from the sweep in " + ", ".join(diff))
    return notes
