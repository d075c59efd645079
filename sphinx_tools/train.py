"""Finetuning SPHINX on LLaMA2-Accessory conversation data (``sphinx-tools train CONFIG``).

Data: JSON lists of ``{"image": path, "conversations": [{"from": "human", "value": q},
{"from": "gpt", "value": a}, ...]}``, several datasets mixed by ratios in a YAML config. Prompts
use the same conversation template and image preprocessing as inference; the loss covers the
assistant tokens only (each answer plus the ``"\\n###"`` that ends it, so the model learns to stop).
A dataset marked ``independent_turns`` trains each question of a record as its own one-turn
prompt about the image (packed with a block attention mask: one image encoding, no leaks between
questions), which is what task prompts look like at inference.

Optional auxiliary losses: ``token_position`` (:class:`TokenPlaces`) teaches the LLM's first
layers where each image patch token's object lies in the whole image; ``box_attention``
(:func:`box_attention_loss`) teaches one attention head to look at the object an answer's box
names.

Optimizer AdamW with linear warmup + cosine decay, gradient clipping and accumulation, fp32 or bf16
autocast; which parts train is chosen per group (``llm``, ``proj``, ``tokens``, ``encoders``). It
runs on each process's GPU when there is one (``device: auto``; under torchrun the one of its
``LOCAL_RANK``, with NCCL) and on the CPU otherwise (gloo).
Checkpoints are saved in the released consolidated format (loadable by ``from_pretrained``) with
a ``train_state.pt`` beside them (tensors and plain values only, read back with
``weights_only=True``); a re-run resumes from it. Under ``torchrun`` (or
``train_local`` / ``sphinx-tools train --procs N`` on one machine) each ``model_parallel``
processes form a model-parallel group of the runtime and the rest of the world is data parallel:
every rank takes its share of each batch and the gradients are averaged, so N ranks of
``batch_size`` B train as one process with ``batch_size`` B and ``grad_accum`` N.

Config example::

    init: {checkpoint: path/to/ckpt}          # or {preset: tiny, tokenizer: path, seed: 0}
    data:
      - {path: data/synth/conversations.json, root: data/synth, ratio: 1.0,
         independent_turns: true}             # each Q/A a one-turn prompt (see tokenize_independent)
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
    model_parallel: 1                           # under torchrun; the rest of the world is data parallel
    encoder_warmup: {coco: data/synth/coco.json, images: data/synth/images, steps: 600}
                                                # optional: dense encoder training first (warmup.py)
    coordinate_weight: 1.0                      # loss weight of the "0.41"-style coordinate tokens
    token_position: {coco: data/synth/coco.json, images: data/synth/images, layer: 1, weight: 10.0}
                                                # optional: auxiliary loss (TokenPlaces); images
                                                # default to the json's folder
    box_attention: {layer: 2, weight: 1.0}      # optional: auxiliary loss (box_attention_loss)
    loader_workers: 0                           # processes preparing the next batches (GPU runs: 4-16)
    save_every: 500
    log_every: 20
    seed: 0
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from . import dist
from .conversation import SYSTEM
from .errors import SphinxToolsError
from .model import SphinxConfig, Transformer
from .tokenizer import Tokenizer
from .transforms import PaddedResize

PARTS = {
    "llm": ("tok_embeddings.", "layers.", "norm.", "output."),
    "proj": ("qformer_proj.", "visual_proj."),
    "tokens": ("start_img", "end_img"),
    "encoders": ("qformer.", "clip.", "openclip_convnext_xxl.", "dinov2_vitg14."),
}
IGNORE = -100


@dataclass
class TrainConfig:
    init: dict
    data: list
    out: str
    train: list = field(default_factory=lambda: ["llm", "proj", "tokens"])
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    dtype: str = "fp32"
    save_every: int = 500
    log_every: int = 20
    max_len: int = 512
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"  # "auto" (this process's GPU, else the CPU), "cpu", "cuda", "cuda:N"
    model_parallel: int = 1  # under torchrun: model-parallel size; the rest of the world is data parallel
    max_minutes: float | None = None  # safety stop: save and end after this much wall time
    encoder_warmup: dict | None = None  # dense encoder training first (sphinx_tools.warmup)
    # loss weight of the coordinate tokens ("0.41" as one piece, tiny.COORDINATE_PIECES) relative
    # to the other answer tokens; 1 is the plain mean (a tokenizer without them: no effect)
    coordinate_weight: float = 1.0
    # processes that read and preprocess the next batches while the model trains (0: in the
    # training loop); the batches and their order are the same either way
    loader_workers: int = 0
    # auxiliary loss: each image patch token's hidden state after LLM layer ``layer`` predicts
    # where its object is in the whole image (see TokenPlaces); {coco, images, layer, weight}
    token_position: dict | None = None
    # auxiliary loss: where an answer starts with a box, one attention head of LLM layer ``layer``
    # attends to the image patches inside that box (see box_attention_loss); {layer, weight}
    box_attention: dict | None = None

    @classmethod
    def load(cls, path) -> "TrainConfig":
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
        for key in ("init", "data", "out"):
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
            from .warmup import check_config

            raw["encoder_warmup"] = check_config(raw["encoder_warmup"], base)
        if raw.get("token_position") is not None:
            raw["token_position"] = check_token_position(raw["token_position"], base)
        if raw.get("box_attention") is not None:
            raw["box_attention"] = check_box_attention(raw["box_attention"])
        bad = set(raw.get("train", [])) - set(PARTS)
        if bad:
            raise SphinxToolsError(f"unknown trainable parts {sorted(bad)}; known: {sorted(PARTS)}")
        return cls(**raw)


# -- data --------------------------------------------------------------------------------------


def conversation_text(conversations: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The training text of a conversation and the character spans the loss covers.

    The text is what ``conversation.build_prompt`` builds, with every answer filled in. Each loss
    span is ``" {answer}\n###"``: exactly what inference generates before it stops.
    """
    turns = list(conversations)
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"a conversation needs human/gpt pairs, got {len(turns)} turns")
    text, spans = SYSTEM + "\n\n", []
    for q, a in zip(turns[::2], turns[1::2]):
        if q.get("from") != "human" or a.get("from") != "gpt":
            raise ValueError(f"turns must alternate human/gpt, got {q.get('from')}/{a.get('from')}")
        question = str(q["value"]).replace("<image>", "").strip()
        text += f"### Human: {question}\n### Assistant:"
        start = len(text)
        text += f" {str(a['value']).strip()}\n"
        spans.append((start, len(text) + 3))  # + the "###" that follows: the end signal
    return text + "###", spans


def tokenize_conversation(tok: Tokenizer, conversations: list[dict]) -> tuple[list[int], list[int]]:
    "Token ids (BOS first) and labels (IGNORE outside the assistant spans)."
    text, spans = conversation_text(conversations)
    byte_spans = [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in spans]
    ids, labels = [tok.bos_id], [IGNORE]
    for piece_id, begin in _pieces_with_offsets(tok, text):
        ids.append(piece_id)
        inside = any(a <= begin < b for a, b in byte_spans)
        labels.append(piece_id if inside else IGNORE)
    return ids, labels


def tokenize_independent(tok: Tokenizer, conversations: list[dict], max_len: int | None = None):
    """Every question/answer pair of a record as its own one-turn conversation, packed.

    Returns ``(ids, labels, segments)``: the tokens all the one-turn texts share (BOS, system
    prompt; segment 0) once, then each turn's remaining tokens (segments 1, 2, ...). Under the
    attention mask of :func:`packed_mask` and the positions of :func:`packed_positions` each turn
    sees exactly what a one-turn prompt sees at inference (the image, the system prompt, its own
    question), so one image encoding serves all of a scene's questions with no leak between them.
    Turns that would pass ``max_len`` are dropped whole.
    """
    turns = list(conversations)
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"a conversation needs human/gpt pairs, got {len(turns)} turns")
    singles = [tokenize_conversation(tok, turns[k:k + 2]) for k in range(0, len(turns), 2)]
    shortest = min(len(ids) for ids, _ in singles)
    n = 0  # longest common prefix, leaving every turn at least one token of its own
    while n < shortest - 1 and all(ids[n] == singles[0][0][n] for ids, _ in singles):
        n += 1
    ids, labels = list(singles[0][0][:n]), list(singles[0][1][:n])
    segments = [0] * n
    for k, (t_ids, t_labels) in enumerate(singles, start=1):
        if max_len is not None and len(ids) + len(t_ids) - n > max_len:
            continue
        ids += t_ids[n:]
        labels += t_labels[n:]
        segments += [k] * (len(t_ids) - n)
    return ids, labels, segments


def packed_positions(segments: torch.Tensor, n_image: int) -> torch.Tensor:
    """RoPE positions of a packed sequence: (B, T) text segments -> (B, T + n_image) positions.

    The shared prefix counts up from 0 (BOS, then the image tokens, then its text); each turn
    restarts right after the prefix, as a one-turn prompt would.
    """
    shared = segments == 0
    prefix = shared.sum(dim=1, keepdim=True)  # (B, 1) text tokens in the prefix, BOS included
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    # index of each token inside its own run of equal segment ids
    starts = torch.ones_like(shared)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    run_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    text = torch.where(shared, idx, prefix + idx - run_start)
    text = text + n_image * (text > 0)  # the image sits right after BOS
    image = torch.arange(1, n_image + 1, device=segments.device).expand(segments.shape[0], -1)
    return torch.cat([text[:, :1], image, text[:, 1:]], dim=1)


def packed_mask(segments: torch.Tensor, n_image: int) -> torch.Tensor:
    "(B, T) text segments -> (B, 1, L, L) bool: causal, and a turn sees only the prefix and itself."
    B = segments.shape[0]
    seg = torch.cat([segments[:, :1], segments.new_zeros(B, n_image), segments[:, 1:]], dim=1)
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return (causal & visible)[:, None]


def _pieces_with_offsets(tok: Tokenizer, text: str) -> list[tuple[int, int]]:
    "(id, UTF-8 byte offset in text where the piece starts) for each SentencePiece piece."
    sp = tok.sp
    ids = sp.encode(text)
    dummy = sp.id_to_piece(ids[0]).startswith("\u2581") and not text.startswith(" ") if ids else False
    pos, out = -1 if dummy else 0, []
    for i in ids:
        out.append((i, max(pos, 0)))
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            pos += 1
        elif sp.is_control(i) or sp.is_unknown(i):
            pos += 0 if sp.is_control(i) else 1
        else:
            pos += len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class ConversationData:
    "Datasets mixed by ratio; each epoch is a seeded shuffle of (dataset, item) pairs."

    def __init__(self, specs: list[dict], tok: Tokenizer, image_size: int, max_len: int, seed: int,
                 places: "TokenPlaces | None" = None):
        self.tok, self.max_len, self.places = tok, max_len, places
        self.transform = PaddedResize(image_size)
        self.sets = []
        for s in specs:
            path = Path(s["path"])
            try:
                items = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise SphinxToolsError(f"cannot read dataset {path}: {e}") from None
            if not isinstance(items, list) or not items:
                raise SphinxToolsError(f"dataset {path} must be a non-empty JSON list")
            self.sets.append((items, Path(s.get("root", path.parent)), float(s.get("ratio", 1.0)),
                              bool(s.get("independent_turns", False))))
        self.seed = seed

    def epoch(self, epoch: int) -> list[tuple[int, int]]:
        rng = random.Random(self.seed * 1000003 + epoch)
        order = []
        for d, (items, _, ratio, _) in enumerate(self.sets):
            n = max(1, round(ratio * len(items)))
            idx = list(range(len(items))) * (n // len(items)) + rng.sample(range(len(items)), n % len(items))
            order += [(d, i) for i in idx]
        rng.shuffle(order)
        return order

    def example(self, d: int, i: int) -> dict:
        from PIL import Image

        items, root, _, independent = self.sets[d]
        item = items[i]
        if independent:
            ids, labels, segments = tokenize_independent(self.tok, item["conversations"], self.max_len)
        else:
            ids, labels = tokenize_conversation(self.tok, item["conversations"])
            ids, labels = ids[: self.max_len], labels[: self.max_len]
            segments = [0] * len(ids)
        image = places = None
        if item.get("image"):
            with Image.open(root / item["image"]) as im:
                image = self.transform.apply_image(im)
            if self.places is not None:
                places = self.places.targets(root / item["image"])
        return {"ids": ids, "labels": labels, "segments": segments, "image": image, "places": places}


class _Positions(torch.utils.data.IterableDataset):
    """This data-parallel rank's examples from ``(epoch, pos)`` on, across epochs, without end.

    Yields ``(example, (epoch, pos))``: the position just after the example, so a checkpoint
    written after a batch resumes at the next one. Loader workers take whole batches in turn
    (the loader batches each worker's examples and interleaves the workers in order), so the
    batches are the same with any number of workers."""

    def __init__(self, data: ConversationData, epoch: int, pos: int, dp: int, dpw: int, batch_size: int):
        self.data, self.start, self.dp, self.dpw, self.bs = data, (epoch, pos), dp, dpw, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch, pos = self.start
        order, k = self.data.epoch(epoch), 0
        while True:
            if pos >= len(order):
                epoch, pos = epoch + 1, 0
                order = self.data.epoch(epoch)
            d, i = order[pos]
            pos += 1
            if (pos - 1) % self.dpw == self.dp:
                if (k // self.bs) % nw == wid:
                    yield self.data.example(d, i), (epoch, pos)
                k += 1


def batches(data: ConversationData, batch_size: int, epoch: int, pos: int, workers: int = 0,
            pin: bool = False, rank: int = 0, world: int = 1):
    """Batches of data-parallel ``rank``'s examples from ``(epoch, pos)``: ``(collated tensors,
    (epoch, pos))`` where the position is the one after the batch. ``workers`` processes prepare
    them ahead."""
    def collate_with_position(items):
        return collate([e for e, _ in items]), items[-1][1]

    return iter(torch.utils.data.DataLoader(
        _Positions(data, epoch, pos, rank, world, batch_size), batch_size=batch_size,
        collate_fn=collate_with_position, num_workers=workers, pin_memory=pin,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator()))  # its own: the loader's seed draw leaves the training RNG alone


def collate(examples: list[dict], pad_id: int = 0):
    """Pad a batch: ``(ids, labels, images or None, segments or None, places or None)``.

    ``segments`` is given only when some example is packed (independent turns); padding gets
    segment -1 (it sees the prefix and itself, and carries no loss). ``places``: the examples'
    :meth:`TokenPlaces.targets`, when every example has them.
    """
    T = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    segments = torch.full((len(examples), T), -1, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e["ids"])] = torch.tensor(e["ids"])
        labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
        segments[r, : len(e["ids"])] = torch.tensor(e.get("segments") or [0] * len(e["ids"]))
    segments = segments if bool((segments > 0).any()) else None
    places = [e.get("places") for e in examples]
    places = torch.stack(places) if all(p is not None for p in places) else None
    images = [e["image"] for e in examples]
    if all(im is not None for im in images):
        return ids, labels, torch.stack(images), segments, places
    if any(im is not None for im in images):
        raise SphinxToolsError("a batch mixes examples with and without images; use batch_size 1")
    return ids, labels, None, segments, None


# -- auxiliary position loss -------------------------------------------------------------------

TOKEN_POSITION_DEFAULTS = {"layer": 1, "weight": 10.0}


def _check_layer_and_weight(name: str, spec: dict) -> dict:
    "An auxiliary loss's ``layer`` (an int >= 0) and ``weight`` (positive); a clear error otherwise."
    if not isinstance(spec["layer"], int) or isinstance(spec["layer"], bool) or spec["layer"] < 0:
        raise SphinxToolsError(f"{name}.layer must be an int >= 0, got {spec['layer']!r}")
    if not isinstance(spec["weight"], (int, float)) or isinstance(spec["weight"], bool) or spec["weight"] <= 0:
        raise SphinxToolsError(f"{name}.weight must be positive, got {spec['weight']!r}")
    return spec


def check_token_position(spec, base: Path) -> dict:
    "The ``token_position`` config with paths resolved against ``base``; a clear error if malformed."
    if not isinstance(spec, dict):
        raise SphinxToolsError(f"token_position must be a mapping, got {spec!r}")
    unknown = set(spec) - {"coco", "images", *TOKEN_POSITION_DEFAULTS}
    if unknown or "coco" not in spec:
        raise SphinxToolsError(f"token_position needs coco (and optionally images, layer, weight); "
                               f"got keys {sorted(spec)}")
    out = _check_layer_and_weight("token_position", {**TOKEN_POSITION_DEFAULTS, **spec})
    out["coco"] = str((base / out["coco"]).resolve())
    out["images"] = str((base / out.get("images", Path(out["coco"]).parent)).resolve())
    return out


class TokenPlaces:
    """Where the object under each image patch token is, in the whole image: targets of an
    auxiliary loss on the LLM's hidden states (``token_position`` in the training config).

    SPHINX-1k's image tokens carry no view identity: the four quadrant views go through the same
    encoders and projection as the global view, and LLaMA has no absolute position embedding
    (RoPE rotates queries and keys only, never the values), so a quadrant token's content says
    at best where its object is *within its quadrant*. Only the token's place in the sequence
    tells the quadrant, and a tiny LLM trained from scratch is slow to learn that: where the demo
    model (without this loss) writes the first coordinate of a REC answer, its last two layers
    attend 2-5x more to quadrant tokens than to global-view ones. With this loss a linear head
    (discarded afterwards) reads each patch token's hidden state after LLM layer ``layer`` and
    regresses the box ``x1, y1, x2, y2`` of the object under the patch centre (fractions of the
    padded image, squared error), so the first layers learn to turn a token's view and in-view
    position into a place in the image. Patches on background carry no target (NaN).

    Args:
        coco: COCO json with the boxes; ``file_name`` relative to ``images``.
        images: the folder of the images (default: the json's); a training record's image is
            matched by its resolved path, and an image the json does not have gets no targets.
        image_size, n_views, grid: the model's input side, views and patch grid.
    """

    def __init__(self, coco, images, image_size: int, n_views: int, grid: int):
        from .warmup import read_coco

        data = read_coco(coco)
        files = {im["id"]: (Path(images, im["file_name"]).resolve(), (im["width"], im["height"]))
                 for im in data.images}
        boxes: dict = {i: [] for i in files}
        for a in data.annotations:
            if a.get("image_id") in boxes:
                x, y, w, h = a["bbox"]
                boxes[a["image_id"]].append((x, y, x + w, y + h))
        self.by_path = {path: (boxes[i], wh) for i, (path, wh) in files.items()}
        self.n_views, self.grid = n_views, grid
        self.transform = PaddedResize(image_size)

    def targets(self, image_path) -> torch.Tensor:
        "(n_views * grid * grid, 4): each patch's object box, NaN on background or an unknown image."
        from .warmup import patch_owners

        out = torch.full((self.n_views * self.grid * self.grid, 4), float("nan"))
        found = self.by_path.get(Path(image_path).resolve())
        if found is None or not found[0]:
            return out
        boxes = self.transform.to_model_xyxy(found[0], found[1])
        owner = patch_owners(boxes, self.n_views, self.grid).reshape(-1)
        hit = torch.from_numpy(owner >= 0)
        out[hit] = torch.from_numpy(boxes[owner[owner >= 0]]).float()
        return out


def patch_token_index(cfg: SphinxConfig) -> torch.Tensor:
    "Sequence index (BOS at 0) of each patch token, view-major and row-major like TokenPlaces.targets."
    v = cfg.vision
    per = cfg.tokens_per_view  # start_img, Q-Former queries, cls, grid * grid patches, end_img
    first = 1 + torch.arange(cfg.n_views)[:, None] * per + 1 + v.qf_queries + 1
    return (first + torch.arange(v.grid * v.grid)[None]).reshape(-1)


BOX_ATTENTION_DEFAULTS = {"layer": 2, "weight": 1.0}


def check_box_attention(spec) -> dict:
    "The ``box_attention`` config with its defaults; a clear error if malformed."
    if not isinstance(spec, dict) or set(spec) - set(BOX_ATTENTION_DEFAULTS):
        raise SphinxToolsError(f"box_attention takes layer and weight, got {spec!r}")
    return _check_layer_and_weight("box_attention", {**BOX_ATTENTION_DEFAULTS, **spec})


class BoxPieces:
    "Per-vocabulary lookups for finding the box an answer starts with: ``[x1,y1,x2,y2]`` or ``...;``."

    def __init__(self, tok: Tokenizer):
        from .tiny import COORDINATE_PIECES

        pieces = [tok.sp.id_to_piece(i) for i in range(tok.n_words)]
        self.value = torch.tensor([float(p) if p in COORDINATE_PIECES else float("nan") for p in pieces])
        self.comma = torch.tensor([p == "," for p in pieces])
        self.opens = torch.tensor([p.endswith("[") for p in pieces])
        self.closes = torch.tensor([p.startswith(("]", ";")) for p in pieces])
        if self.value.isnan().all():
            raise SphinxToolsError("box_attention needs a tokenizer with coordinate tokens "
                                   "(train_tokenizer(coordinate_tokens=True))")

    def first_boxes(self, ids: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None):
        """``(row, text index of the token before the box's first coordinate, box)`` for each answer
        (each packed turn, or each row) whose first answer coordinate starts a four-number box."""
        ids, labels = ids.cpu(), labels.cpu()
        value = self.value[ids]
        out = []
        for b in range(ids.shape[0]):
            seen = set()
            for j in torch.nonzero((labels[b] != IGNORE) & ~value[b].isnan()).flatten().tolist():
                seg = 0 if segments is None else int(segments[b, j])
                if seg in seen:
                    continue
                seen.add(seg)
                if j < 2 or j + 7 >= ids.shape[1] or not self.opens[ids[b, j - 1]]:
                    continue
                box = value[b, j:j + 7:2]
                if (box.isnan().any() or not self.comma[ids[b, j + 1:j + 7:2]].all()
                        or not self.closes[ids[b, j + 7]] or box[2] <= box[0] or box[3] <= box[1]):
                    continue
                out.append((b, j - 1, box.tolist()))
        return out


def box_attention_loss(model: Transformer, layer: int, attn_inputs, boxes, n_image: int):
    """Minus the log of the attention that head 0 of a layer pays, from the token before an
    answer's first box coordinate, to the image patch tokens whose centres the box holds (all views).

    ``attn_inputs``: the layer's attention inputs ``(x, freqs_cis, mask)`` of the forward pass;
    ``boxes``: :meth:`BoxPieces.first_boxes`. The head's softmax covers every key the query sees,
    so the loss asks it to find the object the question names among everything else. An answer
    whose box holds no patch centre is skipped; None when none is left.

    Measured on the demo model (REC questions on fresh scenes of three or more shapes, attention
    from the token before the first coordinate): without this loss no head of layer 2 looked at
    objects (at most 0.03 of a head's attention on the named object's patches, 0.09 on the other
    objects'); 1200 more steps on shapes scenes with it (weight 5) made head 0 put 0.65 on the
    named object's patches and 0.28 on all the others together. From the start of the demo
    recipe instead (weight 5, with ``token_position``) it swamped the other gradients (norms
    40-120 against ~1) and the model came out far worse (REC Acc@0.5 0.013 against 0.136), so
    the recipe does not use it. Nor did it help as a second stage on all scene kinds: 1000 more
    steps from the demo model with it (weight 0.5) gave REC 0.110 and detection AP50 0.078, the
    same 1000 steps without it 0.148 and 0.098; adding a linear read-out of the box from the
    hidden state after the layer at that token (weight 10 or 30) made it worse (REC 0.08-0.09)."""
    from .model import apply_rotary_emb
    from .warmup import patch_owners

    x, freqs, mask = attn_inputs
    cfg = model.cfg
    index = patch_token_index(cfg)
    rows, queries, targets = [], [], []
    for b, j, box in boxes:
        owned = patch_owners([box], cfg.n_views, cfg.vision.grid).reshape(-1) >= 0
        if owned.any():
            rows.append(b)
            queries.append(j + n_image if j > 0 else 0)  # the image sits right after BOS
            targets.append(torch.from_numpy(owned))
    if not rows:
        return None
    attn = model.layers[layer].attention
    hd = attn.head_dim
    rows_t = torch.tensor(rows, device=x.device)
    q_pos = torch.tensor(queries, device=x.device)
    q = attn.wq(x[rows_t, q_pos][:, None])[..., :hd]  # (n, 1, hd): head 0
    k = attn.wk(x[rows_t])[..., :hd]  # (n, L, hd): its key/value head
    q, _ = apply_rotary_emb(q[:, :, None], q[:, :, None], freqs[rows_t, q_pos][:, None])
    _, k = apply_rotary_emb(k[:, :, None], k[:, :, None], freqs[rows_t])
    scores = (q[:, :, 0] * k[:, :, 0]).sum(-1) / hd ** 0.5  # (n, L)
    L = x.shape[1]
    if mask is None:
        visible = torch.arange(L, device=x.device)[None] <= q_pos[:, None]
    else:
        visible = mask[rows_t, 0, q_pos]
    probs = scores.float().masked_fill(~visible, float("-inf")).softmax(-1)
    on = torch.zeros(len(rows), L, dtype=torch.bool, device=x.device)
    on[:, index.to(x.device)] = torch.stack(targets).to(x.device)
    return -torch.log((probs * on).sum(-1) + 1e-6).mean()


# -- model -------------------------------------------------------------------------------------


def loss_fn(model: Transformer, ids, labels, images, segments=None, token_weight=None, position=None,
            box_attention=None):
    """Mean next-token cross entropy over labelled (assistant) tokens, as the reference's forward.

    With ``segments`` (packed independent turns) the positions and attention mask make each turn
    a one-turn conversation; without, the sequence is one causal conversation. ``token_weight``
    (vocabulary-sized) weights each target token by its id: the weighted mean.

    Auxiliary losses: ``position = (head, layer, places, weight)`` adds ``weight`` x the loss of
    :class:`TokenPlaces`, ``box_attention = (pieces, layer, weight)`` ``weight`` x
    :func:`box_attention_loss`; with either, the result is ``(total, language loss, {name: loss})``.
    """
    seen, hooks = {}, []
    if position is not None:
        hooks.append(model.layers[position[1]].register_forward_hook(
            lambda m, args, out: seen.setdefault("h", out)))
    if box_attention is not None:
        hooks.append(model.layers[box_attention[1]].attention.register_forward_pre_hook(
            lambda m, args: seen.setdefault("attn", args[:3])))
    try:
        img = model.encode_image(images) if images is not None else None
        h = model.embed(ids, img)
        B, L, _ = h.shape
        n_image = L - ids.shape[1]
        if segments is None:
            positions, mask = torch.arange(L, device=h.device).expand(B, L), None
        else:
            positions, mask = packed_positions(segments, n_image), packed_mask(segments, n_image)
        logits = model(h, positions, mask=mask, keep_last=ids.shape[1])  # text positions only
    finally:
        for hook in hooks:
            hook.remove()
    language = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               weight=token_weight, ignore_index=IGNORE)
    if position is None and box_attention is None:
        return language
    total, aux = language, {}
    if position is not None:
        head, _, places, weight = position
        index = patch_token_index(model.cfg).to(ids.device)
        if places.shape[1] != len(index):
            raise SphinxToolsError(f"position targets for {places.shape[1]} patch tokens, the model has {len(index)}")
        pred = head(seen["h"][:, index].float())
        known = ~places[..., 0].isnan()
        aux["position"] = F.mse_loss(pred[known], places[known]) if bool(known.any()) else pred.sum() * 0
        total = total + weight * aux["position"]
    if box_attention is not None:
        pieces, layer, weight = box_attention
        found = box_attention_loss(model, layer, seen["attn"], pieces.first_boxes(ids, labels, segments), n_image)
        if found is not None:
            aux["box_attention"] = found
            total = total + weight * found
    return total, language, aux


def coordinate_weights(tok: Tokenizer, weight: float, device=None) -> torch.Tensor | None:
    "Vocabulary-sized loss weights: ``weight`` for the coordinate pieces, 1 elsewhere (None if 1)."
    from .tiny import COORDINATE_PIECES

    if weight == 1.0:
        return None
    if weight <= 0:
        raise SphinxToolsError(f"coordinate_weight must be positive, got {weight!r}")
    w = torch.ones(tok.n_words)
    for piece in COORDINATE_PIECES:
        i = tok.sp.piece_to_id(piece)
        if tok.sp.id_to_piece(i) == piece:
            w[i] = weight
    return w.to(device)


def set_trainable(model: Transformer, parts: list[str]) -> int:
    prefixes = tuple(p for part in parts for p in PARTS[part])
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


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
    from .sphinx_model import SphinxModel

    init = cfg.init
    if "checkpoint" in init:
        m = SphinxModel.from_pretrained(init["checkpoint"], device=device)
        model, tok = m.transformer, m.tokenizer
    else:
        from .tiny import init_coordinate_rows_, init_random_

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

    from .tiny import write_metadata

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


def _sync_grads(params: list[torch.nn.Parameter]):
    """Average the trainable parameters' gradients over the data-parallel group, in one
    all-reduce. A parameter no rank used keeps no gradient (the optimizer skips it, as with one
    process); one used by some ranks only (a batch without images) counts zeros for the rest."""
    world = dist.dp_world_size()
    if world == 1:
        return
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [used])
    torch_dist.all_reduce(flat, group=dist.fs_init.get_data_parallel_group())
    grads = flat[: -len(params)] / world
    for p, avg, n in zip(params, grads.split([p.numel() for p in params]), flat[-len(params):].tolist()):
        p.grad = avg.view_as(p) if n else None  # views of the one reduced buffer, no copies


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
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sphinx-train-") as tmp:
        store_file = str(Path(tmp) / "store")
        mp.spawn(_spawned, args=(procs, store_file, cfg, progress), nprocs=procs)
    return Path(cfg.out) / "last"


TRAIN_STATE = "train_state.pt"  # beside the checkpoint: what a re-run resumes from
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


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) a finetuning job; returns the final checkpoint folder."""
    from tqdm.auto import tqdm

    start = time.perf_counter()  # max_minutes counts the whole job, encoder warm-up included
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = train_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.maybe_init_dist("nccl" if device.type == "cuda" else "gloo")
    dist.init_model_parallel(cfg.model_parallel)
    out = Path(cfg.out)
    last = out / "last"
    if not last.exists() and last.with_name("last.old").exists():  # crashed mid-swap
        os.replace(last.with_name("last.old"), last)
    state = None
    if (last / TRAIN_STATE).is_file():
        state = load_train_state(last / TRAIN_STATE)
        cfg_resume = TrainConfig(**{**asdict(cfg), "init": {"checkpoint": str(last)}})
        model, tok = init_model(cfg_resume, device)
    else:
        model, tok = init_model(cfg, device)
    for name in ("token_position", "box_attention"):  # before the warm-up, not after it
        aux = getattr(cfg, name)
        if aux and aux["layer"] >= len(model.layers):
            raise SphinxToolsError(f"{name}.layer {aux['layer']} is past the model's {len(model.layers)} layers")
    if cfg.box_attention and dist.mp_world_size() > 1:
        raise SphinxToolsError("box_attention supervises head 0, which one model-parallel rank holds; "
                               "train with model_parallel 1")
    places = None  # the data, boxes and pieces first: a bad file fails before the warm-up
    if cfg.token_position:
        tp = cfg.token_position
        places = TokenPlaces(tp["coco"], tp["images"], model.cfg.image_size, model.cfg.n_views,
                             model.cfg.vision.grid)
    pieces = BoxPieces(tok) if cfg.box_attention else None
    data = ConversationData(cfg.data, tok, model.cfg.image_size, cfg.max_len, cfg.seed, places)
    out.mkdir(parents=True, exist_ok=True)
    dp, dpw = dist.dp_rank(), dist.dp_world_size()
    log = open(out.parent / f"{out.name}_log.jsonl", "a") if dp == 0 else None
    if state is None and cfg.encoder_warmup:  # a fresh start; a resumed run has warm encoders
        from .warmup import check_config, warmup_encoders

        warmup_encoders(model, check_config(cfg.encoder_warmup, Path(".")), device, log, progress,
                        workers=cfg.loader_workers)
    torch.manual_seed(cfg.seed + dist.dp_rank())
    n_train = set_trainable(model, cfg.train)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    head = None
    if cfg.token_position:
        head = torch.nn.Linear(model.cfg.dim, 4)
        with torch.no_grad():  # the same start on every rank: the image centre, whatever the tokens
            head.weight.zero_()
            head.bias.fill_(0.5)
        head = head.to(device)
        if state is not None and state.get("position_head") is not None:
            head.load_state_dict(state["position_head"])
        params += list(head.parameters())
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)  # one kernel, not one per tensor
    step, epoch, pos = 0, 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        _restore_py_rng(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    feed = batches(data, cfg.batch_size, epoch, pos, cfg.loader_workers, device.type == "cuda", dp, dpw)
    autocast = cfg.dtype == "bf16"
    token_weight = coordinate_weights(tok, cfg.coordinate_weight, device)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or dist.mp_rank() + dp > 0,
               desc="train", unit="step")
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        opt.zero_grad(set_to_none=True)
        total, aux_totals = 0.0, {}
        for _ in range(cfg.grad_accum):
            tensors, (epoch, pos) = next(feed)
            ids, labels, images, segments, batch_places = (
                None if t is None else t.to(device, non_blocking=True) for t in tensors)
            position = box = None
            if head is not None and batch_places is not None:
                tp = cfg.token_position
                position = (head, tp["layer"], batch_places, tp["weight"])
            if pieces is not None and images is not None:
                box = (pieces, cfg.box_attention["layer"], cfg.box_attention["weight"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if position is None and box is None:
                    loss = language = loss_fn(model, ids, labels, images, segments, token_weight)
                else:
                    loss, language, aux = loss_fn(model, ids, labels, images, segments, token_weight,
                                                  position, box)
                    for name, value in aux.items():
                        aux_totals[name] = aux_totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
                loss = loss / cfg.grad_accum
            loss.backward()
            total += float(language.detach()) / cfg.grad_accum
            tokens += int((labels != IGNORE).sum())
        _sync_grads(params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = dict(step=step, loss=total, lr=lr_at(step - 1, cfg), grad_norm=gnorm,
                       tok_s=tokens / (time.perf_counter() - t0), epoch=epoch,
                       trainable=n_train, dp=dpw)  # tok_s: this rank's
            rec.update({f"{name}_loss": value for name, value in aux_totals.items()})
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            model.eval()
            save(model, tok, last, dict(optimizer=opt.state_dict(), step=step, epoch=epoch,
                                        pos=pos, py_rng=random.getstate(),
                                        position_head=None if head is None else head.state_dict(),
                                        torch_rng=torch.get_rng_state(), config=asdict(cfg),
                                        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
            model.train()
        if out_of_time:
            if log:
                log.write(json.dumps({"step": step, "stopped": "max_minutes"}) + "\n")
            break
    bar.close()
    if log:
        log.close()
    return last
