"""InPlaneResampled: what Orientationd + Spacingd + ResizeWithPadOrCropd compute, and their inverse."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from pipeline.model.resample import InPlaneResampled, _monai_steps

ROI = (24, 20)


def _affine(spacing, flips=(False, False, False), permute=False):
    a = np.diag([*spacing, 1.0])
    for axis, flip in enumerate(flips):
        if flip:
            a[axis, axis] *= -1
    if permute:  # a coronal series: the stored axes are not the patient's R-L / A-P
        a[:3, :3] = a[:3, [0, 2, 1]]
    a[:3, 3] = [12.0, -30.0, 55.0]
    return a


def _oblique():
    a, b = np.deg2rad(12.0), np.deg2rad(7.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]]) @ \
        np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.9, 0.75, 3.5])
    affine[:3, 3] = [40.0, -12.0, 8.0]
    return affine


CASES = {
    "RAS": (_affine((0.8, 0.7, 3.0)), 1.6),  # finer than the target: shrinks, padded to the roi
    "LPS-like flips": (_affine((0.8, 0.7, 3.0), (True, True, False)), 1.6),
    "all flipped": (_affine((0.9, 0.6, 4.0), (True, False, True)), 0.5),  # coarser: grows, cropped
    "permuted (MONAI's own steps)": (_affine((0.8, 0.7, 3.0), permute=True), 1.6),
    "oblique": (_oblique(), 1.4),  # axes tilted ~12 degrees, as T2-SPIR series often are
}


def _volume(shape=(40, 36, 7), seed=0):
    rng = np.random.default_rng(seed)
    return np.asfortranarray(rng.normal(100.0, 30.0, shape).astype(np.float32))


def _both(volume, affine, spacing):
    def image():
        return MetaTensor(torch.as_tensor(volume[None]), affine=torch.as_tensor(affine))

    ref_chain, fast_chain = Compose(_monai_steps(spacing, ROI)), Compose([InPlaneResampled("image", spacing, ROI)])
    return ref_chain, ref_chain({"image": image()})["image"], fast_chain, fast_chain({"image": image()})["image"]


def _invert(chain, image, probs):
    pred = MetaTensor(probs.clone(), meta=image.meta, applied_operations=list(image.applied_operations))
    return Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)({"pred": pred, "image": image})["pred"]


def _liver_like(shape) -> torch.Tensor:
    grid = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    return torch.clamp(1.3 - 2.0 * sum(g ** 2 for g in grid), 0, 1)[None]


def _case(name):
    """(volume, its affine, MONAI's chain, its image, InPlaneResampled's chain, its image) of CASES[name]."""
    affine, spacing = CASES[name]
    volume = _volume()
    return (volume, affine, *_both(volume, affine, spacing))


def _boxed_and_full(ref_chain, ref, fast_chain, fast, probs) -> tuple[np.ndarray, np.ndarray]:
    """(InPlaneResampled's boxed mask of `probs`, the threshold of MONAI's full inversion of them)."""
    full = np.asarray(_invert(ref_chain, ref, probs)[0]) >= 0.5
    pred = MetaTensor(probs.clone(), meta=fast.meta, applied_operations=list(fast.applied_operations))
    return fast_chain.transforms[0].inverse_mask(pred, 0.5), full


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_image_on_the_models_grid_is_monais_to_float_rounding(name):
    _, _, _, ref, _, fast = _case(name)
    assert tuple(fast.shape) == tuple(ref.shape) and tuple(fast.shape[1:3]) == ROI
    assert np.allclose(np.asarray(fast.affine), np.asarray(ref.affine), atol=1e-6)
    assert torch.allclose(fast.as_tensor(), ref.as_tensor(), atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_probabilities_go_back_as_monais_invertd_takes_them(name):
    volume, affine, ref_chain, ref, fast_chain, fast = _case(name)
    probs = _liver_like(ref.shape[1:])
    back_ref, back_fast = _invert(ref_chain, ref, probs), _invert(fast_chain, fast, probs)
    assert tuple(back_fast.shape) == tuple(back_ref.shape) == (1, *volume.shape)
    assert np.allclose(np.asarray(back_fast.affine), affine, atol=1e-6)
    assert torch.allclose(back_fast.as_tensor(), back_ref.as_tensor(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_boxed_mask_is_the_threshold_of_the_full_inverse(name):
    volume, _, ref_chain, ref, fast_chain, fast = _case(name)
    probs = _liver_like(ref.shape[1:])
    mask, full = _boxed_and_full(ref_chain, ref, fast_chain, fast, probs)
    assert mask.shape == volume.shape and full.any() and not full.all()
    assert np.array_equal(mask, full)
    pred = MetaTensor(torch.zeros_like(probs), meta=fast.meta, applied_operations=list(fast.applied_operations))
    assert not fast_chain.transforms[0].inverse_mask(pred, 0.5).any()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("series, spacing", [("CT/3/DICOM_anon", 2.33), ("MR/1/T2SPIR/DICOM_anon", 2.0)])
def test_real_series_resample_and_invert_as_monai_does(real_chaos, series, spacing):
    from pipeline.dicom.volume import read_dicom_series

    vol = read_dicom_series(real_chaos / "Train_Sets" / series)
    ref_chain, ref, fast_chain, fast = _both(vol.array, vol.affine, spacing)
    assert torch.allclose(fast.as_tensor(), ref.as_tensor(), atol=1e-3)
    assert np.array_equal(*_boxed_and_full(ref_chain, ref, fast_chain, fast, _liver_like(ref.shape[1:])))
