"""Robust PIL image decoding for the CPU loaders.

Every input is either decoded to an RGB 8-bit image the way DALI's decoder would (EXIF orientation
applied, alpha dropped, CMYK converted, 16-bit scaled by 1/257) or rejected with a SampleError whose
``reason`` is a stats counter: ``empty_member``, ``corrupt_image``, ``too_large``.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .format import SampleError

# PIL's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS, ~179 Mpx). Bigger images are
# skipped rather than decoded; a 12k x 12k image (144 Mpx) is decoded (JPEGs at reduced scale).
DEFAULT_MAX_PIXELS = 2 * 89_478_485

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come back grey


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype != np.uint16 and a.max(initial=0) <= 255 and mode == "I":
            a8 = np.clip(a, 0, 255).astype(np.uint8)  # an 8-bit image stored as 32-bit ints
        else:
            a8 = ((a.astype(np.float32) / 257.0) + 0.5).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        raise SampleError("corrupt_image", "floating-point images are not supported")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # alpha is dropped (not composited) to match DALI's decoder
        return im.convert("RGBA").convert("RGB") if mode != "RGBA" else im.convert("RGB")
    if mode == "P":
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, where: str, min_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to an RGB PIL image. ``min_size``: the smallest side needed (lets a JPEG be decoded at
    a reduced DCT scale, which makes huge JPEGs cheap). ``where`` ("shard:key") names the sample in
    errors."""
    if not data:
        raise SampleError("empty_member", f"{where}: image member is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise SampleError("corrupt_image", f"{where}: image has size {w}x{h}")
            if im.format == "JPEG" and min_size:
                # draft picks the largest DCT scale-down that keeps the image >= the requested size
                scale = min(w, h) / float(min_size)
                if scale >= 2:
                    im.draft("RGB" if im.mode != "CMYK" else "CMYK",
                             (int(w / scale) + 1, int(h / scale) + 1))
            if im.size[0] * im.size[1] > max_pixels:
                raise SampleError("too_large", f"{where}: image is {w}x{h} px, over the "
                                  f"{max_pixels} px limit")
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return _to_rgb(im)
    except SampleError:
        raise
    except Image.DecompressionBombError as e:
        raise SampleError("too_large", f"{where}: {e}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.UnidentifiedImageError,
            MemoryError, IndexError, struct_error()) as e:
        raise SampleError("corrupt_image", f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def struct_error():
    import struct

    return struct.error


def resize_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and take the centre square; returns
    uint8 [size, size, 3]. The crop offset rounds as DALI's crop_pos 0.5 does (floor of half)."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)
