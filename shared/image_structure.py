"""Bounded checks on what an image container declares, run on the raw bytes before PIL parses them.

`check_structure` caps the structures PIL's header parsers and decoders would walk (PNG chunks, JPEG
segments and scans, GIF extension blocks, TIFF entries and strips, RLE BMP size) and `check_pixels`
is the decompression-bomb guard on declared dimensions. Both only read length fields and headers, so
they cost O(header) whatever the upload; shared.preprocess runs them on both the api's inspection and
the worker's decode, so the two refuse the same images.
"""

from __future__ import annotations

import struct

from shared.errors import CorruptImage, ImageError, ImageTooLarge

# PIL's header parsers are pure Python and walk whatever structure precedes the first pixels (every
# PNG chunk, every JPEG marker segment, every value of every TIFF tag), and some decoders cost far
# more than the upload's size suggests (Pillow's RLE BMP decoder runs per pixel in Python; libjpeg
# walks every block of the image once per progressive scan). These caps are far above what real
# photos carry and keep both the api's inspection and the worker's decode bounded; an image over one
# is refused as `image_too_complex` (422). Every walk below jumps from length field to length field,
# so it reads at most a few bytes per structure, never the pixel data.

# PNG: libpng writes 8 KiB IDAT chunks (1,280 for a 10 MB file); ancillary chunks are a handful.
_MAX_PNG_CHUNKS = 16_384
_MAX_PNG_ANCILLARY_CHUNKS = 512
# JPEG: marker segments before the first scan (APPn, DQT, DHT, SOF, COM: tens in real files, a few
# hundred with a chunked ICC profile), and scans in the whole file (libjpeg's progressive default
# is 10; optimisers reach a few dozen). Each scan costs a pass over every block of the image.
_MAX_JPEG_SEGMENTS = 1_024
_MAX_JPEG_SCANS = 128
# GIF: extension sub-blocks before the first image descriptor (comments, XMP, NETSCAPE loop).
_MAX_GIF_SUB_BLOCKS = 4_096
# TIFF: entries of the first IFD, values of one strip/tile offset or byte-count tag (each becomes a
# Python int at open, and an uncompressed strip is one decoder call at load), values of any tag.
_MAX_TIFF_ENTRIES = 1_024
_MAX_TIFF_STRIPS = 16_384
_MAX_TIFF_VALUES = 262_144
_TIFF_STRIP_TAGS = frozenset({273, 279, 324, 325})  # StripOffsets/ByteCounts, TileOffsets/ByteCounts
_TIFF_BYTE_TYPES = frozenset({1, 2, 6, 7})  # BYTE, ASCII, SBYTE, UNDEFINED: read as bytes, no ints
# BMP: Pillow decodes RLE4/RLE8 in Python, per pixel and per opcode: bounded in pixels and bytes.
_MAX_RLE_BMP_PIXELS = 2_000_000
_MAX_RLE_BMP_BYTES = 2 * 1024 * 1024


def image_too_complex(message: str) -> ImageError:
    """The refusal of a structure cap: the image may be valid, but costs too much to decode."""
    return ImageError(message, code="image_too_complex", http_status=422)


def check_structure(data: bytes, fmt: str, max_pixels: int) -> None:
    """Refuse containers whose structure would make PIL's parser or decoder run far past the upload.

    Also checks the declared size where PIL would allocate before we can (an animated WebP's canvas).
    Malformed structure is left for PIL to report as `corrupt_image`: only the caps refuse here.
    """
    try:
        _STRUCTURE_CHECKS[fmt](data, max_pixels)
    except (struct.error, IndexError):
        return  # truncated header: PIL says what is wrong with it


def _check_png(data: bytes, max_pixels: int) -> None:
    pos, chunks, ancillary = 8, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind[0] & 0x20:  # lowercase first letter: an ancillary chunk
            ancillary += 1
        if chunks > _MAX_PNG_CHUNKS or ancillary > _MAX_PNG_ANCILLARY_CHUNKS:
            raise image_too_complex(
                f"the png image has more than {_MAX_PNG_CHUNKS:,} chunks or {_MAX_PNG_ANCILLARY_CHUNKS:,} "
                "ancillary (metadata) chunks"
            )
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_jpeg(data: bytes, max_pixels: int) -> None:
    pos, segments = 2, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return  # not a marker: corrupt, PIL reports it
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise image_too_complex(f"the jpeg image has more than {_MAX_JPEG_SEGMENTS:,} marker segments")
        if marker == 0xDA:
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # standalone markers: no length field
            pos += 2
            continue
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    # Inside entropy-coded data a 0xFF is always followed by 0x00 or a restart marker, so every
    # FF DA is a scan header (or sits in metadata, e.g. an EXIF thumbnail: counted, harmlessly).
    scans = data.count(b"\xff\xda")
    if scans > _MAX_JPEG_SCANS:
        raise image_too_complex(f"the jpeg image has {scans:,} scans; at most {_MAX_JPEG_SCANS} are decoded")


def _check_gif(data: bytes, max_pixels: int) -> None:
    pos = 13
    if data[10] & 0x80:  # global colour table
        pos += 3 << ((data[10] & 0x07) + 1)
    sub_blocks = 0
    while pos < len(data) and data[pos] == 0x21:  # extension blocks before the first image
        pos += 2
        while pos < len(data) and data[pos]:
            sub_blocks += 1
            if sub_blocks > _MAX_GIF_SUB_BLOCKS:
                raise image_too_complex(
                    f"the gif image has more than {_MAX_GIF_SUB_BLOCKS:,} extension blocks before its first "
                    "frame"
                )
            pos += 1 + data[pos]
        pos += 1


def _check_tiff(data: bytes, max_pixels: int) -> None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    # Classic: 2-byte entry count, 12-byte entries (4-byte count); BigTIFF: 8, 20 (8-byte count).
    head_fmt, count_fmt, entry_size = ("Q", "Q", 20) if big else ("H", "I", 12)
    ifd = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    entries = struct.unpack_from(order + head_fmt, data, ifd)[0]
    if entries > _MAX_TIFF_ENTRIES:
        raise image_too_complex(f"the tiff image's first directory has {entries:,} entries")
    first = ifd + (8 if big else 2)
    for i in range(min(entries, (len(data) - first) // entry_size)):
        tag, kind, count = struct.unpack_from(f"{order}HH{count_fmt}", data, first + i * entry_size)
        if kind in _TIFF_BYTE_TYPES:
            continue
        limit = _MAX_TIFF_STRIPS if tag in _TIFF_STRIP_TAGS else _MAX_TIFF_VALUES
        if count > limit:
            what = "strips or tiles" if tag in _TIFF_STRIP_TAGS else f"values in tag {tag}"
            raise image_too_complex(f"the tiff image has {count:,} {what}; at most {limit:,} are accepted")


def _check_webp(data: bytes, max_pixels: int) -> None:
    # libwebp's animation decoder allocates the canvas (4 bytes a pixel, twice) as PIL opens the
    # file: check the size the container declares first.
    kind = data[12:16]
    if kind == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif kind == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif kind == b"VP8 ":
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    else:
        return
    if len(data) >= 30:
        check_pixels(width, height, max_pixels)


def _check_bmp(data: bytes, max_pixels: int) -> None:
    if int.from_bytes(data[14:18], "little") < 40:
        return  # OS/2 core header: no compression field
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    if compression in (1, 2):  # RLE8, RLE4
        pixels = abs(width) * abs(height)
        if pixels > _MAX_RLE_BMP_PIXELS or len(data) > _MAX_RLE_BMP_BYTES:
            raise image_too_complex(
                f"the bmp image is run-length encoded at {abs(width)}x{abs(height)}, {len(data):,} bytes; "
                f"RLE is decoded up to {_MAX_RLE_BMP_PIXELS:,} pixels and {_MAX_RLE_BMP_BYTES:,} bytes"
            )


_STRUCTURE_CHECKS = {
    "png": _check_png,
    "jpeg": _check_jpeg,
    "gif": _check_gif,
    "tiff": _check_tiff,
    "webp": _check_webp,
    "bmp": _check_bmp,
}


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard on declared dimensions: ImageTooLarge above `max_pixels`."""
    require_positive(max_pixels)
    if width < 1 or height < 1:
        raise CorruptImage(f"the header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are accepted"
        )


def require_positive(max_pixels: int) -> None:
    # A caller bug, not a client error: checked outside shared.preprocess's `_decoder_errors`, so it
    # is not re-labelled as one.
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
