"""Reading query images of any common mode and size into RGB, with clear errors for the rest."""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, InvalidInput
from .limits import MAX_UPLOAD_BYTES, check_pixels

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


def _open_file(path: Path, label: str):
    """A handle on a regular file within the byte limit; folders, devices and FIFOs are refused unopened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{label}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label}: not a regular file")
    if info.st_size > MAX_UPLOAD_BYTES:
        raise ImageError(f"{label}: file larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ImageError(f"{label}: cannot read ({exc.strerror})") from None


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """An RGB image from a path or bytes; ImageError saying why when it cannot be read.

    The pixel limit is checked from the header before decoding; PIL's global bomb limit is left alone
    (changing it from a request thread would change it for every other thread too).
    """
    label = name or (Path(source).name if not isinstance(source, bytes) else "uploaded image")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label}: empty file")
        if len(source) > MAX_UPLOAD_BYTES:
            raise ImageError(f"{label}: larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
        handle = io.BytesIO(source)
    else:
        handle = _open_file(Path(source), label)
    try:
        with handle, Image.open(handle) as image:
            try:
                check_pixels(*image.size, label=label)
            except InvalidInput as exc:
                raise ImageError(str(exc)) from None
            image.draft("RGB", (WORKING_SIZE, WORKING_SIZE))  # JPEG: decode large files at reduced size
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image file PIL can read") from exc
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: image too large (over PIL's decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            f"{label}: unreadable or truncated image ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from exc


def png_bytes(image: Image.Image | np.ndarray, size: int | None = None) -> bytes:
    """An image (or an RGB uint8 array, e.g. a spec thumbnail) as PNG bytes, shrunk to fit ``size`` px if given."""
    image = Image.fromarray(image, "RGB") if isinstance(image, np.ndarray) else image.convert("RGB")
    if size:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: Image.Image | np.ndarray, size: int | None = None) -> str:
    """:func:`png_bytes` as a ``data:`` URI, for HTML that cannot fetch a route (reports, the A1111 tab)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, size)).decode("ascii")
