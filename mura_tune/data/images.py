"""Decode one radiograph and preprocess it: grayscale, letterbox to a square, resize.

This is the only place pixels are prepared, so the decoded cache and any uncached path give
pixel-identical inputs. Normalisation and the 3-channel replication happen on tensors, at
batch time (see :mod:`mura_tune.train.augment`).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

#: Bump when preprocessing changes: it is part of every cache key.
PREPROCESS_VERSION = 1
#: Refuse images above this many pixels (decompression bombs); MURA's largest is ~0.3 MP.
MAX_PIXELS = 40_000_000
#: Refuse images with a side above this or a more extreme aspect ratio: letterboxing squares the
#: long side, so a 1 x 1,000,000 image (1 MP, legal by pixels) would need a terabyte.
MAX_SIDE = 10_000
MAX_ASPECT = 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(Exception):
    """An image that cannot be used; ``str(exc)`` says why in a few words."""


def load_gray(path: str | Path) -> np.ndarray:
    """Decode a PNG to a 2-D uint8 array.

    Grayscale is kept; RGB, RGBA and palette images are converted to luminance (alpha dropped);
    16-bit images are rescaled to 8 bits by their maximum. :func:`inspect_image` says which
    conversion an image needed (``data summary`` reports them as notes).

    Raises:
        ImageReadError: empty, not a PNG, truncated/undecodable, animated, or past a size limit
            (``MAX_PIXELS``, ``MAX_SIDE``, ``MAX_ASPECT``).
    """
    return _decode(path)[0]


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, read before any decoder sees the file."""
    if len(head) >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _decode(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Decode ``path``; return the uint8 array and a note on the conversion it needed (or None)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except IsADirectoryError:
        raise ImageReadError("is a folder, not a file") from None
    except OSError as exc:
        raise ImageReadError(f"cannot open ({exc.strerror})") from None
    if not head:
        raise ImageReadError("empty file (0 bytes)")
    if head[:8] != PNG_SIGNATURE:
        raise ImageReadError("not a PNG file")
    size = _png_size(head)
    if size is not None and (reason := _past_limits(*size)):
        # Checked on the header, before decoding: a tiny file can claim billions of pixels.
        raise ImageReadError(reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if reason := _past_limits(*img.size):
                    raise ImageReadError(reason)
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    raise ImageReadError(f"animated PNG ({frames} frames): a radiograph has one")
                img.load()
                return _to_gray(img), _conversion_note(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"too large: {exc}".split(". ")[0]) from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageReadError(
            f"cannot decode ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def _past_limits(w: int, h: int) -> str | None:
    """Why a ``w`` x ``h`` image is refused before decoding (None: within every limit)."""
    if w * h > MAX_PIXELS:
        return f"{w}x{h} exceeds the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
    if max(w, h) > MAX_SIDE:
        return f"{w}x{h} exceeds the {MAX_SIDE:,}-pixel limit per side"
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        return f"{w}x{h} has an aspect ratio beyond {MAX_ASPECT}:1"
    return None


#: Modes that are not noted: MURA itself is 8-bit grayscale with some RGB images.
PLAIN_MODES = ("L", "RGB")


def _conversion_note(img: Image.Image) -> str | None:
    """``"<kind>: <what was done>"`` for an image of an unusual mode (None: 8-bit gray or RGB)."""
    mode = img.mode
    if mode in PLAIN_MODES:
        return None
    if mode.startswith("I;16"):
        return "16-bit: rescaled to 8 bits by its maximum"
    if mode == "I":
        return "32-bit: rescaled to 8 bits by its maximum"
    if mode == "P":
        return "palette: converted to 8-bit grayscale" + (
            " (transparency dropped)" if "transparency" in img.info else ""
        )
    if "A" in mode:
        return f"alpha channel: {mode}, alpha dropped, converted to 8-bit grayscale"
    return f"mode {mode}: converted to 8-bit grayscale"


def _to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max()
        return (arr * (255.0 / top) if top > 0 else arr).round().clip(0, 255).astype(np.uint8)
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def letterbox(gray: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad to a centred square (keeping the aspect ratio), then resize to ``size``×``size``."""
    h, w = gray.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = gray
    if side == size:
        return square
    resized = Image.fromarray(square).resize(
        (size, size), Image.Resampling.BILINEAR, reducing_gap=None
    )
    return np.asarray(resized, dtype=np.uint8)


def preprocess(path: str | Path, size: int) -> np.ndarray:
    """Decode and letterbox one image: a ``(size, size)`` uint8 array."""
    return letterbox(load_gray(path), size)


def check_image(path: str | Path) -> str | None:
    """Return why an image is unusable, or None if it decodes."""
    return inspect_image(path)[0]


def inspect_image(path: str | Path) -> tuple[str | None, str | None]:
    """Decode one image for ``data summary``: ``(why it is unusable, note on its conversion)``.

    The first is None for a usable image; the second is None unless the image was converted
    from an unusual mode (16-bit, alpha channel, palette, ...), which is worth knowing but
    not a problem: training uses such images as :func:`load_gray` returns them.
    """
    try:
        return None, _decode(path)[1]
    except ImageReadError as exc:
        return str(exc), None
