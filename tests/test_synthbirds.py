"""synthbirds writes the exact CUB layout, deterministically, and is fine-grained in fact, not only in name."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fgvc.config import QUICK_START, load_config
from fgvc.data import synthbirds
from fgvc.data.synthbirds import CLASS_FACTORS, SynthBirdsSpec, generate

from .conftest import SMALL_SPEC

CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]


def parse_tree(root: Path) -> dict:
    """A deliberately independent, minimal reader of the CUB text files (not fgvc's loader)."""

    def rows(name: str, maxsplit: int = -1) -> list[list[str]]:
        return [line.split(" ", maxsplit) for line in (root / name).read_text().splitlines()]

    return {
        "images": {int(i): p for i, p in rows("images.txt", 1)},
        "classes": {int(i): n for i, n in rows("classes.txt", 1)},
        "labels": {int(i): int(c) for i, c in rows("image_class_labels.txt")},
        "split": {int(i): int(s) for i, s in rows("train_test_split.txt")},
        "boxes": {int(r[0]): [float(v) for v in r[1:]] for r in rows("bounding_boxes.txt")},
        "parts": {int(i): n for i, n in rows("parts/parts.txt", 1)},
        "part_locs": rows("parts/part_locs.txt"),
        "attributes": {int(i): n for i, n in rows("attributes/attributes.txt", 1)},
        "attribute_labels": rows("attributes/image_attribute_labels.txt"),
    }


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_files_parse_with_consistent_counts(small_birds: Path) -> None:
    tree = parse_tree(small_birds)
    n_images = SMALL_SPEC.num_classes * SMALL_SPEC.images_per_class
    assert sorted(tree["images"]) == list(range(1, n_images + 1))
    assert len(tree["classes"]) == SMALL_SPEC.num_classes
    assert all(name.startswith(f"{i:03d}.") for i, name in tree["classes"].items())
    assert set(tree["labels"]) == set(tree["split"]) == set(tree["boxes"]) == set(tree["images"])
    assert [tree["parts"][i] for i in range(1, 16)] == CUB_PARTS
    assert len(tree["part_locs"]) == 15 * n_images
    assert len(tree["attribute_labels"]) == len(tree["attributes"]) * n_images
    assert all(len(r) == 5 for r in tree["part_locs"] + tree["attribute_labels"])

    train_per_class = Counter(tree["labels"][i] for i, s in tree["split"].items() if s == 1)
    assert set(train_per_class.values()) == {round(SMALL_SPEC.train_fraction * SMALL_SPEC.images_per_class)}
    for image_id, relative in tree["images"].items():
        folder = relative.split("/")[0]
        assert folder == tree["classes"][tree["labels"][image_id]]  # images/<NNN.Class>/..., as in CUB
        with Image.open(small_birds / "images" / relative) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
        x, y, w, h = tree["boxes"][image_id]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 and y + h <= 64

    visible = [r for r in tree["part_locs"] if r[4] == "1"]
    hidden = [r for r in tree["part_locs"] if r[4] == "0"]
    assert all(r[2:] == ["0.0", "0.0", "0"] for r in hidden)  # CUB's way of writing "not visible"
    # A visible part lies inside the image, as in CUB: on the grid of pixel centres 0..63.
    assert all(0 <= float(r[2]) <= 63 and 0 <= float(r[3]) <= 63 for r in visible)
    # A side view: exactly one eye and one wing can be seen (unless covered or out of frame), never both.
    by_image = {}
    for image_id, part_id, _, _, v in tree["part_locs"]:
        by_image.setdefault(image_id, {})[tree["parts"][int(part_id)]] = v == "1"
    for seen in by_image.values():
        assert not (seen["left eye"] and seen["right eye"]) and not (seen["left wing"] and seen["right wing"])


def test_same_seed_is_byte_identical_and_worker_count_does_not_matter(tmp_path: Path, small_birds: Path) -> None:
    generate(tmp_path / "again", SMALL_SPEC, workers=2)
    assert tree_digest(tmp_path / "again") == tree_digest(small_birds)


def test_different_seed_differs(tmp_path: Path, small_birds: Path) -> None:
    other = SynthBirdsSpec(**{**SMALL_SPEC.__dict__, "seed": SMALL_SPEC.seed + 1})
    generate(tmp_path / "other", other)
    a, b = tree_digest(tmp_path / "other"), tree_digest(small_birds)
    images_a = {k: v for k, v in a.items() if k.endswith(".jpg")}
    images_b = {k: v for k, v in b.items() if k.endswith(".jpg")}
    assert not set(images_a.values()) & set(images_b.values())
    assert a["parts/part_locs.txt"] != b["parts/part_locs.txt"]


def class_factor_tuples(root: Path) -> tuple[dict[int, tuple], dict[int, int]]:
    """Per image, the values of the class-defining attributes read from image_attribute_labels.txt."""
    tree = parse_tree(root)
    present = {}
    for image_id, attribute_id, is_present, *_ in tree["attribute_labels"]:
        if is_present == "1":
            factor, value = tree["attributes"][int(attribute_id)].split("::")
            present.setdefault(int(image_id), {})[factor] = value
    return {i: tuple(v[f] for f in CLASS_FACTORS) for i, v in present.items()}, tree["labels"]


def test_part_attributes_determine_the_class_exactly(small_birds: Path) -> None:
    tuples, labels = class_factor_tuples(small_birds)
    class_of_tuple = {}
    for image_id, combo in tuples.items():
        assert class_of_tuple.setdefault(combo, labels[image_id]) == labels[image_id]
    assert len(class_of_tuple) == SMALL_SPEC.num_classes  # and no two classes share a combination


@pytest.mark.parametrize("num_classes", [10, 11, 50, 216])
def test_every_class_has_a_one_part_neighbour(num_classes: int) -> None:
    classes = [tuple(c.values()) for c in synthbirds.class_attributes(num_classes, seed=0)]
    assert len(set(classes)) == num_classes
    differing = {(a, b): sum(x != y for x, y in zip(classes[a], classes[b], strict=True))
                 for a, b in itertools.combinations(range(num_classes), 2)}
    for c in range(num_classes):
        assert min(d for pair, d in differing.items() if c in pair) == 1
    # Every value of every factor is used once there are enough classes (a first class shows 5 of the 15 values and
    # each one-step neighbour adds at most one more, so 11 classes are needed).
    if num_classes >= 11:
        for f, values in enumerate(CLASS_FACTORS.values()):
            assert {combo[f] for combo in classes} == set(values)


def test_discriminative_parts_are_small(small_birds: Path) -> None:
    areas = json.loads((small_birds / synthbirds.METADATA_FILE).read_text())["factor_area_fraction"]
    assert set(areas) == set(CLASS_FACTORS)
    assert all(0 < a < 0.05 for a in areas.values()), areas


def colour_features(images: list[np.ndarray]) -> np.ndarray:
    """Mean colour and a 4x4x4 joint colour histogram per image: everything global colour statistics can offer."""
    features = []
    for image in images:
        q = (image // 64).reshape(-1, 3).astype(int)
        histogram = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)
        features.append(np.concatenate([image.reshape(-1, 3).mean(0) / 255, histogram]))
    return np.array(features)


QUICK_START_DIFFICULTY = load_config(QUICK_START).data.synthbirds.difficulty


@pytest.mark.parametrize("difficulty", [SynthBirdsSpec().difficulty, QUICK_START_DIFFICULTY],
                         ids=["generator default", "quick-start preset"])
def test_global_colour_statistics_score_near_chance(tmp_path: Path, difficulty: float) -> None:
    spec = SynthBirdsSpec(num_classes=10, images_per_class=60, train_fraction=0.5, image_size=64, difficulty=difficulty,
                          seed=5)
    generate(tmp_path / "birds", spec)
    tree = parse_tree(tmp_path / "birds")
    ids = sorted(tree["images"])
    images = [np.asarray(Image.open(tmp_path / "birds" / "images" / tree["images"][i])) for i in ids]
    x = colour_features(images)
    y = np.array([tree["labels"][i] for i in ids])
    train = np.array([tree["split"][i] == 1 for i in ids])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    accuracy = classifier.fit(x[train], y[train]).score(x[~train], y[~train])
    assert accuracy < 0.2, f"colour statistics reach {accuracy:.1%} (chance 10%): colour leaks the class"

    # The colour is there, just not globally: the same classifier reads the class's crown colour almost perfectly
    # from the few pixels around the annotated crown keypoint.
    crown_part = next(i for i, name in tree["parts"].items() if name == "crown")
    crown_xy = {int(r[0]): (float(r[2]), float(r[3]))
                for r in tree["part_locs"] if int(r[1]) == crown_part and r[4] == "1"}
    crown_attribute = {}
    for image_id, attribute_id, is_present, *_ in tree["attribute_labels"]:
        name = tree["attributes"][int(attribute_id)]
        if name.startswith("has_crown_color::") and is_present == "1":
            crown_attribute[int(image_id)] = name
    seen = np.array([i in crown_xy for i in ids])
    patches = np.array([
        images[k][round(crown_xy[i][1]), round(crown_xy[i][0])] / 255 if seen[k] else np.zeros(3)
        for k, i in enumerate(ids)
    ])
    z = np.array([crown_attribute[i] for i in ids])
    local = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    local_accuracy = local.fit(patches[train & seen], z[train & seen]).score(patches[~train & seen], z[~train & seen])
    assert local_accuracy > 0.9, local_accuracy


def test_existing_output_is_refused_and_failures_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "birds"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        generate(out, SMALL_SPEC)
    out.rmdir()

    calls = []

    def fail_on_fifth(job):
        calls.append(job)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(job)

    real = synthbirds._draw_and_save
    monkeypatch.setattr(synthbirds, "_draw_and_save", fail_on_fifth)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(out, SMALL_SPEC)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a half-written staging folder


def test_overwrite_replaces_atomically(tmp_path: Path, small_birds: Path) -> None:
    out = tmp_path / "birds"
    generate(out, SynthBirdsSpec(num_classes=2, images_per_class=2, image_size=32))
    generate(out, SMALL_SPEC, overwrite=True)
    assert tree_digest(out) == tree_digest(small_birds)
    assert [p.name for p in tmp_path.iterdir()] == ["birds"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("num_classes", 0, "num_classes"), ("num_classes", 217, "num_classes"), ("images_per_class", 1, "images_per"),
     ("train_fraction", 1.0, "train_fraction"), ("image_size", 16, "image_size"), ("difficulty", 1.5, "difficulty"),
     ("class_offset", -1, "class_offset must be at least 0"),
     ("class_offset", 207, r"class_offset \+ num_classes must be at most 216 .*got 207 \+ 10"),
     ("domain", "night", "domain must be one of standard, plain, stripes, recolored, dusk, shifted, got 'night'")],
)
def test_invalid_spec_names_the_field(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthBirdsSpec(**{field: value})


def test_cli_generates_and_summarizes(tmp_path: Path, capsys) -> None:
    synthbirds.main(["--out", str(tmp_path / "cli"), "--num-classes", "3", "--images-per-class", "4",
                     "--image-size", "48", "--seed", "2"])
    printed = capsys.readouterr().out
    assert "12 images (48 px) of 3 classes" in printed
    assert "splits: train" in printed and "test 6" in printed
    assert synthbirds.main(["--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and len(err.splitlines()) == 1


def test_visible_parts_of_the_default_spec_lie_inside_their_images() -> None:
    """An independent CUB-format validator found image 52 of the default spec with part 1 visible at y = -0.4,
    outside its image. That bird, and every bird of its class, keeps its visible parts on the pixel grid."""
    spec = SynthBirdsSpec()
    attributes = synthbirds.class_attributes(spec.num_classes, spec.seed)[0]  # ids 1..60 are class 1
    for image_id in range(1, spec.images_per_class + 1):
        bird = synthbirds.render_bird(attributes, synthbirds.image_rng(spec.seed, image_id), spec.image_size,
                                      spec.difficulty)
        visible = bird.parts[bird.parts[:, 2] > 0, :2]
        assert ((visible >= 0) & (visible <= spec.image_size - 1)).all(), (image_id, visible)
    bird = synthbirds.render_bird(attributes, synthbirds.image_rng(spec.seed, 52), spec.image_size, spec.difficulty)
    assert bird.parts[0, 2] == 0  # the back, at y = -0.4 before: not visible


# --------------------------------------------------------------------------------------------------------------
# Transfer settings: disjoint class ranges (class_offset) and rendering domains (domain)
# --------------------------------------------------------------------------------------------------------------

# The first ten classes of seed 0, as the generator drew them before class_offset existed.
SEED0_CLASSES = ["Blackcap_Twobar_Ringeye_Forktail_Daggerbill", "Blackcap_Twobar_Ringeye_Spiketail_Daggerbill",
                 "Redcap_Twobar_Ringeye_Spiketail_Daggerbill", "Blackcap_Twobar_Ringeye_Forktail_Hookedbill",
                 "Blackcap_Twobar_Forktail_Hookedbill", "Redcap_Plainwing_Ringeye_Spiketail_Daggerbill",
                 "Blackcap_Barwing_Forktail_Hookedbill", "Yellowcap_Barwing_Forktail_Hookedbill",
                 "Yellowcap_Barwing_Roundtail_Hookedbill", "Yellowcap_Barwing_Roundtail_Conebill"]
TINY = {"images_per_class": 2, "image_size": 32, "seed": 4}


def class_names(root: Path) -> list[str]:
    return list(parse_tree(root)["classes"].values())


@pytest.mark.parametrize("seed", [0, 3])
def test_the_walk_is_one_sequence_and_an_offset_takes_a_slice_of_it(seed: int) -> None:
    walk = synthbirds.class_attributes(synthbirds.CLASS_CAPACITY, seed)
    assert len({tuple(c.values()) for c in walk}) == synthbirds.CLASS_CAPACITY  # the walk reaches every combination
    for n in (1, 10, 11, 50, 215):
        assert synthbirds.class_attributes(n, seed) == walk[:n]  # a shorter draw is a prefix of a longer one
    for offset, n in ((0, 7), (10, 10), (5, 40), (215, 1)):
        assert synthbirds.class_attributes(n, seed, offset) == walk[offset:offset + n]
    with pytest.raises(synthbirds.InvalidSpec, match=r"class_offset \+ num_classes must be at most 216"):
        synthbirds.class_attributes(2, seed, 215)


def test_the_default_offset_draws_the_classes_it_always_drew() -> None:
    assert [synthbirds.class_name(c) for c in synthbirds.class_attributes(10, 0)] == SEED0_CLASSES
    assert SynthBirdsSpec().class_offset == 0 and SynthBirdsSpec().domain == "standard"


def test_disjoint_offsets_draw_disjoint_classes_named_as_in_the_longer_draw(tmp_path: Path) -> None:
    generate(tmp_path / "source", SynthBirdsSpec(num_classes=4, **TINY))
    generate(tmp_path / "target", SynthBirdsSpec(num_classes=3, class_offset=4, **TINY))
    generate(tmp_path / "both", SynthBirdsSpec(num_classes=7, **TINY))
    generate(tmp_path / "overlap", SynthBirdsSpec(num_classes=3, class_offset=2, **TINY))
    source, target, both = (class_names(tmp_path / name) for name in ("source", "target", "both"))
    assert not set(source) & set(target)
    assert source + target == both  # folders numbered by their place in the walk: 005.<name> in either draw
    assert target[0].startswith("005.") and class_names(tmp_path / "overlap") == both[2:5]
    # The class-defining attributes of each image are those of its class in the longer draw.
    classes = json.loads((tmp_path / "both" / synthbirds.METADATA_FILE).read_text())["classes"]
    combo_of = {c["name"]: tuple(c[f] for f in CLASS_FACTORS) for c in classes}
    tuples, labels = class_factor_tuples(tmp_path / "target")
    assert all(combo_of[target[labels[i] - 1]] == combo for i, combo in tuples.items())
    # The offset draw's images come from streams of their own, not the offset-0 draw's poses over other classes.
    boxes = parse_tree(tmp_path / "target")["boxes"]
    assert all(boxes[i] != parse_tree(tmp_path / "source")["boxes"][i] for i in boxes)
    # And the tree reads back, discriminative parts included (they come from the metadata's class list).
    assert synthbirds.discriminative_parts(tmp_path / "target", target) is not None


def test_default_fields_keep_the_metadata_and_new_values_are_recorded() -> None:
    old_fields = ["num_classes", "images_per_class", "train_fraction", "image_size", "difficulty", "seed"]
    assert list(SynthBirdsSpec().identity()) == old_fields
    assert SynthBirdsSpec(class_offset=3).identity()["class_offset"] == 3
    assert SynthBirdsSpec(domain="dusk").identity() == {**SynthBirdsSpec().identity(), "domain": "dusk"}


def test_a_domain_is_another_cache_folder(tmp_path: Path, monkeypatch) -> None:
    from fgvc.data import DATA_ROOT_ENV, ensure_synthbirds

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    spec = SynthBirdsSpec(num_classes=2, **TINY)
    roots = [ensure_synthbirds(s, echo=lambda _: None) for s in
             (spec, SynthBirdsSpec(**{**spec.__dict__, "domain": "shifted"}),
              SynthBirdsSpec(**{**spec.__dict__, "class_offset": 2}))]
    assert len(set(roots)) == 3
    metadata = [json.loads((r / synthbirds.METADATA_FILE).read_text())["spec"] for r in roots]
    assert metadata[1]["domain"] == "shifted" and metadata[2]["class_offset"] == 2 and "domain" not in metadata[0]


def test_a_domain_changes_the_pixels_only(tmp_path: Path) -> None:
    spec = SynthBirdsSpec(num_classes=3, images_per_class=4, image_size=48, seed=1)
    generate(tmp_path / "standard", spec)
    shifted = SynthBirdsSpec(**{**spec.__dict__, "domain": "shifted"})
    generate(tmp_path / "shifted", shifted)
    generate(tmp_path / "again", shifted, workers=2)
    a, b = tree_digest(tmp_path / "standard"), tree_digest(tmp_path / "shifted")
    assert tree_digest(tmp_path / "again") == b  # deterministic
    # Same classes, boxes, parts and (per image) attributes; only the images and the recorded spec differ.
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} == {k for k in a if k.endswith(".jpg")} | {synthbirds.METADATA_FILE}
    tree = parse_tree(tmp_path / "standard")
    images = {d: np.stack([np.asarray(Image.open(tmp_path / d / "images" / p), dtype=float)
                           for p in tree["images"].values()]) for d in ("standard", "shifted")}
    # Strongly different statistics: darker, a violet cast, and different background texture.
    assert np.abs(images["standard"] - images["shifted"]).mean() > 30
    mean_a, mean_b = images["standard"].mean((0, 1, 2)), images["shifted"].mean((0, 1, 2))
    assert mean_b.sum() < 0.8 * mean_a.sum()
    assert mean_b[2] / mean_b[:2].mean() > 1.1 * mean_a[2] / mean_a[:2].mean()  # bluer relative to red and green
    # The stripes: neighbouring pixels along one direction change much more often than in the clutter.
    edges = {d: (np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) for d, x in images.items()}
    assert edges["shifted"] > 1.3 * edges["standard"]


@pytest.mark.parametrize("domain", [d for d in synthbirds.DOMAINS if d != "standard"])
def test_a_domain_draws_the_same_birds_with_the_same_class_parts(domain: str) -> None:
    """Every domain consumes the same random numbers: the same pose, box, parts and attributes, and the class
    parts painted in the same colours. Under day light the pixels of the crown and the eye are the very same."""
    changes = synthbirds.DOMAINS[domain]
    body_parts = {"back", "belly", "breast", "nape", "throat", "tail", "left wing", "right wing"}
    for c, attributes in enumerate(synthbirds.class_attributes(4, seed=2)):
        for image_id in (c * 5 + 1, c * 5 + 2):
            standard, other = (synthbirds.render_bird(attributes, synthbirds.image_rng(2, image_id), 128, 0.5, d)
                               for d in ("standard", domain))
            assert np.array_equal(standard.bbox, other.bbox) and np.array_equal(standard.parts, other.parts)
            assert standard.nuisance == other.nuisance and standard.scale_px == other.scale_px
            for i, name in enumerate(synthbirds.CUB_PART_NAMES):  # the far eye and wing have no colour (zeros)
                recolored = name in body_parts and changes.palette != "standard" and standard.part_colors[i].any()
                assert np.array_equal(standard.part_colors[i], other.part_colors[i]) != recolored, name
            for name in ("crown", "left eye", "right eye"):
                x, y, visible = standard.parts[synthbirds.CUB_PART_NAMES.index(name)]
                if visible and changes.lighting == "day":
                    pixel = (round(y), round(x))
                    assert np.array_equal(standard.image[pixel], other.image[pixel]), (domain, image_id, name)
            assert np.abs(standard.image.astype(float) - other.image).mean() > 2


def test_a_bad_domain_is_a_config_error_naming_the_key() -> None:
    from fgvc.config import ConfigError

    with pytest.raises(ConfigError, match="domain must be one of standard, plain, .*shifted, got 'night'"):
        load_config(QUICK_START, ["data.synthbirds.domain=night"])
    with pytest.raises(ConfigError, match=r"class_offset \+ num_classes must be at most 216"):
        load_config(QUICK_START, ["data.synthbirds.class_offset=210"])
    cfg = load_config(QUICK_START, ["data.synthbirds.domain=shifted", "data.synthbirds.class_offset=10"])
    assert (cfg.data.synthbirds.domain, cfg.data.synthbirds.class_offset) == ("shifted", 10)


def test_cli_takes_the_offset_and_the_domain(tmp_path: Path, capsys) -> None:
    synthbirds.main(["--out", str(tmp_path / "cli"), "--num-classes", "2", "--images-per-class", "2",
                     "--image-size", "32", "--class-offset", "3", "--domain", "shifted"])
    assert "4 images (32 px) of 2 classes" in capsys.readouterr().out
    assert [name[:4] for name in class_names(tmp_path / "cli")] == ["004.", "005."]
    assert synthbirds.main(["--out", str(tmp_path / "bad"), "--domain", "night"]) == 2
    assert "domain must be one of" in capsys.readouterr().err
