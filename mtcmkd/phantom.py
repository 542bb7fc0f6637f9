"""Synthetic BraTS-like cases: brain anatomy, a three-compartment tumour and four MRI contrasts.

Why this exists: the whole pipeline (conversion, training, distillation, export) must run and be
tested without the real BraTS data, and cross-modal distillation only means something when
the modalities carry different information. The phantom therefore reproduces the asymmetry that
matters clinically: the enhancing rim is obvious on T1ce, edema is obvious on FLAIR/T2 but only
a few percent darker than white matter on T1/T1ce, so a T1ce-only student has to learn it.

Anatomy comes from the MNI152 2009 template shipped inside the `nilearn` wheel (tissue maps are
read with nibabel; nilearn itself is never imported) or, without it, from a procedural brain.
Each case warps that anatomy with a random pose and a smooth displacement, places an irregular
tumour (with mass effect) mostly in hemispheric white matter, and renders T1, T1ce, T2 and FLAIR
with tissue contrasts, a multiplicative bias field and Rician noise.

Arrays use the BraTS voxel order (affine diag(-1, -1, 1): x towards the left, y towards the
back, z upwards; see `mtcmkd.brats.brats_affine`). The shape is free: the brain fills ~90% of
it, so 240 x 240 x 155 gives ~1 mm voxels like BraTS and small shapes a proportionally smaller
brain with coarser voxels. Work is float32, limited to the brain's bounding box (warp, mask) or
to brain voxels (tissues, intensities, noise), and every smooth random field is a coarse grid
blended up with separable B-spline weights, so a full-size case costs ~1 s on one core.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

# File names of the MNI152 2009 (sym, 1 mm, 197 x 233 x 189) maps inside nilearn/datasets/data.
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

_MIN_SHAPE = 16
_FILL = np.array([0.88, 0.88, 0.91])  # fraction of each axis the brain spans before per-case scale
_NO_ET_PROBABILITY = 0.15  # LGG-like cases: non-enhancing core, no label 3
_MIN_CORE_RADIUS = 3.5  # voxels; keeps a tumour of several hundred voxels in tiny test volumes
_MIN_COMPARTMENT = 10  # voxels; a label on fewer is partial-volume noise, not a compartment
_MAX_ATTEMPTS = 8
_PROCEDURAL_SEED = 20_240_917  # fixed: procedural cases differ through the warp, like MNI ones
_PROCEDURAL_MM = 1.5


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case.

    Attributes:
        images: "t1", "t1ce", "t2", "flair" -> float32 arrays of the requested shape on a raw
            MRI-like scale (roughly 0..3000, different per modality); exactly 0 outside the
            brain and strictly positive inside.
        label: uint8, canonical labels 0 background, 1 NCR/NETC, 2 ED, 3 ET. Labels 1 and 2
            always occur, 3 exactly when `has_et` (each on >= 10 voxels).
        has_et: False for the ~15% LGG-like cases whose core does not enhance.
        anatomy: "mni152" (template warped per case) or "procedural" (fallback brain).
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    has_et: bool
    anatomy: str


@dataclass(frozen=True)
class _Contrast:
    """Mean intensities of one modality relative to its white matter.

    `edema` is the edema level at white matter; `edema_keep` is how much of the underlying
    GM/WM/CSF contrast survives inside edema (1: edema only shifts the tissue, as on T1/T1ce;
    small: edema looks flat and bright, as on FLAIR/T2).
    """

    wm: float  # raw white-matter level before the per-case scanner scale
    gm: float
    csf: float
    necrosis: float
    necrosis_mix: float  # heterogeneity of necrosis (large on FLAIR: partly bright, partly dark)
    enhancing: float
    nonenhancing: float
    edema: float
    edema_keep: float
    vessel: float  # extra brightness of enhancing sulcal vessels (T1ce only)


# Loosely guided by the four BraTS 2021 sample cases (ET ~1.4-1.7x normal brain on T1ce; edema
# and necrosis ~1.5-2x on T2/FLAIR). Edema on T1/T1ce is kept subtler than there (real: ~0.8-0.95
# of normal brain) on purpose: it is the signal a T1ce-only student must learn from teachers.
# Columns: wm, gm, csf, necrosis, necrosis_mix, enhancing, nonenhancing, edema, edema_keep, vessel
_CONTRASTS: dict[str, _Contrast] = {
    "t1": _Contrast(800.0, 0.75, 0.32, 0.55, 0.10, 0.90, 0.72, 0.94, 1.0, 0.0),
    "t1ce": _Contrast(850.0, 0.80, 0.34, 0.50, 0.10, 1.85, 0.74, 0.95, 1.0, 0.9),
    "t2": _Contrast(600.0, 1.40, 3.10, 2.90, 0.12, 1.75, 2.30, 2.10, 0.35, 0.0),
    "flair": _Contrast(520.0, 1.22, 0.35, 1.30, 0.45, 1.60, 1.75, 1.95, 0.30, 0.0),
}


# ----------------------------------------------------------------------------- smooth fields


def _bspline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) cubic B-spline weights; one spare control point beyond each end."""
    h = max(n_out - 1, 1) / (n_ctrl - 3)
    u = np.arange(n_out)[:, None] / h - (np.arange(n_ctrl)[None, :] - 1)
    a = np.abs(u)
    w = np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: float, count: int
) -> np.ndarray:
    """`count` smooth random fields of ~unit std with features about `spacing` voxels apart.

    Why not gaussian_filter or zoom on a full volume: three small separable products on a
    coarse grid cost milliseconds where those cost ~0.3 s per 240 x 240 x 155 field. einsum's
    own loops (not BLAS) keep the result independent of thread count, hence bit-reproducible.
    """
    n_ctrl = [max(4, math.ceil((n - 1) / max(spacing, 1.0)) + 3) for n in shape]
    coarse = rng.standard_normal((count, *n_ctrl), dtype=np.float32)
    wx, wy, wz = (_bspline_matrix(n, c) for n, c in zip(shape, n_ctrl, strict=True))
    # Blending iid coefficients shrinks their variance by sum(w^2) per axis; undo that.
    gain = math.prod(float(np.sqrt(np.mean(np.sum(w**2, axis=1)))) for w in (wx, wy, wz))
    wx = wx / np.float32(gain)
    out = np.einsum("sabc,zc->sabz", coarse, wz)
    out = np.einsum("sabz,yb->sayz", out, wy)
    out = np.einsum("xa,sak->sxk", wx, out.reshape(count, n_ctrl[0], -1))
    return out.reshape(count, *shape)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about x, y and z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _broadcast_affine(row: np.ndarray, axes: list[np.ndarray], offset: float) -> np.ndarray:
    """row . (x, y, z) + offset on the grid spanned by three 1D axes, without a meshgrid."""
    return (
        (np.float32(row[0]) * axes[0])[:, None, None]
        + (np.float32(row[1]) * axes[1])[None, :, None]
        + (np.float32(row[2]) * axes[2] + np.float32(offset))[None, None, :]
    )


# ----------------------------------------------------------------------------- anatomy sources


@dataclass(frozen=True, eq=False)
class _Anatomy:
    """Tissue maps of one source brain, cropped to the brain with a small margin.

    tissues: (3, X, Y, Z) float32 brain, WM and GM fractions (brain 1 inside, 0 outside;
        CSF is the rest of the brain). Interpolating these three stays consistent because the
        trilinear weights are linear: CSF = brain - WM - GM at any sample point.
    seeds_*: (N, 3) voxel coordinates where a tumour centre may go; depth_*: their distance to
    the brain surface in mm (so a tumour's core can be kept inside the brain).
    """

    tissues: np.ndarray
    voxel_mm: float
    brain_extent_mm: np.ndarray
    seeds_wm: np.ndarray
    depth_wm: np.ndarray
    seeds_any: np.ndarray
    depth_any: np.ndarray


def template_path() -> Path | None:
    """Folder of the MNI152 maps inside the installed nilearn wheel, or None.

    Found through the import system's spec so nilearn (slow to import) is never imported.
    """
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        folder = Path(root) / "datasets" / "data"
        if all((folder / name).is_file() for name in _TEMPLATE_FILES.values()):
            return folder
    return None


def _build_anatomy(
    wm: np.ndarray,
    gm: np.ndarray,
    csf: np.ndarray,
    brain: np.ndarray,
    placement_wm: np.ndarray,
    placement_any: np.ndarray,
    voxel_mm: float,
    flip_xy: bool = False,
) -> _Anatomy:
    """Crop a source brain to its bounding box (optionally RAS -> LPS) and list tumour seeds."""
    lo, hi, extent = [], [], []
    for axis in range(3):
        hit = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(max(int(hit[0]) - 2, 0))  # 2 voxels of margin for the interpolation
        hi.append(min(int(hit[-1]) + 3, brain.shape[axis]))
        extent.append((int(hit[-1]) - int(hit[0]) + 1) * voxel_mm)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def view(a: np.ndarray) -> np.ndarray:  # views only: nothing full-size is copied
        return a[crop][::-1, ::-1] if flip_xy else a[crop]

    wm, gm, csf, brain = view(wm), view(gm), view(csf), view(brain)
    total = (wm + gm + csf) * brain
    scale = np.where(total > 0, 1.0 / np.maximum(total, 1e-6), 0.0)
    # Brain fraction first: after interpolation it gives the mask, and CSF = brain - WM - GM.
    tissues = np.stack([brain, wm * scale, gm * scale]).astype(np.float32)
    # Candidates on every 2nd voxel per axis are plenty; the depth map on that grid is 8x cheaper.
    grid = (slice(None, None, 2),) * 3
    depth = ndi.distance_transform_edt(brain[grid], sampling=2 * voxel_mm).astype(np.float32)
    seeds = []
    for placement in (view(placement_wm)[grid], view(placement_any)[grid]):
        chosen = placement & (depth >= 3.0)
        seeds.append((2 * np.argwhere(chosen).astype(np.float32), depth[chosen]))
    return _Anatomy(
        tissues=tissues,
        voxel_mm=voxel_mm,
        brain_extent_mm=np.array(extent, dtype=np.float64),
        seeds_wm=seeds[0][0],
        depth_wm=seeds[0][1],
        seeds_any=seeds[1][0],
        depth_any=seeds[1][1],
    )


@functools.lru_cache(maxsize=1)
def _mni_anatomy(folder: str) -> _Anatomy:
    """MNI152 tissue maps in BraTS voxel order; CSF is the brain mask minus GM and WM."""
    import nibabel as nib  # only this path reads NIfTI

    loaded = {key: nib.load(Path(folder) / name) for key, name in _TEMPLATE_FILES.items()}
    affine = loaded["t1"].affine
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        raise ValueError(f"{folder}: expected an axis-aligned MNI152 template, got {affine}")
    arrays = {key: np.asarray(img.dataobj, dtype=np.float32) for key, img in loaded.items()}
    brain = arrays["t1"] > 0
    gm = arrays["gm"] / 255.0 * brain
    wm = arrays["wm"] / 255.0 * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    # World mm of each voxel along each axis, for the placement rules.
    x_mm, y_mm, z_mm = (affine[i, i] * np.arange(brain.shape[i]) + affine[i, 3] for i in range(3))
    lateral = np.abs(x_mm)[:, None, None] > 8.0
    # Above the cerebellum and brainstem, or in the temporal lobes in front of them.
    cerebral = (z_mm[None, None, :] > -12.0) | (
        (y_mm[None, :, None] > -15.0) & (z_mm[None, None, :] > -38.0)
    )
    placement_wm = (wm > 0.6) & lateral & cerebral
    placement_any = brain & (csf < 0.5) & cerebral
    # The template is RAS; BraTS arrays are LPS (x and y reversed).
    return _build_anatomy(
        wm, gm, csf, brain, placement_wm, placement_any, voxel_mm=1.0, flip_xy=True
    )


@functools.lru_cache(maxsize=1)
def _procedural_anatomy() -> _Anatomy:
    """An ellipsoidal brain with folded cortex, sulci, fissure, ventricles and deep grey nuclei.

    Fallback when nilearn is absent; crude but with the tissue layout that matters for the
    contrasts (WM inside, a GM ribbon, CSF in sulci, around the brain and in the ventricles).
    """
    rng = np.random.default_rng(_PROCEDURAL_SEED)
    mm = _PROCEDURAL_MM
    shape = (104, 128, 108)
    x, y, z = (((np.arange(n) - (n - 1) / 2) * mm).astype(np.float32) for n in shape)
    xx, yy, zz = x[:, None, None], y[None, :, None], z[None, None, :]
    semi = (66.0, 82.0, 68.0)
    rho = np.sqrt((xx / semi[0]) ** 2 + (yy / semi[1]) ** 2 + (zz / semi[2]) ** 2)
    low = _smooth_noise(rng, shape, 25.0 / mm, 1)[0]
    gyri, sulci = _smooth_noise(rng, shape, 10.0 / mm, 2)
    rho = rho * (1.0 + 0.035 * low)
    brain = rho < 1.0
    inner = 0.84 + 0.04 * gyri  # GM/WM border of the cortex
    fissure = (np.abs(xx) < 1.5) & (zz > 22.0)
    ventricles = np.zeros(shape, dtype=bool)
    nuclei = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ventricles |= ((xx - 9 * side) / 5) ** 2 + ((yy + 2) / 24) ** 2 + ((zz - 10) / 9) ** 2 < 1
        nuclei |= ((xx - 21 * side) / 9) ** 2 + (yy / 15) ** 2 + (zz / 10) ** 2 < 1
    ventricles |= (np.abs(xx) < 1.5) & (np.abs(yy + 5) < 10) & (np.abs(zz + 1) < 9)
    csf = brain & (
        (rho > 0.975) | ((np.abs(sulci) < 0.12) & (rho > inner - 0.06)) | fissure | ventricles
    )
    gm = (
        brain
        & ~csf
        & (
            (rho > inner)
            | ((np.abs(sulci) < 0.35) & (rho > inner - 0.10))
            | ((np.abs(xx) < 4.5) & (zz > 22.0))
            | nuclei
        )
    )
    wm = brain & ~csf & ~gm
    # Partial volume at tissue borders, as a 1.5 mm template would have.
    soft = [ndi.gaussian_filter(t.astype(np.float32), 0.7) for t in (wm, gm, csf)]
    cerebral = np.broadcast_to(zz > -0.3 * semi[2], shape)
    placement_wm = (soft[0] > 0.6) & (np.abs(xx) > 8.0) & cerebral
    placement_any = brain & (soft[2] < 0.5) & cerebral
    return _build_anatomy(*soft, brain, placement_wm, placement_any, voxel_mm=mm)


def _anatomy(name: str) -> _Anatomy:
    if name == "mni152":
        folder = template_path()
        if folder is None:
            raise FileNotFoundError(
                "MNI152 template not found: install nilearn (pip install 'mtcmkd[phantom]') "
                "or call make_case(..., use_template=False)"
            )
        return _mni_anatomy(str(folder))
    return _procedural_anatomy()


@dataclass(frozen=True, eq=False)
class _Resampled:
    """A source brain zoomed to the voxel size one output shape needs (cached per shape)."""

    tissues: np.ndarray  # (3, X, Y, Z) brain, WM, GM fractions in output-sized voxels
    vox_per_mm: float  # output voxels per anatomical millimetre
    brain_extent: np.ndarray  # (3,) brain size in output voxels, before the per-case scale
    seeds_wm: np.ndarray
    depth_wm: np.ndarray  # in output voxels
    seeds_any: np.ndarray
    depth_any: np.ndarray


@functools.lru_cache(maxsize=4)
def _resampled(name: str, shape: tuple[int, int, int]) -> _Resampled:
    """Zoom the source so the brain fills ~90% of `shape` (isotropically, like a real head)."""
    src = _anatomy(name)
    vox_per_mm = float(np.min(_FILL * np.array(shape) / src.brain_extent_mm))
    factor = vox_per_mm * src.voxel_mm
    tissues = src.tissues
    if factor < 0.8:
        # Anti-alias before shrinking so thin cortex becomes partial volume, not speckle.
        sigma = 0.42 / factor
        tissues = np.stack([ndi.gaussian_filter(t, sigma) for t in tissues])
    zoomed = np.stack([ndi.zoom(t, factor, order=1, grid_mode=False) for t in tissues])
    # zoom(grid_mode=False) maps input index i to i * (n_out - 1) / (n_in - 1).
    ratio = (np.array(zoomed.shape[1:]) - 1) / (np.array(src.tissues.shape[1:]) - 1)
    return _Resampled(
        tissues=np.ascontiguousarray(zoomed, dtype=np.float32),
        vox_per_mm=vox_per_mm,
        brain_extent=src.brain_extent_mm * vox_per_mm,
        seeds_wm=src.seeds_wm * ratio,
        depth_wm=src.depth_wm * vox_per_mm,
        seeds_any=src.seeds_any * ratio,
        depth_any=src.depth_any * vox_per_mm,
    )


# ----------------------------------------------------------------------------- the case


def _check_args(shape: tuple[int, int, int], seed: int, index: int) -> tuple[int, int, int]:
    dims = tuple(int(n) for n in shape)
    if len(dims) != 3 or min(dims) < _MIN_SHAPE:
        raise ValueError(f"shape must be three sizes >= {_MIN_SHAPE}, got {shape!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return dims[0], dims[1], dims[2]


def make_case(
    shape: tuple[int, int, int], seed: int, index: int, *, use_template: bool = True
) -> PhantomCase:
    """Synthesise case `index` of the phantom dataset `seed`.

    Deterministic: the same (shape, seed, index) gives bit-identical arrays in any process
    (same numpy/scipy build); no BLAS call touches the volumes, so thread counts do not matter.
    The anatomy is the MNI152 template when `use_template` and nilearn is installed, else the
    procedural brain (reported in `PhantomCase.anatomy`).

    Raises:
        ValueError: a dimension below 16 voxels or a negative seed/index.
        RuntimeError: no tumour with every required label fitted in 8 tries (not seen in
            sweeps down to 16 x 16 x 16, where ~1-3% of cases need a second try).
    """
    dims = _check_args(shape, seed, index)
    anatomy = "mni152" if use_template and template_path() is not None else "procedural"
    res = _resampled(anatomy, dims)
    rng = np.random.default_rng([seed, index])
    for _ in range(_MAX_ATTEMPTS):
        case = _attempt(rng, res, dims, anatomy)
        if case is not None:
            return case
    raise RuntimeError(
        f"phantom case (shape={dims}, seed={seed}, index={index}) found no tumour placement "
        f"with all labels after {_MAX_ATTEMPTS} tries; use a larger shape"
    )


def _pick_seed(rng: np.random.Generator, res: _Resampled, r_core: float) -> np.ndarray:
    """A tumour centre deep enough for the core: mostly hemispheric WM, sometimes anywhere."""
    if rng.random() < 0.85 and len(res.seeds_wm):
        seeds, depth = res.seeds_wm, res.depth_wm
    else:
        seeds, depth = res.seeds_any, res.depth_any
    ok = np.flatnonzero(depth >= 1.1 * r_core)
    if not len(ok):  # a large core in a thin brain: take the deepest 2% instead
        ok = np.argsort(depth)[-max(1, len(depth) // 50) :]
    return seeds[ok[rng.integers(len(ok))]].astype(np.float64)


def _attempt(
    rng: np.random.Generator, res: _Resampled, shape: tuple[int, int, int], anatomy: str
) -> PhantomCase | None:
    """One try at a case; None when the tumour missed a required label (then redraw).

    Only the warp and the brain mask are computed on the brain's bounding box; tissues,
    intensities and noise live in 1D vectors over brain voxels (a third of the box).
    """
    dims = np.array(shape, dtype=np.float64)
    vpm = res.vox_per_mm

    # Pose: small head tilts and a per-axis size change, so no two brains overlap exactly.
    rot = _rotation(np.deg2rad(rng.uniform(-1, 1, 3) * np.array([4.0, 3.0, 7.0])))
    size = rng.uniform(0.93, 1.04) * rng.uniform(0.97, 1.03, 3)
    to_template = rot @ np.diag(1.0 / size)  # output offset -> template offset
    to_output = np.diag(size) @ rot.T
    # Shifted a little downwards: if a brain is cut, it is at the brainstem, as in BraTS.
    centre_out = (dims - 1) / 2 + rng.uniform(-0.025, 0.025, 3) * dims
    centre_out[2] -= 0.015 * dims[2]
    half_tpl = (np.array(res.tissues.shape[1:]) - 1) / 2

    # Tumour size, kind and centre (chosen in template space so it lands in the right tissue).
    extent = float(np.mean(res.brain_extent * size))
    r_core = max(extent * (0.08 + 0.12 * rng.random() ** 1.3), _MIN_CORE_RADIUS)
    r_edema = r_core * rng.uniform(1.35, 1.9)
    has_et = bool(rng.random() >= _NO_ET_PROBABILITY)
    centre_t = to_output @ (_pick_seed(rng, res, r_core) - half_tpl) + centre_out

    # Bounding box of the warped brain in the output volume, with room for the displacement
    # (4 sigma) and the mass effect (at most 0.43 * strength * width, below).
    disp_sigma = rng.uniform(1.5, 3.0) * vpm
    half = np.abs(to_output) @ half_tpl + 4 * disp_sigma + 0.25 * r_core + 2
    lo = np.maximum(np.floor(centre_out - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre_out + half) + 1, dims).astype(int)
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    axes = [np.arange(lo[i], hi[i], dtype=np.float32) - np.float32(centre_out[i]) for i in range(3)]

    # Sampling positions in the template: pose, then a smooth displacement of a few mm.
    coords = np.empty((3, *box_shape), dtype=np.float32)
    for i in range(3):
        coords[i] = _broadcast_affine(to_template[i], axes, half_tpl[i])
    coords += _smooth_noise(rng, box_shape, 35.0 * vpm, 3) * np.float32(disp_sigma)

    # Mass effect: sample closer to the tumour centre there, which pushes tissue outwards.
    strength = rng.uniform(0.15, 0.4) * (1.0 if has_et else 0.6)
    sig = 1.3 * r_core
    t_local = centre_t - lo
    mslices, moff = _sub_box(t_local, 3 * sig, box_shape)
    bump = [np.exp(-((m / np.float32(sig)) ** 2)) for m in moff]
    push = np.float32(strength) * (
        bump[0][:, None, None] * bump[1][None, :, None] * bump[2][None, None, :]
    )
    for i in range(3):
        coords[i][mslices] -= push * _broadcast_affine(to_template[i], moff, 0.0)

    # Brain mask on the box, then tissue fractions only where it is brain.
    total = np.empty(box_shape, dtype=np.float32)
    _interpolate(res.tissues[0], coords, total)
    flat = np.flatnonzero(total >= 0.5)
    points = coords.reshape(3, -1)[:, flat]
    del coords
    total_v = total.reshape(-1)[flat]
    wm = _interpolate(res.tissues[1], points) / total_v
    gm = _interpolate(res.tissues[2], points) / total_v
    over = np.maximum(wm + gm, np.float32(1.0))  # interpolation can overshoot by a hair
    wm /= over
    gm /= over
    csf = 1.0 - wm - gm
    where = np.full(box_shape, -1, dtype=np.int32)  # box voxel -> position in the vectors
    where.reshape(-1)[flat] = np.arange(len(flat), dtype=np.int32)

    tumour = _tumour(rng, t_local, r_core, r_edema, has_et, wm, where, vpm)
    if tumour is None:
        return None

    # Sulcal vessels that enhance on T1ce: thin tubes where two smooth fields both cross zero.
    v1, v2 = _smooth_noise(rng, box_shape, 9.0 * vpm, 2).reshape(2, -1)[:, flat]
    vessels = np.clip(1.0 - np.maximum(np.abs(v1), np.abs(v2)) / np.float32(0.15), 0.0, 1.0)
    vessels *= csf
    del v1, v2
    # Scanner-dependent smooth multiplicative bias, one per sequence, within +-15%.
    biases = _smooth_noise(rng, box_shape, 60.0 * vpm, len(MODALITIES)).reshape(4, -1)[:, flat]

    full_index = np.ravel_multi_index(
        tuple(i + o for i, o in zip(np.unravel_index(flat, box_shape), lo, strict=True)), shape
    )
    images = {}
    scanner = math.exp(rng.uniform(math.log(0.6), math.log(1.4)))
    for name, bias in zip(MODALITIES, biases, strict=True):
        c = _CONTRASTS[name]
        level = np.float32(c.wm * scanner * rng.uniform(0.88, 1.12))
        jitter = rng.uniform(0.96, 1.04, 2)
        img = level * (wm + np.float32(c.gm * jitter[0]) * gm + np.float32(c.csf * jitter[1]) * csf)
        if c.vessel:
            img += np.float32(c.vessel) * level * vessels
        _paint_tumour(img, tumour, c, level, has_et)
        img *= 1.0 + np.clip(np.float32(rng.uniform(0.04, 0.08)) * bias, -0.15, 0.15)
        # Rician noise: the magnitude of a complex signal with Gaussian noise on both parts.
        sigma = np.float32(rng.uniform(0.015, 0.04)) * level
        real = img + sigma * rng.standard_normal(len(flat), dtype=np.float32)
        imag = sigma * rng.standard_normal(len(flat), dtype=np.float32)
        out = np.zeros(shape, dtype=np.float32)
        out.reshape(-1)[full_index] = np.maximum(np.sqrt(real * real + imag * imag), 1.0)
        images[name] = out

    label = np.zeros(shape, dtype=np.uint8)
    label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][tumour.slices] = tumour.label
    return PhantomCase(images=images, label=label, has_et=has_et, anatomy=anatomy)


def _interpolate(
    volume: np.ndarray, points: np.ndarray, output: np.ndarray | None = None
) -> np.ndarray:
    """Trilinear sample of `volume` at voxel coordinates `points` (3, ...), 0 outside."""
    if output is None:
        output = np.empty(points.shape[1:], dtype=np.float32)
    ndi.map_coordinates(
        volume, points, output=output, order=1, mode="constant", cval=0.0, prefilter=False
    )
    return output


def _sub_box(
    centre: np.ndarray, half: float, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """Slices of a cube of half-size `half` around `centre`, clipped to `shape`, and the
    voxel offsets from the centre along each axis (float32)."""
    slices, offsets = [], []
    for i, n in enumerate(shape):
        a = int(np.clip(np.floor(centre[i] - half), 0, n))
        b = int(np.clip(np.ceil(centre[i] + half) + 1, a, n))
        slices.append(slice(a, b))
        offsets.append(np.arange(a, b, dtype=np.float32) - np.float32(centre[i]))
    return tuple(slices), offsets


@dataclass(frozen=True, eq=False)
class _Tumour:
    """Where the tumour is and how much of each compartment every brain voxel there holds."""

    slices: tuple[slice, ...]  # the tumour's box inside the brain box
    label: np.ndarray  # labels on that box (0 outside the brain)
    ids: np.ndarray  # positions in the brain vectors of the box's brain voxels
    necrosis: np.ndarray  # fractions at those voxels; the four sum to 1
    core: np.ndarray  # enhancing rim with ET, non-enhancing core without
    edema: np.ndarray
    normal: np.ndarray
    texture: np.ndarray  # smooth ~unit-std field for tumour heterogeneity


def _tumour(
    rng: np.random.Generator,
    centre: np.ndarray,
    r_core: float,
    r_edema: float,
    has_et: bool,
    wm: np.ndarray,
    where: np.ndarray,
    vpm: float,
) -> _Tumour | None:
    """Labels and partial-volume fractions of an irregular three-compartment tumour.

    The core is an ellipsoid whose radius is perturbed by smooth noise; with ET, necrosis is
    the core minus a rim of varying thickness (nodular, >= 1 voxel); edema is a larger, more
    irregular halo that reaches further in white matter than in cortex, as vasogenic edema
    does. Fractions ramp over one voxel so boundaries have partial volume like real scans.
    Returns None when a required label has fewer than _MIN_COMPARTMENT voxels in the brain.
    """
    ratios = rng.uniform(0.8, 1.25, 3)
    metric = np.diag(1.0 / ratios) @ _rotation(rng.uniform(-np.pi, np.pi, 3))
    slices, off = _sub_box(centre, 2.1 * r_edema * ratios.max() + 2, where.shape)
    tshape = tuple(s.stop - s.start for s in slices)
    if min(tshape) == 0:
        return None
    ids_box = where[slices]
    inside = ids_box >= 0
    ids = ids_box[inside]
    r2 = np.zeros(tshape, dtype=np.float32)
    for i in range(3):
        r2 += _broadcast_affine(metric[i], off, 0.0) ** 2
    r = np.sqrt(r2)[inside]
    del r2
    picked = inside.ravel()
    n_core, n_rim, n_edema = np.clip(
        _smooth_noise(rng, tshape, max(0.5 * r_core, 2.0), 3).reshape(3, -1)[:, picked], -2.0, 2.0
    )
    # Finer grain for the signal heterogeneity inside the tumour (~4 mm blobs).
    texture = np.clip(
        _smooth_noise(rng, tshape, max(4.0 * vpm, 1.5), 1).reshape(-1)[picked], -2.5, 2.5
    )
    r_core_eff = r - np.float32(0.22 * r_core) * n_core
    w_core = np.clip(0.5 + (np.float32(r_core) - r_core_eff), 0.0, 1.0)
    # Edema runs along white-matter tracts and stops at the cortex: reach grows with WM.
    reach = np.float32(r_edema) * (0.55 + 0.6 * wm[ids]) + np.float32(0.3 * r_edema) * n_edema
    w_edema = np.maximum(np.clip(0.5 + (reach - r), 0.0, 1.0), w_core)
    if has_et:
        base = float(np.clip(rng.uniform(3.0, 8.0) * vpm, 1.5, 0.45 * r_core))
        thickness = np.clip(np.float32(base) * (1.0 - 0.6 * n_rim), 1.0, 0.6 * r_core)
        w_nec = np.minimum(np.clip(0.5 + (r_core - thickness - r_core_eff), 0.0, 1.0), w_core)
    else:
        w_nec = np.zeros_like(w_core)

    values = np.zeros(len(ids), dtype=np.uint8)
    values[w_edema >= 0.5] = 2
    values[w_core >= 0.5] = 3 if has_et else 1
    values[w_nec >= 0.5] = 1
    present = np.bincount(values, minlength=4)
    if min(present[1], present[2], present[3] if has_et else _MIN_COMPARTMENT) < _MIN_COMPARTMENT:
        return None
    label = np.zeros(tshape, dtype=np.uint8)
    label[inside] = values
    return _Tumour(
        slices=slices,
        label=label,
        ids=ids,
        necrosis=w_nec,
        core=w_core - w_nec,
        edema=w_edema - w_core,
        normal=1.0 - w_edema,
        texture=texture,
    )


def _paint_tumour(
    img: np.ndarray, tumour: _Tumour, c: _Contrast, level: np.float32, has_et: bool
) -> None:
    """Blend the tumour compartments into one modality's normal-tissue vector, in place."""
    normal = img[tumour.ids]
    # Edema keeps part of the tissue contrast beneath it and shifts WM to `c.edema`.
    edema = level * np.float32(c.edema) + (normal - level) * np.float32(c.edema_keep)
    core_level = c.enhancing if has_et else c.nonenhancing
    core = level * np.float32(core_level) * (1.0 + np.float32(0.1) * tumour.texture)
    mix = np.float32(c.necrosis_mix * 0.5)
    necrosis = level * np.float32(c.necrosis) * (1.0 + mix * tumour.texture)
    img[tumour.ids] = (
        normal * tumour.normal
        + edema * tumour.edema
        + core * tumour.core
        + necrosis * tumour.necrosis
    )
