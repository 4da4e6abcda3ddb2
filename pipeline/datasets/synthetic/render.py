"""Tissue classes -> CT (HU) or MR (T1 in / opposed phase, T2-SPIR) intensities, with texture, bias and noise.

Per-sequence tissue tables are chosen so that the liver overlaps other tissue (spleen in CT, muscle
and spleen in MR): a model has to use shape and position, not a threshold.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.datasets.synthetic.anatomy import (AIR, AORTA, BONE, BOWEL, CORTEX, CSF, DISC, FAT, FLUID, GALL, GAS,
                                                 HEART, IVC, LIVER, LUNG, MARROW, MEDULLA, MUSCLE, N_TISSUES, PELVIS,
                                                 SPLEEN, STOMACH, TABLE, VESSEL, Anatomy, Field)

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


def bias_field(anat_field: Field, p: np.ndarray, strength: float) -> np.ndarray:
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
