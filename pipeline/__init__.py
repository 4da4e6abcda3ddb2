"""CHAOS liver segmentation pipeline: prepare -> train -> infer -> evaluate, built on MONAI.

One package per stage; each imports only from the packages below it (the contract in
`.importlinter`, checked by tests/test_layers.py):

    api, app            the Python entry point; the CLI's body, compare, demo, report, viewer
    infer | train       one volume -> mask, writers, shards | the loop, folds, budget, tracking
    outputs             DICOM SEG, RTSTRUCT, exported models and bundles
    model               networks, transforms, slice-wise prediction, post-processing
    evaluate            metrics and evaluation
    datasets            CHAOS, MSD / nnU-Net, pairs, splits, prepare, the synthetic generator
    dicom               volumes with their geometry: DICOM series, multi-frame, studies, NIfTI
    core                config, errors, console, labels, device, files, the run folder's layout

Stages meet only through files on disk (prepared folder, run folder, inference folder).
"""
__version__ = "0.1.0"
