"""The finetuning loop (``sphinx-tools train CONFIG``): :func:`train` and :func:`train_local`.

Optimizer AdamW with linear warmup + cosine decay, gradient clipping and accumulation, fp32 or bf16
autocast; which parts train is chosen per group (``config.PARTS``). It runs on each process's GPU
when there is one (``device: auto``; under torchrun the one of its ``LOCAL_RANK``, with NCCL) and
on the CPU otherwise (gloo). Checkpoints are saved in the released consolidated format (loadable
by ``from_pretrained``) with a ``train_state.pt`` beside them (tensors and plain values only, read
back with ``weights_only=True``) and its config as ``train_config.json``; a re-run resumes from
it, and refuses to resume a run of another config (another model, parts, losses or optimizer
settings; the steps, threads and logging may change). Under ``torchrun`` (or
``train_local`` / ``sphinx-tools train --procs N`` on one machine) each ``model_parallel``
processes form a model-parallel group of the runtime and the rest of the world is data parallel:
every rank takes its share of each batch and the gradients are averaged, so N ranks of
``batch_size`` B train as one process with ``batch_size`` B and ``grad_accum`` N.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from .. import dist
from ..errors import SphinxToolsError
from ..model import SphinxConfig, Transformer
from ..tokenizer import Tokenizer
from .config import PARTS, TrainConfig
from .data import IGNORE, ConversationData, batches
from .losses import (
    ObjectAttention,
    PointerHead,
    TokenPlaces,
    coordinate_values,
    coordinate_weights,
    loss_fn,
    position_head,
)
from .schedule import lr_at, sync_grads


def set_trainable(model: Transformer, parts: list[str]) -> int:
    "Let only the parameters of ``parts`` (keys of ``config.PARTS``) train; returns their count."
    prefixes = tuple(p for part in parts for p in PARTS[part])
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def train_device(spec: str = "auto") -> torch.device:
    """The device a training process runs on.

    ``auto`` is this process's GPU (the one of its ``LOCAL_RANK``, as torchrun sets it) when CUDA
    is available, else the CPU; ``cuda`` without an index also means the ``LOCAL_RANK`` one. A
    clear error names a device that is malformed or not there."""
    spec = str(spec)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SphinxToolsError(f"unknown training device {spec!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise SphinxToolsError(f"training device {spec!r} asked for, but CUDA is not available here")
    dev = torch.device("cuda", local if dev.index is None else dev.index)
    if dev.index >= torch.cuda.device_count():
        raise SphinxToolsError(
            f"training device {dev} (LOCAL_RANK {local}) does not exist: "
            f"{torch.cuda.device_count()} GPU(s) visible; start at most that many processes per machine")
    return dev


def init_model(cfg: TrainConfig, device="cpu") -> tuple[Transformer, Tokenizer]:
    "The model to train (fp32 weights on ``device``) and its tokenizer, from ``cfg.init``."
    from ..sphinx_model import SphinxModel

    init = cfg.init
    if "checkpoint" in init:
        m = SphinxModel.from_pretrained(init["checkpoint"], device=device)
        model, tok = m.transformer, m.tokenizer
    else:
        from ..tiny import init_coordinate_rows_, init_random_

        tok_path = Path(init["tokenizer"]) if "tokenizer" in init else None
        if tok_path is None or not tok_path.is_file():
            raise SphinxToolsError("init needs `checkpoint`, or `preset` with an existing `tokenizer`")
        tok = Tokenizer(tok_path)
        overrides = dict(init.get("overrides", {}))
        scfg = SphinxConfig.from_name(init.get("preset", "tiny"), vocab_size=tok.n_words, **overrides)
        dist.init_model_parallel()
        with torch.device("meta"):
            model = Transformer(scfg)
        model = model.to_empty(device="cpu")
        init_random_(model, int(init.get("seed", 0)))
        init_coordinate_rows_(model, tok)  # a no-op unless the tokenizer has coordinate tokens
        model = model.to(device)  # initialized on the CPU: the same weights on every device
    for p in model.parameters():
        p.data = p.data.float()
    return model, tok


def save(model: Transformer, tok: Tokenizer, out: Path, state: dict | None = None):
    """Write the consolidated checkpoint (each model-parallel rank its shard) and the train state.

    The folder is written beside ``out`` and swapped in, so a crash never leaves a half checkpoint.
    """
    import shutil

    from ..checkpoint import write_metadata

    if dist.dp_rank() != 0:
        return
    mp, rank = dist.mp_world_size(), dist.mp_rank()
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _mp_barrier()
    sd = {"llma." + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd}, tmp / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    if rank == 0:
        write_metadata(tmp, model.cfg, tok.path)
        if state is not None:
            save_train_state(state, tmp / TRAIN_STATE)
            if state.get("config") is not None:  # readable without the optimizer state
                (tmp / TRAIN_CONFIG).write_text(json.dumps(state["config"], indent=1))
    _mp_barrier()
    if rank == 0:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def _mp_barrier():
    if torch_dist.is_initialized() and dist.mp_world_size() > 1:
        torch_dist.barrier(group=dist.fs_init.get_model_parallel_group())


def _spawned(rank: int, world: int, store_file: str, cfg: TrainConfig, progress: bool):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = train_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_local_world(rank, world, store_file, "nccl" if device.type == "cuda" else "gloo")
    train(cfg, progress=progress)


def train_local(cfg: TrainConfig, procs: int = 1, progress: bool = True) -> Path:
    """Run :func:`train` in ``procs`` processes on this machine, as ``torchrun --nproc_per_node
    procs`` would: data parallel, or model parallel by ``cfg.model_parallel``. Process ``k`` trains
    on GPU ``k`` (NCCL) when the device is ``auto`` or ``cuda`` and CUDA is there, else on the CPU
    (gloo); on CPU give each process its share of the cores (``cfg.num_threads``). The processes
    meet in a file of a private temporary folder (:func:`dist.init_local_world`) and talk over
    the loopback interface only: no port is opened to the network."""
    if procs < 1:
        raise SphinxToolsError(f"procs must be >= 1, got {procs}")
    device = train_device(cfg.device)  # fail here, not in every child
    if procs > 1 and device.type == "cuda":
        if str(cfg.device) not in ("auto", "cuda"):
            raise SphinxToolsError(f"device {cfg.device!r} names one GPU; {procs} processes need "
                                   "device auto or cuda (process k on GPU k)")
        if procs > torch.cuda.device_count():
            raise SphinxToolsError(f"{procs} processes but {torch.cuda.device_count()} GPU(s): "
                                   "one process per GPU (or device: cpu)")
    if procs == 1:
        return train(cfg, progress=progress)
    last = _settled(Path(cfg.out) / "last")
    if (last / TRAIN_CONFIG).is_file():  # fail here, not in every child
        _check_same_run(cfg, json.loads((last / TRAIN_CONFIG).read_text()), last)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sphinx-train-") as tmp:
        store_file = str(Path(tmp) / "store")
        mp.spawn(_spawned, args=(procs, store_file, cfg, progress), nprocs=procs)
    return Path(cfg.out) / "last"


TRAIN_STATE = "train_state.pt"  # beside the checkpoint: what a re-run resumes from
TRAIN_CONFIG = "train_config.json"  # beside it: the config of the run, as JSON
_STATE_KEYS = ("optimizer", "step", "epoch", "pos", "py_rng", "torch_rng")


def plain_state(obj, where: str = "state"):
    """``obj`` in the form ``torch.load(weights_only=True)`` reads back: tensors, dicts, lists,
    tuples, str, int, float, bool and None. Paths become str, numpy arrays tensors and numpy
    scalars Python numbers; anything else is refused (``where`` names its place).

    Raises:
        SphinxToolsError: for a value of another type.
    """
    import numpy as np

    if obj is None or isinstance(obj, torch.Tensor):
        return obj
    for kind in (bool, int, float, str):  # subclasses (enums...) as their plain base type
        if isinstance(obj, kind):
            return str.__str__(obj) if kind is str else kind(obj)
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    raise SphinxToolsError(f"{where} is of type {type(obj).__name__}, which a weights-only "
                           "training state cannot hold")


def save_train_state(state: dict, path: Path):
    "Write a training state as tensors and plain values only (see :func:`plain_state`)."
    torch.save(plain_state(state, "train state"), path)


def load_train_state(path: Path) -> dict:
    """Read a training state written by :func:`save_train_state`, refusing anything but tensors
    and plain values: a planted file cannot run code.

    Raises:
        SphinxToolsError: naming the file, when it holds other objects, is unreadable, or is not a
            training state.
    """
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SphinxToolsError(
            f"{path} holds something other than tensors and plain values (refused by weights-only "
            f"loading; remove it to start the run over): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise SphinxToolsError(f"cannot read the training state {path} (corrupt or truncated?): "
                               f"{e}") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SphinxToolsError(f"{path} is not a training state: it lacks {', '.join(missing)}")
    return state


def _restore_py_rng(saved):
    version, internal, gauss = saved
    random.setstate((version, tuple(internal), gauss))




# -- the training job, step by step -----------------------------------------------------------


@dataclass
class _Run:
    "What one training process holds while it trains."

    cfg: TrainConfig
    device: torch.device
    model: Transformer
    tok: Tokenizer
    opt: torch.optim.Optimizer
    params: list  # the trainable parameters, the position head's included
    head: torch.nn.Module | None  # the token_position head, when that loss is on
    pointer: PointerHead | None  # the object_pointer head, when that loss is on
    values: torch.Tensor | None  # coordinate_values of the tokenizer, for object_pointer/attention
    n_train: int  # trainable parameters of the model
    log: object  # the job's jsonl log (data-parallel rank 0), else None


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) a finetuning job; returns the final checkpoint folder."""
    start = time.perf_counter()  # max_minutes counts the whole job, encoder warm-up included
    device = _setup_process(cfg)
    last = Path(cfg.out) / "last"
    state = _resume_state(last)
    if state is not None:
        _check_same_run(cfg, state.get("config") or {}, last)
    model, tok = _init_or_resume(cfg, device, state, last)
    cfg.check_model(len(model.layers), model.cfg.n_heads)  # before the warm-up, not after it
    if cfg.object_pointer or cfg.object_attention:
        _pointer_values(tok)  # a tokenizer without coordinate pieces fails before the warm-up too
    data = _conversation_data(cfg, model, tok)  # a bad file fails before the warm-up too
    log = _open_log(Path(cfg.out))
    try:
        if state is None and cfg.encoder_warmup:  # a fresh start; a resumed run has warm encoders
            from .warmup import warmup_encoders

            warmup_encoders(model, cfg.encoder_warmup, device, log, progress,
                            workers=cfg.loader_workers)
        torch.manual_seed(cfg.seed + dist.dp_rank())
        run = _prepare(cfg, device, model, tok, state, log)
        _train_steps(run, data, state, last, start, progress)
    finally:
        if log:
            log.close()
    return last


def _train_steps(run: _Run, data: ConversationData, state: dict | None, last: Path, start: float,
                 progress: bool):
    """The optimizer steps from where ``state`` stopped (or from 0) to ``cfg.steps``, logging and
    saving checkpoints on the way; ends early, saved, once ``max_minutes`` have passed since
    ``start``."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    step, epoch, pos = _restore(run, state)
    feed = batches(data, cfg.batch_size, epoch, pos, cfg.loader_workers, run.device.type == "cuda",
                   dist.dp_rank(), dist.dp_world_size())
    token_weight = coordinate_weights(run.tok, cfg.coordinate_weight, run.device)
    quiet = not progress or dist.mp_rank() + dist.dp_rank() > 0
    bar = tqdm(total=cfg.steps, initial=step, disable=quiet, desc="train", unit="step")
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        loss, aux, n_tokens, (epoch, pos) = _accumulate(run, feed, token_weight)
        tokens += n_tokens
        gnorm = _update(run, step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            tok_s = tokens / (time.perf_counter() - t0)
            _log_step(run, bar, dict(step=step, loss=loss, lr=lr_at(step - 1, cfg), grad_norm=gnorm,
                                     tok_s=tok_s, epoch=epoch), aux)
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            _checkpoint(run, last, step, epoch, pos)
        if out_of_time:
            if run.log:
                run.log.write(json.dumps({"step": step, "stopped": "max_minutes"}) + "\n")
            break
    bar.close()


def _setup_process(cfg: TrainConfig) -> torch.device:
    "This process's threads, device and process groups; returns the device."
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = train_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.maybe_init_dist("nccl" if device.type == "cuda" else "gloo")
    dist.init_model_parallel(cfg.model_parallel)
    return device


def _settled(last: Path) -> Path:
    "``last``, put back from ``last.old`` where a crash came between the two renames of :func:`save`."
    if not last.exists() and last.with_name("last.old").exists():
        os.replace(last.with_name("last.old"), last)
    return last


def _resume_state(last: Path) -> dict | None:
    "The training state saved beside the last checkpoint, or None for a fresh start."
    if (_settled(last) / TRAIN_STATE).is_file():
        return load_train_state(last / TRAIN_STATE)
    return None


# what a resumed run must share with the run it resumes (the model, what trains, the losses);
# the steps, the time guard, threads, workers, device and logging may change between runs
_RESUME_KEYS = ("train", "lr", "min_lr", "warmup", "weight_decay", "betas", "clip", "dtype",
                "batch_size", "grad_accum", "seed", "model_parallel", "coordinate_weight",
                "token_position", "object_pointer", "object_attention")


def _check_same_run(cfg: TrainConfig, saved: dict, last: Path):
    """Refuse to resume, in ``cfg.out``, a run made with another config: its optimizer state and
    weights belong to other parameters or another recipe."""
    now = asdict(cfg)
    keys = [k for k in _RESUME_KEYS if k in saved and _plain(saved[k]) != _plain(now[k])]
    init = {k: v for k, v in now["init"].items() if k not in ("checkpoint", "tokenizer")}
    old = {k: v for k, v in (saved.get("init") or {}).items() if k not in ("checkpoint", "tokenizer")}
    if "init" in saved and "checkpoint" not in saved["init"] and _plain(init) != _plain(old):
        keys.insert(0, "init")
    if keys:
        raise SphinxToolsError(f"{last} is a run of another config ({', '.join(keys)} differ); give "
                               f"this config a fresh `out` folder, or delete {last.parent} to start over")


def _plain(value):
    "Tuples as lists, so that a config read back from a checkpoint compares equal to its source."
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _init_or_resume(cfg: TrainConfig, device, state: dict | None, last: Path):
    "The model and tokenizer: from ``cfg.init``, or from the last checkpoint when resuming."
    if state is not None:
        cfg = TrainConfig(**{**asdict(cfg), "init": {"checkpoint": str(last)}})
    return init_model(cfg, device)


def _conversation_data(cfg: TrainConfig, model: Transformer, tok: Tokenizer) -> ConversationData:
    "The training data, with the token_position targets when that loss is on."
    places = None
    if cfg.token_position:
        tp, mc = cfg.token_position, model.cfg
        places = TokenPlaces(tp["coco"], tp["images"], mc.image_size, mc.n_views, mc.vision.grid)
    return ConversationData(cfg.data, tok, model.cfg.image_size, cfg.max_len, cfg.seed, places)


def _open_log(out: Path):
    "The job's ``OUT_log.jsonl`` (appended to), on data-parallel rank 0; None elsewhere."
    out.mkdir(parents=True, exist_ok=True)
    return open(out.parent / f"{out.name}_log.jsonl", "a") if dist.dp_rank() == 0 else None


def _prepare(cfg: TrainConfig, device, model: Transformer, tok: Tokenizer, state: dict | None,
             log) -> _Run:
    "Choose the trainable parameters and build the optimizer (and the position head)."
    n_train = set_trainable(model, cfg.train)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    head = None
    if cfg.token_position:
        head = position_head(model.cfg.dim, device)
        if state is not None and state.get("position_head") is not None:
            head.load_state_dict(state["position_head"])
        params += list(head.parameters())
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0})
    pointer = values = None
    if cfg.object_pointer or cfg.object_attention:
        values = _pointer_values(tok, device)
    if cfg.object_pointer:
        pointer = PointerHead(model.cfg.dim, cfg.object_pointer["width"]).to(device)
        if state is not None and state.get("pointer_head") is not None:
            pointer.load_state_dict(state["pointer_head"])
        params += list(pointer.parameters())
        groups.append({"params": list(pointer.parameters()), "weight_decay": 0.0})
    # fused: one kernel, not one per tensor
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    return _Run(cfg, device, model, tok, opt, params, head, pointer, values, n_train, log)


def _pointer_values(tok: Tokenizer, device=None) -> torch.Tensor:
    "coordinate_values of the tokenizer, which object_pointer and object_attention need."
    values = coordinate_values(tok, device)
    if values is None:
        raise SphinxToolsError("object_pointer and object_attention read the answers' boxes from "
                               "coordinate pieces ('0.41' as one token): this tokenizer has none")
    return values


def _restore(run: _Run, state: dict | None) -> tuple[int, int, int]:
    "Put back the optimizer and the random states of a resumed run; returns (step, epoch, pos)."
    if state is None:
        return 0, 0, 0
    run.opt.load_state_dict(state["optimizer"])
    _restore_py_rng(state["py_rng"])
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    return state["step"], state["epoch"], state["pos"]


def _accumulate(run: _Run, feed, token_weight):
    """Forward and backward of one step's ``grad_accum`` batches.

    Returns ``(language loss, {auxiliary name: loss}, answer tokens, (epoch, pos) after them)``."""
    cfg, device = run.cfg, run.device
    run.opt.zero_grad(set_to_none=True)
    total, aux_totals, tokens = 0.0, {}, 0
    for _ in range(cfg.grad_accum):
        tensors, place = next(feed)
        ids, labels, images, segments, batch_places = (
            None if t is None else t.to(device, non_blocking=True) for t in tensors)
        position = pointer = attention = None
        if run.head is not None and batch_places is not None:
            tp = cfg.token_position
            position = (run.head, tp["layer"], batch_places, tp["weight"])
        if run.pointer is not None and batch_places is not None:
            op = cfg.object_pointer
            pointer = (run.pointer, op["layer"], batch_places, run.values, op["weight"])
        if cfg.object_attention and batch_places is not None:
            oa = cfg.object_attention
            attention = ObjectAttention(oa["layer"], oa["question_layer"], oa["head"], batch_places,
                                        run.values, run.tok, oa["weight"], boxes=oa["boxes"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            if position is None and pointer is None and attention is None:
                loss = language = loss_fn(run.model, ids, labels, images, segments, token_weight)
            else:
                loss, language, aux = loss_fn(run.model, ids, labels, images, segments, token_weight,
                                              position, pointer, attention)
                for name, value in aux.items():
                    share = float(value.detach()) / cfg.grad_accum
                    aux_totals[name] = aux_totals.get(name, 0.0) + share
            loss = loss / cfg.grad_accum
        loss.backward()
        total += float(language.detach()) / cfg.grad_accum
        tokens += int((labels != IGNORE).sum())
    return total, aux_totals, tokens, place


def _update(run: _Run, step: int) -> float:
    "Average the gradients over the data-parallel ranks, clip them and step; returns the norm."
    sync_grads(run.params)
    gnorm = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.clip))
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, run.cfg)
    run.opt.step()
    return gnorm


def _log_step(run: _Run, bar, rec: dict, aux: dict):
    "Show a step's record on the progress bar and append it to the log."
    rec.update(trainable=run.n_train, dp=dist.dp_world_size())  # tok_s: this rank's
    rec.update({f"{name}_loss": value for name, value in aux.items()})
    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}")
    if run.log:
        run.log.write(json.dumps(rec) + "\n")
        run.log.flush()


def _checkpoint(run: _Run, last: Path, step: int, epoch: int, pos: int):
    "Save the model and everything a re-run resumes from."
    cuda = run.device.type == "cuda"
    run.model.eval()
    save(run.model, run.tok, last, dict(
        optimizer=run.opt.state_dict(), step=step, epoch=epoch, pos=pos, py_rng=random.getstate(),
        position_head=None if run.head is None else run.head.state_dict(),
        pointer_head=None if run.pointer is None else run.pointer.state_dict(),
        torch_rng=torch.get_rng_state(), config=asdict(run.cfg),
        cuda_rng=torch.cuda.get_rng_state(run.device) if cuda else None))
    run.model.train()
