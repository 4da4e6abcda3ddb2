"""The phantom's anatomy: tissue classes and analytic organs in a patient body frame, sampled on a scanner grid.

The body frame is in mm: x towards the patient's left, y posterior, z superior, z = 0 near the top of
the right hemidiaphragm. Every series samples the same anatomy on its own grid (spacing, origin,
orientation, slice step), so the labels are exact on every grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Tissue classes of the phantom (uint8 codes).
(AIR, FAT, MUSCLE, BOWEL, GAS, FLUID, LIVER, VESSEL, GALL, SPLEEN, CORTEX, MEDULLA, PELVIS,
 BONE, MARROW, DISC, CSF, AORTA, IVC, LUNG, HEART, STOMACH, TABLE) = range(23)


N_TISSUES = 23


# IVC: centre x (mm, patient's right < 0), centre y relative to the vertebral body, semi-axes (mm).
IVC_X, IVC_DY, IVC_RADII = -24.0, -30.0, (13.0, 10.0)


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


class Field:
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
        self.f_shape = Field(rng, 70.0)
        self.f_shape2 = Field(rng, 45.0)
        self.f_vessel = (Field(rng, 26.0), Field(rng, 26.0))
        self.f_bowel = Field(rng, 28.0)
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


def organ_labels(t: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Organ masks from tissues; the Ground liver includes its intrahepatic vessels (as in CHAOS)."""
    kidney = np.isin(t, (CORTEX, MEDULLA, PELVIS))
    return {
        "liver": np.isin(t, (LIVER, VESSEL)),
        "right_kidney": kidney & (p[0] < 0),
        "left_kidney": kidney & (p[0] >= 0),
        "spleen": t == SPLEEN,
    }


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = _unit(rng.standard_normal(3))
    ang = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def make_grid(rng: np.random.Generator, size: int, n_slices: int, fov: float, step: float,
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


def body_points(grid: Grid, centre: np.ndarray, body_rot: np.ndarray) -> np.ndarray:
    w = grid.points()
    d = w.reshape(3, -1) - centre[:, None].astype(np.float32)
    return (body_rot.T.astype(np.float32) @ d).reshape(w.shape)
