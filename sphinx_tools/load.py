"""Load a released SPHINX checkpoint folder into this process's model-parallel slice.

The model is built on the meta device; each parameter is then materialized as exactly this
rank's slice, read from memory-mapped shards (``torch.load(mmap=True, weights_only=True)``) and
re-sharded from any checkpoint MP size to any runtime MP size without building full tensors. The
shard pages a tensor touched are released right after its copy, so peak memory stays near the
bytes this rank keeps.
"""

from __future__ import annotations

import ctypes
import json
import pickle
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .model import LLAMA_TYPES, SphinxConfig, Transformer, VisionConfig, mp_split_dim, vision_configs

SHARD_RE = re.compile(r"^consolidated\.(\d+)-of-(\d+)\.model\.pth$")
PREFIX = "llma."
# Stored in released checkpoints but never used by the forward pass: fine if absent.
UNUSED_KEYS = re.compile(r"^(clip\.(token_embedding|positional_embedding|ln_final|text_projection|logit_scale)"
                         r"|dinov2_vitg14\.mask_token)")
LLAMA_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
              "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")


def find_shards(path: Path) -> list[Path]:
    "The ``consolidated.NN-of-MM.model.pth`` files of a folder, in order; errors name what is wrong."
    if not path.exists():
        raise CheckpointError(f"checkpoint folder does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {path}")
    found = {}
    for f in path.iterdir():
        m = SHARD_RE.match(f.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = f
    if not found:
        raise CheckpointError(f"no consolidated.NN-of-MM.model.pth shards in {path}")
    totals = {mm for _, mm in found}
    if len(totals) > 1:
        raise CheckpointError(f"shards of different sets ({sorted(totals)}) mixed in {path}")
    (mm,) = totals
    missing = [f"consolidated.{i:02d}-of-{mm:02d}.model.pth" for i in range(mm) if (i, mm) not in found]
    if missing:
        raise CheckpointError(f"shard set in {path} has holes: missing {', '.join(missing)}")
    return [found[(i, mm)] for i in range(mm)]


def read_config(path: Path, vocab_size: int, shard0: dict | None = None) -> SphinxConfig:
    "SphinxConfig from config.json (LLaMA args), meta.json (llama_type) and the tokenizer's vocab."
    cfg_file, meta_file = path / "config.json", path / "meta.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"missing config.json in {path}")
    try:
        args = json.loads(cfg_file.read_text())
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {cfg_file} / {meta_file}: {e}") from None
    llama_type = meta.get("llama_type", args.get("llama_type", "llama_ens5"))
    if llama_type not in LLAMA_TYPES:
        raise CheckpointError(
            f"unknown llama_type {llama_type!r} in {meta_file}; supported: {sorted(LLAMA_TYPES)}"
        )
    kw = {k: args[k] for k in LLAMA_ARGS if k in args and args[k] is not None}
    kw["vocab_size"] = vocab_size  # as the reference: the tokenizer decides
    if "vision" in args:
        try:
            vision = VisionConfig(**args["vision"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"invalid \"vision\" entry in {cfg_file}: {e}") from None
    else:
        vision = infer_vision(shard0 or {}, path)
    try:
        return SphinxConfig(llama_type=llama_type, vision=vision, **kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model args in {cfg_file}: {e}") from None


def _vision_signature(v: VisionConfig) -> dict:
    # encoder widths only: the token grid (patch size, Q-Former queries) is read from the tensors
    return {
        "qformer.query_tokens": (v.qf_width,),
        "qformer.vision_model.embeddings.class_embedding": (1, 1, v.qf_vision_width),
        "clip.visual.class_embedding": (v.clip_width,),
        "openclip_convnext_xxl.head.norm.weight": (v.convnext_dims[-1],),
        "dinov2_vitg14.cls_token": (1, 1, v.dino_width),
    }


def infer_vision(sd: dict, path: Path) -> VisionConfig:
    """Released config.json files hold only LLaMA args: match the encoder widths to a known preset,
    and read the token grid from the tensors (patch size from CLIP's conv1 weight (w, 3, p, p),
    Q-Former queries from query_tokens (1, Q, qf_width))."""
    shapes = {k.removeprefix(PREFIX): tuple(t.shape) for k, t in sd.items()}
    q = shapes.get("qformer.query_tokens")
    if q is not None and len(q) == 3:
        shapes["qformer.query_tokens"] = q[-1:]
    for name, v in vision_configs.items():
        if all(shapes.get(k) == s for k, s in _vision_signature(v).items()):
            grid = {}
            conv1 = shapes.get("clip.visual.conv1.weight")
            if conv1 is not None and len(conv1) == 4 and conv1[-1] == conv1[-2]:
                grid["patch_size"] = conv1[-1]
            if q is not None and len(q) == 3:
                grid["qf_queries"] = q[1]
            try:
                return replace(v, **grid)
            except ValueError as e:
                raise CheckpointError(f"the visual token grid of {path} is not supported: {e}") from None
    raise CheckpointError(
        f"the visual encoder widths in {path} match no known preset ({sorted(vision_configs)}); "
        "add a \"vision\" entry to its config.json"
    )


def load_shard(f: Path) -> dict:
    "One shard's state dict, memory-mapped, refusing anything but tensors."
    try:
        obj = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{f} holds something other than tensors (refused by weights_only loading): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint shard {f} (corrupt or truncated?): {e}") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{f} is not a {{'model': state_dict}} of tensors")
    return {k.removeprefix(PREFIX): t for k, t in sd.items()}


def build_meta(cfg: SphinxConfig) -> Transformer:
    "The model with every parameter on the meta device (no memory, seconds even for 13B)."
    with torch.device("meta"):
        return Transformer(cfg)


def check_keys(model: Transformer, sd: dict, where: Path):
    expected = set(model.state_dict().keys())
    have = set(sd.keys())
    missing = sorted(k for k in expected - have if not UNUSED_KEYS.match(k))
    unexpected = sorted(have - expected)
    if missing or unexpected:
        msg = [f"checkpoint {where} does not fit a {model.cfg.llama_type} model:"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        raise CheckpointError(" ".join(msg))


def rank_slice(pieces: list[torch.Tensor], dim: int, rank: int, world: int, out: torch.Tensor):
    """Copy this rank's slice of the tensor ``cat(pieces, dim)`` into ``out`` without building it.

    Works for any checkpoint and runtime model-parallel sizes whose split dim divides evenly.
    """
    full = sum(p.shape[dim] for p in pieces)
    if full % world:
        raise CheckpointError(f"split dim {dim} of size {full} does not divide by MP size {world}")
    size = full // world
    lo, hi, start = rank * size, (rank + 1) * size, 0
    for p in pieces:
        end = start + p.shape[dim]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.narrow(dim, a - lo, b - a).copy_(p.narrow(dim, a - start, b - a))
        start = end


_libc = None


def release(t: torch.Tensor):
    "Drop a memory-mapped tensor's resident pages from this process (Linux madvise DONTNEED)."
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        page = 4096
        addr = t.untyped_storage().data_ptr()
        n = t.untyped_storage().nbytes()
        start = (addr + page - 1) // page * page
        end = (addr + n) // page * page
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)
    except (OSError, AttributeError):
        pass


def materialize(model: Transformer, shards: list[dict], device, dtype, rank: int, world: int,
                where: Path):
    "Replace every meta parameter with this rank's slice, read from the (mmapped) shards."
    ckpt_mp = len(shards)
    for name, param in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        out = torch.empty(param.shape, dtype=dtype, device=device)
        if name not in shards[0]:  # an unused tensor the checkpoint left out
            out.zero_()
        else:
            d = mp_split_dim(name)
            pieces = [sd[name] for sd in shards] if d >= 0 else [shards[0][name]]
            if d < 0 or (ckpt_mp == 1 and world == 1):
                src = pieces[0]
                if tuple(src.shape) != tuple(out.shape):
                    raise CheckpointError(
                        f"{where}: tensor {PREFIX}{name} has shape {tuple(src.shape)}, "
                        f"the model expects {tuple(out.shape)}"
                    )
                out.copy_(src)
            else:
                want = list(out.shape)
                got = list(pieces[0].shape)
                want[d] = got[d] = 0
                if want != got:
                    raise CheckpointError(
                        f"{where}: tensor {PREFIX}{name} has shard shape {tuple(pieces[0].shape)}, "
                        f"the model expects {tuple(out.shape)} per rank (split dim {d})"
                    )
                rank_slice(pieces, d, rank, world, out)
            for p in pieces:
                release(p)
        module._parameters[attr] = nn.Parameter(out, requires_grad=False)
    _materialize_buffers(model, device)


def _materialize_buffers(model: nn.Module, device):
    # Non-persistent buffers built on meta (position ids, unused text masks) are rebuilt on device.
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if bname == "position_ids":
                    new = torch.arange(buf.shape[-1], device=device).expand(buf.shape).contiguous()
                else:
                    new = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                mod._buffers[bname] = new
