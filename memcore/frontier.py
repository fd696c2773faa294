"""The verbatim-recall frontier: the longest target a rank recalls verbatim, and the capacity it implies.

A point of a sweep (rank r, length ℓ, seed) is *recalled* when every teacher-forced argmax is right, so greedy
decoding reproduces the whole target (DESIGN.md §2). Two estimates of the frontier ℓ*(r):

- **interpolated**, per rank: the recall rate (share of seeds) at each measured length, and the length where
  it crosses 1/2, interpolated linearly in log ℓ between the last length at or above 1/2 and the next one
  below. When every length is recalled ℓ* is only known to be at least the longest (a lower bound); when none
  is, at most the shortest (an upper bound).
- **fitted**, over all points: P(recalled | r, ℓ) = σ(k · (a + γ·ln r − ln ℓ)), so ℓ*(r) = e^a · r^γ, by maximum
  likelihood (k bounded, since a sharp frontier separates the data perfectly), with 95% intervals from a
  bootstrap over points (resampled within each rank).

Capacity: bits stored per trainable parameter at the frontier, ℓ*(r) · (bits stored per recalled token) /
P_eff(r), with bits stored = Σ (base_loss − loss) / ln 2 over target tokens, compared with about 2 bits/param
(Allen-Zhu & Li, "Physics of Language Models 3.3") and 3.6 bits/param (Morris et al. 2025, "How much do
language models memorize?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from memcore.config import MemcoreError
from memcore.law import as_bool, method_rows

if TYPE_CHECKING:
    import pandas as pd

    from memcore.store import Store

REFERENCE_BITS_PER_PARAM = {"knowledge (Allen-Zhu & Li)": 2.0, "random data (Morris et al.)": 3.6}
MAX_SHARPNESS = 40.0  # bound on k (per unit of ln ℓ): a perfectly separated frontier sits at the bound
A_BOUNDS, GAMMA_BOUNDS, K_BOUNDS = (-20.0, 40.0), (-5.0, 10.0), (0.05, MAX_SHARPNESS)  # (a, γ, k) in the fit
BOOTSTRAP = 300
RECALL_COLUMNS = ("exact_recall", "recalled")  # says whether a point was recalled verbatim, newest first


def has_recall(df: pd.DataFrame) -> bool:
    """Whether the table says which points were recalled verbatim (recall_column would find a column)."""
    return any(c in df.columns for c in RECALL_COLUMNS)


def recall_column(df: pd.DataFrame) -> str:
    """The column saying whether a point was recalled verbatim: exact_recall (sweeps since the recall columns),
    else recalled. Raises MemcoreError when neither is present."""
    for c in RECALL_COLUMNS:
        if c in df.columns:
            return c
    raise MemcoreError("the table has no exact_recall (or recalled) column: the frontier needs to know which points "
                       "were recalled verbatim (sweeps write it; see `memcore sweep --out`)")


@dataclass
class RankFrontier:
    """The verbatim-recall frontier at one rank: ℓ* (tokens), whether it is interpolated or a bound, and
    the recall rate per length."""
    rank: int
    ell_star: float  # tokens: interpolated longest length recalled verbatim
    bound: str  # 'interpolated', 'at least' (every length recalled) or 'at most' (none recalled)
    recall_rate: dict[int, float]  # length -> share of seeds recalled
    p_eff: float | None = None
    bits_per_param: float | None = None  # at ell_star


@dataclass
class FrontierFit:
    """ℓ*(r) = e^a · r^γ with P(recalled) = σ(k · (a + γ ln r − ln ℓ)); intervals are bootstrap 95%."""

    a: float
    gamma: float
    k: float
    a_interval: tuple[float, float]
    gamma_interval: tuple[float, float]
    n: int
    ranks: tuple[float, float]  # measured range of ranks
    lengths: tuple[float, float]  # measured range of lengths (tokens)
    boot: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))  # [B, 2] bootstrap (a, γ)
    bits_per_token: float | None = None  # mean bits stored per token over recalled points
    p_eff_per_rank: float | None = None  # P_eff / r (the placement's parameters per unit of rank)
    notes: list[str] = field(default_factory=list)
    separating: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)  # (A_ub, b_ub) when separated
    # (rank, length, recalled)
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(repr=False, default=None)
    source_bits: float | None = None  # information in one target token when the data say (random tokens: log2 V)

    def ell_star(self, rank: float | np.ndarray) -> np.ndarray:
        """Frontier length in tokens at this rank (array in, array out)."""
        return np.exp(self.a + self.gamma * np.log(np.asarray(rank, dtype=float)))

    def _envelope(self, rank: float) -> tuple[float, float] | None:
        """Smallest and largest ℓ*(rank) of any line ln ℓ* = a + γ ln r that separates recalled from unrecalled
        points (two linear programs), or None when the data are not perfectly separated."""
        if self.separating is None:
            return None
        from scipy.optimize import linprog

        A, b = self.separating
        c = np.array([1.0, math.log(rank)])
        lo = linprog(c, A_ub=A, b_ub=b, bounds=[(-50, 50), (-10, 10)])
        hi = linprog(-c, A_ub=A, b_ub=b, bounds=[(-50, 50), (-10, 10)])
        if lo.status != 0 or hi.status != 0:
            return None
        return math.exp(lo.fun), math.exp(-hi.fun)

    def ell_star_interval(self, rank: float) -> tuple[float, float]:
        """95% interval of ℓ*(rank), tokens: the bootstrap's, widened (for perfectly separated data) to every
        separating line's value at this rank, since the data cannot place the frontier inside that range."""
        vals = self.ell_star_boot(rank)
        lo, hi = float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))
        env = self._envelope(rank)
        return (min(lo, env[0]), max(hi, env[1])) if env else (lo, hi)

    def ell_star_boot(self, rank: float) -> np.ndarray:
        """[B] the bootstrap's ℓ*(rank), tokens (one per resample, in the order drawn)."""
        return np.exp(self.boot[:, 0] + self.boot[:, 1] * math.log(rank))

    def recall_probability(self, rank: float, length: float, level: float = 0.95) -> tuple[float, float, float]:
        """P(recalled) of a run at `rank` and `length` tokens on the fitted curve σ(k · (a + γ ln r − ln ℓ)), with
        the bootstrap's percentile interval at `level` (each resample's a and γ, the fit's k). Returns (p, lo, hi),
        each in [0, 1]."""
        z = lambda a, g: self.k * (a + g * math.log(rank) - math.log(length))  # noqa: E731
        boot = 1.0 / (1.0 + np.exp(-z(self.boot[:, 0], self.boot[:, 1])))
        tail = (1 - level) / 2
        return (float(1.0 / (1.0 + math.exp(-z(self.a, self.gamma)))), float(np.quantile(boot, tail)),
                float(np.quantile(boot, 1 - tail)))

    def rank_for(self, length: float) -> float:
        """The (real) rank at which ℓ* equals `length`: (length / e^a)^(1/γ)."""
        return float(math.exp((math.log(length) - self.a) / self.gamma))

    def rank_interval(self, length: float) -> tuple[float, float]:
        """95% interval of the rank whose frontier reaches `length`: from the bootstrap, widened as in
        ell_star_interval (the ranks at which the upper and the lower bound of ℓ* reach the length)."""
        g = np.where(np.abs(self.boot[:, 1]) < 1e-9, 1e-9, self.boot[:, 1])
        vals = np.exp((math.log(length) - self.boot[:, 0]) / g)
        lo, hi = float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))
        if self.separating is not None:
            grid = np.geomspace(max(lo, 1e-3) / 64, hi * 64, 160)
            if self.points is not None:
                grid = np.unique(np.concatenate([grid, self.points[0]]))
            env = [self._envelope(r) for r in grid]
            up = [r for r, e in zip(grid, env) if e and e[1] >= length * (1 - 1e-6)]
            down = [r for r, e in zip(grid, env) if e and e[0] >= length * (1 - 1e-6)]
            lo = min(lo, up[0]) if up else lo
            hi = max(hi, down[0]) if down else math.inf  # no separating line is ruled out: unbounded above
        return lo, hi

    @property
    def capacity_bits_per_token(self) -> float | None:
        """Bits counted per memorized token: those stored (loss reduction), but no more than the token carries
        (source_bits) when known: on random tokens a base model can be worse than uniform, so its loss drops by
        more than log2 V bits per token without storing more than log2 V."""
        if self.bits_per_token is None:
            return None
        return min(self.bits_per_token, self.source_bits) if self.source_bits else self.bits_per_token

    def bits_per_param(self, rank: float) -> float | None:
        """ℓ*(r) · capacity_bits_per_token / P_eff(r), with P_eff(r) = r · P_eff per rank."""
        if self.capacity_bits_per_token is None or not self.p_eff_per_rank:
            return None
        return float(self.ell_star(rank)) * self.capacity_bits_per_token / (rank * self.p_eff_per_rank)

    def measured_bounds(self, length: float) -> tuple[float, float]:
        """From the points alone: (largest rank measured to fail `length` or less, smallest rank measured to recall
        `length` or more), a recall rate over seeds of at least 1/2 counting as recalled; 0 and inf when none."""
        if self.points is None:
            return 0.0, math.inf
        r, ell, y = self.points
        fail, ok = 0.0, math.inf
        for rank in np.unique(r):
            for L in np.unique(ell[r == rank]):
                rate = float(y[(r == rank) & (ell == L)].mean())
                if rate >= 0.5 and L >= length:
                    ok = min(ok, float(rank))
                if rate < 0.5 and L <= length:
                    fail = max(fail, float(rank))
        return fail, ok

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "gamma": self.gamma, "k": self.k, "a_ci": list(self.a_interval),
                "gamma_ci": list(self.gamma_interval), "n": self.n, "ranks": list(self.ranks),
                "lengths": list(self.lengths), "bits_per_token": self.bits_per_token,
                "p_eff_per_rank": self.p_eff_per_rank, "notes": self.notes}


def interpolated_frontier(df: pd.DataFrame) -> list[RankFrontier]:
    """Per rank, the length where the recall rate crosses 1/2, interpolated in log ℓ (see the module docstring).

    df: one row per point with rank, length (tokens) and exact_recall/recalled; optional p_eff, bits_per_param.
    Raises MemcoreError when the recall column is missing or the table is empty."""
    col = recall_column(df)
    if df.empty:
        raise MemcoreError("no points to find a frontier in")
    out = []
    d = df.assign(_rec=as_bool(df[col]))
    per_token, src = _bits_per_token(d), _source_bits(df)
    # no more than a token carries
    counted = min(per_token, src) if per_token is not None and src is not None else per_token
    for rank, g in sorted(d.groupby("rank"), key=lambda kv: kv[0]):
        rates = g.groupby("length")["_rec"].mean().sort_index()
        lengths, r = rates.index.to_numpy(float), rates.to_numpy(float)
        ok = np.flatnonzero(r >= 0.5)
        if len(ok) == 0:
            ell, bound = lengths[0], "at most"
        elif ok[-1] == len(r) - 1:
            ell, bound = lengths[-1], "at least"
        else:
            i = ok[-1]
            frac = (r[i] - 0.5) / (r[i] - r[i + 1]) if r[i] != r[i + 1] else 0.5
            ell, bound = math.exp(math.log(lengths[i])
                                  + frac * (math.log(lengths[i + 1]) - math.log(lengths[i]))), "interpolated"
        p_eff = float(g["p_eff"].iloc[0]) if "p_eff" in g.columns and g["p_eff"].notna().any() else None
        bpp = ell * counted / p_eff if counted is not None and p_eff else None
        out.append(RankFrontier(int(rank), float(ell), bound, {int(k): float(v) for k, v in rates.items()}, p_eff, bpp))
    return out


def _bits_per_token(d: pd.DataFrame) -> float | None:
    """Mean bits stored per target token over recalled points (needs bits_per_param and p_eff columns)."""
    if not {"bits_per_param", "p_eff"} <= set(d.columns):
        return None
    rec = d[d["_rec"]]
    if rec.empty:
        return None
    return float((rec["bits_per_param"] * rec["p_eff"] / rec["length"]).mean())


def _neg_log_lik(theta: np.ndarray, lr: np.ndarray, ll: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood (nats) of recall outcomes y [n] under P(recall) = σ(k·(a + γ·ln r − ln ℓ)), and its
    gradient [3] in (a, γ, k): with z = k·u, u = a + γ·ln r − ln ℓ and g = σ(z) − y, ∂/∂a = k·Σg, ∂/∂γ = k·Σg·ln r,
    ∂/∂k = Σg·u. Given to the optimizer so it does not difference the function numerically (four calls a step)."""
    a, gamma, k = theta
    u = a + gamma * lr - ll
    z = k * u
    g = 0.5 * (1.0 + np.tanh(0.5 * z)) - y  # σ(z) − y, without overflow
    return float(_logistic_nll(z, y)), np.array([k * g.sum(), k * (g @ lr), g @ u])


def _logistic_nll(z: np.ndarray, y: np.ndarray, counts: np.ndarray | float = 1.0) -> np.ndarray:
    """Σ counts·(softplus(z) − y·z) over the last axis (nats): −log σ(z) for a recalled point, −log σ(−z) for one
    not recalled, computed stably. z: [..., n] logits, y: [n] outcomes, counts: [..., n] (or 1) weights. The one
    likelihood both fits (_mle through _neg_log_lik, _mle_many) minimize."""
    return (counts * (np.logaddexp(0.0, z) - y * z)).sum(-1)


def _start(lr: np.ndarray, ll: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the fit of (a, γ, k) starts: a line of slope 1 through the middle of the recalled points, nudged out
    by 0.35 in ln ℓ (about 40%) towards the boundary, at a moderate sharpness."""
    return np.array([float(np.mean(ll[y > 0]) - np.mean(lr[y > 0])) + 0.35, 1.0, 5.0])


def _bootstrap_counts(r: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[B, n] how often each of the n points is drawn in each of B <= `resamples` bootstrap resamples, drawn
    within each rank (so every resample keeps the design's ranks) from a generator seeded with `seed`. A
    resample in which every point, or none, was recalled has no frontier to fit and is dropped."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(r == v) for v in np.unique(r)]
    counts = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        if y[idx].all() or not y[idx].any():
            continue
        counts.append(np.bincount(idx, minlength=len(y)))
    return np.array(counts, dtype=int).reshape(len(counts), len(y))


def _mle(lr: np.ndarray, ll: np.ndarray, y: np.ndarray, start: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(_neg_log_lik, start, args=(lr, ll, y), method="L-BFGS-B", jac=True,
                   bounds=[A_BOUNDS, GAMMA_BOUNDS, K_BOUNDS])
    return res.x


def _mle_many(lr: np.ndarray, ll: np.ndarray, y: np.ndarray, counts: np.ndarray, start: np.ndarray,
              max_iter: int = 100) -> np.ndarray:
    """Maximum-likelihood (a, γ, k) for many weightings of one set of points at once: [B, 3], one row per row of
    `counts` [B, n] (how often each of the n points is drawn in that bootstrap resample).

    In w = (k·a, k·γ, k) the model is a logistic regression on (1, ln r, −ln ℓ), so the log-likelihood is concave
    and has one maximum; it is found for all rows together by Newton's method, projected onto k's bounds (a
    sharp frontier's k sits at MAX_SHARPNESS), with backtracking. A row that does not converge, or whose a or γ
    leaves the bounds _mle keeps them in, is refitted alone by _mle. One batched solve of 300 rows costs about
    what ten single L-BFGS-B fits do (bench/bench_frontier.py)."""
    c = np.asarray(counts, dtype=float)
    x = np.column_stack([np.ones_like(lr), lr, -ll])  # [n, 3]: z = x @ w
    k_lo, k_hi = K_BOUNDS

    def nll(w: np.ndarray, c: np.ndarray) -> np.ndarray:  # [b] nats, rows of w and c
        return _logistic_nll(w @ x.T, y, c)

    w = np.tile([start[2] * start[0], start[2] * start[1], start[2]], (len(c), 1))
    f = nll(w, c)
    active = np.ones(len(c), dtype=bool)  # rows still being improved
    converged = np.zeros(len(c), dtype=bool)
    for _ in range(max_iter):
        if not active.any():
            break
        wa, ca = w[active], c[active]
        z = wa @ x.T
        s = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z)
        g = ((s - y) * ca) @ x  # [b, 3] gradient of the nll
        h = np.einsum("bn,ni,nj->bij", ca * s * (1.0 - s), x, x)  # [b, 3, 3] its Hessian
        k = wa[:, 2]
        held = ((k <= k_lo) & (g[:, 2] > 0)) | ((k >= k_hi) & (g[:, 2] < 0))  # k pressed against its bound
        g[held, 2] = 0.0
        h[held, 2, :] = h[held, :, 2] = 0.0
        h[held, 2, 2] = 1.0
        d = -np.linalg.solve(h + 1e-12 * np.eye(3), g[..., None])[..., 0]
        # the Newton decrement: how far the nll is from its minimum (nats), at the scale of its curvature, so a
        # sharp frontier's nearly flat optimum is reached as closely as a graded one's
        done = -(g * d).sum(1) <= 1e-14 * (1.0 + f[active])
        idx = np.flatnonzero(active)
        converged[idx[done]] = True
        active[idx[done]] = False
        keep = ~done
        if not keep.any():
            break
        idx, wa, g, d = idx[keep], wa[keep], g[keep], d[keep]
        t = np.ones(len(idx))
        moved = np.zeros(len(idx), dtype=bool)
        for _ in range(50):  # backtracking: halve each row's step until its nll falls enough
            todo = ~moved
            if not todo.any():
                break
            cand = wa[todo] + t[todo, None] * d[todo]
            cand[:, 2] = np.clip(cand[:, 2], k_lo, k_hi)
            fc = nll(cand, c[idx[todo]])
            ok = fc <= f[idx[todo]] + 1e-4 * ((cand - wa[todo]) * g[todo]).sum(1)
            rows = np.flatnonzero(todo)[ok]
            w[idx[rows]], f[idx[rows]] = cand[ok], fc[ok]
            moved[rows] = True
            t[todo] *= 0.5
        stuck = idx[~moved]  # no step lowers the nll: at the optimum to rounding, or lost
        active[stuck] = False
    theta = np.column_stack([w[:, 0] / w[:, 2], w[:, 1] / w[:, 2], w[:, 2]])
    inside = ((theta[:, 0] > A_BOUNDS[0]) & (theta[:, 0] < A_BOUNDS[1])
              & (theta[:, 1] > GAMMA_BOUNDS[0]) & (theta[:, 1] < GAMMA_BOUNDS[1]))
    for i in np.flatnonzero(~(converged & inside)):
        rows = np.repeat(np.arange(len(y)), c[i].astype(int))
        theta[i] = _mle(lr[rows], ll[rows], y[rows], start)
    return theta


def fit_frontier(rank: np.ndarray, length: np.ndarray, recalled: np.ndarray, *, bits_per_token: float | None = None,
                 p_eff_per_rank: float | None = None, seed: int = 0, resamples: int = BOOTSTRAP) -> FrontierFit:
    """Fit ℓ*(r) = e^a · r^γ to recall outcomes by logistic maximum likelihood (see the module docstring).

    rank, length: [n] (length in tokens); recalled: [n] bool. Intervals: bootstrap 95% (`resamples` resamples
    within each rank, seeded). Raises MemcoreError when there are fewer than 2 ranks, or no recalled or no
    unrecalled point (the frontier then lies outside the grid: it can only be bounded, see
    interpolated_frontier)."""
    r, ell, y = (np.asarray(v, dtype=float) for v in (rank, length, recalled))
    if len(np.unique(r)) < 2:
        raise MemcoreError("a frontier fit needs at least 2 ranks")
    if y.all() or not y.any():
        raise MemcoreError(f"{'every' if y.all() else 'no'} point was recalled verbatim: "
                           "the frontier lies outside this grid "
                           f"({'longer' if y.all() else 'shorter'} targets are needed to find it)")
    lr, ll = np.log(r), np.log(ell)
    theta = _mle(lr, ll, y, _start(lr, ll, y))
    counts = _bootstrap_counts(r, y, resamples, seed)
    boot_arr = _mle_many(lr, ll, y, counts, theta)[:, :2] if len(counts) else np.array([theta[:2]])
    notes, separating = [], None
    sign = np.where(y > 0, 1.0, -1.0)
    if np.all(sign * (theta[0] + theta[1] * lr - ll) > 0):
        # every recalled point below the line, every other above: the data only bound the frontier. Intervals
        # then span every separating line: recalled  -(a + γ ln r) <= -ln ℓ ; unrecalled  a + γ ln r <= ln ℓ
        separating = (np.column_stack([-sign, -sign * lr]), -sign * ll)
        notes.append("the recalled and unrecalled points are perfectly separated (a sharp frontier): the data place it "
                     "only between the measured lengths, and its intervals span every line that separates them")
    q = lambda i: (float(np.quantile(boot_arr[:, i], 0.025)), float(np.quantile(boot_arr[:, i], 0.975)))  # noqa: E731
    a_ci, g_ci = q(0), q(1)
    if separating is not None:
        from scipy.optimize import linprog

        for i in (0, 1):  # widen to every separating line's a and γ
            c = np.eye(2)[i]
            lo = linprog(c, A_ub=separating[0], b_ub=separating[1], bounds=[(-50, 50), (-10, 10)])
            hi = linprog(-c, A_ub=separating[0], b_ub=separating[1], bounds=[(-50, 50), (-10, 10)])
            if lo.status == 0 and hi.status == 0:
                ci = a_ci if i == 0 else g_ci
                widened = (min(ci[0], lo.fun), max(ci[1], -hi.fun))
                a_ci, g_ci = (widened, g_ci) if i == 0 else (a_ci, widened)
    return FrontierFit(float(theta[0]), float(theta[1]), float(theta[2]), a_ci, g_ci, len(y),
                       (float(r.min()), float(r.max())), (float(ell.min()), float(ell.max())), boot_arr,
                       bits_per_token, p_eff_per_rank, notes, separating, (r, ell, y))


def frontier_from_table(df: pd.DataFrame, method: str | None = None,
                        resamples: int = BOOTSTRAP) -> tuple[list[RankFrontier], FrontierFit | None, str | None]:
    """Interpolated and fitted frontiers of a sweep table (optionally one method's rows). The fit is None (with
    the reason as the third value) when the grid does not bracket the frontier."""
    df = method_rows(df, method)
    if df.empty:
        raise MemcoreError(f"no points{f' for method {method}' if method else ''} in the table")
    per_rank = interpolated_frontier(df)
    y = as_bool(df[recall_column(df)])
    d = df.assign(_rec=y)
    per_token = _bits_per_token(d)
    per_rank_peff = (float((df["p_eff"] / df["rank"]).median())
                     if "p_eff" in df.columns and df["p_eff"].notna().all() else None)
    src = _source_bits(df)
    try:
        fit = fit_frontier(df["rank"].to_numpy(float), df["length"].to_numpy(float), y, bits_per_token=per_token,
                           p_eff_per_rank=per_rank_peff, resamples=resamples)
    except MemcoreError as e:
        return per_rank, None, str(e)
    fit.source_bits = src
    if src is not None and per_token is not None and per_token > src:
        fit.notes.append(f"recalled points lower the loss by {per_token:.2f} bits per token, "
                         f"more than the {src:.2f} bits a "
                         "random token carries (the base model is worse than uniform on them); capacity counts "
                         f"{src:.2f} bits per token")
    return per_rank, fit, None


def recall_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Seed means per cell of a sweep table, one row per (rank, length): delta_loss (nats per token), exact_recall
    (share of seeds whose whole target was recalled verbatim) and, when the table has token_accuracy (or the
    older frac_correct), token_accuracy (share of target tokens whose teacher-forced argmax is right).
    Raises MemcoreError when the table has no recall column (recall_column)."""
    rec = recall_column(df)
    agg: dict[str, Any] = {"delta_loss": ("delta_loss", "mean"),
                           "exact_recall": (rec, lambda s: float(np.mean(as_bool(s))))}  # "False" is not recalled
    if "token_accuracy" in df or "frac_correct" in df:
        agg["token_accuracy"] = ("token_accuracy" if "token_accuracy" in df else "frac_correct", "mean")
    return df.groupby(["rank", "length"]).agg(**agg).reset_index()


def _source_bits(df: pd.DataFrame) -> float | None:
    """The information per target token the table states (source_bits_per_token, one value), else None."""
    if "source_bits_per_token" not in df.columns:
        return None
    vals = df["source_bits_per_token"].dropna().unique()
    return float(vals[0]) if len(vals) == 1 and len(df["source_bits_per_token"].dropna()) == len(df) else None


@dataclass
class VerbatimAnswer:
    """The smallest rank predicted to recall `length` tokens verbatim."""

    length: int
    rank: int  # ceil of the fitted real rank, at least 1
    interval: tuple[int, int | None]  # 95% (see FrontierFit.rank_interval), as whole ranks; None: not bounded above
    rank_exact: float
    extrapolated: bool
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "rank": self.rank, "interval": list(self.interval),
                "rank_exact": self.rank_exact, "extrapolated": self.extrapolated, "notes": self.notes}


def smallest_verbatim_rank(fit: FrontierFit, length: int) -> VerbatimAnswer:
    """Smallest whole rank r with ℓ*(r) ≥ length, its 95% interval, and whether that leaves the measured range
    (lengths or ranks outside what the sweep measured: said in `notes`, never silently)."""
    if length < 1:
        raise MemcoreError(f"length must be at least 1 token, got {length}")
    if fit.gamma <= 0:
        raise MemcoreError(f"the fitted frontier does not grow with rank (γ = {fit.gamma:.3g}); "
                           "no rank can be predicted")
    exact = fit.rank_for(length)
    lo, hi = fit.rank_interval(length)
    if fit.separating is not None:  # a sharp frontier: what the points say directly overrides the fitted line
        fail, ok = fit.measured_bounds(length)
        hi = min(hi, ok)
        lo = max(lo, math.floor(fail) + 1) if fail else lo  # a whole rank above the largest that failed
    whole = lambda v: max(1, math.ceil(v - 1e-9))  # noqa: E731
    rank = min(max(whole(exact), whole(lo)), whole(hi)) if math.isfinite(hi) else max(whole(exact), whole(lo))
    notes = []
    if not fit.lengths[0] <= length <= fit.lengths[1]:
        notes.append(f"length {length} lies outside the measured lengths {fit.lengths[0]:g}-{fit.lengths[1]:g}: "
                     "this is an extrapolation")
    if not fit.ranks[0] <= rank <= fit.ranks[1]:
        notes.append(f"the predicted rank {rank} lies outside the measured ranks {fit.ranks[0]:g}-{fit.ranks[1]:g}: "
                     "this is an extrapolation")
    if not math.isfinite(hi):
        notes.append("the sweep does not bound this rank from above: no measured point rules out a frontier that stops "
                     "growing beyond the ranks where it was seen; measure a longer length at a larger rank")
    return VerbatimAnswer(length, rank, (whole(lo), whole(hi) if math.isfinite(hi) else None), exact,
                          any("extrapolation" in n for n in notes), notes)


COMPARED = ("exact_recall", "token_accuracy", "verbatim_prefix", "frac_above", "delta_loss", "steps")


def method_comparison(df: pd.DataFrame, baseline: str = "sft") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each method against `baseline` at equal steps, from a sweep table with several methods and seeds.

    Returns (cells, overall). cells: one row per (method, rank, length) with the seed-mean of each COMPARED column
    (exact_recall as a rate), the baseline's, and `wins` (more tokens recalled in order: a longer verbatim
    prefix, ties broken by token accuracy); overall: per method the mean of each column over the grid, the
    baseline's, and their ratio (method / baseline). Raises MemcoreError when the baseline or another method is
    missing."""
    import pandas as pd

    if "method" not in df.columns or baseline not in set(df["method"]):
        raise MemcoreError(f"the table has no {baseline} rows to compare against")
    others = sorted(m for m in set(df["method"]) if m != baseline)
    if not others:
        raise MemcoreError(f"the table has only {baseline} rows: nothing to compare")
    d = df.copy()
    for new, old in (("exact_recall", "recalled"), ("token_accuracy", "frac_correct")):  # older sweep tables
        if new not in d.columns and old in d.columns:
            d[new] = d[old]
    cols = [c for c in COMPARED if c in d.columns]
    if "exact_recall" in d.columns:
        d["exact_recall"] = as_bool(d["exact_recall"]).astype(float)
    mean = d.groupby(["method", "rank", "length"])[cols].mean()
    reference = mean.loc[baseline]
    cells, overall = [], []
    for m in others:
        mine = mean.loc[m]
        joined = mine.join(reference, rsuffix=f"_{baseline}", how="inner").reset_index()
        joined.insert(0, "method", m)
        if "verbatim_prefix" in cols:
            vp, vb = joined["verbatim_prefix"], joined[f"verbatim_prefix_{baseline}"]
            acc, accb = joined.get("token_accuracy", 0), joined.get(f"token_accuracy_{baseline}", 0)
            joined["wins"] = np.where(vp != vb, np.where(vp > vb, "yes", "no"),
                                      np.where(acc > accb, "yes", np.where(acc < accb, "no", "tie")))
        cells.append(joined)
        row = {"method": m, "cells": len(joined)}
        for c in cols:
            a, b = float(joined[c].mean()), float(joined[f"{c}_{baseline}"].mean())
            row[c], row[f"{c}_{baseline}"], row[f"{c}_ratio"] = a, b, (a / b if b else float("inf") if a else 1.0)
        overall.append(row)
    return pd.concat(cells, ignore_index=True), pd.DataFrame(overall)


LOWER_IS_BETTER = frozenset({"steps"})  # measures where a method wins by being smaller


def paired_differences(df: pd.DataFrame, measures: list[str] | tuple[str, ...], *, baseline: str = "sft",
                       by: tuple[str, ...] = ("rank", "length"), level: float = 0.95) -> pd.DataFrame:
    """Each method minus `baseline` on the same seeds (and so the same data), per cell of `by` and measure, with a
    paired-t interval: d_s = x_method,s − x_baseline,s over the seeds s both have; mean d̄, and
    d̄ ± t_{level, n−1} · sd(d) / √n (Student's t with n − 1 degrees of freedom, sd with ddof 1).

    df: a sweep table (memcore.sweep.sweep_table columns) with method, seed, the `by` columns and the measures
    (exact_recall is read as 0/1). Returns one row per (method, cell, measure): method, the `by` values, measure,
    n (paired seeds), mean, lo, hi (nan when n < 2), baseline_mean, method_mean, and verdict: 'wins' or 'loses'
    when the interval excludes 0 (by the measure's direction: fewer steps win, more of anything else),
    'tie' when it holds 0, 'one seed' when n < 2. Raises MemcoreError when the table lacks the baseline, a
    measure, or the seed column."""
    import pandas as pd
    from scipy import stats

    need = {"method", "seed", *by, *measures}
    missing = sorted(need - set(df.columns))
    if missing:
        raise MemcoreError(f"the table lacks the column(s) {', '.join(missing)} for paired differences")
    if baseline not in set(df["method"]):
        raise MemcoreError(f"the table has no {baseline} rows to compare against")
    if not 0 < level < 1:
        raise MemcoreError(f"the interval's level must be between 0 and 1, got {level!r}")
    d = df.copy()
    if "exact_recall" in measures:
        d["exact_recall"] = as_bool(d["exact_recall"]).astype(float)
    keys = [*by, "seed"]
    wide = d.groupby(["method", *keys])[list(measures)].mean()
    base = wide.loc[baseline]
    rows = []
    for m in sorted(set(d["method"]) - {baseline}):
        joined = wide.loc[m].join(base, rsuffix="__base", how="inner")
        for cell, g in joined.groupby(level=list(range(len(by)))):
            cell = cell if isinstance(cell, tuple) else (cell,)
            for c in measures:
                diff = (g[c] - g[f"{c}__base"]).to_numpy(float)
                diff = diff[~np.isnan(diff)]
                n = len(diff)
                if n == 0:
                    continue
                mean = float(diff.mean())
                if n >= 2:
                    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n))
                    lo, hi = mean - half, mean + half
                    if lo > 0 or hi < 0:
                        better = (hi < 0) if c in LOWER_IS_BETTER else (lo > 0)
                        verdict = "wins" if better else "loses"
                    else:
                        verdict = "tie"
                else:
                    lo = hi = float("nan")
                    verdict = "one seed"
                rows.append({"method": m, **dict(zip(by, cell)), "measure": c, "n": n, "mean": mean, "lo": lo,
                             "hi": hi, "baseline_mean": float(g[f"{c}__base"].mean()),
                             "method_mean": float(g[c].mean()), "verdict": verdict})
    return pd.DataFrame(rows, columns=["method", *by, "measure", "n", "mean", "lo", "hi", "baseline_mean",
                                       "method_mean", "verdict"])


def point_gains(checked: pd.DataFrame) -> pd.DataFrame:
    """Each point's change from a plateau rule's stop to the step budget, from a window-check table's end and
    at-stop values (delta_loss / stop_delta_loss in nats, token_accuracy / stop_token_accuracy and frac_above /
    stop_frac_above as fractions): dl (ΔL, percent of its value at the stop), acc and above (percentage points);
    indexed like `checked`, NaN where a value is missing. Raises KeyError on a table without those columns."""
    return checked.assign(dl=100 * (checked["delta_loss"] - checked["stop_delta_loss"])
                          / checked["stop_delta_loss"].abs(),
                          acc=100 * (checked["token_accuracy"] - checked["stop_token_accuracy"]),
                          above=100 * (checked["frac_above"] - checked["stop_frac_above"]))[["dl", "acc", "above"]]


def gained_after_stop(checked: pd.DataFrame) -> pd.DataFrame:
    """What the points a plateau rule stopped without recall gained when trained on to the step budget instead: per
    method, over the points that did not recall then either ('held': the ones a fidelity past the frontier is read
    from), the change in ΔL (percent of its value at the stop) and in token accuracy and tokens above τ
    (percentage points), each as its least and most.

    checked: a window-check table (bench/bench_memft.py window: long_context_window.csv) with method, recalled, and
    the end and at-stop values delta_loss / stop_delta_loss (nats), token_accuracy / stop_token_accuracy and
    frac_above / stop_frac_above (fractions). Returns method, held (points), and dl_pct_min, dl_pct_max,
    acc_pts_min, acc_pts_max, above_pts_min, above_pts_max; an empty frame when the table lacks the at-stop
    columns (one written before they were kept) or holds no held point."""
    import pandas as pd

    cols = ["method", "held", "dl_pct_min", "dl_pct_max", "acc_pts_min", "acc_pts_max", "above_pts_min",
            "above_pts_max"]
    need = {"method", "recalled", "delta_loss", "stop_delta_loss", "token_accuracy", "stop_token_accuracy",
            "frac_above", "stop_frac_above"}
    if not need <= set(checked.columns):
        return pd.DataFrame(columns=cols)
    d = checked[~as_bool(checked["recalled"])].dropna(subset=sorted(need - {"method", "recalled"}))
    d = d.join(point_gains(d))
    rows = [{"method": m, "held": len(g), "dl_pct_min": g["dl"].min(), "dl_pct_max": g["dl"].max(),
             "acc_pts_min": g["acc"].min(), "acc_pts_max": g["acc"].max(),
             "above_pts_min": g["above"].min(), "above_pts_max": g["above"].max()}
            for m, g in d.groupby("method", sort=False)]
    return pd.DataFrame(rows, columns=cols)


def gained_words(gained: pd.DataFrame) -> str:
    """gained_after_stop's table in words, per method: 'sft (1 point) ΔL +0.4%, token accuracy +0.0 points, tokens
    above τ +3.1 points', each a range ('+0.7 to +2.1') where a method's points differ."""
    def span(lo: float, hi: float) -> str:
        return f"{lo:+.1f}" if abs(hi - lo) < 0.05 else f"{lo:+.1f} to {hi:+.1f}"

    return "; ".join(f"{r['method']} ({int(r['held'])} point{'s' if int(r['held']) != 1 else ''}) ΔL "
                     f"{span(r['dl_pct_min'], r['dl_pct_max'])}%, token accuracy "
                     f"{span(r['acc_pts_min'], r['acc_pts_max'])} points, tokens above τ "
                     f"{span(r['above_pts_min'], r['above_pts_max'])} points" for _, r in gained.iterrows())


@dataclass
class WindowTally:
    """A window-check table counted (see window_tally): recalled, of `n` points; `cut` of them cut short by the
    rule; [cut_lo, cut_hi] the 95% Clopper-Pearson interval on the share it cuts; `kinds` [n] each point's kind."""

    recalled: int
    n: int
    cut: int
    cut_lo: float
    cut_hi: float
    kinds: pd.Series


def window_tally(checked: pd.DataFrame) -> WindowTally:
    """Count a window-check table (bench/bench_memft.py window: long_context_window.csv, a plateau rule's stops
    trained again without it): how many recalled, how many the rule had cut short, and a 95% Clopper-Pearson
    (exact binomial) interval on the share it cuts. Each point's kind is its `kind` column ('held', 'cut short',
    'diverged', ...); a table written before kinds were kept reads 'recalled' or 'held'. Raises MemcoreError for a
    table without points or a `recalled` column."""
    import pandas as pd
    from scipy import stats

    if "recalled" not in checked or not len(checked):
        raise MemcoreError("a window-check table needs points with a recalled column")
    recalled = pd.Series(as_bool(checked["recalled"]), index=checked.index)
    kinds = checked["kind"].astype(str) if "kind" in checked else \
        pd.Series("recalled", index=checked.index).where(recalled, "held")
    n, cut = len(checked), int((kinds == "cut short").sum())
    ci = stats.binomtest(cut, n).proportion_ci(0.95, method="exact")
    return WindowTally(recalled=int(recalled.sum()), n=n, cut=cut, cut_lo=float(ci.low), cut_hi=float(ci.high),
                       kinds=kinds)


def end_of_budget(store: Store, run_ids, window: int) -> pd.DataFrame:
    """Where each run stood at its end, for points past the frontier trained to a step budget (bench_memft.py's stage
    2): how many steps it had gone without a new best in tokens above τ or argmax-right tokens (open_wait, from
    memcore.train.waits_for_a_new_best: at least `window` means the plateau rule would have called it converged, 'on a
    plateau'), and how much its ΔL rose over its last `window` steps (late_delta_loss, nats per token; from the recorded
    rows, which a decimated history thins, so read at the latest row `window` or more steps before the end). Returns a
    DataFrame indexed by run id: open_wait (steps), late_delta_loss (nats), on_plateau."""
    import pandas as pd

    rows = {}
    for rid in run_ids:
        steps = store.steps(rid)
        if steps:
            rows[rid] = stood_at_end(steps, window)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["open_wait", "late_delta_loss", "on_plateau"])


def stood_at_end(steps, window: int) -> dict[str, Any]:
    """end_of_budget for one run's recorded step rows (records.StepRow, in step order, at least one): open_wait
    (steps), late_delta_loss (nats), on_plateau."""
    from memcore.train import waits_for_a_new_best

    _, open_wait = waits_for_a_new_best((s.step, s.n_above, s.n_correct) for s in steps)
    last = steps[-1]
    before = [s for s in steps if s.step <= last.step - window]
    late = float(last.delta_loss - before[-1].delta_loss) if before else float("nan")
    return {"open_wait": int(open_wait), "late_delta_loss": late, "on_plateau": open_wait >= window}


def end_of_budget_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method, where its points past the frontier stood at the step budget. df: the benchmark's points table
    with end_of_budget's columns (open_wait, late_delta_loss, on_plateau) and method and delta_loss; the rows
    without open_wait are left out. Returns method, points, on_plateau (how many), wait_median and wait_least
    (steps since the last best), late_median (ΔL's rise over the last window, nats per token; NaN where none is
    known) and late_share (that rise over the final ΔL, median; NaN likewise), in the table's order of methods.
    Raises KeyError on a table without those columns."""
    import pandas as pd

    rows = []
    past = df[df["open_wait"].notna()] if "open_wait" in df else df.iloc[:0]
    for m, d in past.groupby("method", sort=False):
        late = d["late_delta_loss"].dropna()
        rel = (late / d.loc[late.index, "delta_loss"].abs()).replace([np.inf, -np.inf], np.nan).dropna()
        rows.append({"method": m, "points": len(d), "on_plateau": int(d["on_plateau"].astype(bool).sum()),
                     "wait_median": float(d["open_wait"].median()), "wait_least": int(d["open_wait"].min()),
                     "late_median": float(late.median()) if len(late) else float("nan"),
                     "late_share": float(rel.median()) if len(rel) else float("nan")})
    return pd.DataFrame(rows, columns=["method", "points", "on_plateau", "wait_median", "wait_least", "late_median",
                                       "late_share"])


def end_of_budget_words(df: pd.DataFrame, window: int) -> list[str]:
    """One line per method on where its points past the frontier stood at the step budget (end_of_budget_summary
    in words): how many were on a plateau by the rule's `window`, the steps since their last best, and their ΔL's
    rise over the last `window` steps (nats, and as a share of the final ΔL). Raises KeyError on a table without
    those columns."""
    lines = []
    for _, r in end_of_budget_summary(df).iterrows():
        points = f"{int(r['points'])} point{'' if r['points'] == 1 else 's'}"
        lines.append(f"  {r['method']:<9} {int(r['on_plateau'])} of {points} on a plateau at "
                     f"the budget (no new best in tokens above τ or argmax-right tokens for {window}+ steps; steps "
                     f"since the last best: median {r['wait_median']:.0f}, least {int(r['wait_least'])})"
                     + (f"; ΔL over the last {window} steps: median {r['late_median']:+.4f} nats "
                        f"({r['late_share']:+.1%} of the final ΔL)" if np.isfinite(r["late_median"])
                        and np.isfinite(r["late_share"]) else ""))
    return lines


def frontier_difference(fit: FrontierFit, baseline: FrontierFit, rank: float,
                        level: float = 0.95) -> tuple[float, float, float, str]:
    """ℓ*(rank) of `fit` minus that of `baseline` (tokens), with a bootstrap interval: the two fits' resamples are
    independent (each method's probes are its own lengths, so there is nothing to pair), so the difference's
    distribution is that of boot_fit[i] − boot_baseline[i] over the resamples both have; percentile interval at
    `level`. Returns (difference, lo, hi, verdict): 'more' when lo > 0, 'fewer' when hi < 0, else 'tie'. Where a
    method's recall data are perfectly separated its own interval is widened to every separating line
    (FrontierFit.ell_star_interval); this one is the bootstrap's alone, so read it beside those. Raises
    MemcoreError when a fit has no bootstrap resamples."""
    a, b = fit.ell_star_boot(rank), baseline.ell_star_boot(rank)
    n = min(len(a), len(b))
    if n < 2:
        raise MemcoreError("a frontier fit without bootstrap resamples has no interval to compare")
    d = a[:n] - b[:n]
    tail = (1 - level) / 2
    lo, hi = float(np.quantile(d, tail)), float(np.quantile(d, 1 - tail))
    diff = float(fit.ell_star(rank) - baseline.ell_star(rank))
    return diff, lo, hi, "more" if lo > 0 else "fewer" if hi < 0 else "tie"


def recall_count_inside(recalled: int, runs: int, p_lo: float, p_hi: float, level: float = 0.95) -> bool:
    """Whether `recalled` of `runs` new runs is a plausible draw from a recall probability somewhere in [p_lo, p_hi]
    (a fit's band, FrontierFit.recall_probability): the count's exact (Clopper-Pearson) interval at `level`
    overlaps the band. Raises MemcoreError for a count outside 0..runs or no runs."""
    from scipy.stats import binomtest

    if runs < 1 or not 0 <= recalled <= runs:
        raise MemcoreError(f"{recalled} recalled of {runs} runs is not a count of runs")
    ci = binomtest(int(recalled), int(runs)).proportion_ci(confidence_level=level, method="exact")
    return ci.low <= p_hi and ci.high >= p_lo
