"""Pictures as people have them: one loader, equal to transformers' path, upright end to end.

Every picture is built here, in the formats phones, scanners and editors write: EXIF-rotated
JPEGs, CMYK and YCCK JPEGs, 16-bit and palette PNGs, animated GIF / WebP. The reference is what
transformers gives a user who opens the file as its pipelines do (``exif_transpose(Image.open(f))``)
and hands it to the checkpoint's processor (the committed paligemma-shapes model's, 112 px).
"""

from __future__ import annotations

import io
import json
from functools import partial
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

import paligemma_edge
from paligemma_edge.runtime.drawing import draw_results
from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.images import ImageTooLargeError, load_image
from paligemma_edge.runtime.bundle.manifest import read_manifest
from paligemma_edge.runtime.generation.parsing import Segmentation
from paligemma_edge.runtime.preprocess import preprocess

from .conftest import SHAPES_CHECKPOINT, run_cli

ORIENTATION = 0x0112
# What makes the stored (sensor) pixels of a picture tagged with EXIF orientation n from its
# upright pixels (the EXIF definitions: 6 is "turn 90 degrees clockwise to view").
SENSOR: dict[int, Image.Transpose | None] = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def _as_sensor(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a sensor holds for a picture shown upright with this EXIF orientation."""
    method = SENSOR[orientation]
    return upright if method is None else upright.transpose(method)


# -- pictures -----------------------------------------------------------------------------------


def _scene(width: int = 150, height: int = 97, seed: int = 0, noise: int = 60) -> Image.Image:
    """An asymmetric picture (gradients, noise, a red disc top left, a blue square bottom right)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    speckle = rng.integers(0, noise + 1, (height, width))
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 150 // (width + height) + speckle], -1)
    picture = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((5, 5, 45, 45), fill=(215, 40, 40))
    draw.rectangle((width - 40, height - 30, width - 8, height - 6), fill=(40, 80, 215))
    return picture


def _encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _phone_jpeg(orientation: int) -> bytes:
    """What a phone writes: the sensor's pixels and the orientation to show them in."""
    return _encode(_scene(), "JPEG", quality=92, exif=_exif(orientation))


def _ycck_jpeg() -> bytes:
    """A 4-channel JPEG in Adobe's YCCK transform (what Photoshop writes for CMYK): the inverted
    CMY as RGB -> YCbCr (JFIF's matrix), K as it is, and the APP14 marker's transform byte set to 2."""
    cmyk = np.asarray(_scene().convert("CMYK"), dtype=np.float64)
    r, g, b = (255 - cmyk[..., i] for i in range(3))
    planes = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                       -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                       0.5 * r - 0.418688 * g - 0.081312 * b + 128, cmyk[..., 3]], -1)
    data = bytearray(_encode(Image.fromarray(np.clip(np.round(planes), 0, 255).astype(np.uint8), "CMYK"), "JPEG",
                             quality=95))
    adobe = data.index(b"Adobe")  # APP14: "Adobe", version (2), flags0 (2), flags1 (2), transform (1)
    if data[adobe + 11] != 0:
        raise AssertionError("Pillow's CMYK JPEG has no Adobe marker with transform 0")
    data[adobe + 11] = 2
    return bytes(data)


def _with_alpha(picture: Image.Image, mode: str) -> Image.Image:
    out = picture.convert(mode)
    ramp = (np.arange(picture.width * picture.height).reshape(picture.height, picture.width) * 7) % 256
    out.putalpha(Image.fromarray(ramp.astype(np.uint8)))
    return out


def _frames() -> list[Image.Image]:
    """Three frames; the second and third unlike the first (turned, other noise)."""
    return [_scene(seed=0), _scene(seed=1).transpose(Image.Transpose.ROTATE_180), _scene(seed=2)]


def _palette() -> Image.Image:
    return _scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=12)


PICTURES: dict[str, Callable[[], bytes]] = {
    **{f"jpeg-exif-{n}": partial(_phone_jpeg, n) for n in range(1, 9)},
    "png-exif-6": lambda: _encode(_scene(), "PNG", exif=_exif(6)),
    "webp-exif-8": lambda: _encode(_scene(), "WEBP", lossless=True, exif=_exif(8)),
    "cmyk-jpeg": lambda: _encode(_scene().convert("CMYK"), "JPEG", quality=92),
    "ycck-jpeg": _ycck_jpeg,
    "cmyk-jpeg-exif-5": lambda: _encode(_scene().convert("CMYK"), "JPEG", quality=92, exif=_exif(5)),
    "greyscale-png": lambda: _encode(_scene().convert("L"), "PNG"),
    "bilevel-png": lambda: _encode(_scene().convert("1"), "PNG"),
    # 0..765: Pillow (and so the processor) clips 16-bit values to 8 bits, so part is clipped
    "16-bit-png": lambda: _encode(Image.fromarray(np.asarray(_scene().convert("L"), np.uint16) * 3), "PNG"),
    "32-bit-tiff": lambda: _encode(Image.fromarray(np.asarray(_scene().convert("L"), np.int32) * 2), "TIFF"),
    "palette-png": lambda: _encode(_palette(), "PNG"),
    "palette-png-transparent": lambda: _encode(_palette(), "PNG", transparency=2),
    "rgb-png-transparent-colour": lambda: _encode(_scene(), "PNG", transparency=(40, 80, 215)),
    "la-png": lambda: _encode(_with_alpha(_scene(), "LA"), "PNG"),
    "rgba-png": lambda: _encode(_with_alpha(_scene(), "RGBA"), "PNG"),
    "animated-gif": lambda: _encode(_frames()[0], "GIF", save_all=True, append_images=_frames()[1:], duration=80),
    "animated-gif-transparent": lambda: _encode(
        _palette(), "GIF", save_all=True, transparency=1, disposal=2,
        append_images=[f.convert("P", palette=Image.Palette.ADAPTIVE, colors=12) for f in _frames()[1:]]),
    "animated-webp": lambda: _encode(_frames()[0], "WEBP", save_all=True, append_images=_frames()[1:], lossless=True),
    "animated-webp-alpha": lambda: _encode(_with_alpha(_frames()[0], "RGBA"), "WEBP", save_all=True, lossless=True,
                                           append_images=[_with_alpha(f, "RGBA") for f in _frames()[1:]]),
}


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_pictures_are_what_they_claim():
    """The builders really write the modes and tags they are named for (read back by Pillow)."""
    for n in range(1, 9):
        assert _opened(PICTURES[f"jpeg-exif-{n}"]()).getexif()[ORIENTATION] == n
    ycck, cmyk = _opened(_ycck_jpeg()), _opened(PICTURES["cmyk-jpeg"]())
    assert (ycck.mode, ycck.info["adobe_transform"], cmyk.info["adobe_transform"]) == ("CMYK", 2, 0)
    # libjpeg's YCCK -> CMYK gives the picture's CMYK back (up to JPEG loss): the transform is real
    error = np.abs(np.asarray(ycck, np.int16) - np.asarray(_scene().convert("CMYK"), np.int16))
    assert error.mean() < 2
    modes = {"16-bit-png": "I;16", "32-bit-tiff": "I", "palette-png-transparent": "P", "la-png": "LA",
             "bilevel-png": "1", "greyscale-png": "L"}
    for name, mode in modes.items():
        assert _opened(PICTURES[name]()).mode == mode, name
    assert _opened(PICTURES["palette-png-transparent"]()).info["transparency"] == 2
    assert np.asarray(_opened(PICTURES["16-bit-png"]())).max() > 255
    for name in ("animated-gif", "animated-gif-transparent", "animated-webp", "animated-webp-alpha"):
        assert getattr(_opened(PICTURES[name]()), "n_frames", 1) == 3, name


# -- pixels against transformers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(SHAPES_CHECKPOINT, backend="pil")


@pytest.fixture(scope="module")
def spec(shapes_bundle):
    return read_manifest(shapes_bundle).image


def _reference(processor, picture) -> np.ndarray:
    return processor(images=[picture], text=["<image>caption en"], return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_pixels_equal_transformers_from_a_path_bytes_a_file_and_pil(name, processor, spec, tmp_path):
    data = PICTURES[name]()
    theirs = _reference(processor, ImageOps.exif_transpose(_opened(data)))
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    for given, source in [("path", path), ("str path", str(path)), ("bytes", data),
                          ("file", io.BytesIO(data)), ("PIL image", _opened(data))]:
        ours = preprocess([load_image(source)], spec)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=f"{name} given as {given}")


@pytest.mark.parametrize("shape", [(41, 67), (41, 67, 1), (41, 67, 3), (41, 67, 4)])
def test_arrays_equal_transformers(shape, processor, spec):
    array = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    given = array.reshape(shape[:2]) if len(shape) == 3 and shape[2] == 1 else array
    theirs = _reference(processor, array if len(shape) == 3 else array[..., None])
    np.testing.assert_allclose(preprocess([load_image(given)], spec), theirs, rtol=0, atol=1e-5)


# -- what the loader gives, against the pictures themselves ----------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_pictures_come_out_upright(orientation):
    upright = _scene(noise=0)
    sensor = _as_sensor(upright, orientation)
    lossless = _encode(sensor, "PNG", exif=_exif(orientation))
    assert np.array_equal(np.asarray(load_image(lossless)), np.asarray(upright))
    phone = load_image(_encode(sensor, "JPEG", quality=95, exif=_exif(orientation)))
    assert phone.size == upright.size
    assert np.abs(np.asarray(phone, np.int16) - np.asarray(upright, np.int16)).mean() < 2


def test_an_upright_pil_image_is_not_turned_twice():
    once = load_image(_phone_jpeg(6))
    assert np.array_equal(np.asarray(load_image(ImageOps.exif_transpose(_opened(_phone_jpeg(6))))), np.asarray(once))
    assert np.array_equal(np.asarray(load_image(once)), np.asarray(once))


def test_animations_give_their_first_frame():
    first, second = (np.asarray(f, np.int16) for f in _frames()[:2])
    webp = np.asarray(load_image(PICTURES["animated-webp"]()), np.int16)
    assert np.array_equal(webp, first)
    gif = np.asarray(load_image(PICTURES["animated-gif"]()), np.int16)  # 256 colours: close, not equal
    assert np.abs(gif - first).mean() < 8 < np.abs(gif - second).mean()


def test_transparency_is_composited_onto_white():
    rgba = np.array([[[200, 0, 0, 0], [0, 0, 200, 255]], [[0, 200, 0, 128], [9, 9, 9, 0]]], np.uint8)
    pixels = np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [0, 0, 200]
    assert pixels[1, 1].tolist() == [255, 255, 255]
    assert abs(int(pixels[1, 0, 0]) - 127) <= 1 and abs(int(pixels[1, 0, 1]) - 227) <= 1  # half green on white
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 200])
    pixels = np.asarray(load_image(_encode(palette, "PNG", transparency=1)))
    assert pixels[0, 1].tolist() == pixels[1, 1].tolist() == [255, 255, 255]
    assert pixels[0, 0].tolist() == [10, 20, 30] and pixels[1, 0].tolist() == [0, 0, 200]


@pytest.mark.parametrize("source, message", [
    (b"this is not a picture", "not a supported image"),
    (b"", "empty"),
    (_phone_jpeg(6)[:400], "not a readable image"),
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4, 5), np.uint8), "HxWxC"),
    (np.zeros((0, 4, 3), np.uint8), "uint8"),
    (12, "cannot read an image from a int"),
    ("/no/such/picture.jpg", "no such image file"),
])
def test_unreadable_input_is_one_line(source, message):
    with pytest.raises(InputError) as raised:
        load_image(source)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_pixel_limit_is_checked_before_decoding():
    data = _encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="3000x2000 pixels; at most 5000000"):
        load_image(data, max_pixels=5_000_000)
    assert load_image(data, max_pixels=6_000_000).size == (3000, 2000)


def test_uploads_and_camera_frames_use_the_same_loader():
    from paligemma_edge.apps.video_sources import frame_to_picture
    from paligemma_edge.apps.server import HTTPProblem, decode_image

    phone = _phone_jpeg(6)
    assert np.array_equal(np.asarray(decode_image(phone, 10**6)), np.asarray(load_image(phone)))
    assert decode_image(phone, 10**6).size == (97, 150)
    for data, status, words in [(b"GIF89a garbage", 415, "not a supported image"), (phone[:300], 415, "readable"),
                                (phone, 413, "150x97 pixels")]:
        with pytest.raises(HTTPProblem) as raised:
            decode_image(data, 97 * 150 - 1 if status == 413 else 10**6)
        assert (raised.value.status, words in str(raised.value)) == (status, True)
    rgb = np.asarray(_scene())
    bgra = np.dstack([rgb[..., ::-1], np.zeros(rgb.shape[:2], np.uint8)])  # alpha 0, as some capture backends give
    for frame in (bgra[..., :3], bgra):
        assert np.array_equal(np.asarray(frame_to_picture(frame)), rgb)  # opaque: not composited onto white


# -- end to end: boxes, masks and drawings in the upright picture's pixels --------------------------

# A picture like the shapes model's scenes, wider than tall, so that turning it changes its size.
WIDTH, HEIGHT = 280, 224
CIRCLE, SQUARE = (28, 44, 98, 114), (173, 100, 237, 164)


def _upright_drawing() -> Image.Image:
    picture = Image.new("RGB", (WIDTH, HEIGHT), (238, 236, 230))
    draw = ImageDraw.Draw(picture)
    draw.ellipse(CIRCLE, fill=(215, 40, 40))
    draw.rectangle(SQUARE, fill=(40, 80, 215))
    return picture


def _phone_photo(tmp_path, orientation: int):
    """The drawing as a phone stores it (sensor pixels + orientation), and its upright pixels as a PNG."""
    sensor = _as_sensor(_upright_drawing(), orientation)
    photo = tmp_path / f"photo-{orientation}.jpg"
    sensor.save(photo, quality=92, exif=_exif(orientation))
    upright = tmp_path / f"photo-{orientation}-upright.png"
    ImageOps.exif_transpose(Image.open(photo)).save(upright)
    return photo, upright


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area(a) + area(b) - inter)


def _found(result) -> list:
    return [(o.label, tuple(o.box)) for o in result.objects]


def test_python_api_finds_objects_in_the_upright_picture(shapes_bundle, tmp_path):
    with paligemma_edge.load(shapes_bundle) as model:
        for orientation in range(2, 9):
            photo, upright = _phone_photo(tmp_path, orientation)
            found = _found(model.detect(photo, ["circle", "square"]))
            assert found == _found(model.detect(upright, ["circle", "square"])), orientation
            assert found == _found(model.detect(photo.read_bytes(), ["circle", "square"])), orientation
            boxes = dict(found)
            assert _iou(boxes["circle"], CIRCLE) > 0.5 and _iou(boxes["square"], SQUARE) > 0.5, (orientation, found)
        segmented = model.segment(photo, ["circle"])
    (circle,) = [o for o in segmented.objects if o.label == "circle"]
    assert circle.mask.shape == (HEIGHT, WIDTH)
    x0, y0, x1, y1 = CIRCLE
    assert circle.mask[y0:y1, x0:x1].sum() > 0.8 * circle.mask.sum() > 0


def _json_lines(stdout: str) -> list[dict]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    for row in rows:
        row.pop("timings")
    return rows


def test_run_json_and_draw_are_in_the_upright_picture(shapes_bundle, tmp_path):
    photo, upright = _phone_photo(tmp_path, 6)
    prompts = ["--prompt", "detect circle ; square", "--prompt", "segment circle"]
    on_photo = run_cli("run", str(shapes_bundle), "--image", str(photo), *prompts, "--json",
                       "--max-new-tokens", "48", check=True)
    on_upright = run_cli("run", str(shapes_bundle), "--image", str(upright), *prompts, "--json",
                         "--max-new-tokens", "48", check=True)
    rows = _json_lines(on_photo.stdout)
    assert rows == _json_lines(on_upright.stdout)
    boxes = {d["label"]: d["box"] for d in rows[0]["detections"]}
    assert _iou(boxes["circle"], CIRCLE) > 0.5 and _iou(boxes["square"], SQUARE) > 0.5
    assert rows[1]["segmentations"][0]["mask"]["size"] == [HEIGHT, WIDTH]

    drawing = tmp_path / "drawn.png"
    run_cli("run", str(shapes_bundle), "--image", str(photo), "--task", "detect", "--objects", "circle ; square",
            "--draw", str(drawing), "--max-new-tokens", "48", check=True)
    with paligemma_edge.load(shapes_bundle) as model:
        objects = model.detect(photo, ["circle", "square"]).objects
    drawn = Image.open(drawing)
    assert drawn.size == (WIDTH, HEIGHT)
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_results(Image.open(upright), objects)))
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_results(photo, objects)))  # the loader turns it too


def test_drawing_refuses_masks_of_another_picture():
    objects = [Segmentation("circle", CIRCLE, np.ones((HEIGHT, WIDTH), bool))]  # found on the upright picture
    with pytest.raises(InputError, match="280x224 picture cannot be drawn on a 224x280"):
        draw_results(np.zeros((WIDTH, HEIGHT, 3), np.uint8), objects)  # the sensor's size, no orientation


def test_a_broken_photo_is_one_line_from_the_cli(shapes_bundle, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_phone_jpeg(6)[:500])
    result = run_cli("run", str(shapes_bundle), "--image", str(broken), "--task", "caption")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "broken.jpg: not a readable image" in result.stderr
