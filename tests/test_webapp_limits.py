"""The web demo bounds every request: previews, options JSON, prompts, the conversation, sockets.

Prompt previews skip the model's queue, so each must cost little whatever the page sends; they
go through the tasks' own option and template checks. ``serve`` listens on its own host and port
and nowhere else.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

os.environ.setdefault("SPHINX_TOOLS_LOAD_PLUGINS", "none")  # built-in tasks only
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from sphinx_tools.pipelines import webapp  # noqa: E402
from sphinx_tools.tasks import MAX_PROMPT_CHARS  # noqa: E402


class RecordingModel:
    "Answers every prompt with one short answer; records the prompts it was asked."

    def __init__(self):
        self.prompts = []

    def stream(self, prompt, image, **kw):
        self.prompts.append(prompt)
        yield "A picture."


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (64, 48), "white").save(path)
    return str(path)


@pytest.fixture
def demo(tmp_path):
    return webapp.DemoBackend(RecordingModel(), note="test", out_dir=tmp_path / "out")


# -- previews --------------------------------------------------------------------------------------
def test_preview_refuses_a_format_spec_template_at_once(demo, image_path):
    "The 70-byte options box that asked for a 50-million-character prompt."
    start = time.process_time()
    prompt, status = demo.prompt("detection", "", '{"template": "{classes:>50000000}"}', image_path)
    assert time.process_time() - start < 0.5
    assert prompt == "" and status.startswith("**Error:**") and "format spec" in status


@pytest.mark.parametrize(
    "task_input, options_json, message",
    [
        ("x" * (webapp.MAX_INPUT_CHARS + 1), "", "the task input is"),
        ("", '{"x": "%s"}' % ("x" * webapp.MAX_OPTIONS_JSON_CHARS), "the options JSON is"),
        ("", '{"question": "%s"}' % ("q" * 9000), "option 'question' is 9,000 characters"),
        ("", '{"template": "{question!r}"}', "conversion"),
        ("", '{"classes": [%s]}' % ",".join(['"c"'] * 2000), "option 'classes' has 2,000"),
    ],
)
def test_preview_applies_the_limits(demo, image_path, task_input, options_json, message):
    task = "vqa" if "question" in options_json else "detection"
    prompt, status = demo.prompt(task, task_input, options_json, image_path)
    assert prompt == "" and message in status, status


@pytest.mark.parametrize("depth", [9, 20_000])  # over the limit; over Python's recursion limit
def test_deeply_nested_options_json_is_a_clear_error(demo, image_path, depth):
    options_json = '{"classes": ' + "[" * depth + "]" * depth + "}"
    assert len(options_json) <= webapp.MAX_OPTIONS_JSON_CHARS
    prompt, status = demo.prompt("detection", "", options_json, image_path)
    assert prompt == "" and "nested too deeply" in status, status


def test_options_json_within_the_limits_still_works(demo, image_path):
    classes = [f"object {i}" for i in range(300)]
    options_json = '{"classes": [%s], "max_objects": 20}' % ",".join(f'"{c}"' for c in classes)
    prompt, status = demo.prompt("detection", "", options_json, image_path)
    assert status == "" and prompt.startswith("Detect all object 0s, object 1s")
    assert webapp.json_depth({"boxes": [[1, 2, 3, 4]]}) == 3 and webapp.json_depth(7) == 0


# -- chat turns ------------------------------------------------------------------------------------
def test_a_prompt_over_the_limit_never_reaches_the_model(demo, image_path):
    turns = list(demo.respond(image_path, "caption", "", "", "x" * (MAX_PROMPT_CHARS + 1), []))
    assert len(turns) == 1 and "the prompt is" in turns[0].status
    assert demo.model.prompts == []


def test_a_conversation_over_the_limit_asks_for_a_new_chat(demo, image_path):
    long_answer = "y" * (webapp.MAX_CONVERSATION_CHARS // 2)
    history = [["an earlier question", long_answer], ["another one", long_answer]]
    turns = list(demo.respond(image_path, "caption", "", "", "And now?", history,
                              continue_chat=True))
    assert "start a new chat" in turns[-1].status and demo.model.prompts == []
    turns = list(demo.respond(image_path, "caption", "", "", "And now?", history[:1],
                              continue_chat=True))
    assert turns[-1].status.startswith("Done") and len(demo.model.prompts) == 1
    turns = list(demo.respond(image_path, "caption", "", "", "And now?", history))
    assert turns[-1].status.startswith("Done")  # a question on its own carries no conversation
    assert "y" * 100 not in demo.model.prompts[-1]


def test_the_page_limits_its_text_boxes(demo):
    pytest.importorskip("gradio")
    app = webapp.build_app(demo)
    limits = {getattr(b, "elem_id", None): getattr(b, "max_length", None)
              for b in app.blocks.values()}
    assert limits["task-input"] == webapp.MAX_INPUT_CHARS
    assert limits["options"] == webapp.MAX_OPTIONS_JSON_CHARS
    assert limits["prompt"] == MAX_PROMPT_CHARS


# -- sockets ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_listens_only_on_its_own_host_and_port(tmp_path_factory, tmp_path):
    "No other listening socket (e.g. a process-group store on every interface) in the server."
    pytest.importorskip("gradio")
    psutil = pytest.importorskip("psutil")
    checkpoint = webapp.tiny_checkpoint(tmp_path_factory.getbasetemp().parent)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = open(tmp_path / "server.log", "w+")

    def start():
        port = free_port()  # free now; another process may take it before the server binds
        return port, subprocess.Popen(
            [sys.executable, "-m", "sphinx_tools.cli", "serve", "--checkpoint", str(checkpoint),
             "--port", str(port), "--max-gen-len", "8"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )

    port, proc = start()
    retries = 3
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                text = log.read()
                if proc.poll() is not None and f"cannot serve on 127.0.0.1:{port}" in text and retries:
                    retries -= 1  # the port was taken between choosing it and binding it
                    port, proc = start()
                    continue
                pytest.fail(f"the server did not start:\n{text}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        server = psutil.Process(proc.pid)
        listening = set()
        for p in [server, *server.children(recursive=True)]:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                    listening.add((c.laddr.ip, c.laddr.port))
        assert listening == {("127.0.0.1", port)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
