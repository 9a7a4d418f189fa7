"""Procedural chest radiograph phantoms with RSNA-like labels and demographics.

A phantom is drawn as a *density* map (bright = dense, like a displayed radiograph):
soft tissue of the body, air of the lungs taken away, then bones (ribs, clavicles,
spine, scapulae, humeral heads), heart, mediastinum, diaphragm domes, hila and vessel
markings added, tone-mapped, resized to the requested size and given film grain.

Everything is drawn in a body frame ``(u, v)`` with ``u`` left to right and ``v`` top
to bottom, both about ``[0, 1]`` across the image; a small random rotation and zoom map
pixels into that frame.  Image left is the patient's right (PA convention), so the heart
bulges to image right.

Randomness comes from independent streams derived from one seed (demographics, anatomy,
findings, opacities, grain), so the same seed drawn with and without opacities gives the
same anatomy and the same grain; only the opacities differ.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lungopacity.constants import (
    CLASS_NAMES,
    LUNG_OPACITY,
    NORMAL,
    NOT_NORMAL,
    RSNA_IMAGE_SIZE,
    SEXES,
    VIEWS,
)
from lungopacity.errors import ConfigError

logger = logging.getLogger(__name__)

# --- RSNA facts (stage 2 training set, 26,684 patients; see ../shared/README.md) -------

#: Patients per (view, class code) in RSNA stage 2: Normal, Not normal, Lung Opacity.
RSNA_VIEW_CLASS_COUNTS: dict[str, tuple[int, int, int]] = {
    "AP": (1637, 5872, 4664),
    "PA": (7214, 5949, 1348),
}
#: Lung Opacity patients with 1, 2, 3 and 4 boxes.
RSNA_BOX_COUNT_COUNTS: tuple[int, int, int, int] = (2614, 3266, 119, 13)
#: Fraction of male patients per class code.
RSNA_MALE_FRACTION_BY_CLASS: tuple[float, float, float] = (4946 / 8851, 6710 / 11821, 3510 / 6012)
#: Patients per age decade 0-9, 10-19, ..., 80-89, 90+ (ages over 100 are recording errors).
RSNA_AGE_DECADE_COUNTS: tuple[int, ...] = (337, 1322, 3070, 3795, 5036, 6576, 4608, 1643, 274, 23)
RSNA_MEAN_AGE = 47.03
#: Mean age per (view, class code): opacity and normal patients are younger.
RSNA_MEAN_AGE_BY_VIEW_CLASS: dict[str, tuple[float, float, float]] = {
    "AP": (42.03, 48.08, 44.98),
    "PA": (45.60, 50.57, 47.67),
}
#: (pixel spacing in mm at 1024 px, patients) per view.
RSNA_PIXEL_SPACING_BY_VIEW: dict[str, tuple[tuple[float, int], ...]] = {
    "AP": ((0.168, 6657), (0.139, 4420), (0.171, 1083)),
    "PA": ((0.143, 8992), (0.168, 2158), (0.194, 1354), (0.139, 1091), (0.171, 913)),
}

#: Findings a "No Lung Opacity / Not Normal" phantom can carry.
NOT_NORMAL_FINDINGS: tuple[str, ...] = ("cardiomegaly", "pleural_effusion", "nodules", "lines_and_tubes")

#: Largest side the anatomy is drawn at; bigger images are upsampled, then get grain.
WORKING_SIZE = 512
#: Smallest image side: below it the lung fields are too pixelated to hold the opacities.
MIN_SIZE = 32

# Independent random streams under one phantom seed.
_STREAM_DEMOGRAPHICS, _STREAM_ANATOMY, _STREAM_FINDINGS, _STREAM_OPACITY, _STREAM_GRAIN = range(5)


@dataclass(frozen=True)
class PatientSpec:
    """Who a phantom shows: identity, class and the header facts RSNA provides."""

    patient_id: str
    view: str
    label_class: int
    sex: str
    age: int
    #: mm per pixel at 1024 px (RSNA's values); :meth:`pixel_spacing_at` scales it.
    pixel_spacing_1024: float

    def pixel_spacing_at(self, size: int) -> float:
        """Pixel spacing in mm for an image of ``size`` pixels showing the same field."""
        return round(self.pixel_spacing_1024 * RSNA_IMAGE_SIZE / size, 6)


@dataclass(frozen=True)
class PhantomCase:
    """One phantom chest radiograph in memory.

    ``pixels`` is float32 ``size x size`` in [0, 1] (bright = dense, the package's pixel
    convention); ``boxes`` float32 ``(N, 4)`` xyxy in pixels, one per opacity (empty unless
    ``label_class`` is Lung Opacity); ``lung_mask`` marks the visible lung fields.
    """

    patient_id: str
    pixels: np.ndarray
    boxes: np.ndarray
    label_class: int
    sex: str
    age: int
    view: str
    pixel_spacing: float
    lung_mask: np.ndarray
    findings: tuple[str, ...]

    @property
    def target(self) -> int:
        """Binary opacity label: 1 exactly for the Lung Opacity class."""
        return int(self.label_class == LUNG_OPACITY)

    @property
    def class_name(self) -> str:
        """RSNA class string of ``label_class``."""
        return CLASS_NAMES[self.label_class]


# --- seeds ------------------------------------------------------------------------------


def _as_seed_sequence(seed: int | Sequence[int] | np.random.SeedSequence) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    return np.random.SeedSequence(seed)


def _child_rng(seq: np.random.SeedSequence, key: int) -> np.random.Generator:
    """A generator for stream ``key`` under ``seq`` that does not depend on prior spawns."""
    child = np.random.SeedSequence(entropy=seq.entropy, spawn_key=tuple(seq.spawn_key) + (key,))
    return np.random.default_rng(child)


def random_patient_id(rng: np.random.Generator) -> str:
    """A version-4 UUID string drawn from ``rng`` (so seeded runs repeat exactly)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# --- demographics -----------------------------------------------------------------------


def _view_class_probabilities(view: str) -> np.ndarray:
    counts = np.asarray(RSNA_VIEW_CLASS_COUNTS[view], dtype=np.float64)
    return counts / counts.sum()


def rsna_ap_fraction() -> float:
    """Fraction of RSNA images taken AP (0.456)."""
    ap = sum(RSNA_VIEW_CLASS_COUNTS["AP"])
    return ap / (ap + sum(RSNA_VIEW_CLASS_COUNTS["PA"]))


def sample_age(rng: np.random.Generator, view: str, label_class: int) -> int:
    """An age in years, 1-100, from RSNA's age histogram shifted to the (view, class) mean."""
    decades = np.asarray(RSNA_AGE_DECADE_COUNTS, dtype=np.float64)
    decade = int(rng.choice(len(decades), p=decades / decades.sum()))
    offset = RSNA_MEAN_AGE_BY_VIEW_CLASS[view][label_class] - RSNA_MEAN_AGE
    age = decade * 10 + rng.uniform(0.0, 10.0) + offset
    return int(np.clip(round(age), 1, 100))


def sample_patient(
    rng: np.random.Generator,
    *,
    view: str | None = None,
    label_class: int | None = None,
    sex: str | None = None,
    age: int | None = None,
    patient_id: str | None = None,
) -> PatientSpec:
    """Draw an RSNA-like patient: view first, then class given view, then sex and age.

    Any argument that is given is kept; the rest are drawn from RSNA's marginals
    (45.6 % AP; P(class | view); P(male | class); age histogram shifted per view and class).
    The draws happen in a fixed order whatever is given, so fixing one fact does not
    change the others for the same ``rng`` state.
    """
    drawn_id = random_patient_id(rng)
    drawn_view = "AP" if rng.random() < rsna_ap_fraction() else "PA"
    view = view if view is not None else drawn_view
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {VIEWS}, got {view!r}")
    drawn_class = int(rng.choice(3, p=_view_class_probabilities(view)))
    label_class = int(label_class) if label_class is not None else drawn_class
    if label_class not in (NORMAL, NOT_NORMAL, LUNG_OPACITY):
        raise ConfigError(f"label_class must be 0, 1 or 2, got {label_class!r}")
    drawn_sex = "M" if rng.random() < RSNA_MALE_FRACTION_BY_CLASS[label_class] else "F"
    sex = sex if sex is not None else drawn_sex
    if sex not in SEXES:
        raise ConfigError(f"sex must be one of {SEXES}, got {sex!r}")
    drawn_age = sample_age(rng, view, label_class)
    age = int(age) if age is not None else drawn_age
    spacings, weights = zip(*RSNA_PIXEL_SPACING_BY_VIEW[view])
    weights_arr = np.asarray(weights, dtype=np.float64)
    spacing = float(spacings[int(rng.choice(len(spacings), p=weights_arr / weights_arr.sum()))])
    return PatientSpec(
        patient_id=patient_id if patient_id is not None else drawn_id,
        view=view,
        label_class=label_class,
        sex=sex,
        age=age,
        pixel_spacing_1024=spacing,
    )


def _largest_remainder(total: int, probabilities: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` closest to ``total * probabilities``."""
    exact = np.asarray(probabilities, dtype=np.float64) * total
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def allocate_view_class(n: int) -> list[tuple[str, int]]:
    """Stratified (view, class) pairs for ``n`` patients, in a fixed (unshuffled) order.

    Views get ``n * 45.6 %`` AP by largest remainder, then each view's patients are split
    into classes by P(class | view), so the AP share, the class mix and the opacity rate
    per view all match RSNA as closely as integers allow.  When ``n >= 3`` every class
    appears at least once (a missing class takes one patient from the largest cell).
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    n_ap, n_pa = _largest_remainder(n, (rsna_ap_fraction(), 1.0 - rsna_ap_fraction()))
    cells: dict[tuple[str, int], int] = {}
    for view, n_view in (("AP", n_ap), ("PA", n_pa)):
        for label_class, count in enumerate(_largest_remainder(n_view, _view_class_probabilities(view))):
            cells[(view, label_class)] = count
    for label_class in (NORMAL, NOT_NORMAL, LUNG_OPACITY):
        if n >= 3 and cells[("AP", label_class)] + cells[("PA", label_class)] == 0:
            # Put the missing class in the view where it is commoner, taken from the largest cell.
            view = "AP" if _view_class_probabilities("AP")[label_class] >= _view_class_probabilities("PA")[label_class] else "PA"
            donor = max(cells, key=lambda key: (cells[key], key))
            cells[donor] -= 1
            cells[(view, label_class)] += 1
    return [key for key in sorted(cells) for _ in range(cells[key])]


def plan_patients(n: int, seed: int | Sequence[int] | np.random.SeedSequence = 0) -> list[PatientSpec]:
    """``n`` RSNA-like patients: stratified view and class, shuffled; sex, age, id drawn."""
    rng = np.random.default_rng(_as_seed_sequence(seed))
    pairs = allocate_view_class(n)
    order = rng.permutation(len(pairs))
    return [sample_patient(rng, view=pairs[i][0], label_class=pairs[i][1]) for i in order]


# --- drawing helpers ----------------------------------------------------------------------


def _smoothstep(edge0: float | np.ndarray, edge1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """0 below ``edge0``, 1 beyond ``edge1`` (either order), smooth in between."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Band-limited noise of about unit spread: a ``cells`` random grid upsampled bicubically."""
    grid = rng.standard_normal((max(cells[0], 1) + 3, max(cells[1], 1) + 3)).astype(np.float32)
    up = np.asarray(Image.fromarray(grid).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return up / np.float32(max(float(up.std()), 1e-3))


# Five-by-seven bitmaps for the radiographer's side marker letters.
_MARKER_GLYPHS: dict[str, tuple[str, ...]] = {
    "R": ("1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"),
    "L": ("1....", "1....", "1....", "1....", "1....", "1....", "11111"),
}


def _bump(x: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """A smooth bump: 1 at ``centre``, 0 beyond ``half_width`` from it (cheaper than exp)."""
    t = np.clip(1.0 - np.abs(x - centre) / half_width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Canvas:
    """The body-frame coordinate grid of one phantom and its density map."""

    def __init__(self, work: int, cx: float, angle: float, zoom: float, v_shift: float) -> None:
        self.work = work
        self.cos, self.sin, self.zoom, self.v_shift = math.cos(angle), math.sin(angle), zoom, v_shift
        pix = (np.arange(work, dtype=np.float32) + 0.5) / work - 0.5
        x, y = pix[None, :], pix[:, None]
        self.u = (0.5 + (self.cos * x + self.sin * y) / zoom).astype(np.float32)
        self.v = (0.5 + v_shift + (-self.sin * x + self.cos * y) / zoom).astype(np.float32)
        self.cx = cx
        self.a = np.abs(self.u - np.float32(cx))
        self.left = self.u > cx  # image right = patient's left
        self.density = np.zeros((work, work), dtype=np.float32)

    def to_pixel(self, u: Any, v: Any) -> tuple[Any, Any]:
        """Pixel (column, row) of body-frame point(s) ``(u, v)`` (floats or arrays)."""
        du, dv = (u - 0.5) * self.zoom, (v - 0.5 - self.v_shift) * self.zoom
        x = self.cos * du - self.sin * dv
        y = self.sin * du + self.cos * dv
        return (x + 0.5) * self.work - 0.5, (y + 0.5) * self.work - 0.5

    def crop(self, u0: float, u1: float, v0: float, v1: float, margin: int = 2) -> tuple[slice, slice]:
        """Pixel slices (rows, cols) covering the body-frame rectangle, clipped to the image."""
        corners = [self.to_pixel(u, v) for u in (u0, u1) for v in (v0, v1)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        c0 = min(max(math.floor(min(xs)) - margin, 0), self.work)
        c1 = min(max(math.ceil(max(xs)) + margin + 1, c0), self.work)
        r0 = min(max(math.floor(min(ys)) - margin, 0), self.work)
        r1 = min(max(math.ceil(max(ys)) + margin + 1, r0), self.work)
        return slice(r0, r1), slice(c0, c1)

    def add_polyline(self, points: Sequence[tuple[float, float]], half_width: float, amount: float, *,
                     wall: bool = False, mask: np.ndarray | None = None) -> None:
        """Add a thin bright line (or a tube's two walls) along body-frame ``points``.

        ``mask`` (a full-image weight map) confines the line, e.g. vessels to the lungs.
        """
        pts = np.asarray(points, dtype=np.float64)
        pad = half_width * 2 + 0.004
        sy, sx = self.crop(float(pts[:, 0].min() - pad), float(pts[:, 0].max() + pad),
                           float(pts[:, 1].min() - pad), float(pts[:, 1].max() + pad))
        u, v = self.u[sy, sx], self.v[sy, sx]
        if u.size == 0:
            return
        dist2 = np.full(u.shape, np.inf, dtype=np.float32)
        for (u0, v0), (u1, v1) in zip(pts[:-1], pts[1:]):
            du, dv = u1 - u0, v1 - v0
            pu, pv = u - np.float32(u0), v - np.float32(v0)
            t = np.clip((pu * du + pv * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
            pu -= t * np.float32(du)
            pv -= t * np.float32(dv)
            np.minimum(dist2, pu * pu + pv * pv, out=dist2)
        dist = np.sqrt(dist2)
        if wall:
            profile = _bump(dist, half_width * 0.8, half_width * 0.35) + 0.25 * (dist < half_width)
        else:
            profile = _bump(dist, 0.0, half_width)
        if mask is not None:
            profile *= mask[sy, sx]
        self.density[sy, sx] += np.float32(amount) * profile

    def add_disc(self, u0: float, v0: float, radius: float, amount: float, ring: bool = False) -> None:
        """Add a soft-edged bright disc (or a ring with a dot, like an ECG electrode)."""
        sy, sx = self.crop(u0 - radius * 1.5, u0 + radius * 1.5, v0 - radius * 1.5, v0 + radius * 1.5)
        dist = np.hypot(self.u[sy, sx] - np.float32(u0), self.v[sy, sx] - np.float32(v0))
        if ring:
            profile = _bump(dist, radius * 0.85, radius * 0.2) + _smoothstep(radius * 0.3, radius * 0.2, dist)
        else:
            profile = _smoothstep(radius, radius * 0.5, dist)
        self.density[sy, sx] += np.float32(amount) * profile


# --- the phantom --------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """Random shape parameters of one body (body-frame units, fractions of the image)."""

    cx: float
    angle: float
    zoom: float
    v_shift: float
    apex: float
    base_right: float  # costophrenic level, image left = patient's right (the higher dome)
    base_left: float
    dome_height: float
    lung_lateral: float
    body_half_width: float
    mediastinum: float
    heart_rx: float
    heart_ry: float
    heart_tilt: float
    heart_dx: float
    heart_dv: float
    air: float
    rib_spacing: float
    rib_growth: float
    rib_amount: float
    rib_width: float
    rib_slope: float
    rib_curve: float
    rib_phase: float
    clavicle_v: float
    clavicle_slope: float
    scapula_a: float
    gamma: float
    black: float
    white: float
    grain: float
    breast_amount: float
    stomach_gas: float


def _sample_anatomy(rng: np.random.Generator, spec: PatientSpec) -> _Anatomy:
    ap = spec.view == "AP"
    child = spec.age < 15
    # AP films are taken supine or sitting with shallow inspiration: higher domes, bigger
    # magnified heart, flatter ribs, higher clavicles and scapulae over the lungs.
    base_right = rng.uniform(0.73, 0.79) if ap else rng.uniform(0.79, 0.85)
    lateral = rng.uniform(0.35, 0.39)
    return _Anatomy(
        cx=0.5 + rng.normal(0.0, 0.012),
        angle=rng.normal(0.0, 0.022),
        zoom=rng.uniform(0.94, 1.04),
        v_shift=rng.normal(0.0, 0.012),
        apex=rng.uniform(0.11, 0.16),
        base_right=base_right,
        base_left=base_right + rng.uniform(0.01, 0.035),
        dome_height=rng.uniform(0.06, 0.1),
        lung_lateral=lateral,
        body_half_width=lateral + rng.uniform(0.05, 0.09),
        mediastinum=rng.uniform(0.065, 0.08),
        heart_rx=(rng.uniform(0.2, 0.225) if ap else rng.uniform(0.17, 0.19)) * (1.05 if child else 1.0),
        heart_ry=rng.uniform(0.14, 0.16),
        heart_tilt=rng.uniform(0.35, 0.6),
        heart_dx=rng.uniform(0.065, 0.09),
        heart_dv=rng.uniform(0.15, 0.18),
        air=rng.uniform(0.34, 0.4),
        rib_spacing=rng.uniform(0.05, 0.058),
        rib_growth=rng.uniform(0.0012, 0.0022),
        rib_amount=rng.uniform(0.06, 0.095) * (0.8 if spec.age > 70 else 1.0),
        rib_width=rng.uniform(0.36, 0.46),
        rib_slope=rng.uniform(0.12, 0.2) if ap else rng.uniform(0.22, 0.3),
        rib_curve=rng.uniform(2.2, 2.7) if ap else rng.uniform(2.9, 3.5),
        rib_phase=rng.uniform(-0.01, 0.01),
        clavicle_v=rng.uniform(0.12, 0.15) if ap else rng.uniform(0.16, 0.19),
        clavicle_slope=rng.uniform(0.0, 0.03) if ap else rng.uniform(0.04, 0.07),
        scapula_a=rng.uniform(0.27, 0.31) if ap else rng.uniform(0.38, 0.42),
        gamma=rng.uniform(0.85, 1.15),
        black=rng.uniform(0.0, 0.05),
        white=rng.uniform(0.85, 0.97) if ap else rng.uniform(0.9, 1.0),
        grain=rng.uniform(0.008, 0.016) * (1.3 if ap else 1.0),
        breast_amount=rng.uniform(0.04, 0.09) if (spec.sex == "F" and spec.age >= 15) else 0.0,
        stomach_gas=rng.uniform(0.1, 0.25) if rng.random() < 0.6 else 0.0,
    )


def _sample_findings(rng: np.random.Generator, spec: PatientSpec) -> tuple[str, ...]:
    """Other findings: one or two of NOT_NORMAL_FINDINGS for Not normal; some AP opacity cases get tubes."""
    if spec.label_class == NOT_NORMAL:
        weights = np.array([0.3, 0.3, 0.2, 0.4 if spec.view == "AP" else 0.15])
        count = 1 if rng.random() < 0.7 else 2
        chosen = rng.choice(len(NOT_NORMAL_FINDINGS), size=count, replace=False, p=weights / weights.sum())
        return tuple(NOT_NORMAL_FINDINGS[i] for i in sorted(chosen))
    if spec.label_class == LUNG_OPACITY and spec.view == "AP" and rng.random() < 0.3:
        return ("lines_and_tubes",)
    return ()


def _draw_body(canvas: _Canvas, anat: _Anatomy, findings: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Draw the anatomy into ``canvas.density``; return the lung field map and helpers."""
    u, v, a, left = canvas.u, canvas.v, canvas.a, canvas.left
    cx, apex, lat = anat.cx, anat.apex, anat.lung_lateral
    f32 = np.float32

    # Body: elliptical cross-section (thicker in the middle), sloping shoulders that widen
    # out of the image, a neck, and a slight waist.
    neck_w = 0.1
    body_w = anat.body_half_width + 0.12 * _smoothstep(apex + 0.22, apex, v) - 0.04 * np.clip(v - 0.6, 0.0, None)
    shoulder_top = 0.03 + 0.2 * np.clip(a - neck_w, 0.0, None)
    torso = np.clip(1.0 - (a / body_w) ** 2, 0.0, 1.0)
    torso = np.sqrt(np.sqrt(torso)) * _smoothstep(shoulder_top - 0.01, shoulder_top + 0.06, v)
    density = f32(0.72) * torso
    sy, sx = canvas.crop(cx - neck_w, cx + neck_w, -0.1, apex + 0.12)
    neck = 0.62 * np.sqrt(np.clip(1.0 - (a[sy, sx] / neck_w) ** 2, 0.0, 1.0))
    np.maximum(density[sy, sx], neck, out=density[sy, sx])

    # Lungs: a superellipse per side, cut by the diaphragm dome, mediastinum and heart.
    base = f32(anat.base_right) + f32(anat.base_left - anat.base_right) * left
    dome_top = base - anat.dome_height * np.clip(1.0 - ((a - 0.2) / 0.2) ** 2, 0.0, 1.0)
    a_center, a_radius = (anat.mediastinum + lat) / 2.0, (lat - anat.mediastinum) / 2.0 + 0.02
    v_center = max(anat.base_right, anat.base_left) - 0.02
    vertical = np.clip((v_center - v) / (v_center - apex), 0.0, None)
    across = np.abs(a - a_center + 0.04 * vertical) / a_radius
    ellipse = 1.0 - across * across * np.sqrt(across) - vertical * vertical
    margin = np.minimum(ellipse * 0.08, dome_top - v)
    np.minimum(margin, a - anat.mediastinum, out=margin)
    # The heart: a tilted ellipse whose long axis runs down and out to the apex.
    heart_u, heart_v = cx + anat.heart_dx, anat.base_left - anat.heart_dv
    heart_rx, heart_ry = anat.heart_rx, anat.heart_ry
    if "cardiomegaly" in findings:
        heart_rx, heart_ry = heart_rx * 1.22, heart_ry * 1.1
    reach = heart_rx + 0.01
    hy, hx = canvas.crop(heart_u - reach, heart_u + reach, heart_v - reach, heart_v + reach)
    du, dv = u[hy, hx] - f32(heart_u), v[hy, hx] - f32(heart_v)
    c, s = math.cos(anat.heart_tilt), math.sin(anat.heart_tilt)
    heart_r = np.sqrt(((du * c + dv * s) / heart_rx) ** 2 + ((dv * c - du * s) / heart_ry) ** 2)
    np.minimum(margin[hy, hx], (heart_r - 1.0) * min(heart_rx, heart_ry), out=margin[hy, hx])
    # The aortic knob bulges into the left upper lung beside the trachea.
    knob_u, knob_v = cx + anat.mediastinum + 0.005, apex + 0.16
    ky, kx = canvas.crop(knob_u - 0.05, knob_u + 0.05, knob_v - 0.05, knob_v + 0.05)
    np.minimum(margin[ky, kx], np.hypot(u[ky, kx] - f32(knob_u), v[ky, kx] - f32(knob_v)) - 0.035, out=margin[ky, kx])
    lung = _smoothstep(-0.007, 0.007, margin)
    depth = 0.45 + 0.55 * np.sqrt(np.clip(ellipse, 0.0, 1.0))
    density -= anat.air * lung * depth

    # Mediastinum and the abdomen under the domes (the liver side a little denser).
    my, mx = canvas.crop(cx - 0.12, cx + 0.12, apex - 0.05, 1.1)
    density[my, mx] += 0.04 * _smoothstep(anat.mediastinum + 0.03, anat.mediastinum, a[my, mx])
    ly, lx = canvas.crop(0.0, cx, anat.base_right - anat.dome_height - 0.02, 1.1)
    density[ly, lx] += 0.04 * _smoothstep(dome_top[ly, lx], dome_top[ly, lx] + 0.05, v[ly, lx])
    if anat.stomach_gas > 0:
        gas_u, gas_v = cx + 0.17, anat.base_left - anat.dome_height + 0.055
        gy, gx = canvas.crop(gas_u - 0.06, gas_u + 0.06, gas_v - 0.04, gas_v + 0.04)
        gas = np.hypot((u[gy, gx] - f32(gas_u)) / 0.05, (v[gy, gx] - f32(gas_v)) / 0.026)
        density[gy, gx] -= anat.stomach_gas * _smoothstep(1.0, 0.6, gas)

    # Trachea (air) and the spine: vertebral bodies with darker discs.
    ty, tx = canvas.crop(cx - 0.05, cx + 0.05, -0.1, 1.1)
    ua, va = np.abs(u[ty, tx] - f32(cx)), v[ty, tx]
    trachea_end = apex + 0.2
    density[ty, tx] -= 0.1 * _smoothstep(0.02, 0.012, ua) * _smoothstep(trachea_end, trachea_end - 0.04, va)
    phase = (va - apex) / 0.048
    disc = np.abs(phase - np.round(phase))
    density[ty, tx] += 0.05 * _smoothstep(0.036, 0.028, ua) * (0.8 + 0.2 * _smoothstep(0.08, 0.2, disc))

    # Posterior ribs: arches from the spine, rising a little then falling steeply at the
    # chest wall.  Rib k's top edge is at s_k = s0 + k*d + k^2*e, so the continuous rib
    # index of a point solves that quadratic; its fraction says rib or gap, without a loop.
    ry_, rx_ = canvas.crop(0.0, 1.0, apex - 0.08, max(anat.base_left, anat.base_right) + 0.12)
    ar, vr = np.minimum(a[ry_, rx_], f32(0.45)), v[ry_, rx_]
    level = vr - (anat.rib_curve * ar * ar * ar - anat.rib_slope * ar) - (apex - 0.035 + anat.rib_phase)
    d, e = anat.rib_spacing, anat.rib_growth
    index = (np.sqrt(np.clip(d * d + 4 * e * level, 0.0, None)) - d) / (2 * e)
    frac = index - np.floor(index)
    width = anat.rib_width
    rib = _smoothstep(0.0, 0.08, frac) * _smoothstep(width, width - 0.08, frac)
    rib *= 0.65 + 0.35 * (_bump(frac, 0.04, 0.06) + _bump(frac, width - 0.04, 0.06))
    rib *= _smoothstep(0.02, 0.07, ar) * _smoothstep(lat + 0.06, lat, ar) * (level > 0)
    # Below the domes the ribs hide behind the abdomen.
    rib *= 0.3 + 0.7 * _smoothstep(dome_top[ry_, rx_] + 0.03, dome_top[ry_, rx_] - 0.01, vr)
    density[ry_, rx_] += anat.rib_amount * rib
    # Anterior ribs: fainter, running down and in from the chest wall, fading before the sternum.
    front = vr + 0.45 * ar - (apex + 0.08)
    front = front / (d * 1.25)
    front -= np.floor(front)
    front = _smoothstep(0.0, 0.1, front) * _smoothstep(0.32, 0.22, front)
    front *= _smoothstep(0.14, 0.22, ar) * lung[ry_, rx_]
    density[ry_, rx_] += 0.4 * anat.rib_amount * front

    # Clavicles: S-shaped bars from the sternal notch out and up to the shoulders.
    cy_, cx_ = canvas.crop(0.0, 1.0, anat.clavicle_v - anat.clavicle_slope - 0.05, anat.clavicle_v + 0.05)
    ac = a[cy_, cx_]
    t = np.clip((ac - 0.03) / 0.3, 0.0, 1.0)
    clav_dist = np.abs(v[cy_, cx_] - (anat.clavicle_v - anat.clavicle_slope * t + 0.012 * np.sin(2 * np.pi * t)))
    clav = _smoothstep(0.019, 0.011, clav_dist) * _smoothstep(0.02, 0.05, ac) * _smoothstep(0.36, 0.32, ac)
    density[cy_, cx_] += 0.14 * clav * (0.75 + 0.25 * _smoothstep(0.008, 0.017, clav_dist))

    # Scapulae: the medial border crosses the lateral lung in AP, stays outside it in PA.
    sy_, sx_ = canvas.crop(0.0, 1.0, apex - 0.03, apex + 0.42)
    as_, vs = a[sy_, sx_], v[sy_, sx_]
    border = anat.scapula_a + 0.1 * (vs - apex)
    scap = _smoothstep(border, border + 0.012, as_) * _smoothstep(apex - 0.02, apex + 0.02, vs) * _smoothstep(apex + 0.4, apex + 0.32, vs)
    density[sy_, sx_] += 0.05 * scap * (1.0 + 0.7 * _bump(as_, 0.0, 1.0) * _bump(as_ - border, 0.008, 0.008))

    # Humeral heads in the upper corners, half out of the image.
    for side in (-1.0, 1.0):
        hu, hv = cx + side * (anat.body_half_width + 0.03), apex + 0.01
        hy_, hx_ = canvas.crop(hu - 0.08, hu + 0.08, hv - 0.08, hv + 0.08)
        head = np.hypot(u[hy_, hx_] - f32(hu), v[hy_, hx_] - f32(hv))
        density[hy_, hx_] += 0.08 * _smoothstep(0.065, 0.05, head)

    # Breast shadows over the lower lateral lung zones, with a curved lower edge.
    if anat.breast_amount > 0:
        by, bx = canvas.crop(0.0, 1.0, anat.base_right - 0.22, anat.base_right + 0.05)
        breast = np.hypot((a[by, bx] - 0.25) / 0.17, (v[by, bx] - f32(anat.base_right - 0.09)) / 0.11)
        density[by, bx] += anat.breast_amount * _smoothstep(1.0, 0.8, breast) * (v[by, bx] > anat.base_right - 0.2)

    canvas.density += density
    return {"lung": lung, "depth": depth, "dome_top": dome_top}


def _vessel_trees(rng: np.random.Generator, starts: np.ndarray, angles: np.ndarray, lengths: np.ndarray,
                  generations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary branching trees of wiggling, forking segments, one per root, drawn with array draws.

    ``starts`` is ``(R, 2)`` body-frame points, ``angles`` and ``lengths`` ``(R,)``.  Returns
    ``(segment_starts, segment_ends, generation)``: ``(R, M, 2)``, ``(R, M, 2)`` and ``(M,)``
    with the ``M = 2**generations - 1`` nodes of each tree in heap order (node k's children
    are 2k+1 and 2k+2), built one generation at a time.
    """
    roots, count = len(angles), 2**generations - 1
    wiggle = rng.normal(0.0, 0.15, (roots, count))
    spread = rng.uniform(0.3, 0.6, (roots, count))
    fork = rng.uniform(0.6, 1.0, (roots, count))
    shrink = rng.uniform(0.6, 0.8, (roots, count))
    node_angle = np.empty((roots, count))
    node_length = np.empty((roots, count))
    seg_start = np.empty((roots, count, 2))
    node_angle[:, 0] = angles + wiggle[:, 0]
    node_length[:, 0] = lengths
    seg_start[:, 0] = starts
    generation = np.zeros(count, dtype=int)
    for g in range(1, generations):
        nodes = np.arange(2**g - 1, 2 ** (g + 1) - 1)
        parents = (nodes - 1) // 2
        sign = np.where(nodes % 2 == 1, -1.0, 1.0)
        generation[nodes] = g
        node_angle[:, nodes] = node_angle[:, parents] + sign * spread[:, parents] * fork[:, nodes] + wiggle[:, nodes]
        node_length[:, nodes] = node_length[:, parents] * shrink[:, nodes]
        parent_end = seg_start[:, parents] + node_length[:, parents, None] * np.stack(
            [np.cos(node_angle[:, parents]), np.sin(node_angle[:, parents])], axis=-1)
        seg_start[:, nodes] = parent_end
    seg_end = seg_start + node_length[..., None] * np.stack([np.cos(node_angle), np.sin(node_angle)], axis=-1)
    return seg_start, seg_end, generation


def _draw_lung_markings(canvas: _Canvas, anat: _Anatomy, lung: np.ndarray, rng: np.random.Generator) -> None:
    """Hila and branching vessel markings that taper towards the lung periphery.

    The vessel trees are rasterised with Pillow (one C call per segment) and blurred,
    which is much cheaper than a distance field per segment.
    """
    f32 = np.float32
    work = canvas.work
    if work < 64:
        return  # vessels would be sub-pixel; small images skip them (and their cost)
    generations, roots = 4, 6
    widths = [max(1, round(work * 0.0085 * 0.7**g)) for g in range(generations)]
    shades = [int(230 * 0.8**g) for g in range(generations)]
    root_starts, root_angles, root_lengths = [], [], []
    for side in (-1.0, 1.0):
        hu = anat.cx + side * (anat.mediastinum + 0.035)
        hv = anat.apex + (0.25 if side > 0 else 0.28)
        hy, hx = canvas.crop(hu - 0.08, hu + 0.08, hv - 0.1, hv + 0.1)
        dist = np.hypot((canvas.u[hy, hx] - f32(hu)) / 0.6, canvas.v[hy, hx] - f32(hv))
        canvas.density[hy, hx] += 0.07 * _smoothstep(0.08, 0.0, dist)
        noise = rng.normal(0.0, 1.0, (roots, 3))
        # Angles from +u (outwards for the image-right lung), v pointing down: the roots
        # fan from up-and-out to down-and-out; the image-left lung is the mirror image.
        angles = -1.25 + 2.5 * np.arange(roots) / (roots - 1) + 0.12 * noise[:, 0]
        root_angles.append(angles if side > 0 else np.pi - angles)
        root_starts.append(np.stack([hu + 0.008 * noise[:, 1], hv + 0.02 * noise[:, 2]], axis=-1))
        root_lengths.append(rng.uniform(0.06, 0.09, roots))
    starts, ends, generation = _vessel_trees(rng, np.concatenate(root_starts), np.concatenate(root_angles),
                                             np.concatenate(root_lengths), generations)
    x0, y0 = canvas.to_pixel(starts[..., 0], starts[..., 1])
    x1, y1 = canvas.to_pixel(ends[..., 0], ends[..., 1])
    sketch = Image.new("L", (work, work), 0)
    pen = ImageDraw.Draw(sketch)
    for g in range(generations):
        nodes = generation == g
        for xa, ya, xb, yb in zip(x0[:, nodes].ravel().tolist(), y0[:, nodes].ravel().tolist(),
                                  x1[:, nodes].ravel().tolist(), y1[:, nodes].ravel().tolist()):
            pen.line([(xa, ya), (xb, yb)], fill=shades[g], width=widths[g])
    sketch = sketch.filter(ImageFilter.GaussianBlur(radius=max(work / 400.0, 0.6)))
    vessels = np.asarray(sketch, dtype=np.float32)
    vessels *= f32(0.075 / 255.0)
    vessels *= lung
    canvas.density += vessels


def _draw_findings(canvas: _Canvas, anat: _Anatomy, findings: tuple[str, ...], maps: dict[str, np.ndarray],
                   rng: np.random.Generator) -> None:
    """Not-normal findings other than opacity (cardiomegaly is drawn with the heart)."""
    u, v, a, left = canvas.u, canvas.v, canvas.a, canvas.left
    lung = maps["lung"]
    if "pleural_effusion" in findings:
        sides = [bool(rng.random() < 0.5)] if rng.random() < 0.75 else [False, True]
        height = rng.uniform(0.08, 0.17)
        for side_left in sides:
            base = anat.base_left if side_left else anat.base_right
            side_u0, side_u1 = (anat.cx, 1.0) if side_left else (0.0, anat.cx)
            sy, sx = canvas.crop(side_u0, side_u1, base - height - 0.1, base + 0.05)
            reach = np.clip((a[sy, sx] - anat.mediastinum) / (anat.lung_lateral - anat.mediastinum), 0.0, 1.0)
            # A meniscus: fluid climbs the lateral chest wall, blunting the costophrenic angle.
            fluid_top = base - height * (0.3 + 0.7 * reach * reach)
            fluid = _smoothstep(fluid_top - 0.01, fluid_top + 0.025, v[sy, sx]) * (left[sy, sx] == side_left)
            canvas.density[sy, sx] += 0.9 * anat.air * maps["depth"][sy, sx] * lung[sy, sx] * fluid
    if "nodules" in findings:
        rows, cols = np.nonzero(lung > 0.5)
        for _ in range(int(rng.integers(1, 4))):
            if rows.size == 0:
                break
            k = int(rng.integers(rows.size))
            canvas.add_disc(float(u[rows[k], cols[k]]), float(v[rows[k], cols[k]]),
                            rng.uniform(0.007, 0.016), rng.uniform(0.12, 0.2))
    if "lines_and_tubes" in findings:
        cx, apex = anat.cx, anat.apex
        kinds = rng.permutation(["et_tube", "ng_tube", "central_line", "ecg"])[: int(rng.integers(1, 4))]
        for kind in kinds:
            if kind == "et_tube":
                tip = apex + rng.uniform(0.12, 0.17)
                canvas.add_polyline([(cx + 0.004, -0.05), (cx, tip)], 0.007, 0.05, wall=True)
                canvas.add_polyline([(cx + 0.007, -0.05), (cx + 0.003, tip)], 0.0022, 0.22)
            elif kind == "ng_tube":
                low = anat.base_left + 0.02
                canvas.add_polyline([(cx - 0.015, -0.05), (cx - 0.012, apex + 0.3), (cx + 0.01, low - 0.1),
                                     (cx + 0.08, low), (cx + 0.15, low - 0.02)], 0.0025, 0.2)
            elif kind == "central_line":
                s = 1.0 if rng.random() < 0.5 else -1.0
                canvas.add_polyline([(cx + s * 0.42, apex - 0.02), (cx + s * 0.25, apex + 0.04),
                                     (cx + s * 0.06, apex + 0.1), (cx - 0.03, apex + 0.22)], 0.0025, 0.2)
            else:
                for _ in range(int(rng.integers(2, 5))):
                    eu, ev = cx + rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.8)
                    canvas.add_disc(eu, ev, 0.016, 0.3, ring=True)
                    end_u = 0.0 if eu < cx else 1.0
                    canvas.add_polyline([(eu, ev), ((eu + end_u) / 2, ev + rng.uniform(-0.1, 0.1)),
                                         (end_u, ev + rng.uniform(-0.2, 0.2))], 0.002, 0.12)


def _sample_box_count(rng: np.random.Generator) -> int:
    counts = np.asarray(RSNA_BOX_COUNT_COUNTS, dtype=np.float64)
    return int(rng.choice(4, p=counts / counts.sum())) + 1


#: An opacity's visible extent (its box) is where envelope x lung field reaches this.
OPACITY_EXTENT_LEVEL = 0.2


def _draw_opacities(canvas: _Canvas, lung: np.ndarray, rng: np.random.Generator,
                    paint: bool) -> list[tuple[int, int, int, int]]:
    """Draw 1-4 soft, patchy airspace opacities clipped to the lung fields.

    Returns each opacity's tight visible extent in working pixels, ``(x1, y1, x2, y2)``
    with exclusive ends.  The geometry is drawn from ``rng`` whether or not ``paint`` is
    set, so the same seed gives the same boxes with and without the opacities painted.
    """
    work = canvas.work
    lung_mask = lung > 0.5
    count = _sample_box_count(rng)
    first_left = bool(rng.random() < 0.45)
    if count == 1:
        sides = [first_left]
    elif count == 2:
        sides = [first_left, (not first_left) if rng.random() < 0.75 else first_left]
    else:
        sides = [first_left, not first_left] + [bool(rng.random() < 0.5) for _ in range(count - 2)]
    rows_all, cols_all = np.nonzero(lung_mask)
    u_all, v_all = canvas.u[rows_all, cols_all], canvas.v[rows_all, cols_all]
    left_all = canvas.left[rows_all, cols_all]
    boxes: list[tuple[int, int, int, int]] = []
    for index, side_left in enumerate(sides):
        same_side_before = sum(1 for s in sides[:index] if s == side_left)
        same_side_total = sum(1 for s in sides if s == side_left)
        width = float(np.clip(np.exp(rng.normal(math.log(0.235), 0.25)), 0.1, 0.34))
        height = float(np.clip(np.exp(rng.normal(math.log(0.31), 0.5)), 0.1, 0.66))
        amount = rng.uniform(0.25, 0.4)
        noise_seed = int(rng.integers(2**31))
        position = rng.random(2)
        on_side = left_all == side_left
        if not on_side.any():
            continue
        u_side, v_side = u_all[on_side], v_all[on_side]
        top, bottom = float(v_side.min()), float(v_side.max())
        # Split a lung into vertical bands when it holds more than one opacity.
        band_h = (bottom - top) / same_side_total
        height = min(height, band_h * 1.1)
        band_top = top + band_h * same_side_before
        span = max(band_h - 0.7 * height, 0.0)
        centre_v = band_top + 0.35 * height + span * position[0] ** 0.7  # favour the lower zones
        near = np.abs(v_side - centre_v) < 0.01
        row_u = u_side[near] if near.any() else u_side
        lo_u, hi_u = float(row_u.min()), float(row_u.max())
        slack = max(hi_u - lo_u - 0.7 * width, 0.0)
        centre_u = lo_u + min(0.35 * width, (hi_u - lo_u) / 2) + slack * position[1]
        rx, ry = width / 2, height / 2
        sy, sx = canvas.crop(centre_u - rx * 1.25, centre_u + rx * 1.25, centre_v - ry * 1.25, centre_v + ry * 1.25)
        u, v = canvas.u[sy, sx], canvas.v[sy, sx]
        if u.size == 0:
            continue
        noise_rng = np.random.default_rng(noise_seed)
        outline = _smooth_noise(noise_rng, u.shape, (5, 5))
        du, dv = (u - np.float32(centre_u)) / rx, (v - np.float32(centre_v)) / ry
        radius = np.sqrt(du * du + dv * dv) * (1.0 + 0.18 * outline)
        visible = _smoothstep(1.05, 0.4, radius) * lung[sy, sx]
        extent = visible >= OPACITY_EXTENT_LEVEL
        if not extent.any():
            continue
        ys, xs = np.nonzero(extent)
        boxes.append((sx.start + int(xs.min()), sy.start + int(ys.min()),
                      sx.start + int(xs.max()) + 1, sy.start + int(ys.max()) + 1))
        if paint:
            # Patchy, confluent airspace texture: broad blotches plus finer mottling.
            coarse = (max(3, round(ry * work / 22)), max(3, round(rx * work / 22)))
            fine = (max(6, round(ry * work / 8)), max(6, round(rx * work / 8)))
            mottle = 0.72 + 0.2 * _smooth_noise(noise_rng, u.shape, coarse) + 0.1 * _smooth_noise(noise_rng, u.shape, fine)
            canvas.density[sy, sx] += np.float32(amount) * visible * np.clip(mottle, 0.2, 1.15)
    if not boxes:
        # A Lung Opacity phantom must carry a box; only far below MIN_SIZE could every
        # opacity miss the (pixelated) lung fields.
        raise ConfigError(f"no opacity fits the lung fields of a {work}-pixel phantom; use a larger size")
    return boxes


def _draw_side_marker(canvas: _Canvas, rng: np.random.Generator) -> None:
    """A radiographer's lead letter (bright, slightly blurred) in an upper corner."""
    work = canvas.work
    glyph = _MARKER_GLYPHS["R" if rng.random() < 0.6 else "L"]
    bitmap = np.array([[c == "1" for c in row] for row in glyph], dtype=np.float32)
    height = max(int(round(work * rng.uniform(0.035, 0.05))), 9)
    width = max(int(round(height * 5 / 7)), 5)
    letter = np.asarray(Image.fromarray(bitmap).resize((width, height), Image.Resampling.BILINEAR))
    row = int(work * rng.uniform(0.03, 0.08))
    col = int(work * rng.uniform(0.03, 0.1)) if rng.random() < 0.5 else work - width - int(work * rng.uniform(0.03, 0.1))
    region = canvas.density[row: row + height, col: col + width]
    np.maximum(region, 1.2 * letter[: region.shape[0], : region.shape[1]], out=region)


def _upsample_with_grain(image_u8: np.ndarray, size: int, grain: float, rng: np.random.Generator) -> np.ndarray:
    """Resize 8-bit pixels to ``size`` (bicubic) and add film grain of std ``grain`` (0-1 scale).

    The grain is the difference of two uniform bytes (a triangular distribution, std
    about 104.5 grey levels before scaling), in 16-bit integers: far cheaper than
    Gaussian noise in floating point at 1024 px.
    """
    if image_u8.shape[0] != size:
        image_u8 = np.asarray(Image.fromarray(image_u8).resize((size, size), Image.Resampling.BICUBIC))
    raw = np.frombuffer(rng.bytes(2 * size * size), dtype=np.uint8).reshape(2, size, size)
    noise = raw[0].astype(np.int16)
    noise -= raw[1]
    noise *= np.int16(min(int(round(grain * 255.0 * 256.0 / 104.5)), 120))
    noise += np.int16(128)
    noise >>= 8
    noise += image_u8
    np.clip(noise, 0, 255, out=noise)
    return noise.astype(np.uint8)


def make_phantom(
    seed: int | Sequence[int] | np.random.SeedSequence = 0,
    *,
    size: int = RSNA_IMAGE_SIZE,
    view: str | None = None,
    label_class: int | None = None,
    sex: str | None = None,
    age: int | None = None,
    patient_id: str | None = None,
    pixel_spacing_1024: float | None = None,
    draw_opacities: bool = True,
) -> PhantomCase:
    """Make one phantom chest radiograph in memory.

    ``seed`` fixes everything; any of ``view``, ``label_class``, ``sex``, ``age``,
    ``patient_id`` and ``pixel_spacing_1024`` that is given overrides the RSNA-like draw.
    With ``draw_opacities=False`` a Lung Opacity phantom keeps its boxes but the opacities
    are not painted: same anatomy, same grain, so the two images differ only there.
    The pixels are multiples of 1/255 (what an 8-bit DICOM of them holds exactly).
    """
    if size < MIN_SIZE:
        raise ConfigError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    seq = _as_seed_sequence(seed)
    spec = sample_patient(_child_rng(seq, _STREAM_DEMOGRAPHICS), view=view, label_class=label_class,
                          sex=sex, age=age, patient_id=patient_id)
    if pixel_spacing_1024 is not None:
        spec = PatientSpec(spec.patient_id, spec.view, spec.label_class, spec.sex, spec.age, float(pixel_spacing_1024))
    work = min(size, WORKING_SIZE)
    anat_rng = _child_rng(seq, _STREAM_ANATOMY)
    anat = _sample_anatomy(anat_rng, spec)
    findings_rng = _child_rng(seq, _STREAM_FINDINGS)
    findings = _sample_findings(findings_rng, spec)

    canvas = _Canvas(work, anat.cx, anat.angle, anat.zoom, anat.v_shift)
    maps = _draw_body(canvas, anat, findings)
    lung = maps["lung"]
    _draw_lung_markings(canvas, anat, lung, anat_rng)
    _draw_findings(canvas, anat, findings, maps, findings_rng)
    work_boxes: list[tuple[int, int, int, int]] = []
    if spec.label_class == LUNG_OPACITY:
        work_boxes = _draw_opacities(canvas, lung, _child_rng(seq, _STREAM_OPACITY), paint=draw_opacities)
    if spec.view == "AP":
        _draw_side_marker(canvas, anat_rng)

    density = np.clip(canvas.density, 0.0, 1.2)
    image = anat.black + (anat.white - anat.black) * density**anat.gamma
    image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pixels_u8 = _upsample_with_grain(image_u8, size, anat.grain, _child_rng(seq, _STREAM_GRAIN))
    pixels = pixels_u8.astype(np.float32) / np.float32(255.0)
    lung_mask = (lung > 0.5).astype(np.uint8) * 255
    if work != size:
        lung_mask = np.asarray(Image.fromarray(lung_mask).resize((size, size), Image.Resampling.NEAREST))

    scale = size / work
    boxes = np.array([[round(x1 * scale), round(y1 * scale), round(x2 * scale), round(y2 * scale)]
                      for x1, y1, x2, y2 in work_boxes], dtype=np.float32).reshape(-1, 4)
    findings_out = findings + (("lung_opacity",) if spec.label_class == LUNG_OPACITY else ())
    logger.debug("phantom %s: %s %s, findings %s, %d boxes, %d px", spec.patient_id, spec.view,
                 CLASS_NAMES[spec.label_class], findings_out, len(boxes), size)
    return PhantomCase(
        patient_id=spec.patient_id,
        pixels=pixels,
        boxes=np.clip(boxes, 0, size),
        label_class=spec.label_class,
        sex=spec.sex,
        age=spec.age,
        view=spec.view,
        pixel_spacing=spec.pixel_spacing_at(size),
        lung_mask=lung_mask > 127,
        findings=findings_out,
    )


def make_phantom_for(spec: PatientSpec, seed: int | Sequence[int] | np.random.SeedSequence, *,
                     size: int = RSNA_IMAGE_SIZE, draw_opacities: bool = True) -> PhantomCase:
    """:func:`make_phantom` for a planned patient (keeps its id, class, sex, age, view, spacing)."""
    return make_phantom(seed, size=size, view=spec.view, label_class=spec.label_class, sex=spec.sex,
                        age=spec.age, patient_id=spec.patient_id, pixel_spacing_1024=spec.pixel_spacing_1024,
                        draw_opacities=draw_opacities)
