"""The shapes world: scenes, renders, captions, facts, the pixel checker and the dataset writer."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from krea2_train.data import shapes
from krea2_train.data.buckets import make_buckets
from krea2_train.data.shapes import Scene, ShapeFact


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


def _shape_mask(scene: Scene, shape: ShapeFact, size: tuple[int, int]) -> np.ndarray:
    """Pixels that one shape touches at all (rendered alone on a plain background)."""
    alone = Scene(scene.background, (shape,))
    background = np.array(shapes.BACKGROUND_COLORS[scene.background])
    return np.any(np.asarray(shapes.render(alone, size)) != background, axis=-1)


# --------------------------------------------------------------------------------------------
# Scenes and renders


def test_sample_scene_is_deterministic_given_the_generator():
    first = _scenes(50, seed=7)
    assert first == _scenes(50, seed=7)
    assert first != _scenes(50, seed=8)


def test_scenes_respect_counts_margins_and_vocabulary():
    scenes = _scenes(600)
    for scene in scenes:
        assert 1 <= len(scene.shapes) <= shapes.MAX_SHAPES
        for shape in scene.shapes:
            half = shapes.SIZE_EXTENTS[shape.size] / 2 + shapes.EDGE_PADDING
            assert half - 1e-9 <= shape.x <= 1 - half + 1e-9 and half - 1e-9 <= shape.y <= 1 - half + 1e-9
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1:]:
                gap = (shapes.SIZE_EXTENTS[a.size] + shapes.SIZE_EXTENTS[b.size]) / 2 + shapes.SHAPE_MARGIN
                assert abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap
    assert {len(s.shapes) for s in scenes} == {1, 2, 3, 4}
    assert {sh.kind for s in scenes for sh in s.shapes} == set(shapes.KINDS)
    assert {sh.color for s in scenes for sh in s.shapes} == set(shapes.SHAPE_COLORS)
    assert {sh.size for s in scenes for sh in s.shapes} == set(shapes.SIZE_EXTENTS)
    assert {s.background for s in scenes} == set(shapes.BACKGROUND_COLORS)
    assert {s.background_style for s in scenes} == set(shapes.BACKGROUND_STYLES)
    rng = np.random.default_rng(1)
    assert {shapes.sample_scene(rng, ("plain",)).background_style for _ in range(30)} == {"plain"}


@pytest.mark.parametrize("size", [(64, 64), (256, 256), (80, 48), (48, 80), (112, 64)])
def test_rendered_shapes_never_touch_each_other(size):
    for scene in _scenes(40, seed=3):
        masks = [_shape_mask(scene, shape, size) for shape in scene.shapes]
        assert all(mask.any() for mask in masks)
        assert (np.sum(masks, axis=0) <= 1).all(), scene
        for mask in masks:  # shapes stay off the border
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_render_is_deterministic_with_exact_colours_and_requested_size():
    for scene in _scenes(30, seed=11):
        for size in [(64, 64), (96, 54), (48, 64)]:
            image = shapes.render(scene, size)
            assert image.mode == "RGB" and image.size == size
            assert image.tobytes() == shapes.render(scene, size).tobytes()
            pixels = np.asarray(image)
            for shape in scene.shapes:  # the bounding-box centre is inside every kind
                centre = pixels[int(shape.y * size[1]), int(shape.x * size[0])]
                assert tuple(centre) == shapes.SHAPE_COLORS[shape.color]
    plain = Scene("navy", (ShapeFact("circle", "red", "large", 0.5, 0.5),))
    assert tuple(np.asarray(shapes.render(plain, 64))[0, 0]) == shapes.BACKGROUND_COLORS["navy"]
    assert shapes.render(plain, 64).size == (64, 64)


# --------------------------------------------------------------------------------------------
# Captions and facts


_PHRASE = re.compile(r"a (small|medium|large) ([a-z]+) ([a-z]+)")
_RELATION_WORDS = {
    "to the left of": {"left_of"},
    "above": {"above"},
    "below": {"below"},
    "above and to the left of": {"above", "left_of"},
    "below and to the left of": {"below", "left_of"},
}


def _parse_long_caption(text: str) -> tuple[list[tuple[str, str, str]], list[set[str]], str]:
    """(shape phrases in order, relation words between consecutive phrases, background phrase)."""
    body, _, background = text.rpartition(", on a ")
    matches = list(_PHRASE.finditer(body))
    links = [body[a.end():b.start()].strip().removeprefix(", which is").strip() for a, b in zip(matches, matches[1:])]
    assert body[: matches[0].start()] == "" and body[matches[-1].end():] == ""
    return [m.groups() for m in matches], [_RELATION_WORDS[link] for link in links], background


def _groups(listing: str) -> Counter:
    """Counter of (colour, kind) from "three green squares, a red circle and blue star"."""
    numbers = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
    singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
    found = Counter()
    for item in re.split(r", | and ", listing):
        words = item.split()
        count = numbers[words.pop(0)] if words[0] in numbers else 1
        color, kind = words
        found[(color, singular.get(kind, kind))] += count
    return found


def test_long_caption_states_every_shape_and_every_relation_of_the_facts():
    for scene in _scenes(300, seed=5):
        fact = shapes.facts(scene)
        phrases, links, background = _parse_long_caption(shapes.captions(scene)["long"])
        order = sorted(range(fact["count"]), key=lambda i: (fact["shapes"][i]["x"], fact["shapes"][i]["y"]))
        described = [fact["shapes"][i] for i in order]
        assert phrases == [(shape["size"], shape["color"], shape["kind"]) for shape in described]
        stated = set()
        for (a, b), words in zip(zip(order, order[1:]), links):
            stated |= {("left_of", a, b)} if "left_of" in words else set()
            stated |= {("above", a, b)} if "above" in words else set()
            stated |= {("above", b, a)} if "below" in words else set()
        assert stated == {(r["relation"], r["subject"], r["object"]) for r in fact["relations"]}
        assert background == {
            "plain": f"{scene.background} background",
            "gradient": f"{scene.background} gradient background",
            "grain": f"grainy {scene.background} background",
        }[scene.background_style]
        for r in fact["relations"]:  # each stated relation is true of the scene's centres
            axis = "x" if r["relation"] == "left_of" else "y"
            delta = fact["shapes"][r["object"]][axis] - fact["shapes"][r["subject"]][axis]
            assert delta >= shapes.RELATION_THRESHOLD


def test_medium_and_short_captions_count_each_colour_and_kind():
    for scene in _scenes(300, seed=6):
        expected = Counter((s.color, s.kind) for s in scene.shapes)
        text = shapes.captions(scene)
        listing, _, background = text["medium"].rpartition(" on a ")
        assert background == f"{scene.background} background"
        assert _groups(listing) == expected
        total, _, listing = text["short"].partition(": ")
        assert total == {1: "one shape", 2: "two shapes", 3: "three shapes", 4: "four shapes"}[len(scene.shapes)]
        assert _groups(listing) == expected


def test_captions_read_as_specified():
    scene = Scene("white", [ShapeFact("circle", "red", "large", 0.25, 0.5),
                            ShapeFact("triangle", "blue", "small", 0.7, 0.52)])
    assert shapes.captions(scene) == {
        "long": "a large red circle to the left of a small blue triangle, on a white background",
        "medium": "a red circle and a blue triangle on a white background",
        "short": "two shapes: red circle and blue triangle",
    }
    squares = Scene("black", [ShapeFact("square", "green", size, x, y) for size, x, y in
                              [("small", 0.2, 0.2), ("medium", 0.5, 0.8), ("large", 0.8, 0.3)]]
                    + [ShapeFact("circle", "orange", "small", 0.5, 0.35)], background_style="gradient")
    text = shapes.captions(squares)
    assert text["short"] == "four shapes: three green squares and orange circle"
    assert text["medium"] == "three green squares and an orange circle on a black background"
    assert text["long"] == (
        "a small green square above and to the left of a small orange circle, which is above a medium green square,"
        " which is below and to the left of a large green square, on a black gradient background"
    )


def test_facts_are_json_serialisable_and_exact():
    for scene in _scenes(100, seed=9):
        fact = shapes.facts(scene)
        assert json.loads(json.dumps(fact)) == fact
        assert fact["count"] == len(scene.shapes)
        assert [ShapeFact(**s) for s in fact["shapes"]] == list(scene.shapes)


# --------------------------------------------------------------------------------------------
# Checker


def _accuracies(resolution, n: int, seed: int) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for scene in _scenes(n, seed):
        result = shapes.score_facts(shapes.facts(scene), shapes.check_image(shapes.render(scene, resolution)))
        for key in ("count", "background", "colors", "kinds", "sizes", "relations"):
            values = result[key] if isinstance(result[key], list) else [result[key]]
            total = totals.setdefault(key, [0, 0])
            total[0] += sum(values)
            total[1] += len(values)
    return {key: hits / count for key, (hits, count) in totals.items()}


@pytest.mark.parametrize("resolution,n", [(64, 300), (256, 150), ((80, 48), 100), ((48, 80), 100)])
def test_checker_recovers_facts_from_clean_renders(resolution, n):
    accuracies = _accuracies(resolution, n, seed=21)
    assert all(value >= 0.98 for value in accuracies.values()), accuracies


def test_checker_reads_a_known_scene_exactly():
    scene = Scene("pale blue", [ShapeFact("star", "purple", "medium", 0.3, 0.7),
                                ShapeFact("cross", "yellow", "large", 0.72, 0.3)], background_style="grain", background_seed=4)
    detected = shapes.check_image(np.asarray(shapes.render(scene, 64)))
    assert detected["background"] == "pale blue" and detected["count"] == 2
    found = [(s["kind"], s["color"], s["size"]) for s in detected["shapes"]]
    assert found == [("star", "purple", "medium"), ("cross", "yellow", "large")]
    for found, true in zip(detected["shapes"], scene.shapes):
        assert abs(found["x"] - true.x) < 0.02 and abs(found["y"] - true.y) < 0.02
    assert shapes.check_image(np.asarray(shapes.render(scene, 64)) / 255.0) == detected


def test_checker_catches_wrong_facts():
    red_circle = Scene("white", [ShapeFact("circle", "red", "large", 0.3, 0.5)])
    detected = shapes.check_image(shapes.render(red_circle, 64))

    def expect(shape: ShapeFact, background: str = "white") -> dict:
        return shapes.facts(Scene(background, [shape]))

    right = shapes.score_facts(expect(ShapeFact("circle", "red", "large", 0.6, 0.5)), detected)
    assert right["all"] and right["score"] == 1.0
    blue_square = shapes.score_facts(expect(ShapeFact("square", "blue", "large", 0.3, 0.5)), detected)
    assert blue_square["colors"] == [False] and blue_square["kinds"] == [False] and blue_square["present"] == [False]
    assert not blue_square["all"] and blue_square["score"] < 1
    red_square = shapes.score_facts(expect(ShapeFact("square", "red", "large", 0.3, 0.5)), detected)
    assert red_square["colors"] == [True] and red_square["kinds"] == [False] and not red_square["all"]
    small = shapes.score_facts(expect(ShapeFact("circle", "red", "small", 0.3, 0.5)), detected)
    assert small["present"] == [True] and small["sizes"] == [False]
    on_black = expect(ShapeFact("circle", "red", "large", 0.3, 0.5), background="black")
    assert not shapes.score_facts(on_black, detected)["background"]

    circle, square = ShapeFact("circle", "red", "large", 0.25, 0.5), ShapeFact("square", "blue", "medium", 0.75, 0.5)
    pair = Scene("white", [circle, square])
    detected_pair = shapes.check_image(shapes.render(pair, 64))
    assert shapes.score_facts(shapes.facts(pair), detected_pair)["all"]
    swapped = Scene("white", [ShapeFact("circle", "red", "large", 0.75, 0.5),
                              ShapeFact("square", "blue", "medium", 0.25, 0.5)])
    judged = shapes.score_facts(shapes.facts(swapped), detected_pair)
    assert judged["present"] == [True, True] and judged["relations"] == [False]
    one_missing = shapes.score_facts(shapes.facts(pair), detected)
    assert not one_missing["count"] and one_missing["present"] == [True, False] and one_missing["relations"] == [False]


def test_checker_finds_nothing_on_an_empty_image():
    empty = shapes.check_image(np.full((64, 80, 3), 200, dtype=np.uint8))
    assert empty["count"] == 0 and empty["shapes"] == [] and empty["background"] == "light gray"


# --------------------------------------------------------------------------------------------
# Datasets


def _folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_write_shapes_dataset_is_deterministic_and_in_ingest_format(tmp_path):
    first = _folder_bytes(shapes.write_shapes_dataset(tmp_path / "a", n=25, resolution=64, seed=3))
    assert first == _folder_bytes(shapes.write_shapes_dataset(tmp_path / "b", n=25, resolution=64, seed=3))
    assert first != _folder_bytes(shapes.write_shapes_dataset(tmp_path / "c", n=25, resolution=64, seed=4))
    assert sorted(first) == sorted(f"{i:06d}.{ext}" for i in range(25) for ext in ("png", "txt", "json"))
    samples = list(shapes.iter_shapes_samples(25, 64, seed=3))
    for index, (image, caption, fact) in enumerate(samples):
        metadata = json.loads(first[f"{index:06d}.json"])
        assert metadata == {"captions": caption, "facts": fact, "width": 64, "height": 64}
        assert first[f"{index:06d}.txt"].decode() == caption["long"] + "\n"
        stored = Image.open(tmp_path / "a" / f"{index:06d}.png")
        assert stored.mode == "RGB" and stored.tobytes() == image.tobytes()


def test_dataset_samples_do_not_depend_on_n_and_follow_aspect_buckets(tmp_path):
    short = [caption for _, caption, _ in shapes.iter_shapes_samples(5, 64, seed=1)]
    assert short == [caption for _, caption, _ in shapes.iter_shapes_samples(12, 64, seed=1)][:5]
    ratios = ["1", "4:3", "16:9", "9:16", "1:2.35"]
    buckets = {(b.width, b.height) for b in make_buckets(64, 16, ["1:1", "4:3", "16:9", "9:16", "1:2.35"])}
    assert buckets == {(64, 64), (80, 48), (48, 80), (48, 96)}  # the trainer's buckets, so no crop on ingest
    sizes = {image.size for image, _, _ in shapes.iter_shapes_samples(40, 64, seed=2, aspect_ratios=ratios)}
    assert sizes == buckets
    folder = shapes.write_shapes_dataset(tmp_path / "wide", n=8, resolution=64, seed=2, aspect_ratios=ratios)
    for path in folder.glob("*.json"):
        metadata = json.loads(path.read_text())
        assert Image.open(path.with_suffix(".png")).size == (metadata["width"], metadata["height"])


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shape color 'teal'"):
        ShapeFact("circle", "teal", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="shape kind"):
        ShapeFact("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="outside the unit square"):
        ShapeFact("circle", "red", "small", 1.5, 0.5)
    with pytest.raises(ValueError, match="background 'mauve'"):
        Scene("mauve", [])
    with pytest.raises(ValueError, match="resolution"):
        shapes.render(Scene("white", []), (64, 0))
    with pytest.raises(ValueError, match="aspect ratio"):
        shapes.write_shapes_dataset("/nonexistent-never-created", 1, 64, aspect_ratios=["16x9"])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        shapes.check_image(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.check_image(np.full((64, 64, 3), 2.0))
    with pytest.raises(ValueError, match="without shapes"):
        shapes.captions(Scene("white", []))
    with pytest.raises(ValueError, match="missing the key"):
        shapes.score_facts({"count": 1}, shapes.check_image(np.zeros((32, 32, 3), dtype=np.uint8)))


def _flood_fill_components(mask: np.ndarray) -> list[list[int]]:
    """Reference 8-connected labelling, one pixel at a time."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, members = True, [start], []
        while stack:
            y, x = stack.pop()
            members.append(y * width + x)
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        components.append(sorted(members))
    return sorted(components)


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(60):
        mask = rng.random(tuple(rng.integers(1, 25, size=2))) < rng.uniform(0.1, 0.7)
        found = sorted(sorted(c.tolist()) for c in shapes._connected_components(mask))
        assert found == _flood_fill_components(mask)
