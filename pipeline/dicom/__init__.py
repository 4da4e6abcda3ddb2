"""Volumes with their geometry: DICOM series (single- and multi-frame), study scanning, NIfTI."""
