"""One case on the viewer's screen: its volume in RAS orientation, mask and reference, slices drawn as PNGs.

Every volume is shown as radiologists read it (axial: the patient's right on the left of the image,
anterior at the top; coronal: right on the left, superior at the top; sagittal: anterior on the left,
superior at the top), each pixel drawn with its true aspect ratio (in-plane spacing and slice thickness).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.figures import display_window
from pipeline.core.labels import LIVER_RGB

PLANES = ("axial", "coronal", "sagittal")


REFERENCE_RGB = (40, 220, 60)


MAX_SIDE = 768  # longest side of a rendered slice, in screen pixels


# window / level presets (HU for CT); MR's is computed per volume from its 1st and 99th percentiles
PRESETS = {"CT abdomen": (400.0, 40.0), "CT liver": (150.0, 60.0)}


# the edges of each plane's picture, in the order left, right, top, bottom
EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


@dataclass
class CaseView:
    """A scan with its mask (and reference) reoriented to RAS for display; index (x, y, z)."""

    name: str
    image: np.ndarray  # float32 (X, Y, Z), RAS
    mask: np.ndarray  # bool, RAS
    affine: np.ndarray  # RAS voxel -> mm
    modality: str
    to_source: np.ndarray  # RAS voxel index -> the source volume's voxel index (4x4)
    reference: np.ndarray | None = None
    mask_file: Path | None = None
    extra_files: dict = field(default_factory=dict)  # download name -> path (e.g. the DICOM SEG)
    qc: list = field(default_factory=list)

    @classmethod
    def from_arrays(cls, name: str, image: np.ndarray, affine: np.ndarray, mask: np.ndarray, modality: str,
                    reference: np.ndarray | None = None, **kw) -> "CaseView":
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        shape = np.asarray(image).shape
        ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
        transform = nib.orientations.ornt_transform(ornt, ras)

        def move(a):
            return None if a is None else np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(a),
                                                                                                   transform))
        to_ras = nib.orientations.inv_ornt_aff(transform, shape)  # RAS index -> source index
        return cls(name=name, image=move(image).astype(np.float32), mask=move(np.asarray(mask) > 0),
                   affine=np.asarray(affine, dtype=np.float64) @ to_ras, modality=modality, to_source=to_ras,
                   reference=None if reference is None else move(np.asarray(reference) > 0), **kw)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def liver_ml(self) -> float:
        return float(self.mask.sum()) * float(np.prod(self.spacing)) / 1000.0

    def dice(self) -> float | None:
        from pipeline.evaluate.metrics import dice

        return None if self.reference is None else dice(self.mask, self.reference)

    def presets(self) -> dict[str, list[float]]:
        if self.modality == "CT":
            return {k: list(v) for k, v in PRESETS.items()}
        low, high = display_window(self.image)
        return {"MR auto": [float(max(high - low, 1e-3)), float((high + low) / 2)]}

    def info(self) -> dict:
        sx, sy, sz = (float(v) for v in self.spacing)
        return {"name": self.name, "shape": list(self.image.shape), "spacing_mm": [sx, sy, sz],
                "modality": self.modality, "liver_ml": round(self.liver_ml(), 1), "dice": self.dice(),
                "has_reference": self.reference is not None, "presets": self.presets(), "edges": EDGES,
                "qc": self.qc, "downloads": ["mask.nii.gz", *self.extra_files]}

    def plane(self, plane: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, float]]:
        """(image, mask, reference) of one slice as displayed (rows top to bottom, columns left to
        right) and the (width, height) of one displayed pixel in mm."""
        sx, sy, sz = (float(v) for v in self.spacing)
        axis = PLANES.index(plane) if plane in PLANES else -1
        if axis < 0:
            raise PipelineError(f"unknown plane {plane!r}; choose axial, coronal or sagittal")
        size = self.image.shape[2 - axis]  # axial slices along z, coronal along y, sagittal along x
        index = int(np.clip(index, 0, size - 1))

        def cut(a):
            if a is None:
                return None
            if plane == "axial":
                return a[::-1, ::-1, index].T  # rows anterior -> posterior, columns right -> left
            if plane == "coronal":
                return a[::-1, index, ::-1].T  # rows superior -> inferior, columns right -> left
            return a[index, ::-1, ::-1].T  # rows superior -> inferior, columns anterior -> posterior

        pixel = {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}[plane]
        return cut(self.image), cut(self.mask), cut(self.reference), pixel

    def render(self, plane: str, index: int, window: float, level: float, overlay: bool = True,
               opacity: float = 0.5, reference: bool = True) -> bytes:
        """One slice as a PNG, windowed, the liver tinted in its colour, the reference outlined."""
        from PIL import Image
        from scipy import ndimage

        image, mask, ref, (pw, ph) = self.plane(plane, index)
        rows, cols = image.shape
        scale = min(pw, ph)
        width, height = cols * pw / scale, rows * ph / scale
        longest = max(width, height)
        fit = min(MAX_SIDE / longest, max(1.0, 384.0 / longest))  # small slices enlarged, big ones capped
        size = (max(1, int(round(width * fit))), max(1, int(round(height * fit))))

        def shown(a):  # a slice at its displayed size (nearest: every screen pixel is one voxel's)
            return np.asarray(Image.fromarray(a).resize(size, Image.NEAREST))

        grey = np.clip((image - (level - window / 2.0)) / max(window, 1e-6), 0.0, 1.0)
        rgb = np.repeat(shown((grey * 255.0).astype(np.float32))[..., None], 3, axis=-1).astype(np.float64)
        if overlay and mask.any():
            alpha = float(np.clip(opacity, 0.0, 1.0))
            big = shown(mask.astype(np.uint8)) > 0
            rgb[big] = (1.0 - alpha) * rgb[big] + alpha * np.asarray(LIVER_RGB, np.float64)
        if reference and ref is not None and ref.any():
            big = shown(ref.astype(np.uint8)) > 0
            rgb[big & ~ndimage.binary_erosion(big)] = REFERENCE_RGB  # a one-pixel outline on screen
        picture = Image.fromarray(np.round(rgb).astype(np.uint8))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        return buf.getvalue()

    def voxel(self, x: int, y: int, z: int) -> dict:
        shape = self.image.shape
        x, y, z = (int(np.clip(v, 0, n - 1)) for v, n in zip((x, y, z), shape))
        mm = self.affine @ np.array([x, y, z, 1.0])
        source = self.to_source @ np.array([x, y, z, 1.0])
        return {"index": [x, y, z], "source_index": [int(round(v)) for v in source[:3]],
                "mm": [round(float(v), 1) for v in mm[:3]], "value": round(float(self.image[x, y, z]), 2),
                "liver": bool(self.mask[x, y, z]),
                "reference": None if self.reference is None else bool(self.reference[x, y, z])}
