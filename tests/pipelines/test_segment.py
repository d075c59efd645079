"""SphinxSamPipeline and segment_detections: scripted SPHINX answers, tiny SAM."""

from functools import partial

import numpy as np
import pytest
import supervision as sv
import torch
from conftest import gray_image, tiny_sam
from PIL import Image

from sphinx_tools.errors import UnknownTaskError
from sphinx_tools.pipelines import (
    MASK_SCORE_FIELD,
    PROMPT_BOX_FIELD,
    SOURCE_INDEX_FIELD,
    SphinxSamPipeline,
    load_sam,
    segment_detections,
)
from sphinx_tools.demo.synth import fmt_box, fmt_point


def box_text(xyxy, wh) -> str:
    return f"[{fmt_box(xyxy, wh)}]"


def detection_answer(scene) -> str:
    return " ".join(f"<p>{o.category}</p> {box_text(o.xyxy, scene.size)}" for o in scene.objects)


def extent(mask) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# -- masks line up with boxes ------------------------------------------------------------------
@pytest.mark.parametrize("wh", [(96, 40), (40, 96), (64, 64)])  # landscape, portrait, square
def test_masks_line_up_with_their_boxes(box_sam, wh):
    w, h = wh
    boxes = np.array([[4, 6, 30, 20], [10, 15, 36, 38]], dtype=float)
    out = segment_detections(box_sam, gray_image(w, h), sv.Detections(xyxy=boxes))
    assert out.mask.shape == (2, h, w) and out.mask.dtype == bool
    for box, mask in zip(boxes, out.mask, strict=True):
        np.testing.assert_allclose(extent(mask), box, atol=1)  # the box went in SAM's frame right
    np.testing.assert_allclose(out.data[MASK_SCORE_FIELD], [0.9, 0.9])  # best of 3 candidates
    np.testing.assert_array_equal(out.data[SOURCE_INDEX_FIELD], [0, 1])


def test_pipeline_detection_masks_match_scene_boxes(fake_model, box_sam, shapes_scene):
    fake_model.enqueue(detection_answer(shapes_scene))
    out = SphinxSamPipeline(fake_model, box_sam)(shapes_scene.image, "detection")
    (dets,) = out.detections
    w, h = shapes_scene.size
    assert len(dets) == len(shapes_scene.objects) and dets.mask.shape == (len(dets), h, w)
    scale = max(w, h) / 100  # boxes travel as 2-decimal fractions of the padded side
    for obj, mask in zip(shapes_scene.objects, dets.mask, strict=True):
        np.testing.assert_allclose(extent(mask), obj.xyxy, atol=scale + 1)
    assert isinstance(out.results[0], sv.Detections) and out.results[0].mask is None
    assert list(dets.data["class_name"]) == [o.category for o in shapes_scene.objects]


def test_single_mask_mode(box_sam):
    out = segment_detections(
        box_sam,
        gray_image(50, 30),
        sv.Detections(xyxy=np.array([[2.0, 2, 20, 20]])),
        multimask=False,
    )
    assert box_sam.predict_calls[0]["multimask_output"] is False
    assert out.mask.shape == (1, 30, 50) and extent(out.mask[0]) == [2, 2, 20, 20]


# -- the SAM image encoder runs once per image -------------------------------------------------
def test_encoder_once_per_image_and_one_batched_call(fake_model, sam_predictor, shapes_scene):
    other = Image.fromarray(gray_image(90, 70))
    fake_model.enqueue(detection_answer(shapes_scene))
    fake_model.enqueue("<p>dog</p> [0.10,0.20,0.50,0.60;0.30,0.30,0.70,0.70]")
    out = SphinxSamPipeline(fake_model, sam_predictor)([shapes_scene.image, other], "detection")
    assert sam_predictor.encoder_calls == 2
    assert [len(c["boxes"]) for c in sam_predictor.predict_calls] == [len(shapes_scene.objects), 2]
    assert [d.mask.shape[1:] for d in out.detections] == [shapes_scene.size[::-1], (70, 90)]


def test_embedding_reused_for_the_same_image_only(sam_predictor):
    image, boxes = gray_image(60, 40), sv.Detections(xyxy=np.array([[1.0, 1, 30, 30]]))
    segment_detections(sam_predictor, image, boxes)
    segment_detections(sam_predictor, image.copy(), boxes)  # same pixels: reused
    assert sam_predictor.encoder_calls == 1
    segment_detections(sam_predictor, gray_image(60, 40, seed=1), boxes)  # other pixels
    assert sam_predictor.encoder_calls == 2
    sam_predictor.set_image(image)  # someone else used the predictor in between
    segment_detections(sam_predictor, gray_image(60, 40, seed=1), boxes)
    assert sam_predictor.encoder_calls == 4


def test_batch_size_splits_the_sam_calls(sam_predictor):
    boxes = sv.Detections(xyxy=np.tile([[1.0, 1, 20, 20]], (5, 1)))
    out = segment_detections(sam_predictor, gray_image(40, 40), boxes, batch_size=2)
    assert [len(c["boxes"]) for c in sam_predictor.predict_calls] == [2, 2, 1]
    assert sam_predictor.encoder_calls == 1 and out.mask.shape == (5, 40, 40)


# -- empty results -----------------------------------------------------------------------------
def test_nothing_found_gives_empty_masks_without_sam(fake_model, sam_predictor):
    fake_model.enqueue("There is nothing to detect here.")
    out = SphinxSamPipeline(fake_model, sam_predictor)(gray_image(33, 21), "detection")
    (dets,) = out.detections
    assert len(dets) == 0 and dets.mask.shape == (0, 21, 33)
    assert sam_predictor.encoder_calls == 0 and sam_predictor.predict_calls == []
    assert "no box found" in dets.metadata["parse_notes"]


# -- options -----------------------------------------------------------------------------------
def test_tighten_boxes_to_mask_extent(sam_predictor):
    boxes = np.array([[2.0, 3, 40, 30], [10, 10, 50, 35]])
    out = segment_detections(
        sam_predictor, gray_image(64, 48), sv.Detections(xyxy=boxes), tighten_boxes=True
    )
    np.testing.assert_array_equal(out.data[PROMPT_BOX_FIELD], boxes)
    for box, mask, prompt in zip(out.xyxy, out.mask, boxes, strict=True):
        expected = extent(mask) if mask.any() else prompt  # an empty mask keeps its box
        np.testing.assert_array_equal(box, expected)


def test_min_area_drops_small_masks_and_keeps_source_rows(box_sam):
    boxes = np.array([[0.0, 0, 4, 4], [0, 0, 30, 30], [5, 5, 8, 8], [10, 10, 40, 25]])
    out = segment_detections(
        box_sam, gray_image(50, 40), sv.Detections(xyxy=boxes, class_id=np.arange(4)), min_area=50
    )
    np.testing.assert_array_equal(out.data[SOURCE_INDEX_FIELD], [1, 3])
    np.testing.assert_array_equal(out.class_id, [1, 3])
    assert (out.mask.sum(axis=(1, 2)) >= 50).all()


@pytest.mark.parametrize("wh", [(37, 101), (120, 40)])
def test_real_tiny_sam_any_image_size(sam_predictor, wh):
    w, h = wh
    boxes = np.array([[0.0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]])
    dets = sv.Detections(
        xyxy=boxes, confidence=np.array([0.5, 0.7]), data={"class_name": ["a", "b"]}
    )
    out = segment_detections(sam_predictor, Image.fromarray(gray_image(w, h)), dets)
    assert out.mask.shape == (2, h, w) and out.mask.dtype == bool
    assert out.data[MASK_SCORE_FIELD].shape == (2,)
    np.testing.assert_array_equal(out.confidence, [0.5, 0.7])
    assert list(out.data["class_name"]) == ["a", "b"] and dets.mask is None  # input untouched


# -- other tasks -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, options, answer, rows",
    [
        ("rec", {"expression": "the dog"}, "[0.10,0.20,0.50,0.60]", 1),
        ("ocr", {}, "<p>STOP</p> [0.10,0.20,0.50,0.40] <p>EXIT</p> [0.50,0.50,0.90,0.70]", 2),
        ("layout", {}, "<p>title</p> [0.10,0.10,0.90,0.20] <p>text</p> [0.10,0.30,0.90,0.80]", 2),
        (
            "grounded_caption",
            {},
            "<p>A dog</p> [0.10,0.20,0.50,0.60] near <p>a ball</p> [0.60,0.60,0.80,0.80] .",
            2,
        ),
        (
            "relation",
            {"expression": "dog on mat"},
            "<p>dog</p> [0.10,0.20,0.50,0.60] on <p>mat</p> [0.00,0.50,1.00,1.00]",
            2,
        ),
        ("reg", {"regions": [(5, 5, 40, 30)]}, "a brown dog", 1),
    ],
)  # every grounded result type: Detections, GroundedCaption, SceneGraph, REG
def test_grounded_tasks(fake_model, box_sam, task, options, answer, rows):
    fake_model.enqueue(answer)
    out = SphinxSamPipeline(fake_model, box_sam)(gray_image(80, 80), task, **options)
    (dets,) = out.detections
    assert len(dets) == rows and dets.mask.shape == (rows, 80, 80)
    for box, mask in zip(dets.xyxy, dets.mask, strict=True):
        np.testing.assert_allclose(extent(mask), box, atol=1)


def test_pose_finds_people_then_prompts_sam_with_key_points(fake_model, box_sam):
    w, h = 120, 80
    fake_model.enqueue(f"<p>person</p> {box_text((20, 5, 60, 75), (w, h))}")
    points = {
        "nose": (40, 12),
        "left shoulder": (50, 25),
        "right shoulder": (30, 25),
        "left ankle": (48, 70),
        "right ankle": (32, 70),
    }
    fake_model.enqueue(" ".join(f"<p>{n}</p> [{fmt_point(p, (w, h))}]" for n, p in points.items()))
    out = SphinxSamPipeline(fake_model, box_sam)(gray_image(w, h), "pose")
    (dets,), (key_points,) = out.detections, out.results
    assert isinstance(key_points, sv.KeyPoints) and len(key_points) == 1
    person = box_text((20, 5, 60, 75), (w, h))
    assert person in fake_model.calls[1][0][0]  # the pose question is about the found person
    (call,) = box_sam.predict_calls
    assert tuple(call["point_coords"].shape) == (1, 17, 2)
    assert (call["point_labels"] == 1).sum() == len(points) and (
        call["point_labels"] == -1
    ).sum() == 12
    x1, y1, x2, y2 = dets.xyxy[0]
    assert 20 <= x1 < 30 and 5 <= y1 < 12 and 50 < x2 <= 60 and 70 < y2 <= 75
    assert dets.mask.shape == (1, h, w) and list(dets.data["class_name"]) == ["person"]


def test_pose_without_people_is_empty(fake_model, box_sam):
    fake_model.enqueue("No people.")
    out = SphinxSamPipeline(fake_model, box_sam)(gray_image(50, 50), "pose")
    assert len(out.results[0]) == 0 and out.detections[0].mask.shape == (0, 50, 50)
    assert box_sam.encoder_calls == 0 and len(fake_model.calls) == 1


def test_pose_point_prompts_can_be_turned_off(fake_model, box_sam):
    fake_model.enqueue("<p>nose</p> [0.40,0.30] <p>left hip</p> [0.45,0.60]")
    SphinxSamPipeline(fake_model, box_sam)(
        gray_image(50, 50), "pose", box=(0, 0, 50, 50), point_prompts=False
    )
    assert box_sam.predict_calls[0]["point_coords"] is None


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_text_tasks_are_rejected(fake_model, box_sam, task):
    with pytest.raises(ValueError, match=f"task '{task}' returns str"):
        SphinxSamPipeline(fake_model, box_sam)(gray_image(8, 8), task)
    assert fake_model.calls == []


def test_unknown_task_and_bad_options(fake_model, box_sam):
    pipe = SphinxSamPipeline(fake_model, box_sam)
    with pytest.raises(UnknownTaskError, match="segmentation"):
        pipe(gray_image(8, 8), "segmentation")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        pipe(gray_image(8, 8), "detection", colour="red")
    with pytest.raises(ValueError, match="min_area"):
        pipe(gray_image(8, 8), "detection", min_area=-1)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\), got \(8, 8, 4\)"):
        pipe(np.zeros((8, 8, 4), np.uint8), "detection")
    with pytest.raises(ValueError, match="got str"):
        pipe("image.png", "detection")
    assert fake_model.calls == []


def test_detections_from_another_image_size(box_sam):
    dets = sv.Detections(xyxy=np.array([[10.0, 10, 200, 150]]))  # parsed for a 640x480 image
    with pytest.raises(ValueError, match=r"\(width, height\) = \(100, 80\)"):
        segment_detections(box_sam, gray_image(100, 80), dets)
    assert box_sam.encoder_calls == 0


def test_point_prompts_must_match_rows(box_sam):
    dets = sv.Detections(xyxy=np.array([[1.0, 1, 9, 9]]))
    with pytest.raises(ValueError, match=r"point_coords.*\(1, k, 2\), got \(2, 3, 2\)"):
        segment_detections(
            box_sam,
            gray_image(10, 10),
            dets,
            point_coords=np.zeros((2, 3, 2)),
            point_labels=np.ones((2, 3)),
        )
    with pytest.raises(ValueError, match="both"):
        segment_detections(box_sam, gray_image(10, 10), dets, point_coords=np.zeros((1, 3, 2)))


def test_load_sam_missing_checkpoint(tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        load_sam(missing)


def test_load_sam_unknown_model_type_and_success(tmp_path, monkeypatch):
    import segment_anything

    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_sam(seed=1).state_dict(), checkpoint)
    with pytest.raises(ValueError, match="'vit_x'"):
        load_sam(checkpoint, model_type="vit_x")

    built_with = []

    def build_tiny(checkpoint=None):  # segment_anything's builders' signature
        built_with.append(checkpoint)
        return tiny_sam(seed=2)

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build_tiny)
    predictor = load_sam(checkpoint, model_type="tiny")
    assert isinstance(predictor, segment_anything.SamPredictor) and not predictor.model.training
    expected = tiny_sam(seed=1).state_dict()
    for name, value in predictor.model.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    # the builder never sees the file: load_sam reads it (weights only) and loads the state dict
    assert built_with == [None]


class WritesMarker:
    "Unpickling this runs code: it would create the marker file."

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["object", "pickle"])
def test_load_sam_refuses_a_checkpoint_that_runs_code(tmp_path, monkeypatch, planted):
    import pickle

    import segment_anything

    from sphinx_tools.errors import CheckpointError

    from segment_anything.build_sam import _build_sam

    # segment_anything's own builder at small widths: given the file, it would torch.load it itself
    build = partial(_build_sam, 32, 1, 2, [0])
    monkeypatch.setitem(segment_anything.sam_model_registry, "small", build)
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    payload = {**build().state_dict(), "extra": WritesMarker(marker)}
    if planted == "object":  # torch.save's zip format
        torch.save(payload, checkpoint)
    else:  # a bare pickle stream
        checkpoint.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth holds something other than"):
        load_sam(checkpoint, model_type="small")
    assert not marker.exists()


def test_load_sam_names_a_checkpoint_of_another_model(tmp_path, monkeypatch):
    import segment_anything

    from sphinx_tools.errors import CheckpointError

    checkpoint = tmp_path / "other.pth"
    state = tiny_sam().state_dict()
    state["image_encoder.unknown"] = state.pop("image_encoder.pos_embed")
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    torch.save(state, checkpoint)
    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", partial(tiny_sam, seed=0))
    with pytest.raises(CheckpointError) as e:
        load_sam(checkpoint, model_type="tiny")
    assert "other.pth does not fit model_type 'tiny'" in str(e.value)
    assert "missing keys (1): image_encoder.pos_embed" in str(e.value)
    assert "unexpected keys (1): image_encoder.unknown" in str(e.value)
    assert "mask_decoder.iou_token.weight (1, 8) (expected (1, 32))" in str(e.value)


# -- the real (tiny, random) SPHINX ------------------------------------------------------------
def test_smoke_real_tiny_sphinx_checkpoint(tiny_model, sam_predictor, shapes_scene):
    "Real runtime + real SAM plumbing; the tiny model's answer is gibberish, so any count is fine."
    out = SphinxSamPipeline(tiny_model, sam_predictor)(
        shapes_scene.image, "detection", sphinx_kwargs={"max_gen_len": 8}
    )
    (dets,) = out.detections
    w, h = shapes_scene.size
    assert dets.mask.shape == (len(dets), h, w)
    assert isinstance(dets.metadata["raw_text"], str)
    assert sam_predictor.encoder_calls == (1 if len(dets) else 0)
