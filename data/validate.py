"""Checks on raw samples. Each failure is a `Skip` with a short reason the import report counts."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from models.processor import to_rgb

KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
DEFAULT_MAX_PIXELS = 64_000_000  # beyond this an image is treated as a decompression bomb
NON_RGB_POLICIES = ("convert", "skip")


class Skip(Exception):
    """A sample that is not imported; `reason` is the report's counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                non_rgb: str = "convert") -> tuple[bytes, str, str | None]:
    """Validate encoded image bytes -> (bytes to store, extension, note).

    RGB PNG/JPEG/WebP are stored as they are. Other modes (grayscale, CMYK, palette, alpha) are
    converted to RGB (alpha composited on white) and stored as PNG, or skipped when
    non_rgb == 'skip'; the note ('converted_L', ...) lets the report count them.
    """
    if non_rgb not in NON_RGB_POLICIES:
        raise ValueError(f"non_rgb must be one of {', '.join(NON_RGB_POLICIES)}, got {non_rgb!r}")
    if data is None:
        raise Skip("missing_image")
    if len(data) == 0:
        raise Skip("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise Skip("too_many_pixels", f"{w}x{h}")
            if w == 0 or h == 0:
                raise Skip("empty_image")
            image.load()
    except Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Skip("too_many_pixels", str(e)) from e
    except UnidentifiedImageError as e:
        raise Skip("not_an_image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Skip("corrupt_image", str(e)) from e
    if image.mode != "RGB":
        if non_rgb == "skip":
            raise Skip(f"non_rgb_{image.mode}")
        try:
            rgb = to_rgb(image)
        except (OSError, ValueError) as e:
            raise Skip("unsupported_mode", image.mode) from e
        return _png(rgb), "png", f"converted_{image.mode}"
    if image.format not in KEEP_FORMATS:
        return _png(image), "png", f"reencoded_{image.format}"
    return data, KEEP_FORMATS[image.format], None


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def check_text(value, *, field: str) -> str:
    """A non-empty, valid UTF-8 string (lone surrogates mark bytes that were not UTF-8)."""
    if value is None:
        raise Skip(f"missing_{field}")
    if not isinstance(value, str):
        raise Skip(f"malformed_{field}", type(value).__name__)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Skip("not_utf8", field) from e
    if not value.strip():
        raise Skip(f"empty_{field}")
    return value.strip()


def decode_utf8(data: bytes, *, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("not_utf8", field) from e
