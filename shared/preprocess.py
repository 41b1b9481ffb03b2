"""Raw image bytes -> the model's input array, with the checks that keep hostile uploads harmless.

Two callers with different budgets:

* the api calls `inspect_image` for cheap up-front validation: magic-byte sniffing plus a header-only
  parse, so a bad or oversized upload is refused before it is queued;
* the worker calls `preprocess` (= `decode_rgb` + `to_model_input`), possibly from a thread pool.

The module is deliberately torch-free (PIL + numpy only): torch ops run from extra threads start extra
OpenMP pools, and the api should not import torch at all. Nothing here mutates process-global state, so
it is safe to call from several threads at once.

Decoding policy, shared by every path so the worker sees the same pixels whatever the container:

* the format comes from the magic bytes only, never from a filename or content type, and PIL is told
  to try that one plugin only (it never probes EPS/ghostscript or any other plugin on untrusted data);
* width*height is checked against `max_pixels` from the header, before a single pixel is decoded,
  and the container's structure against the caps of shared.image_structure before PIL parses it;
* the first frame of animated/multi-page files is used, and the EXIF orientation is applied;
* everything becomes 8-bit RGB, transparent pixels composited on white (`InputSpec.alpha`);
* every decoder failure surfaces as a typed `ImageError`, never as a raw PIL exception.

Why one module over 400 lines: sniffing, decoding and the model-input transform are one policy (the
preprocessing spec), and every path (api inspection, worker, decoder processes, reference) must apply
it identically; the container-structure caps, a separate concern, live in shared.image_structure.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import (
    BmpImagePlugin,  # noqa: F401  (imported to register the plugin: see _PIL_FORMAT)
    GifImagePlugin,  # noqa: F401
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

from shared.errors import CorruptImage, EmptyImage, ImageError, ImageTooLarge, UnsupportedImageFormat
from shared.image_structure import check_pixels, check_structure, require_positive
from shared.manifest import InputSpec

logger = logging.getLogger(__name__)

# Decompression-bomb guard, and why Image.MAX_IMAGE_PIXELS is left alone: it is process-global, so
# setting it per call would race between threads, and setting it once here would silently weaken (or
# tighten) every other PIL user in the process. Instead our own check against the caller's
# `max_pixels` runs on the header-declared size right after `Image.open` (which parses headers only)
# and before `load()`. PIL's own guard stays in place as a backstop: its DecompressionBombError (and
# the DecompressionBombWarning, should a warnings filter turn it into an exception) is mapped to
# ImageTooLarge. Consequence: a `max_pixels` above 2 * Image.MAX_IMAGE_PIXELS (~179 Mpx by default)
# cannot be honoured; PIL refuses those images first, still as ImageTooLarge.
#
# ImageFile.LOAD_TRUNCATED_IMAGES is also left at its default (False): a truncated upload must be
# refused as corrupt, not classified from a half-grey picture.

SUPPORTED_FORMATS: frozenset[str] = frozenset({"jpeg", "png", "gif", "webp", "bmp", "tiff"})

# Our format name -> the one PIL plugin allowed to parse it.
_PIL_FORMAT: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
}

_WHITE = (255, 255, 255)

_RESAMPLE: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# Above this many pixels, the full "resize the shorter side" image is not materialised: only the
# crop window is resampled (see `_resize_and_crop`). Ordinary photos stay far below it (aspect ratios
# up to ~60:1 at resize=256), so they take the exact reference path.
_MAX_RESIZED_PIXELS = 4_000_000

# BMP's "BM" is two printable letters, so also require a DIB header size PIL knows (offset 14, LE).
_BMP_DIB_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

# Leading bytes of formats we refuse, so the error can say what the upload looks like.
_KNOWN_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
)

# ISO base media file ("....ftyp<brand>"): HEIC/AVIF photos and MP4/MOV videos.
_FTYP_BRANDS: dict[bytes, str] = {
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"), "HEIC/HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: the sniffed format and the declared size of the first frame."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# --- sniffing -------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str:
    """The supported format the magic bytes announce; refuses everything else with a typed error.

    Only the leading bytes are read: filenames and client content types are never trusted.
    """
    if not data:
        raise EmptyImage("the upload is empty (0 bytes)")
    supported = _sniff_supported(data)
    if supported is not None:
        return supported
    looks_like = _describe_unsupported(data)
    if looks_like is not None:
        raise UnsupportedImageFormat(
            f"{looks_like} is not a supported image format; send one of {_supported_list()}"
        )
    raise UnsupportedImageFormat(
        f"unrecognised data (first bytes {data[:8].hex(' ')}); send one of {_supported_list()}"
    )


def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_FORMATS))


def _sniff_supported(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if (
        data.startswith(b"BM")
        and len(data) >= 18
        and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES
    ):
        return "bmp"
    # Classic TIFF and BigTIFF, both byte orders (PIL reads all four).
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    return None


def _describe_unsupported(data: bytes) -> str | None:
    """A human name for common non-image (or unsupported image) uploads, None if unknown."""
    for magic, name in _KNOWN_OTHER_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return _FTYP_BRANDS.get(brand, f"ISO media ({brand.decode('latin-1').strip()!r}, e.g. MP4/MOV video)")
    if data.startswith(b"RIFF"):
        return f"RIFF {data[8:12].decode('latin-1').strip()!r} data"
    # PDF allows junk before the header; look a little further than the start.
    if b"%PDF-" in data[:1024]:
        return "PDF"
    return _describe_text(data)


def _describe_text(data: bytes) -> str | None:
    """'SVG' / 'HTML' / 'XML' / 'JSON' / 'text' for textual uploads, None for binary data."""
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the 4096-byte window is still text.
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    if any(not (ch.isprintable() or ch in "\t\n\r\f\v") for ch in text):
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith("<"):
        if "<svg" in lowered:
            return "SVG"
        if "<html" in lowered or lowered.startswith("<!doctype html"):
            return "HTML"
        return "XML" if lowered.startswith("<?xml") else "HTML/XML markup"
    if lowered.startswith(("{", "[")):
        return "JSON"
    return "text"


# --- header-only inspection -------------------------------------------------------------------------


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Sniff and parse the header only (no pixel is decoded); refuse images above `max_pixels`.

    O(header) in time and memory: the container structure is checked against the caps of
    `check_structure` before PIL parses anything, and later frames/pages are never visited.
    """
    require_positive(max_pixels)
    fmt = sniff_format(data)
    check_structure(data, fmt, max_pixels)
    with _decoder_errors(fmt), _open(data, fmt) as image:
        width, height = image.size
        check_pixels(width, height, max_pixels)
    return ImageInfo(format=fmt, width=width, height=height)


@contextmanager
def _open(data: bytes, fmt: str) -> Iterator[ImageFile.ImageFile]:
    """Lazily open `data` with the one plugin its magic bytes named (headers parsed, pixels not)."""
    # ImageFile.__exit__ only drops the file pointer (BytesIO: nothing to release): pixels already
    # loaded stay usable after the block, so the opened image itself can be returned.
    with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as image:
        yield image


@contextmanager
def _decoder_errors(fmt: str) -> Iterator[None]:
    """Turn whatever PIL raises on hostile or broken data into a typed ImageError.

    PIL signals bad data with a zoo of types (OSError, SyntaxError, ValueError, EOFError, struct.error,
    IndexError, even AssertionError in some plugins), so everything but our own errors and MemoryError
    (a genuine server-side shortage: sizes were checked already) is treated as "cannot decode".
    """
    try:
        yield
    except ImageError:
        raise
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the {fmt} image exceeds the decoder's pixel safety limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        # PIL's message only names a BytesIO object; say what we know instead.
        raise CorruptImage(
            f"the data starts like {fmt} but could not be parsed as {fmt} "
            f"(corrupt, or a {fmt} variant the decoder does not support)"
        ) from exc
    except Exception as exc:
        raise CorruptImage(f"could not decode the {fmt} image: {exc}") from exc


# --- full decode ------------------------------------------------------------------------------------


def decode_rgb(data: bytes, max_pixels: int, draft_short_side: int | None = None) -> Image.Image:
    """Decode the first frame to 8-bit RGB: EXIF orientation applied, transparency composited on white.

    `draft_short_side`: for a JPEG at least twice that size on its shorter side, let libjpeg scale
    it down by 1/2, 1/4 or 1/8 in the DCT domain (never below that many pixels on either side of
    the image resized to that short side): a fraction of the decode work, and the later resize then
    starts from a smaller image. Other formats ignore it.
    """
    require_positive(max_pixels)
    fmt = sniff_format(data)
    check_structure(data, fmt, max_pixels)
    with _decoder_errors(fmt), _open(data, fmt) as image:
        check_pixels(*image.size, max_pixels)
        if draft_short_side is not None and fmt == "jpeg":
            # draft() picks the largest scale 1/s that keeps both sides >= the requested size, so
            # the image resized to `draft_short_side` is never upsampled from the scaled decode.
            image.draft(None, resized_size(*image.size, draft_short_side))
        image.load()  # the first pixel decode happens here, after the size check
        _apply_exif_orientation(image)
        return _to_rgb(image, fmt)


def _apply_exif_orientation(image: Image.Image) -> None:
    """Rotate/flip in place as the EXIF Orientation tag says (phones store sensor-oriented pixels)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (MemoryError, ImageError):
        raise
    except Exception:
        # A malformed EXIF block should not make a decodable picture unusable: keep it as stored.
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)


def _to_rgb(image: Image.Image, fmt: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB, choosing per mode how depth, palette and alpha are reduced."""
    mode = image.mode
    if mode.startswith(("I", "F")):  # I;16, I;16B, I;16L, I;16N, I (int32), F (float32)
        return _high_depth_to_l(image).convert("RGB")
    if image.has_transparency_data:  # LA, La, PA, RGBA, RGBa, P/L/RGB with a transparency key
        return _composite_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    try:
        # L, 1 (0/255), P, CMYK, YCbCr, RGBX. CMYK uses PIL's naive formula R = (255-C)(255-K)/255
        # without the embedded ICC profile, i.e. what the reference `.convert("RGB")` did.
        return image.convert("RGB")
    except ValueError as exc:  # e.g. TIFF in CIELab: PIL has no plain conversion for it
        raise UnsupportedImageFormat(f"{fmt} images in the {mode} colour space are not supported") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-blend onto white: out = rgb * a + 255 * (1 - a), rounded by PIL's paste."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# High-depth images are converted in bands of rows of about this many pixels: a 40 Mpx float32
# image is 160 MB as decoded, and converting it whole in float64 would need several times that.
_BAND_PIXELS = 1 << 20


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / int32 / float grayscale -> 8-bit L by scaling, never by clipping at 255."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // width)
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        raw = np.asarray(image.crop((0, top, width, bottom)))
        return _finite(raw) if image.mode == "F" else raw

    low, high = math.inf, -math.inf
    if not image.mode.startswith("I;16"):  # I and F need the range of the whole image first
        for top, bottom in bands:
            raw = band(top, bottom)
            low, high = min(low, float(raw.min())), max(high, float(raw.max()))
    out = np.empty((height, width), np.uint8)
    for top, bottom in bands:
        raw = band(top, bottom)
        if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 0xFFFF):
            # Keep the high byte (v >> 8: 0->0, 32768->128, 65535->255). That is exactly how PIL
            # itself reduces 16-bit RGB/RGBA/LA PNGs and TIFFs, so the same picture stored as 16-bit
            # gray or 16-bit colour gives the same input. 32-bit ints that fit 16 bits are read as
            # 16-bit data (what older PIL produced for 16-bit files).
            out[top:bottom] = raw >> 8
        elif image.mode == "F" and low >= 0.0 and high <= 1.0:  # float samples, conventionally 0..1
            out[top:bottom] = np.rint(raw * 255.0)
        else:  # anything else is stretched from its own min..max
            out[top:bottom] = _stretch(raw, low, high)
        transparency = image.info.get("transparency")
        if isinstance(transparency, int) and image.mode != "F":
            # Gray tRNS: that one sample value is fully transparent -> white.
            out[top:bottom][raw == transparency] = 255
    return Image.fromarray(out)


def _finite(raw: np.ndarray) -> np.ndarray:
    return np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] (the image's own range) onto [0, 255]; a constant image is black."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)


# --- model input ------------------------------------------------------------------------------------


def to_model_input(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize the shorter side, centre-crop, normalise: float32 CHW, C-contiguous.

    For an RGB image this reproduces the recipe the model was validated with, bit for bit:
    resize (round(w*s), round(h*s)) with s = resize/min(w, h), crop at ((W-c)//2, (H-c)//2),
    float32 / 255, then (x - mean) / std in float32.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    # resize < crop cannot give a full crop window: scale so the shorter side covers the crop.
    short_side = max(spec.resize, spec.crop)
    cropped = _resize_and_crop(image, short_side, spec.crop, _RESAMPLE[spec.interpolation])
    pixels = np.asarray(cropped)  # HWC uint8
    # Each output value depends only on its channel and its 8-bit input, so the recipe is applied
    # once per level (`_levels`) and each channel plane is a table lookup: the same float32 values
    # as applying it to every pixel, at a fraction of the arithmetic.
    levels = _levels(spec.scale, spec.mean, spec.std)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        # uint8 indices are always in range: mode="clip" only spares numpy's bounds-checked copy.
        np.take(levels[channel], pixels[:, :, channel], out=out[channel], mode="clip")
    return out


@lru_cache(maxsize=8)
def _levels(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: what each 8-bit level of each channel becomes, computed as the reference
    recipe computes each pixel (float32, in its order)."""
    levels = np.repeat(np.arange(256, dtype=np.float32)[None, :], 3, axis=0)
    # Divide by 1/scale rather than multiply by scale: x / 255 and x * float32(1/255) differ in the
    # last bit for some x, and the reference divides. 1 / (1/255) == 255.0 exactly.
    levels /= np.float32(1.0 / scale)
    levels -= np.asarray(mean, dtype=np.float32)[:, None]
    levels /= np.asarray(std, dtype=np.float32)[:, None]
    levels.flags.writeable = False
    return levels


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size after scaling the shorter side to `short_side`, aspect kept, both sides rounded."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_and_crop(
    image: Image.Image, short_side: int, crop: int, resample: Image.Resampling
) -> Image.Image:
    width, height = image.size
    new_width, new_height = resized_size(width, height, short_side)
    # round() of min(w, h) * (short_side / min(w, h)) is short_side, so both sides are >= crop.
    left, top = (new_width - crop) // 2, (new_height - crop) // 2
    if new_width * new_height <= _MAX_RESIZED_PIXELS:
        # The reference path, kept literally: PIL's box-resize below is not bit-identical to it.
        return image.resize((new_width, new_height), resample).crop((left, top, left + crop, top + crop))
    # Extreme aspect ratio (a 10000x3 strip would become 853333x256 = 655 MB of RGB): resample only
    # the source region that lands inside the crop window. Same geometry, tiny rounding differences.
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return image.resize((crop, crop), resample, box=box)


def preprocess(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Raw upload bytes -> one model input (float32 CHW); typed ImageError for anything unusable.

    The one code path of the worker, its decoder processes and the reference classifier: a spec with
    `jpeg_draft` decodes large JPEGs DCT-scaled (see `decode_rgb`), the same way everywhere.
    """
    draft = max(spec.resize, spec.crop) if spec.jpeg_draft else None
    return to_model_input(decode_rgb(data, max_pixels, draft), spec)
