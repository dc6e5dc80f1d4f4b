"""Augmentations of training batches, seeded by the run: images (crop, flip, colour jitter) and audio
(speed, noise, SpecAugment-style masking). Each task's adapter says which it can use
(:attr:`FinetuneAdapter.augmentations`) and which are safe by default; the training loop applies them to
training batches only, never to validation or evaluation.

Every random draw comes from the generator the loop passes (seeded from the run's seed), so a run
with augmentation is as reproducible as one without.
"""

from __future__ import annotations

import io
import math
from typing import Any

IMAGE_AUGMENTATIONS = ("crop", "flip", "colour")
AUDIO_AUGMENTATIONS = ("speed", "noise", "specaugment")

CROP_AREA = (0.7, 1.0)        # share of the image a crop keeps, then resized back to the image's size
COLOUR_JITTER = 0.2           # brightness, contrast and saturation each scaled by 1 +- this
SPEED = (0.9, 1.1)            # playback speed factor (pitch follows, as in Kaldi's speed perturbation)
NOISE_SNR_DB = (20.0, 40.0)   # white noise this many dB below the signal
MASK_FREQUENCY = 0.1          # SpecAugment: one band of up to 10% of the mel bins ...
MASK_TIME = 0.05              # ... and one span of up to 5% of the frames, per example


def uniform(generator: Any, low: float = 0.0, high: float = 1.0) -> float:
    import torch

    return low + (high - low) * float(torch.rand((), generator=generator))


def augment_images(images: list[Any], ops: tuple[str, ...], generator: Any) -> list[Any]:
    """``images`` (PIL) with the image augmentations among ``ops`` applied, each drawn anew per image."""
    from PIL import Image, ImageEnhance, ImageOps

    augmented = []
    for image in images:
        image = image.convert("RGB")
        if "crop" in ops:
            width, height = image.size
            side = math.sqrt(uniform(generator, *CROP_AREA))  # the same share of each side
            crop_w, crop_h = max(1, round(width * side)), max(1, round(height * side))
            left = int(uniform(generator) * (width - crop_w + 1))
            top = int(uniform(generator) * (height - crop_h + 1))
            image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        if "flip" in ops and uniform(generator) < 0.5:
            image = ImageOps.mirror(image)
        if "colour" in ops:
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhancer(image).enhance(uniform(generator, 1 - COLOUR_JITTER, 1 + COLOUR_JITTER))
        augmented.append(image)
    return augmented


def augment_waveform(samples: Any, ops: tuple[str, ...], generator: Any) -> Any:
    """A mono float waveform (numpy) sped up or slowed down and/or with white noise added."""
    import numpy as np

    samples = np.asarray(samples, dtype=np.float32)
    if "speed" in ops and samples.size > 1:
        factor = uniform(generator, *SPEED)
        length = max(1, round(samples.size / factor))
        samples = np.interp(np.linspace(0, samples.size - 1, length), np.arange(samples.size), samples)
        samples = samples.astype(np.float32)
    if "noise" in ops and samples.size:
        import torch

        power = float(np.mean(samples ** 2)) or 1e-8
        snr = uniform(generator, *NOISE_SNR_DB)
        noise = torch.randn(samples.size, generator=generator).numpy() * math.sqrt(power / 10 ** (snr / 10))
        samples = (samples + noise).astype(np.float32)
    return samples


def wav_bytes(samples: Any, sampling_rate: int) -> bytes:
    """A waveform as the bytes of a WAV file (how exported audio rows carry it)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sampling_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def mask_features(features: Any, generator: Any) -> Any:
    """SpecAugment-style: per example, one band of mel bins and one span of frames set to its mean."""
    masked = features.clone()
    bins, frames = features.shape[-2], features.shape[-1]
    for example in masked:
        fill = example.mean()
        width = int(uniform(generator) * MASK_FREQUENCY * bins)
        start = int(uniform(generator) * (bins - width + 1))
        example[start:start + width, :] = fill
        width = int(uniform(generator) * MASK_TIME * frames)
        start = int(uniform(generator) * (frames - width + 1))
        example[:, start:start + width] = fill
    return masked
