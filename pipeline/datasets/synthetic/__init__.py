"""The synthetic CHAOS generator: anatomy, rendering to CT / MR, writing DICOM series and Ground PNGs."""
