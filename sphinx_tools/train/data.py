"""Conversation data for finetuning: the training text of a conversation, its tokens and loss
labels, packed independent turns, datasets mixed by ratio and the batches of each data-parallel
rank.

Data: JSON lists of ``{"image": path, "conversations": [{"from": "human", "value": q},
{"from": "gpt", "value": a}, ...]}``. Prompts use the conversation template of inference
(``conversation.build_prompt``); the loss covers the assistant tokens only (each answer plus the
``"\\n###"`` that ends it, so the model learns to stop). A dataset marked ``independent_turns``
trains each question of a record as its own one-turn prompt about the image (packed with a block
attention mask: one image encoding, no leaks between questions), which is what task prompts
look like at inference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..conversation import RESPONSE_END, build_prompt
from ..errors import SphinxToolsError
from ..tokenizer import Tokenizer
from ..transforms import PaddedResize

IGNORE = -100  # the label of a token outside the loss


def conversation_text(conversations: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The training text of a conversation and the character spans the loss covers.

    The text is ``conversation.build_prompt`` with every answer filled in, then the ``"###"``
    that ends the last answer. Each loss span is ``" {answer}\n###"``: exactly what inference
    generates before it stops.
    """
    turns = list(conversations)
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"a conversation needs human/gpt pairs, got {len(turns)} turns")
    qas = []
    for q, a in zip(turns[::2], turns[1::2]):
        if q.get("from") != "human" or a.get("from") != "gpt":
            raise ValueError(f"turns must alternate human/gpt, got {q.get('from')}/{a.get('from')}")
        qas.append([str(q["value"]).replace("<image>", "").strip(), str(a["value"]).strip()])
    spans = []
    for k, (question, _) in enumerate(qas):
        start = len(build_prompt(qas[:k] + [[question, None]]))  # up to "### Assistant:"
        answered = len(build_prompt(qas[:k + 1]))  # up to the answer's closing "\n"
        spans.append((start, answered - 1 + len(RESPONSE_END)))  # + the "\n###" end signal
    return build_prompt(qas) + RESPONSE_END.lstrip("\n"), spans


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
                 places=None):
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
