"""Tiny SPHINX models made in-process: the real architecture at small widths, random weights and
a SentencePiece tokenizer trained on the spot (``make_tiny_checkpoint`` saves them with
``checkpoint.save_checkpoint``). For tests, notebooks, demos and users without weights."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torch.nn as nn

from . import dist
from .checkpoint import save_checkpoint
from .model import SphinxConfig, Transformer

# released name -> the tiny-width preset of the same code (model.sphinx_configs)
VARIANT_PRESETS = {
    "sphinx-1k": "tiny", "sphinx-v2-1k": "tiny", "sphinx": "tiny-224",
    "sphinx-tiny": "tiny-light", "sphinx-tiny-1k": "tiny-light-1k",
    "sphinx-moe": "tiny-moe", "sphinx-moe-1k": "tiny-moe-1k",
}

_WORDS = (
    "a the of and in on with to is are there image picture photo person man woman child dog cat "
    "car bus bicycle tree building sky road table chair cup bottle book phone person left right "
    "top bottom center red green blue yellow white black small large two three several region "
    "object objects detect all provide bounding box coordinates describe short description text "
    "what where who how many which please answer question caption detailed keypoints pose "
    "nose eye ear shoulder elbow wrist hip knee ankle relation between layout title list table "
    "figure yes no"
).split()


def _corpus(seed: int) -> list[str]:
    from .conversation import SYSTEM

    g = torch.Generator().manual_seed(seed)
    lines = [SYSTEM, "### Human: What is in the image?\n### Assistant:"]
    for _ in range(1500):
        n = int(torch.randint(3, 12, (1,), generator=g))
        words = [_WORDS[int(i)] for i in torch.randint(len(_WORDS), (n,), generator=g)]
        nums = torch.rand(4, generator=g).tolist()
        box = ",".join(f"{v:.2f}" for v in nums)
        lines.append(f"{' '.join(words)} <p>{words[0]}</p>[{box}] .")
        lines.append(f"### Human: {' '.join(words)}?\n### Assistant: {words[-1]}")
    return lines


# "0.00" ... "0.99" and "1.00": every 2-decimal coordinate SPHINX writes (docs/formats.md §3)
COORDINATE_PIECES = tuple(f"0.{i:02d}" for i in range(100)) + ("1.00",)


def train_tokenizer(path: Path, vocab_size: int = 512, seed: int = 0,
                    corpus: list[str] | None = None, coordinate_tokens: bool = False) -> Path:
    """Train a LLaMA-style SentencePiece BPE model (byte fallback, split digits) into ``path``.

    Args:
        corpus: training sentences; a small synthetic vision-chat corpus by default.
        coordinate_tokens: make each of :data:`COORDINATE_PIECES` one piece, so a box is 4 tokens
            of a 101-way position vocabulary instead of 16 digit and dot tokens (the text, and so
            every parser, is unchanged).
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or _corpus(seed)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        character_coverage=1.0, max_sentence_length=4096,
        user_defined_symbols=list(COORDINATE_PIECES) if coordinate_tokens else [],
    )
    path.write_bytes(buf.getvalue())
    return path


@torch.no_grad()
def init_coordinate_rows_(model: nn.Module, tokenizer) -> int:
    """Give the coordinate tokens (:data:`COORDINATE_PIECES` that are single pieces of
    ``tokenizer``) input and output embedding rows that vary smoothly with their value.

    Row of value ``v``: ``sqrt(2 / dim) * [cos(2 pi f v), sin(2 pi f v)]`` over ``dim / 2``
    frequencies ``f`` from 0.25 to 50 cycles per image (geometric), so its norm matches the random
    rows and nearby positions start with similar codes: what is learned about ``0.41`` carries
    over to ``0.40`` and ``0.42``. Handles model-parallel shards (embedding columns, output rows).

    Returns:
        the number of coordinate tokens set (0 for a tokenizer without them).
    """
    ids, values = [], []
    for piece in COORDINATE_PIECES:
        i = tokenizer.sp.piece_to_id(piece)  # the unknown id when it is not a piece
        if tokenizer.sp.id_to_piece(i) == piece:
            ids.append(i)
            values.append(float(piece))
    if not ids:
        return 0
    emb, out = model.tok_embeddings.weight, model.output.weight
    dim = out.shape[1]
    freqs = torch.logspace(math.log10(0.25), math.log10(50.0), dim // 2, dtype=torch.float64)
    angle = 2 * math.pi * torch.tensor(values, dtype=torch.float64)[:, None] * freqs
    table = torch.cat([angle.cos(), angle.sin()], dim=1) * math.sqrt(2 / dim)  # (n, dim)
    rank, cols, rows = dist.mp_rank(), emb.shape[1], out.shape[0]  # this rank's dims / vocab rows
    emb[ids] = table[:, rank * cols:(rank + 1) * cols].to(emb.dtype)
    local = torch.tensor(ids) - rank * rows
    mine = (local >= 0) & (local < rows)
    out[local[mine]] = table[mine].to(out.dtype)
    return len(ids)


POSITION_TABLES = ("positional_embedding", "pos_embed", "position_embedding")
LAYER_SCALES = ("gamma",)  # ConvNeXt and DINOv2 layer scale: start at 1, as a norm weight


def _norm_params(model: nn.Module) -> set[str]:
    "Names of the weights and biases of every normalization layer (found by type, not by name)."
    from .model import RMSNorm

    names = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, RMSNorm)):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters(recurse=False))
    return names


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0):
    """Deterministic random weights for training from scratch.

    Normalization weights (every LayerNorm, LayerNorm2d, RMSNorm: found by module type, whatever
    the library names them) and layer scales near 1, their biases and all other biases 0.02 noise;
    matrices N(0, 1/fan_in) (a conv's fan-in is in_channels * kh * kw); the encoders' position
    tables N(0, 1), so a patch token starts with a location code as strong as its content
    (position is what box answers are made of). Every encoder's output then depends on its image.
    """
    g = torch.Generator().manual_seed(seed)
    norms = _norm_params(model)
    for name, p in sorted(model.named_parameters()):
        ones = (name in norms and name.endswith("weight")) or name.endswith(LAYER_SCALES)
        base = torch.ones(p.shape) if ones else torch.zeros(p.shape)
        noise = torch.randn(p.shape, generator=g) * 0.02
        if p.ndim >= 2 and p.shape[-1] > 0:
            fan_in = math.prod(p.shape[1:]) if p.ndim == 4 else p.shape[-1]
            scale = 1.0 if name.endswith(POSITION_TABLES) else fan_in ** -0.5
            noise = torch.randn(p.shape, generator=g) * scale
        p.copy_((base + noise).to(p.dtype))


def make_tiny_checkpoint(dir, variant: str = "sphinx-1k", mp: int = 1, seed: int = 0,
                         **overrides) -> Path:
    """Make a complete tiny checkpoint folder in the released format.

    Args:
        dir: output folder (created).
        variant: a released model's name, whose code it runs at tiny widths: ``"sphinx-1k"`` /
            ``"sphinx-v2-1k"`` (448 input, 5 views), ``"sphinx"`` (224), ``"sphinx-tiny"`` (512) /
            ``"sphinx-tiny-1k"`` (1024, 5 views; no Q-Former / CLIP, grouped-query attention),
            ``"sphinx-moe"`` (512) / ``"sphinx-moe-1k"`` (1024, 5 views; 4 experts, top-2).
        mp: number of model-parallel shards to write.
        seed: weight seed (the tokenizer is trained on a fixed synthetic corpus).
        **overrides: SphinxConfig fields (e.g. ``dim=128, n_layers=4``).

    Returns:
        The folder path.
    """
    if variant not in VARIANT_PRESETS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANT_PRESETS)}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out / "tokenizer.model")
    cfg = SphinxConfig.from_name(VARIANT_PRESETS[variant], **overrides)
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads),
                    ("the expert hidden_dim", cfg.ffn_hidden if cfg.n_experts else mp)):
        if n % mp:
            raise ValueError(f"{what} {n} is not divisible by mp={mp}")
    if dist.init_model_parallel() != 1:
        raise RuntimeError("make_tiny_checkpoint builds full tensors: call it outside model parallel")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    init_random_(model, seed)
    return save_checkpoint(out, cfg, model.state_dict(), tok, mp)
