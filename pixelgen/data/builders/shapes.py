"""`shapes`: procedurally drawn 64x64 coloured shapes with captions, built offline by tfds.

Each example is a pure function of (split, index) (`make_example`), so every build yields the
same records, PNG bytes included (the ArrayRecord files themselves are not byte-identical:
protobuf serializes each tf.Example's feature map in a per-process order). Captions serve
text-to-image models ("a large blue star to the left of a small yellow square");
`label` (the first object's shape) serves classification and zero-shot CLIP.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'star')
COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white')
SIZES = ('small', 'large')
RELATIONS = ('to the left of', 'to the right of', 'above', 'below')

IMAGE_SIZE = 64
SEED = 0
SPLIT_IDS = {'train': 0, 'test': 1}
# Nominal RGB of each colour name; each object jitters every channel by up to COLOR_JITTER.
PALETTE = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (40, 90, 235),
    'yellow': (240, 220, 40),
    'purple': (140, 50, 205),
    'orange': (245, 135, 25),
    'white': (240, 240, 240),
}
COLOR_JITTER = 8
# Neutral tones, three dark and one light grey; all stay >= 110 RGB units from every colour,
# so no colour name is ever paired with a background it blends into.
BACKGROUNDS = ((16, 16, 16), (46, 46, 50), (64, 58, 52), (172, 172, 176))
# Half-extent (pixels) of an object's bounding box, per size name.
RADII = {'small': (6.0, 8.0), 'large': (11.0, 14.0)}
TWO_OBJECT_PROB = 0.3
MARGIN = 1.0  # pixels kept clear at the image border
GAP = 4.0  # minimum pixels between the bounding boxes of two objects
SUPERSAMPLE = 4  # draw at 4x and box-filter down for anti-aliased edges


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object; (cx, cy) is its centre in pixels (y points down)."""

    shape: str
    color: str
    size: str
    radius: float
    cx: float
    cy: float
    rgb: tuple[int, int, int]

    def phrase(self) -> str:
        return f'a {self.size} {self.color} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one example."""

    background: tuple[int, int, int]
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase()
        a, b = self.objects
        return f'{a.phrase()} {relation(a, b)} {b.phrase()}'


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`, judged along the axis on which they are further apart."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return 'to the left of' if dx > 0 else 'to the right of'
    return 'above' if dy > 0 else 'below'


def _sample_object(rng: np.random.Generator) -> tuple[str, str, str, float, tuple[int, ...]]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    size = SIZES[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*RADII[size]))
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    rgb = tuple(int(c) for c in np.clip(np.add(PALETTE[color], jitter), 0, 255))
    return shape, color, size, radius, rgb


def _place_pair(rng: np.random.Generator, r1: float, r2: float) -> tuple[float, ...]:
    """Centres (x1, y1, x2, y2) of two boxes of half-extents r1, r2, separated by >= GAP.

    Along a random main axis the boxes are disjoint; across it the centres differ by at most
    half the main-axis distance, so `relation` is never ambiguous. Both stay inside the image:
    the radii in RADII leave room for two large boxes, and 3 * min_r + GAP >= max_r keeps the
    cross-axis interval non-empty.
    """
    lo_first = bool(rng.random() < 0.5)  # object 1 at the lower coordinate (left / top)?
    r_lo, r_hi = (r1, r2) if lo_first else (r2, r1)
    lo = rng.uniform(MARGIN + r_lo, IMAGE_SIZE - MARGIN - 2 * r_hi - GAP - r_lo)
    hi = rng.uniform(lo + r_lo + GAP + r_hi, IMAGE_SIZE - MARGIN - r_hi)
    main1, main2 = (lo, hi) if lo_first else (hi, lo)
    half = (hi - lo) / 2
    cross1 = rng.uniform(MARGIN + r1, IMAGE_SIZE - MARGIN - r1)
    cross2 = rng.uniform(
        max(MARGIN + r2, cross1 - half), min(IMAGE_SIZE - MARGIN - r2, cross1 + half)
    )
    if rng.random() < 0.5:  # horizontal main axis
        return main1, cross1, main2, cross2
    return cross1, main1, cross2, main2


def sample_scene(split: str, index: int) -> Scene:
    """The scene of example `index` of `split`, from an RNG seeded by (SEED, split, index)."""
    rng = np.random.default_rng([SEED, SPLIT_IDS[split], index])
    num_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    specs = [_sample_object(rng) for _ in range(num_objects)]
    if num_objects == 1:
        r = specs[0][3]
        centres = [tuple(rng.uniform(MARGIN + r, IMAGE_SIZE - MARGIN - r, size=2))]
    else:
        x1, y1, x2, y2 = _place_pair(rng, specs[0][3], specs[1][3])
        centres = [(x1, y1), (x2, y2)]
    objects = tuple(
        Obj(shape, color, size, radius, float(cx), float(cy), rgb)
        for (shape, color, size, radius, rgb), (cx, cy) in zip(specs, centres, strict=True)
    )
    return Scene(background=background, objects=objects)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a triangle, diamond or star inscribed in the box of half-extent r."""
    if shape == 'triangle':  # upright, near-equilateral (height 1.75 r, base 2 r)
        return [(cx, cy - r), (cx + r, cy + 0.75 * r), (cx - r, cy + 0.75 * r)]
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'star':  # five points, first one straight up
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))
    raise ValueError(f'no outline for shape {shape!r}')


def _draw(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    s = SUPERSAMPLE
    cx, cy, r = obj.cx * s, obj.cy * s, obj.radius * s

    def box(hw: float, hh: float) -> list[int]:
        # Integer corners so the result does not depend on PIL's float rounding rules.
        return [round(cx - hw), round(cy - hh), round(cx + hw) - 1, round(cy + hh) - 1]

    if obj.shape == 'circle':
        draw.ellipse(box(r, r), fill=obj.rgb)
    elif obj.shape == 'square':  # 0.85 r so its area is close to the circle's
        draw.rectangle(box(0.85 * r, 0.85 * r), fill=obj.rgb)
    elif obj.shape == 'cross':
        draw.rectangle(box(r, 0.36 * r), fill=obj.rgb)
        draw.rectangle(box(0.36 * r, r), fill=obj.rgb)
    else:
        points = [(round(x), round(y)) for x, y in _outline(obj.shape, cx, cy, r)]
        draw.polygon(points, fill=obj.rgb)


def render(scene: Scene) -> np.ndarray:
    """Draws `scene`; returns uint8 RGB of shape (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new('RGB', (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj)
    # BOX = exact 4x4 area average: anti-aliased edges, no ringing, deterministic.
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


def make_example(split: str, index: int) -> dict[str, Any]:
    """Feature dict of one example, with `image` as a uint8 (64, 64, 3) array (not yet PNG)."""
    scene = sample_scene(split, index)
    first = scene.objects[0]
    return {
        'image': render(scene),
        'caption': scene.caption(),
        'label': SHAPES.index(first.shape),
        'shape': SHAPES.index(first.shape),
        'color': COLORS.index(first.color),
        'size': SIZES.index(first.size),
        'num_objects': len(scene.objects),
    }


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array; tfds Image needs bytes without TF."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Coloured shapes on neutral backgrounds, with captions; see the module docstring.

    Examples are stored in generation order (`disable_shuffling`), so record i of a split is
    `make_example(split, i)`. Shrink a build with `DownloadConfig(max_examples_per_split=N)`
    or by overriding NUM_EXAMPLES.
    """

    name = 'shapes'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    NUM_EXAMPLES = {'train': 10_000, 'test': 1_000}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(
                    shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'
                ),
                'caption': tfds.features.Text(),
                'label': tfds.features.ClassLabel(names=SHAPES),
                'shape': tfds.features.ClassLabel(names=SHAPES),
                'color': tfds.features.ClassLabel(names=COLORS),
                'size': tfds.features.ClassLabel(names=SIZES),
                'num_objects': tfds.features.Scalar(np.int32),
            }),
            supervised_keys=('image', 'label'),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # everything is generated
        return {split: self._generate_examples(split, n) for split, n in self.NUM_EXAMPLES.items()}

    def _generate_examples(self, split: str, num_examples: int):
        for i in range(num_examples):
            example = make_example(split, i)
            example['image'] = png_bytes(example['image'])
            yield f'{split}_{i:06d}', example
