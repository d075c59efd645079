"""Exports of a COCO file: YOLO, Pascal VOC and Label Studio, one after another, with masks that
supervision cannot turn into polygons."""

import json
from xml.etree import ElementTree

import numpy as np
import pytest

from sphinx_tools.pipelines.autolabel.export import Exported, export
from sphinx_tools.pipelines.autolabel.segmenting import encode_rle

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
    assert results["yolo"] == Exported(tmp_path / "labels_yolo", 1)
    assert results["voc"] == Exported(tmp_path / "labels_voc", 1)
    assert results["label-studio"] == Exported(tmp_path / "labels.label-studio.json", 0)

    lines = (tmp_path / "labels_yolo" / "labels" / "a.txt").read_text().splitlines()
    assert len(lines) == 3  # the bad mask as a box, the ring as one polygon, the plain box
    x, y, w, h = bbox(unbridgeable_mask())
    assert lines[0].split() == ["0", f"{(x + w / 2) / W:.5f}", f"{(y + h / 2) / H:.5f}",
                                f"{w / W:.5f}", f"{h / H:.5f}"]
    assert lines[1].split()[0] == "1" and len(lines[1].split()) > 9  # class 1 = ring, a polygon
    assert len(lines[2].split()) == 5
    assert "names: [thing, ring]" in (tmp_path / "labels_yolo" / "data.yaml").read_text()

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
    import os

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
    assert tasks[0]["data"]["image"].endswith(name)
    voc = export(path, "voc").path
    (xml,) = voc.glob("*.xml")
    assert os.fsencode(xml.name) == b"\xff\xfe.xml"
    assert ElementTree.parse(xml).getroot().find("object/name").text == "thing"
    yolo = export(path, "yolo").path
    assert (yolo / "labels" / os.fsdecode(b"\xff\xfe.txt")).read_text().startswith("0 ")
