"""Output files before storage: keys, image sizes, the simulation's PNGs (no services)."""

from __future__ import annotations

import io
import zlib

from emp_tasks import storage
from emp_tasks.connectors.simulation import png
from emp_tasks.worker.outputs import _Rejoined, image_size


def test_output_keys_are_customer_step_attempt_and_number():
    assert storage.output_key("acme", "s-1", 2, 0, "png") == "acme/s-1/2/0.png"
    assert storage.output_key(None, "s-1", 1, 3, "mp4") == "_/s-1/1/3.mp4"
    assert storage.output_key("../etc", "s", 1, 0, "png") == "etc/s/1/0.png"
    assert storage.valid_key("acme/s-1/2/0.png")
    for bad in ("acme/s-1/2", "../x/1/0.png", "a/b/c/d/e", "a//1/0.png", "a/b/1/.."):
        assert not storage.valid_key(bad)


def test_extensions_follow_content_types():
    assert storage.extension_for("image/png") == "png"
    assert storage.extension_for("image/jpeg; q=1") == "jpg"
    assert storage.extension_for("video/mp4") == "mp4"
    assert storage.content_type_of("a/b/1/0.webp") == "image/webp"


def test_the_simulations_png_is_deterministic_and_its_size_is_read_from_its_header():
    first, again, other = png(40, 30, "7/0"), png(40, 30, "7/0"), png(40, 30, "7/1")
    assert first == again != other
    assert image_size(first) == (40, 30)
    assert len(first) > 40 * 30 * 3  # noise does not compress


def test_image_sizes_of_gif_jpeg_and_webp_headers():
    assert image_size(b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little")) == (
        300,
        200,
    )
    jpeg = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xc0\x00\x11\x08" + (480).to_bytes(2, "big")
    jpeg += (640).to_bytes(2, "big") + b"\x03" + b"\x00" * 12
    assert image_size(jpeg) == (640, 480)
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (99).to_bytes(3, "little")
    vp8x += (49).to_bytes(3, "little")
    assert image_size(vp8x) == (100, 50)
    assert image_size(zlib.compress(b"not an image")) is None


def test_a_stream_read_ahead_is_whole_again():
    source = io.BytesIO(b"0123456789" * 1000)
    head = source.read(15)
    joined = _Rejoined(head, source)
    assert joined.read(4) + joined.read(100) + joined.read() == b"0123456789" * 1000
