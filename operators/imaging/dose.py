"""What a dose can measure: the dose advisor of the 2D stages.

From a scan's own counts (an ADF image of electron counts) and the columns found in it,
:func:`advise` states

- the **position precision** the dose supports: the Cramér–Rao bound of every column's
  radial position error under Poisson noise, from its fitted amplitude, width and
  background (``ColumnsResult.position_crb_A``); it scales as 1/√dose, so the dose for any
  target precision follows;
- whether **atom counting** is possible: the scattering cross-sections of the columns must
  form classes (one per count) separated by several times their shot noise. A mixture whose
  components scatter as their columns' shot noise (``CountingResult.noise_ratio`` ≤
  ``max_noise_ratio``) has resolved the classes; its Monte Carlo confidence (each column
  redrawn with its own shot noise) is then the predicted fraction p of exact counts, and
  counting is possible when p − √(p(1 − p)/n) reaches ``target_exact`` (n columns: the
  exact fraction of one scan scatters by that binomial σ about p, so a particle of 80
  columns predicted at 95.6 % is not yet called possible). Columns whose cross-section is
  within ``min_significance`` shot-noise σ of zero scatter no more than vacuum: they are
  not counted (a false column would otherwise become a class of its own and shift every
  count by one). A mixture whose components are
  wider than the shot noise still merges several counts per component: counting is not
  possible, and no counts are given;
- at what **dose** counting would be possible: class gaps grow with the dose D and the shot
  noise with √D, so the predicted fraction of exact counts at f × D is
  mean_i [Φ(√f·g⁺_i / 2σ_i) + Φ(√f·g⁻_i / 2σ_i) − 1] (g± the gaps from column i's class to
  its neighbours, σ_i its shot noise); solved for ``target_exact``. Where the classes are
  not resolved the step of one atom is unknown, but with two or more components it is at
  most the smallest gap between their means (adjacent components hold different counts),
  which gives a **lower bound** on the dose; with ``atom_cross_section_A2`` (the
  cross-section of one atom into the detector, Å²) the step is
  dose_per_position × σ_atom / step_A² and the dose an estimate.

:func:`dose_advice` runs the columns, the mixture and the advice on an image in one call
(for a live viewer); the 2D stages call :func:`advise` on their own results.

Examples
--------
>>> import numpy as np
>>> from operators.imaging.dose import dose_advice
>>> rng = np.random.default_rng(0)
>>> y, x = np.mgrid[0:96, 0:96]
>>> n = rng.integers(1, 4, (12, 12))                       # 1..3 atoms per column
>>> lam = 0.5 + sum(40.0 * n[i, j] * np.exp(-((y - 4 - 8 * i) ** 2 + (x - 4 - 8 * j) ** 2) / 2.0)
...                 for i in range(12) for j in range(12))
>>> a = dose_advice(rng.poisson(lam), min_distance_px=4, step_A=0.2)
>>> a.counting_status, a.n_columns
('possible', 144)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

PM_PER_A = 100.0


@dataclass
class DoseAdvice:
    """What the scan's dose supports (every field a number, a bool or a string).

    dose_e_per_position : electrons per probe position (NaN when unknown);
    dose_e_per_A2 : the same per Å² (NaN without a scan step).
    noise_model : "poisson" (a counts image: the advice applies) or "gaussian" (not a
        counts image: nothing is predicted, ``counting_status`` "unknown").
    n_columns : columns found.
    position_precision_pm : median over the columns of the Cramér–Rao bound of the radial
        position error at this dose, pm (px × 100 without a scan step: ``unit``);
        position_precision_rms_pm : its RMS; target_precision_pm and
        dose_factor_for_precision : the dose multiple that brings the median bound to the
        target (bounds scale as 1/√dose).
    cross_section_noise : median shot noise of a column's cross-section (counts·px²).
    counting_status : "possible", "uncertain" (resolved, but fewer than ``target_exact`` of
        the counts predicted right), "not possible" or "unknown"; counting_possible: status
        == "possible"; counting_reason : one sentence why.
    predicted_exact : predicted fraction of exact counts (the Monte Carlo confidence;
        NaN when the classes are not resolved).
    n_classes : classes of the mixture; noise_ratio : their spread in units of the shot
        noise (≈ 1: resolved).
    atom_step : smallest gap between resolved classes, or the step given by
        atom_cross_section_A2, or an upper bound on it (counts·px²; NaN when unknown);
        atom_step_kind : "resolved", "given", "upper bound" or "".
    target_exact : fraction of exact counts asked for; dose_factor_for_counting : dose
        multiple at which that is predicted (NaN when unknown); dose_for_counting_kind :
        "estimate" or "lower bound" (the dose is at least that); dose_for_counting_e_per_A2.
    unit : "pm" or "px/100" (positions without a scan step).
    """

    dose_e_per_position: float
    dose_e_per_A2: float
    noise_model: str
    n_columns: int
    position_precision_pm: float
    position_precision_rms_pm: float
    target_precision_pm: float
    dose_factor_for_precision: float
    cross_section_noise: float
    counting_status: str
    counting_possible: bool
    counting_reason: str
    predicted_exact: float
    n_classes: int
    noise_ratio: float
    atom_step: float
    atom_step_kind: str
    target_exact: float
    dose_factor_for_counting: float
    dose_for_counting_kind: str
    dose_for_counting_e_per_A2: float
    unit: str

    def lines(self) -> list[str]:
        """The advice as console lines."""
        u = self.unit
        dose = (f"{self.dose_e_per_A2:.3g} e⁻/Å²" if np.isfinite(self.dose_e_per_A2) else
                f"{self.dose_e_per_position:.3g} e⁻/position" if np.isfinite(self.dose_e_per_position)
                else "dose unknown")
        if self.noise_model != "poisson":
            return [f"dose {dose}: not an image of electron counts, no prediction"]
        if not np.isfinite(self.position_precision_pm):
            return [f"dose {dose}: no columns found, nothing to predict"]
        out = [f"dose {dose}: column positions to ±{self.position_precision_pm:.2g} {u} "
               f"(Cramér–Rao, median of {self.n_columns} columns); "
               f"{self.target_precision_pm:g} {u} needs ×{self.dose_factor_for_precision:.2g} the dose"]
        when = ""
        if self.dose_for_counting_kind == "lower bound" and self.dose_factor_for_counting <= 1:
            when = (f"; {self.target_exact:.0%} exact counts need more than this dose (the "
                    "step of one atom is not known from this scan)")
        elif np.isfinite(self.dose_factor_for_counting):
            more = "at least " if self.dose_for_counting_kind == "lower bound" else ""
            e = (f" ({more}{self.dose_for_counting_e_per_A2:.2g} e⁻/Å²)"
                 if np.isfinite(self.dose_for_counting_e_per_A2) else "")
            when = (f"; {self.target_exact:.0%} exact counts need {more}"
                    f"×{self.dose_factor_for_counting:.2g} the dose{e}")
        elif self.counting_status == "not possible" and self.n_columns >= 10:
            # one class: the step of one atom is not in this scan
            when = ("; the dose it needs is not known from this scan (give the cross-section of "
                    "one atom, atom_cross_section_A2, for an estimate)")
        out.append(f"atom counting {self.counting_status}: {self.counting_reason}{when}")
        return out


def _fraction_exact(f, comp, mu, sigma):
    """Predicted fraction of exact class assignments at f × the dose: each column right when
    its noise keeps it within the midpoints to its class's neighbours."""
    gaps = np.diff(mu)
    up = np.append(gaps, np.inf)[comp]
    down = np.insert(gaps, 0, np.inf)[comp]
    rf = np.sqrt(f)
    return float(np.mean(ndtr(rf * up / (2 * sigma)) + ndtr(rf * down / (2 * sigma)) - 1.0))


def _solve_factor(func, target):
    """The dose factor f with func(f) = target (func increasing in f), by bisection in log f."""
    lo, hi = 1e-6, 1e9
    if func(hi) < target:
        return float("nan")
    if func(lo) >= target:
        return lo
    for _ in range(80):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if func(mid) < target else (lo, mid)
    return float(hi)


def advise(columns, counting=None, *, dose_e_per_position=None, target_exact=0.95,
           target_precision_pm=5.0, max_noise_ratio=1.2, atom_cross_section_A2=None,
           class_counts=None, min_significance=3.0) -> DoseAdvice:
    """The dose advice from a :class:`~operators.imaging.columns.ColumnsResult` of a counts
    image and, when available, the :class:`~operators.imaging.atom_counting.CountingResult` of
    its columns (fitted with ``noise_sigma=columns.cross_section_sigma`` of the columns with
    a finite cross-section and noise, in that order). Without one, the mixture is fitted
    here (no Monte Carlo: the predicted fraction is then the analytic one).

    Parameters
    ----------
    dose_e_per_position : electrons per probe position (all frames), for the dose in e⁻/Å².
    target_exact : fraction of exact counts that makes counting "possible" (0.95): the
        predicted fraction less its binomial σ over the counted columns must reach it.
    target_precision_pm : position precision the dose factor is reported for (5 pm).
    max_noise_ratio : largest spread of the mixture's components about their means, in
        units of the columns' shot noise, for the classes to count as resolved (1.2: the
        predicted shot noise agrees with the measured spread of known classes within 10 %).
    atom_cross_section_A2 : optional cross-section of one atom into the detector (Å²), to
        estimate the dose for counting where the classes are not resolved.
    class_counts : the counts of the classes when given to the counting (their number must
        then match the mixture's).
    min_significance : columns whose cross-section is below this many shot-noise σ are
        left out of the mixture (3).

    Returns
    -------
    DoseAdvice
    """
    from operators.imaging.atom_counting import count_atoms

    c = columns
    step = float(c.step_A)
    has_step = np.isfinite(step)
    unit = "pm" if has_step else "px/100"
    to_pm = (step if has_step else 1.0) * PM_PER_A
    dpos = float(dose_e_per_position) if dose_e_per_position is not None else np.nan
    d_A2 = dpos / step ** 2 if has_step else np.nan
    n = len(c.y_px)
    base = dict(dose_e_per_position=dpos, dose_e_per_A2=d_A2, noise_model=c.noise_model,
                n_columns=n, target_precision_pm=float(target_precision_pm),
                target_exact=float(target_exact), unit=unit)
    nan = float("nan")
    empty = dict(position_precision_pm=nan, position_precision_rms_pm=nan,
                 dose_factor_for_precision=nan, cross_section_noise=nan, predicted_exact=nan,
                 n_classes=0, noise_ratio=nan, atom_step=nan, atom_step_kind="",
                 dose_factor_for_counting=nan, dose_for_counting_kind="",
                 dose_for_counting_e_per_A2=nan)
    if c.noise_model != "poisson" or c.position_crb_px is None:
        return DoseAdvice(**base, **empty, counting_status="unknown", counting_possible=False,
                          counting_reason="the image is not electron counts, so its shot "
                                          "noise is not known")
    crb = np.asarray(c.position_crb_px, np.float64) * to_pm
    crb = crb[np.isfinite(crb)]
    prec = float(np.median(crb)) if len(crb) else nan
    out = dict(empty, position_precision_pm=prec,
               position_precision_rms_pm=float(np.sqrt(np.mean(crb ** 2))) if len(crb) else nan,
               dose_factor_for_precision=(prec / float(target_precision_pm)) ** 2)
    xs = np.asarray(c.cross_section_shared, np.float64)
    sig = np.asarray(c.cross_section_sigma, np.float64)
    ok = np.isfinite(xs) & np.isfinite(sig) & (sig > 0)
    ok[ok] = xs[ok] >= min_significance * sig[ok]
    out["cross_section_noise"] = float(np.median(sig[ok])) if ok.any() else nan

    def done(status, reason, **kw):
        out.update(kw)
        return DoseAdvice(**base, **out, counting_status=status,
                          counting_possible=status == "possible", counting_reason=reason)

    if ok.sum() < 10:
        return done("not possible", f"{int(ok.sum())} columns with a cross-section; a mixture "
                                    "needs at least 10")
    x, s = xs[ok], sig[ok]
    if counting is None or len(counting.component) != len(x):
        counting = count_atoms(x, n_mc=0, noise_sigma=s, max_components=min(30, len(x) // 2))
    K = int(counting.n_components)
    mu = np.asarray(counting.means, np.float64)
    comp = np.asarray(counting.component, np.int64)
    ratio = float(counting.noise_ratio) if np.isfinite(counting.noise_ratio) else nan
    out.update(n_classes=K, noise_ratio=ratio)
    z = float(ndtri(0.5 + target_exact / 2))  # two-sided: a class gap of 2z·σ gives target_exact
    step_given = nan
    if atom_cross_section_A2 is not None and np.isfinite(dpos) and has_step:
        step_given = dpos * float(atom_cross_section_A2) / step ** 2

    def by_step(delta, kind, status, reason):
        # a ladder of classes delta apart, every column at its own noise; a lower bound
        # below 1 says no more than "more than this dose"
        f = float(np.median((2 * z * s / delta) ** 2))
        if kind == "lower bound":
            f = max(f, 1.0)
        return done(status, reason, atom_step=float(delta), dose_factor_for_counting=f,
                    dose_for_counting_kind=kind, dose_for_counting_e_per_A2=f * d_A2,
                    atom_step_kind="given" if kind == "estimate" else "upper bound")

    resolved = K >= 2 and np.isfinite(ratio) and ratio <= max_noise_ratio
    if class_counts is not None and resolved and K != len(np.ravel(class_counts)):
        resolved = False
        why = (f"the mixture finds {K} classes where the specimen's class structure has "
               f"{len(np.ravel(class_counts))}")
    elif K < 2 and (not np.isfinite(ratio) or ratio <= max_noise_ratio):
        why = (f"the cross-sections spread no more than their shot noise (σ = "
               f"{out['cross_section_noise']:.3g}): the columns cannot be told apart")
        if np.isfinite(step_given):
            return by_step(step_given, "estimate", "not possible", why)
        return done("not possible", why)
    else:
        why = (f"the cross-sections' classes are {ratio:.2g}× wider than their shot noise "
               f"(σ = {out['cross_section_noise']:.3g}), so each still holds several counts"
               if np.isfinite(ratio) else "no shot-noise estimate")
    if not resolved:
        if np.isfinite(step_given):
            return by_step(step_given, "estimate", "not possible", why)
        if K >= 2:
            # adjacent components hold different counts, so one atom adds at most the
            # smallest gap between their means: a lower bound on the dose
            return by_step(float(np.diff(mu).min()), "lower bound", "not possible", why)
        return done("not possible", why)
    gap = float(np.diff(mu).min())
    pred = float(counting.confidence_overall) if counting.n_mc > 0 and \
        np.isfinite(counting.confidence_overall) else _fraction_exact(1.0, comp, mu, s)
    n_x = len(x)

    def assured(p):  # the predicted fraction less its binomial σ over these columns
        return p - np.sqrt(max(p * (1.0 - p), 0.0) / n_x)
    f = _solve_factor(lambda q: assured(_fraction_exact(q, comp, mu, s)), float(target_exact))
    status = "possible" if assured(pred) >= target_exact else "uncertain"
    reason = (f"{K} classes resolved (spread {ratio:.2g}× the shot noise), "
              f"{pred:.1%} ± {pred - assured(pred):.1%} of the {n_x} counts predicted right")
    return done(status, reason, predicted_exact=pred, atom_step=gap, atom_step_kind="resolved",
                dose_factor_for_counting=f, dose_for_counting_kind="estimate",
                dose_for_counting_e_per_A2=f * d_A2)


def dose_advice(image, *, min_distance_px, step_A=None, dose_e_per_position=None,
                smooth_px=1.0, target_exact=0.95, target_precision_pm=5.0,
                atom_cross_section_A2=None) -> DoseAdvice:
    """Columns, mixture and :func:`advise` on one image of electron counts (an ADF image,
    partial or finished) in one call; ~0.5 s for a 128 × 128 image of 400 columns.

    Parameters
    ----------
    image : (ny, nx) counts per probe position.
    min_distance_px : px, about 0.6 × the nearest column distance.
    step_A : scan step, Å per px; dose_e_per_position : electrons per probe position.
    smooth_px, target_exact, target_precision_pm, atom_cross_section_A2 : see
        :func:`operators.imaging.columns.analyze_columns` and :func:`advise`.
    """
    from operators.imaging.columns import analyze_columns

    cols = analyze_columns(np.asarray(image, np.float64), min_distance_px=min_distance_px,
                           smooth_px=smooth_px, step_A=step_A, lattice=True)
    return advise(cols, dose_e_per_position=dose_e_per_position, target_exact=target_exact,
                  target_precision_pm=target_precision_pm,
                  atom_cross_section_A2=atom_cross_section_A2)


def position_bound_known_image(expected, yx, sigma_px, radius_px=2.5):
    """Cramér–Rao bound of the radial position error of Gaussian columns in an image of
    expected counts μ (a simulator's noiseless image at the scan's dose).

    Per column, over the pixels within ``radius_px`` (less than half the column spacing,
    so no neighbour enters): I_y = Σ_p (∂μ_c/∂y)² / μ, ∂μ_c/∂y = μ_c (p_y − y)/σ², μ_c the
    column's part of μ (μ minus the local background, the median over the ring radius_px …
    radius_px + 1.5), σ the column's Gaussian width; amplitude, width and background taken
    as known (a lower bound for any estimator that must also find them).

    Parameters
    ----------
    expected : (ny, nx) expected counts; yx : (n, 2) true positions (y, x) px;
    sigma_px : Gaussian width of a column, px; radius_px : window radius, px.

    Returns
    -------
    (n,) float64 sqrt(1/I_y + 1/I_x), px.
    """
    mu_all = np.asarray(expected, np.float64)
    ny, nx = mu_all.shape
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    r = int(np.ceil(radius_px + 1.5))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    out = np.full(len(yx), np.nan)
    for k, (y0, x0) in enumerate(yx):
        py, px = int(round(y0)) + oy, int(round(x0)) + ox
        inside = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        py, px = py[inside], px[inside]
        d2 = (py - y0) ** 2 + (px - x0) ** 2
        near = d2 <= radius_px ** 2
        ring = (d2 > radius_px ** 2) & (d2 <= (radius_px + 1.5) ** 2)
        if not near.any() or not ring.any():
            continue
        mu = mu_all[py[near], px[near]]
        mu_c = np.clip(mu - np.median(mu_all[py[ring], px[ring]]), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            iy = np.nansum((mu_c * (py[near] - y0) / sigma_px ** 2) ** 2 / mu)
            ix = np.nansum((mu_c * (px[near] - x0) / sigma_px ** 2) ** 2 / mu)
            out[k] = np.sqrt(1.0 / iy + 1.0 / ix)
    return out


@dataclass
class CountedColumns:
    """Result of :func:`count_and_advise`: counts (n,) int64 per column of the columns
    result, −1 where not counted (fit failed, or counting not possible: no invented classes);
    used (n,) bool, the columns given to the mixture; counted : whether counts were given;
    counting : the CountingResult of the used columns; advice : the DoseAdvice."""

    counts: np.ndarray
    used: np.ndarray
    counted: bool
    counting: object
    advice: DoseAdvice


def count_and_advise(columns, *, dose_e_per_position=None, class_counts=None, n_mc=100, seed=0,
                     target_exact=0.95, atom_cross_section_A2=None, max_components=None,
                     n_components=None, min_count=1, mc_noise=None,
                     min_significance=3.0) -> CountedColumns:
    """Atom counting with an honest answer: the mixture of the columns' cross-sections (with
    their shot noise, a counts image), the dose advice, and counts only where the classes
    are resolved.

    ``class_counts`` (the counts of the classes in ascending cross-section, e.g.
    :func:`~operators.imaging.atom_counting.alternating_class_counts`) is used when the
    mixture finds that many classes; otherwise counting is not possible here. Columns of a
    non-counts image (no shot noise known) are counted as the mixture says, without a check.
    Columns of a counts image whose cross-section is below ``min_significance`` × its shot
    noise are not counted (−1): they scatter no more than vacuum.
    Other parameters: :func:`~operators.imaging.atom_counting.count_atoms` and :func:`advise`.
    """
    from operators.imaging.atom_counting import count_atoms

    c = columns
    xs = np.asarray(c.cross_section_shared, np.float64)
    counts_image = c.noise_model == "poisson" and c.cross_section_sigma is not None
    sig = np.asarray(c.cross_section_sigma, np.float64) if counts_image else np.full(len(xs), np.nan)
    used = np.isfinite(xs) & ((np.isfinite(sig) & (sig > 0)) if counts_image else True)
    if counts_image:
        used[used] = xs[used] >= min_significance * sig[used]
    counts = np.full(len(xs), -1, np.int64)
    kw = dict(max_components=max_components, min_count=min_count, seed=seed,
              noise_sigma=sig[used] if counts_image else None)
    if mc_noise is not None and (counts_image or mc_noise != "physical"):
        kw["mc_noise"] = mc_noise
    if used.sum() < 2 or np.ptp(xs[used]) == 0:
        adv = advise(c, None, dose_e_per_position=dose_e_per_position, target_exact=target_exact,
                     atom_cross_section_A2=atom_cross_section_A2, min_significance=min_significance)
        return CountedColumns(counts, used, False, None, adv)
    r = count_atoms(xs[used], n_components=n_components,
                    n_mc=0 if class_counts is not None else n_mc, **kw)
    if class_counts is not None and r.n_components == len(np.ravel(class_counts)):
        r = count_atoms(xs[used], n_components=r.n_components, class_counts=class_counts,
                        n_mc=n_mc, **kw)
    sub = _subset(c, used)
    adv = advise(sub, r, dose_e_per_position=dose_e_per_position, target_exact=target_exact,
                 atom_cross_section_A2=atom_cross_section_A2, class_counts=class_counts,
                 min_significance=min_significance)
    counted = adv.counting_status in ("possible", "uncertain") or not counts_image
    if class_counts is not None and r.n_components != len(np.ravel(class_counts)):
        counted = False
    if counted:
        counts[used] = r.counts
    return CountedColumns(counts, used, counted, r, adv)


def _subset(c, keep):
    """The fields :func:`advise` reads, for the columns ``keep`` only."""
    from types import SimpleNamespace

    def pick(v):
        return None if v is None else np.asarray(v)[keep]
    return SimpleNamespace(y_px=pick(c.y_px), step_A=c.step_A, noise_model=c.noise_model,
                           position_crb_px=pick(c.position_crb_px),
                           cross_section_shared=pick(c.cross_section_shared),
                           cross_section_sigma=pick(c.cross_section_sigma))
