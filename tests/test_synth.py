"""The synthetic data sets: determinism, valid COCO, the counts promised, and labels that match the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datadistill.data.coco import CocoDataset, load_coco, validate_coco
from datadistill.data.synth import SHAPE_CLASSES, make_figures, make_shapes

MAKERS = {"shapes": make_shapes, "figures": make_figures}


def _pixels(json_path: Path, file_name: str) -> np.ndarray:
    return np.asarray(Image.open(json_path.parent / "images" / file_name).convert("RGB"))


def _image_bytes(json_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((json_path.parent / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_images=40, seed=0, size_px=96)


@pytest.fixture(scope="module")
def figures_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_figures(tmp_path_factory.mktemp("figures"), num_images=40, seed=0, size_px=96)


@pytest.fixture(scope="module")
def plain_jsons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        kind: make(tmp_path_factory.mktemp(f"plain_{kind}"), num_images=30, seed=1, size_px=96, plain=True)
        for kind, make in MAKERS.items()
    }


# ----------------------------------------------------------------------------------------------------
# determinism and arguments


@pytest.mark.parametrize("kind", MAKERS)
def test_same_seed_gives_identical_bytes(kind: str, tmp_path: Path) -> None:
    a = MAKERS[kind](tmp_path / "a", num_images=4, seed=7, size_px=64)
    b = MAKERS[kind](tmp_path / "b", num_images=4, seed=7, size_px=64)
    assert a.read_bytes() == b.read_bytes()
    assert _image_bytes(a) == _image_bytes(b)
    assert len(_image_bytes(a)) == 4


@pytest.mark.parametrize("kind", MAKERS)
def test_different_seed_gives_different_data(kind: str, tmp_path: Path) -> None:
    a = MAKERS[kind](tmp_path / "a", num_images=3, seed=0, size_px=64)
    b = MAKERS[kind](tmp_path / "b", num_images=3, seed=1, size_px=64)
    assert a.read_bytes() != b.read_bytes()
    ia, ib = _image_bytes(a), _image_bytes(b)
    assert all(ia[name] != ib[name] for name in ia)


def test_a_smaller_set_is_the_start_of_a_larger_one(tmp_path: Path) -> None:
    small = _image_bytes(make_shapes(tmp_path / "small", num_images=2, seed=3, size_px=64))
    large = _image_bytes(make_shapes(tmp_path / "large", num_images=4, seed=3, size_px=64))
    assert small == {name: large[name] for name in small}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"num_images": 0}, "num_images", id="no images"),
        pytest.param({"num_images": 2.0}, "num_images", id="float count"),
        pytest.param({"seed": -1}, "seed", id="negative seed"),
        pytest.param({"size_px": 63}, "size_px", id="side below 64"),
        pytest.param({"size_px": 1025}, "size_px", id="side above 1024"),
    ],
)
@pytest.mark.parametrize("kind", MAKERS)
def test_bad_arguments_raise(kind: str, kwargs: dict, match: str, tmp_path: Path) -> None:
    args = {"num_images": 1, "seed": 0, "size_px": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        MAKERS[kind](tmp_path, **args)


# ----------------------------------------------------------------------------------------------------
# valid COCO


@pytest.mark.parametrize(
    ("kind", "num_images", "size_px"),
    [
        pytest.param("shapes", 2, 64, id="shapes: two images at the smallest side"),
        pytest.param("figures", 2, 64, id="figures: two images at the smallest side"),
        pytest.param("shapes", 1, 1024, id="shapes: one image at the largest side"),
        pytest.param("figures", 1, 1024, id="figures: one image at the largest side"),
        pytest.param("shapes", 1, 333, id="shapes: odd side"),
    ],
)
def test_output_validates_clean(kind: str, num_images: int, size_px: int, tmp_path: Path) -> None:
    json_path = MAKERS[kind](tmp_path / "out", num_images=num_images, seed=5, size_px=size_px)
    assert json_path == tmp_path / "out" / "annotations.json"
    assert validate_coco(json_path, json_path.parent / "images") == []
    dataset = load_coco(json_path, image_root=json_path.parent / "images")
    assert [im.id for im in dataset.images] == list(range(1, num_images + 1))
    assert [im.file_name for im in dataset.images] == [f"{i:06d}.png" for i in range(1, num_images + 1)]
    assert all((im.width, im.height) == (size_px, size_px) for im in dataset.images)


@pytest.mark.parametrize("fixture", ["shapes_json", "figures_json"])
def test_fixture_sets_validate_clean(fixture: str, request: pytest.FixtureRequest) -> None:
    json_path = request.getfixturevalue(fixture)
    assert validate_coco(json_path, json_path.parent / "images") == []


def _check_boxes_inside(dataset: CocoDataset) -> None:
    for im in dataset.images:
        boxes = dataset.labels[im.id].boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= im.width).all() and (boxes[:, 3] <= im.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


# ----------------------------------------------------------------------------------------------------
# shapes


def test_shapes_classes_and_counts(shapes_json: Path) -> None:
    dataset = load_coco(shapes_json)
    assert dataset.class_names == SHAPE_CLASSES
    assert dataset.num_classes >= 5
    counts = [len(dataset.labels[im.id]) for im in dataset.images]
    assert min(counts) >= 1 and max(counts) <= 8
    assert len(set(counts)) >= 4, f"too little variety in objects per image: {sorted(set(counts))}"
    seen = np.concatenate([dataset.labels[im.id].labels for im in dataset.images])
    assert set(seen.tolist()) == set(range(len(SHAPE_CLASSES))), "every class appears in 40 images"
    _check_boxes_inside(dataset)


def test_shape_sizes_span_the_promised_range(shapes_json: Path) -> None:
    dataset = load_coco(shapes_json)
    sides = (
        np.concatenate(
            [
                np.maximum(lab.boxes[:, 2] - lab.boxes[:, 0], lab.boxes[:, 3] - lab.boxes[:, 1])
                for lab in dataset.labels.values()
            ]
        )
        / dataset.images[0].width
    )
    # the longer box side of a visible shape: a little under its extent (10%..45% of the image side)
    assert sides.min() < 0.15 and sides.max() > 0.3 and sides.max() <= 0.45 + 2 / dataset.images[0].width


# ----------------------------------------------------------------------------------------------------
# figures


def test_figures_counts_and_schema(figures_json: Path) -> None:
    dataset = load_coco(figures_json)
    assert dataset.class_names == ("figure",)
    counts = [len(dataset.labels[im.id]) for im in dataset.images]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) >= 3
    cat = dataset.keypoint_category
    assert cat is not None and len(cat.keypoints) >= 9
    assert len(cat.sigmas) == len(cat.keypoints) and all(0.04 <= s <= 0.1 for s in cat.sigmas)
    assert all(1 <= a <= len(cat.keypoints) and 1 <= b <= len(cat.keypoints) for a, b in cat.skeleton)
    _check_boxes_inside(dataset)


def test_flip_pairs_are_written_and_swap_left_and_right(figures_json: Path) -> None:
    raw = json.loads(figures_json.read_text())["categories"][0]
    assert raw["flip_pairs"], "an explicit flip map, not only one derived from the names"
    cat = load_coco(figures_json).keypoint_category
    assert cat is not None
    sided = 0
    for i, name in enumerate(cat.keypoints):
        mirror = cat.keypoints[cat.flip_index[i]]
        if name.startswith("left_"):
            assert mirror == "right_" + name.removeprefix("left_")
            sided += 1
        elif name.startswith("right_"):
            assert mirror == "left_" + name.removeprefix("right_")
            sided += 1
        else:
            assert mirror == name
    assert sided >= 8


def test_keypoint_visibility_and_positions(figures_json: Path) -> None:
    dataset = load_coco(figures_json)
    seen_v: set[int] = set()
    for im in dataset.images:
        lab = dataset.labels[im.id]
        assert lab.keypoints is not None
        for box, kp in zip(lab.boxes, lab.keypoints, strict=True):
            v = kp[:, 2]
            seen_v |= set(v.astype(int).tolist())
            assert np.isin(v, (0, 1, 2)).all()
            assert (kp[v == 0, :2] == 0).all(), "out-of-frame points sit at (0, 0) as in COCO"
            xy = kp[v > 0, :2]
            assert (xy >= 0).all() and (xy[:, 0] <= im.width).all() and (xy[:, 1] <= im.height).all()
            assert (xy[:, 0] >= box[0] - 1).all() and (xy[:, 0] <= box[2] + 1).all()
            assert (xy[:, 1] >= box[1] - 1).all() and (xy[:, 1] <= box[3] + 1).all()
            assert (v == 2).sum() >= 6, "every labelled figure keeps most of its points visible"
    assert seen_v == {0, 1, 2}, "the set holds visible, hidden and out-of-frame points"


def test_figures_face_the_viewer(figures_json: Path) -> None:
    """The figure's left shoulder and hip are on the image's right of their right-side partners."""
    dataset = load_coco(figures_json)
    cat = dataset.keypoint_category
    assert cat is not None
    pairs = [(cat.keypoints.index(f"left_{p}"), cat.keypoints.index(f"right_{p}")) for p in ("shoulder", "hip")]
    checked = 0
    for lab in dataset.labels.values():
        assert lab.keypoints is not None
        for kp in lab.keypoints:
            for left, right in pairs:
                if kp[left, 2] > 0 and kp[right, 2] > 0:
                    assert kp[left, 0] > kp[right, 0]
                    checked += 1
    assert checked > 50


# ----------------------------------------------------------------------------------------------------
# labels against pixels, on plain images (flat background, solid colours, no clutter or noise)


@pytest.mark.parametrize("kind", MAKERS)
def test_plain_boxes_are_tight_and_cover_every_drawn_pixel(kind: str, plain_jsons: dict[str, Path]) -> None:
    json_path = plain_jsons[kind]
    dataset = load_coco(json_path)
    for im in dataset.images:
        pixels = _pixels(json_path, im.file_name)
        lab = dataset.labels[im.id]
        inside = np.zeros(pixels.shape[:2], bool)
        for x1, y1, x2, y2 in lab.boxes.astype(int):
            inside[y1:y2, x1:x2] = True
        outside = pixels[~inside]
        background = outside[0]
        assert (outside == background).all(), f"image {im.id}: drawn pixels outside every box"
        drawn = (pixels != background).any(axis=2)
        for x1, y1, x2, y2 in lab.boxes.astype(int):
            edges = (drawn[y1, x1:x2], drawn[y2 - 1, x1:x2], drawn[y1:y2, x1], drawn[y1:y2, x2 - 1])
            assert all(edge.any() for edge in edges), f"image {im.id}: box {[x1, y1, x2, y2]} is not tight"
        if kind == "shapes":  # area is the visible pixel count, and objects do not share pixels
            assert int(lab.area.sum()) == int(drawn.sum())


def test_plain_keypoint_visibility_matches_the_pixels(plain_jsons: dict[str, Path]) -> None:
    """A visible point shows its figure's limb colour; a hidden one shows something else."""
    json_path = plain_jsons["figures"]
    dataset = load_coco(json_path)
    hidden = 0
    for im in dataset.images:
        pixels = _pixels(json_path, im.file_name)
        lab = dataset.labels[im.id]
        assert lab.keypoints is not None
        for kp in lab.keypoints:
            v = kp[:, 2]
            cols = np.floor(kp[:, 0]).astype(int).clip(0, im.width - 1)
            rows = np.floor(kp[:, 1]).astype(int).clip(0, im.height - 1)
            colours = pixels[rows, cols]
            shown = colours[v == 2]
            limb = shown[0]
            assert (shown == limb).all(), f"image {im.id}: visible points of one figure differ in colour"
            for c in colours[v == 1]:
                assert (c != limb).any(), f"image {im.id}: a hidden point shows the figure itself"
                hidden += 1
    assert hidden > 0


def test_plain_figure_boxes_hold_their_own_figure(plain_jsons: dict[str, Path]) -> None:
    """Each box edge touches the figure's own limbs (its outline), or a hidden point that grew the box."""
    json_path = plain_jsons["figures"]
    dataset = load_coco(json_path)
    grown = 0
    for im in dataset.images:
        pixels = _pixels(json_path, im.file_name)
        lab = dataset.labels[im.id]
        assert lab.keypoints is not None
        for (x1, y1, x2, y2), kp in zip(lab.boxes.astype(int), lab.keypoints, strict=True):
            v = kp[:, 2]
            cols, rows = np.floor(kp[:, 0]).astype(int), np.floor(kp[:, 1]).astype(int)
            own = (pixels == pixels[rows[v == 2][0], cols[v == 2][0]]).all(axis=2)
            hidden_cols, hidden_rows = set(cols[v == 1].tolist()), set(rows[v == 1].tolist())
            for line, at, hidden in (
                (own[y1, x1:x2], y1, hidden_rows),
                (own[y2 - 1, x1:x2], y2 - 1, hidden_rows),
                (own[y1:y2, x1], x1, hidden_cols),
                (own[y1:y2, x2 - 1], x2 - 1, hidden_cols),
            ):
                if not line.any():
                    assert at in hidden, f"image {im.id}: box {[x1, y1, x2, y2]} is not tight on its figure"
                    grown += 1
    assert grown > 0, "some boxes were grown to hold a hidden point"


def _solidity(mask: np.ndarray) -> float:
    """Pixel area over the area of the convex hull of the pixel squares (1 for convex shapes)."""
    rows, cols = np.nonzero(mask)
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    pts = sorted(set(map(tuple, corners.tolist())))

    def half(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in points:
            while (
                len(out) >= 2
                and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]))
                <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), float)
    x, y = hull[:, 0], hull[:, 1]
    hull_area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return float(mask.sum()) / hull_area


def test_plain_shapes_look_like_their_class(tmp_path: Path) -> None:
    """On shapes that touch no other box and no border: convex classes are solid, stars and crosses are
    not, rings have a hole in the middle."""
    json_path = make_shapes(tmp_path, num_images=40, seed=2, size_px=128, plain=True)
    dataset = load_coco(json_path)
    convex = {"circle", "square", "triangle", "hexagon"}
    checked: set[str] = set()
    for im in dataset.images:
        pixels = _pixels(json_path, im.file_name)
        lab = dataset.labels[im.id]
        boxes = lab.boxes.astype(int)
        for j, (x1, y1, x2, y2) in enumerate(boxes):
            others = np.delete(boxes, j, axis=0)
            apart = (others[:, 0] >= x2) | (others[:, 2] <= x1) | (others[:, 1] >= y2) | (others[:, 3] <= y1)
            on_border = x1 == 0 or y1 == 0 or x2 == im.width or y2 == im.height
            if not apart.all() or on_border or min(x2 - x1, y2 - y1) < 20:
                continue
            background = pixels[y1 - 1, x1 - 1]
            mask = (pixels[y1:y2, x1:x2] != background).any(axis=2)
            name = dataset.class_names[int(lab.labels[j])]
            solidity = _solidity(mask)
            if name in convex:
                assert solidity > 0.83, f"image {im.id}: a {name} with solidity {solidity:.2f}"
            elif name in ("star", "cross"):
                assert solidity < 0.78, f"image {im.id}: a {name} with solidity {solidity:.2f}"
            else:
                assert not mask[mask.shape[0] // 2, mask.shape[1] // 2], f"image {im.id}: a ring with no hole"
            checked.add(name)
    assert checked == set(SHAPE_CLASSES)
