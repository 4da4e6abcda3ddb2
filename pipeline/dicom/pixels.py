"""Pixel data of single-frame DICOM files: decoded, modality rescale applied, float32 in NIfTI order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UncompressedTransferSyntaxes

from pipeline.core.errors import PipelineError
from pipeline.dicom.geometry import to_nifti_slice


def read_pixels_in_order(files: list[Path], rows: int, cols: int,
                          datasets: list[pydicom.Dataset] | None = None) -> np.ndarray:
    """Pixels of `files` (already in slice order), modality rescale applied, float32 (cols, rows, slices).

    Uncompressed files already read whole (`datasets`, from the header pass) are stacked from
    memory: one pass over the files instead of two. Compressed transfer syntaxes go to SimpleITK (GDCM,
    C++), which decodes them several times faster than pydicom file by file; it is handed our
    slice order, and the geometry stays ours (from the pydicom headers). Where it fails, pydicom
    reads file by file, so the error names the file.
    """
    if datasets is not None and all(_is_plain_image(ds) for ds in datasets):
        stack = np.empty((len(files), rows, cols), dtype=np.float32)
        for k, (path, ds) in enumerate(zip(files, datasets)):
            read_pixels(path, rows, cols, ds, out=stack[k, ::-1, :])  # to_nifti_slice's row flip, in place
        return stack.transpose(2, 1, 0)  # (X, Y, Z), Fortran-ordered like NIfTI on disk
    import SimpleITK as sitk

    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own spacing checks: ours come first
    try:
        image = sitk.ReadImage([str(f) for f in files], sitk.sitkFloat32)
        stack = sitk.GetArrayViewFromImage(image)  # (slices, rows, cols) as stored
        if stack.shape == (len(files), rows, cols):
            # to_nifti_slice per slice; the (X, Y, Z) result is a view of the C-ordered (Z, Y, X) copy,
            # i.e. Fortran-ordered like NIfTI on disk: no transposing copy here or in nibabel's writer
            return np.ascontiguousarray(stack[:, ::-1, :]).transpose(2, 1, 0)
    except RuntimeError:
        pass
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    volume = np.empty((cols, rows, len(files)), dtype=np.float32, order="F")
    for k, path in enumerate(files):
        volume[:, :, k] = to_nifti_slice(read_pixels(path, rows, cols))
    return volume


def _is_plain_image(ds: pydicom.Dataset) -> bool:
    """Pixel data in memory, uncompressed, one sample per pixel, rescale by slope/intercept only."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return ("PixelData" in ds and syntax in UncompressedTransferSyntaxes
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and "ModalityLUTSequence" not in ds)


# Little-endian uncompressed transfer syntaxes: the pixel data is the array's bytes as they are.
_NATIVE_LITTLE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def stored_pixels(ds: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    """`ds.pixel_array` of a single-frame, single-sample image.

    Little-endian uncompressed data is viewed as the array directly, with what pydicom does to it
    (bits above BitsStored masked off, or sign-extended when signed). pydicom 3's pixel_array
    resolves and validates its decoder options on every call, a noticeable part of reading a CT
    series, for what is a view of the bytes here. Anything else goes to pydicom.
    tests/test_dicom.py compares both on the bit patterns that matter.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (syntax not in _NATIVE_LITTLE or allocated not in (8, 16, 32) or not 0 < stored <= allocated
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or "PixelData" not in ds or len(ds.PixelData) < rows * cols * allocated // 8):
        return ds.pixel_array
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < allocated:
        unused = allocated - stored
        arr = (arr << unused) >> unused if signed else arr & ((1 << stored) - 1)
    return arr


def read_pixels(path: Path, rows: int, cols: int, ds: pydicom.Dataset | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels with the modality rescale applied, float32 rows x cols (pydicom).

    `ds`: the file already read whole. Slope and intercept are applied here as pydicom's
    apply_modality_lut does (float64, then float32) at half its cost; LUTs go to pydicom.
    `out`: a float32 rows x cols array (a view into the volume being stacked) to write into.
    """
    out = np.empty((rows, cols), dtype=np.float32) if out is None else out
    try:
        if ds is None or "PixelData" not in ds:
            ds = pydicom.dcmread(path)
        arr = stored_pixels(ds, rows, cols)
        if arr.shape != (rows, cols):
            raise PipelineError(f"{path}: pixel data has shape {arr.shape}, expected {(rows, cols)}")
        if "ModalityLUTSequence" in ds:
            out[...] = apply_modality_lut(arr, ds)
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            if slope == 1.0 and intercept.is_integer() and arr.dtype.itemsize <= 2 and abs(intercept) < 2**23:
                # integers below 2**24 throughout (CT's usual case): float32 is exact, so the values
                # are cast into `out` and shifted there, no float64 copy and no temporary
                out[...] = arr
                out += np.float32(intercept)
            else:
                out[...] = arr * slope + intercept
        else:
            out[...] = arr
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's and the decoders' errors for damaged pixels have no common base
        raise PipelineError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from None
    return out
