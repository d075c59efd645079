"""The SPHINX model: LLaMA-2 with fairscale tensor parallel, the mixed visual encoders and the
multi-scale sub-image scheme, written top to bottom from config to logits.

Facts reproduced here: the sequence is
``[BOS] + per view [start_img, 32 Q-Former tokens, 257 fused tokens, end_img] + prompt[1:]``, with RoPE
over the whole sequence and causal attention (32 = ``VisionConfig.qf_queries``, 257 = 1 + (224 /
``VisionConfig.patch_size``)^2; smaller tiny models may use fewer). SPHINX (`llama_ens`) uses one 224 view; SPHINX-1k
(`llama_ens5`) uses a 448 input split into a global view plus four quadrants.

The other released variants differ only where ``LLAMA_TYPES`` says: SPHINX-Tiny(-1k)
(`llama_ens_light`, `llama_ens5_light`) have no Q-Former and no CLIP (259 tokens a view) and a
TinyLlama with grouped-query attention; SPHINX-MoE(-1k) (`mixtral_sparse_ens`,
`mixtral_sparse_ens5`) have a Mixtral backbone whose feed-forward is a sparse top-2 mixture of
experts. Their 512 / 1024 inputs give the ConvNeXt trunk 512-px views (a 16x16 grid directly) and
the ViTs 224-px views.

Parameter names equal the released checkpoint's (``llma.`` prefix stripped), so a state dict loads
as is. Visual encoders come from transformers (BLIP-2 Q-Former), open_clip (CLIP ViT-L/14) and timm
(ConvNeXt-XXL trunk, DINOv2 ViT-g/14 blocks); only their forward wiring is ours.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)

@dataclass(frozen=True)
class Variant:
    "What a ``llama_type`` fixes: input size, views, encoders and feed-forward."

    image_size: int
    n_views: int  # 1 (the whole image) or 5 (global + four quadrants)
    convnext_size: int = 512  # side of the ConvNeXt views (256: nearest from the 224 views)
    light: bool = False  # ConvNeXt + DINOv2 only: no Q-Former, no CLIP
    moe: bool = False  # sparse mixture-of-experts feed-forward (Mixtral)


LLAMA_TYPES = {
    "llama_ens": Variant(224, 1, convnext_size=256),
    "llama_ens5": Variant(448, 5, convnext_size=256),
    "llama_ens_light": Variant(512, 1, light=True),
    "llama_ens5_light": Variant(1024, 5, light=True),
    "mixtral_sparse_ens": Variant(512, 1, moe=True),
    "mixtral_sparse_ens5": Variant(1024, 5, moe=True),
}
MOE_DEFAULTS = dict(num_experts=8, num_experts_per_tok=2)  # the reference's MoE defaults
MOE_HIDDEN_DEFAULT = 16384  # the reference's hidden_dim default (released Mixtral: 14336)
VIEW_SIZE = 224
CONVNEXT_GRID = 8  # the ConvNeXt trunk's output grid on its 256x256 input (stride 32)
MAX_SEQ_LEN_LIMIT = 1 << 20  # largest accepted max_seq_len (the released SPHINX: 4096)
ROPE_TABLE_MIN = 4096  # positions of the first RoPE table; it grows by doubling when needed


def check_positive_int(name: str, value) -> int:
    "``value`` if it is an int >= 1 (not a bool), else a ValueError naming ``name`` and ``value``."
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_number(name: str, value) -> float:
    "``value`` if it is a finite number > 0 (not a bool), else a ValueError naming ``name``."
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


@dataclass
class VisionConfig:
    """Widths of the four frozen visual encoders and the visual token grid (patch size, Q-Former
    queries). Defaults are the released SPHINX values."""

    # BLIP-2 (OPT-2.7b config) ViT-g + Q-Former
    qf_vision_width: int = 1408
    qf_vision_layers: int = 39
    qf_vision_heads: int = 16
    qf_vision_mlp: int = 6144
    qf_width: int = 768
    qf_layers: int = 12
    qf_heads: int = 12
    qf_mlp: int = 3072
    # open_clip ViT-L/14 (visual tower used; text tower tensors are stored but unused)
    clip_width: int = 1024
    clip_layers: int = 24
    clip_head_width: int = 64
    clip_embed_dim: int = 768
    clip_text_width: int = 768
    clip_text_heads: int = 12
    clip_text_vocab: int = 49408
    # open_clip convnext_xxlarge trunk (timm ConvNeXt)
    convnext_depths: tuple = (3, 4, 30, 3)
    convnext_dims: tuple = (384, 768, 1536, 3072)
    # DINOv2 ViT-g/14
    dino_width: int = 1536
    dino_layers: int = 40
    dino_heads: int = 24
    # Visual token grid, shared by the three ViTs (BLIP-2, CLIP, DINOv2): grid = 224 // patch_size.
    patch_size: int = 14
    qf_queries: int = 32  # Q-Former query tokens per view

    def __post_init__(self):
        for name in ("convnext_depths", "convnext_dims"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"vision.{name} must be a non-empty list, got {value!r}")
            for i, v in enumerate(value):
                check_positive_int(f"vision.{name}[{i}]", v)
            setattr(self, name, tuple(value))
        if len(self.convnext_depths) != len(self.convnext_dims):
            raise ValueError(f"vision.convnext_depths {list(self.convnext_depths)} and "
                             f"vision.convnext_dims {list(self.convnext_dims)} differ in length")
        for f in fields(self):  # the token grid's two fields have their own checks below
            if f.name not in ("convnext_depths", "convnext_dims", "patch_size", "qf_queries"):
                check_positive_int(f"vision.{f.name}", getattr(self, f.name))
        for width, heads in (("qf_vision_width", "qf_vision_heads"), ("qf_width", "qf_heads"),
                             ("clip_width", "clip_head_width"),
                             ("clip_text_width", "clip_text_heads"), ("dino_width", "dino_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"vision.{width} {getattr(self, width)} must divide by "
                                 f"vision.{heads} {getattr(self, heads)}")
        p = self.patch_size
        if not isinstance(p, int) or p < 1 or VIEW_SIZE % p:
            raise ValueError(f"patch_size {p!r} must be a positive divisor of the view size {VIEW_SIZE}")
        g = VIEW_SIZE // p
        if g % CONVNEXT_GRID and CONVNEXT_GRID % g:
            raise ValueError(
                f"patch_size {p} gives a {g}x{g} token grid; the ConvNeXt {CONVNEXT_GRID}x"
                f"{CONVNEXT_GRID} trunk needs a grid that is a multiple or a divisor of {CONVNEXT_GRID}"
            )
        if not isinstance(self.qf_queries, int) or self.qf_queries < 1:
            raise ValueError(f"qf_queries {self.qf_queries!r} must be an int >= 1")

    @property
    def fused_width(self) -> int:
        return self.clip_width + self.convnext_dims[-1] + self.dino_width

    @property
    def grid(self) -> int:
        "Patch tokens per side of a 224 view."
        return VIEW_SIZE // self.patch_size

    @property
    def fused_tokens(self) -> int:
        "Fused (CLIP + ConvNeXt + DINOv2) tokens per view: class token + grid x grid patches."
        return self.grid * self.grid + 1

    @property
    def tokens_per_view(self) -> int:
        "start_img + Q-Former queries + fused tokens + end_img (291 for the released SPHINX)."
        return 1 + self.qf_queries + self.fused_tokens + 1


# Released SPHINX encoders, and the tiny widths of the reference's golden model (see tests/data/golden).
vision_configs = {
    "sphinx": VisionConfig(),
    "tiny": VisionConfig(
        qf_vision_width=40, qf_vision_layers=1, qf_vision_heads=2, qf_vision_mlp=80,
        qf_width=32, qf_layers=2, qf_heads=2, qf_mlp=64,
        clip_width=32, clip_layers=2, clip_head_width=16, clip_embed_dim=16,
        clip_text_width=16, clip_text_heads=2, clip_text_vocab=64,
        convnext_depths=(1, 1, 1, 1), convnext_dims=(8, 16, 24, 48),
        dino_width=24, dino_layers=2, dino_heads=2,
    ),
}


@dataclass
class SphinxConfig:
    "LLaMA args (as in a checkpoint's config.json) plus the variant and the encoder widths."

    dim: int = 5120
    n_layers: int = 40
    n_heads: int = 40
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # MoE variants only (config.json keys of the reference's Mixtral files): each expert's width,
    # and {"num_experts": E, "num_experts_per_tok": k}
    hidden_dim: int | None = None
    moe: dict | None = None
    llama_type: str = "llama_ens5"
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if self.llama_type not in LLAMA_TYPES:
            raise ValueError(
                f"unknown llama_type {self.llama_type!r}; supported: {sorted(LLAMA_TYPES)}"
            )
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_moe()
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        for name in ("norm_eps", "rope_theta"):
            check_positive_number(name, getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            check_positive_number("ffn_dim_multiplier", self.ffn_dim_multiplier)
        if self.max_seq_len > MAX_SEQ_LEN_LIMIT:
            raise ValueError(f"max_seq_len={self.max_seq_len} is larger than the supported "
                             f"{MAX_SEQ_LEN_LIMIT}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                f"and n_heads by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"dim / n_heads = {self.dim} / {self.n_heads} = {self.head_dim} must "
                             "be even (RoPE rotates pairs of features)")

    def _check_moe(self):
        if not self.variant.moe:
            for name in ("hidden_dim", "moe"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for the mixtral_sparse_ens* variants, not "
                                     f"{self.llama_type!r}")
            return
        if self.hidden_dim is None:
            self.hidden_dim = MOE_HIDDEN_DEFAULT
        check_positive_int("hidden_dim", self.hidden_dim)
        moe = {**MOE_DEFAULTS, **(self.moe or {})}
        unknown = sorted(set(moe) - set(MOE_DEFAULTS))
        if not isinstance(self.moe, (dict, type(None))) or unknown:
            raise ValueError(f"moe must be a dict with keys {sorted(MOE_DEFAULTS)}, "
                             f"got {self.moe!r}")
        for k, v in moe.items():
            check_positive_int(f"moe.{k}", v)
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ValueError(f"moe.num_experts_per_tok {moe['num_experts_per_tok']} is more than "
                             f"moe.num_experts {moe['num_experts']}")
        self.moe = moe

    @property
    def variant(self) -> Variant:
        return LLAMA_TYPES[self.llama_type]

    @property
    def image_size(self) -> int:
        return self.variant.image_size

    @property
    def n_views(self) -> int:
        return self.variant.n_views

    @property
    def n_experts(self) -> int:
        "Experts per MoE layer (0: a dense feed-forward)."
        return self.moe["num_experts"] if self.variant.moe else 0

    @property
    def qf_queries(self) -> int:
        "Q-Former tokens per view (0 in the light variants, which have no Q-Former)."
        return 0 if self.variant.light else self.vision.qf_queries

    @property
    def tokens_per_view(self) -> int:
        "start_img + Q-Former queries + fused tokens + end_img (291; 259 in the light variants)."
        return 1 + self.qf_queries + self.vision.fused_tokens + 1

    @property
    def image_tokens(self) -> int:
        return self.n_views * self.tokens_per_view

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        "The SwiGLU width (of each expert in the MoE variants, ``hidden_dim`` as given)."
        if self.variant.moe:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SphinxConfig":
        if name not in sphinx_configs:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(sphinx_configs)}")
        cfg = dict(sphinx_configs[name])
        vision = replace(vision_configs[cfg.pop("vision", "sphinx")])
        v = overrides.pop("vision", None)
        if isinstance(v, str):
            if v not in vision_configs:
                raise ValueError(f"unknown vision preset {v!r}; known: {sorted(vision_configs)}")
            vision = replace(vision_configs[v])
        elif isinstance(v, VisionConfig):
            vision = v
        elif isinstance(v, dict):  # merged onto the preset's encoders
            unknown = sorted(set(v) - set(VisionConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"unknown vision fields {unknown}; known: {sorted(VisionConfig.__dataclass_fields__)}"
                )
            vision = replace(vision, **v)
        elif v is not None:
            raise ValueError(f"vision override must be a dict, VisionConfig or preset name, got {v!r}")
        cfg["vision"] = vision
        cfg.update(overrides)
        return cls(**cfg)

    def to_json(self) -> dict:
        d = asdict(self)
        d["vision"]["convnext_depths"] = list(self.vision.convnext_depths)
        d["vision"]["convnext_dims"] = list(self.vision.convnext_dims)
        if not self.variant.moe:  # the dense variants' config.json has no MoE keys
            del d["hidden_dim"], d["moe"]
        return d


sphinx_configs = {
    "sphinx": dict(llama_type="llama_ens"),
    "sphinx-1k": dict(llama_type="llama_ens5"),
    "sphinx-v2-1k": dict(llama_type="llama_ens5"),
    # tiny widths of the same code: for tests, demos and notebooks on CPU
    "tiny": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=512, vision="tiny"),
    "tiny-224": dict(
        dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=512, vision="tiny",
        llama_type="llama_ens",
    ),
    # the benchmark's small preset
    "small": dict(dim=512, n_layers=8, n_heads=8, multiple_of=256, vocab_size=32000, vision="tiny"),
}
# SPHINX-Tiny: TinyLlama-1.1B; SPHINX-MoE: Mixtral-8x7B (8 experts of 14336, top-2, RoPE theta 1e6)
_TINYLLAMA = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4)
_MIXTRAL = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, rope_theta=1e6,
                moe=dict(num_experts=8, num_experts_per_tok=2))
# the tiny widths of the reference's goldens for these variants (2 K/V heads; 4 experts of 96)
_TINY_GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, vision="tiny")
_TINY_MOE = dict(_TINY_GQA, hidden_dim=96, rope_theta=1e6,
                 moe=dict(num_experts=4, num_experts_per_tok=2))
sphinx_configs.update({
    "sphinx-tiny": dict(_TINYLLAMA, llama_type="llama_ens_light"),
    "sphinx-tiny-1k": dict(_TINYLLAMA, llama_type="llama_ens5_light"),
    "sphinx-moe": dict(_MIXTRAL, llama_type="mixtral_sparse_ens"),
    "sphinx-moe-1k": dict(_MIXTRAL, llama_type="mixtral_sparse_ens5"),
    "tiny-light": dict(_TINY_GQA, multiple_of=32, llama_type="llama_ens_light"),
    "tiny-light-1k": dict(_TINY_GQA, multiple_of=32, llama_type="llama_ens5_light"),
    "tiny-moe": dict(_TINY_MOE, llama_type="mixtral_sparse_ens"),
    "tiny-moe-1k": dict(_TINY_MOE, llama_type="mixtral_sparse_ens5"),
})


# --------------------------------------------------------------------------------------------
# LLaMA-2 blocks (fairscale tensor parallel)
# --------------------------------------------------------------------------------------------


# fairscale's own layers allocate full-size weights with the legacy torch.Tensor(...) constructor,
# which ignores the meta device; these keep fairscale's layout, names and collectives
# (copy/gather/reduce over the model-parallel group) and allocate only this rank's slice.


def _mp_part(n: int, what: str) -> int:
    world = fs_init.get_model_parallel_world_size()
    if n % world:
        raise ValueError(f"{what} {n} is not divisible by the model-parallel size {world}")
    return n // world


class ColumnParallelLinear(nn.Module):
    "y = x A^T with A split by rows (output features) across model-parallel ranks."

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True):
        super().__init__()
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(_mp_part(out_features, "out_features"), in_features))
        self.split = fs_init.get_model_parallel_world_size() > 1

    def forward(self, x):
        if not self.split:  # one rank: the collectives are identities, skip their overhead
            return F.linear(x, self.weight)
        y = F.linear(copy_to_model_parallel_region(x), self.weight)
        return gather_from_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    "y = x A^T with A split by columns (input features); x arrives already split."

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, _mp_part(in_features, "in_features")))
        self.split = fs_init.get_model_parallel_world_size() > 1

    def forward(self, x):
        y = F.linear(x, self.weight)
        return reduce_from_model_parallel_region(y) if self.split else y


class ParallelEmbedding(nn.Module):
    "Embedding split along the embedding dim, gathered after lookup."

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, _mp_part(embedding_dim, "dim")))
        self.split = fs_init.get_model_parallel_world_size() > 1

    def forward(self, tokens):
        y = F.embedding(tokens, self.weight)
        return gather_from_model_parallel_region(y) if self.split else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class KVCache(nn.Module):
    "Static cache: (B, n_local_kv_heads, max_len, head_dim), written in place, never reallocated."

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # slots: [T] cache slots; k, v: (B, nkv, T, hd)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: SphinxConfig):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        if cfg.n_heads % mp or cfg.n_kv_heads % mp:
            raise ValueError(
                f"n_heads {cfg.n_heads} / n_kv_heads {cfg.n_kv_heads} not divisible by "
                f"model-parallel size {mp}"
            )
        self.n_local_heads = cfg.n_heads // mp
        self.n_local_kv_heads = cfg.n_kv_heads // mp
        self.head_dim = cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * cfg.head_dim, gather_output=False)
        self.wk = ColumnParallelLinear(cfg.dim, kv_dim, gather_output=False)
        self.wv = ColumnParallelLinear(cfg.dim, kv_dim, gather_output=False)
        self.wo = RowParallelLinear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs_cis, mask, slots=None):
        # x: (B, T, dim); freqs_cis: (B, T, hd/2) complex; mask: (B, 1, T, S) bool or None (causal)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if hasattr(self.kv_cache, "attend"):  # a decoding cache attends itself (generate.py)
            y = self.kv_cache.attend(q, k, v, mask, slots)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(slots, k, v)
        rep = self.n_local_heads // self.n_local_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: SphinxConfig):
        super().__init__()
        self.w1 = ColumnParallelLinear(cfg.dim, cfg.ffn_hidden, gather_output=False)
        self.w2 = RowParallelLinear(cfg.ffn_hidden, cfg.dim)
        self.w3 = ColumnParallelLinear(cfg.dim, cfg.ffn_hidden, gather_output=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts (Mixtral), in the released "sparse" layout.

    ``w1``, ``w2``, ``w3`` (no ``.weight`` suffix) are each (E * H, dim): expert e owns rows
    ``e*H .. (e+1)*H - 1``. w1/w3 blocks are Linear weights (H, dim); w2 is NOT transposed, the
    expert output is ``act @ w2_e``. Under model parallelism each expert's H rows are split
    (rank r holds part r of every expert), and the ranks' partial outputs are all-reduced.
    """

    def __init__(self, cfg: SphinxConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe["num_experts_per_tok"]
        local = _mp_part(cfg.ffn_hidden, "the expert hidden_dim")
        self.gate = nn.Linear(cfg.dim, self.n_experts, bias=False)  # replicated
        self.w1 = nn.Parameter(torch.empty(self.n_experts * local, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(self.n_experts * local, cfg.dim))
        self.w3 = nn.Parameter(torch.empty(self.n_experts * local, cfg.dim))

    def route(self, x):
        # x: (N, dim) -> expert ids (N, k) and their weights (N, k) in x's dtype: softmax over all
        # experts in float32, top-k, renormalised to sum to 1
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

    def forward(self, x):
        shape = x.shape
        x = copy_to_model_parallel_region(x.reshape(-1, shape[-1]))  # (N, dim)
        experts, weights = self.route(x)
        # the N*k (token, slot) pairs grouped by expert: one batched SwiGLU per expert
        order = experts.flatten().argsort(stable=True)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts).tolist()
        token = order // self.top_k
        xs = x[token]  # (N*k, dim)
        w1, w2, w3 = (w.view(self.n_experts, -1, x.shape[-1]) for w in (self.w1, self.w2, self.w3))
        ys = []
        for e, xe in enumerate(xs.split(counts)):
            if xe.shape[0]:
                ys.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e])
        ys = torch.cat(ys)[order.argsort()] if ys else xs  # back in (token, slot) order
        out = (ys.view(-1, self.top_k, ys.shape[-1]) * weights[..., None]).sum(dim=1)
        return reduce_from_model_parallel_region(out).view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: SphinxConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = MoE(cfg) if cfg.variant.moe else FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, mask, slots=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, slots)
        return h + self.feed_forward(self.ffn_norm(h))


# --------------------------------------------------------------------------------------------
# Visual encoders
# --------------------------------------------------------------------------------------------


class QFormer(nn.Module):
    "BLIP-2 vision model + Q-Former + query tokens (Blip2Model without the language side)."

    def __init__(self, v: VisionConfig):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2VisionConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

        vcfg = Blip2VisionConfig(
            hidden_size=v.qf_vision_width, num_hidden_layers=v.qf_vision_layers,
            num_attention_heads=v.qf_vision_heads, intermediate_size=v.qf_vision_mlp,
            image_size=VIEW_SIZE, patch_size=v.patch_size, hidden_act="gelu", layer_norm_eps=1e-6,
            qkv_bias=True,
        )
        qcfg = Blip2QFormerConfig(
            hidden_size=v.qf_width, num_hidden_layers=v.qf_layers, num_attention_heads=v.qf_heads,
            intermediate_size=v.qf_mlp, hidden_act="gelu", layer_norm_eps=1e-12,
            cross_attention_frequency=2, encoder_hidden_size=v.qf_vision_width,
            use_qformer_text_input=False,
        )
        for c in (vcfg, qcfg):
            c._attn_implementation = "eager"
        self.vision_model = Blip2VisionModel(vcfg)
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, v.qf_queries, v.qf_width))

    def forward(self, pixel_values):
        # pixel_values: (N, 3, 224, 224) -> (N, qf_queries, qf_width)
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=query, encoder_hidden_states=image_embeds, encoder_attention_mask=mask
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def build_clip(v: VisionConfig) -> nn.Module:
    "open_clip CLIP with its text transformer removed (the text tensors stay, unused)."
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision_cfg = CLIPVisionCfg(
        layers=v.clip_layers, width=v.clip_width, head_width=v.clip_head_width,
        patch_size=v.patch_size, image_size=VIEW_SIZE, mlp_ratio=4.0,
    )
    text_cfg = CLIPTextCfg(
        context_length=77, vocab_size=v.clip_text_vocab, width=v.clip_text_width,
        heads=v.clip_text_heads, layers=1,
    )
    clip = CLIP(v.clip_embed_dim, vision_cfg, text_cfg, quick_gelu=False)
    clip.transformer = None
    return clip


def clip_encode(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x: (N, 3, 224, 224) -> (N, 1 + g*g, clip_width) (257 at patch 14); ln_post on all tokens,
    # no proj. Batch-first: attention runs over the 1 + g*g tokens of each view.
    x = visual.conv1(x)  # (N, w, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, w)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    tr = visual.transformer
    if getattr(tr, "batch_first", True):
        x = tr(x)
    else:  # open_clip < 2.26 ran sequence-first
        x = tr(x.permute(1, 0, 2)).permute(1, 0, 2)
    return visual.ln_post(x)


def build_convnext(v: VisionConfig) -> nn.Module:
    "timm ConvNeXt trunk as open_clip uses it: no pooling, no classifier, head.norm kept."
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(
        depths=v.convnext_depths, dims=v.convnext_dims, num_classes=0, global_pool="",
        conv_mlp=False, ls_init_value=1e-6,
    )


class SwiGLUFFN(nn.Module):
    "DINOv2's fused SwiGLU: w3(silu(x1) * x2) with x1, x2 = w12(x).chunk(2)."

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def build_dinov2(v: VisionConfig) -> nn.Module:
    """DINOv2 ViT-g/14 (hub `dinov2_vitg14` layout) from timm blocks, with the hub's parameter names.

    The position embedding grid is 518 // patch_size per side (37 at patch 14), interpolated to the
    view's grid at run time."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=518, patch_size=v.patch_size, embed_dim=v.dino_width, depth=v.dino_layers,
        num_heads=v.dino_heads, mlp_ratio=4.0, init_values=1.0, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    hidden = (int(v.dino_width * 4 * 2 / 3) + 7) // 8 * 8
    for blk in vit.blocks:
        blk.mlp = SwiGLUFFN(v.dino_width, hidden)
    vit.mask_token = nn.Parameter(torch.zeros(1, v.dino_width))  # stored in checkpoints, unused
    return vit


def dinov2_encode(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x: (N, 3, 224, 224) ImageNet-normalized -> (N, 1 + g*g, dino_width) = cat(cls, patches), normed
    N, _, H, W = x.shape
    p = vit.patch_embed.proj.kernel_size[0]
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N, g*g, d)
    x = torch.cat([vit.cls_token.to(x.dtype).expand(N, -1, -1), x], dim=1)
    x = x + _dinov2_pos_embed(vit.pos_embed, H // p, W // p).to(x.dtype)
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


def _dinov2_pos_embed(pos_embed: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    # DINOv2's interpolate_pos_encoding: bicubic with scale_factor (n + 0.1) / 37, antialias off.
    # `size=n` gives different numbers.
    pos = pos_embed.float()
    cls, patch = pos[:, :1], pos[:, 1:]
    m = int(math.sqrt(patch.shape[1]))
    patch = patch.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False
    )
    assert patch.shape[-2:] == (h0, w0), patch.shape
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def _fp16_resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    "Resize (N, 3, H, W) to size x size in float16 and back, as the reference (rounding included)."
    return F.interpolate(x.half(), size=(size, size), mode=mode).to(x.dtype)


def _quadrants(x: torch.Tensor) -> list[torch.Tensor]:
    "(N, 3, 2s, 2s) -> its four (N, 3, s, s) quadrants: top-left, top-right, bottom-left, -right."
    s = x.shape[-1] // 2
    return [x[..., :s, :s], x[..., :s, s:], x[..., s:, :s], x[..., s:, s:]]


def convnext_to_grid(trunk: torch.Tensor, g: int) -> torch.Tensor:
    "ConvNeXt trunk (N, C, 8, 8) -> (N, C, g, g): nearest upsampling (the reference's 16 = x2), or pooling."
    n = trunk.shape[-1]
    if g == 2 * n:  # the released SPHINX: exactly the reference's repeat_interleave(2)
        return trunk.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    if g % n == 0:
        r = g // n
        return trunk if r == 1 else trunk.repeat_interleave(r, dim=-1).repeat_interleave(r, dim=-2)
    if n % g == 0:
        return F.adaptive_avg_pool2d(trunk, g)
    raise ValueError(f"cannot bring a {n}x{n} ConvNeXt trunk to a {g}x{g} token grid")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: SphinxConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = ParallelEmbedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = ColumnParallelLinear(cfg.dim, cfg.vocab_size)

        v = cfg.vision
        self.light = cfg.variant.light  # ConvNeXt + DINOv2 only
        if not self.light:
            self.qformer = QFormer(v)
            self.clip = build_clip(v)
        self.openclip_convnext_xxl = build_convnext(v)
        self.dinov2_vitg14 = build_dinov2(v)
        fused = v.fused_width - (v.clip_width if self.light else 0)  # [clip |] convnext | dinov2
        if not self.light:
            self.qformer_proj = nn.Sequential(nn.Linear(v.qf_width, cfg.dim), nn.LayerNorm(cfg.dim))
        self.visual_proj = nn.Sequential(nn.Linear(fused, cfg.dim), nn.LayerNorm(cfg.dim))
        self.start_img = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.end_img = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.freqs_cis: torch.Tensor | None = None  # built on first use, on the weights' device

    # -- rope ----------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: (B, T) long -> (B, T, hd/2) complex64. The table covers the positions used so
        # far (doubling as they grow), up to 2 x max_seq_len: never allocated for a large
        # max_seq_len up front. Row p depends on p only, so its values do not depend on the size.
        limit = 2 * self.cfg.max_seq_len
        table = self.freqs_cis
        if table is None or table.device != positions.device or table.shape[0] < limit:
            need = int(positions.max()) + 1 if positions.numel() else 1
            if need > limit:
                raise ValueError(f"position {need - 1} is past the RoPE range of this model "
                                 f"(2 x max_seq_len = {limit} positions)")
            if table is None or table.device != positions.device or table.shape[0] < need:
                size = min(limit, max(ROPE_TABLE_MIN, 1 << (need - 1).bit_length()))
                self.freqs_cis = precompute_freqs_cis(
                    self.cfg.head_dim, size, self.cfg.rope_theta
                ).to(positions.device)
        return self.freqs_cis[positions]

    # -- image ---------------------------------------------------------------------------------
    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> ``(x, cx)``: ``x`` (V*B, 3, 224, 224) the views of the Q-Former, CLIP and
        DINOv2, ``cx`` (V*B, 3, C, C) the ConvNeXt views (C = 256 or 512), both view-major
        ([v0 of all rows, TL of all, TR, BL, BR]); each step as the reference (fp16 = resized in
        float16 and back)."""
        dt, var = images.dtype, self.cfg.variant
        if var.convnext_size == 256:  # llama_ens (224 image) and llama_ens5 (448 image)
            if var.n_views == 1:
                x = images
            else:
                x = torch.cat([_fp16_resize(images, VIEW_SIZE, "bicubic")] + _quadrants(images))
            return x, _fp16_resize(x, 256, "nearest")
        if var.n_views == 1:  # 512 image
            return _fp16_resize(images, VIEW_SIZE, "bicubic"), _fp16_resize(images, 512, "nearest")
        # 1024 image: 224 views from fp16 resizes to 224 and 448, ConvNeXt views from an fp16 resize
        # to 512 and the fp32 image's 512 quadrants
        half = _fp16_resize(images, 2 * VIEW_SIZE, "bicubic")
        x = torch.cat([_fp16_resize(images, VIEW_SIZE, "bicubic")] + _quadrants(half))
        cx = torch.cat([_fp16_resize(images, 512, "bicubic")] + _quadrants(images))
        return x.to(dt), cx.to(dt)

    def encode_views(self, x, cx: torch.Tensor | None = None) -> dict:
        # x: (N, 3, 224, 224) CLIP-normalized views (or the pair ``views`` returns); cx: the
        # ConvNeXt views (N, 3, C, C), by default nearest fp16 of x to 256 -> per-encoder
        # features; g = 224 // patch_size (16 for the released SPHINX), Q = qf_queries (32)
        if isinstance(x, tuple):
            x, cx = x
        if cx is None:
            cx = _fp16_resize(x, 256, "nearest")
        dt = x.dtype
        f = {}
        if not self.light:
            f["qformer"] = self.qformer(x)  # (N, Q, qf_width)
            f["clip"] = clip_encode(self.clip.visual, x)  # (N, 1 + g*g, clip_width)
        trunk = self.openclip_convnext_xxl(cx)  # (N, C, 8, 8) from 256, (N, C, 16, 16) from 512
        t = convnext_to_grid(trunk, self.cfg.vision.grid)  # (N, C, g, g)
        t = t.flatten(2).transpose(1, 2)  # (N, g*g, C)
        f["convnext_trunk"] = trunk
        f["convnext"] = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)  # (N, 1 + g*g, C)
        mean = torch.tensor(CLIP_MEAN, dtype=dt, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=dt, device=x.device).view(1, 3, 1, 1)
        im_mean = torch.tensor(IMAGENET_MEAN, dtype=dt, device=x.device).view(1, 3, 1, 1)
        im_std = torch.tensor(IMAGENET_STD, dtype=dt, device=x.device).view(1, 3, 1, 1)
        if self.light:  # the light files factor the re-normalisation (not bit-identical)
            dino_in = x * (std / im_std) + (mean - im_mean) / im_std
        else:
            dino_in = (x * std + mean - im_mean) / im_std
        f["dinov2"] = dinov2_encode(self.dinov2_vitg14, dino_in)
        return f

    @property
    def fused_parts(self) -> tuple[str, ...]:
        "The encode_views features a fused token concatenates, in visual_proj's column order."
        return ("convnext", "dinov2") if self.light else ("clip", "convnext", "dinov2")

    def fused_tokens(self, f: dict) -> torch.Tensor:
        # encode_views features -> (N, 1 + g*g, dim): [CLIP +] ConvNeXt + DINOv2, projected
        return self.visual_proj(torch.cat([f[n] for n in self.fused_parts], dim=-1))

    def view_tokens(self, x, cx: torch.Tensor | None = None) -> torch.Tensor:
        # views -> (N, Q + 1 + g*g, dim): 289 tokens a view for the released (257 when light)
        f = self.encode_views(x, cx)
        if self.light:
            return self.fused_tokens(f)
        q = self.qformer_proj(f["qformer"])  # (N, Q, dim)
        return torch.cat([q, self.fused_tokens(f)], dim=1)

    def _shared_view_tokens(self, x: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        """:meth:`view_tokens` with the views shared out over the model-parallel ranks.

        The encoders are replicated on every rank (as in the reference), so each rank encodes
        its slice of the views and an all-gather gives every rank all of them: the encoder work
        is divided by the model-parallel size instead of repeated. Inference only (all_gather has
        no backward); with gradients, or one rank, every rank encodes every view."""
        mp = fs_init.get_model_parallel_world_size()
        n = x.shape[0]
        if mp == 1 or n < 2 or torch.is_grad_enabled():
            return self.view_tokens(x, cx)
        per = -(-n // mp)
        rank = fs_init.get_model_parallel_rank()
        # the last ranks may have fewer (or no) views: they repeat the last one so shapes match
        idx = torch.arange(rank * per, (rank + 1) * per, device=x.device).clamp(max=n - 1)
        mine = self.view_tokens(x[idx], cx[idx]).contiguous()
        parts = [torch.empty_like(mine) for _ in range(mp)]
        torch.distributed.all_gather(parts, mine, group=fs_init.get_model_parallel_group())
        return torch.cat(parts, dim=0)[:n]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, S, S) -> (B, image_tokens, dim) including start/end tokens
        B = images.shape[0]
        tokens = self._shared_view_tokens(*self.views(images))  # (V*B, Q + 1 + g*g, dim)
        start = self.start_img.expand(B, -1, -1).to(tokens.dtype)
        end = self.end_img.expand(B, -1, -1).to(tokens.dtype)
        parts = []
        for view in tokens.chunk(self.cfg.n_views, dim=0):  # each (B, Q + 1 + g*g, dim)
            parts += [start, view, end]
        return torch.cat(parts, dim=1)

    # -- text ----------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        # tokens: (B, T) with BOS first; image_tokens: (B, I, dim) -> (B, T + I, dim)
        h = self.tok_embeddings(tokens)
        if image_tokens is None:
            return h
        return torch.cat([h[:, :1], image_tokens.to(h.dtype), h[:, 1:]], dim=1)

    def forward(self, h, positions, mask=None, slots=None, last_only=False, keep_last: int = 0):
        # h: (B, T, dim) embeddings; positions: (B, T) RoPE positions -> logits (B, T', V) fp32
        # for all T positions, only the last (last_only), or the last `keep_last` (text) ones
        freqs = self.rope(positions)
        for layer in self.layers:
            h = layer(h, freqs, mask, slots)
        if last_only:
            h = h[:, -1:]
        elif keep_last:
            h = h[:, -keep_last:]
        return self.output(self.norm(h)).float()

    # -- caches --------------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int):
        p = self.output.weight
        for layer in self.layers:
            a = layer.attention
            c = a.kv_cache
            if c is None or c.k.shape[0] != batch or c.k.shape[2] < max_len or c.k.dtype != p.dtype:
                a.kv_cache = KVCache(batch, max_len, a.n_local_kv_heads, a.head_dim, p.dtype, p.device)

    def select_caches(self, index: torch.Tensor):
        "Re-batch every layer's cache: row i becomes a copy of old row index[i]."
        for layer in self.layers:
            c = layer.attention.kv_cache
            c.k = c.k.index_select(0, index)
            c.v = c.v.index_select(0, index)

    def cache_len(self) -> int:
        c = self.layers[0].attention.kv_cache
        return 0 if c is None else c.k.shape[2]

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64 (end, dim/2)


def apply_rotary_emb(xq, xk, freqs_cis):
    # xq: (B, T, nh, hd); freqs_cis: (B, T, hd/2)
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis.unsqueeze(2)
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


# Model-parallel split dim of each LLaMA tensor (checkpoint key suffix -> dim); everything else
# (all vision tensors included) is replicated.
# MoE expert tensors (no .weight suffix) split on dim 0, but per expert (see mp_split_rule).
_PER_EXPERT = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_SPLIT_DIMS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1,
    **dict.fromkeys(_PER_EXPERT, 0),
}


def mp_split_dim(name: str) -> int:
    "The model-parallel split dim of a parameter (-1: replicated)."
    if name.startswith(("qformer.", "clip.", "openclip_convnext_xxl.", "dinov2_vitg14.")):
        return -1
    for suffix, d in _SPLIT_DIMS.items():
        if name == suffix or name.endswith("." + suffix):
            return d
    return -1


def mp_split_rule(name: str) -> str:
    """How a parameter is split over model-parallel ranks: ``"replicated"``, ``"contiguous"``
    (one contiguous chunk per rank along :func:`mp_split_dim`), or ``"per_expert"`` (an MoE expert
    tensor (E*H, dim): viewed as (E, H, dim), each expert's H rows are chunked, rank r gets part r
    of every expert)."""
    if mp_split_dim(name) < 0:
        return "replicated"
    if name.endswith(_PER_EXPERT):
        return "per_expert"
    return "contiguous"
