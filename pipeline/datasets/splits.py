"""Seeded patient-level k-fold assignment: every sequence of a patient lives in one fold."""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


def assign_folds(patients: Iterable[str], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """{patient id: fold in 0..n_folds-1}, deterministic for (set of patients, n_folds, seed).

    Stratified by modality (the id prefix before '_', e.g. CT_3 -> CT): each modality's patients
    are shuffled and dealt round-robin, continuing the deal across modalities, so fold sizes
    differ by at most one and CT and MR patients spread over the folds.
    """
    if n_folds < 1:
        raise PipelineError(f"prepare.folds must be at least 1, got {n_folds}")
    unique = sorted(set(patients))  # input order must not change the result
    if len(unique) < n_folds:
        log.warning("%d patients for %d folds: some folds will have no validation patient", len(unique), n_folds)
    rng = np.random.default_rng(seed)
    by_modality: dict[str, list[str]] = {}
    for patient in unique:
        by_modality.setdefault(patient.split("_")[0], []).append(patient)
    folds: dict[str, int] = {}
    dealt = 0
    for modality in sorted(by_modality):
        group = by_modality[modality]
        for i in rng.permutation(len(group)):
            folds[group[int(i)]] = dealt % n_folds
            dealt += 1
    return folds
