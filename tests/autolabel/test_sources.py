"""Sources, robust image loading, ontology mapping and the work log."""

import io
import json
from contextlib import nullcontext as does_not_raise

import numpy as np
import pytest
from PIL import Image

from sphinx_tools.pipelines.autolabel import Ontology, open_source
from sphinx_tools.pipelines.autolabel.sources import ImageError, decode_image, load_image
from sphinx_tools.pipelines.autolabel.worklog import WorkLog


def png(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


# -- sources -----------------------------------------------------------------------------------
def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.webp", "sub/d.txt", ".hidden/e.png", "sub/z/f.tiff"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list(open_source(tmp_path).items())
    assert [i.file_name for i in items] == ["a.JPG", "b.png", "sub/c.webp", "sub/z/f.tiff"]
    assert [i.image_id for i in items] == [1, 2, 3, 4]


def test_text_list_coco_and_refcoco_sources(synth_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{synth_dir}/images/000001.png\n\n{synth_dir}/images/000000.png\n")
    assert [i.path.name for i in open_source(listing).items()] == ["000001.png", "000000.png"]
    coco = open_source(synth_dir / "coco.json")
    assert coco.kind == "coco" and coco.categories[0]["name"] == "circle"
    first = next(coco.items())
    assert first.path.is_file() and first.file_name == "000000.png"  # found under images/
    rec = open_source(synth_dir / "rec.json")
    items = list(rec.items())
    assert rec.kind == "refcoco" and all(i.path.is_file() for i in items)
    assert items[0].expressions[0][1] == json.loads((synth_dir / "rec.json").read_text())[0][
        "question"]


@pytest.mark.parametrize(
    "src, message",
    [("missing-dir", "does not exist"), ("bad.json", "neither COCO")],
)
def test_unknown_sources_name_the_path(tmp_path, src, message):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=message):
        open_source(tmp_path / src)


# -- image loading -----------------------------------------------------------------------------
def rotated_jpeg():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return png(image, "JPEG", exif=exif.tobytes())


def palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return png(image, transparency=0)


@pytest.mark.parametrize(
    "data, size, pixel, ctx",
    [
        (lambda: rotated_jpeg(), (20, 40), None, does_not_raise()),  # EXIF orientation applied
        (lambda: png(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), (4, 4), None,
         does_not_raise()),  # CMYK
        (lambda: png(Image.fromarray(np.full((4, 4), 65535, np.uint16))), (4, 4), (255,) * 3,
         does_not_raise()),  # 16-bit gray
        (lambda: palette_with_transparency(), (8, 8), (255, 255, 255),
         does_not_raise()),  # palette + transparency: on white
        (lambda: png(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), (4, 4), (255, 255, 255),
         does_not_raise()),  # alpha: composited on white
        (lambda: png(Image.new("LA", (4, 4), (0, 255))), (4, 4), (0, 0, 0),
         does_not_raise()),  # gray + alpha
        (lambda: b"GIF89a broken", None, None, pytest.raises(ImageError, match="decode")),
        (lambda: png(Image.new("RGB", (64, 64)))[:60], None, None,
         pytest.raises(ImageError)),  # truncated
    ],
)
def test_decode_converts_or_explains(data, size, pixel, ctx):
    with ctx:
        image = decode_image(data())
        assert image.mode == "RGB" and image.size == size
        if pixel is not None:
            assert image.getpixel((0, 0)) == pixel


def test_decompression_bomb_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(png(Image.new("L", (100, 100))), max_pixels=5000)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")


# -- ontology ----------------------------------------------------------------------------------
ONTO = "person=man|woman|people,car=automobile,traffic light,bicycle"


@pytest.mark.parametrize(
    "phrase, keep, expected",
    [
        ("person", True, "person"),  # exact
        ("Two Women", True, "person"),  # synonym, count, plural, case
        ("3 people", True, "person"),  # irregular plural
        ("a red automobile", True, "car"),  # head noun
        ("Traffic_Lights", True, "traffic light"),  # underscores, plural
        ("bicylce", True, "bicycle"),  # fuzzy spelling
        ("tree", True, "tree"),  # unmapped kept as a new category
        ("tree", False, None),  # unmapped dropped
        ("", True, None),  # nothing to map
    ],
)
def test_ontology_maps_phrases(phrase, keep, expected):
    assert Ontology.parse(ONTO, keep_unmapped=keep).map(phrase) == expected


def test_ontology_files_and_errors(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"car": {"synonyms": ["auto"], "prompt": "cars"}, "dog": None}))
    onto = Ontology.parse(str(path))
    assert onto.names == ["car", "dog"] and onto.prompt_classes() == ["cars", "dog"]
    assert onto.map("autos") == "car"
    with pytest.raises(ValueError, match="at least one class"):
        Ontology.parse(" ")
    with pytest.raises(ValueError, match="without a name"):
        Ontology.parse("=x")


# -- work log ----------------------------------------------------------------------------------
def test_worklog_append_read_and_torn_lines(tmp_path):
    with WorkLog(tmp_path, rank=0) as log:
        log.append([{"key": "a", "kind": "result"}, {"key": "b", "kind": "failure"}])
    with WorkLog(tmp_path, rank=1) as other:
        other.append([{"key": "c", "kind": "result"}])
    with open(tmp_path / "rank-00000.jsonl", "a") as f:
        f.write('{"key": "d", "ki')  # died mid-write
    log = WorkLog(tmp_path, rank=0)
    assert log.done_keys() == {"a", "c"} and log.torn_lines == 1
    log.append([{"key": "e", "kind": "result"}])
    assert log.done_keys() == {"a", "c", "e"}
    entries = list(log.entries())
    assert [log.read(n, o)["key"] for n, o, _ in entries] == ["a", "b", "e", "c"]
    log.close()
