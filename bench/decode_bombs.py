"""Crafted hostile images: small uploads that are expensive to inspect or to decode.

Each builder returns the bytes of one file, written by hand (struct + zlib) where an encoder would
refuse to produce the structure, from a real photo where the attack needs real entropy-coded data.
Used by the decode-bomb battery (`bench.soak_decode`) and by the tests of bounded inspection.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image

# --- BMP --------------------------------------------------------------------------------------------


def rle8_bmp(width: int = 40_000, height: int = 1_000) -> bytes:
    """RLE8 BMP: one pixel and an end-of-line escape per row (Pillow decodes RLE in Python)."""
    rows = b"\x01\x00\x00\x00" * height + b"\x00\x01"  # (run of 1, index 0), EOL ... end of bitmap
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


# --- PNG --------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_text_chunks(count: int = 500_000) -> bytes:
    """A 1x1 gray PNG preceded by `count` empty tEXt chunks (12 bytes each)."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"tEXt", b"") * count + idat + png_chunk(b"IEND", b"")


# --- GIF --------------------------------------------------------------------------------------------


def gif_frames(count: int = 50_000) -> bytes:
    """An animated 1x1 GIF of `count` frames."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame * count + b"\x3b"


# --- TIFF -------------------------------------------------------------------------------------------

_SHORT, _LONG = 3, 4


def _ifd(entries: list[tuple[int, int, list[int]]], next_ifd: int, data_at: int) -> tuple[bytes, bytes]:
    """One little-endian IFD (+ its out-of-line values, to be placed at offset `data_at`)."""
    body = struct.pack("<H", len(entries))
    extra = b""
    for tag, kind, values in sorted(entries):
        fmt = "H" if kind == _SHORT else "I"
        packed = struct.pack(f"<{len(values)}{fmt}", *values)
        if len(packed) <= 4:
            body += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\x00")
        else:
            body += struct.pack("<HHII", tag, kind, len(values), data_at + len(extra))
            extra += packed
    return body + struct.pack("<I", next_ifd), extra


def tiff_pages(count: int = 5_000) -> bytes:
    """A TIFF of `count` 1x1 gray pages, all pointing at the same pixel."""
    pixel_at = 8
    out = bytearray(b"II*\x00" + struct.pack("<I", 12) + b"\x80\x00\x00\x00")
    ifd_size = 2 + 8 * 12 + 4
    for page in range(count):
        at = len(out)
        nxt = at + ifd_size if page < count - 1 else 0
        entries = [
            (256, _LONG, [1]),
            (257, _LONG, [1]),
            (258, _SHORT, [8]),
            (259, _SHORT, [1]),
            (262, _SHORT, [1]),
            (273, _LONG, [pixel_at]),
            (278, _LONG, [1]),
            (279, _LONG, [1]),
        ]
        ifd, extra = _ifd(entries, nxt, at + ifd_size)
        assert not extra
        out += ifd
    return bytes(out)


def tiff_many_strips(strips: int = 1_000_000) -> bytes:
    """A 1-pixel-wide gray TIFF of `strips` rows, one strip per row (8 bytes of tag data per strip)."""
    pixel_at = 8
    head = b"II*\x00" + struct.pack("<I", 12) + b"\x80\x00\x00\x00"
    entries = [
        (256, _LONG, [1]),
        (257, _LONG, [strips]),
        (258, _SHORT, [8]),
        (259, _SHORT, [1]),
        (262, _SHORT, [1]),
        (273, _LONG, [pixel_at] * strips),
        (278, _LONG, [1]),
        (279, _LONG, [1] * strips),
    ]
    ifd, extra = _ifd(entries, 0, 12 + 2 + 8 * 12 + 4)
    return head + ifd + extra


def tiff_float_deflate(width: int = 8_000, height: int = 5_000, rows_per_strip: int = 100) -> bytes:
    """A width x height float32 gray TIFF, deflate-compressed: every strip shares one tiny payload."""
    strip = zlib.compress(b"\x00" * (width * 4 * rows_per_strip), 9)
    strips = -(-height // rows_per_strip)
    head = b"II*\x00" + struct.pack("<I", 8 + len(strip)) + strip
    at = len(head)
    entries = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [32]),
        (259, _SHORT, [8]),  # Adobe deflate
        (262, _SHORT, [1]),
        (273, _LONG, [8] * strips),
        (277, _SHORT, [1]),
        (278, _LONG, [rows_per_strip]),
        (279, _LONG, [len(strip)] * strips),
        (339, _SHORT, [3]),  # SampleFormat: IEEE float
    ]
    ifd, extra = _ifd(entries, 0, at + 2 + 12 * len(entries) + 4)
    return head + ifd + extra


# --- WebP -------------------------------------------------------------------------------------------


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")


def webp_huge_canvas(width: int = 10_000, height: int = 10_000) -> bytes:
    """An animated WebP whose canvas is `width` x `height`, holding one 1x1 frame."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buffer, "WEBP", lossless=True)
    still = buffer.getvalue()
    vp8l = still[12:]  # the VP8L chunk of the still image, header included
    vp8x = struct.pack("<B3x", 0x02) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    anim = struct.pack("<IH", 0xFFFFFFFF, 0)
    anmf = b"\x00" * 6 + (0).to_bytes(3, "little") * 2 + struct.pack("<3sB", (100).to_bytes(3, "little"), 0)
    body = b"WEBP" + _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"ANIM", anim)
    body += _riff_chunk(b"ANMF", anmf + vp8l)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- JPEG -------------------------------------------------------------------------------------------


def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(marker, offset) of each marker segment up to the first SOS (offset of its 0xFF)."""
    out, pos = [], 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        out.append((marker, pos))
        if marker == 0xDA:
            break
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return out


def progressive_jpeg_scans(photo: Image.Image, scans: int = 5_000, side: int = 2_048) -> bytes:
    """A `side` x `side` progressive JPEG followed by `scans` extra scans without entropy data.

    Each empty scan repeats the header of the image's first (DC) scan: the decoder still walks every
    block of the image once per scan, so the cost is scans x pixels for a file of ~10 bytes a scan.
    """
    buffer = io.BytesIO()
    photo.convert("RGB").resize((side, side)).save(buffer, "JPEG", progressive=True, quality=80)
    data = buffer.getvalue()
    sos_at = jpeg_segments(data)[-1][1]
    length = struct.unpack(">H", data[sos_at + 2 : sos_at + 4])[0]
    sos = data[sos_at : sos_at + 2 + length]
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + sos * scans + b"\xff\xd9"


def jpeg_many_markers(photo: Image.Image, count: int = 100_000) -> bytes:
    """A small baseline JPEG with `count` empty COM segments before its frame header."""
    buffer = io.BytesIO()
    photo.convert("RGB").resize((64, 64)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def battery(photo: Image.Image) -> dict[str, Callable[[], bytes]]:
    """Every crafted case by name, built lazily (some take a second to make)."""
    return {
        "bmp_rle8_40000x1000": rle8_bmp,
        "png_500k_text_chunks": png_with_text_chunks,
        "gif_50000_frames": gif_frames,
        "tiff_5000_pages": tiff_pages,
        "tiff_1m_strips": tiff_many_strips,
        "tiff_40mpx_float32_deflate": tiff_float_deflate,
        "webp_animated_10000x10000_canvas": webp_huge_canvas,
        "jpeg_progressive_5000_scans": lambda: progressive_jpeg_scans(photo),
        "jpeg_100k_markers": lambda: jpeg_many_markers(photo),
    }
