"""The one result -> JSON record (sphinx_tools.records) and the shared COCO pieces
(sphinx_tools.coco) that labeling, the synthetic data and the web demo write with."""

import json

import numpy as np
import pytest
import supervision as sv

from sphinx_tools.annotations import build_detections
from sphinx_tools.coco import coco_annotation, decode_rle, encode_rle, rle_area, write_json
from sphinx_tools.records import ALL_FIELDS, plain, record_boxes, to_record


def test_rle_round_trip_and_area():
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True
    rle = encode_rle(mask)
    assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
    json.dumps(rle)
    assert (decode_rle(rle) == mask).all() and rle_area(rle) == 200.0


def test_coco_annotation_keeps_its_key_order_and_rounds_only_when_asked():
    ann = coco_annotation(7, 2, 3, (1, 2, 11, 22), area=150.0, color="red")
    assert list(ann) == ["id", "image_id", "category_id", "bbox", "area", "iscrowd", "color"]
    assert ann["bbox"] == [1, 2, 10, 20] and ann["area"] == 150.0 and ann["iscrowd"] == 0
    ann = coco_annotation(1, 1, 1, np.array([0.123, 0.456, 10.789, 5.0]), digits=2, score=0.5)
    assert ann["bbox"] == [0.12, 0.46, 10.67, 4.54] and ann["area"] == round(10.666 * 4.544, 2)
    assert list(ann)[-1] == "score"


def test_write_json_keeps_non_ascii_text(tmp_path):
    path = write_json(tmp_path / "x.json", {"text": "café"})
    assert path.read_bytes() == '{"text": "café"}'.encode("utf-8")


def test_detections_record_and_masks():
    d = build_detections([[1, 2, 3, 4], [5, 6, 7, 8]], class_name=["a", "b"],
                         confidence=[0.5, None], data={"text": ["x", "y"]}, raw_text="raw")
    record = to_record(d)
    assert record == {"type": "detections", "boxes": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
                      "scores": [0.5, None], "class_name": ["a", "b"], "text": ["x", "y"],
                      "raw_text": "raw", "truncated": False}
    assert to_record(d, ALL_FIELDS)["parse_notes"] == ["", ""]  # every data column
    mask = np.zeros((2, 10, 10), bool)
    mask[0, 2:4, 1:3] = True
    d.mask = mask
    rles = to_record(d)["masks"]
    assert [rle_area(r) for r in rles] == [4.0, 0.0] and (decode_rle(rles[0]) == mask[0]).all()
    assert record_boxes(record).tolist() == record["boxes"]


def test_unsupported_results_and_plain_values():
    with pytest.raises(TypeError, match="of type dict"):
        to_record({"not": "a result"})
    assert plain({"a": np.float32(np.nan), 1: (np.int64(2), np.array([1.5]))}) == \
        {"a": None, "1": [2, [1.5]]}
    assert to_record(sv.Detections.empty())["boxes"] == []
