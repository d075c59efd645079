"""The web demo (``sphinx-tools serve``): its logic without a browser, then the real page in
headless Chromium.

The browser test starts the CLI on a free loopback port with a tiny checkpoint, uploads an image,
runs two chat turns and checks the streamed chat, the drawn image, the JSON and its download. It
needs Debian's ``chromium`` and the ``playwright`` Python package (no browser download); without
them it is skipped, unless ``SPHINX_TOOLS_REQUIRE_BROWSER=1`` (set by CI) makes that a failure.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from PIL import Image

os.environ.setdefault("SPHINX_TOOLS_LOAD_PLUGINS", "none")  # built-in tasks only
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from sphinx_tools import (  # noqa: E402
    GroundedCaption,
    SceneGraph,
    build_prompt,
    get_task,
    list_tasks,
)
from sphinx_tools.pipelines import webapp  # noqa: E402
from sphinx_tools.records import ALL_FIELDS, to_record  # noqa: E402
from sphinx_tools.demo.synth import generate_scene, scene_qas  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [  # this sandbox has no network: without these Chromium hangs at start
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_tiny_ckpt(tmp_path_factory) -> Path:
    "One tiny checkpoint for every test worker of this run (built once, renamed atomically)."
    return webapp.tiny_checkpoint(tmp_path_factory.getbasetemp().parent)


class ScriptedModel:
    "Streams enqueued answers a few characters at a time; records each prompt."

    def __init__(self, *answers):
        self.answers = list(answers)
        self.prompts = []

    def stream(self, prompt, image, max_gen_len=512, temperature=0.0, top_p=0.95, **kw):
        self.prompts.append((prompt, image.size, max_gen_len))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        for end in range(3, len(answer) + 3, 3):
            yield answer[:end]


@pytest.fixture
def scene():
    return generate_scene("shapes", seed=3)


@pytest.fixture
def image_path(tmp_path, scene):
    path = tmp_path / "shapes.png"
    scene.image.save(path)
    return str(path)


def answer_for(scene, task, **options):
    "The exact SPHINX-format answer synth writes for ``task`` (first match)."
    return next(qa for qa in scene_qas(scene) if qa.task == task and
                all(qa.options.get(k) == v for k, v in options.items()))


def backend(model, tmp_path, **kw):
    return webapp.DemoBackend(model, note="test", out_dir=tmp_path / "out", **kw)


# -- task options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("10,20,110,220", (10.0, 20.0, 110.0, 220.0)),  # plain
        ("[10, 20, 110, 220]", (10.0, 20.0, 110.0, 220.0)),  # brackets and spaces
        ("1.5;2;3;4", (1.5, 2.0, 3.0, 4.0)),  # semicolons
        ("10,20,5,220", ValueError),  # x2 < x1
        ("10,20,30", ValueError),  # three numbers
        ("a,b,c,d", ValueError),  # not numbers
    ],
)
def test_parse_box(text, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="x1,y1,x2,y2"):
            webapp.parse_box(text)
    else:
        assert webapp.parse_box(text) == expected


@pytest.mark.parametrize(
    "task, text, options_json, expected",
    [
        ("detection", "dog, red ball ,", "", {"classes": ["dog", "red ball"]}),
        ("detection", "", "", {}),  # all objects
        ("rec", "the dog", "", {"expression": "the dog"}),
        ("reg", "", "", {"region": (0.0, 0.0, 200.0, 100.0), "image_size": (200, 100)}),
        ("pose", "1,2,30,40", "", {"box": (1.0, 2.0, 30.0, 40.0), "image_size": (200, 100)}),
        ("relation", "", "", {"variant": "triplets"}),
        ("relation", "the cat on the mat", "", {"expression": "the cat on the mat"}),
        ("caption", "detailed", "", {"variant": "detailed"}),
        ("grounded_caption", "ignored", '{"max_objects": 3}', {"max_objects": 3}),
        ("vqa", "What?", '{"variant": "open"}', {"question": "What?", "variant": "open"}),
    ],
)
def test_task_options(task, text, options_json, expected):
    assert webapp.task_options(task, text, options_json, (200, 100)) == expected


@pytest.mark.parametrize(
    "task, text, options_json, message",
    [
        ("detection", "", "{not json", "JSON object"),
        ("detection", "", "[1, 2]", "JSON object"),
        ("detection", "", '{"colour": "red"}', "unknown option 'colour'"),
        ("pose", "1,2,3", "", "x1,y1,x2,y2"),
        ("nonexistent", "", "", "Unknown task"),
    ],
)
def test_task_options_errors(task, text, options_json, message):
    with pytest.raises((ValueError, KeyError), match=message):
        webapp.task_options(task, text, options_json, (200, 100))


def test_every_task_has_a_prompt_preview(tmp_path, image_path):
    demo = backend(ScriptedModel(), tmp_path)
    for task in list_tasks():
        label, example = demo.input_label(task.name)
        prompt, status = demo.prompt(task.name, example, "", image_path)
        assert status == "" and prompt, (task.name, status)
    prompt, _ = demo.prompt("reg", "", "", image_path)  # the whole 168x302 image, padded square
    assert prompt.endswith("[0.22,0.00,0.78,1.00]")
    prompt, status = demo.prompt("detection", "", "{bad", image_path)
    assert prompt == "" and status.startswith("**Error:**")


def test_the_page_asks_in_the_model_s_trained_wording(tmp_path, image_path):
    model = ScriptedModel("<p>title</p> [0.10,0.10,0.90,0.20]")
    model.task_options = {"layout": {"variant": "classes"}}
    demo = backend(model, tmp_path)
    prompt, _ = demo.prompt("layout", "", "", image_path)
    assert prompt.startswith("Detect all layout regions (")
    prompt, _ = demo.prompt("layout", "", '{"variant": "default"}', image_path)
    assert prompt == "Detect the layout of the document in the image."
    *_, last = demo.respond(image_path, "layout", "", "", "", [])
    assert "Detect all layout regions (" in model.prompts[0][0]
    assert "Error" not in last.status and last.result is not None


# -- a chat turn -----------------------------------------------------------------------------------
def test_respond_streams_parses_draws_and_writes_json(tmp_path, scene, image_path):
    qa = answer_for(scene, "detection")
    model = ScriptedModel(qa.answer)
    demo = backend(model, tmp_path)
    turns = list(demo.respond(image_path, "detection", "", "", qa.question, [], 64))

    streamed = [t.messages[-1]["content"] for t in turns[:-1]]
    assert len(streamed) > 3 and streamed[-1] == qa.answer  # token by token
    assert all(t.annotated is None and t.status == "Generating…" for t in turns[:-1])
    final = turns[-1]
    assert final.status.startswith("Done") and "1 object" in final.status
    assert final.history == [[qa.question, qa.answer]]
    assert [m["role"] for m in final.messages] == ["user", "assistant"]
    # the result: one triangle box, drawn on the image, in the JSON and its file
    record = final.result["result"]
    assert record["type"] == "detections" and record["class_name"] == ["triangle"]
    assert record["raw_text"] == qa.answer
    x1, y1, x2, y2 = (int(round(v)) for v in record["boxes"][0])
    assert abs(x1 - scene.objects[0].xyxy[0]) <= 2 and abs(y2 - scene.objects[0].xyxy[3]) <= 2
    drawn = np.array(final.annotated).astype(int)
    changed = np.abs(drawn - np.array(scene.image)).sum(axis=2) > 0
    assert changed[y1:y2, x1 - 1:x1 + 2].any() and not changed[y2 + 30:, :].any()
    assert json.loads(Path(final.json_path).read_text()) == final.result
    assert Path(final.json_path).parent == tmp_path / "out"
    prompt, size, budget = model.prompts[0]
    assert prompt.endswith(f"### Human: {qa.question}\n### Assistant:")
    assert size == scene.size and budget == 64


def test_second_turn_carries_the_conversation(tmp_path, scene, image_path):
    first, second = answer_for(scene, "detection"), answer_for(scene, "vqa")
    model = ScriptedModel(first.answer, second.answer)
    demo = backend(model, tmp_path)
    turn1 = list(demo.respond(image_path, "detection", "", "", first.question, []))[-1]
    question = second.options["question"]
    turn2 = list(demo.respond(image_path, "vqa", question, "", second.question, turn1.history,
                              continue_chat=True))[-1]
    assert turn2.result["result"] == {"type": "text", "text": second.answer}
    assert len(turn2.messages) == 4 and turn2.messages[-1]["content"] == second.answer
    assert f"### Assistant: {first.answer}\n### Human: {second.question}" in model.prompts[1][0]


def test_each_question_stands_alone_unless_the_chat_continues(tmp_path, scene, image_path):
    first, second = answer_for(scene, "detection"), answer_for(scene, "caption")
    model = ScriptedModel(first.answer, second.answer)
    demo = backend(model, tmp_path)
    turn1 = list(demo.respond(image_path, "detection", "", "", first.question, []))[-1]
    turn2 = list(demo.respond(image_path, "caption", "", "", "", turn1.history))[-1]
    question = get_task("caption").prompt()  # an empty prompt asks the task's own
    assert model.prompts[1][0] == build_prompt([[question, None]])  # no earlier turn in it
    assert turn2.history == [[question, second.answer]]
    assert [m["content"] for m in turn2.messages] == [question, second.answer]


def test_pose_without_a_box_asks_for_the_people_first(tmp_path):
    "Detection finds two people (and a dog); pose then asks one question per person box."
    image = Image.new("RGB", (200, 100), "white")
    path = tmp_path / "people.png"
    image.save(path)
    people = ("<p>person</p> [0.10,0.30,0.30,0.70] <p>dog</p> [0.40,0.40,0.50,0.60] "
              "<p>person</p> [0.60,0.30,0.80,0.70]")
    pose = "<p>nose</p> [0.20,0.35] <p>left eye</p> [0.21,0.34]"
    model = ScriptedModel(people, pose, pose.replace("0.2", "0.7"))
    demo = backend(model, tmp_path)
    final = list(demo.respond(str(path), "pose", "", "", "", []))[-1]
    assert final.status.startswith("Done") and "2 object" in final.status, final.status
    pose_task = get_task("pose")
    asked = [q for q, _ in final.history]
    assert asked[0] == get_task("detection").prompt(classes=["person"])
    boxes = [(20.0, 10.0, 60.0, 90.0), (120.0, 10.0, 160.0, 90.0)]  # 200x200 padded square
    assert asked[1:] == [pose_task.prompt(box=b, image_size=(200, 100)) for b in boxes]
    record = final.result["result"]
    assert record["type"] == "keypoints" and [p["box"] for p in record["people"]] == \
        [list(b) for b in boxes]
    assert final.result["options"] == {"boxes": [list(b) for b in boxes]}
    assert final.result["prompt"] == asked[1:] and len(final.result["answer"]) == 2
    # a typed box, or a prompt of one's own, asks pose alone
    model = ScriptedModel(pose)
    list(backend(model, tmp_path).respond(str(path), "pose", "20,10,60,90", "", "", []))
    assert len(model.prompts) == 1


def test_max_gen_len_is_capped_by_the_server(tmp_path, image_path):
    model = ScriptedModel("A caption.")
    list(backend(model, tmp_path, max_gen_len=32).respond(
        image_path, "caption", "", "", "Caption?", [], 10_000))
    assert model.prompts[0][2] == 32


def test_concurrent_users_share_one_model_one_at_a_time(tmp_path, image_path):
    import threading

    class SlowModel(ScriptedModel):
        active = peak = 0

        def stream(self, *args, **kw):
            SlowModel.active += 1
            SlowModel.peak = max(SlowModel.peak, SlowModel.active)
            time.sleep(0.05)
            yield from super().stream(*args, **kw)
            SlowModel.active -= 1

    demo = backend(SlowModel(*["An answer."] * 4), tmp_path)
    finals = []

    def user():
        finals.append(list(demo.respond(image_path, "caption", "", "", "Caption?", []))[-1])

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SlowModel.peak == 1
    assert [f.status[:4] for f in finals] == ["Done"] * 4, [f.status for f in finals]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no image", "upload an image first"),
        ("too many pixels", "at most 1,000"),
        ("not an image", "cannot read the image"),
        ("bad options", "JSON object"),
        ("model fails", "out of memory"),
    ],
)
def test_respond_errors_are_shown_not_raised(tmp_path, image_path, case, message):
    model = ScriptedModel(RuntimeError("CUDA out of memory") if case == "model fails" else "x")
    demo = backend(model, tmp_path, max_pixels=1_000 if case == "too many pixels" else 10**8)
    path, prompt, options = image_path, "Describe.", ""
    if case == "no image":
        path = None
    elif case == "not an image":
        path = tmp_path / "fake.png"
        path.write_text("not a png")
    elif case == "bad options":
        options = "{"
    history = [["earlier question", "earlier answer"]]
    turns = list(demo.respond(path, "caption", "", options, prompt, history))
    assert len(turns) == 1
    assert turns[0].status.startswith("**Error:**") and message in turns[0].status
    assert turns[0].history == history and len(turns[0].messages) == 2  # nothing half-added


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 2x this when opening
    with pytest.raises(webapp.ImageTooLarge, match="too large"):
        webapp.open_image(path)


# -- drawing and JSON ------------------------------------------------------------------------------
def parsed(scene, task, **options):
    qa = answer_for(scene, task, **options)
    opts = {k: v for k, v in qa.options.items() if k != "image_size"}
    return get_task(task).parse(qa.answer, scene.size, **opts)


def pixels_changed(image, drawn) -> int:
    return int((np.abs(np.array(drawn, int) - np.array(image, int)).sum(axis=2) > 0).sum())


@pytest.mark.parametrize(
    "kind, task, options, result_type",
    [
        ("shapes", "detection", {}, "detections"),
        ("shapes", "grounded_caption", {}, "grounded_caption"),
        ("pose", "pose", {}, "keypoints"),
        ("words", "ocr", {}, "detections"),
        ("document", "layout", {}, "detections"),
        ("shapes", "caption", {}, "text"),
    ],
)
def test_draw_and_json_for_every_result_type(kind, task, options, result_type):
    scene = generate_scene(kind, seed=3)
    result = parsed(scene, task, **options)
    drawn = webapp.draw_result(scene.image, result)
    assert drawn.size == scene.size and drawn is not scene.image
    assert (pixels_changed(scene.image, drawn) > 0) == (result_type != "text")
    data = webapp.result_json(result)
    assert data["type"] == result_type
    json.dumps(data)  # plain JSON types only
    if result_type == "keypoints":
        assert len(data["names"]) == 17 and len(data["people"][0]["keypoints"]) == 17 * 3
    if task == "ocr":
        assert set(data["text"]) == {w for w, _ in scene.words}
    if result_type in ("detections", "grounded_caption"):  # labeling's record, every field kept
        fields = data if result_type == "detections" else data["detections"]
        assert {"boxes", "scores", "class_name", "parse_notes", "raw_text"} <= set(fields)
        assert {k: v for k, v in data.items() if k != "entities"} == \
            {**to_record(result, ALL_FIELDS)}


def test_scene_graph_draws_relation_lines():
    scene = generate_scene("shapes", seed=5)
    boxes = sv.Detections(xyxy=np.array([[10, 10, 40, 40], [100, 100, 140, 140]], float),
                          data={"class_name": np.array(["circle", "square"])})
    graph = SceneGraph(boxes, [(0, "left of", 1)])
    boxes_only = webapp.draw_result(scene.image, boxes)
    with_lines = webapp.draw_result(scene.image, graph)
    assert pixels_changed(boxes_only, with_lines) > 20  # the arrow between the centres
    data = webapp.result_json(graph)
    assert data["named_triples"] == [["circle", "left of", "square"]]


def test_grounded_caption_json():
    caption = GroundedCaption("a red circle", [("red circle", (2, 12), [[1, 2, 3, 4]])])
    data = webapp.result_json(caption)
    assert data["caption"] == "a red circle"
    assert data["entities"] == [{"phrase": "red circle", "span": [2, 12]}]
    assert data["detections"]["boxes"] == [[1.0, 2.0, 3.0, 4.0]]
    assert data["detections"]["class_name"] == ["red circle"]
    assert data["detections"]["entity_index"] == [0]


def test_masks_are_drawn_and_exported_as_rle():
    from pycocotools import mask as mask_utils

    image = Image.new("RGB", (64, 48), "white")
    mask = np.zeros((1, 48, 64), bool)
    mask[0, 10:20, 5:25] = True
    masks = sv.Detections(xyxy=np.array([[5, 10, 25, 20]], float), mask=mask)
    drawn = np.array(webapp.draw_result(image, "text answer", masks))
    assert (drawn[10:20, 5:25] != 255).any(axis=2).all() and (drawn[30:] == 255).all()
    data = webapp.result_json("text answer", masks)
    (rle,) = data["masks"]["masks"]
    assert data["masks"]["boxes"] == [[5.0, 10.0, 25.0, 20.0]]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert (decoded.astype(bool) == mask[0]).all()


def test_sam_masks_for_the_boxes(tmp_path, scene, image_path):
    "With a SAM predictor loaded, each parsed box gets a mask (tiny random SAM, real API)."
    pytest.importorskip("segment_anything")
    qa = answer_for(scene, "detection")
    demo = backend(ScriptedModel(qa.answer), tmp_path, sam_predictor=tiny_sam_predictor())
    final = list(demo.respond(image_path, "detection", "", "", qa.question, []))[-1]
    assert final.status.startswith("Done") and "1 mask" in final.status
    masks = final.result["result"]["masks"]
    assert [m["size"] for m in masks["masks"]] == [[scene.size[1], scene.size[0]]]
    assert masks["source_index"] == [0]


def tiny_sam_predictor():
    from segment_anything import SamPredictor
    from tiny_sam import tiny_sam

    return SamPredictor(tiny_sam())


# -- model loading ---------------------------------------------------------------------------------
def test_load_model_prefers_the_demo_model_then_falls_back_to_tiny(shared_tiny_ckpt, monkeypatch,
                                                                    tmp_path):
    from sphinx_tools import checkpoint, demo

    monkeypatch.setattr(webapp, "tiny_checkpoint", lambda cache_dir=None: shared_tiny_ckpt)
    if (demo.DEMO_DIR / "tokenizer.model").is_file():
        model, note = webapp.load_model(None)
        assert note == "Model: the embedded demo model."
        assert model.load_stats["path"] == str(demo.DEMO_DIR)
    monkeypatch.setattr(checkpoint, "DEMO_DIR", tmp_path / "not-installed")
    model, note = webapp.load_model(None)
    assert note == webapp.TINY_NOTE and "random-weight" in note
    assert model.load_stats["path"] == str(shared_tiny_ckpt)
    model, note = webapp.load_model(shared_tiny_ckpt)
    assert str(shared_tiny_ckpt) in note


def test_tiny_checkpoint_is_reused(shared_tiny_ckpt):
    assert webapp.tiny_checkpoint(shared_tiny_ckpt.parent) == shared_tiny_ckpt


def test_serve_is_a_registered_command():
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--share" in result.output and "[default: 127.0.0.1]" in result.output


def test_page_builds(tmp_path):
    pytest.importorskip("gradio")
    app = webapp.build_app(backend(ScriptedModel(), tmp_path))
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"input-image", "task", "prompt", "continue-chat", "run", "chat", "annotated",
            "result-json", "result-file", "status"} <= ids


# -- the real page in a real browser ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_or_skip():
    problem = None
    if CHROMIUM is None:
        problem = "no chromium binary (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[dev]')"
    if problem is None:
        return
    if os.environ.get("SPHINX_TOOLS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required but {problem}")
    pytest.skip(problem)


@pytest.fixture
def server(shared_tiny_ckpt, tmp_path):
    "``sphinx-tools serve`` as a user starts it, on a free loopback port."
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sphinx_tools.cli", "serve", "--checkpoint", str(shared_tiny_ckpt),
         "--port", str(port), "--max-gen-len", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not answer in 180 s:\n{log.read()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_browser_upload_run_chat_and_download(server, tmp_path, scene):
    browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    picture = tmp_path / "upload.png"
    scene.image.save(picture)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, accept_downloads=True,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(server, wait_until="domcontentloaded")
            expect(page.locator("#model-note")).to_contain_text("tiny", ignore_case=True,
                                                                 timeout=60_000)
            # The options box lives in a closed accordion, whose content mounts when it opens:
            # open it now, so that filling it later cannot race the mount.
            page.get_by_text("More task options (JSON)").click()
            options = page.locator("#options textarea, #options input").first
            expect(options).to_be_editable()
            # 1. upload: the prompt of the default task (detection) appears, editable
            page.locator("#input-image input[type=file]").set_input_files(str(picture))
            prompt = page.locator("#prompt textarea")
            expect(prompt).to_have_value("Detect all objects shown in the image.")
            # 2. a class list changes the prompt
            page.locator("#task-input input, #task-input textarea").first.fill("circle, square")
            page.locator("#task-input input, #task-input textarea").first.press("Enter")
            expect(prompt).to_have_value("Detect all circles and squares shown in the image.")
            # 3. run: the chat streams, the drawn image, the status and the JSON appear
            page.locator("#run").click()
            expect(page.locator("#annotated img")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("Done")
            expect(page.locator("#result-json")).to_contain_text('"detection"')
            expect(page.locator("#chat")).to_contain_text("Detect all circles and squares")
            # 4. the JSON download holds the result
            link = page.locator("#result-file a").first
            expect(link).to_be_visible()
            with page.expect_download() as info:
                link.click()
            data = json.loads(Path(info.value.path()).read_text())
            assert data["task"] == "detection" and data["image_size"] == list(scene.size)
            assert data["result"]["type"] == "detections"
            # 5. an error shows in the page and the server keeps working
            options.fill("{broken")
            expect(options).to_have_value("{broken")
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("Error")
            options.fill("")
            # 6. a second turn: a free question in the edited prompt, same conversation
            page.locator("#continue-chat input").check()
            prompt.fill("What shapes do you see?")
            page.locator("#run").click()
            expect(page.locator("#chat")).to_contain_text("What shapes do you see?")
            expect(page.locator("#status")).to_contain_text("Done")
            expect(page.locator("#chat [data-testid='user']")).to_have_count(2)
        finally:
            context.close()


def test_the_named_api_answers_gradio_client(server, tmp_path, scene, monkeypatch):
    "The README's gradio_client example, against ``sphinx-tools serve``."
    from gradio_client import Client, handle_file

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    picture = tmp_path / "api.png"
    scene.image.save(picture)
    client = Client(server, verbose=False, download_files=str(tmp_path / "downloads"))
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {f"/{name}" for name in webapp.API}
    prompt, status = client.predict("detection", "circle", "", handle_file(str(picture)),
                                    api_name="/prompt")
    assert (prompt, status) == ("Detect all circles shown in the image.", "")
    chat, drawn, result, json_file, status = client.predict(
        image=handle_file(str(picture)), task="detection", api_name="/run")
    assert status.startswith("Done"), status
    assert result["task"] == "detection" and result["image_size"] == list(scene.size)
    assert result["prompt"] == "Detect all objects shown in the image."  # the task's own prompt
    assert result["result"]["type"] == "detections"
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert Image.open(drawn).size == scene.size
    assert json.loads(Path(json_file).read_text()) == result
