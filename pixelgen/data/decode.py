"""Decoding one image–text pair, light enough to import in a decoding worker process.

`to_rgb_square` is the resize every pipeline shares. `decode_pair` turns one raw record of a
streamed shard (image bytes, caption, img2dataset's json metadata) into a training example,
or names the reason it is skipped: the key of `SKIP_REASONS` that the logs count.
No JAX or tfds here: `pixelgen.data.streaming` starts its workers on this module.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
from PIL import Image

# Why a record was not used; every reason has a counter in the logs.
SKIP_REASONS = {
    'corrupt': 'unreadable record or metadata',
    'no_image': 'no image member',
    'undecodable': 'image bytes that do not decode',
    'no_caption': 'missing or empty caption',
    'status': "img2dataset status other than 'success'",
    'caption_length': 'caption outside [min_caption_length, max_caption_length]',
    'aspect_ratio': 'aspect ratio beyond max_aspect_ratio',
    'min_side': 'shorter side below min_image_side',
    'held_out': 'caption with a held-out phrase (data.holdout_phrases), or without one where '
                'only those are kept',
}
IMAGE_FIELDS = ('jpg', 'jpeg', 'png', 'webp')


class DataError(ValueError):
    """A dataset that cannot be read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which streamed pairs to keep (the config's `data.*` keys of the same names).

    min_caption_length / max_caption_length: characters after stripping (max 0 = no limit;
    min 0 keeps images without a caption). max_aspect_ratio: longer side / shorter side
    (2.0 keeps 1:2 to 2:1, as the DALL·E paper; 0 = any). min_image_side: pixels of the
    shorter side before resizing. require_success_status: drop records whose img2dataset json
    `status` is present and not 'success'. exclude_phrases / require_phrases: lowercase
    phrases a kept caption must not contain / must contain one of. image_size: the side of
    the square the image is centre-cropped and resized to (0 = the decoded image as it is).
    """
    image_size: int = 0
    min_caption_length: int = 1
    max_caption_length: int = 0
    max_aspect_ratio: float = 2.0
    min_image_side: int = 0
    require_success_status: bool = True
    exclude_phrases: tuple[str, ...] = ()
    require_phrases: tuple[str, ...] = ()


def to_rgb_square(image: np.ndarray, size: int) -> np.ndarray:
    """Any uint8 image [h, w] / [h, w, 1|3|4] -> [size, size, 3] uint8.

    Grayscale is repeated over RGB, alpha is dropped, non-square images are centre-cropped,
    and the resize averages pixels when shrinking (no aliasing) and is bicubic when growing.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side != size:
        resample = Image.BOX if side > size else Image.BICUBIC
        image = np.asarray(Image.fromarray(image).resize((size, size), resample=resample))
    return image


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def decode_pair(fields: dict, filters: Filters) -> tuple[dict | None, str]:
    """({'image': uint8 [s, s, 3], 'caption': str}, '') or (None, skip reason).

    `fields` maps a member's extension to its bytes (webdataset) or a column to its value
    (parquet): an image under one of IMAGE_FIELDS, the caption under 'txt' (or 'caption'),
    img2dataset's metadata under 'json' (bytes) or as columns ('status'). The checks run
    cheapest first, and the image's size is read from its header before it is decoded;
    JPEGs decode straight at a reduced scale (`Image.draft`) when far larger than needed.
    """
    try:
        meta = json.loads(fields['json']) if fields.get('json') else {}
        status = meta.get('status', fields.get('status'))
        caption = _text(fields.get('txt', fields.get('caption')))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None, 'corrupt'
    if filters.require_success_status and status not in (None, 'success'):
        return None, 'status'
    caption = (caption or '').strip()
    if filters.min_caption_length > 0:
        if not caption:
            return None, 'no_caption'
        if len(caption) < filters.min_caption_length:
            return None, 'caption_length'
    if filters.max_caption_length and len(caption) > filters.max_caption_length:
        return None, 'caption_length'
    if filters.exclude_phrases or filters.require_phrases:
        lower = caption.lower()
        if any(p in lower for p in filters.exclude_phrases) or (
                filters.require_phrases and not any(p in lower for p in filters.require_phrases)):
            return None, 'held_out'
    data = next((fields[k] for k in IMAGE_FIELDS if fields.get(k) is not None), None)
    if data is None:
        return None, 'no_image'
    size = filters.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if filters.min_image_side and min(w, h) < filters.min_image_side:
                return None, 'min_side'
            if filters.max_aspect_ratio and max(w, h) > filters.max_aspect_ratio * min(w, h):
                return None, 'aspect_ratio'
            if image.format == 'JPEG' and size:  # decode at 1/2, 1/4 or 1/8 scale if enough
                image.draft('RGB', (size * w // min(w, h), size * h // min(w, h)))
            array = np.asarray(image.convert('RGB'))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None, 'undecodable'
    return {'image': to_rgb_square(array, size) if size else array, 'caption': caption}, ''
