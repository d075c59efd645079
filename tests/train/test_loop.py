"The finetuning loop: training, checkpoints in the released format, resume, devices and processes."

import json
from pathlib import Path

import pytest
import torch

from sphinx_tools import SphinxModel
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.train import TrainConfig, train, train_device, train_local

from .conftest import write_config


def test_train_saves_loadable_checkpoint_and_resumes_identically(synth_data):
    straight = train(TrainConfig.load(write_config(synth_data, "straight")), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "resumed"))
    cfg.steps = 2
    train(cfg, progress=False)
    state = torch.load(Path(cfg.out) / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train(TrainConfig.load(write_config(synth_data, "resumed")), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    log = [json.loads(x) for x in (Path(cfg.out).parent / "resumed_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resuming_with_loader_workers_matches_a_straight_run(synth_data):
    straight = train(TrainConfig.load(write_config(synth_data, "straight0")), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "workers", loader_workers=2))
    cfg.steps = 2
    train(cfg, progress=False)
    resumed = train(TrainConfig.load(write_config(synth_data, "workers", loader_workers=2)), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_training_lowers_the_loss_on_its_data(synth_data):
    out = train(TrainConfig.load(write_config(synth_data, "fit", steps=25, lr=3e-3, warmup=2,
                                              save_every=100)), progress=False)
    log = [json.loads(x) for x in (out.parent.parent / "fit_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.7 * first


def test_only_chosen_parts_change(synth_data):
    out = train(TrainConfig.load(write_config(synth_data, "proj", train=["proj"], steps=2)), progress=False)
    before = SphinxModel.from_config("tiny", device="cpu", seed=0)
    after = SphinxModel.from_pretrained(out)
    for k, v in after.state_dict().items():
        same = torch.equal(v, before.state_dict()[k])
        assert same != k.startswith(("qformer_proj.", "visual_proj.")), k


def test_training_on_independent_turns(synth_data):
    data = [{"path": "data/conversations.json", "root": "data", "independent_turns": True}]
    out = train(TrainConfig.load(write_config(synth_data, "indep", data=data, steps=12, warmup=2,
                                              save_every=100)), progress=False)
    log = [json.loads(x) for x in (out.parent.parent / "indep_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN from the block mask or padding
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])


def test_data_parallel_matches_gradient_accumulation(synth_data):
    # 2 ranks of batch 1 average their gradients: the same gradient as 1 process accumulating 2
    # micro-batches of 1 over the same examples (rank r takes every 2nd example from r). Adam's
    # state after one step holds that gradient (its weight update is ~lr * sign, too coarse to
    # compare), so the test compares the saved optimizer moments. Text only: the Q-Former's
    # dropout draws differ between ranks and a single process.
    convs = json.loads((synth_data / "data" / "conversations.json").read_text())
    (synth_data / "text.json").write_text(json.dumps([{"conversations": c["conversations"]} for c in convs]))
    data = [{"path": "text.json"}]
    cfg = TrainConfig.load(write_config(synth_data, "dp", data=data, steps=1, batch_size=1))
    cfg.num_threads = 1
    dp = train_local(cfg, procs=2, progress=False)
    acc = train(TrainConfig.load(write_config(synth_data, "accum", data=data, steps=1, batch_size=1,
                                              grad_accum=2)), progress=False)
    solo = train(TrainConfig.load(write_config(synth_data, "solo", data=data, steps=1, batch_size=1)),
                 progress=False)
    a, b, c = (torch.load(ck / "train_state.pt", weights_only=True)["optimizer"]["state"]
               for ck in (dp, acc, solo))
    assert a.keys() == b.keys() and len(a) > 20  # the unused encoders have no state in either
    for i in a:
        torch.testing.assert_close(a[i]["exp_avg"], b[i]["exp_avg"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    # one rank's gradient alone is not that (the ranks saw different examples)
    assert c.keys() == a.keys()
    assert not all(torch.allclose(c[i]["exp_avg"], a[i]["exp_avg"], rtol=1e-2) for i in a)
    torch.testing.assert_close(SphinxModel.from_pretrained(dp).state_dict()["output.weight"],
                               SphinxModel.from_pretrained(acc).state_dict()["output.weight"],
                               rtol=0, atol=2 * 3e-3)  # one Adam step of lr 3e-3 apart at most
    log = [json.loads(x) for x in (synth_data / "dp_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dp"]) for r in log] == [(1, 2)]


def test_train_local_rejects_bad_procs(synth_data):
    with pytest.raises(SphinxToolsError, match="procs must be >= 1, got 0"):
        train_local(TrainConfig.load(write_config(synth_data, "bad")), procs=0)


def test_cli_trains_with_local_processes(synth_data):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    cfg = write_config(synth_data, "cli", steps=3, batch_size=1, save_every=100)
    res = CliRunner().invoke(main, ["train", str(cfg), "--steps", "2", "--procs", "2", "--threads", "1",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"checkpoint: {synth_data / 'cli' / 'last'}" in res.output
    log = [json.loads(x) for x in (synth_data / "cli_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dp"]) for r in log] == [(1, 2), (2, 2)]
    assert SphinxModel.from_pretrained(synth_data / "cli" / "last").transformer.cfg.dim > 0


def test_training_device(monkeypatch, synth_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_device("auto") == train_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "xla", "cuda:x", ""):
        with pytest.raises(SphinxToolsError, match=f"unknown training device {bad!r}"):
            train_device(bad)
    with pytest.raises(SphinxToolsError, match="'cuda' asked for, but CUDA is not available"):
        train_device("cuda")
    with pytest.raises(SphinxToolsError, match="unknown training device 'gpu'"):  # before any work
        train_local(TrainConfig.load(write_config(synth_data, "devbad", device="gpu")), procs=2)

    # with GPUs: auto and cuda are this process's LOCAL_RANK one (as torchrun sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train_device("auto") == train_device("cuda") == torch.device("cuda", 1)
    assert train_device("cuda:0") == torch.device("cuda", 0)
    assert train_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SphinxToolsError, match=r"cuda:2 \(LOCAL_RANK 2\) does not exist: 2 GPU"):
        train_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = TrainConfig.load(write_config(synth_data, "devs"))
    with pytest.raises(SphinxToolsError, match="3 processes but 2 GPU"):
        train_local(cfg, procs=3)
    cfg.device = "cuda:1"
    with pytest.raises(SphinxToolsError, match="'cuda:1' names one GPU; 2 processes"):
        train_local(cfg, procs=2)


def test_training_with_token_position_resumes_identically(synth_data):
    tp = {"coco": "data/coco.json", "images": "data/images", "layer": 0, "weight": 5.0}
    straight = train(TrainConfig.load(write_config(synth_data, "tp_straight", token_position=tp)),
                     progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "tp_resumed", token_position=tp))
    cfg.steps = 2
    train(cfg, progress=False)
    resumed = train(TrainConfig.load(write_config(synth_data, "tp_resumed", token_position=tp)), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    assert a.keys() == SphinxModel.from_config("tiny", device="cpu").state_dict().keys()
    for k in a:  # the head is not part of the checkpoint, and its state resumes with the rest
        torch.testing.assert_close(a[k], b[k], msg=k)
    log = [json.loads(x) for x in (Path(cfg.out).parent / "tp_resumed_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["position_loss"] > 0 for r in log)


def _coordinate_tokenizer(synth_data):
    "coord.model in synth_data: a tokenizer whose coordinates ('0.41') are one piece each."
    from sphinx_tools.tiny import train_tokenizer
    from sphinx_tools.train import conversation_text

    convs = json.loads((synth_data / "data" / "conversations.json").read_text())
    if not (synth_data / "coord.model").is_file():
        train_tokenizer(synth_data / "coord.model", 512, coordinate_tokens=True,
                        corpus=[conversation_text(c["conversations"])[0] for c in convs])


def test_training_with_object_pointer_resumes_identically(synth_data):
    _coordinate_tokenizer(synth_data)
    kw = dict(init={"preset": "tiny", "tokenizer": "coord.model", "seed": 0},
              data=[{"path": "data/conversations.json", "root": "data", "independent_turns": True}],
              token_position={"coco": "data/coco.json", "images": "data/images", "layer": 0},
              object_pointer={"layer": 1})
    straight = train(TrainConfig.load(write_config(synth_data, "op_straight", **kw)), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "op_resumed", **kw))
    cfg.steps = 2
    train(cfg, progress=False)
    resumed = train(TrainConfig.load(write_config(synth_data, "op_resumed", **kw)), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    assert a.keys() == SphinxModel.from_config("tiny", device="cpu").state_dict().keys()
    for k in a:  # the heads are not part of the checkpoint; their state resumes with the rest
        torch.testing.assert_close(a[k], b[k], msg=k)
    log = [json.loads(x) for x in (Path(cfg.out).parent / "op_resumed_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["pointer_loss"] > 0 for r in log)


def test_training_with_object_attention_logs_both_hops(synth_data):
    _coordinate_tokenizer(synth_data)
    kw = dict(init={"preset": "tiny", "tokenizer": "coord.model", "seed": 0},
              data=[{"path": "data/conversations.json", "root": "data", "independent_turns": True}],
              token_position={"coco": "data/coco.json", "images": "data/images", "layer": 0},
              object_attention={"layer": 1, "question_layer": 0, "head": 1}, batch_size=4)
    cfg = TrainConfig.load(write_config(synth_data, "oa_run", **kw))
    out = train(cfg, progress=False)
    assert (out / "consolidated.00-of-01.model.pth").is_file()
    log = [json.loads(x) for x in (Path(cfg.out).parent / "oa_run_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["attention_loss"] > 0 for r in log)  # every batch has boxes over patches
    assert any(r["question_loss"] > 0 for r in log)  # the batches with a referring expression


def test_a_run_of_another_config_is_not_resumed(synth_data):
    cfg = TrainConfig.load(write_config(synth_data, "other_cfg"))
    cfg.steps = 2
    train(cfg, progress=False)
    tp = {"coco": "data/coco.json", "images": "data/images"}
    for change, named in [({"token_position": tp}, "token_position"), ({"lr": 1e-4}, "lr"),
                          ({"init": {"preset": "tiny", "tokenizer": "tok.model", "seed": 1}}, "init")]:
        with pytest.raises(SphinxToolsError, match=f"is a run of another config \\({named} differ"):
            train(TrainConfig.load(write_config(synth_data, "other_cfg", **change)), progress=False)
    # local processes: refused before any is started (the config is read from its JSON copy)
    with pytest.raises(SphinxToolsError, match="is a run of another config \\(lr differ"):
        train_local(TrainConfig.load(write_config(synth_data, "other_cfg", lr=1e-4)), procs=2)
    # the steps, threads and logging may change: the run goes on
    more = TrainConfig.load(write_config(synth_data, "other_cfg", log_every=2))
    assert (train(more, progress=False) / "consolidated.00-of-01.model.pth").is_file()


def test_a_crash_between_the_checkpoint_renames_is_put_back_before_resuming(synth_data):
    import os

    cfg = TrainConfig.load(write_config(synth_data, "mid_swap"))
    cfg.steps = 2
    last = train(cfg, progress=False)
    os.replace(last, last.with_name("last.old"))  # what save leaves between its two renames
    with pytest.raises(SphinxToolsError, match="is a run of another config \\(lr differ"):
        train_local(TrainConfig.load(write_config(synth_data, "mid_swap", lr=1e-4)), procs=2)
    assert last.is_dir() and not last.with_name("last.old").exists()
    os.replace(last, last.with_name("last.old"))
    train(TrainConfig.load(write_config(synth_data, "mid_swap")), progress=False)  # resumes: 2 more
    log = [json.loads(x) for x in (Path(cfg.out).parent / "mid_swap_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
