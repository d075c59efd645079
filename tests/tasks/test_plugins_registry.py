"""The plugin system: built-ins through the plugin manager, entry points, env allowlist, CLI."""

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import supervision as sv
import tomllib
from click.testing import CliRunner

from sphinx_tools import registry
from sphinx_tools.errors import SphinxToolsError, UnknownTaskError
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.registry import get_task, list_tasks, load_plugins, pm, tasks_command
from sphinx_tools.tasks import DetectionsTask, Task

REPO = Path(__file__).resolve().parents[2]
BUILTIN_TASKS = {
    "rec",
    "reg",
    "grounded_caption",
    "detection",
    "pose",
    "ocr",
    "relation",
    "layout",
    "caption",
    "vqa",
}


def test_builtin_tasks_are_registered():
    assert {t.name for t in list_tasks()} == BUILTIN_TASKS
    assert [t.name for t in list_tasks()] == sorted(BUILTIN_TASKS)


def test_the_entry_points_are_the_one_plugin_list():
    "Every plugin pyproject declares is registered as a built-in, and nothing else is built in."
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    declared = {**groups[registry.ENTRY_POINT_GROUP], **groups[registry.COMMANDS_GROUP]}
    assert "autolabel" in declared and "rec" in declared
    assert not hasattr(registry, "DEFAULT_PLUGINS")
    load_plugins()
    for name in declared:
        assert pm.get_plugin(name) is not None, name
    builtins = {row["name"] for row in registry.list_plugins() if row["builtin"]}
    assert builtins == set(declared)


def test_no_hookimpl_without_spec():
    load_plugins()
    pm.check_pending()  # a typo in a hook name would fail here


def test_get_task_unknown_lists_known():
    with pytest.raises(UnknownTaskError) as err:
        get_task("segmentation")
    message = str(err.value)
    assert "segmentation" in message and "rec" in message and "vqa" in message
    assert isinstance(err.value, KeyError) and isinstance(err.value, SphinxToolsError)


@pytest.mark.parametrize(
    "name, output",
    [
        ("rec", sv.Detections),
        ("pose", sv.KeyPoints),
        ("caption", str),
    ],
)
def test_task_has_declared_output(name, output):
    task = get_task(name)
    assert task.output is output
    assert task.plugin is not None


class Echo(Task):
    name = "echo"
    output = str
    needs_image_size = False
    templates = {"default": "Say {word}."}

    def prompt_fields(self, opts):
        return {"word": "hello"}

    def parse_answer(self, answer, image_wh, opts):
        return answer.text.upper()

    def empty(self, answer, image_wh, opts, notes=()):
        return ""


class EchoPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(Echo())


def test_throwaway_plugin_adds_and_removes_a_task(register_plugin):
    register_plugin(EchoPlugin(), "undo-echo")
    task = get_task("echo")
    assert task.plugin == "undo-echo"
    assert task.prompt() == "Say hello."
    assert task.parse("hi###junk") == "HI"
    pm.unregister(name="undo-echo")
    with pytest.raises(UnknownTaskError):
        get_task("echo")


def test_plugin_registered_later_overrides_a_name_with_warning(register_plugin):
    class MyRec(DetectionsTask):
        name = "rec"

        def parse_answer(self, answer, image_wh, opts):
            return self.empty(answer, image_wh, opts, ["mine"])

    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register(MyRec)  # a class is instantiated

    register_plugin(Plugin(), "undo-myrec")
    with pytest.warns(UserWarning, match="replaces"):
        task = get_task("rec")
    assert isinstance(task, MyRec) and task.plugin == "undo-myrec"


def test_registering_a_non_task_is_an_error(register_plugin):
    class Bad:
        @hookimpl
        def register_tasks(self, register):
            register("not a task")

    register_plugin(Bad(), "undo-bad")
    with pytest.raises(TypeError, match="undo-bad"):
        list_tasks()


# -- third-party plugins through a (fake) installed distribution ----------------------------------
def _fake_distribution(root: Path, dist="sphinx-tools-hello", module="sphinx_tools_hello"):
    (root / f"{module}.py").write_text(
        textwrap.dedent("""
        from sphinx_tools.hookspecs import hookimpl
        from sphinx_tools.tasks import Task


        class Hello(Task):
            name = "hello"
            output = str
            needs_image_size = False
            templates = {"default": "Greet {who}."}

            def prompt_fields(self, opts):
                return {"who": "the image"}

            def parse_answer(self, answer, image_wh, opts):
                return answer.text

            def empty(self, answer, image_wh, opts, notes=()):
                return ""


        @hookimpl
        def register_tasks(register):
            register(Hello())
    """)
    )
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[sphinx_tools]\nhello = {module}\n")


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    if pm.get_plugin("hello") is not None:
        pm.unregister(name="hello")
    registry._plugin_info.pop("hello", None)
    sys.modules.pop("sphinx_tools_hello", None)


@pytest.mark.parametrize(
    "allow, loaded",
    [
        ("none", False),
        ("", False),
        ("sphinx-tools-hello", True),
        ("sphinx_tools_hello", True),  # names are normalized
        ("hello", True),  # the entry-point name works too
        ("some-other-plugin", False),
        (None, True),  # unset: every installed plugin
    ],
)
def test_third_party_entry_point_respects_env(fake_dist, monkeypatch, allow, loaded):
    if allow is None:
        monkeypatch.delenv("SPHINX_TOOLS_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("SPHINX_TOOLS_LOAD_PLUGINS", allow)
    load_plugins(reload=True)
    names = {t.name for t in list_tasks()}
    assert ("hello" in names) is loaded
    assert BUILTIN_TASKS <= names  # built-ins are always there
    if loaded:
        task = get_task("hello")
        assert task.plugin == "hello" and task.prompt() == "Greet the image."
        row = registry.task_info(task)
        assert row["version"] == "1.2.3" and row["output"] == "str"


def test_broken_third_party_plugin_warns_and_others_still_load(tmp_path, monkeypatch):
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sphinx_tools]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPHINX_TOOLS_LOAD_PLUGINS", "broken-plugin")
    with pytest.warns(RuntimeWarning, match="broken"):
        load_plugins(reload=True)
    assert BUILTIN_TASKS <= {t.name for t in list_tasks()}


def test_without_installed_entry_points_the_registry_says_how_to_install(monkeypatch):
    "An uninstalled checkout has no built-ins: a warning names the fix instead of a silent gap."
    import importlib.metadata as md

    real = md.entry_points
    monkeypatch.setattr(
        md, "entry_points", lambda **kw: [] if kw.get("group") == "sphinx_tools" else real(**kw)
    )
    with pytest.warns(RuntimeWarning, match=r"pip install -e \."):
        load_plugins(reload=True)


# -- the `sphinx-tools tasks` command --------------------------------------------------------------
def test_tasks_command_text():
    result = CliRunner().invoke(tasks_command, [])
    assert result.exit_code == 0, result.output
    assert "rec  (plugin rec" in result.output
    assert "supervision.KeyPoints" in result.output
    assert (
        "Please provide the bounding box coordinate of the region this sentence describes"
        in result.output
    )


def test_tasks_command_json():
    result = CliRunner().invoke(tasks_command, ["--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} == BUILTIN_TASKS
    row = next(r for r in rows if r["name"] == "relation")
    assert row["plugin"] == "relation" and row["output"] == "sphinx_tools.SceneGraph"
    assert set(row) >= {"name", "plugin", "version", "output", "prompt", "variants"}
    assert next(r for r in rows if r["name"] == "vqa")["plugin"] == "caption"


def test_list_plugins_reports_builtins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = registry.list_plugins()
    rec = next(r for r in rows if r["name"] == "rec")
    assert rec["builtin"] and rec["hooks"] == ["register_tasks"]
