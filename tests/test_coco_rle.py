"""Masks in results are COCO RLE: pycocotools reads ours and writes exactly what we write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paligemma_edge import InputError, Segmentation
from paligemma_edge.runtime.generation import coco_rle
from paligemma_edge.runtime.generation.results import Generation, SegmentationResult, Timings, mask_to_rle, rle_to_mask

from .conftest import run_cli

mask_api = pytest.importorskip("pycocotools.mask", reason="the COCO RLE tests compare with pycocotools (test extra)")


def blobs(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """Random overlapping discs and rectangles."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:
            radius = rng.uniform(1, max(height, width) / 3)
            mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
        else:
            h, w = rng.uniform(1, height / 2), rng.uniform(1, width / 2)
            mask |= (abs(ys - cy) <= h) & (abs(xs - cx) <= w)
    return mask


def one_pixel(height: int, width: int, y: int, x: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y, x] = True
    return mask


def long_runs() -> np.ndarray:
    mask = np.zeros((4000, 9), bool)
    mask[:, 2:5] = True  # runs of 12,000 on, 16,000 off: counts of three and four 5-bit groups
    mask[100:3000, 7] = True
    mask[3999, 8] = True  # last pixel
    return mask


def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    cases = {
        "empty": np.zeros((5, 7), bool),
        "full": np.ones((6, 3), bool),
        "single pixel": one_pixel(9, 11, 4, 6),
        "first pixel": one_pixel(8, 8, 0, 0),
        "last pixel": one_pixel(13, 5, 12, 4),
        "first row": np.pad(np.ones((1, 10), bool), ((0, 6), (0, 0))),  # across columns: many short runs
        "first column": np.pad(np.ones((10, 1), bool), ((0, 0), (0, 6))),  # one run in column-major order
        "1 x 1 on": np.ones((1, 1), bool),
        "1 x 1 off": np.zeros((1, 1), bool),
        "row vector": rng.random((1, 257)) > 0.5,
        "column vector": rng.random((333, 1)) > 0.3,
        "checkerboard": (np.add.outer(np.arange(17), np.arange(19)) % 2).astype(bool),
        "noise": rng.random((31, 47)) > 0.5,
        "sparse noise": rng.random((64, 29)) > 0.97,
        "long runs": long_runs(),
        "wide": blobs(40, 1201, 12, 1),
        "tall": blobs(999, 37, 9, 2),
    }
    for seed in range(12):
        height, width = (int(v) for v in np.random.default_rng(100 + seed).integers(1, 300, 2))
        cases[f"blobs {seed} ({height}x{width})"] = blobs(height, width, 1 + seed, seed)
    return cases


MASKS = masks()


@pytest.mark.parametrize("name", MASKS)
def test_pycocotools_agrees_with_our_rle(name):
    mask = MASKS[name]
    ours = mask_to_rle(mask)
    assert set(ours) == {"size", "counts"} and isinstance(ours["counts"], str)
    json.dumps(ours)
    theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == list(theirs["size"]) == list(mask.shape)
    assert ours["counts"] == theirs["counts"].decode("ascii")
    decoded = mask_api.decode(ours)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    np.testing.assert_array_equal(rle_to_mask(ours), mask)
    np.testing.assert_array_equal(rle_to_mask(theirs), mask)  # their bytes form as is
    assert int(mask_api.area(ours)) == int(mask.sum())
    if mask.any():
        ys, xs = np.nonzero(mask)
        expected_box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]  # x, y, w, h
        np.testing.assert_array_equal(mask_api.toBbox(ours), expected_box)


def test_long_runs_use_multi_group_counts():
    counts = coco_rle.mask_counts(MASKS["long runs"])
    assert max(counts) > 10_000
    text = mask_to_rle(MASKS["long runs"])["counts"]
    assert len(text) > len(counts)  # some counts took more than one character
    assert coco_rle.string_to_counts(text) == counts


def test_masks_pycocotools_made_from_polygons_decode_the_same():
    """RLE the project did not write: pycocotools rasterises COCO polygons."""
    rng = np.random.default_rng(3)
    for height, width in [(120, 80), (37, 301), (500, 499)]:
        polygons = [list(rng.uniform(0, [width, height], size=(int(rng.integers(3, 12)), 2)).ravel())
                    for _ in range(3)]
        rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
        expected = mask_api.decode(rle).astype(bool)
        assert expected.any()
        np.testing.assert_array_equal(rle_to_mask(rle), expected)
        assert mask_to_rle(expected)["counts"] == rle["counts"].decode("ascii")


def test_uncompressed_counts_lists_decode_too():
    mask = MASKS["tall"]
    counts = coco_rle.mask_counts(mask)
    uncompressed = {"size": list(mask.shape), "counts": counts}
    np.testing.assert_array_equal(rle_to_mask(uncompressed), mask)
    converted = mask_api.frPyObjects(uncompressed, *mask.shape)  # pycocotools' list -> string
    assert converted["counts"].decode("ascii") == mask_to_rle(mask)["counts"]
    assert coco_rle.mask_counts(np.array([[True, False], [True, False]])) == [0, 2, 2]  # down each column
    assert coco_rle.mask_counts(np.array([[True, True], [False, False]])) == [0, 1, 1, 1, 1]


def test_segmentation_results_serialise_masks_pycocotools_reads():
    objects = tuple(Segmentation(f"thing {i}", (1.0, 2.0, 30.0, 40.0), blobs(45, 61, 3, i)) for i in range(3))
    generation = Generation("segment thing", "", (), "eos", Timings(0.0, 0.0, 0.0, 0.0))
    row = json.loads(json.dumps(SegmentationResult(generation, objects).to_dict()))
    assert len(row["segmentations"]) == 3
    for item, segmentation in zip(row["segmentations"], objects):
        assert item["mask"]["size"] == [45, 61]
        np.testing.assert_array_equal(mask_api.decode(item["mask"]).astype(bool), segmentation.mask)


@pytest.mark.parametrize("bad", [
    {"size": [2, 2], "counts": "0"},  # sums to 0, not 4
    {"size": [2, 2], "counts": "4 "},  # a space is below "0"
    {"size": [2, 2], "counts": "4\x7f"},  # above the 64 characters
    {"size": [2, 2], "counts": "P"},  # ends inside a number (0x20 set on the last group)
    {"size": [2, 2], "counts": [1, -1, 4]},
    {"size": [2], "counts": "4"},
    {"counts": "4"},
    "not a dict",
])
def test_malformed_rle_is_an_input_error(bad):
    with pytest.raises(InputError):
        rle_to_mask(bad)


def test_encode_wants_a_2d_mask():
    with pytest.raises(InputError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 1), bool))


def test_run_json_masks_decode_with_pycocotools_to_the_api_mask(shapes_bundle, tmp_path):
    """Through the command a user runs: `run --json` on a phone JPEG (EXIF orientation 8) gives COCO
    RLE that pycocotools decodes to exactly the mask the Python API returns, in upright pixels."""
    from PIL import Image, ImageDraw

    import paligemma_edge

    upright = Image.new("RGB", (210, 280), (240, 242, 246))
    ImageDraw.Draw(upright).ellipse((100, 150, 180, 230), fill=(215, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to view
    photo = tmp_path / "photo.jpg"
    upright.transpose(Image.Transpose.ROTATE_270).save(photo, "JPEG", quality=95, exif=exif)
    result = run_cli("run", str(shapes_bundle), "--image", str(photo), "--task", "segment", "--objects", "circle",
                     "--max-new-tokens", "40", "--json", check=True)
    row = json.loads(result.stdout.splitlines()[-1])
    with paligemma_edge.load(shapes_bundle) as model:
        answer = model.segment(str(photo), ["circle"], options=paligemma_edge.GenerationOptions(max_new_tokens=40))
    api = answer.segmentations
    assert row["text"] == answer.text
    assert [s["label"] for s in row["segmentations"]] == [s.label for s in api] == ["circle"], row["text"]
    mask = row["segmentations"][0]["mask"]
    assert mask["size"] == [280, 210]
    decoded = mask_api.decode(mask).astype(bool)
    np.testing.assert_array_equal(decoded, api[0].mask)
    pixels = np.asarray(upright).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    assert (decoded & red).sum() > 0.5 * red.sum()  # on the circle as the viewer shows it
