#!/usr/bin/env python
"""Time prepare's DICOM -> NIfTI per real CHAOS series against dcm2niix on the same series.

    python bench/bench_prepare.py [--data ../shared/data/chaos-real] [--repeats 5]

Columns (median seconds over the repeats): `ours` = read_series + write_nifti of the image
(the work dcm2niix does), `ours+labels` = the whole prepare_case (also Ground PNGs -> label
NIfTI), `dcm2niix` = `dcm2niix -z y -b n` as a subprocess (includes its process start-up).
Ratio = ours / dcm2niix. Both write gzip-compressed NIfTI into a temporary folder.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from pipeline.datasets.chaos import find_cases
from pipeline.datasets.prepare import image_dtype, prepare_case
from pipeline.dicom.series import read_series
from pipeline.dicom.volume import write_nifti

from timing import median_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/chaos-real")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        print("dcm2niix not found on PATH", file=sys.stderr)
        return 1
    cases = find_cases(args.data)
    cfg = Config()
    print(f"{'case':14s} {'shape':>12s} {'ours s':>8s} {'ours+labels s':>14s} {'dcm2niix s':>11s} {'ratio':>6s}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        for case in cases:
            def ours(case=case):
                vol, geo = read_series(case.dicom_dir)
                write_nifti(tmp / "ours.nii.gz", vol, geo.affine, image_dtype(vol))
                return vol.shape

            def ours_full(case=case):
                prepare_case(case, tmp / "full", cfg, fold=0)

            def reference(case=case):
                out = tmp / "d2n"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                subprocess.run([dcm2niix, "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(case.dicom_dir)],
                               check=True, capture_output=True)

            shape = ours()  # warm the file cache for both contenders
            reference()
            t_ours = median_time(ours, args.repeats)
            t_full = median_time(ours_full, args.repeats)
            t_ref = median_time(reference, args.repeats)
            ratios.append(t_ours / t_ref)
            print(f"{case.case:14s} {'x'.join(map(str, shape)):>12s} {t_ours:8.3f} {t_full:14.3f} {t_ref:11.3f} "
                  f"{t_ours / t_ref:6.2f}")
    print(f"median ratio ours/dcm2niix over {len(ratios)} series: {float(np.median(ratios)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
