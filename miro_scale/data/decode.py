"""Robust PIL image decoding for the CPU loaders, and a header probe that decides what DALI may decode.

Every input is either decoded to an RGB 8-bit image the way DALI's decoder would (EXIF orientation
applied, alpha dropped, CMYK converted, 16-bit scaled by 1/257) or rejected with a SampleError whose
``reason`` is a stats counter: ``empty_member``, ``corrupt_image``, ``too_large``.
"""
from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

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
            if im.format == "JPEG" and min_size and min(w, h) >= 2 * min_size:
                # draft picks the largest DCT scale-down (1/2, 1/4, 1/8) that keeps the image >= the
                # requested size; asking for exactly min_size on the short side lets an exact 2x
                # source (512 px for 256) decode at half scale
                short = min(w, h)
                im.draft("RGB" if im.mode != "CMYK" else "CMYK",
                         (-(-w * min_size // short), -(-h * min_size // short)))
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
    """Resize the shorter side to ``size`` (bilinear, antialiased: the release's torchvision
    ``Resize``, and DALI's linear filter) and take the centre square; returns uint8 [size, size, 3].
    The crop offset rounds as DALI's crop_pos 0.5 does (floor of half)."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


class ImageProbe(NamedTuple):
    format: str  # "jpeg", "png", "webp", or PIL's format name in lower case ("gif", "bmp", ...)
    size: tuple  # (width, height) as stored (before EXIF orientation)
    dali_safe: bool  # a complete 8-bit Huffman JPEG, PNG or still WebP: may be given to DALI


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 JPG, CC DAC
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole chunk: length 0, type, fixed CRC


def probe_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageProbe:
    """Format, size and DALI safety of an encoded image, from its structure alone (no pixel
    decode; microseconds, so an oversized image is refused before anything is decompressed).

    ``dali_safe`` is true only for JPEG, PNG and WebP files that look complete: a JPEG has an EOI
    after its first SOS, a PNG its IEND chunk, a WebP a RIFF size that fits the data. DALI's GPU
    decoder can crash the process on a file it cannot read, so nothing else may reach it. A file
    that is not DALI-safe but that PIL can open (a GIF named .jpg, a truncated JPEG) is returned
    with ``dali_safe=False`` and left to :func:`decode_image`. Raises SampleError ``empty_member``,
    ``too_large`` (width x height > ``max_pixels``) or ``corrupt_image`` (unreadable header)."""
    if not data:
        raise SampleError("empty_member", f"{where}: image member is empty (0 bytes)")
    head = None
    if data[:3] == b"\xff\xd8\xff":
        head = _probe_jpeg(data)
    elif data[:8] == _PNG_MAGIC:
        head = _probe_png(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        head = _probe_webp(data)
    if head is None:  # another format, or a header the parsers above do not follow: ask PIL
        head = _probe_pil(data, where)
    fmt, w, h, safe = head
    if w <= 0 or h <= 0:
        raise SampleError("corrupt_image", f"{where}: image has size {w}x{h}")
    if w * h > max_pixels:
        raise SampleError("too_large", f"{where}: image is {w}x{h} px, over the {max_pixels} px limit")
    return ImageProbe(fmt, (w, h), safe)


def _probe_jpeg(d: bytes):
    """Walk the marker segments to the first SOS (skipping APPn payloads such as EXIF thumbnails,
    which carry their own SOI/EOI). None when the segments cannot be followed."""
    n, pos, frame = len(d), 2, None
    while pos + 4 <= n:
        if d[pos] != 0xFF:
            return None
        m = d[pos + 1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= m <= 0xD8 or m == 0x01:  # markers without a length
            pos += 2
            continue
        if m == 0xD9:  # EOI before any scan
            return None
        seg = (d[pos + 2] << 8) | d[pos + 3]
        if m in _JPEG_SOF and pos + 9 <= n:
            frame = (m, d[pos + 4], (d[pos + 5] << 8) | d[pos + 6], (d[pos + 7] << 8) | d[pos + 8])
        elif m == 0xDA:
            if frame is None:
                return None
            sof, precision, h, w = frame
            # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an FF D9
            # after the first SOS is the image's end (searched from the back: it is usually last).
            complete = d.rfind(b"\xff\xd9") >= pos + 2 + seg
            # baseline, extended or progressive Huffman, 8-bit: what every DALI backend decodes
            return "jpeg", w, h, complete and sof in (0xC0, 0xC1, 0xC2) and precision == 8
        pos += 2 + seg
    return None


def _probe_png(d: bytes):
    if len(d) < 33 or d[12:16] != b"IHDR":
        return None
    w, h = struct.unpack_from(">II", d, 16)
    return "png", w, h, d.rfind(_PNG_IEND) >= 33


def _probe_webp(d: bytes):
    if len(d) < 30:
        return None
    riff, chunk = struct.unpack_from("<I", d, 4)[0], struct.unpack_from("<I", d, 16)[0]
    kind, animated = d[12:16], False
    if kind == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", d, 26)
        w, h = w & 0x3FFF, h & 0x3FFF
    elif kind == b"VP8L" and d[20] == 0x2F:
        bits = struct.unpack_from("<I", d, 21)[0]
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8X":
        w = int.from_bytes(d[24:27], "little") + 1
        h = int.from_bytes(d[27:30], "little") + 1
        animated = bool(d[20] & 0x02)  # animations are for PIL (first frame)
    else:
        return None
    complete = 20 + chunk <= 8 + riff <= len(d)
    return "webp", w, h, complete and not animated


def _probe_pil(data: bytes, where: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                return im.format.lower(), im.size[0], im.size[1], False
    except Image.DecompressionBombError as e:
        raise SampleError("too_large", f"{where}: {e}") from None
    except Image.UnidentifiedImageError:
        raise SampleError("corrupt_image", f"{where}: not an image format PIL can read") from None
    except Exception as e:  # noqa: BLE001 - whatever PIL trips on, the header is unreadable
        raise SampleError("corrupt_image", f"{where}: cannot read the image header "
                          f"({type(e).__name__}: {e})") from None
