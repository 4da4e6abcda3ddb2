"""Tiny prepared data sets (NIfTI + datalist.json, the contract of `run.py prepare`) for train tests.

Volumes are (X, Y, Z) with Z the slice axis and a non-identity affine (LPS-like flips, anisotropic
spacing) so that reorientation is exercised. MR label maps carry all four organs (1 liver,
2 right kidney, 3 left kidney, 4 spleen); CT label maps only liver (0/1), as in CHAOS.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

ORGAN_LABELS = {"0": "background", "1": "liver", "2": "right_kidney", "3": "left_kidney", "4": "spleen"}


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def organ_volume(shape, rng, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of one synthetic abdomen; liver off-centre so flips matter."""
    x, y, z = shape
    label = np.zeros(shape, np.uint8)
    jitter = rng.uniform(-1.5, 1.5, 3)
    label[ellipsoid(shape, (0.35 * x + jitter[0], 0.45 * y + jitter[1], 0.5 * z), (0.22 * x, 0.25 * y, 0.35 * z))] = 1
    if modality == "MR":
        label[ellipsoid(shape, (0.3 * x, 0.8 * y, 0.5 * z), (0.08 * x, 0.08 * y, 0.2 * z))] = 2
        label[ellipsoid(shape, (0.72 * x, 0.8 * y, 0.5 * z), (0.08 * x, 0.08 * y, 0.2 * z))] = 3
        label[ellipsoid(shape, (0.75 * x, 0.45 * y, 0.5 * z), (0.1 * x, 0.12 * y, 0.2 * z))] = 4
        values = {0: 120.0, 1: 420.0, 2: 260.0, 3: 260.0, 4: 330.0}
        noise = 25.0
    else:
        values = {0: -80.0, 1: 110.0}
        noise = 15.0
    image = np.zeros(shape, np.float32)
    for k, v in values.items():
        image[label == k] = v
    image += rng.normal(0.0, noise, shape).astype(np.float32)
    return image, label


def make_prepared_dataset(root: Path, n_mr: int = 3, n_ct: int = 3, shape=(40, 36, 10), folds: int = 2,
                          seed: int = 0) -> Path:
    """Write root/imagesTr, root/labelsTr and root/datalist.json; return root."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])
    affine[:3, 3] = [30.0, 25.0, -40.0]
    entries = []
    patients = [("MR", i) for i in range(1, n_mr + 1)] + [("CT", i) for i in range(1, n_ct + 1)]
    for index, (modality, number) in enumerate(patients):
        patient = f"{modality}_{number}"
        case = patient if modality == "CT" else f"{patient}_T2SPIR"
        image, label = organ_volume(shape, rng, modality)
        for sub, arr in (("imagesTr", image), ("labelsTr", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(arr, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, root / sub / f"{case}.nii.gz")
        entries.append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "case": case,
                        "patient": patient, "modality": modality,
                        "sequence": "CT" if modality == "CT" else "T2SPIR", "fold": index % folds})
    (root / "datalist.json").write_text(json.dumps(
        {"training": entries, "labels": ORGAN_LABELS, "numFolds": folds}, indent=2))
    return root
