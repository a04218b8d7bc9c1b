"""Robust image loading: formats, modes, orientation, damaged files, bombs and data URLs."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmstack.data.images import decode_data_url, encode_data_url, load_image, to_rgb
from mmstack.errors import ImageError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_supported_formats_decode_to_rgb(tmp_path, fmt):
    im = Image.new("RGB", (24, 10), RED)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encode(im, fmt))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (24, 10)
    assert close(out.getpixel((5, 5)), RED)
    assert close(load_image(path.read_bytes()).getpixel((0, 0)), RED)


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close(load_image(data).getpixel((3, 3)), RED)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    out = load_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), RED, tol=30) and close(out.getpixel((10, 35)), BLUE, tol=30)


def test_palette_with_transparency_is_composited_on_white():
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    im.putpixel((3, 1), 1)
    data = encode(im, "PNG", transparency=0)  # palette index 0 (green) is transparent
    out = load_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 1)) == RED


def test_colour_keyed_rgb_png_is_composited_on_white():
    im = Image.new("RGB", (2, 1), RED)
    im.putpixel((1, 0), BLUE)
    out = load_image(encode(im, "PNG", transparency=BLUE))
    assert out.getpixel((0, 0)) == RED and out.getpixel((1, 0)) == (255, 255, 255)


def test_concurrent_loads_leave_warning_filters_alone():
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    data = [encode(Image.new("RGB", (8 + i, 8), RED), "PNG") for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda d: load_image(d).size, data))
    assert sizes == [(8 + i, 8) for i in range(64)]
    assert warnings.filters == before


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.putpixel((2, 0), (255, 0, 0, 255))
    im = rgba if mode == "RGBA" else Image.new("LA", (3, 1), (0, 0))
    if mode == "LA":
        im.putpixel((1, 0), (0, 128))
        im.putpixel((2, 0), (0, 255))
    out = load_image(encode(im, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, not black or red
    half = out.getpixel((1, 0))
    expected_half = (255, 127, 127) if mode == "RGBA" else (127, 127, 127)
    assert close(half, expected_half, tol=2)
    assert out.getpixel((2, 0)) == ((255, 0, 0) if mode == "RGBA" else (0, 0, 0))


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_is_converted(fmt):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(encode(im, fmt))
    assert out.mode == "RGB" and close(out.getpixel((4, 4)), RED, tol=20)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = np.asarray(load_image(encode(im, fmt)))
    assert out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]  # a naive convert("L") clips 1000 to 255
    assert (out[..., 0] == out[..., 2]).all()


def test_32_bit_and_float_modes_are_rescaled():
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_grey_and_1_bit_modes():
    assert load_image(encode(Image.new("L", (2, 2), 100), "PNG")).getpixel((0, 0)) == (100, 100, 100)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    out = load_image(encode(bits, "PNG"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise_image_error_naming_the_file(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.\w+: cannot decode image, the file is truncated or corrupt"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_missing_only_its_tail_is_truncated():
    data = encode(Image.new("RGB", (16, 16), RED), "PNG")
    assert Image.open(io.BytesIO(data[:-20])).convert("RGB").getpixel((0, 0)) == RED  # Pillow alone accepts it
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[:-20])


def test_random_bytes_and_text_files_are_not_images(tmp_path):
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(np.random.default_rng(1).bytes(500))
    fake = tmp_path / "fake.png"
    fake.write_text("hello, I am not a picture")
    with pytest.raises(ImageError, match=r"fake\.png: not a supported image"):
        load_image(fake)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose IDAT holds only a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header():
    # 9000 x 9000 = 81M: above our 64M default, below Pillow's own limit. The file holds almost no pixel
    # data, so "too large" (not "truncated") shows the size was checked before any decoding.
    with pytest.raises(ImageError, match=r"too large \(9000x9000 = 81000000 pixels > max_pixels=64000000\)"):
        load_image(png_header(9000, 9000), name="bomb.png")
    with pytest.raises(ImageError, match="truncated"):  # the same file at a small size does get decoded
        load_image(png_header(30, 30))
    with pytest.raises(ImageError, match="too large"):  # Pillow's DecompressionBombError, translated
        load_image(png_header(100_000, 100_000))
    small = encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(ImageError, match="max_pixels=399"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).size == (20, 20)


def test_data_urls_round_trip_and_reject_bad_input():
    im = Image.new("RGB", (5, 3), BLUE)
    url = encode_data_url(im)
    assert url.startswith("data:image/png;base64,")
    out = decode_data_url(url)
    assert out.size == (5, 3) and out.getpixel((2, 1)) == BLUE
    jpeg = "data:image/jpeg;base64," + base64.b64encode(encode(im, "JPEG")).decode()
    assert close(decode_data_url(jpeg).getpixel((0, 0)), BLUE)
    with pytest.raises(ImageError, match="invalid base64"):
        decode_data_url("data:image/png;base64,@@not*base64@@")
    with pytest.raises(ImageError, match="MIME type 'text/plain'"):
        decode_data_url("data:text/plain;base64," + base64.b64encode(b"hi").decode())
    with pytest.raises(ImageError, match="not a base64 image data URL"):
        decode_data_url("http://example.com/cat.png")
    with pytest.raises(ImageError, match="not a supported image"):
        decode_data_url("data:image/png;base64," + base64.b64encode(b"not a png at all").decode())
    with pytest.raises(ImageError, match="too large"):
        decode_data_url(url, max_pixels=10)
