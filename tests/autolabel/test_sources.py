"""Sources, robust image loading, ontology mapping and the work log."""

import io
import json
import os
import re
from contextlib import nullcontext as does_not_raise

import numpy as np
import pytest
from PIL import Image

from sphinx_tools.pipelines.autolabel import Ontology, open_source
from sphinx_tools.pipelines.autolabel.sources import (
    ImageError,
    SourceError,
    decode_image,
    load_image,
    read_bytes,
)
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


# -- malformed sources fail at open_source, naming the entry ---------------------------------
def coco(images, categories=None) -> dict:
    return {"images": images, "categories": categories or [{"id": 1, "name": "dog"}]}


def image(image_id, name="a.png") -> dict:
    return {"id": image_id, "file_name": name}


@pytest.mark.parametrize(
    "data, message",
    [
        (coco([image(1), {"id": 2}]), r"images\[1\] \(id 2\): 'file_name' is missing"),
        (coco([image(1, 5)]), r"images\[0\] \(id 1\): 'file_name' must be a string, got 5"),
        (coco([image(1, None)]), r"'file_name' must be a string, got null"),
        (coco([image(1, " ")]), r"'file_name' is empty"),
        (coco([image(1, "a\0.png")]), r"images\[0\] \(id 1\): 'file_name' .* NUL byte"),
        (coco([image(1, "\ud800.png")]), r"not a possible file name"),  # lone surrogate
        (coco([image("1")]), r"images\[0\]: 'id' must be an integer, got \"1\" \(a string\)"),
        (coco([image(None)]), r"images\[0\]: 'id' must be an integer, got null"),
        (coco([image(3.0)]), r"'id' must be an integer, got 3.0 \(a number\)"),
        (coco([image(2.5)]), r"'id' must be an integer, got 2.5"),
        (coco([image(True)]), r"'id' must be an integer, got true \(a boolean\)"),
        (coco([{"file_name": "a.png"}]), r"images\[0\]: 'id' must be an integer, got nothing"),
        (coco([image(1), image("2", "b.png")]), r"images\[1\]: 'id' must be an integer"),  # mixed
        (coco([image(1), image(2, "b.png"), image(1, "c.png")]),
         r"images\[2\] \(id 1\): duplicate image id, also used by images\[0\]"),
        (coco({"0": image(1)}), r"'images' must be a list, got \{"),
        (coco([image(1), "b.png"]), r"images\[1\] must be an object, got \"b.png\""),
        (coco([image(1)], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]),
         r"categories\[1\] \(id 1\): duplicate category id, also used by categories\[0\]"),
        (coco([image(1)], [{"id": "1", "name": "a"}]), r"categories\[0\]: 'id' must be an int"),
        (coco([image(1)], [{"id": 1.0, "name": "a"}]), r"categories\[0\]: 'id' must be an int"),
        (coco([image(1)], [{"id": 1}]), r"categories\[0\] \(id 1\): 'name' must be a non-empty"),
        (coco([image(1)], [{"id": 1, "name": 7}]), r"'name' must be a non-empty string, got 7"),
        (coco([image(1)], [{"id": 1, "name": "a", "synonyms": "b"}]), r"'synonyms' must be a"),
        (coco([image(1)], [["dog"]]), r"categories\[0\] must be an object"),
        ({"images": [image(1)], "categories": {"id": 1}}, r"'categories' must be a list"),
        ([{"image": "a.png", "question": "x"}, {"question": "y"}],
         r"RefCOCO source .*: record 1: 'image' is missing"),
        ([{"image": "a.png", "question": "x"}, {"image": "a.png", "question": 3}],
         r"record 1: 'question' must be a string, got 3"),
        ([{"image": "a.png", "question": "x"}, {"image": "a.png"}],
         r"record 1: 'question' must be a string, got nothing"),
        ([{"image": "a.png", "question": "x"}, {"image": ["a.png"], "question": "y"}],
         r"record 1: 'image' must be a string, got \[\"a.png\"\]"),
        ([{"image": "a.png", "question": "x"}, "a.png"], r"record 1 must be an object"),
        ([{"image": "a.png", "question": "x", "question_id": 1.5}],
         r"record 0: 'question_id' must be a string or an integer, got 1.5"),
        ([{"image": "a.png", "question": "x", "question_id": "q"},
          {"image": "b.png", "question": "y", "question_id": "q"}],
         r"record 1 \(question_id 'q'\): duplicate question id 'q', also used by record 0"),
    ],
)
def test_malformed_json_entries_fail_at_open_naming_the_entry(tmp_path, data, message):
    path = tmp_path / "src.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SourceError, match=message) as info:
        open_source(path)
    assert isinstance(info.value, ValueError)  # the CLI shows ValueErrors as one line
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"images": [', "not valid JSON"),
    ],
)
def test_unparsable_json_names_the_file(tmp_path, text, message):
    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(SourceError, match=message) as info:
        open_source(path)
    assert "deep.json" in str(info.value)


def test_nul_byte_in_a_file_list_fails_at_open_naming_the_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# images\na.png\n\nb\x00.png\n")
    with pytest.raises(SourceError, match=r"list.txt', line 4: the path contains a NUL byte"):
        open_source(listing)


def test_valid_sources_keep_their_order_and_ids(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco([image(7, "b.png"), image(-1, "a.png"), image(0, "c.png")])))
    items = list(open_source(path).items())
    assert [(i.index, i.image_id, i.file_name) for i in items] == [
        (0, -1, "a.png"), (1, 0, "c.png"), (2, 7, "b.png")]
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps([{"image": "b.png", "question": "x"},
                               {"image": "a.png", "question": "y", "question_id": 5},
                               {"image": "b.png", "question": "z"}]))
    items = list(open_source(rec).items())
    assert [(i.image_id, i.file_name, i.expressions) for i in items] == [
        (1, "b.png", [("0", "x"), ("2", "z")]), (2, "a.png", [("5", "y")])]


def test_cli_reports_a_malformed_source_in_one_line_before_the_model(tmp_path):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco([image(1), image(1, "b.png")])))
    result = CliRunner().invoke(main, ["label", str(path), "-c", str(tmp_path / "no-ckpt"),
                                       "--out", str(tmp_path / "out.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "images[1] (id 1): duplicate image id" in result.output
    assert "checkpoint" not in result.output  # checked before the checkpoint is looked at


# -- paths outside the image root ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, ctx",
    [
        ("../outside.png", pytest.raises(SourceError, match=r"climbs out with '\.\.'")),
        ("images/../../outside.png", pytest.raises(SourceError, match="outside the image root")),
        ("..", pytest.raises(SourceError, match="outside the image root")),
        ("{outside}", pytest.raises(SourceError, match=r"an absolute path\); pass "
                                                       r"--allow-outside-root")),
        ("images/../a.png", does_not_raise()),  # stays inside after normalization
        ("sub/..a.png", does_not_raise()),  # a name that starts with dots
    ],
)
@pytest.mark.parametrize("kind", ["coco", "refcoco"])
def test_names_outside_the_root_are_refused_unless_allowed(tmp_path, name, ctx, kind):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(png(Image.new("RGB", (4, 4))))
    name = name.format(outside=tmp_path / "outside.png")
    data = (coco([image(1, name)]) if kind == "coco"
            else [{"image": name, "question": "the dog"}])
    path = root / "src.json"
    path.write_text(json.dumps(data))
    with ctx:
        open_source(path)
    item = next(open_source(path, allow_outside_root=True).items())
    assert item.file_name == name
    if "outside" in name:
        assert load_image(item.path)[0].size == (4, 4)


def test_the_refusal_names_the_image_root(tmp_path):
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "c.json"
    path.write_text(json.dumps(coco([image(1, "../images/a.png")])))
    with pytest.raises(SourceError, match=r"'\.\./images/a.png' is outside the image root "
                                          + re.escape(repr(str(tmp_path / "ann")))):
        open_source(path)
    with pytest.raises(SourceError, match=re.escape(repr(str(tmp_path / "images")))):
        open_source(path, image_root=tmp_path / "images")


def test_file_lists_may_name_files_anywhere(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "a.png").write_bytes(png(Image.new("RGB", (4, 4))))
    listing = tmp_path / "lists" / "list.txt"
    listing.write_text(f"../a.png\n{tmp_path / 'a.png'}\n")
    items = list(open_source(listing).items())
    assert [i.file_name for i in items] == ["../a.png", (tmp_path / "a.png").as_posix()]
    assert all(load_image(i.path)[0].size == (4, 4) for i in items)


# -- file names that are not valid UTF-8 ----------------------------------------------------------
def write_raw(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_non_utf8_file_names_are_yielded_and_read(tmp_path):
    data = png(Image.new("RGB", (5, 3)))
    write_raw(os.fsencode(tmp_path) + b"/\xff\xfe.png", data)
    (tmp_path / "ok.png").write_bytes(data)
    folder = list(open_source(tmp_path).items())
    assert [i.file_name for i in folder] == ["ok.png", "\udcff\udcfe.png"]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf\xff\xfe.png\r\nok.png\n")  # BOM, CRLF, raw bytes
    listed = list(open_source(listing).items())
    assert [i.file_name for i in listed] == ["\udcff\udcfe.png", "ok.png"]
    for item in folder + listed:
        assert isinstance(item.file_name, str)
        assert load_image(item.path)[0].size == (5, 3)
    # a COCO json names it with the escaped surrogates, as json.dumps writes them
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco([image(1, "\udcff\udcfe.png")])))
    assert load_image(next(open_source(path).items()).path)[0].size == (5, 3)


def test_unreadable_names_are_per_item_failures(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco([image(1, "a" * 300 + ".png")])))  # too long for the OS
    item = next(open_source(path).items())
    with pytest.raises(ImageError, match="cannot read"):
        load_image(item.path)
    with pytest.raises(ImageError, match="cannot read"):
        read_bytes(tmp_path / "a\0.png")


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


def test_an_undecodable_image_gets_the_same_reason_every_time():
    from sphinx_tools.pipelines.autolabel.sources import ImageError, decode_image

    reasons = set()
    for _ in range(2):
        with pytest.raises(ImageError) as info:
            decode_image(b"not an image at all", 10**8)
        reasons.add(str(info.value))
    assert len(reasons) == 1 and "0x" not in reasons.pop()
