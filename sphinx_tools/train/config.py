"""The training config: every key of the YAML that ``sphinx-tools train`` reads, its default and
its check.

:meth:`TrainConfig.load` reads the YAML and resolves its paths against the YAML's folder; a
config built in Python is checked the same way when it is made (:meth:`TrainConfig.check`). The
checks that need the model (an auxiliary loss's layer) are in :meth:`TrainConfig.check_model`.

Example::

    init: {checkpoint: path/to/ckpt}          # or {preset: tiny, tokenizer: path, seed: 0}
    data:
      - {path: data/synth/conversations.json, root: data/synth, ratio: 1.0,
         independent_turns: true}             # each Q/A a one-turn prompt (tokenize_independent)
    out: runs/demo
    train: [llm, proj, tokens, encoders]
    steps: 2000
    batch_size: 8
    grad_accum: 1
    lr: 1.0e-3
    min_lr: 1.0e-5
    warmup: 100
    weight_decay: 0.0
    clip: 1.0
    dtype: fp32                                 # or bf16 (autocast)
    device: auto                                # cuda:LOCAL_RANK when CUDA is there, else cpu
    model_parallel: 1                           # under torchrun; the rest is data parallel
    encoder_warmup: {coco: data/synth/coco.json, images: data/synth/images, steps: 600}
                                                # optional: dense encoder training first (warmup.py)
    coordinate_weight: 1.0                      # loss weight of the "0.41"-style coordinate tokens
    token_position: {coco: data/synth/coco.json, images: data/synth/images, layer: 1, weight: 10.0}
                                                # optional: auxiliary loss (losses.TokenPlaces);
                                                # images default to the json's folder
    object_pointer: {layer: 3, weight: 1.0, width: 32}
                                                # optional, with token_position: auxiliary loss
                                                # (losses.pointer_loss)
    object_attention: {layer: 3, question_layer: 1, head: 0, weight: 1.0, boxes: first}
                                                # optional, with token_position: auxiliary loss
                                                # (losses.ObjectAttention)
    loader_workers: 0                           # processes preparing the next batches
    save_every: 500
    log_every: 20
    seed: 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SphinxToolsError

# trainable parts (``train:``) -> the parameter name prefixes each one covers
PARTS = {
    "llm": ("tok_embeddings.", "layers.", "norm.", "output."),
    "proj": ("qformer_proj.", "visual_proj."),
    "tokens": ("start_img", "end_img"),
    "encoders": ("qformer.", "clip.", "openclip_convnext_xxl.", "dinov2_vitg14."),
}
REQUIRED = ("init", "data", "out")
DTYPES = ("fp32", "bf16")

# ``encoder_warmup:`` (see warmup.py); ``coco`` is required, ``images`` defaults to its folder
WARMUP_DEFAULTS = {"steps": 600, "batch_size": 4, "lr": 2e-3, "warmup": 50, "sub": 4, "seed": 0,
                   "categories": None, "position": False, "attributes": None, "read": None,
                   "read_weight": 1.0, "read_branch": None}
WARMUP_KEYS = {"coco", "images", *WARMUP_DEFAULTS}
READ_BRANCHES = ("clip", "convnext", "dinov2")  # encoders of a fused token (Transformer.fused_parts)

# ``token_position:`` (see losses.TokenPlaces); ``coco`` is required, ``images`` defaults to its
# folder
TOKEN_POSITION_DEFAULTS = {"layer": 1, "weight": 10.0}
# ``object_pointer:`` (see losses.pointer_loss); needs ``token_position`` (its patch boxes)
OBJECT_POINTER_DEFAULTS = {"layer": 2, "weight": 1.0, "width": 32}
# ``object_attention:`` (see losses.ObjectAttention); needs ``token_position`` (its patch boxes)
# ``boxes``: "first" trains the object hop from each answer's first coordinate, "every" from both
# corners of each of its boxes, "named" from those and from the text that names each box (the
# answer since the previous box: an OCR word, a class name)
OBJECT_ATTENTION_DEFAULTS = {"layer": 3, "question_layer": None, "head": 0, "weight": 1.0,
                             "boxes": "first"}
OBJECT_ATTENTION_BOXES = ("first", "every", "named")


@dataclass
class TrainConfig:
    init: dict  # {checkpoint: DIR} or {preset, tokenizer, seed, overrides}
    data: list  # [{path, root, ratio, independent_turns}, ...]
    out: str
    train: list = field(default_factory=lambda: ["llm", "proj", "tokens"])  # keys of PARTS
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    dtype: str = "fp32"  # or "bf16" (autocast)
    save_every: int = 500
    log_every: int = 20
    max_len: int = 512
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"  # "auto" (this process's GPU, else the CPU), "cpu", "cuda", "cuda:N"
    model_parallel: int = 1  # under torchrun: model-parallel size; the rest is data parallel
    max_minutes: float | None = None  # safety stop: save and end after this much wall time
    encoder_warmup: dict | None = None  # dense encoder training first (warmup.py; WARMUP_DEFAULTS)
    # loss weight of the coordinate tokens ("0.41" as one piece, tiny.COORDINATE_PIECES) relative
    # to the other answer tokens; 1 is the plain mean (a tokenizer without them: no effect)
    coordinate_weight: float = 1.0
    # processes that read and preprocess the next batches while the model trains (0: in the
    # training loop); the batches and their order are the same either way
    loader_workers: int = 0
    # auxiliary loss: each image patch token's hidden state after LLM layer ``layer`` predicts
    # where its object is in the whole image (losses.TokenPlaces); {coco, images, layer, weight}
    token_position: dict | None = None
    # auxiliary loss: before the first coordinate of each answer, the hidden state after LLM layer
    # ``layer`` points at the patch tokens of the object whose box follows (losses.pointer_loss);
    # {layer, weight, width}; needs token_position
    object_pointer: dict | None = None
    # auxiliary loss: head ``head`` of LLM layer ``layer`` attends, from the hidden state that
    # predicts each answer's first coordinate, to the object's patch tokens; with
    # ``question_layer``, that layer's head to the question's referring expression
    # (losses.ObjectAttention); {layer, question_layer, head, weight}; needs token_position
    object_attention: dict | None = None

    def __post_init__(self):
        self.check()

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """Read a training YAML; its paths are resolved against the YAML's folder.

        Raises:
            SphinxToolsError: naming the file and the key, for an unreadable file, an unknown or
                missing key, or a value its check refuses.
        """
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SphinxToolsError(f"cannot read training config {path}: {e}") from None
        if not isinstance(raw, dict):
            raise SphinxToolsError(f"training config {path} must be a mapping")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise SphinxToolsError(f"unknown keys in {path}: {sorted(unknown)}")
        for key in REQUIRED:
            if key not in raw:
                raise SphinxToolsError(f"training config {path} needs `{key}`")
        base = path.parent
        raw["out"] = str((base / raw["out"]).resolve())
        for d in raw["data"]:
            d["path"] = str((base / d["path"]).resolve())
            d["root"] = str((base / d.get("root", Path(d["path"]).parent)).resolve())
        for k in ("checkpoint", "tokenizer"):
            if k in raw["init"]:
                raw["init"][k] = str((base / raw["init"][k]).resolve())
        if raw.get("encoder_warmup") is not None:
            raw["encoder_warmup"] = check_encoder_warmup(raw["encoder_warmup"], base)
        if raw.get("token_position") is not None:
            raw["token_position"] = check_token_position(raw["token_position"], base)
        return cls(**raw)

    def check(self):
        """Check every key (relative paths of the auxiliary specs resolve against the working
        folder); defaults of the auxiliary specs are filled in.

        Raises:
            SphinxToolsError: naming the key and its bad value.
        """
        bad = set(self.train) - set(PARTS)
        if bad:
            raise SphinxToolsError(f"unknown trainable parts {sorted(bad)}; known: {sorted(PARTS)}")
        if self.dtype not in DTYPES:
            raise SphinxToolsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not _number(self.coordinate_weight) or self.coordinate_weight <= 0:
            raise SphinxToolsError(f"coordinate_weight must be positive, "
                                   f"got {self.coordinate_weight!r}")
        if self.encoder_warmup is not None:
            self.encoder_warmup = check_encoder_warmup(self.encoder_warmup, Path("."))
        if self.token_position is not None:
            self.token_position = check_token_position(self.token_position, Path("."))
        if self.object_pointer is not None:
            self.object_pointer = check_object_pointer(self.object_pointer)
            if self.token_position is None:
                raise SphinxToolsError("object_pointer needs token_position (the boxes of the "
                                       "objects under the patches)")
        if self.object_attention is not None:
            self.object_attention = check_object_attention(self.object_attention)
            if self.token_position is None:
                raise SphinxToolsError("object_attention needs token_position (the boxes of the "
                                       "objects under the patches)")
            if self.model_parallel != 1:
                raise SphinxToolsError("object_attention trains one head of the whole model: it "
                                       f"needs model_parallel 1, got {self.model_parallel}")

    def check_model(self, n_layers: int, n_heads: int | None = None):
        "Check the keys that depend on the model: an auxiliary loss's layer (and head) must exist."
        if self.token_position and self.token_position["layer"] >= n_layers:
            raise SphinxToolsError(f"token_position.layer {self.token_position['layer']} is past "
                                   f"the model's {n_layers} layers")
        if self.object_pointer and self.object_pointer["layer"] >= n_layers:
            raise SphinxToolsError(f"object_pointer.layer {self.object_pointer['layer']} is past "
                                   f"the model's {n_layers} layers")
        oa = self.object_attention
        for key in ("layer", "question_layer") if oa else ():
            if oa[key] is not None and oa[key] >= n_layers:
                raise SphinxToolsError(f"object_attention.{key} {oa[key]} is past the model's "
                                       f"{n_layers} layers")
        if oa and n_heads is not None and oa["head"] >= n_heads:
            raise SphinxToolsError(f"object_attention.head {oa['head']} is past the model's "
                                   f"{n_heads} heads")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_encoder_warmup(spec, base: Path) -> dict:
    "Validate an ``encoder_warmup`` mapping; paths resolved against ``base``; defaults filled."
    if not isinstance(spec, dict):
        raise SphinxToolsError(f"encoder_warmup must be a mapping, got {spec!r}")
    unknown = set(spec) - WARMUP_KEYS
    if unknown:
        raise SphinxToolsError(f"unknown encoder_warmup keys {sorted(unknown)}; "
                               f"known: {sorted(WARMUP_KEYS)}")
    if "coco" not in spec:
        raise SphinxToolsError("encoder_warmup needs `coco` (a COCO json with boxes)")
    out = {**WARMUP_DEFAULTS, **spec}
    out["coco"] = str((base / out["coco"]).resolve())
    out["images"] = str((base / out.get("images", Path(out["coco"]).parent)).resolve())
    cats = out["categories"]
    if cats is not None and (not isinstance(cats, list) or not cats
                             or not all(isinstance(c, str) for c in cats)):
        raise SphinxToolsError(f"encoder_warmup.categories must be a non-empty list of names, "
                               f"got {cats!r}")
    attrs = out["attributes"]
    if attrs is not None and (not isinstance(attrs, list)
                              or not all(isinstance(a, str) and a for a in attrs)):
        raise SphinxToolsError(f"encoder_warmup.attributes must be a list of annotation keys, "
                               f"got {attrs!r}")
    if out["read"] is not None and (not isinstance(out["read"], str) or not out["read"]):
        raise SphinxToolsError(f"encoder_warmup.read must be an annotation key (e.g. text), "
                               f"got {out['read']!r}")
    if not _number(out["read_weight"]) or not out["read_weight"] > 0:
        raise SphinxToolsError(f"encoder_warmup.read_weight must be a positive number, "
                               f"got {out['read_weight']!r}")
    if out["read_branch"] is not None:
        if out["read_branch"] not in READ_BRANCHES:
            raise SphinxToolsError(f"encoder_warmup.read_branch must be one of {', '.join(READ_BRANCHES)}, "
                                   f"got {out['read_branch']!r}")
        if out["read"] is None:
            raise SphinxToolsError("encoder_warmup.read_branch needs encoder_warmup.read (what that encoder reads)")
    if not isinstance(out["position"], bool):
        raise SphinxToolsError(f"encoder_warmup.position must be true or false, "
                               f"got {out['position']!r}")
    for key in ("steps", "batch_size", "sub"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise SphinxToolsError(f"encoder_warmup.{key} must be a positive integer, "
                                   f"got {out[key]!r}")
    return out


def check_token_position(spec, base: Path) -> dict:
    "The ``token_position`` config, paths resolved against ``base``; a clear error if malformed."
    if not isinstance(spec, dict):
        raise SphinxToolsError(f"token_position must be a mapping, got {spec!r}")
    unknown = set(spec) - {"coco", "images", *TOKEN_POSITION_DEFAULTS}
    if unknown or "coco" not in spec:
        raise SphinxToolsError(f"token_position needs coco (and optionally images, layer, weight); "
                               f"got keys {sorted(spec)}")
    out = {**TOKEN_POSITION_DEFAULTS, **spec}
    layer, weight = out["layer"], out["weight"]
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise SphinxToolsError(f"token_position.layer must be an int >= 0, got {layer!r}")
    if not _number(weight) or weight <= 0:
        raise SphinxToolsError(f"token_position.weight must be positive, got {weight!r}")
    out["coco"] = str((base / out["coco"]).resolve())
    out["images"] = str((base / out.get("images", Path(out["coco"]).parent)).resolve())
    return out


def _loss_spec(name: str, spec, defaults: dict, minimum: dict) -> dict:
    """An auxiliary loss's config with its ``defaults``: a mapping of known keys, each key of
    ``minimum`` an int at least that (None where its default is None), a positive ``weight``."""
    if not isinstance(spec, dict):
        raise SphinxToolsError(f"{name} must be a mapping, got {spec!r}")
    unknown = set(spec) - set(defaults)
    if unknown:
        raise SphinxToolsError(f"unknown {name} keys {sorted(unknown)}; known: {sorted(defaults)}")
    out = {**defaults, **spec}
    for key, least in minimum.items():
        value = out[key]
        if value is None and defaults[key] is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SphinxToolsError(f"{name}.{key} must be an int >= {least}, got {value!r}")
    if not _number(out["weight"]) or out["weight"] <= 0:
        raise SphinxToolsError(f"{name}.weight must be positive, got {out['weight']!r}")
    return out


def check_object_pointer(spec) -> dict:
    "The ``object_pointer`` config with its defaults; a clear error if malformed."
    return _loss_spec("object_pointer", spec, OBJECT_POINTER_DEFAULTS, {"layer": 0, "width": 1})


def check_object_attention(spec) -> dict:
    "The ``object_attention`` config with its defaults; a clear error if malformed."
    out = _loss_spec("object_attention", spec, OBJECT_ATTENTION_DEFAULTS,
                     {"layer": 0, "question_layer": 0, "head": 0})
    if out["boxes"] not in OBJECT_ATTENTION_BOXES:
        raise SphinxToolsError("object_attention.boxes must be one of "
                               f"{list(OBJECT_ATTENTION_BOXES)}, got {out['boxes']!r}")
    return out
