"""SPHINX checkpoint folders: reading, writing, and the name ``demo``.

Reading: the model is built on the meta device; each parameter is then materialized as exactly this
rank's slice, read from memory-mapped shards (``torch.load(mmap=True, weights_only=True)``) and
re-sharded from any checkpoint MP size to any runtime MP size without building full tensors. The
shard pages a tensor touched are released right after its copy, so peak memory stays near the
bytes this rank keeps.

Writing: ``save_checkpoint`` writes a full state dict in the released format (one
``consolidated.NN-of-MM.model.pth`` shard per model-parallel rank, ``config.json``, ``meta.json``
and ``tokenizer.model``).

Optional ``task_options.json``: the prompt wording a checkpoint was trained on, as
``{task: {option: value}}`` (e.g. ``{"layout": {"variant": "classes"}}``). Every entry point that
asks a task (``run_task``, ``label``, ``serve``) starts from these options, and the caller's own
options override them; the released checkpoints have none, so their tasks keep their default
prompts.

The name ``demo`` (:func:`resolve`) stands for the embedded demo model in
``sphinx_tools/demo/weights``.
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
from .model import (LLAMA_TYPES, SphinxConfig, Transformer, VisionConfig, mp_split_dim,
                    mp_split_rule, vision_configs)

SHARD_RE = re.compile(r"^consolidated\.(\d+)-of-(\d+)\.model\.pth$")
PREFIX = "llma."
# Stored in released checkpoints but never used by the forward pass: fine if absent.
UNUSED_KEYS = re.compile(r"^(clip\.(token_embedding|positional_embedding|ln_final|text_projection|logit_scale)"
                         r"|dinov2_vitg14\.mask_token)")
LLAMA_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
              "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "hidden_dim", "moe")
INT_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
            "hidden_dim", "moe")


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


def read_config(path: Path, vocab_size: int,
                shards: list[dict] | dict | None = None) -> SphinxConfig:
    """SphinxConfig from config.json (LLaMA args), meta.json (llama_type) and the tokenizer's vocab.

    With the checkpoint's (memory-mapped) ``shards``, the sizes in config.json are checked against
    the tensors' shapes before anything is built or allocated: an error names the field and its
    value.
    """
    if isinstance(shards, dict):
        shards = [shards]
    shards = shards or []
    cfg_file, meta_file = path / "config.json", path / "meta.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"missing config.json in {path}")
    try:
        args = json.loads(cfg_file.read_text())
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot parse {cfg_file} / {meta_file}: {e}") from None
    if not isinstance(args, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file} and {meta_file} must each hold a JSON object")
    llama_type = meta.get("llama_type", args.get("llama_type", "llama_ens5"))
    if llama_type not in LLAMA_TYPES:
        raise CheckpointError(
            f"unknown llama_type {llama_type!r} in {meta_file}; supported: {sorted(LLAMA_TYPES)}"
        )
    kw = {k: _whole(args[k]) if k in INT_ARGS else args[k]
          for k in LLAMA_ARGS if k in args and args[k] is not None}
    kw["vocab_size"] = vocab_size  # as the reference: the tokenizer decides
    if "vision" in args:
        if not isinstance(args["vision"], dict):
            raise CheckpointError(
                f"\"vision\" in {cfg_file} must be an object, got {args['vision']!r:.80}"
            )
        try:
            vision = VisionConfig(**{k: _whole(v) for k, v in args["vision"].items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"invalid \"vision\" entry in {cfg_file}: {e}") from None
        check_vision_blocks(vision, shards[0] if shards else {}, cfg_file,
                            LLAMA_TYPES[llama_type].light)
    else:
        vision = infer_vision(shards[0] if shards else {}, path, LLAMA_TYPES[llama_type].light)
    try:
        cfg = SphinxConfig(llama_type=llama_type, vision=vision, **kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    if shards:
        check_llama_sizes(cfg, shards, cfg_file, set(kw))
    return cfg


def _whole(v):
    "A JSON number written as a float but whole (``4096.0``, ``1e6``) as an int; else unchanged."
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    if isinstance(v, list):
        return [_whole(x) for x in v]
    if isinstance(v, dict):
        return {k: _whole(x) for k, x in v.items()}
    return v


def _full_size(shards: list[dict], name: str, dim: int) -> int | None:
    "Size of tensor ``name`` along ``dim`` over all shards (summed along its split dim)."
    if name not in shards[0] or shards[0][name].ndim <= dim:
        return None
    if mp_split_dim(name) == dim:
        return sum(sd[name].shape[dim] for sd in shards if name in sd)
    return shards[0][name].shape[dim]


def _block_indices(sd: dict, prefix: str) -> list[int]:
    "The distinct block numbers N of keys ``{prefix}.N.*``, sorted."
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _check_blocks(label: str, want: int, sd: dict, prefix: str, where: Path):
    # More blocks than the checkpoint holds would be built (one module each) before the keys
    # are compared, so that case fails here; fewer are reported by check_keys as unexpected keys.
    have = _block_indices(sd, prefix)
    if want > len(have):
        held = f"{prefix}.{have[0]}-{have[-1]}" if have else f"no {prefix}.N tensors"
        raise CheckpointError(f"{where}: {label} but the checkpoint holds {len(have)} ({held})")


def check_llama_sizes(cfg: SphinxConfig, shards: list[dict], where: Path, given: set[str]):
    """Compare the LLaMA sizes of ``cfg`` with the tensors of the checkpoint's ``shards``.

    ``given`` are the fields config.json sets (the others are defaults, said so in the error).

    Raises:
        CheckpointError: naming the field, its value and what the tensors hold.
    """
    def name(field: str) -> str:
        value = getattr(cfg, field)
        return f"{field}={value}" + ("" if field in given else " (the default)")

    _check_blocks(name("n_layers"), cfg.n_layers, shards[0], "layers", where)
    width = _full_size(shards, "tok_embeddings.weight", 1)
    if width is not None and width != cfg.dim:
        raise CheckpointError(f"{where}: {name('dim')} but the checkpoint's tok_embeddings.weight "
                              f"is {width} wide")
    rows = _full_size(shards, "tok_embeddings.weight", 0)
    if rows is not None and rows != cfg.vocab_size:
        raise CheckpointError(f"{where.parent / 'tokenizer.model'} has {cfg.vocab_size} words but "
                              f"the checkpoint's tok_embeddings.weight has {rows} rows")
    kv = _full_size(shards, "layers.0.attention.wk.weight", 0)
    if kv is not None and kv != cfg.n_kv_heads * cfg.head_dim:
        raise CheckpointError(
            f"{where}: {name('n_kv_heads')} heads of {cfg.head_dim} (dim {cfg.dim} / "
            f"{name('n_heads')}) make {cfg.n_kv_heads * cfg.head_dim} key features, but the "
            f"checkpoint's layers.0.attention.wk.weight has {kv} rows"
        )
    if cfg.variant.moe:
        check_experts(cfg, shards, where, name)
        return
    hidden = _full_size(shards, "layers.0.feed_forward.w1.weight", 0)
    if hidden is not None and hidden != cfg.ffn_hidden:
        raise CheckpointError(
            f"{where}: {name('multiple_of')} and {name('ffn_dim_multiplier')} make a feed-forward "
            f"width of {cfg.ffn_hidden}, but the checkpoint's layers.0.feed_forward.w1.weight has "
            f"{hidden} rows"
        )


def check_experts(cfg: SphinxConfig, shards: list[dict], where: Path, name):
    """The MoE tensors of every layer against ``moe.num_experts`` and ``hidden_dim``: a gate with
    fewer rows, or expert tensors holding fewer experts, are named (``name(field)`` describes a
    config field)."""
    E, H = cfg.n_experts, cfg.ffn_hidden
    for i in range(cfg.n_layers):
        gate = _full_size(shards, f"layers.{i}.feed_forward.gate.weight", 0)
        if gate is not None and gate != E:
            raise CheckpointError(
                f"{where}: moe.num_experts={E} but the checkpoint's layers.{i}.feed_forward.gate."
                f"weight routes to {gate} experts"
            )
        for w in ("w1", "w2", "w3"):
            rows = _full_size(shards, f"layers.{i}.feed_forward.{w}", 0)
            if rows is not None and rows != E * H:
                held = f"{rows / H:g} experts of {H}" if rows % H == 0 else f"{rows} rows"
                raise CheckpointError(
                    f"{where}: moe.num_experts={E} experts of {name('hidden_dim')} make {E * H} "
                    f"rows, but the checkpoint's layers.{i}.feed_forward.{w} holds {held}: "
                    "experts are missing (or the config is wrong)"
                )


# Blocks of the visual encoders, per VisionConfig field: built one module each
VISION_BLOCKS = {
    "qf_vision_layers": "qformer.vision_model.encoder.layers",
    "qf_layers": "qformer.qformer.encoder.layer",
    "clip_layers": "clip.visual.transformer.resblocks",
    "dino_layers": "dinov2_vitg14.blocks",
}


def check_vision_blocks(v: VisionConfig, sd: dict, where: Path, light: bool = False):
    """The encoder depths of a \"vision\" entry against the blocks present (see _check_blocks);
    ``light``: the model has no Q-Former and no CLIP."""
    if not sd:
        return
    for field, prefix in VISION_BLOCKS.items():
        if light and prefix.startswith(("qformer.", "clip.")):
            continue
        _check_blocks(f"vision.{field}={getattr(v, field)}", getattr(v, field), sd, prefix, where)
    stages = _block_indices(sd, "openclip_convnext_xxl.stages")
    if len(v.convnext_depths) > len(stages):
        raise CheckpointError(f"{where}: vision.convnext_depths has {len(v.convnext_depths)} "
                              f"stages but the checkpoint has {len(stages)}")
    for s, depth in enumerate(v.convnext_depths):
        _check_blocks(f"vision.convnext_depths[{s}]={depth}", depth, sd,
                      f"openclip_convnext_xxl.stages.{s}.blocks", where)


def _vision_signature(v: VisionConfig) -> dict:
    # encoder widths only: the token grid (patch size, Q-Former queries) is read from the tensors
    return {
        "qformer.query_tokens": (v.qf_width,),
        "qformer.vision_model.embeddings.class_embedding": (1, 1, v.qf_vision_width),
        "clip.visual.class_embedding": (v.clip_width,),
        "openclip_convnext_xxl.head.norm.weight": (v.convnext_dims[-1],),
        "dinov2_vitg14.cls_token": (1, 1, v.dino_width),
    }


def infer_vision(sd: dict, path: Path, light: bool = False) -> VisionConfig:
    """Released config.json files hold only LLaMA args: match the encoder widths to a known preset,
    and read the token grid from the tensors (patch size from CLIP's conv1 weight (w, 3, p, p), or
    DINOv2's patch embedding when ``light`` (no Q-Former, no CLIP), Q-Former queries from
    query_tokens (1, Q, qf_width))."""
    shapes = {k.removeprefix(PREFIX): tuple(t.shape) for k, t in sd.items()}
    q = shapes.get("qformer.query_tokens")
    if q is not None and len(q) == 3:
        shapes["qformer.query_tokens"] = q[-1:]
    for name, v in vision_configs.items():
        signature = _vision_signature(v)
        if light:
            signature = {k: s for k, s in signature.items()
                         if not k.startswith(("qformer.", "clip."))}
        if all(shapes.get(k) == s for k, s in signature.items()):
            grid = {}
            conv1 = shapes.get("dinov2_vitg14.patch_embed.proj.weight" if light
                               else "clip.visual.conv1.weight")
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


def check_shapes(model: Transformer, shards: list[dict], world: int, where: Path):
    """Every parameter's tensor in the shards against the (meta) model's shape for this runtime
    model-parallel size ``world``, before anything is allocated."""
    ckpt_mp = len(shards)
    for name, param in model.named_parameters():
        if name not in shards[0]:  # an unused tensor the checkpoint left out
            continue
        d = mp_split_dim(name)
        pieces = [sd[name] for sd in shards] if d >= 0 else [shards[0][name]]
        shape = tuple(param.shape)
        if d < 0 or (ckpt_mp == 1 and world == 1):
            if tuple(pieces[0].shape) != shape:
                raise CheckpointError(
                    f"{where}: tensor {PREFIX}{name} has shape {tuple(pieces[0].shape)}, "
                    f"the model expects {shape}"
                )
            continue
        # every shard has the model's shape except along the split dim
        others = shape[:d] + shape[d + 1:]
        fits = all(p.ndim == len(shape) and p.shape[:d] + p.shape[d + 1:] == others for p in pieces)
        if not fits:
            raise CheckpointError(
                f"{where}: tensor {PREFIX}{name} has shard shape {tuple(pieces[0].shape)}, "
                f"the model expects {shape} per rank (split dim {d})"
            )
        full = sum(p.shape[d] for p in pieces)
        if full != shape[d] * world:
            raise CheckpointError(
                f"{where}: tensor {PREFIX}{name} has {full} entries along its split dim {d} over "
                f"{ckpt_mp} shard(s), the model expects {shape[d]} per rank x {world} ranks"
            )
        experts = model.cfg.n_experts
        if mp_split_rule(name) == "per_expert" and any(p.shape[0] % experts for p in pieces):
            raise CheckpointError(f"{where}: a shard of {PREFIX}{name} has {pieces[0].shape[0]} "
                                  f"rows, not a multiple of the {experts} experts")


def materialize(model: Transformer, shards: list[dict], device, dtype, rank: int, world: int,
                where: Path):
    """Replace every meta parameter with this rank's slice, read from the (mmapped) shards.

    All shapes are checked first (:func:`check_shapes`), so a checkpoint that does not fit fails
    before any memory is allocated."""
    check_shapes(model, shards, world, where)
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
                out.copy_(pieces[0])
            elif mp_split_rule(name) == "per_expert":  # each expert's rows re-sharded on their own
                E = model.cfg.n_experts
                rank_slice([p.view(E, -1, *p.shape[1:]) for p in pieces], 1, rank, world,
                           out.view(E, -1, *out.shape[1:]))
            else:
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


# -- writing ---------------------------------------------------------------------------------------
def shard_state_dict(sd: dict, mp: int, n_experts: int = 0) -> list[dict]:
    """Split a full state dict into ``mp`` model-parallel shards along each tensor's split dim
    (MoE expert tensors per expert, for a model of ``n_experts``; see ``mp_split_rule``)."""
    shards = [{} for _ in range(mp)]
    for k, t in sd.items():
        d = mp_split_dim(k)
        parts = t.chunk(mp, dim=d) if d >= 0 else [t] * mp
        if mp_split_rule(k) == "per_expert":
            if not n_experts:
                raise ValueError(f"{k} is an MoE expert tensor: give n_experts")
            parts = [p.flatten(0, 1) for p in t.view(n_experts, -1, *t.shape[1:]).chunk(mp, dim=1)]
        for r in range(mp):
            shards[r]["llma." + k] = parts[r].clone()
    return shards


# config.json keys the reference's Mixtral files take (they reject others: no multiple_of)
MOE_CONFIG_KEYS = ("dim", "hidden_dim", "head_dim", "n_layers", "n_heads", "n_kv_heads",
                   "vocab_size", "norm_eps", "rope_theta", "max_seq_len", "moe")


def write_metadata(out: Path, cfg: SphinxConfig, tokenizer_file: Path | None):
    """config.json (LLaMA args, plus the encoder widths unless they are the released ones, which
    :func:`infer_vision` reads back from the tensors), meta.json (llama_type) and
    tokenizer.model."""
    args = cfg.to_json()
    llama_type = args.pop("llama_type")
    if cfg.vision == VisionConfig():
        del args["vision"]
    if cfg.n_experts:
        args = {k: cfg.head_dim if k == "head_dim" else args[k] for k in MOE_CONFIG_KEYS} | (
            {"vision": args["vision"]} if "vision" in args else {})
    (out / "config.json").write_text(json.dumps(args, indent=1))
    (out / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    if tokenizer_file is not None and Path(tokenizer_file) != out / "tokenizer.model":
        (out / "tokenizer.model").write_bytes(Path(tokenizer_file).read_bytes())


def save_checkpoint(out: Path, cfg: SphinxConfig, state_dict: dict, tokenizer_file: Path | None,
                    mp: int = 1) -> Path:
    "Write a checkpoint folder in the released format (shards, config.json, meta.json)."
    out.mkdir(parents=True, exist_ok=True)
    for r, shard in enumerate(shard_state_dict(state_dict, mp, cfg.n_experts)):
        torch.save({"model": shard}, out / f"consolidated.{r:02d}-of-{mp:02d}.model.pth")
    write_metadata(out, cfg, tokenizer_file)
    return out


TASK_OPTIONS_FILE = "task_options.json"


def read_task_options(path) -> dict[str, dict]:
    """A checkpoint folder's ``task_options.json`` as ``{task: {option: value}}``; ``{}`` when
    the folder has none. Raises CheckpointError for a file that is not such an object."""
    file = Path(path) / TASK_OPTIONS_FILE
    if not file.is_file():
        return {}
    try:
        options = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in options.items()):
        raise CheckpointError(f"{file} must map task names to objects of options, e.g. "
                              '{"layout": {"variant": "classes"}}')
    return options


def write_task_options(out: Path, options: dict[str, dict]) -> None:
    "Write ``task_options.json`` (or remove a stale one when ``options`` is empty)."
    file = Path(out) / TASK_OPTIONS_FILE
    if options:
        file.write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")
    elif file.is_file():
        file.unlink()


# -- the name "demo" -------------------------------------------------------------------------------
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "demo" / "weights"


def demo_path() -> Path:
    "The folder of the embedded demo checkpoint; a clear error when it is not installed."
    if not (DEMO_DIR / "tokenizer.model").is_file():
        raise CheckpointError(
            f"the embedded demo model is not installed ({DEMO_DIR} is missing); build it with "
            "`python -m sphinx_tools.demo build`"
        )
    return DEMO_DIR


def resolve(path) -> Path:
    """Map the name ``demo`` to the embedded checkpoint; other paths pass through.

    A ``demo`` folder in the working directory wins only if it holds checkpoint shards, so a
    build's ``--work`` folder (or any other ``demo`` folder) does not shadow the embedded model."""
    p = Path(path).expanduser()
    has_shards = p.is_dir() and any(SHARD_RE.match(f.name) for f in p.iterdir())
    if str(path) == DEMO_NAME and not has_shards:
        return demo_path()
    return p
