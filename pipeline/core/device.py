"""Where and in which precision the network runs: device choice and autocast."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pipeline.core.errors import PipelineError


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device (the config checked its form)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"config device: {spec!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"config device: {spec!r} requested but MPS is not available")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX). Elsewhere oneDNN emulates bf16,
    slower than float32, so infer's "auto" keeps float32 there."""
    try:  # private torch helpers (torch.cpu._is_*_supported); if they are gone, assume no
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_amp(amp: str, device: torch.device) -> str:
    """infer.amp with "auto" resolved: bf16 on CPUs with native bf16 (same Dice as float32 on
    held-out data, and faster: docs/decisions.md#inference-precision), otherwise left to `amp_dtype`'s "auto"."""
    if amp == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return amp


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for `amp` (auto | native_bf16 | bf16 | fp16 | off) on `device`, or None for float32.

    "auto" is fp16 CUDA AMP on GPU and float32 on CPU (inference resolves it with `inference_amp`
    first). bf16 training on CPU is opt-in (train.amp=bf16): faster, with a cross-validated Dice
    within noise of float32's, but not yet the default. "native_bf16" is bf16 on CPUs with
    AVX512-BF16/AMX and "auto" elsewhere: emulated bf16 is several times slower than float32
    (docs/decisions.md#training-precision).
    """
    if amp == "off":
        return None
    if amp == "native_bf16":  # bf16 only where the CPU computes it natively; elsewhere as "auto"
        amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "auto"
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp mode {amp!r} is not one of auto | native_bf16 | bf16 | fp16 | off")


@contextlib.contextmanager
def autocast_context(device: torch.device, amp: str) -> Iterator[None]:
    """torch.autocast for `amp` on `device`; a no-op when that resolves to float32."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
