"""The verbs of the memory law: `fit` and `predict` (ΔL at a point, the rank for a target ΔL, or with --verbatim the
rank for a length recalled verbatim)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from memcore.cli.common import law_table_of
from memcore.config import MemcoreError


def cmd_fit(args: argparse.Namespace) -> int:
    """`memcore fit`: the memory law on a CSV or the store's runs (memcore.law.fit_all), printed or JSON. A table
    that holds several methods is fitted method by method (points trained differently need not share one law),
    unless --method picks one; its JSON is then {"methods": [...], "by_method": {method: fit}}."""
    from memcore.law import fit_all, method_rows

    df = law_table_of(args)
    methods = sorted(df["method"].dropna().unique()) if "method" in df.columns and not args.method else []
    if len(methods) <= 1:
        fits = fit_all(df, with_p_eff=True)
        if args.json:
            print(json.dumps(fits.to_dict()))
        else:
            _print_fit(fits.to_dict(), fits.regime_words().replace("**", ""))
        return 0
    by_method, errors = {}, {}
    for m in methods:
        try:
            by_method[m] = fit_all(method_rows(df, m), with_p_eff=True)
        except MemcoreError as e:
            errors[m] = str(e)
    if not by_method:
        raise MemcoreError("no method's points can be fitted: "
                           + "; ".join(f"{m}: {why}" for m, why in errors.items()))
    if args.json:
        print(json.dumps({"methods": methods, "by_method": {m: f.to_dict() for m, f in by_method.items()},
                          "errors": errors}))
        return 0
    print(f"the table holds {', '.join(methods)}: each method is fitted on its own points (choose one with --method)")
    for m in methods:
        print(f"\n== {m} ==")
        if m in errors:
            print(f"cannot fit: {errors[m]}")
            continue
        f = by_method[m]
        _print_fit(f.to_dict(), f.regime_words().replace("**", ""))
    return 0


def _print_fit(out: dict[str, Any], regime: str) -> None:
    """One fit (LawFits.to_dict) as text: how its points stopped, which were fitted and their regime
    (LawFits.regime_words), the parameters with intervals, R², the forms compared."""
    print(regime)
    print("ΔL = C · r^α · ℓ^(−β) + b")
    for k in ("C", "alpha", "beta", "b"):
        lo, hi = out["intervals"][k]
        print(f"  {k:<6} {out[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    if "alpha_over_beta" in out:
        lo, hi = out["alpha_over_beta_ci"]
        print(f"  {'α/β':<6} {out['alpha_over_beta']:>10.4f}   95% [{lo:.4f}, {hi:.4f}]   ΔL is the same along "
              f"ℓ ∝ r^(α/β): doubling the rank reaches {2 ** out['alpha_over_beta']:.2f}× the tokens at the same ΔL")
    print(f"  R² {out['r2']:.4f}   RMSE {out['rmse']:.4f}   leave-one-out RMSE {out['loo_rmse']:.4f}")
    pe = out.get("p_eff_fit")
    if pe and "error" not in pe:
        print(f"in P_eff: C {pe['C']:.4g}  α {pe['alpha']:.4f}  β {pe['beta']:.4f}  b {pe['b']:.4f}  R² {pe['r2']:.4f}")
    cmp_ = out["comparison"]
    print("model comparison (AIC, lower is better): "
          + ", ".join(f"{f} {a:.1f} (R² {cmp_['r2'][f]:.4f})" for f, a in cmp_["aic"].items()))
    print(f"the data prefer the {cmp_['preferred']} form" if cmp_.get("clear", True)
          else "the data do not tell the forms apart (AIC within 2)")
    if cmp_["preferred"] != out.get("form", "power") and cmp_.get("clear", True):
        pref = cmp_["forms"][cmp_["preferred"]]
        formula = "M · (1 − exp(−C · r^α · ℓ^(−β)))" if cmp_["preferred"] == "saturating" else cmp_["preferred"]
        print(f"ΔL = {formula}   R² {pref['r2']:.4f}")
        for k, (lo, hi) in pref["intervals"].items():
            print(f"  {k:<6} {pref[k]:>10.4f}   95% [{lo:.4f}, {hi:.4f}]")
    for n in out.get("notes") or []:
        print(f"note: {n}")


def cmd_predict(args: argparse.Namespace) -> int:
    """`memcore predict`: ΔL at a rank and length, or with --verbatim the smallest rank for a length."""
    from memcore.law import fit_law, smallest_rank

    if args.verbatim:
        return _predict_verbatim(args, law_table_of(args, required=("rank", "length")))
    df = law_table_of(args)
    fit = fit_law(df["rank"].to_numpy(float), df["length"].to_numpy(float), df["delta_loss"].to_numpy(float),
                  args.form)
    if args.target_delta_loss is not None:
        r = smallest_rank(fit, args.length, args.target_delta_loss)
        out = {"length": args.length, "target_delta_loss": args.target_delta_loss, "smallest_rank": r}
        msg = (f"smallest rank predicted to reach ΔL {args.target_delta_loss} at length {args.length}: {r}"
               if r is not None
               else f"no rank up to 4096 is predicted to reach ΔL {args.target_delta_loss} at length {args.length}")
    else:
        if args.rank is None:
            raise MemcoreError("give --rank R (to predict ΔL) or --target-delta-loss X (to find the rank)")
        v = float(fit.predict(args.rank, args.length))
        out = {"rank": args.rank, "length": args.length, "delta_loss": v}
        msg = (f"predicted ΔL at rank {args.rank}, length {args.length}: {v:.4f} nats/token "
               f"({fit.form} law, R² {fit.r2:.3f})")
    print(json.dumps(out) if args.json else msg)
    return 0


def _predict_verbatim(args: argparse.Namespace, df: Any) -> int:
    from memcore.frontier import frontier_from_table, smallest_verbatim_rank
    from memcore.law import one_method

    if args.rank is not None or args.target_delta_loss is not None:
        raise MemcoreError("--verbatim answers the smallest rank for --length; drop --rank and --target-delta-loss")
    df, method, note = one_method(df, args.method)
    _, fit, why = frontier_from_table(df)
    if fit is None:
        raise MemcoreError(f"cannot predict a verbatim rank: {why}")
    ans = smallest_verbatim_rank(fit, args.length)
    out = ans.to_dict() | {"method": method, "frontier": {"a": fit.a, "gamma": fit.gamma}}
    if note:
        out["notes"] = [note, *out["notes"]]
    if args.json:
        print(json.dumps(out))
        return 0
    for n in out["notes"]:
        print(f"note: {n}", file=sys.stderr)
    lo, hi = ans.interval
    with_method = f" with {method}" if method else ""
    print(f"smallest rank predicted to recall {args.length} tokens verbatim{with_method}: {ans.rank} "
          f"(95% [{lo}, {hi if hi is not None else 'unbounded'}]; "
          f"frontier ℓ*(r) = {math.exp(fit.a):.3g} · r^{fit.gamma:.3f})"
          + ("  [extrapolated]" if ans.extrapolated else ""))
    return 0
