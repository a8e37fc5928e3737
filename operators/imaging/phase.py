"""Phase from the centre of mass: integrated CoM (iCoM / iDPC) by Fourier integration.

For a thin specimen the beam deflection is the gradient of the phase the specimen imparts,
``theta = (lambda / 2 pi) grad(phi)`` (theta in rad, lambda and grad in Å), so integrating the
centre-of-mass field over the scan gives phi: peaks on atomic columns, because the deflection
points up the projected potential, towards the columns.

Scan rotation and flip use the convention of :func:`operators.com.com_from_sums` (flip mirrors
detector x, then a counter-clockwise rotation in the displayed image), applied to the given
field: ``rotation_deg`` / ``flip`` returned here are the values that, applied to the input
(com_y, com_x), give the scan-frame field that was integrated. See docs/STAGES_2D.md.

Examples
--------
>>> import numpy as np
>>> from operators.imaging.phase import icom
>>> y, x = np.mgrid[0:32, 0:32]
>>> phi = np.exp(-((y - 16.0) ** 2 + (x - 12.0) ** 2) / 8.0)
>>> gy, gx = np.gradient(phi)
>>> res = icom(gy, gx, rotation_deg=0.0, flip=False)
>>> round(float(np.corrcoef(res.phase.ravel(), phi.ravel())[0, 1]), 2)
1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.com import com_from_sums

PADDINGS = ("mirror", "zero", "none")


@dataclass
class PhaseResult:
    """Result of :func:`icom`; every field a numpy array, a number or a string.

    phase : (ny, nx) float64, zero mean; in ``unit`` (rad when calibrated).
    rotation_deg, flip : scan rotation and flip applied to the input field (com_from_sums
        convention), found or given.
    curl_residual : RMS curl / RMS divergence of the field that was integrated (0 for an exact
        gradient; about 1 for pure noise).
    unit : "rad" if mrad_per_unit, wavelength_A and step_A were all given, else
        "<CoM unit>*scan px" (multiply by ``scale_to_rad`` once calibrated).
    scale_to_rad : factor that turns ``phase`` into rad: 2π·1e-3·mrad_per_unit·step_A/λ,
        1.0 if already in rad, NaN when a calibration is missing.
    rotation_source, flip_source : "given" or "least curl".
    sign_criterion : how the 180° ambiguity was resolved ("given", "adf correlation",
        "skewness") with the value that decided it.
    padding : padding used against edge artefacts.
    n_missing : positions whose CoM was NaN (no electrons); set to zero deflection.
    """

    phase: np.ndarray
    rotation_deg: float
    flip: bool
    curl_residual: float
    unit: str
    scale_to_rad: float
    rotation_source: str
    flip_source: str
    sign_criterion: str
    padding: str
    n_missing: int


def apply_rotation(com_y, com_x, rotation_deg=0.0, flip=False):
    """Flip then rotate a vector field, exactly as :func:`operators.com.com_from_sums` does.

    Parameters
    ----------
    com_y, com_x : (ny, nx) float arrays, any unit; NaN stays NaN.
    rotation_deg : counter-clockwise in the displayed image (y down), degrees.
    flip : mirror x before rotating.

    Returns
    -------
    (y', x') float64 arrays of the same shape.
    """
    gy = np.asarray(com_y, np.float64)
    # com_from_sums with n = 1 and centre 0 is the pure flip + rotation
    return com_from_sums(np.ones(gy.shape, np.int64), gy, np.asarray(com_x, np.float64),
                         center=(0.0, 0.0), rotation_deg=rotation_deg, flip=flip)


def _curl_div(gy, gx):
    """Central-difference curl (d gy/dx - d gx/dy) and divergence, per scan px."""
    dgy_dy, dgy_dx = np.gradient(gy)
    dgx_dy, dgx_dx = np.gradient(gx)
    return dgy_dx - dgx_dy, dgx_dx + dgy_dy


def find_scan_rotation(com_y, com_x, flip=None):
    """Rotation (and flip) that make the CoM field curl-free, up to 180°.

    After the flip, the rotated field's curl is ``cos(t) curl0 - sin(t) div0`` (curl0, div0 of
    the unrotated field), so its mean square ``E(t) = c²A - 2csB + s²C`` (A = Σcurl0²,
    B = Σcurl0·div0, C = Σdiv0²) is minimised in closed form — an exact search over all
    angles. Both flips are tried unless ``flip`` is given; the smaller residual wins.

    Parameters
    ----------
    com_y, com_x : (ny, nx) float, NaN allowed (treated as the mean deflection).
    flip : None (try both), or the known flip.

    Returns
    -------
    (rotation_deg in [0, 180), flip, curl_residual): t and t + 180° fit equally well; the
    sign is chosen by :func:`icom`. curl_residual = RMS curl / RMS divergence after rotation.
    """
    gy, gx, _ = _prepare(com_y, com_x)
    best = None
    for f in ((False, True) if flip is None else (bool(flip),)):
        curl0, div0 = _curl_div(gy, -gx if f else gx)
        A, B, C = (curl0 * curl0).sum(), (curl0 * div0).sum(), (div0 * div0).sum()
        half = 0.5 * (A - C)
        R = np.hypot(half, B)
        e_min = max(0.5 * (A + C) - R, 0.0)
        # E(t) = (A+C)/2 + R cos(2t + psi), psi = atan2(B, half): minimum at 2t + psi = pi
        t = 0.5 * (np.pi - np.arctan2(B, half))
        resid = np.sqrt(e_min / max(A + C - e_min, 1e-300))
        if best is None or resid < best[2]:
            best = (float(np.rad2deg(t) % 180.0), f, float(resid))
    return best


def _prepare(com_y, com_x):
    gy = np.array(com_y, dtype=np.float64)
    gx = np.array(com_x, dtype=np.float64)
    if gy.ndim != 2 or gy.shape != gx.shape:
        raise ValueError(f"icom: com_y and com_x must be 2D arrays of one shape (ny, nx), got "
                         f"{gy.shape} and {gx.shape}")
    if min(gy.shape) < 3:
        raise ValueError(f"icom: the scan must be at least 3 x 3 positions, got {gy.shape}")
    missing = ~(np.isfinite(gy) & np.isfinite(gx))
    if missing.all():
        raise ValueError("icom: com_y/com_x contain no finite value (no electrons anywhere)")
    # A uniform deflection comes from the reference centre, not the specimen: remove it, and
    # let positions without electrons carry no deflection.
    for g in (gy, gx):
        g[missing] = np.nan
        g -= np.nanmean(g)
        g[missing] = 0.0
    return gy, gx, int(missing.sum())


def integrate_gradient(gy, gx, padding="mirror", pad_factor=2.0):
    """Phi with grad(phi) = (gy, gx) per scan px, by Fourier integration; DC set to zero.

    Parameters
    ----------
    gy, gx : (ny, nx) float64, finite: d phi/dy and d phi/dx (phi unit per scan px).
    padding : "mirror" (default): the field is extended by its mirror images with the normal
        component negated, a periodic and consistent field (equivalent to integration with
        zero normal derivative at the edges, no wrap-around jumps); "zero": zero deflection
        around the scan, the padded size ``pad_factor`` times the scan; "none": periodic.
    pad_factor : >= 1, used by "zero".

    Returns
    -------
    (ny, nx) float64 phi (phi unit), zero mean.
    """
    ny, nx = gy.shape
    if padding == "mirror":
        ey = np.concatenate([gy, gy[:, ::-1]], axis=1)
        ex = np.concatenate([gx, -gx[:, ::-1]], axis=1)
        ey = np.concatenate([ey, -ey[::-1]], axis=0)
        ex = np.concatenate([ex, ex[::-1]], axis=0)
    elif padding == "zero":
        if not (np.isfinite(pad_factor) and pad_factor >= 1):
            raise ValueError(f"icom: pad_factor must be a number >= 1, got {pad_factor!r}")
        shape = (int(np.ceil(ny * pad_factor)), int(np.ceil(nx * pad_factor)))
        ey = np.zeros(shape)
        ex = np.zeros(shape)
        ey[:ny, :nx] = gy
        ex[:ny, :nx] = gx
    elif padding == "none":
        ey, ex = gy, gx
    else:
        raise ValueError(f"icom: padding must be one of {PADDINGS}, got {padding!r}")
    ky = np.fft.fftfreq(ey.shape[0])[:, None]
    kx = np.fft.rfftfreq(ey.shape[1])[None, :]
    k2 = ky * ky + kx * kx
    k2[0, 0] = 1.0  # DC is set to zero below
    num = ky * np.fft.rfft2(ey) + kx * np.fft.rfft2(ex)
    ph = num / (2j * np.pi * k2)
    ph[0, 0] = 0.0
    phi = np.fft.irfft2(ph, s=ey.shape)[:ny, :nx]
    return phi - phi.mean()


def _skewness(a):
    d = a - a.mean()
    s2 = (d * d).mean()
    return float((d ** 3).mean() / s2 ** 1.5) if s2 > 0 else 0.0


def icom(com_y, com_x, *, rotation_deg=None, flip=None, adf=None, padding="mirror",
         pad_factor=2.0, mrad_per_unit=None, wavelength_A=None, step_A=None) -> PhaseResult:
    """Integrated centre of mass (iCoM / iDPC) phase of a scan.

    Parameters
    ----------
    com_y, com_x : (ny, nx) float, centre of mass per probe position (px or mrad, detector
        frame as measured); NaN where no electron counted.
    rotation_deg : scan rotation in degrees (com_from_sums convention), or None to find it
        (least curl, then the 180° sign from ``adf`` or the phase skewness).
    flip : bool, or None to find it (least curl).
    adf : optional (ny, nx) image brighter on the columns (ADF); when given, the sign is
        chosen so that the phase correlates positively with it, else so that the phase has
        positive skewness (sparse positive column peaks).
    padding, pad_factor : see :func:`integrate_gradient`.
    mrad_per_unit : mrad per unit of com_y/com_x (the detector's mrad/px for CoM in px, 1.0
        for CoM in mrad).
    wavelength_A : electron wavelength in Å (0.019687 at 300 keV).
    step_A : scan step in Å per scan px.

    Returns
    -------
    PhaseResult. With all three calibrations, phase is in rad:
    phi = 2π·1e-3·mrad_per_unit·step_A/λ · ∫(CoM unit) d(scan px).
    """
    gy, gx, n_missing = _prepare(com_y, com_x)
    if adf is not None:
        adf = np.asarray(adf, np.float64)
        if adf.shape != gy.shape:
            raise ValueError(f"icom: adf must have the scan shape {gy.shape}, got {adf.shape}")
    if rotation_deg is not None and not np.isfinite(rotation_deg):
        raise ValueError(f"icom: rotation_deg must be a finite number of degrees or None, got "
                         f"{rotation_deg!r}")
    rot_src = "given" if rotation_deg is not None else "least curl"
    flip_src = "given" if flip is not None else "least curl"
    if rotation_deg is None:
        rot, flip, _ = find_scan_rotation(gy, gx, flip)
    else:
        rot = float(rotation_deg)
        if flip is None:  # known rotation: the flip with less curl
            flip = min((False, True), key=lambda f: _residual(gy, gx, rot, f))
    flip = bool(flip)
    ry, rx = apply_rotation(gy, gx, rot, flip)
    phase = integrate_gradient(ry, rx, padding, pad_factor)
    if rotation_deg is None:
        if adf is not None and np.isfinite(adf).all() and adf.std() > 0:
            score = float(np.corrcoef(phase.ravel(), adf.ravel())[0, 1])
            crit = "adf correlation"
        else:
            score = _skewness(phase)
            crit = "skewness"
        if score < 0:  # rotating by another 180° negates the field and the phase
            phase = -phase
            rot += 180.0
            score = -score
        sign = f"{crit} {score:+.3f}"
    else:
        sign = "given"
    rot = float((rot + 180.0) % 360.0 - 180.0)
    curl, div = _curl_div(ry, rx)
    resid = float(np.sqrt((curl * curl).sum() / max((div * div).sum(), 1e-300)))
    if None in (mrad_per_unit, wavelength_A, step_A):
        scale, unit = np.nan, "CoM unit*scan px"
    else:
        for name, v in (("mrad_per_unit", mrad_per_unit), ("wavelength_A", wavelength_A),
                        ("step_A", step_A)):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"icom: {name} must be a number > 0, got {v!r}")
        scale = 2.0 * np.pi * 1e-3 * mrad_per_unit * step_A / wavelength_A
        phase = phase * scale
        unit, scale = "rad", 1.0
    return PhaseResult(phase=phase, rotation_deg=rot, flip=flip, curl_residual=resid,
                       unit=unit, scale_to_rad=float(scale), rotation_source=rot_src,
                       flip_source=flip_src, sign_criterion=sign, padding=padding,
                       n_missing=n_missing)


def _residual(gy, gx, rot, flip):
    curl, div = _curl_div(*apply_rotation(gy, gx, rot, flip))
    return (curl * curl).sum() / max((div * div).sum(), 1e-300)
