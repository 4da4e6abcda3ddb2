"""What leaves the pipeline for other tools: DICOM SEG, RTSTRUCT, exported models and MONAI bundles."""
