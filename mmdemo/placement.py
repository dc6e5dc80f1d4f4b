"""Where a model runs: :class:`Placement` (device and dtype), and choosing them.

A leaf module (no torch at import): the registry, the tasks and the fine-tuning code all speak of
placements, none of them owns the notion.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import MMDemoError


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model runs."""

    device: str  # "cuda", "cuda:1", "mps" or "cpu"
    dtype: str  # "float32", "float16" or "bfloat16"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def detect_device(preference: str = "auto") -> str:
    """CUDA, then Apple MPS, then CPU; an explicit choice is checked, not silently replaced."""
    import torch

    if preference == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise MMDemoError("Device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu.")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MMDemoError("Device 'mps' was requested but Apple MPS is not available; use --device auto or cpu.")
    return preference


def default_dtype(device: str) -> str:
    """bf16 on GPUs that support it, else fp16 on GPUs; fp32 on CPU."""
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def model_concurrency(settings: Settings) -> int:
    """Model calls run at once: ``settings.concurrency``, or when 0: 1 on a GPU, 2 on CPU.

    Decided without importing torch (seconds at start-up): an explicit device says it; for ``auto``
    an NVIDIA driver or Apple silicon counts as a GPU. The registry still picks the real device.
    """
    if settings.concurrency > 0:
        return settings.concurrency
    if settings.device != "auto":
        return 2 if settings.device == "cpu" else 1
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    nvidia = not hidden and (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists())
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return 1 if nvidia or apple else 2
