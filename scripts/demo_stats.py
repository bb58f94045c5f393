"""The demo tables' statistics and how they print: mean ± std over seeds, and the paired differences
between a study's arms with their t-tests and Holm-Bonferroni over a table."""

import math

import numpy as np


def fmt(x, spread=None, pct=True) -> str:
    if x is None:
        return "-"
    s = f"{100 * x:.1f}" if pct else f"{x:.3f}"
    if spread is not None:
        s += f" ± {100 * spread:.1f}" if pct else f" ± {spread:.3f}"
    return s


def mean_std(runs: list[dict], k: str) -> tuple:
    vals = [r[k] for r in runs if r.get(k) is not None]
    return ((float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None) if vals
            else (None, None))


# ---------------------------------------------------------------------------------------------------
# paired statistics: the arms of a study share their seeds (LoRA init and batch order), so a difference
# is taken seed by seed and tested by the paired t-test


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df (integer >= 1) degrees of freedom. Closed forms in theta =
    atan(|t| / sqrt(df)) (Abramowitz & Stegun 26.7.3-4): P(|T| < |t|) is 2/pi (theta + sin cos (1 +
    2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))) for odd df, sin (1 + 1/2 cos^2 + 1*3/(2*4)
    cos^4 + ... up to cos^(df-2)) for even df."""
    if df < 1 or df != int(df):
        raise ValueError(f"df must be a positive integer, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, series, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:
        for j in range(1, (df - 1) // 2):
            term *= 2 * j / (2 * j + 1) * c2
            series += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:
        for j in range(1, df // 2):
            term *= (2 * j - 1) / (2 * j) * c2
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired(runs: list[dict], ref: list[dict], k: str) -> dict:
    """runs[i][k] - ref[i][k] over the seeds i the two lists share (same order) -> n, mean, se (standard
    error of the mean difference), t = mean / se, df = n - 1 and p (two-sided paired t-test); se, t, df
    and p are None under two seeds. All-equal differences: p 1 when they are 0, else 0."""
    diffs = [r[k] - q[k] for r, q in zip(runs, ref) if r.get(k) is not None and q.get(k) is not None]
    n = len(diffs)
    out = dict(n=n, mean=float(np.mean(diffs)) if diffs else None, se=None, t=None, df=None, p=None)
    if n >= 2:
        se = float(np.std(diffs, ddof=1)) / math.sqrt(n)
        t = out["mean"] / se if se > 0 else (math.inf if out["mean"] else 0.0)
        out.update(se=se, t=t, df=n - 1, p=t_two_sided_p(t, n - 1))
    return out


def holm(pvalues: dict, level: float = 0.05) -> set:
    """Holm-Bonferroni over the m comparisons with a p-value: the keys whose test rejects, the family-wise
    error rate held at `level`. Sorted by p, the i-th smallest (i from 0) is rejected while every p up
    to it is at most level / (m - i)."""
    ranked = sorted((p, i, key) for i, (key, p) in enumerate(pvalues.items()) if p is not None)
    out = set()
    for i, (p, _, key) in enumerate(ranked):
        if p > level / (len(ranked) - i):
            break
        out.add(key)
    return out


def fmt_paired(d: dict, pct: bool = True, star: bool = False) -> str:
    """A paired difference: mean ± se (t, p), starred where its test rejects; under two seeds the mean."""
    if d["mean"] is None:
        return "-"
    if d["se"] is None:
        return fmt(d["mean"], pct=pct)
    t = "∞" if math.isinf(d["t"]) else f"{d['t']:.1f}"
    p = "p < 0.001" if d["p"] < 0.001 else f"p {d['p']:.3f}"
    return fmt(d["mean"], d["se"], pct=pct) + f" (t {t}, {p})" + (" *" if star else "")


def paired_footer(what: str, seeds: int, comps: dict, family: str) -> str:
    """The table footer's account of its Δ columns and their test (comps: the table's paired() results)."""
    if seeds < 2:
        return f"Δ = {what}; one seed: no standard error, no test, no star."
    m = sum(d["p"] is not None for d in comps.values())
    df = f"{seeds - 1} degree" + "s" * (seeds > 2)
    return (f"Δ = {what}: the mean over seeds of the per-seed difference (the arms share each seed's LoRA "
            f"init and batch order) ± its standard error; t = Δ / se on {df} of freedom, p two-sided; * "
            f"where the paired t-test rejects at 5% after Holm-Bonferroni over the table's {m} comparisons "
            f"({family}).")


def exact_kl_footer(n_exact: int) -> str:
    return (f"Exact KL is averaged over the teacher's sampled replies to the first {n_exact} held-out "
            f"prompts, the same replies for every model: the seed spread, the se and the tests do not "
            f"include the sampling error of those replies (nor, for any metric, that of the held-out "
            f"prompts).")
