"""Exports of a COCO file: YOLO, Pascal VOC, Label Studio and filtered COCO, checked by loading
them back with their consumers where those install offline (supervision's loaders), and against
the documented schema where they do not (ultralytics' data.yaml and folder layout, Label Studio's
labeling config and prediction format); masks that supervision cannot turn into polygons."""

import json
import os
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import supervision as sv
import yaml
from click.testing import CliRunner
from PIL import Image

from sphinx_tools.cli import main
from sphinx_tools.coco import encode_rle
from sphinx_tools.pipelines.autolabel.export import Exported, export, simplify_polygon
from sphinx_tools.pipelines.autolabel.export import split_images

# A thin outline with holes: supervision's hole bridging finds no seam on foreground for it
# ("No foreground-contained seam found for a mask hole").
UNBRIDGEABLE = """
....#.....
...#.#....
.#.#..#...
#.#.#..#..
#..#.#.#..
#...#..#..
.#......#.
..#.....#.
.#.......#
#.......#.
.#.....#..
.#.#...#..
..#.###...
"""
W, H = 40, 30


def unbridgeable_mask() -> np.ndarray:
    rows = UNBRIDGEABLE.split()
    mask = np.zeros((H, W), bool)
    mask[5: 5 + len(rows), 3: 3 + len(rows[0])] = [[c == "#" for c in row] for row in rows]
    return mask


def ring_mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    r = np.hypot(xx - 28, yy - 15)
    return (r <= 8) & (r > 4)


def bbox(mask) -> list:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
            float(ys.max() + 1 - ys.min())]


def write_coco(path, annotations, images=None) -> None:
    images = images or [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    anns = [{"id": i + 1, "image_id": 1, "iscrowd": 0, "score": 0.9, **a}
            for i, a in enumerate(annotations)]
    path.write_text(json.dumps({"info": {"model": "m"}, "images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"},
                                               {"id": 3, "name": "ring"}]}))


@pytest.fixture
def coco_with_holes(tmp_path):
    bad, ring = unbridgeable_mask(), ring_mask()
    path = tmp_path / "labels.json"
    write_coco(path, [
        {"category_id": 1, "bbox": bbox(bad), "area": float(bad.sum()),
         "segmentation": encode_rle(bad)},
        {"category_id": 3, "bbox": bbox(ring), "area": float(ring.sum()),
         "segmentation": encode_rle(ring)},
        {"category_id": 1, "bbox": [1.0, 1.0, 5.0, 4.0], "area": 20.0},  # box only
    ])
    return path


def test_supervision_cannot_bridge_the_fixture_mask():
    "The fixture really is a mask that supervision's polygon writers reject."
    from supervision.dataset.utils import approximate_mask_with_polygons

    with pytest.raises(ValueError, match="seam"):
        approximate_mask_with_polygons(unbridgeable_mask(), bridge_holes=True)
    assert approximate_mask_with_polygons(ring_mask(), bridge_holes=True)


def test_exports_write_an_unconvertible_mask_as_its_box(coco_with_holes, tmp_path):
    results = {fmt: export(coco_with_holes, fmt, tmp_path) for fmt in ("yolo", "voc",
                                                                       "label-studio")}
    assert results["yolo"] == Exported(tmp_path / "labels_yolo", 1, missing_images=1)  # no a.png
    assert results["voc"] == Exported(tmp_path / "labels_voc", 1)
    assert results["label-studio"] == Exported(tmp_path / "labels.label-studio.json", 0)

    lines = (tmp_path / "labels_yolo" / "labels" / "train" / "a.txt").read_text().splitlines()
    assert len(lines) == 3  # the bad mask as a box, the ring as one polygon, the plain box
    x, y, w, h = bbox(unbridgeable_mask())
    assert lines[0].split() == ["0", f"{(x + w / 2) / W:.5f}", f"{(y + h / 2) / H:.5f}",
                                f"{w / W:.5f}", f"{h / H:.5f}"]
    assert lines[1].split()[0] == "1" and len(lines[1].split()) > 9  # class 1 = ring, a polygon
    assert len(lines[2].split()) == 5
    data = yaml.safe_load((tmp_path / "labels_yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "thing", 1: "ring"}

    root = ElementTree.parse(tmp_path / "labels_voc" / "a.xml").getroot()
    objects = root.findall("object")
    assert [o.findtext("name") for o in objects] == ["thing", "ring", "thing"]
    assert [o.find("polygon") is not None for o in objects] == [False, True, False]
    assert root.findtext("size/width") == str(W) and root.findtext("size/height") == str(H)

    (task,) = json.loads((tmp_path / "labels.label-studio.json").read_text())
    kinds = [r["type"] for r in task["predictions"][0]["result"]]
    assert kinds.count("rectanglelabels") == 3 and kinds.count("polygonlabels") >= 2


def test_label_studio_keeps_the_box_of_an_unreadable_mask(tmp_path):
    path = tmp_path / "broken.json"
    write_coco(path, [
        {"category_id": 1, "bbox": [2.0, 2.0, 10.0, 10.0], "area": 100.0,
         "segmentation": {"size": [H, W], "counts": "not an RLE"}},
        {"category_id": 1, "bbox": [2.0, 2.0, 10.0, 10.0], "area": 100.0,
         "segmentation": [[1.0, "x", 3.0]]},
        {"category_id": 3, "bbox": [20.0, 7.0, 17.0, 17.0], "area": 100.0,
         "segmentation": encode_rle(ring_mask())},
    ])
    result = export(path, "label-studio")
    assert result.fallbacks == 2
    (task,) = json.loads(result.path.read_text())
    kinds = [r["type"] for r in task["predictions"][0]["result"]]
    assert kinds.count("rectanglelabels") == 3 and kinds.count("polygonlabels") >= 1
    for fmt in ("yolo", "voc"):  # unreadable segmentations are boxes there too, never a crash
        assert export(path, fmt).fallbacks == 2


def test_export_refuses_two_images_writing_one_file(tmp_path):
    path = tmp_path / "twice.json"
    write_coco(path, [], images=[{"id": 1, "file_name": "a/x.png", "width": W, "height": H},
                                 {"id": 2, "file_name": "b/x.jpg", "width": W, "height": H}])
    with pytest.raises(ValueError, match="'a/x.png' and 'b/x.jpg' would both write"):
        export(path, "yolo")
    assert export(path, "label-studio").fallbacks == 0
    with pytest.raises(ValueError, match="unknown export format 'csv'"):
        export(path, "csv")


def test_exports_keep_a_file_name_that_is_not_utf8(tmp_path):
    "A name with an undecodable byte (a lone surrogate, as the sources give it) exports."
    name = os.fsdecode(b"\xff\xfe.png")
    path = tmp_path / "odd.json"
    # the COCO writer escapes the surrogate, so the file is ASCII JSON
    path.write_text(json.dumps({"info": {}, "images": [{"id": 1, "file_name": name, "width": W,
                                                          "height": H}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                                 "bbox": [1.0, 1.0, 5.0, 4.0], "area": 20.0,
                                                 "iscrowd": 0, "score": 0.9}],
                                "categories": [{"id": 1, "name": "thing"}]}))
    studio = export(path, "label-studio").path
    tasks = json.loads(studio.read_text(encoding="utf-8"))
    assert tasks[0]["data"]["image"].endswith("/%FF%FE.png")  # the name's bytes, URL-quoted
    voc = export(path, "voc").path
    (xml,) = voc.glob("*.xml")
    assert os.fsencode(xml.name) == b"\xff\xfe.xml"
    assert ElementTree.parse(xml).getroot().find("object/name").text == "thing"
    yolo = export(path, "yolo").path
    assert (yolo / "labels" / "train" / os.fsdecode(b"\xff\xfe.txt")).read_text().startswith("0 ")


# -- the standalone export, read back by the tools ------------------------------------------------
def _kps(*visible) -> list:
    "17 COCO key points: the given ``(index, x, y)`` visible, the rest missing."
    flat = [0.0, 0.0, 0] * 17
    for j, x, y in visible:
        flat[3 * j: 3 * j + 3] = [x, y, 2]
    return flat


@pytest.fixture
def dataset(tmp_path):
    """Five images on disk and a COCO file like `label` writes: two tasks, scores, a duplicate
    box, the same box under another class, a mask and a pose."""
    images = tmp_path / "imgs"
    images.mkdir()
    entries, anns = [], []
    for i in range(5):
        Image.new("RGB", (W, H), (40 * i, 0, 0)).save(images / f"im{i}.png")
        entries.append({"id": i + 1, "file_name": f"im{i}.png", "width": W, "height": H})
        anns += [
            {"image_id": i + 1, "category_id": 5, "bbox": [2.0, 2.0, 10.0, 10.0], "score": 0.9,
             "task": "detection"},
            {"image_id": i + 1, "category_id": 5, "bbox": [2.5, 2.0, 10.0, 10.0], "score": 0.6,
             "task": "detection"},
            {"image_id": i + 1, "category_id": 2, "bbox": [2.0, 2.0, 10.0, 10.0], "score": 0.5,
             "task": "detection"},
            {"image_id": i + 1, "category_id": 9, "bbox": [20.0, 5.0, 10.0, 4.0], "score": 0.3,
             "task": "ocr", "text": "HI"},
        ]
    ring = ring_mask()
    anns.append({"image_id": 1, "category_id": 2, "bbox": bbox(ring), "score": 0.8,
                 "task": "detection", "segmentation": encode_rle(ring)})
    anns.append({"image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 20.0], "score": 0.7,
                 "task": "detection", "keypoints": _kps((0, 8.0, 7.0), (11, 9.0, 20.0)),
                 "num_keypoints": 2})
    anns = [{"id": k + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a}
            for k, a in enumerate(anns)]
    categories = [{"id": 1, "name": "person", "keypoints": [f"k{j}" for j in range(17)]},
                  {"id": 2, "name": "dog"}, {"id": 5, "name": "cat"}, {"id": 9, "name": "text"}]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"info": {"model": "m", "source": {"location": str(images),
                                                                  "kind": "folder"}},
                                "images": entries, "annotations": anns,
                                "categories": categories}))
    return path


def run_export(*args):
    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def test_yolo_export_is_the_ultralytics_layout_and_loads_in_supervision(dataset, tmp_path):
    out = tmp_path / "out"
    result = run_export(dataset, "--format", "yolo", "--out", out, "--split", "0.6")
    assert result.exit_code == 0, result.output
    root = out / "yolo"
    data = yaml.safe_load((root / "data.yaml").read_text())
    # ultralytics' documented data.yaml: path (the dataset root), train and val relative to it
    assert data["path"] == str(root.resolve()) and {"train", "val", "names"} <= set(data)
    assert data["names"] == {0: "person", 1: "dog", 2: "cat", 3: "text"}  # category-id order
    parts = {}
    for part in ("train", "val"):
        folder = root / data[part]
        parts[part] = sorted(p.name for p in folder.iterdir())
        for image in folder.iterdir():  # ultralytics finds a label by /images/ -> /labels/
            label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
            assert label.is_file()
            assert image.is_symlink() and image.resolve() == (dataset.parent / "imgs" /
                                                              image.name).resolve()
    assert len(parts["train"]) == 3 and len(parts["val"]) == 2
    assert sorted(parts["train"] + parts["val"]) == [f"im{i}.png" for i in range(5)]
    loaded = {part: sv.DetectionDataset.from_yolo(
        images_directory_path=str(root / "images" / part),
        annotations_directory_path=str(root / "labels" / part),
        data_yaml_path=str(root / "data.yaml")) for part in ("train", "val")}
    assert loaded["train"].classes == ["person", "dog", "cat", "text"]
    coco = json.loads(dataset.read_text())
    assert sum(len(d) for ds in loaded.values() for _, _, d in ds) == len(coco["annotations"])

    copied = run_export(dataset, "--format", "yolo", "--out", tmp_path / "c", "--image-mode",
                        "copy")
    assert copied.exit_code == 0, copied.output
    images = list((tmp_path / "c" / "yolo" / "images" / "train").iterdir())
    assert len(images) == 5 and not any(p.is_symlink() for p in images)
    data = yaml.safe_load((tmp_path / "c" / "yolo" / "data.yaml").read_text())
    assert data["val"] == data["train"] == "images/train"  # no split: val is the same folder


def test_yolo_export_without_the_images_says_so(dataset, tmp_path):
    moved = tmp_path / "elsewhere"
    (dataset.parent / "imgs").rename(moved)
    result = run_export(dataset, "--format", "yolo", "--out", tmp_path / "o")
    assert result.exit_code == 0 and "5 images not found: give --images" in result.output
    found = run_export(dataset, "--format", "yolo", "--out", tmp_path / "o", "--images", moved)
    assert found.exit_code == 0 and "not found" not in found.output
    assert len(list((tmp_path / "o" / "yolo" / "images" / "train").iterdir())) == 5


def test_split_is_seeded_and_an_added_image_moves_at_most_one_other():
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(40)]
    first = split_images(images, 0.75, seed=0)
    assert first == split_images(list(reversed(images)), 0.75, seed=0)
    assert sum(p == "train" for p in first.values()) == 30
    assert split_images(images, 0.75, seed=1) != first
    more = split_images(images + [{"id": 40, "file_name": "40.png"}], 0.75, seed=0)
    assert sum(first[i] != more[i] for i in first) <= 1
    assert set(split_images(images[:2], 0.99).values()) == {"train", "val"}


def _controls(config: str) -> dict:
    view = ElementTree.fromstring(config)
    return {c.get("name"): c for c in view if c.get("name")}


def test_label_studio_config_matches_the_predictions(dataset, tmp_path):
    out = tmp_path / "out"
    result = run_export(dataset, "--format", "label-studio", "--out", out)
    assert result.exit_code == 0, result.output
    tasks = json.loads((out / "label-studio.json").read_text())
    controls = _controls((out / "label-studio.xml").read_text())
    image = controls["image"]
    assert image.tag == "Image" and image.get("value") == "$image"
    tags = {"rectanglelabels": "RectangleLabels", "polygonlabels": "PolygonLabels",
            "keypointlabels": "KeyPointLabels", "textarea": "TextArea"}
    seen = set()
    for task in tasks:
        assert set(task["data"]) == {"image"}  # what $image names
        (prediction,) = task["predictions"]
        for r in prediction["result"]:
            control = controls[r["from_name"]]
            assert control.tag == tags[r["type"]] and control.get("toName") == r["to_name"]
            assert r["to_name"] == "image"
            labels = {label.get("value") for label in control.findall("Label")}
            assert set(r["value"].get(r["type"], [])) <= labels
            seen.add(r["type"])
    assert seen == set(tags)  # boxes, the ring's polygon, key points, OCR text
    # the local-files form points at the images
    for task in tasks:
        ref = task["data"]["image"]
        assert ref.startswith("/data/local-files/?d=")
        assert Path("/" + ref.split("?d=", 1)[1]).is_file()
    prefixed = run_export(dataset, "--format", "label-studio", "--out", out,
                          "--image-url-prefix", "https://host/data/")
    assert prefixed.exit_code == 0
    refs = [t["data"]["image"] for t in json.loads((out / "label-studio.json").read_text())]
    assert refs == [f"https://host/data/im{i}.png" for i in range(5)]


def test_polygons_are_simplified_within_the_tolerance():
    import cv2

    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, t.size)
    flat = np.stack([50 + (20 + noise) * np.cos(t), 40 + (20 + noise) * np.sin(t)], 1).ravel()
    kept = simplify_polygon(list(flat), 0)
    assert len(kept) == 400
    simple = simplify_polygon(list(flat), 1.0)
    assert 8 <= len(simple) < 80
    contour = np.asarray(simple, np.float32).reshape(-1, 1, 2)
    worst = max(abs(cv2.pointPolygonTest(contour, (float(x), float(y)), True))
                for x, y in flat.reshape(-1, 2))
    assert worst <= 1.0 + 1e-3


def test_tasks_min_score_and_nms_filter_every_format(dataset, tmp_path):
    def exported(*options):
        out = tmp_path / "_".join(options).replace(".", "") if options else tmp_path / "all"
        result = run_export(dataset, "--format", "coco,voc", "--out", out, *options)
        assert result.exit_code == 0, result.output
        coco = json.loads((out / "coco.json").read_text())
        voc = sv.DetectionDataset.from_pascal_voc(str(dataset.parent / "imgs"), str(out / "voc"))
        assert sum(len(d) for _, _, d in voc) == len(coco["annotations"])  # same boxes
        return coco

    everything = exported()
    assert len(everything["annotations"]) == 22
    detection = exported("--tasks", "detection")
    assert {a["task"] for a in detection["annotations"]} == {"detection"}
    assert len(detection["annotations"]) == 17
    per_class = exported("--tasks", "detection", "--nms", "0.5")
    assert len(per_class["annotations"]) == 12  # the 0.6 cat duplicate goes, per image
    assert per_class["info"]["filters"]["nms"] == 0.5
    assert per_class["info"]["filters"]["dropped"] == {"task": 5, "min_score": 0, "nms": 5}
    shown = run_export(dataset, "--format", "voc", "--out", tmp_path / "shown", "--nms", "0.5")
    assert "(5 dropped by --nms)" in shown.output
    agnostic = exported("--tasks", "detection", "--nms", "0.5", "--nms-class-agnostic")
    assert len(agnostic["annotations"]) == 7  # the dog under the cat goes too
    assert {a["score"] for a in agnostic["annotations"]} == {0.9, 0.8, 0.7}
    scored = exported("--min-score", "0.55")
    assert min(a["score"] for a in scored["annotations"]) >= 0.55
    assert len(scored["annotations"]) == 12  # not the 0.5 dogs and 0.3 texts


def test_export_command_names_bad_input(dataset, tmp_path):
    bad = run_export(dataset, "--format", "yolo,csv", "--out", tmp_path / "o")
    assert bad.exit_code == 2 and "unknown format 'csv'" in bad.output
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2]")
    failed = run_export(not_coco, "--format", "coco", "--out", tmp_path / "o")
    assert failed.exit_code == 1 and "is not a COCO file" in failed.output


def test_specks_of_a_noisy_mask_are_left_out_of_label_studio(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :160]
    noisy = np.hypot(xx - 80, yy - 60) < 40 + rng.normal(0, 2.5, (120, 160))
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps({
        "info": {}, "images": [{"id": 1, "file_name": "n.png", "width": 160, "height": 120}],
        "categories": [{"id": 1, "name": "blob"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox(noisy),
                         "area": float(noisy.sum()), "iscrowd": 0, "score": 0.9,
                         "segmentation": encode_rle(noisy)}]}))

    def polygons(**options):
        out = export(path, "label-studio", out=tmp_path / "ls.json", **options).path
        (task,) = json.loads(out.read_text())
        return [r for r in task["predictions"][0]["result"] if r["type"] == "polygonlabels"]

    every = polygons(simplify=0, min_polygon_area=0)
    kept = polygons()
    assert len(every) > 10 * len(kept) and 1 <= len(kept) <= 3  # the disk, not the specks
    assert max(len(r["value"]["points"]) for r in kept) < max(len(r["value"]["points"])
                                                              for r in every)
