"""shared.preprocess: bytes -> model input, on real photos, odd-but-valid files and hostile uploads."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared import preprocess as pp
from shared.config import PROJECT_ROOT
from shared.errors import CorruptImage, EmptyImage, ImageError, ImageTooLarge, UnsupportedImageFormat
from shared.manifest import InputSpec
from shared.preprocess import (
    SUPPORTED_FORMATS,
    ImageInfo,
    decode_rgb,
    inspect_image,
    preprocess,
    sniff_format,
    to_model_input,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPEC = InputSpec(resize=256, crop=224, mean=MEAN, std=STD)
MAX_PIXELS = 40_000_000

RED, GREEN, BLUE, YELLOW, WHITE, BLACK = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 255, 255),
    (0, 0, 0),
)


# --- helpers ------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat_payload: bytes) -> bytes:
    """A PNG built by hand, so headers can declare anything (16-bit samples, absurd sizes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(idat_payload))
        + chunk(b"IEND", b"")
    )


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of `samples` (H, W*channels), filter type 0 on every row."""
    height, _ = samples.shape
    rows = [b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height)]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    return png_bytes(samples.shape[1] // channels, height, 16, color_type, b"".join(rows))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A ~1 KB baseline JPEG whose SOF0 header claims width x height (a JPEG decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0\x00\x11")  # SOF0, length 17 = 3 components
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def quadrants(width: int = 128, height: int = 64) -> Image.Image:
    """Red | green over blue | yellow: any rotation or flip moves a colour to another corner."""
    array = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    array[:h, :w], array[:h, w:], array[h:, :w], array[h:, w:] = RED, GREEN, BLUE, YELLOW
    return Image.fromarray(array)


def expected_input_value(rgb: tuple[int, int, int]) -> np.ndarray:
    """The normalised (3,) vector one 8-bit RGB pixel becomes."""
    return (np.asarray(rgb, np.float32) / np.float32(255) - np.asarray(MEAN, np.float32)) / np.asarray(
        STD, np.float32
    )


def reference_input(data: bytes, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """The recipe the model was validated with, written out literally (float32 throughout)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), resample)
    width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    array = np.asarray(image, np.float32) / 255
    array = (array - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return array.transpose(2, 0, 1)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every pixel-buffer allocation PIL's ImageFile.load makes (load_prepare allocates it)."""
    calls: list[tuple[int, int]] = []
    original: Callable[[ImageFile.ImageFile], None] = ImageFile.ImageFile.load_prepare

    def spy(self: ImageFile.ImageFile) -> None:
        calls.append(self.size)
        original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", spy)
    return calls


@pytest.fixture(scope="module")
def chelsea(sample_dir: Path) -> Image.Image:
    return Image.open(sample_dir / "chelsea.png").convert("RGB")


# --- the reference recipe ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "rocket.jpg"])
def test_matches_the_validated_recipe_bit_for_bit(photo_bytes: dict[str, bytes], name: str) -> None:
    data = photo_bytes[name]
    out = preprocess(data, SPEC, MAX_PIXELS)
    assert out.shape == (3, 224, 224)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, reference_input(data))


@pytest.mark.parametrize(
    ("mean", "std"),
    [(MEAN, STD), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
)
def test_every_8_bit_level_of_every_channel_is_normalised_as_the_recipe_does(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    # A 256x256 image whose pixel (y, x) is (x, y, 255 - x): every level in every channel.
    ramp = np.arange(256, dtype=np.uint8)
    array = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    spec = SPEC.model_copy(update={"resize": 256, "crop": 256, "mean": mean, "std": std})
    out = to_model_input(Image.fromarray(np.ascontiguousarray(array)), spec)
    literal = (array.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, literal.transpose(2, 0, 1))


def test_float64_flavour_of_the_recipe_agrees_to_float32_precision(photo_bytes: dict[str, bytes]) -> None:
    # Should the reference have been computed in float64 (tuples promote), the difference is rounding only.
    data = photo_bytes["chelsea.png"]
    # chelsea is 451x300: 256/300 scales it to (385, 256), whose centred 224 crop starts at (80, 16).
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((385, 256), Image.Resampling.BILINEAR)
    array = np.asarray(image.crop((80, 16, 304, 240)), np.float64) / 255
    expected = ((array - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(preprocess(data, SPEC, MAX_PIXELS), expected, rtol=0, atol=1e-6)


def test_bicubic_spec_uses_bicubic(photo_bytes: dict[str, bytes]) -> None:
    data = photo_bytes["coffee.png"]
    bicubic = preprocess(data, SPEC.model_copy(update={"interpolation": "bicubic"}), MAX_PIXELS)
    np.testing.assert_array_equal(bicubic, reference_input(data, Image.Resampling.BICUBIC))
    assert not np.array_equal(bicubic, preprocess(data, SPEC, MAX_PIXELS))


def test_channels_are_rgb_and_normalised() -> None:
    out = preprocess(encode(solid((300, 300), (255, 128, 0)), "PNG"), SPEC, MAX_PIXELS)
    expected = expected_input_value((255, 128, 0))
    for channel in range(3):
        np.testing.assert_array_equal(out[channel], np.full((224, 224), expected[channel], np.float32))
    assert out[0, 0, 0] == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-6)


def test_crop_is_centred() -> None:
    # 512x256 with a 32-pixel black band on the left and right: after resize to 512x256 and crop of
    # the middle 224 columns, no black survives; a red centre column does.
    array = np.full((256, 512, 3), 255, np.uint8)
    array[:, :32] = 0
    array[:, -32:] = 0
    array[:, 255:257] = RED
    out = to_model_input(Image.fromarray(array), SPEC)
    white = expected_input_value(WHITE)
    assert np.all(out[:, :, 0] == white[:, None])
    assert np.all(out[:, :, -1] == white[:, None])
    red_columns = np.where(np.isclose(out[1, 100], expected_input_value(RED)[1]))[0]
    assert red_columns.tolist() == [111, 112]


def test_resize_smaller_than_crop_still_fills_the_crop(chelsea: Image.Image) -> None:
    small = SPEC.model_copy(update={"resize": 200})
    out = to_model_input(chelsea, small)
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out, to_model_input(chelsea, SPEC.model_copy(update={"resize": 224})))


def test_non_rgb_image_given_to_to_model_input_is_converted() -> None:
    gray = Image.new("L", (300, 300), 128)
    np.testing.assert_array_equal(
        to_model_input(gray, SPEC), to_model_input(Image.new("RGB", (300, 300), (128, 128, 128)), SPEC)
    )


# --- odd but valid inputs ---------------------------------------------------------------------------


def test_grayscale_png_becomes_three_equal_channels(sample_dir: Path) -> None:
    data = (sample_dir / "camera.png").read_bytes()
    image = decode_rgb(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (512, 512)
    gray = np.asarray(Image.open(sample_dir / "camera.png"))
    rgb = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)


def test_palette_png_transparency_becomes_white() -> None:
    image = Image.new("P", (20, 10), 0)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(1, (10, 0, 20, 10))  # right half: palette index 1 (blue), declared transparent
    data = encode(image, "PNG", transparency=1)
    rgb = pixels(decode_rgb(data, MAX_PIXELS))
    assert (rgb[:, :10] == RED).all()
    assert (rgb[:, 10:] == WHITE).all()


def test_gif_transparency_becomes_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([*GREEN, *BLACK] + [0] * 762)
    image.paste(1, (0, 0, 8, 4))  # top half: index 1 (black), declared transparent
    rgb = pixels(decode_rgb(encode(image, "GIF", transparency=1), MAX_PIXELS))
    assert (rgb[:4] == WHITE).all()
    assert (rgb[4:] == GREEN).all()


def test_rgba_is_composited_on_white() -> None:
    array = np.zeros((4, 3, 4), np.uint8)
    array[:, 0] = (0, 200, 0, 255)  # opaque green stays green
    array[:, 1] = (0, 0, 0, 0)  # fully transparent black becomes white
    array[:, 2] = (255, 0, 0, 128)  # half-transparent red becomes pink
    rgb = pixels(decode_rgb(encode(Image.fromarray(array), "PNG"), MAX_PIXELS))
    assert (rgb[:, 0] == (0, 200, 0)).all()
    assert (rgb[:, 1] == WHITE).all()
    assert np.abs(rgb[:, 2] - (255, 127, 127)).max() <= 1


def test_rgba_photo_matches_the_alpha_blend(chelsea: Image.Image) -> None:
    # The photo fading from opaque (left) to fully transparent (right).
    ramp = np.linspace(255, 0, chelsea.width).round().astype(np.uint8)
    photo = chelsea.copy()
    photo.putalpha(Image.fromarray(np.tile(ramp, (chelsea.height, 1))))
    data = encode(photo, "PNG")
    rgba = np.asarray(photo).astype(np.float64)
    alpha = rgba[:, :, 3:] / 255
    expected = rgba[:, :, :3] * alpha + 255 * (1 - alpha)
    assert np.abs(pixels(decode_rgb(data, MAX_PIXELS)) - expected).max() <= 1


def test_la_grayscale_with_alpha_is_composited() -> None:
    array = np.array([[[50, 255], [50, 0]]], np.uint8)
    rgb = pixels(decode_rgb(encode(Image.fromarray(array, "LA"), "PNG"), MAX_PIXELS))
    assert rgb[0, 0].tolist() == [50, 50, 50]
    assert rgb[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = np.zeros((32, 96, 4), np.uint8)
    cmyk[:, :32] = (255, 0, 0, 0)  # cyan
    cmyk[:, 32:64] = (0, 0, 0, 255)  # black
    cmyk[:, 64:] = (0, 0, 0, 0)  # paper white
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_rgb(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (96, 32)
    rgb = pixels(image)
    assert np.abs(rgb[8:24, 8:24] - (0, 255, 255)).max() <= 8
    assert np.abs(rgb[8:24, 40:56] - BLACK).max() <= 8
    assert np.abs(rgb[8:24, 72:88] - WHITE).max() <= 8


def test_16bit_gray_png_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 0x1234, 32768, 65535, 0x00FF, 0xFF00]], np.uint16)
    data = png16(samples, color_type=0)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = pixels(decode_rgb(data, MAX_PIXELS))
    assert rgb[0, :, 0].tolist() == [0, 0x12, 128, 255, 0, 0xFF]
    assert (rgb[0, :, 0] == rgb[0, :, 1]).all() and (rgb[0, :, 1] == rgb[0, :, 2]).all()


def test_16bit_gray_agrees_with_pils_16bit_rgb_reduction() -> None:
    values = np.arange(0, 65536, 257 * 3 + 11, dtype=np.uint16)[None, :]
    gray = pixels(decode_rgb(png16(values, color_type=0), MAX_PIXELS))
    rgb = pixels(decode_rgb(png16(np.repeat(values, 3, axis=1), color_type=2), MAX_PIXELS))
    np.testing.assert_array_equal(gray, rgb)


def test_16bit_gray_png_with_trns_key_is_white() -> None:
    samples = np.array([[1000, 40000]], np.uint16)
    rows = b"\x00" + samples.astype(">u2").tobytes()
    plain = png_bytes(2, 1, 16, 0, rows)
    trns = struct.pack(">I", 2) + b"tRNS" + struct.pack(">H", 1000)
    trns += struct.pack(">I", zlib.crc32(b"tRNS" + struct.pack(">H", 1000)))
    iend = plain.index(b"IDAT") - 4
    data = plain[:iend] + trns + plain[iend:]
    rgb = pixels(decode_rgb(data, MAX_PIXELS))
    assert rgb[0].tolist() == [[255, 255, 255], [156, 156, 156]]


def test_16bit_tiff_is_scaled() -> None:
    array = np.array([[0, 32768], [65535, 0x4000]], np.uint16)
    data = encode(Image.fromarray(array), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert pixels(decode_rgb(data, MAX_PIXELS))[:, :, 1].tolist() == [[0, 128], [255, 64]]


def test_float_tiff_in_unit_range_is_scaled_not_stretched() -> None:
    array = np.array([[0.25, 0.5], [0.75, 0.5]], np.float32)
    data = encode(Image.fromarray(array), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert pixels(decode_rgb(data, MAX_PIXELS))[:, :, 0].tolist() == [[64, 128], [191, 128]]


def test_float_tiff_outside_unit_range_is_stretched() -> None:
    array = np.array([[-2.0, 0.0], [2.0, np.nan]], np.float32)
    data = encode(Image.fromarray(array), "TIFF")
    assert pixels(decode_rgb(data, MAX_PIXELS))[:, :, 0].tolist() == [[0, 128], [255, 128]]


def test_int32_tiff_outside_16bit_range_is_stretched() -> None:
    array = np.array([[-1000, 0], [1000, 3000]], np.int32)
    data = encode(Image.fromarray(array), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert pixels(decode_rgb(data, MAX_PIXELS))[:, :, 2].tolist() == [[0, 64], [128, 255]]


def test_one_bit_png_is_black_and_white() -> None:
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    data = encode(Image.fromarray(checker), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    rgb = pixels(decode_rgb(data, MAX_PIXELS))
    np.testing.assert_array_equal(rgb[:, :, 0], np.where(checker, 255, 0))
    assert set(np.unique(rgb).tolist()) == {0, 255}


def test_animated_gif_sample_gives_its_first_frame(sample_dir: Path) -> None:
    data = (sample_dir / "no_time_for_that_tiny.gif").read_bytes()
    with Image.open(io.BytesIO(data)) as gif:
        first = np.asarray(gif.convert("RGB"))
        gif.seek(5)
        later = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(first, later), "frames must differ for this test to bite"
    image = decode_rgb(data, MAX_PIXELS)
    assert image.size == (14, 25)
    np.testing.assert_array_equal(np.asarray(image), first)
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("gif", 14, 25)


def test_animated_gif_first_frame_by_colour() -> None:
    frames = [solid((10, 10), color) for color in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("gif", 10, 10)
    assert (pixels(decode_rgb(data, MAX_PIXELS)) == RED).all()


def test_multipage_tiff_sample_gives_its_first_page(sample_dir: Path) -> None:
    data = (sample_dir / "multipage.tif").read_bytes()
    with Image.open(io.BytesIO(data)) as tiff:
        first = np.asarray(tiff)
        tiff.seek(1)
        second = np.asarray(tiff)
    assert not np.array_equal(first, second), "pages must differ for this test to bite"
    rgb = np.asarray(decode_rgb(data, MAX_PIXELS))
    np.testing.assert_array_equal(rgb[:, :, 0], first)
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("tiff", 10, 15)


def test_multipage_rgb_tiff_first_page_by_colour() -> None:
    pages = [solid((12, 8), color) for color in (BLUE, RED, GREEN)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("tiff", 12, 8)
    assert (pixels(decode_rgb(data, MAX_PIXELS)) == BLUE).all()


def test_float64_planar_tiff_is_refused_as_an_image_error(sample_dir: Path) -> None:
    # scikit-image's multipage_rgb.tif holds float64 planar samples, which PIL has no mode for.
    with pytest.raises(CorruptImage, match="tiff variant the decoder does not support"):
        decode_rgb((sample_dir / "multipage_rgb.tif").read_bytes(), MAX_PIXELS)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("PNG", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_lossless_formats_decode_to_the_exact_pixels(
    chelsea: Image.Image, fmt: str, params: dict[str, object]
) -> None:
    data = encode(chelsea, fmt, **params)
    assert sniff_format(data) == fmt.lower()
    image = decode_rgb(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (451, 300)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(chelsea))


def test_lossy_webp_decodes_close_to_the_original(chelsea: Image.Image) -> None:
    data = encode(chelsea, "WEBP", quality=90)
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("webp", 451, 300)
    diff = np.abs(pixels(decode_rgb(data, MAX_PIXELS)) - pixels(chelsea))
    assert diff.mean() < 4


def test_animated_webp_gives_its_first_frame() -> None:
    frames = [solid((16, 16), color) for color in (GREEN, RED)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("webp", 16, 16)
    assert (pixels(decode_rgb(data, MAX_PIXELS)) == GREEN).all()


@pytest.mark.parametrize(("orientation", "turns"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation: int, turns: int) -> None:
    # Orientation 6 = "rotate 90 clockwise to display", 8 = counter-clockwise, 3 = 180 degrees.
    stored = quadrants(128, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif)
    image = decode_rgb(data, MAX_PIXELS)
    expected = np.rot90(np.asarray(stored), k=turns).astype(np.int16)
    assert image.size == (expected.shape[1], expected.shape[0])
    assert np.abs(pixels(image) - expected).mean() < 3
    # The header still reports the stored size: orientation is a decode-time concern.
    assert inspect_image(data, MAX_PIXELS) == ImageInfo("jpeg", 128, 64)


def test_exif_mirror_orientation_in_lossless_tiff() -> None:
    stored = quadrants(8, 4)
    exif = Image.Exif()
    exif[0x0112] = 2  # mirrored horizontally
    image = decode_rgb(encode(stored, "TIFF", exif=exif), MAX_PIXELS)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stored)[:, ::-1])


@pytest.mark.parametrize("size", [(1, 1), (10000, 3), (3, 10000), (224, 224), (225, 5000)])
def test_tiny_and_extreme_shapes_give_a_full_input(size: tuple[int, int]) -> None:
    out = preprocess(encode(solid(size, (10, 200, 30)), "PNG"), SPEC, MAX_PIXELS)
    assert out.shape == (3, 224, 224)
    expected = expected_input_value((10, 200, 30))
    for channel in range(3):
        np.testing.assert_allclose(out[channel], expected[channel], rtol=0, atol=1e-6)


def test_extreme_aspect_keeps_the_centre_of_the_strip() -> None:
    # 10000x3: the crop window sees only the middle ~26 source columns; make them red, the rest blue.
    array = np.zeros((3, 10000, 3), np.uint8)
    array[:] = BLUE
    array[:, 4980:5020] = RED
    out = preprocess(encode(Image.fromarray(array), "PNG"), SPEC, MAX_PIXELS)
    np.testing.assert_allclose(out[:, 112, 112], expected_input_value(RED), atol=1e-6)


def test_box_resize_path_has_the_reference_geometry(
    chelsea: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = to_model_input(chelsea, SPEC)
    monkeypatch.setattr(pp, "_MAX_RESIZED_PIXELS", 0)  # force the bounded-memory path
    boxed = to_model_input(chelsea, SPEC)
    assert not np.array_equal(exact, boxed), "the box path must actually have run"
    levels = np.abs(exact - boxed) * np.asarray(STD, np.float32)[:, None, None] * 255
    assert levels.max() <= 6
    assert levels.mean() < 0.5


def test_concurrent_decodes_agree(photo_bytes: dict[str, bytes]) -> None:
    data = photo_bytes["rocket.jpg"]
    expected = preprocess(data, SPEC, MAX_PIXELS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: preprocess(data, SPEC, MAX_PIXELS), range(12)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


# --- sniffing and refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})],
)
def test_sniff_recognises_every_supported_format(fmt: str, params: dict[str, object]) -> None:
    assert sniff_format(encode(solid((4, 4), RED), fmt, **params)) == fmt.lower()


def test_supported_formats_constant() -> None:
    assert frozenset({"jpeg", "png", "gif", "webp", "bmp", "tiff"}) == SUPPORTED_FORMATS


def test_sniff_recognises_big_endian_tiff_and_bigtiff() -> None:
    assert sniff_format(b"MM\x00*" + b"\x00" * 20) == "tiff"
    assert sniff_format(b"II+\x00" + b"\x00" * 20) == "tiff"


def test_sniff_ignores_names_and_trusts_bytes(photo_bytes: dict[str, bytes]) -> None:
    # There is no filename parameter at all; a PNG is a PNG whatever it was called.
    assert sniff_format(photo_bytes["chelsea.png"]) == "png"
    assert sniff_format(photo_bytes["rocket.jpg"]) == "jpeg"


@pytest.mark.parametrize("call", [sniff_format, lambda d: inspect_image(d, 10), lambda d: decode_rgb(d, 10)])
def test_empty_upload(call: Callable[[bytes], object]) -> None:
    with pytest.raises(EmptyImage) as info:
        call(b"")
    assert info.value.code == "empty_image"
    assert info.value.http_status == 400


def test_empty_upload_through_preprocess() -> None:
    with pytest.raises(EmptyImage):
        preprocess(b"", SPEC, MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"hello, this is a plain text file\n", "text"),
        (b"BMW is a car brand, not a bitmap\n", "text"),
        ("caf\u00e9 cr\u00e8me".encode(), "text"),
        (b'{"image": "not really"}', "JSON"),
        (b"<!DOCTYPE html>\n<html><body>hi</body></html>", "HTML"),
        (b"  <html><head></head></html>", "HTML"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', "SVG"),
        (b'\xef\xbb\xbf<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "SVG"),
        (b'<?xml version="1.0"?><catalog/>', "XML"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "PostScript"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC/HEIF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "AVIF"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ", "JPEG 2000"),
        (b"8BPS\x00\x01" + b"\x00" * 20, "Photoshop PSD"),
        (b"PK\x03\x04" + b"\x00" * 26, "ZIP archive"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "RIFF 'WAVE'"),
        (b"\x00\x01\x02\x03\xfe\xfd\xfc\xfb\x80\x81", "unrecognised data (first bytes 00 01 02"),
    ],
)
def test_non_images_are_refused_and_named(data: bytes, named: str) -> None:
    for call in (sniff_format, lambda d: inspect_image(d, MAX_PIXELS), lambda d: decode_rgb(d, MAX_PIXELS)):
        with pytest.raises(UnsupportedImageFormat) as info:
            call(data)
        assert info.value.code == "unsupported_image_format"
        assert info.value.http_status == 415
        assert info.value.message.startswith(named), info.value.message


def test_avif_is_refused_even_though_pil_could_read_it(chelsea: Image.Image) -> None:
    # The installed PIL has an AVIF plugin; only the six supported formats may reach a decoder.
    data = encode(chelsea.resize((32, 32)), "AVIF")
    with pytest.raises(UnsupportedImageFormat) as info:
        decode_rgb(data, MAX_PIXELS)
    assert info.value.message.startswith("AVIF")


@pytest.mark.parametrize("name", ["rocket.jpg", "chelsea.png"])
def test_truncated_file_is_corrupt_but_its_header_is_fine(photo_bytes: dict[str, bytes], name: str) -> None:
    data = photo_bytes[name]
    half = data[: len(data) // 2]
    assert inspect_image(half, MAX_PIXELS) == inspect_image(data, MAX_PIXELS)
    for call in (decode_rgb, lambda d, m: preprocess(d, SPEC, m)):
        with pytest.raises(CorruptImage) as info:
            call(half, MAX_PIXELS)
        assert info.value.code == "corrupt_image"
        assert info.value.http_status == 400
        assert "truncated" in info.value.message


def test_truncated_gif_and_webp_are_corrupt(chelsea: Image.Image) -> None:
    for fmt in ("GIF", "WEBP"):
        data = encode(chelsea, fmt)
        with pytest.raises(CorruptImage):
            decode_rgb(data[: len(data) // 2], MAX_PIXELS)


def test_header_only_jpeg_is_corrupt(photo_bytes: dict[str, bytes]) -> None:
    data = photo_bytes["rocket.jpg"]
    with pytest.raises(CorruptImage):
        decode_rgb(data[:700], MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
        b"\xff\xd8\xff" + np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes(),
        b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00" + b"\xff" * 64,
        b"II*\x00" + b"\xff" * 64,
        b"\x89PNG\r\n\x1a\n",
    ],
)
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_garbage_behind_a_valid_signature_is_corrupt(data: bytes) -> None:
    for call in (inspect_image, decode_rgb):
        with pytest.raises(CorruptImage) as info:
            call(data, MAX_PIXELS)
        assert info.value.code == "corrupt_image"
        assert "BytesIO" not in info.value.message


def test_garbage_idat_is_corrupt() -> None:
    body = np.random.default_rng(3).integers(0, 256, 3000, np.uint8).tobytes()
    data = png_bytes(32, 32, 8, 2, b"")
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    data = data[: start - 8] + chunk + data[start + length + 4 :]
    with pytest.raises(CorruptImage):
        decode_rgb(data, MAX_PIXELS)


# --- decompression bombs and the pixel limit -------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG header declaring width x height, followed by a few KB of compressed zero rows."""
    return png_bytes(width, height, 8, 2, bytes(20 * (1 + 3 * min(width, 50_000))))


@pytest.fixture
def measured() -> Iterator[Callable[[], tuple[float, int]]]:
    """Wall time and tracemalloc peak since the fixture started."""
    tracemalloc.start()
    started = time.perf_counter()
    yield lambda: (time.perf_counter() - started, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()


def test_png_bomb_is_refused_before_any_pixel(
    decode_spy: list[tuple[int, int]], measured: Callable[[], tuple[float, int]]
) -> None:
    data = png_bomb(50_000, 50_000)
    assert len(data) < 10_000
    for call in (inspect_image, decode_rgb, lambda d, m: preprocess(d, SPEC, m)):
        with pytest.raises(ImageTooLarge) as info:
            call(data, MAX_PIXELS)
        assert info.value.code == "image_too_large"
        assert info.value.http_status == 413
    elapsed, peak = measured()
    assert decode_spy == []
    assert elapsed < 2.0
    assert peak < 5_000_000


def test_our_own_limit_applies_below_pils_limit(decode_spy: list[tuple[int, int]]) -> None:
    # 8000x6000 = 48 Mpx: under PIL's default guard (~89 Mpx), over our limit.
    data = png_bomb(8000, 6000)
    for call in (inspect_image, decode_rgb):
        with pytest.raises(ImageTooLarge, match=r"8000x6000 = 48,000,000 pixels; at most 40,000,000"):
            call(data, MAX_PIXELS)
    assert decode_spy == []


def test_jpeg_bomb_is_refused_before_any_pixel(
    decode_spy: list[tuple[int, int]], measured: Callable[[], tuple[float, int]]
) -> None:
    for width, height in ((30_000, 30_000), (8000, 6000), (65_000, 700)):
        data = jpeg_declaring(width, height)
        assert len(data) < 2000
        for call in (inspect_image, decode_rgb):
            with pytest.raises(ImageTooLarge) as info:
                call(data, MAX_PIXELS)
            # Refused by our check ("WxH = ...") or, above ~179 Mpx, by PIL's ("Image size (N pixels)").
            message = info.value.message
            assert f"{width}x{height} =" in message or f"({width * height} pixels)" in message, message
    elapsed, peak = measured()
    assert decode_spy == []
    assert elapsed < 2.0
    assert peak < 5_000_000


def test_inspect_reads_headers_only(decode_spy: list[tuple[int, int]]) -> None:
    # Allowed by the limit, the 48 Mpx JPEG header is reported without decoding a pixel.
    assert inspect_image(jpeg_declaring(8000, 6000), 48_000_000) == ImageInfo("jpeg", 8000, 6000)
    assert inspect_image(png_bomb(8000, 6000), 48_000_000) == ImageInfo("png", 8000, 6000)
    assert decode_spy == []


def test_inspect_of_sample_files_decodes_nothing(sample_dir: Path, decode_spy: list[tuple[int, int]]) -> None:
    for name in ("chelsea.png", "rocket.jpg", "no_time_for_that_tiny.gif", "multipage.tif"):
        info = inspect_image((sample_dir / name).read_bytes(), MAX_PIXELS)
        assert info.width > 0 and info.height > 0
    assert decode_spy == []


def test_pixel_limit_is_inclusive_at_the_boundary(decode_spy: list[tuple[int, int]]) -> None:
    data = encode(solid((100, 50), GREEN), "PNG")
    assert inspect_image(data, 5000) == ImageInfo("png", 100, 50)
    assert decode_rgb(data, 5000).size == (100, 50)
    assert decode_spy == [(100, 50)]
    for call in (inspect_image, decode_rgb):
        with pytest.raises(ImageTooLarge, match="100x50 = 5,000 pixels; at most 4,999"):
            call(data, 4999)
    assert decode_spy == [(100, 50)]


def test_first_gif_frame_size_is_what_is_checked() -> None:
    frames = [solid((40, 30), RED), solid((40, 30), GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_rgb(data, 1200).size == (40, 30)
    with pytest.raises(ImageTooLarge):
        decode_rgb(data, 1199)


def gif_declaring(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first image descriptor is larger than its logical screen (PIL grows the canvas)."""
    return (
        b"GIF89a"
        + struct.pack("<HH", *screen)
        + b"\x00\x00\x00"  # no global colour table
        + b"\x2c"
        + struct.pack("<HHHH", 0, 0, *frame)
        + b"\x80\xff\x00\x00\x00\xff\x00"  # 2-entry local colour table
        + b"\x02\x02\x44\x01\x00\x3b"
    )


def test_gif_frame_larger_than_its_screen_is_checked(decode_spy: list[tuple[int, int]]) -> None:
    for call in (inspect_image, decode_rgb):
        with pytest.raises(ImageTooLarge, match="8000x6000"):
            call(gif_declaring((10, 10), (8000, 6000)), MAX_PIXELS)
        with pytest.raises(ImageTooLarge):
            call(gif_declaring((10, 10), (30_000, 30_000)), MAX_PIXELS)
    assert decode_spy == []


def test_pils_bomb_warning_raised_as_error_is_mapped() -> None:
    # 10000x10000 = 100 Mpx: above PIL's warning threshold (~89 Mpx), below its error threshold.
    data = png_bomb(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            inspect_image(data, 200_000_000)


def test_pils_bomb_error_is_mapped_even_with_a_generous_limit() -> None:
    with pytest.raises(ImageTooLarge, match="safety limit"):
        inspect_image(png_bomb(50_000, 50_000), 10**12)


def test_invalid_max_pixels_is_a_programming_error(photo_bytes: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        inspect_image(photo_bytes["chelsea.png"], 0)


def test_all_refusals_are_image_errors() -> None:
    for data in (b"", b"text", png_bomb(50_000, 50_000), b"\x89PNG\r\n\x1a\nxx"):
        with pytest.raises(ImageError):
            preprocess(data, SPEC, MAX_PIXELS)


def test_import_loads_no_torch_and_leaves_pil_globals_alone() -> None:
    # In a fresh interpreter: this test process may hold other modules' PIL settings.
    code = (
        "import sys\n"
        "from PIL import Image, ImageFile\n"
        "before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "import shared.preprocess\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before, 'PIL globals changed'\n"
        "assert before[1] is False\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_tiff_whose_ifd_chain_loops_does_not_hang() -> None:
    data = bytearray(encode(solid((4, 4), (1, 2, 3)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[ifd : ifd + 2])[0]
    next_ifd = ifd + 2 + 12 * entries
    data[next_ifd : next_ifd + 4] = struct.pack("<I", ifd)  # the first IFD names itself as the next
    assert inspect_image(bytes(data), 100) == ImageInfo("tiff", 4, 4)
    assert decode_rgb(bytes(data), 100).getpixel((0, 0)) == (1, 2, 3)
