"""Atom counting from a single image: a Gaussian mixture over scattering cross-sections.

The statistics-based method of Van Aert et al. (2011), De Backer et al. (2013) and StatSTEM,
as used by Jia et al. (2014): the scattering cross-section of every column (the volume under
its fitted Gaussian, ``2π·η·σ1·σ2``, 2π·η·ρ² for a round column) scales with the number of
atoms in it, so the cross-sections of a crystal cluster around one value per atom count. A
mixture of K Gaussians with one shared width is fitted by expectation–maximisation (several
starts, deterministic for a seed); K is chosen by the integrated classification likelihood

    ICL(K) = -2 log L_K + 2 EN_K + (2K) log N,   EN_K = -Σ_i Σ_k τ_ik log τ_ik,

(L_K the maximised likelihood, τ_ik the posterior probability of component k for column i,
2K free parameters: K means, K - 1 proportions and one width; De Backer et al. 2013);
the smallest ICL wins. Components sorted by mean get consecutive counts from
``min_count`` (or the counts given in ``class_counts``), and a Monte Carlo re-simulation at the
measured noise level gives the probability that a column of each class is counted right.

Examples
--------
>>> import numpy as np
>>> from operators.imaging.atom_counting import count_atoms
>>> rng = np.random.default_rng(0)
>>> true = rng.integers(2, 6, 300)                       # 2..5 atoms
>>> cs = true * 1.0 + rng.normal(0, 0.08, 300)           # cross-section per column
>>> res = count_atoms(cs, min_count=2, n_mc=20)
>>> res.n_components, bool(np.all(res.counts == true))
(4, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from operators.kernels import NJIT

def scattering_cross_sections(amplitude, sigma1_px, sigma2_px, step_A=None):
    """Volume under each fitted 2D Gaussian: 2π·amplitude·σ1·σ2.

    Parameters
    ----------
    amplitude : (n,) peak height above background (image units, e.g. electrons per probe
        position or a detector fraction).
    sigma1_px, sigma2_px : (n,) widths in px (equal for round columns: 2π·η·ρ²).
    step_A : optional scan step in Å per px; then the result is in image units·Å².

    Returns
    -------
    (n,) float64 cross-sections, image units·px² (or ·Å² with step_A).
    """
    a = np.asarray(amplitude, np.float64)
    cs = 2.0 * np.pi * a * np.asarray(sigma1_px, np.float64) * np.asarray(sigma2_px, np.float64)
    return cs if step_A is None else cs * float(step_A) ** 2


# ----------------------------------------------------------------- EM (numba)

# A component whose log-density at x is this far below the nearest component's contributes
# less than e^-60 relative (weights within e^20 of each other assumed): skip it.
_WINDOW_NATS = 60.0


@njit(**NJIT)
def _e_step(x, mu, logw, inv, norm, resp, lo, hi, full):
    """Posteriors into resp (only within [lo_i, hi_i] unless full); returns log-likelihood."""
    n = x.shape[0]
    k = mu.shape[0]
    ll = 0.0
    for i in range(n):
        xi = x[i]
        j0 = np.searchsorted(mu, xi)
        if j0 == k or (j0 > 0 and xi - mu[j0 - 1] < mu[j0] - xi):
            j0 = j0 - 1 if j0 > 0 else 0
        d0 = (xi - mu[j0]) * (xi - mu[j0]) * 0.5 * inv
        a = j0
        b = j0
        if full:
            a, b = 0, k - 1
        else:
            while a > 0 and (xi - mu[a - 1]) ** 2 * 0.5 * inv - d0 < _WINDOW_NATS:
                a -= 1
            while b < k - 1 and (xi - mu[b + 1]) ** 2 * 0.5 * inv - d0 < _WINDOW_NATS:
                b += 1
        lo[i] = a
        hi[i] = b
        m = -np.inf
        for j in range(a, b + 1):
            d = xi - mu[j]
            v = logw[j] - 0.5 * d * d * inv
            resp[i, j] = v
            if v > m:
                m = v
        s = 0.0
        for j in range(a, b + 1):
            v = resp[i, j] - m
            e = np.exp(v) if v > -745.0 else 0.0
            resp[i, j] = e
            s += e
        ll += m + np.log(s) + norm
        inv_s = 1.0 / s
        for j in range(a, b + 1):
            resp[i, j] *= inv_s
    return ll


@njit(**NJIT)
def _em(x, mu, w, var, max_iter, tol, resp):
    """EM for a 1D mixture with one shared variance; mu (ascending), w updated in place,
    resp (n, k) filled with the final posteriors.

    Returns (log-likelihood, variance, iterations)."""
    n = x.shape[0]
    k = mu.shape[0]
    var_floor = 1e-12 * max(var, 1e-300)
    ll_old = -np.inf
    ll = -np.inf
    it = 0
    logw = np.empty(k)
    sr = np.empty(k)
    sx = np.empty(k)
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    while it < max_iter:
        it += 1
        order = np.argsort(mu)
        mu[:] = mu[order]
        w[:] = w[order]
        for j in range(k):
            logw[j] = np.log(w[j]) if w[j] > 0 else -np.inf
            sr[j] = 0.0
            sx[j] = 0.0
        inv = 1.0 / var
        norm = -0.5 * (np.log(2.0 * np.pi) + np.log(var))
        ll = _e_step(x, mu, logw, inv, norm, resp, lo, hi, False)
        for i in range(n):
            for j in range(lo[i], hi[i] + 1):
                sr[j] += resp[i, j]
                sx[j] += resp[i, j] * x[i]
        for j in range(k):
            w[j] = sr[j] / n
            if sr[j] > 1e-12:
                mu[j] = sx[j] / sr[j]
        new_var = 0.0
        for i in range(n):
            for j in range(lo[i], hi[i] + 1):
                d = x[i] - mu[j]
                new_var += resp[i, j] * d * d
        var = max(new_var / n, var_floor)
        if abs(ll - ll_old) <= tol:
            break
        ll_old = ll
    order = np.argsort(mu)
    mu[:] = mu[order]
    w[:] = w[order]
    for j in range(k):
        logw[j] = np.log(w[j]) if w[j] > 0 else -np.inf
    ll = _e_step(x, mu, logw, 1.0 / var, -0.5 * (np.log(2.0 * np.pi) + np.log(var)), resp,
                 lo, hi, True)
    return ll, var, it


def _run_em(x, mu0, max_iter, tol, w0=None, var0=None):
    """One EM run from the means mu0 (default: equal weights, and the variance of the data
    about their nearest start mean, as after one hard k-means assignment); stops when the
    log-likelihood changes by less than tol (nats) per iteration."""
    k = len(mu0)
    if var0 is None:
        # a width from the spacing of the starts would be too wide for a ladder of narrow
        # classes: a big class's component then swallows its small neighbours
        near = np.min((x[:, None] - np.asarray(mu0, np.float64)[None, :]) ** 2, axis=1)
        var0 = max(float(near.mean()), float(np.var(x)) * 1e-6, 1e-300)
    order = np.argsort(mu0)
    mu = np.asarray(mu0, np.float64)[order]
    w = np.full(k, 1.0 / k) if w0 is None else np.asarray(w0, np.float64)[order].copy()
    resp = np.empty((len(x), k))
    ll, var, _ = _em(x, mu, w, var0, int(max_iter), tol, resp)
    return ll, mu, w, var, resp


def _kmeanspp(x, k, rng):
    """k-means++ seeding: each next mean drawn with probability ∝ squared distance."""
    mu = [x[rng.integers(len(x))]]
    d2 = (x - mu[0]) ** 2
    for _ in range(1, k):
        tot = d2.sum()
        nxt = x[rng.integers(len(x))] if tot <= 0 else x[rng.choice(len(x), p=d2 / tot)]
        mu.append(nxt)
        d2 = np.minimum(d2, (x - nxt) ** 2)
    return np.array(mu)


def _fit_mixture(x, k, n_starts, rng, previous=None, max_iter=200):
    """Best of several EM starts for K components: (ll, mu, w, var, resp), mu ascending.

    Starts, in this order: means evenly spaced over the data range (right for a ladder of
    counts); the K quantiles of the data; the (K-1)-component solution with its heaviest
    component split in two; then k-means++ draws (seeded).
    """
    starts = [np.linspace(x.min(), x.max(), k) if k > 1 else np.array([x.mean()]),
              np.quantile(x, (np.arange(k) + 0.5) / k)]
    if previous is not None and k >= 2:
        _, pmu, pw, pvar, _ = previous
        j = int(np.argmax(pw))
        h = 0.5 * np.sqrt(pvar)
        starts.append(np.concatenate([np.delete(pmu, j), [pmu[j] - h, pmu[j] + h]]))
    while len(starts) < n_starts:
        starts.append(_kmeanspp(x, k, rng))
    best = None
    # loose: enough to rank K by the ICL (each component costs 2 log N nats); the chosen K
    # is refined to full precision
    tol = max(1e-3, 1e-5 * len(x))
    for mu0 in starts[:max(1, n_starts)]:
        fit = _run_em(x, mu0, max_iter, tol)
        if best is None or fit[0] > best[0] + 1e-9 * abs(fit[0]):
            best = fit
    return best


def _icl(ll, resp, k, n):
    r = np.clip(resp, 1e-300, 1.0)
    en = -float((resp * np.log(r)).sum())
    return -2.0 * ll + 2.0 * en + 2.0 * k * np.log(n)


# ----------------------------------------------------------------- public

@dataclass
class CountingResult:
    """Result of :func:`count_atoms`; every field a numpy array, a number or a string.

    counts : (n,) int64 atoms per column.
    component : (n,) int64 mixture component of each column (0 = smallest cross-section).
    posterior : (n,) float64 posterior probability of that component.
    n_components : K chosen (or given).
    means, weights : (K,) component means (cross-section units) and proportions.
    sigma : shared standard deviation of the components (cross-section units).
    class_counts : (K,) int64 atom count of each component.
    candidate_k : (m,) int64 numbers of components tried; icl, log_likelihood : (m,) their
        ICL and maximised log-likelihood (NaN where not fitted).
    confidence : (K,) float64 Monte Carlo probability that a column of each class
        (component) is assigned to it; confusion : (K, K) float64 Monte Carlo fraction of
        class i (row) assigned to class j.
    count_values : (m,) int64 distinct atom counts; count_confidence : (m,) Monte Carlo
        probability that a column with that count is given the right count (two classes of
        one count may be confused without harm); confidence_overall : the same over all
        columns. NaN when n_mc = 0.
    mc_sigma : (K,) noise of each class used by the Monte Carlo (RMS over its columns for
        ``mc_noise="physical"``).
    n_mc, seed : Monte Carlo runs and seed used; selection : "icl" or "given".
    noise_ratio : with ``noise_sigma``: sqrt(Σ_i Σ_k τ_ik (x_i − μ_k)² / Σ_i σ_i²), the
        spread of the columns about their components in units of their shot noise: ≈ 1 when
        every component is one class of columns (the mixture resolves the counts), well
        above 1 when a component still holds several counts (NaN without noise_sigma).
    hidden_spread : (K,) the spread of each component beyond the shot noise of its columns,
        sqrt(max(0, s_k² − mean σ_i²)) (cross-section units; NaN without noise_sigma).
    mc_noise : the Monte Carlo noise model used.
    """

    counts: np.ndarray
    component: np.ndarray
    posterior: np.ndarray
    n_components: int
    means: np.ndarray
    weights: np.ndarray
    sigma: float
    class_counts: np.ndarray
    candidate_k: np.ndarray
    icl: np.ndarray
    log_likelihood: np.ndarray
    confidence: np.ndarray
    confusion: np.ndarray
    count_values: np.ndarray
    count_confidence: np.ndarray
    confidence_overall: float
    mc_sigma: np.ndarray
    n_mc: int
    seed: int
    selection: str
    noise_ratio: float = float("nan")
    hidden_spread: np.ndarray | None = None
    mc_noise: str = "linear"


def count_atoms(cross_sections, *, max_components=None, n_components=None, min_count=1,
                class_counts=None, n_starts=4, seed=0, n_mc=100,
                mc_noise=None, noise_sigma=None) -> CountingResult:
    """Count the atoms in every column from its scattering cross-section.

    Parameters
    ----------
    cross_sections : (n,) float, one per column (any unit; see
        :func:`scattering_cross_sections`), at least 2 finite values.
    max_components : largest K tried by the ICL (default min(n // 2, 30)).
    n_components : fix K instead of choosing it by the ICL.
    min_count : atom count of the smallest component (the thinnest column present).
    class_counts : optional (K,) ints: the atom count of each component, ascending in
        cross-section, when one count per component does not hold (e.g. columns of two
        species, see :func:`alternating_class_counts`); overrides ``min_count``. Its length
        must equal the chosen K.
    n_starts : EM starts per K: evenly spaced means, the quantiles of the data, the
        (K-1)-component solution with its heaviest component split, then k-means++ draws.
    seed : seed of the random starts and of the Monte Carlo; the same seed gives the same
        result.
    n_mc : Monte Carlo runs for the confidence: every column's cross-section is redrawn from
        its component, the K-component mixture refitted (EM from the fitted means) and the
        columns recounted; 0 skips it.
    mc_noise : noise of the redrawn cross-sections: "physical" (the default with
        ``noise_sigma``) each column's own shot noise σ_i, scaled up for a class whose
        measured spread exceeds its columns' shot noise (model errors); "linear" (the default
        without) a variance growing linearly with the class mean, fitted to the measured
        spread of the classes (thick columns scatter more); or "shared" the mixture's one
        sigma. "linear" and "shared" describe the fitted mixture only: where it merges
        several counts into one component they stay optimistic (see ``noise_ratio``).
    noise_sigma : optional (n,) shot noise of every cross-section (same unit), e.g.
        ``ColumnsResult.cross_section_sigma``; gives ``noise_ratio``, ``hidden_spread`` and
        the "physical" Monte Carlo.

    Returns
    -------
    CountingResult.
    """
    x = np.asarray(cross_sections, np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("count_atoms: cross_sections contain NaN or inf; drop the columns "
                         "whose fit failed first")
    n = len(x)
    if n < 2:
        raise ValueError(f"count_atoms: need at least 2 columns, got {n}")
    if np.ptp(x) == 0:
        raise ValueError("count_atoms: all cross-sections are equal; there is no spread to "
                         "fit a mixture to (check the column fits)")
    if max_components is None:
        max_components = max(1, min(n // 2, 30))
    if int(max_components) < 1:
        raise ValueError(f"count_atoms: max_components must be >= 1, got {max_components!r}")
    if n_components is not None and not (1 <= int(n_components) <= n):
        raise ValueError(f"count_atoms: n_components must be between 1 and the number of "
                         f"columns ({n}), got {n_components!r}")
    if noise_sigma is not None:
        noise_sigma = np.asarray(noise_sigma, np.float64).ravel()
        if noise_sigma.shape != x.shape or not (np.isfinite(noise_sigma).all()
                                                and (noise_sigma > 0).all()):
            raise ValueError(f"count_atoms: noise_sigma must be {n} finite values > 0, one per "
                             "cross-section; drop the columns without one first")
    if mc_noise is None:
        mc_noise = "linear" if noise_sigma is None else "physical"
    if mc_noise not in ("linear", "shared", "physical"):
        raise ValueError(f"count_atoms: mc_noise must be 'physical', 'linear' or 'shared', got "
                         f"{mc_noise!r}")
    if mc_noise == "physical" and noise_sigma is None:
        raise ValueError("count_atoms: mc_noise='physical' needs noise_sigma (the shot noise of "
                         "every cross-section)")
    if int(n_starts) < 1 or int(n_mc) < 0:
        raise ValueError(f"count_atoms: n_starts must be >= 1 and n_mc >= 0, got "
                         f"{n_starts!r}, {n_mc!r}")
    rng = np.random.default_rng(seed)
    if n_components is None:
        ks = np.arange(1, min(int(max_components), n) + 1)
        selection = "icl"
    else:
        ks = np.array([int(n_components)])
        selection = "given"
    icl = np.full(len(ks), np.nan)
    lls = np.full(len(ks), np.nan)
    fits = {}
    prev = None
    for i, k in enumerate(ks):
        fit = _fit_mixture(x, int(k), int(n_starts), rng, prev)
        prev = fits[int(k)] = fit
        lls[i] = fit[0]
        icl[i] = _icl(fit[0], fit[4], int(k), n)
    best = int(np.nanargmin(icl))
    K = int(ks[best])
    ll, mu, w, var, resp = fits[K]
    ll, mu, w, var, resp = _run_em(x, mu, 5000, 1e-9 * (abs(ll) + 1.0), w, var)
    lls[best] = ll
    icl[best] = _icl(ll, resp, K, n)
    comp = resp.argmax(axis=1)
    post = resp[np.arange(n), comp]
    if class_counts is None:
        cc = int(min_count) + np.arange(K, dtype=np.int64)
    else:
        cc = np.asarray(class_counts, np.int64).ravel()
        if len(cc) != K:
            raise ValueError(f"count_atoms: class_counts has {len(cc)} entries but the mixture "
                             f"has {K} components; give one count per component, or fix "
                             f"n_components={len(cc)}")
    ratio, hidden = np.nan, np.full(K, np.nan)
    if noise_sigma is not None:
        nk = np.maximum(resp.sum(axis=0), 1e-12)
        spread2 = (resp * (x[:, None] - mu[None, :]) ** 2).sum(axis=0) / nk
        shot2 = (resp * noise_sigma[:, None] ** 2).sum(axis=0) / nk
        hidden = np.sqrt(np.clip(spread2 - shot2, 0, None))
        ratio = float(np.sqrt((resp * (x[:, None] - mu[None, :]) ** 2).sum()
                              / (noise_sigma ** 2).sum()))
    if mc_noise == "physical":
        # each column redrawn with its own shot noise, scaled up where its class scatters
        # more than that (model errors the shot noise does not contain)
        scale = np.sqrt(np.maximum(1.0, spread2 / shot2))
        col_sigma = noise_sigma * scale[comp]
        sig_mc = np.sqrt(np.bincount(comp, col_sigma ** 2, K) / np.maximum(np.bincount(comp, None, K), 1))
    elif mc_noise == "linear":
        sig_mc = _class_sigmas(x, resp, mu, w, var)
        col_sigma = sig_mc[comp]
    else:
        sig_mc = np.full(K, np.sqrt(var))
        col_sigma = sig_mc[comp]
    tally = _monte_carlo(comp, mu, col_sigma, K, int(n_mc), np.random.default_rng([seed, 1]))
    values = np.unique(cc)
    with np.errstate(invalid="ignore"):
        rows = tally.sum(axis=1)
        frac = tally / np.where(rows > 0, rows, np.nan)[:, None]
        right = tally * (cc[:, None] == cc[None, :])   # the count is right
        by_count = np.array([right[cc == v].sum() / tally[cc == v].sum() for v in values])
        overall = float(right.sum() / tally.sum())
    if n_mc == 0:
        frac = np.full((K, K), np.nan)
    return CountingResult(counts=cc[comp], component=comp.astype(np.int64), posterior=post,
                          n_components=K, means=mu, weights=w, sigma=float(np.sqrt(var)),
                          class_counts=cc, candidate_k=ks.astype(np.int64), icl=icl,
                          log_likelihood=lls, confidence=np.diag(frac).copy(),
                          confusion=frac, count_values=values.astype(np.int64),
                          count_confidence=by_count, confidence_overall=overall,
                          mc_sigma=sig_mc,
                          n_mc=int(n_mc), seed=int(seed), selection=selection,
                          noise_ratio=ratio, hidden_spread=hidden, mc_noise=mc_noise)


def _class_sigmas(x, resp, mu, w, var):
    """Per-class noise for the Monte Carlo: sigma_k² = a + b·mu_k, a and b fitted by least
    squares (weighted by class size) to the classes' measured spreads; shot noise grows
    with the signal, so the thick columns' classes are wider than the shared sigma."""
    nk = resp.sum(axis=0)
    if len(mu) < 3:
        return np.full(len(mu), np.sqrt(var))
    vk = (resp * (x[:, None] - mu[None, :]) ** 2).sum(axis=0) / np.maximum(nk, 1e-12)
    A = np.c_[np.ones(len(mu)), mu] * np.sqrt(nk)[:, None]
    coef, *_ = np.linalg.lstsq(A, vk * np.sqrt(nk), rcond=None)
    fit = coef[0] + coef[1] * mu
    # never below a tenth of the shared variance (a poorly populated fit must not vanish)
    return np.sqrt(np.maximum(fit, 0.1 * var))


def _monte_carlo(comp, mu, sigma, K, n_mc, rng):
    """(K, K) tally of class i (true component) assigned to class j: every column redrawn
    from its component with its noise sigma (n,), K components refitted (EM started at the
    fitted means), recounted."""
    tally = np.zeros((K, K))
    n = len(comp)
    for _ in range(n_mc):
        xs = mu[comp] + sigma * rng.standard_normal(n)
        got = _run_em(xs, mu, 300, max(1e-3, 1e-5 * n))[4].argmax(axis=1)
        np.add.at(tally, (comp, got), 1.0)
    return tally


def alternating_class_counts(n_min, n_max, sigma_a, sigma_b):
    """Atom counts of the cross-section classes of columns alternating two species along the
    beam (rocksalt along [001]: A B A B ...), in ascending cross-section.

    A column of n atoms holds n/2 of each species when n is even; when odd, one more of
    either, so odd n gives two classes ((n+1)/2 A + (n-1)/2 B, and the reverse). The
    cross-section of a class is n_A·sigma_a + n_B·sigma_b (per-atom cross-sections, any unit).
    Classes closer than 1e-9 relative are merged.

    Parameters
    ----------
    n_min, n_max : smallest and largest atom count present.
    sigma_a, sigma_b : per-atom cross-sections of the two species (only their ratio matters).

    Returns
    -------
    (counts (m,) int64, relative cross-sections (m,) float64), ascending.
    """
    if not (1 <= int(n_min) <= int(n_max)):
        raise ValueError(f"alternating_class_counts: need 1 <= n_min <= n_max, got "
                         f"{n_min!r}, {n_max!r}")
    cls = []
    for nn in range(int(n_min), int(n_max) + 1):
        if nn % 2 == 0:
            cls.append((nn // 2 * (sigma_a + sigma_b), nn))
        else:
            h = nn // 2
            cls.append(((h + 1) * sigma_a + h * sigma_b, nn))
            cls.append((h * sigma_a + (h + 1) * sigma_b, nn))
    cls.sort()
    out = [cls[0]]
    for c in cls[1:]:
        if abs(c[0] - out[-1][0]) > 1e-9 * abs(c[0]) or c[1] != out[-1][1]:
            out.append(c)
    return (np.array([c[1] for c in out], np.int64), np.array([c[0] for c in out]))
