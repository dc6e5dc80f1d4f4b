"""Pictures of a visual concept the tiny ViLT cannot know: a square in one of eight colours that are not
among its answers (``mmdemo.tiny.common.VQA_ANSWERS``), of random size and place, on a light ground."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

QUESTION = "what colour is the square?"
COLOURS = {"purple": (128, 0, 128), "orange": (255, 140, 0), "pink": (255, 105, 180), "brown": (120, 70, 20),
           "grey": (128, 128, 128), "cyan": (0, 200, 200), "yellow": (240, 230, 20), "navy": (0, 0, 110)}


def square(colour: str, rng: random.Random) -> Image.Image:
    """A 32 px picture: a square of ``colour`` (shade jittered), of random size and place, on a light ground."""
    image = Image.new("RGB", (32, 32), (rng.randint(200, 255),) * 3)
    side = rng.randint(12, 22)
    x, y = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
    shade = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLOURS[colour])
    image.paste(shade, (x, y, x + side, y + side))
    return image


def colour_of(picture: Image.Image) -> str:
    """The colour of the square: its darkest pixel (the ground is lighter than every colour), named."""
    pixel = min(picture.convert("RGB").getdata(), key=sum)
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], pixel)))


def pictures(folder: Path, per_colour: int, seed: int) -> list[tuple[Path, str]]:
    """``per_colour`` PNG files of each colour in a new ``folder`` (named by their colour), with their colour."""
    folder.mkdir()
    rng = random.Random(seed)
    made = []
    for n in range(per_colour * len(COLOURS)):
        colour = list(COLOURS)[n % len(COLOURS)]
        path = folder / f"{n:03d}-{colour}.png"
        square(colour, rng).save(path)
        made.append((path, colour))
    return made
