"""CHAOS liver segmentation pipeline: prepare -> train -> infer -> evaluate, built on MONAI.

Stages meet only through files on disk; modules import only downward
(config/io/dicom/chaos at the bottom, train/infer/evaluate above, `run.py` on top).
"""
__version__ = "0.1.0"
