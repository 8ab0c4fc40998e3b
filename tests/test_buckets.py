"""Aspect-ratio buckets: sizes, assignment, cover-crop resize."""

import math

import numpy as np
import pytest
from PIL import Image

from krea2_train.data.buckets import (
    DEFAULT_ASPECT_RATIOS,
    Bucket,
    assign_bucket,
    bucket_by_name,
    make_buckets,
    parse_aspect_ratio,
    resize_to_bucket,
)


@pytest.mark.parametrize("resolution,multiple", [(256, 16), (512, 16), (1024, 16), (64, 4), (256, 4)])
def test_default_buckets_have_area_near_r2_and_sides_on_the_multiple(resolution, multiple):
    buckets = make_buckets(resolution, multiple)
    for bucket in buckets:
        assert bucket.width % multiple == 0 and bucket.height % multiple == 0
        assert abs(bucket.width * bucket.height / resolution**2 - 1) < 0.12
        assert abs(math.log(bucket.aspect_ratio / parse_aspect_ratio(bucket.name))) < 0.12
    assert len({(b.width, b.height) for b in buckets}) == len(buckets)


def test_known_sizes_and_portrait_inverses():
    buckets = make_buckets(256, 16)
    assert bucket_by_name("1:1", buckets) == Bucket("1:1", 256, 256)
    assert bucket_by_name("16:9", buckets) == Bucket("16:9", 336, 192)
    for landscape, portrait in [("4:3", "3:4"), ("3:2", "2:3"), ("16:9", "9:16"), ("2.35:1", "1:2.35")]:
        a, b = bucket_by_name(landscape, buckets), bucket_by_name(portrait, buckets)
        assert (a.width, a.height) == (b.height, b.width)
    assert [b.name for b in buckets] == list(DEFAULT_ASPECT_RATIOS)


def test_ratios_that_round_to_one_shape_collapse_into_the_first():
    buckets = make_buckets(16, 16, ["1:1", "4:3", "3:2"])
    assert buckets == (Bucket("1:1", 16, 16),)


def test_assign_bucket_picks_the_nearest_log_ratio():
    buckets = make_buckets(1024, 16)
    assert assign_bucket(1920, 1080, buckets).name == "16:9"
    assert assign_bucket(1080, 1920, buckets).name == "9:16"
    assert assign_bucket(999, 1000, buckets).name == "1:1"
    assert assign_bucket(3000, 1000, buckets).name == "2.35:1"
    assert assign_bucket(1000, 1290, buckets).name == "3:4"


def test_resize_covers_and_crops_the_centre():
    # 300x100: left third red, middle green, right third blue -> 1:1 crop keeps the green middle
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100, 0] = 255
    pixels[:, 100:200, 1] = 255
    pixels[:, 200:, 2] = 255
    out = resize_to_bucket(Image.fromarray(pixels), Bucket("1:1", 32, 32))
    assert out.size == (32, 32) and out.mode == "RGB"
    array = np.asarray(out).astype(int)
    assert (array[:, 2:-2, 1] > 240).all() and (array[:, 2:-2, [0, 2]] < 15).all()


def test_resize_composites_transparency_on_white():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    out = np.asarray(resize_to_bucket(image, Bucket("2:1", 8, 4)))
    assert (out == 255).all()


@pytest.mark.parametrize("text", ["16-9", "a:b", "0:1", "1:2:3", "-1:1"])
def test_bad_aspect_ratio_is_a_clear_error(text):
    with pytest.raises(ValueError, match="aspect ratio"):
        parse_aspect_ratio(text)


def test_bad_resolution_and_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="smaller than the pixel multiple"):
        make_buckets(8, 16)
    with pytest.raises(ValueError, match="must be positive"):
        make_buckets(0, 16)
    with pytest.raises(ValueError, match="image size"):
        assign_bucket(0, 10, make_buckets(64, 16))
