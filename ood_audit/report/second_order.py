"""The second-order analysis (``decompose --second-order``,
:mod:`ood_audit.analysis.second_order`) as tables and a note, for the CLI and the report."""

from __future__ import annotations

import math

from .table import Table


def _f(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def second_order_tables(result: dict):
    """(gap table, per-channel variance table) as the report's plain Tables."""
    gaps = Table(["OOD set", "measured gap", "predicted gap", "signs agree", "mean-shift term",
                  "closed form (paper)", "closed form (linear)", "closed form (linear, full Σ)",
                  "Tr(H Σ) OOD", "Tr(H Σ) in"])
    for r in result["sets"]:
        gaps.add([r["dataset"], f"{_f(r['measured_gap'])} ± {_f(r['measured_gap_se'])}",
                  f"{_f(r['predicted_gap'])} ± {_f(r['predicted_gap_se'])}",
                  "yes" if r["signs_agree"] else "NO", _f(r["mean_shift_term"]),
                  _f(r["closed_form_paper"]), _f(r["closed_form_linear"]),
                  _f(r.get("closed_form_linear_full")),
                  _f(r["trace_h_sigma"]), _f(r["reference_trace_h_sigma"])],
                 "" if r["signs_agree"] else "fail")
    ref = result["reference_stats"] or {}
    n_ch = len(ref.get("channel_var_mean", []))
    var = Table(["set", *[f"c{c}: mean var / sum over h,w" for c in range(n_ch)]])
    for name, st in [(result["reference"], ref), *((r["dataset"], r) for r in result["sets"])]:
        var.add([name, *[f"{m:.5f} / {s:.3f}" for m, s in zip(st["channel_var_mean"],
                                                             st["channel_var_sum"], strict=True)]])
    return gaps, var


def second_order_note(result: dict) -> str:
    """One paragraph: what x0 is and how to read the numbers."""
    x0 = ("the mean image of the in-distribution test set" if result["center"] == "in"
          else "the mean of the in-distribution test set and the OOD set pooled")
    return (f"x0 = {x0}. Predicted gap = 1/2 Tr(H (Sigma_ood - Sigma_in)), H the Hessian of "
            "log p(x) at x0, estimated exactly on these images by Hessian-vector products (± "
            "standard error over images); negative curvature means the set with the smaller "
            "variance gets the higher likelihood. The mean-shift term is what the paper's "
            "shared-mean assumption drops. Closed forms (glow-cv only) freeze the couplings: "
            "'paper' is the paper's formula per level, 'linear' its exact linear-Gaussian "
            "version with per-pixel variances, 'linear, full Σ' the same with pixel "
            "covariances kept.")
