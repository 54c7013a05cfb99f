"""Image loading: every mode becomes RGB; bad files give one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from regap.errors import RegapError
from regap.images import load_image


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (20, 10), (200, 30, 40)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray((np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16))
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_transparent_pixels_composite_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    array = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "d.png")
    loaded = load_image(tmp_path / "d.png")
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((1, 0)) == (255, 255, 255)


def test_missing_corrupt_and_directory(tmp_path):
    with pytest.raises(RegapError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(RegapError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(RegapError, match="not a file"):
        load_image(tmp_path)


def test_truncated_file_is_reported(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(RegapError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 Mpx, tiny file
    with pytest.raises(RegapError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stores the sensor's pixels plus an orientation tag; it must load upright."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left half is on top once rotated clockwise
    assert bottom[2] > 200 and bottom[0] < 60
