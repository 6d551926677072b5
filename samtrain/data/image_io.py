"""Reading images as uint8 RGB, whatever variant the file is, and refusing damaged files.

Readable variants are converted: grayscale and palette images to RGB, RGBA to RGB (alpha
dropped), 16-bit to 8-bit (scaled by 1/256, the full range onto 0-255), and the EXIF orientation
is applied (OpenCV does so when decoding). Damaged files raise :class:`SampleError` naming the
file: missing, empty, undecodable, or truncated (a JPEG without its end-of-image marker, a PNG
without its IEND chunk; OpenCV would otherwise return a partly grey image with only a warning).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samtrain.data.errors import SampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# A complete JPEG ends with the EOI marker, a complete PNG with the IEND chunk. Some writers
# append padding after them, so the marker is looked for near the end, not at the very end.
_TRAILER_WINDOW = 1024
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND"


def truncation_reason(data: bytes) -> str | None:
    """Why ``data`` (a JPEG or PNG file's bytes) looks cut short, or None when it looks complete
    (other formats are left to the decoder)."""
    tail = data[-_TRAILER_WINDOW:]
    if data.startswith(_JPEG_START) and _JPEG_END not in tail:
        return "JPEG is truncated (no end-of-image marker)"
    if data.startswith(_PNG_START) and _PNG_END not in tail:
        return "PNG is truncated (no IEND chunk)"
    return None


def decode_rgb_image(data: bytes, name: str | Path) -> np.ndarray:
    """Decode image file bytes as RGB: uint8 (H, W, 3). ``name`` is used in error messages.

    Raises SampleError naming ``name`` when the bytes are empty, truncated or not decodable.
    """
    if len(data) == 0:
        raise SampleError(name, "image file is empty")
    reason = truncation_reason(data)
    if reason is not None:
        raise SampleError(name, reason)
    # IMREAD_COLOR: 3-channel 8-bit BGR from gray/palette/RGBA/16-bit input, EXIF orientation applied.
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SampleError(name, "cannot decode image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_bytes(path: str | Path, what: str = "image") -> bytes:
    """The bytes of a file; SampleError naming it when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(path, f"{what} file does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise SampleError(path, f"cannot read {what} file: {err}") from err


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB: uint8 (H, W, 3), converted as this module describes.

    Raises SampleError naming the file when it is missing, truncated or cannot be decoded.
    """
    return decode_rgb_image(read_bytes(path), path)


def find_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive; ``IMAGE_EXTENSIONS``, any case), sorted by the
    path relative to ``root``. FileNotFoundError when ``root`` is not a folder, ValueError when it
    holds no image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise ValueError(f"image folder {root} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
