"""The law fit as it was before variable projection, kept as the baseline that bench_engine.py times and
that tests/test_law.py checks the fast fit against: curve_fit from six fixed starts, the best kept; every
leave-one-out refit runs all six starts again."""

from __future__ import annotations

import numpy as np


def multistart_fit(form, r, ell, dl):
    """The previous fitting algorithm, kept here as the reference: curve_fit from six fixed starts, the best kept;
    leave-one-out refits every start too."""
    from scipy.optimize import curve_fit

    from memcore.law import FUNCS, _bounds

    x = np.array([r, ell])

    def fit(x, dl):
        lo, hi = _bounds(form, dl)
        best = None
        for alpha in (0.3, 0.8, 1.5):
            for beta in (0.3, 0.8):
                scale = np.median(np.power(x[0], alpha) * np.power(x[1], -beta))
                span = max(float(np.max(np.abs(dl))), 1e-6)
                p0 = (np.array([span / scale, alpha, beta, float(np.min(dl)) * 0.5]) if form == "power"
                      else np.array([1.2 * float(np.max(dl)), 1.0 / scale, alpha, beta]))
                p0 = np.clip(p0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
                try:
                    popt, pcov = curve_fit(FUNCS[form], x, dl, p0=p0, bounds=(lo, hi), maxfev=20000)
                except (RuntimeError, ValueError):
                    continue
                sse = float(np.sum((FUNCS[form](x, *popt) - dl) ** 2))
                if best is None or sse < best[0]:
                    best = (sse, popt, pcov)
        return best

    sse, popt, pcov = fit(x, dl)
    loo = []
    for i in range(len(dl)):
        keep = np.arange(len(dl)) != i
        sub = fit(x[:, keep], dl[keep])
        loo.append(float(FUNCS[form](x[:, i:i + 1], *sub[1])[0] - dl[i]))
    return popt, np.sqrt(np.diag(pcov)), sse, float(np.sqrt(np.mean(np.square(loo))))
