"""Class names and colour palettes of the supported datasets.

A palette is a list of ``(r, g, b)`` triples indexed by class id; it is written into mode "P" PNGs so that
label files open as colour images in any viewer while keeping the class indices as pixel values.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from emanet.errors import DataError
from emanet.fields import read_utf8

Palette = list[tuple[int, int, int]]

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE: Palette = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]

# Cityscapes labelIds of the 19 evaluated classes, in trainId order (trainId = position in this tuple).
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# ADE20K SceneParsing (ADEChallengeData2016) class names after "reduce zero label" (index 0 = wall).
ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
assert len(ADE20K_CLASSES) == 150


def voc_palette(n: int = 256) -> Palette:
    """The PASCAL VOC colour map: the bits of the class id are dealt out to R, G, B from the top bit down.

    Bit 3j of the id goes to bit 7-j of red, bit 3j+1 to green, bit 3j+2 to blue, so ids 1, 2, 3 are
    dark red, dark green, dark yellow, ... and every id below 256 gets a distinct colour.
    """
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def distinct_palette(n: int) -> Palette:
    """``n`` deterministic, well-separated colours (golden-ratio hue steps, alternating value/saturation)."""
    palette = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.95, 0.65, 0.8)[i % 3]
        val = (0.95, 0.7, 0.55, 0.85)[(i // 3) % 4]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        palette.append((round(r * 255), round(g * 255), round(b * 255)))
    return palette


VOC_PALETTE: Palette = voc_palette(len(VOC_CLASSES))
ADE20K_PALETTE: Palette = distinct_palette(len(ADE20K_CLASSES))


def flat_palette(palette: Palette) -> list[int]:
    """The 768-entry list that ``PIL.Image.putpalette`` expects (unused entries are black)."""
    flat = [v for rgb in palette[:256] for v in rgb]
    return flat + [0] * (768 - len(flat))


def read_text_file(path: str | Path) -> str:
    """A text file of a dataset (class list, palette, split list), which must be UTF-8: a DataError names the
    file and the offending byte otherwise."""
    return read_utf8(path, lambda reason: DataError(path, reason, kind="layout"))


def read_palette_file(path: str | Path) -> Palette:
    """Read one ``r g b`` triple (0..255, spaces or commas) per non-empty line."""
    palette = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.replace(",", " ").split()
        try:
            rgb = tuple(int(p) for p in parts)
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            reason = f"line {lineno}: expected 'r g b' with integers 0..255, got {line.strip()!r}"
            raise DataError(path, reason, kind="layout")
        palette.append(rgb)
    return palette


def index_image(label: np.ndarray, palette: Palette) -> Image.Image:
    """A (H, W) uint8 array of class indices as a mode "P" PIL image carrying ``palette``."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    img = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    img.putpalette(flat_palette(palette))
    return img
