"""Reading query images of any common mode and size into RGB, with clear errors for the rest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 16384 * 16384  # larger than any sane render; PIL's bomb check still guards beyond it
WORKING_SIZE = 1024  # CLIP sees 224 px; bigger images are downscaled once, early


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for CLIP: alpha composited on white, 16/32-bit and float images rescaled, not clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if image.mode.startswith("I;16") or arr.max() > 255 else (0.0, 255.0)
        if image.mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr = np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    if max(image.size) > WORKING_SIZE:
        image.thumbnail((WORKING_SIZE, WORKING_SIZE), Image.LANCZOS)
    return image


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """An RGB image from a path or bytes; ImageError saying why when it cannot be read."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{label}: empty file")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{label}: no such file")
            handle = open(path, "rb")
        with handle, Image.open(handle) as image:
            image.draft("RGB", (WORKING_SIZE, WORKING_SIZE))  # JPEG: decode large files at reduced size
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image file PIL can read") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: unreadable or truncated image ({exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
