"""Synthetic CHAOS data set: abdominal CT and MR phantoms written in the official Train_Sets layout.

Each patient is an analytic anatomy (body wall, fat, spine, ribs, lungs, liver with vessels and
gallbladder, kidneys, spleen, stomach, bowel, aorta, IVC) defined in a patient "body frame" in mm
(x towards the patient's left, y posterior, z superior, z = 0 near the top of the right
hemidiaphragm). Every series samples that anatomy on its own scanner grid (spacing, origin,
orientation, slice step), so the labels are exact on every grid and the sequences of one MR
patient show the same organs. Intensities come from per-sequence tissue tables chosen so that the
liver overlaps other tissue (spleen in CT, muscle and spleen in MR): a model has to use shape and
position, not a threshold.

Why hand-written: no maintained library generates multi-organ abdominal CT/MR phantoms with
scanner geometry (MONAI's `create_test_image_3d` draws random spheres only).

Layout written under `<out>/Train_Sets` (see ../shared/data/README.md):
    CT/<id>/DICOM_anon/i0000,0000b.dcm ...   (i0000 most superior, z descending)
    CT/<id>/Ground/liver_GT_000.png ...      (1-bit, liver only, NNN-th file)
    MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-0004-NNNNN.dcm  (out odd, in even numbers)
    MR/<id>/T1DUAL/Ground/IMG-0004-NNNNN.png (InPhase stems)
    MR/<id>/T2SPIR/{DICOM_anon,Ground}/IMG-0002-NNNNN.{dcm,png}
Ground PNGs are indexed like the stored pixel array (row, column), no flip.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
from scipy import ndimage
from pipeline.chaos import CHAOS_PNG_LIVER, MR_GREY_LEVELS
from pipeline.config import SynthConfig
from pipeline.console import progress
from pipeline.dicom import write_series
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.labels import ORGANS

log = logging.getLogger(__name__)

# Patient numbers of the official CHAOS training set, so synthetic ids look like real ones.
CT_IDS = [1, 2, 5, 6, 8, 10, 14, 16, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
MR_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]

# Official MR Ground grey levels, by organ name.
MR_LEVELS = {ORGANS[label]: grey for label, grey in MR_GREY_LEVELS.items()}

# Tissue classes of the phantom (uint8 codes).
(AIR, FAT, MUSCLE, BOWEL, GAS, FLUID, LIVER, VESSEL, GALL, SPLEEN, CORTEX, MEDULLA, PELVIS,
 BONE, MARROW, DISC, CSF, AORTA, IVC, LUNG, HEART, STOMACH, TABLE) = range(23)
N_TISSUES = 23
# IVC: centre x (mm, patient's right < 0), centre y relative to the vertebral body, semi-axes (mm).
IVC_X, IVC_DY, IVC_RADII = -24.0, -30.0, (13.0, 10.0)

# Mean intensity per tissue: CT in HU (portal-venous phase); MR in arbitrary scanner units.
# T1 is given as (water, fat) signal so that opposed phase can be computed as |water - fat|.
# Liver vs spleen: similar in CT (spleen may be brighter or darker per patient), spleen brighter
# in T2, darker in T1 -- as in the radiology textbooks.
_CT = {AIR: -1000, FAT: -100, MUSCLE: 55, BOWEL: 45, GAS: -900, FLUID: 12, LIVER: 110, VESSEL: 175,
       GALL: 8, SPLEEN: 112, CORTEX: 185, MEDULLA: 140, PELVIS: 20, BONE: 750, MARROW: 230, DISC: 85,
       CSF: 10, AORTA: 165, IVC: 140, LUNG: -860, HEART: 150, STOMACH: 60, TABLE: 150}
_T1_WATER = {AIR: 0, FAT: 90, MUSCLE: 240, BOWEL: 300, GAS: 0, FLUID: 90, LIVER: 430, VESSEL: 170,
             GALL: 110, SPLEEN: 330, CORTEX: 360, MEDULLA: 250, PELVIS: 80, BONE: 15, MARROW: 280,
             DISC: 220, CSF: 70, AORTA: 60, IVC: 140, LUNG: 15, HEART: 220, STOMACH: 280, TABLE: 0}
_T1_FAT = {FAT: 640, MARROW: 260, BOWEL: 30, LIVER: 0, MUSCLE: 10}
_T2 = {AIR: 0, FAT: 70, MUSCLE: 140, BOWEL: 320, GAS: 0, FLUID: 950, LIVER: 260, VESSEL: 60,
       GALL: 1100, SPLEEN: 560, CORTEX: 620, MEDULLA: 760, PELVIS: 1000, BONE: 20, MARROW: 110,
       DISC: 520, CSF: 1050, AORTA: 40, IVC: 80, LUNG: 20, HEART: 120, STOMACH: 420, TABLE: 0}
# Texture amplitude per tissue (fraction of the MR mean; HU for CT).
_TEXTURE = {LIVER: 0.06, SPLEEN: 0.05, BOWEL: 0.25, MUSCLE: 0.06, FAT: 0.04, MARROW: 0.15,
            CORTEX: 0.05, MEDULLA: 0.08, STOMACH: 0.15, LUNG: 0.3}
_CT_TEXTURE = {LIVER: 9, SPLEEN: 8, BOWEL: 35, MUSCLE: 8, FAT: 10, MARROW: 60, CORTEX: 10,
               MEDULLA: 12, STOMACH: 20, LUNG: 40, FLUID: 4}

T1_TE_IN, T1_TE_OUT, T2_TE = 4.6, 2.3, 80.0  # echo times at 1.5 T (ms)


def _table(values: dict[int, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(N_TISSUES, default, dtype=np.float32)
    for tissue, v in values.items():
        lut[tissue] = v
    return lut


@dataclass(frozen=True)
class Grid:
    """A scanner grid: volume[k, r, c] lies at origin + c*col_sp*row_dir + r*row_sp*col_dir + k*step*normal (LPS mm)."""

    shape: tuple[int, int, int]  # (slices, rows, cols)
    spacing: tuple[float, float, float]  # (row_spacing, col_spacing, slice_step) mm; step may be < 0
    origin: np.ndarray  # ImagePositionPatient of volume[0, 0, 0]
    row_dir: np.ndarray  # IOP[:3]
    col_dir: np.ndarray  # IOP[3:]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def points(self) -> np.ndarray:
        """World (LPS) coordinates of every voxel centre, float32 (3, slices, rows, cols)."""
        n, rows, cols = self.shape
        k = np.arange(n, dtype=np.float32)[:, None, None] * np.float32(self.spacing[2])
        r = np.arange(rows, dtype=np.float32)[None, :, None] * np.float32(self.spacing[0])
        c = np.arange(cols, dtype=np.float32)[None, None, :] * np.float32(self.spacing[1])
        axes = (self.row_dir, self.col_dir, self.normal)
        return np.stack([
            np.float32(self.origin[i]) + c * np.float32(axes[0][i]) + r * np.float32(axes[1][i])
            + k * np.float32(axes[2][i])
            for i in range(3)
        ])


class _Field:
    """A smooth random scalar field in the body frame (unit std), sampled anywhere by trilinear interpolation.

    Fixed per patient, so every series of that patient sees the same organ shapes and vessels.
    """

    _LO = np.array([-260.0, -220.0, -330.0])
    _HI = np.array([260.0, 220.0, 180.0])

    def __init__(self, rng: np.random.Generator, scale_mm: float):
        self.step = scale_mm / 2.0
        shape = np.ceil((self._HI - self._LO) / self.step).astype(int) + 1
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2, mode="wrap")
        self.grid = noise / noise.std()

    def __call__(self, p: np.ndarray) -> np.ndarray:
        idx = [(p[i] - self._LO[i]) / self.step for i in range(3)]
        return ndimage.map_coordinates(self.grid, idx, order=1, mode="nearest").astype(np.float32)


def _ellipsoid(p: np.ndarray, centre, radii, angle_deg: float = 0.0, tilt_deg: float = 0.0) -> np.ndarray:
    """1 - |R(p - c) / r|^2: positive inside. angle rotates about z (axial plane), tilt about y (coronal)."""
    x, y, z = (p[i] - np.float32(centre[i]) for i in range(3))
    a, t = np.deg2rad(angle_deg), np.deg2rad(tilt_deg)
    x, y = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
    x, z = np.cos(t) * x + np.sin(t) * z, -np.sin(t) * x + np.cos(t) * z
    return 1.0 - ((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)


class Anatomy:
    """One synthetic patient: shape parameters and random fields in the body frame (mm)."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.a = u(140, 175)  # body half-width (left-right)
        self.b = u(95, 125)  # body half-depth (anterior-posterior)
        self.fat = u(8, 28)  # subcutaneous fat thickness
        self.wall = u(7, 12)  # abdominal wall muscle thickness
        self.dome = u(-5, 10)  # height of the right hemidiaphragm
        self.liver_scale = u(0.85, 1.15, size=3)
        self.liver_shift = u(-12, 12, size=3)
        self.left_lobe = u(0.6, 1.3)  # left lobe size relative to normal
        self.spleen_scale = u(0.75, 1.3)
        self.kidney_z = u(-135, -110, size=2)  # right, left kidney centres
        self.gall = u(0.6, 1.3)
        self.disc_phase = u(0, 32)
        self.f_shape = _Field(rng, 70.0)
        self.f_shape2 = _Field(rng, 45.0)
        self.f_vessel = (_Field(rng, 26.0), _Field(rng, 26.0))
        self.f_bowel = _Field(rng, 28.0)
        self.ct = {
            "liver": u(85, 135), "spleen_delta": u(-20, 20), "kidney": u(150, 200), "noise": u(7, 14),
        }
        self.steatosis = u(0.0, 0.35) if rng.uniform() < 0.4 else 0.0  # liver fat signal fraction

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # Domes over the liver (right) and spleen (left, lower); posterior recesses reach lower.
        return (self.dome - 0.006 * (np.abs(x) - 65.0) ** 2 - 0.004 * y**2
                - 10.0 * (x > 0)).astype(np.float32)

    def tissues(self, p: np.ndarray) -> np.ndarray:
        """Tissue class (uint8) at body-frame points p (3, ...) in mm."""
        x, y, z = p
        a, b = self.a, self.b
        shape_noise = self.f_shape(p)
        # Torso: superellipse, flatter at the back, slightly narrower towards the chest.
        taper = 1.0 + 0.0008 * np.clip(-z, -60, 200)
        b_y = np.where(y > 0, 0.9 * b, b)
        sup = lambda da: (np.abs(x) / (a * taper - da)) ** 2.4 + (np.abs(y) / (b_y - da)) ** 2.4
        wobble = 0.03 * shape_noise
        body = sup(0) < 1 + wobble
        muscle_wall = sup(self.fat) < 1 + wobble
        cavity = sup(self.fat + self.wall) < 1 + wobble

        t = np.full(x.shape, AIR, dtype=np.uint8)
        # Scanner table: a shallow curved board just behind the patient's back.
        board = y - (b * 0.9 + 4 + 0.0006 * x**2)
        t[(board > 0) & (board < 9) & (np.abs(x) < 230)] = TABLE
        t[body] = FAT
        t[muscle_wall] = MUSCLE
        t[cavity] = FAT
        # Ribs: bony segments in the wall above the lower costal margin.
        ang = np.arctan2(y, x)
        rib = muscle_wall & ~cavity & (z > -110 + 40 * np.cos(ang)) & (np.mod(z + 40 * ang, 26) < 9) & (y < b * 0.5)
        t[rib] = BONE

        # Bowel loops fill the lower anterior cavity; some hold gas or fluid.
        fb = self.f_bowel(p)
        bowel = cavity & (z < -40 - 30 * (x < 0)) & (fb > -0.2) & (y < 0.5 * b)
        t[bowel] = BOWEL
        t[bowel & (fb > 1.3)] = GAS
        t[bowel & (fb < 0.05) & (fb > -0.05)] = FLUID

        yv = 0.9 * b - 62  # centre of the vertebral body
        # Kidneys: cortex, medulla, fluid-filled pelvis towards the hilum.
        kidneys = []
        for side, kz in ((-1, self.kidney_z[0]), (1, self.kidney_z[1])):
            c = (side * 62, yv - 5, kz)
            q = _ellipsoid(p, c, (27, 24, 52), angle_deg=side * 30, tilt_deg=side * 12) + 0.08 * shape_noise
            k = q > 0
            kidneys.append(q > -0.35)  # with the perirenal fat that keeps the liver away
            t[k] = CORTEX
            t[k & (q > 0.3)] = MEDULLA
            t[k & (q > 0.45) & (side * (x - c[0]) < -4)] = PELVIS

        # Spleen: posterolateral left, under the left hemidiaphragm.
        s = self.spleen_scale
        zd = self.diaphragm(x, y)
        spleen = (_ellipsoid(p, (0.62 * a, 0.4 * b, -45), (32 * s, 58 * s, 55 * s), angle_deg=-45)
                  + 0.15 * self.f_shape2(p) > 0) & cavity & (z < zd - 6)
        t[spleen] = SPLEEN

        # Stomach: anterior left upper, wall, fluid with a gas cap anteriorly (patient supine).
        qs = _ellipsoid(p, (55, -0.25 * b, -55), (45, 38, 50), angle_deg=20) + 0.1 * shape_noise
        stomach = (qs > 0) & cavity & (z < zd - 6)
        t[stomach] = STOMACH
        t[stomach & (qs > 0.2)] = FLUID
        t[stomach & (qs > 0.2) & (y < -0.25 * b - 15)] = GAS

        # Liver: right lobe + left lobe + caudate, deformed, clipped by wall and diaphragm.
        ls, sh = self.liver_scale, self.liver_shift
        lobes = [
            _ellipsoid(p, (-0.45 * a + sh[0], -0.05 * b + sh[1], -70 + sh[2]),
                       (0.47 * a * ls[0], 0.62 * b * ls[1], 78 * ls[2]), tilt_deg=-25),
            _ellipsoid(p, (-5 + sh[0], -0.45 * b + sh[1], -35 + sh[2]),
                       (55 * self.left_lobe * ls[0], 28 * ls[1], 34 * ls[2]), angle_deg=-10, tilt_deg=15),
            _ellipsoid(p, (-20 + sh[0], 0.08 * b + sh[1], -48 + sh[2]), (20, 22, 30)),
        ]
        ql = np.maximum.reduce(lobes) + 0.22 * shape_noise + 0.12 * self.f_shape2(p)
        # The IVC runs in a groove on the liver's posterior surface, open behind (as on the real
        # CHAOS CT, where it lies outside the liver label); the liver stays 2 mm clear of its
        # sides. Before, the tube was drilled through the caudate lobe, an enclosed non-liver
        # hole no real liver has.
        ivc_groove = (np.abs(x - IVC_X) < IVC_RADII[0] + 2) & (y > yv + IVC_DY)
        # The gallbladder lies in its fossa on the liver's underside, free in front: no liver
        # anterior to it. Before, the liver often closed all round it (up to every slice of it).
        gb_centre = (-40 + sh[0], -0.4 * b + sh[1], -95 + sh[2])
        gb_radii = (14 * self.gall, 17 * self.gall, 34 * self.gall)
        gb = _ellipsoid(p, gb_centre, gb_radii, tilt_deg=-20) > 0
        gb_front = (_ellipsoid(p, gb_centre, (gb_radii[0], 1e6, gb_radii[2]), tilt_deg=-20) > 0) & (y < gb_centre[1])
        liver = ((ql > 0) & cavity & (z < zd - 6) & ~kidneys[0] & ~spleen & (qs < -0.15)
                 & (sup(self.fat + self.wall + 2) < 1) & ~ivc_groove & ~gb_front)
        t[liver] = LIVER
        # Visceral fat between the liver and the bowel loops under it, thicker in patients with more
        # subcutaneous fat (about 2-5 mm). Without it, bowel of liver-like grey level touched the
        # liver with no interface at all, a boundary no annotator could draw. ql = 1 - |q|^2 falls
        # by about 2 / 70 per mm across the surface of lobes with radii near 70 mm.
        plane_mm = 1.0 + 0.15 * self.fat
        t[bowel & np.isin(t, (BOWEL, GAS, FLUID)) & (ql > -plane_mm * 2.0 / 70.0)] = FAT
        t[gb & cavity] = GALL
        # Portal and hepatic veins: tubes where two smooth fields both cross zero.
        v1, v2 = self.f_vessel
        lm = t == LIVER
        pl = p[:, lm]
        t[lm] = np.where((np.abs(v1(pl)) < 0.3) & (np.abs(v2(pl)) < 0.3), VESSEL, LIVER)

        # Spine with discs, canal and posterior elements; paraspinal and psoas muscles.
        t[cavity & (np.abs(x) < 45) & (y > yv)] = MUSCLE
        t[_ellipsoid(p, (36, yv + 42, 0), (24, 22, 1e4)) > 0] = MUSCLE
        t[_ellipsoid(p, (-36, yv + 42, 0), (24, 22, 1e4)) > 0] = MUSCLE
        psoas_r = np.clip((-z - 90) * 0.2, 0, 22)
        for sx in (-1, 1):
            t[cavity & ((x - sx * 38) ** 2 + (y - yv + 5) ** 2 < psoas_r**2)] = MUSCLE
        vb = (x**2 + (y - yv) ** 2) < 19**2
        t[vb] = BONE
        t[(x**2 + (y - yv) ** 2) < 16**2] = MARROW
        t[vb & (np.mod(z - self.disc_phase, 32) < 6)] = DISC
        t[(np.abs(x) < 4) & (y > yv + 26) & (y < yv + 50)] = BONE
        t[(np.abs(x) < 18) & (y > yv + 21) & (y < yv + 27)] = BONE
        t[(x**2 + (y - yv - 28) ** 2) < 7**2] = CSF

        # Great vessels: aorta left-anterior of the spine, IVC to the right (behind the liver).
        t[cavity & ((x - 14) ** 2 + (y - yv + 30) ** 2 < 11**2)] = AORTA
        t[cavity & (((x - IVC_X) / IVC_RADII[0]) ** 2 + ((y - yv - IVC_DY) / IVC_RADII[1]) ** 2 < 1)] = IVC

        # Above the diaphragm: lungs, heart anteriorly in the middle.
        chest = cavity & (z > zd)
        t[chest & ~np.isin(t, (BONE, MARROW, DISC, CSF, AORTA, MUSCLE))] = LUNG
        heart = chest & (_ellipsoid(p, (25, -0.3 * b, zd.max() + 55), (70, 55, 70)) > 0)
        t[heart] = HEART
        t[~body & (t != TABLE)] = AIR
        return t


def _labels(t: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Organ masks from tissues; the Ground liver includes its intrahepatic vessels (as in CHAOS)."""
    kidney = np.isin(t, (CORTEX, MEDULLA, PELVIS))
    return {
        "liver": np.isin(t, (LIVER, VESSEL)),
        "right_kidney": kidney & (p[0] < 0),
        "left_kidney": kidney & (p[0] >= 0),
        "spleen": t == SPLEEN,
    }


def _texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.6, 1.3, 1.3))
    return tex / tex.std()


def _blur(vol: np.ndarray) -> np.ndarray:
    # Partial-volume: a point-spread about one pixel wide in-plane, thicker through the slice.
    return ndimage.gaussian_filter(vol, (0.35, 0.55, 0.55))


def render_ct(t: np.ndarray, anat: Anatomy, rng: np.random.Generator, pixel_mm: float) -> np.ndarray:
    """Hounsfield units (float32, same shape as t)."""
    vals = dict(_CT)
    vals[LIVER] = anat.ct["liver"]
    vals[VESSEL] = anat.ct["liver"] + 55
    vals[SPLEEN] = anat.ct["liver"] + anat.ct["spleen_delta"]
    vals[CORTEX] = anat.ct["kidney"]
    vals[MEDULLA] = anat.ct["kidney"] - 40
    hu = _table(vals)[t] + _table(_CT_TEXTURE)[t] * _texture(rng, t.shape)
    hu = _blur(hu)
    hu += rng.normal(0, anat.ct["noise"], t.shape).astype(np.float32)
    return np.clip(hu, -1000, 3000)


def _bias(anat_field: _Field, p: np.ndarray, strength: float) -> np.ndarray:
    return np.exp(strength * anat_field(p)).astype(np.float32)


def render_mr(t: np.ndarray, sequence: str, rng: np.random.Generator, bias: np.ndarray,
              steatosis: float) -> np.ndarray:
    """Signal (float32 >= 0) of sequence 'T1_in', 'T1_out' or 'T2SPIR' for the tissue map t."""
    tex = _texture(rng, t.shape)
    if sequence == "T2SPIR":
        mean = _table(_T2)[t]
        sig = mean * (1 + _table(_TEXTURE)[t] * tex)
        sig = _blur(sig)
    else:
        water = _table(_T1_WATER)[t]
        fat = _table(_T1_FAT)[t]
        liver = np.isin(t, (LIVER,))
        fat[liver] = steatosis * water[liver]
        water[liver] *= 1 - steatosis
        scale = 1 + _table(_TEXTURE)[t] * tex
        # Blur water and fat separately before combining: voxels mixing both at fat/water borders
        # cancel in opposed phase (the "India ink" rim), as on a real dual-echo scan.
        water, fat = _blur(water * scale), _blur(fat * scale)
        sig = water + fat if sequence == "T1_in" else np.abs(water - fat)
    sig = sig * bias
    sigma = 0.035 * float(np.percentile(sig[t != AIR], 75)) if np.any(t != AIR) else 10.0
    noise = rng.normal(0, sigma, (2, *t.shape)).astype(np.float32)
    return np.sqrt((sig + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = _unit(rng.standard_normal(3))
    ang = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def _make_grid(rng: np.random.Generator, size: int, n_slices: int, fov: float, step: float,
               centre: np.ndarray, top_z: float, rot: np.ndarray, descending: bool) -> Grid:
    """A grid of `n_slices` axial(-ish) slices whose first (or last) slice lies at body z = top_z."""
    # Binary fractions of a mm (exact in float32 and in a DS string): dcm2niix computes its
    # affine in float32, so such values keep it within 1e-3 mm of the exact geometry even
    # at CT table heights of z ~ 1700 mm.
    px = round(fov / size * 256) / 256
    row_dir, col_dir = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    normal = np.cross(row_dir, col_dir)
    half = (size - 1) / 2 * px
    offset = rng.uniform(-15, 15, size=2)
    top = centre + np.array([offset[0], offset[1], top_z])
    bottom = top - normal * step * (n_slices - 1)
    first = top if descending else bottom
    origin = first - half * row_dir - half * col_dir
    return Grid((n_slices, size, size), (px, px, -step if descending else step),
                np.round(origin * 64) / 64, row_dir, col_dir)


def _body_points(grid: Grid, centre: np.ndarray, body_rot: np.ndarray) -> np.ndarray:
    w = grid.points()
    d = w.reshape(3, -1) - centre[:, None].astype(np.float32)
    return (body_rot.T.astype(np.float32) @ d).reshape(w.shape)


def _save_png(path: Path, img: Image.Image) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _patient_rng(seed: int, modality: str, pid: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"CT": 1, "MR": 2}[modality], pid])


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["chaos-synth", *map(str, parts)])


def synth_ct_patient(folder: Path, pid: int, cfg: SynthConfig) -> dict:
    """Write CT/<pid>: DICOM_anon (head to feet) and 1-bit liver Ground PNGs. Returns a summary row."""
    rng = _patient_rng(cfg.seed, "CT", pid)
    anat = Anatomy(rng)
    n = int(rng.integers(cfg.ct_slices[0], cfg.ct_slices[1] + 1))
    step = round(float(rng.uniform(2.0, 3.0)) * 64) / 64
    fov = float(rng.uniform(max(320, 2 * anat.a + 30), 420))
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(900, 1700)])
    body_rot = _rotation(rng, 3.0)
    grid = _make_grid(rng, cfg.ct_size, n, fov, step, centre, rng.uniform(5, 35), np.eye(3), True)
    p = _body_points(grid, centre, body_rot)
    t = anat.tissues(p)
    hu = render_ct(t, anat, rng, grid.spacing[0])
    # Outside the reconstruction circle the scanner stores its minimum, like real CT.
    rr, cc = np.mgrid[: cfg.ct_size, : cfg.ct_size]
    half = (cfg.ct_size - 1) / 2
    hu[:, (rr - half) ** 2 + (cc - half) ** 2 > (half + 0.5) ** 2] = -1000
    liver = _labels(t, p)["liver"]

    position = "FFS" if rng.uniform() < 0.7 else "HFS"
    names = [f"i{k:04d},0000b.dcm" for k in range(n)]
    write_series(
        folder / "DICOM_anon", hu, spacing=grid.spacing, origin=grid.origin, row_dir=grid.row_dir,
        col_dir=grid.col_dir, modality="CT", file_names=names, rescale_intercept=-1000.0,
        series_uid=_uid(cfg.seed, "CT", pid, "series"), study_uid=_uid(cfg.seed, "CT", pid, "study"),
        patient_id=f"CHAOS^CT_SET_{pid}", series_description="Abdomen portal venous",
        patient_position=position,
        extra_tags={"SeriesNumber": 4, "KVP": "120", "ConvolutionKernel": "B",
                    "ContrastBolusAgent": "CONTRAST", "WindowCenter": "50", "WindowWidth": "400"},
    )
    for k in range(n):
        _save_png(folder / "Ground" / f"liver_GT_{k:03d}.png", Image.fromarray(liver[k]).convert("1"))
    return {"patient": f"CT_{pid}", "slices": n, "spacing": (*grid.spacing[:2], abs(step)),
            "liver_ml": float(liver.sum() * grid.spacing[0] * grid.spacing[1] * step / 1000)}


def _mr_ground(labels: dict[str, np.ndarray]) -> np.ndarray:
    g = np.zeros(labels["liver"].shape, dtype=np.uint8)
    for organ, level in MR_LEVELS.items():
        g[labels[organ]] = level
    return g


def synth_mr_patient(folder: Path, pid: int, cfg: SynthConfig) -> dict:
    """Write MR/<pid>/T1DUAL (in/out phase, shared Ground) and MR/<pid>/T2SPIR. Returns a summary row."""
    rng = _patient_rng(cfg.seed, "MR", pid)
    anat = Anatomy(rng)
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-30, 10), rng.uniform(-120, 60)])
    body_rot = _rotation(rng, 3.0)
    bias_fields = (_Field(rng, 220.0), _Field(rng, 220.0))
    study = _uid(cfg.seed, "MR", pid, "study")
    common = {"MagneticFieldStrength": "1.5", "Manufacturer": "Philips Medical Systems"}
    row = {"patient": f"MR_{pid}"}
    for seq in ("T1DUAL", "T2SPIR"):
        n = int(rng.integers(cfg.mr_slices[0], cfg.mr_slices[1] + 1))
        step = round(float(rng.uniform(5.5, 9.0)) * 64) / 64
        fov = float(rng.uniform(max(330, 2 * anat.a + 30), 420))
        oblique = rng.uniform() < 0.4
        rot = _rotation(rng, 8.0) if oblique else np.eye(3)
        # Like a real abdominal MR stack: centred near the hila, never starting below the dome;
        # +-10 mm breath-hold shift between the two acquisitions.
        top_z = max(10.0, -70.0 + step * (n - 1) / 2) + rng.uniform(-10, 10)
        grid = _make_grid(rng, cfg.mr_size, n, fov, step, centre, top_z, rot, False)
        p = _body_points(grid, centre, body_rot)
        t = anat.tissues(p)
        ground = _mr_ground(_labels(t, p))
        geo = dict(spacing=grid.spacing, origin=grid.origin, row_dir=grid.row_dir, col_dir=grid.col_dir,
                   modality="MR", study_uid=study, patient_id=f"CHAOS^MR_SET_{pid}", patient_position="HFS")
        if seq == "T1DUAL":
            bias = _bias(bias_fields[0], p, 0.18)
            echo = {"InPhase": (T1_TE_IN, "T1_in", 2), "OutPhase": (T1_TE_OUT, "T1_out", 1)}
            for phase, (te, key, parity) in echo.items():
                numbers = [2 * k + parity for k in range(n)]
                vol = render_mr(t, key, rng, bias, anat.steatosis)
                write_series(
                    folder / "T1DUAL" / "DICOM_anon" / phase, vol, **geo,
                    file_names=[f"IMG-0004-{i:05d}.dcm" for i in numbers], instance_numbers=numbers,
                    series_uid=_uid(cfg.seed, "MR", pid, phase), series_description=f"T1_{phase}",
                    extra_tags={**common, "EchoTime": f"{te}", "RepetitionTime": "150",
                                "SeriesNumber": 4 if phase == "InPhase" else 5, "ProtocolName": "T1DUAL"},
                )
            stems = [f"IMG-0004-{2 * k + 2:05d}" for k in range(n)]
        else:
            vol = render_mr(t, "T2SPIR", rng, _bias(bias_fields[1], p, 0.2), anat.steatosis)
            stems = [f"IMG-0002-{k + 1:05d}" for k in range(n)]
            write_series(
                folder / "T2SPIR" / "DICOM_anon", vol, **geo, file_names=[s + ".dcm" for s in stems],
                series_uid=_uid(cfg.seed, "MR", pid, "T2SPIR"), series_description="T2SPIR",
                extra_tags={**common, "EchoTime": f"{T2_TE}", "RepetitionTime": "1600",
                            "SeriesNumber": 2, "ProtocolName": "T2SPIR"},
            )
        for k, stem in enumerate(stems):
            _save_png(folder / seq / "Ground" / f"{stem}.png", Image.fromarray(ground[k], mode="L"))
        row[seq] = {"slices": n, "spacing": (*grid.spacing[:2], step), "oblique": oblique,
                    "liver_ml": float((ground == CHAOS_PNG_LIVER).sum() * grid.spacing[0] ** 2 * step / 1000)}
    return row


def _ids(base: list[int], count: int) -> list[int]:
    extra = range(base[-1] + 1, base[-1] + 1 + max(0, count - len(base)))
    return (base + list(extra))[:count]


def _synth_patient(modality: str, pid: int, tmp: Path, cfg: SynthConfig) -> tuple[dict, float]:
    """Write one patient into `tmp` (a scratch folder); returns its summary row and the seconds it took."""
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    make = synth_ct_patient if modality == "CT" else synth_mr_patient
    return make(tmp, pid, cfg), time.perf_counter() - t0


def _workers(requested: int, jobs: int) -> int:
    if requested < 0:
        raise PipelineError(f"synth.workers must be >= 0, got {requested}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, jobs))


def generate_dataset(out: str | Path, cfg: SynthConfig) -> Path:
    """Write `cfg.patients` CT and `cfg.patients` MR patients under `out/Train_Sets`; return that path.

    Each patient is generated in a hidden scratch folder beside Train_Sets and renamed into place
    when complete, so an interrupted run never leaves a half patient. Same cfg -> identical bytes,
    whatever `cfg.workers`: every patient draws from its own seeded generator.
    """
    if cfg.patients < 1:
        raise PipelineError(f"synth.patients must be >= 1, got {cfg.patients}")
    for key, lo in (("ct_size", 16), ("mr_size", 16)):
        if getattr(cfg, key) < lo:
            raise PipelineError(f"synth.{key} must be >= {lo}, got {getattr(cfg, key)}")
    for key in ("ct_slices", "mr_slices"):
        v = getattr(cfg, key)
        if len(v) != 2 or not 2 <= v[0] <= v[1]:
            raise PipelineError(f"synth.{key} must be [min, max] with 2 <= min <= max, got {v}")
    root = Path(out) / "Train_Sets"
    scratch = Path(out) / f".synth-partial-{os.getpid()}"
    jobs = [("CT", i) for i in _ids(CT_IDS, cfg.patients)] + [("MR", i) for i in _ids(MR_IDS, cfg.patients)]
    workers = _workers(cfg.workers, len(jobs))
    t0 = time.perf_counter()

    def finish(modality: str, pid: int, row: dict, seconds: float) -> None:
        final = root / modality / str(pid)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)  # a previous synth output of the same patient
        os.replace(scratch / modality / str(pid), final)
        log.info("%s_%d written in %.1f s: %s", modality, pid, seconds, row)

    bar = progress(total=len(jobs), desc="synth patients", unit="patient")
    try:
        if workers == 1:
            for modality, pid in jobs:
                finish(modality, pid, *_synth_patient(modality, pid, scratch / modality / str(pid), cfg))
                bar.update()
        else:
            # Patients are independent and the work is NumPy/SciPy on one core each: one process
            # per core. "spawn" because the caller may have started torch's thread pools already.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_synth_patient, m, i, scratch / m / str(i), cfg): (m, i) for m, i in jobs}
                try:
                    for fut in as_completed(futures):
                        finish(*futures[fut], *fut.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
        if scratch.exists():
            shutil.rmtree(scratch)
    log.info("synthetic data set (%d CT + %d MR patients, %d process%s) in %.1f s: %s", cfg.patients,
             cfg.patients, workers, "es" if workers > 1 else "", time.perf_counter() - t0, root)
    return root


def _read_slice(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def save_montage(train_sets: str | Path, out_png: str | Path, ct_id: int | None = None,
                 mr_id: int | None = None) -> Path:
    """PNG montage: a mid-liver slice of CT, T1 in-phase, T1 opposed-phase and T2SPIR with the Ground outline.

    Reads back the written files (DICOM pixel array as stored, Ground PNG), so it also shows that
    images and masks line up. The first CT and MR patient are used unless ids are given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(train_sets)
    ct_id = ct_id if ct_id is not None else min(int(d.name) for d in (root / "CT").iterdir())
    mr_id = mr_id if mr_id is not None else min(int(d.name) for d in (root / "MR").iterdir())
    ct, mr = root / "CT" / str(ct_id), root / "MR" / str(mr_id)

    def mid_liver(ground: list[Path]) -> int:
        areas = [(np.array(Image.open(g)) > 0).sum() for g in ground]
        return int(np.argmax(areas))

    panels = []
    cg = sorted((ct / "Ground").glob("*.png"))
    k = mid_liver(cg)
    panels.append((f"CT_{ct_id} {sorted((ct / 'DICOM_anon').glob('*.dcm'))[k].name}",
                   _read_slice(sorted((ct / "DICOM_anon").glob("*.dcm"))[k]), np.array(Image.open(cg[k])),
                   (-160, 240)))
    for seq, folder, gfolder in (("T1 in", mr / "T1DUAL/DICOM_anon/InPhase", mr / "T1DUAL/Ground"),
                                 ("T1 out", mr / "T1DUAL/DICOM_anon/OutPhase", mr / "T1DUAL/Ground"),
                                 ("T2SPIR", mr / "T2SPIR/DICOM_anon", mr / "T2SPIR/Ground")):
        g = sorted(gfolder.glob("*.png"))
        k = mid_liver(g)
        img = _read_slice(sorted(folder.glob("*.dcm"))[k])
        panels.append((f"MR_{mr_id} {seq}", img, np.array(Image.open(g[k])), tuple(np.percentile(img, (1, 99.5)))))
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4), dpi=80)
    for col, (title, img, ground, (lo, hi)) in enumerate(panels):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if row == 1:
                colours = ("lime", "orange", "cyan", "magenta")  # liver, right kidney, left kidney, spleen
                for level, color in ((1, "lime"), *zip(MR_GREY_LEVELS.values(), colours)):
                    if np.any(ground == level):
                        ax.contour(ground == level, levels=[0.5], colors=color, linewidths=0.8)
            ax.set_title(title if row == 0 else "Ground outline", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
