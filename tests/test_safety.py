"""No open ports, no code from files: listening sockets of one and several processes, planted
pickles in the files a run reads back, and ``weights_only=True`` on every ``torch.load``."""

import ast
import ipaddress
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.train import TrainConfig, train

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

LISTENING = r"""
import json, psutil
listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                    if c.status == psutil.CONN_LISTEN})
"""


def run_python(code: str, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


# -- ports -----------------------------------------------------------------------------------------
def test_loaded_models_that_generate_open_no_listening_socket(golden_dir):
    code = r"""
import sys, torch, torch.distributed as tdist
from sphinx_tools import SphinxModel, build_prompt
from sphinx_tools.dist import mp_world_size
prompt = build_prompt([["What is in the image?", None]])
for path in sys.argv[1:]:  # the embedded demo model, and a checkpoint folder
    m = SphinxModel.from_pretrained(path)
    m.generate([prompt], [torch.zeros(3, m.cfg.image_size, m.cfg.image_size)], max_gen_len=4)
world = [tdist.get_world_size(), mp_world_size()]
""" + LISTENING + "print(json.dumps({'world': world, 'listening': listening}))"
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    result = last_json(run_python(code, "demo", golden_dir, env=env))
    assert result["world"] == [1, 1]  # a process group and fairscale's groups exist
    assert result["listening"] == []


def test_the_one_process_world_computes_collectives_exactly():
    from sphinx_tools import dist

    dist.init_model_parallel()
    x = torch.arange(6.0).view(2, 3)
    parts = [torch.zeros(2, 3)]
    torch.distributed.all_gather(parts, x, group=dist.fs_init.get_model_parallel_group())
    assert torch.equal(parts[0], x)
    y = x.clone()
    torch.distributed.all_reduce(y, group=dist.fs_init.get_data_parallel_group())
    torch.distributed.broadcast(y, 0)
    torch.distributed.barrier()
    assert torch.equal(y, x)


WORLD = r"""
import os, sys, torch, torch.distributed as tdist
from sphinx_tools import dist
mode, rank, world, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "local":
    dist.init_local_world(rank, world, where)
else:  # by hand, torchrun-style variables without torchrun
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=where)
    dist.maybe_init_dist("gloo")
dist.init_model_parallel(world)
t = torch.tensor([rank + 1.0])
tdist.all_reduce(t, group=dist.fs_init.get_model_parallel_group())
""" + LISTENING + r"""
print(json.dumps({"sum": t.item(), "listening": listening}))
tdist.barrier()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["local", "env"])
def test_a_multi_process_world_listens_on_loopback_only(mode, tmp_path):
    where = tmp_path / "store" if mode == "local" else free_port()
    env = {k: v for k, v in ENV.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    procs = [run_python(WORLD, mode, r, 2, where, env=env) for r in range(2)]
    results = [last_json(p) for p in procs]
    assert [r["sum"] for r in results] == [3.0, 3.0]  # a real 2-process all-reduce
    for r in results:
        assert r["listening"]  # gloo's own connections
        for ip, port in r["listening"]:
            assert ipaddress.ip_address(ip).is_loopback, (ip, port)  # never 0.0.0.0 or ::
        if mode == "local":  # the ranks meet in a file: no store port at all
            assert all(port != where for _, port in r["listening"])


# -- planted pickles -------------------------------------------------------------------------------
class WritesMarker:
    "Unpickling this runs code: it creates the marker file."

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_run(tmp_path: Path) -> TrainConfig:
    last = tmp_path / "run" / "last"
    last.mkdir(parents=True)
    return TrainConfig(init={"preset": "tiny"}, data=[], out=str(tmp_path / "run"), device="cpu")


@pytest.mark.parametrize("planted", ["object", "pickle"])
def test_a_planted_train_state_is_refused_and_runs_no_code(tmp_path, planted):
    cfg = planted_run(tmp_path)
    marker = tmp_path / "ran"
    state = {"step": 1, "optimizer": WritesMarker(marker)}
    f = Path(cfg.out) / "last" / "train_state.pt"
    if planted == "object":
        torch.save(state, f)
    else:
        f.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(SphinxToolsError, match="train_state.pt holds something other than tensors"):
        train(cfg, progress=False)
    assert not marker.exists()


def test_a_train_state_that_is_not_one_is_named(tmp_path):
    cfg = planted_run(tmp_path)
    f = Path(cfg.out) / "last" / "train_state.pt"
    torch.save({"step": 3}, f)
    with pytest.raises(SphinxToolsError, match="train_state.pt is not a training state: it lacks "
                                               "optimizer, epoch"):
        train(cfg, progress=False)
    from sphinx_tools.train import load_train_state

    f.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SphinxToolsError, match="cannot read the training state .*train_state.pt"):
        load_train_state(f)


def test_plain_state_keeps_what_resume_needs_in_a_weights_only_form(tmp_path):
    import random

    import numpy as np

    from sphinx_tools.train import plain_state

    state = {"py_rng": random.getstate(), "np_rng": np.random.default_rng(3).bit_generator.state,
             "array": np.arange(3), "scalar": np.float32(0.5), "path": tmp_path,
             "betas": (0.9, 0.95), "nested": [{"a": torch.ones(2)}, None, True]}
    plain = plain_state(state)
    torch.save(plain, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back["py_rng"] == random.getstate()
    random.setstate(back["py_rng"])  # a tuple again: random takes it back as is
    assert back["np_rng"] == np.random.default_rng(3).bit_generator.state
    assert torch.equal(back["array"], torch.arange(3)) and back["scalar"] == 0.5
    assert back["path"] == str(tmp_path) and back["betas"] == (0.9, 0.95)
    assert torch.equal(back["nested"][0]["a"], torch.ones(2)) and back["nested"][1:] == [None, True]
    with pytest.raises(SphinxToolsError, match=r"train state\['x'\] is of type object"):
        plain_state({"x": object()}, "train state")


# -- every torch.load ------------------------------------------------------------------------------
def torch_load_calls():
    "(file, line, keywords) of every ``torch.load(...)`` call in the repository's Python code."
    calls = []
    for folder in ("sphinx_tools", "plugins", "pipelines", "benchmarks", "tests", "examples"):
        for f in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(f.read_text(), str(f))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch"):
                    kw = {k.arg: k.value for k in node.keywords}
                    calls.append((f.relative_to(REPO), node.lineno, kw))
    return calls


def test_every_torch_load_reads_weights_only():
    calls = torch_load_calls()
    assert len(calls) > 5
    unsafe = [f"{f}:{line}" for f, line, kw in calls
              if not (isinstance(kw.get("weights_only"), ast.Constant)
                      and kw["weights_only"].value is True)]
    assert unsafe == []


def test_torch_with_weights_only_loading_by_default_is_required():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r.specifier for r in map(Requirement, deps)}
    for name, old, new in (("torch", "2.5.1", "2.6.0"), ("torchvision", "0.20.1", "0.21.0")):
        assert not reqs[name].contains(Version(old)) and reqs[name].contains(Version(new)), name
