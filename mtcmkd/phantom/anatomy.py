"""Source brains of the phantom: the MNI152 2009 template or a procedural brain, resampled.

Anatomy comes from the MNI152 2009 template shipped inside the `nilearn` wheel (tissue maps are
read with nibabel; nilearn itself is never imported, it is slow to import) or, without it, from
a procedural brain. Either source is cropped to the brain, turned into brain/WM/GM fractions
with a list of places a tumour centre may go, and zoomed once per output shape so the brain
fills ~90% of the volume (both steps cached: a dataset reuses them for every case).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .fields import smooth_noise

# File names of the MNI152 2009 (sym, 1 mm, 197 x 233 x 189) maps inside nilearn/datasets/data.
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

_FILL = np.array([0.88, 0.88, 0.91])  # fraction of each axis the brain spans before per-case scale
_PROCEDURAL_SEED = 20_240_917  # fixed: procedural cases differ through the warp, like MNI ones
_PROCEDURAL_MM = 1.5


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


@dataclass(frozen=True, eq=False)
class Resampled:
    """A source brain zoomed to the voxel size one output shape needs (cached per shape)."""

    tissues: np.ndarray  # (3, X, Y, Z) brain, WM, GM fractions in output-sized voxels
    vox_per_mm: float  # output voxels per anatomical millimetre
    brain_extent: np.ndarray  # (3,) brain size in output voxels, before the per-case scale
    seeds_wm: np.ndarray
    depth_wm: np.ndarray  # in output voxels
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


def anatomy_name(use_template: bool) -> str:
    """"mni152" when `use_template` and the template is installed, else "procedural"."""
    return "mni152" if use_template and template_path() is not None else "procedural"


@functools.lru_cache(maxsize=4)
def resampled(name: str, shape: tuple[int, int, int]) -> Resampled:
    """Source `name` ("mni152" or "procedural") zoomed so the brain fills ~90% of `shape`.

    Isotropically, like a real head: small shapes get a proportionally smaller brain with
    coarser voxels. Raises FileNotFoundError for "mni152" without nilearn installed.
    """
    src = _anatomy(name)
    vox_per_mm = float(np.min(_FILL * np.array(shape) / src.brain_extent_mm))
    factor = vox_per_mm * src.voxel_mm
    tissues = src.tissues
    if factor < 0.8:
        # Anti-alias before shrinking so thin cortex becomes partial volume, not speckle.
        sigma = 0.42 / factor
        tissues = np.stack([ndi.gaussian_filter(t, sigma) for t in tissues])
    zoomed = np.stack([ndi.zoom(t, factor, order=1, grid_mode=False) for t in tissues])
    # zoom(grid_mode=False) maps input index i to i * (size_out - 1) / (size_in - 1) per axis.
    ratio = (np.array(zoomed.shape[1:]) - 1) / (np.array(src.tissues.shape[1:]) - 1)
    return Resampled(
        tissues=np.ascontiguousarray(zoomed, dtype=np.float32),
        vox_per_mm=vox_per_mm,
        brain_extent=src.brain_extent_mm * vox_per_mm,
        seeds_wm=src.seeds_wm * ratio,
        depth_wm=src.depth_wm * vox_per_mm,
        seeds_any=src.seeds_any * ratio,
        depth_any=src.depth_any * vox_per_mm,
    )


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
    low = smooth_noise(rng, shape, 25.0 / mm, 1)[0]
    gyri, sulci = smooth_noise(rng, shape, 10.0 / mm, 2)
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
