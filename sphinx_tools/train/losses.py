"""The finetuning loss: next-token cross entropy on the answer tokens, with optional per-token
weights (:func:`coordinate_weights`) and two auxiliary losses: ``token_position``
(:class:`TokenPlaces`), which teaches the LLM's first layers where each image patch token's object
lies in the whole image, and ``object_pointer`` (:func:`pointer_loss`), which teaches the LLM to
find, before it writes a box, the patch tokens of the object the box is about, and
``object_attention`` (:class:`ObjectAttention`), which trains the LLM's own attention to take both
hops of a referring expression: from the answer to the question's words, and to the object.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SphinxToolsError
from ..model import SphinxConfig, Transformer, apply_rotary_emb
from ..tokenizer import Tokenizer
from ..transforms import PaddedResize
from .config import OBJECT_ATTENTION_BOXES
from .data import IGNORE, packed_mask, packed_positions


def loss_fn(model: Transformer, ids, labels, images, segments=None, token_weight=None,
            position=None, pointer=None, attention=None):
    """Mean next-token cross entropy over labelled (assistant) tokens, as the reference's forward.

    With ``segments`` (packed independent turns) the positions and attention mask make each turn
    a one-turn conversation; without, the sequence is one causal conversation. ``token_weight``
    (vocabulary-sized) weights each target token by its id: the weighted mean.

    ``position = (head, layer, places, weight)`` adds ``weight`` x the auxiliary loss of
    :class:`TokenPlaces`, and ``pointer = (head, layer, places, values, weight)`` adds ``weight``
    x :func:`pointer_loss` (``values``: :func:`coordinate_values`), and ``attention``
    (:class:`ObjectAttention`) its weight x :func:`attention_pointer_loss` ("attention"), and with a
    ``question_layer`` the same weight x the question hop's loss ("question"); with any of them the
    result is ``(total, language loss, {name: loss})`` (the ones that are on).
    """
    seen, hooks = {}, []
    for spec in (position, pointer):
        if spec is not None and spec[1] not in seen:
            seen[spec[1]] = None
            hooks.append(model.layers[spec[1]].register_forward_hook(
                lambda m, args, out, k=spec[1]: seen.__setitem__(k, out)))
    if attention is not None:  # the attentions' inputs, for their own scores
        for name, layer in (("attention", attention.layer), ("question", attention.question_layer)):
            if layer is not None:
                hooks.append(model.layers[layer].attention.register_forward_pre_hook(
                    lambda m, args, k=name: seen.__setitem__(k, args)))
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
    language = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), weight=token_weight, ignore_index=IGNORE)
    if position is None and pointer is None and attention is None:
        return language
    total, aux, found = language, {}, {}

    def targets_of(places, values, boxes="first"):  # object_pointer and object_attention share them
        key = (id(places), id(values), boxes)
        if key not in found:
            found[key] = pointer_targets(labels, segments, places, values, n_image, boxes=boxes)
        return found[key]

    if position is not None:
        head, layer, places, weight = position
        aux["position"] = position_loss(model.cfg, head, seen[layer], places)
        total = total + weight * aux["position"]
    if pointer is not None:
        head, layer, places, values, weight = pointer
        aux["pointer"] = pointer_loss(model.cfg, head, seen[layer], targets_of(places, values))
        total = total + weight * aux["pointer"]
    if attention is not None:
        a = attention
        patches = patch_token_index(model.cfg) if a.patches is None else a.patches
        aux["attention"] = attention_pointer_loss(model.layers[a.layer].attention, seen["attention"],
                                                  a.head, targets_of(a.places, a.values, a.boxes),
                                                  patches)
        total = total + a.weight * aux["attention"]
        if a.question_layer is not None:  # once per answer, from its first coordinate
            first = targets_of(a.places, a.values)
            aux["question"] = attention_pointer_loss(
                model.layers[a.question_layer].attention, seen["question"], a.head,
                expression_targets(a.tok, ids, segments, first, n_image), torch.arange(L))
            total = total + a.weight * aux["question"]
    return total, language, aux


class ObjectAttention(NamedTuple):
    """``loss_fn``'s ``attention``: head ``head`` of LLM layer ``layer`` learns to attend, from the
    hidden state that predicts each answer's first coordinate, to its object's patch tokens
    (``places``: :meth:`TokenPlaces.targets`; ``values``: :func:`coordinate_values`; ``patches``:
    their sequence indices, default :func:`patch_token_index`); with ``question_layer``, the
    same head of that layer learns to attend to the question's referring expression
    (:func:`expression_targets`, which reads the text with ``tok``). ``boxes`` says where else
    the object hop is trained from (:func:`pointer_targets`): ``"every"``, both corners of every
    box of an answer; ``"named"``, those and the text that names each box's object."""
    layer: int
    question_layer: int | None
    head: int
    places: torch.Tensor
    values: torch.Tensor
    tok: Tokenizer
    weight: float
    patches: torch.Tensor | None = None
    boxes: str = "first"


def position_loss(cfg: SphinxConfig, head: torch.nn.Module, hidden: torch.Tensor,
                  places: torch.Tensor) -> torch.Tensor:
    """Squared error of ``head``'s box for each patch token's hidden state against its
    :meth:`TokenPlaces.targets` (patches on background carry none)."""
    index = patch_token_index(cfg).to(hidden.device)
    if places.shape[1] != len(index):
        raise SphinxToolsError(f"position targets for {places.shape[1]} patch tokens, "
                               f"the model has {len(index)}")
    pred = head(hidden[:, index].float())
    known = ~places[..., 0].isnan()
    return F.mse_loss(pred[known], places[known]) if bool(known.any()) else pred.sum() * 0


class PointerHead(torch.nn.Module):
    """Scores of patch tokens as the one an answer is about to locate: a query projection of the
    hidden state before the box, a key projection of each patch token's, scaled dot products.
    Discarded after training; only its gradients shape the LLM."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.q = torch.nn.Linear(dim, width, bias=False)
        self.k = torch.nn.Linear(dim, width, bias=False)
        g = torch.Generator().manual_seed(0)  # the same start on every data-parallel rank
        with torch.no_grad():
            for w in (self.q.weight, self.k.weight):
                w.copy_(torch.randn(w.shape, generator=g) * dim ** -0.5)

    def forward(self, query: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        # query: (N, dim); patches: (N, P, dim) -> scores (N, P)
        q, k = self.q(query), self.k(patches)
        return (k @ q[:, :, None])[..., 0] * q.shape[-1] ** -0.5


def coordinate_values(tok: Tokenizer, device=None) -> torch.Tensor | None:
    """Vocabulary-sized: the number each coordinate piece writes (``"0.41"`` -> 0.41), NaN for
    every other piece; None when the tokenizer has no coordinate pieces."""
    from ..tiny import COORDINATE_PIECES

    out = torch.full((tok.n_words,), float("nan"))
    for piece in COORDINATE_PIECES:
        i = tok.sp.piece_to_id(piece)
        if tok.sp.id_to_piece(i) == piece:
            out[i] = float(piece)
    return None if bool(out.isnan().all()) else out.to(device)


def pointer_targets(labels: torch.Tensor, segments: torch.Tensor | None, places: torch.Tensor,
                    values: torch.Tensor, n_image: int, tol: float = 0.011, boxes: str = "first"):
    """Where each answer's first box is read from, and the patch tokens of its object.

    For each answer (each packed turn, or a row's first answer without packing) whose labels hold
    at least four coordinate pieces, the first four are a box; the patches whose object box
    (``places``, :meth:`TokenPlaces.targets`) equals it to ``tol`` (the answer rounds to two
    decimals) are its object's. Returns ``(rows (N,), query (N,), hit (N, P) bool)``: the batch
    row, the sequence index (image tokens counted) of the hidden state that predicts the first
    coordinate, and the object's patches; answers whose box matches no patch are left out.

    With ``boxes="every"``, each box of an answer (its coordinates four by four: every box of a
    detection list) that matches patches gives two entries: the hidden states that predict its
    first and its third coordinate (the second corner), both pointing at the box's object. With
    ``boxes="named"``, also the hidden states that predict the answer's text between the previous
    box (or the answer's start) and the box: the words that name the box's object (an OCR word, a
    class, a phrase) are then predicted while looking at it."""
    if boxes not in OBJECT_ATTENTION_BOXES:
        raise SphinxToolsError(f"boxes must be one of {list(OBJECT_ATTENTION_BOXES)}, got {boxes!r}")
    every, named = boxes in ("every", "named"), boxes == "named"
    known = labels >= 0
    v = torch.where(known, values[labels.clamp(min=0)], torch.full_like(labels, -1, dtype=values.dtype))
    coord = ~v.isnan() & known
    seg = segments if segments is not None else torch.zeros_like(labels)
    rows, query, hit = [], [], []
    for b in range(labels.shape[0]):
        firsts: dict[int, list[int]] = {}
        for t in coord[b].nonzero().flatten().tolist():
            firsts.setdefault(int(seg[b, t]), []).append(t)
        answer = known[b].nonzero().flatten() if named else None
        for s, ts in firsts.items():
            if s < 0 or len(ts) < 4:
                continue
            texts = answer[seg[b, answer] == s] if named else None
            for i in range(0, len(ts) - 3 if every else 1, 4):
                box = v[b, ts[i:i + 4]].to(places.dtype)
                match = ((places[b] - box).abs() <= tol).all(dim=-1)  # NaN (background): False
                if bool(match.any()):
                    naming = []
                    if named:  # the answer's text since the previous box
                        after = ts[i - 1] if i else -1
                        naming = texts[(texts > after) & (texts < ts[i])].tolist()
                    for t in [*naming, ts[i], ts[i + 2]] if every else (ts[i],):
                        rows.append(b)
                        query.append(t - 1 + n_image)  # text index t - 1 >= 1 sits after the image
                        hit.append(match)
    if not rows:
        return (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, places.shape[1], dtype=torch.bool))
    return torch.tensor(rows), torch.tensor(query), torch.stack(hit)


def pointer_loss(cfg: SphinxConfig, head: PointerHead, hidden: torch.Tensor, targets) -> torch.Tensor:
    """Cross entropy of ``head``'s choice among the patch tokens: minus the log of the probability
    it gives the patches of the answer's object (:func:`pointer_targets`), mean over answers."""
    rows, query, hit = (t.to(hidden.device) for t in targets)
    if len(rows) == 0:
        return hidden.sum() * 0
    index = patch_token_index(cfg).to(hidden.device)
    if hit.shape[1] != len(index):
        raise SphinxToolsError(f"pointer targets for {hit.shape[1]} patch tokens, "
                               f"the model has {len(index)}")
    scores = head(hidden[rows, query].float(), hidden[rows][:, index].float())
    logp = scores.log_softmax(dim=-1)
    return -logp.masked_fill(~hit, float("-inf")).logsumexp(dim=-1).mean()


def attention_pointer_loss(attention, inputs: tuple, head: int, targets, patches: torch.Tensor) -> torch.Tensor:
    """Minus the log of the attention that head ``head`` of an LLM layer's ``attention`` gives,
    from the hidden state that predicts an answer's first coordinate, to the patch tokens of the
    answer's object (``targets``: :func:`pointer_targets`), mean over answers.

    Unlike :func:`pointer_loss`, whose separate head only shapes the hidden states, this trains the
    language model's own attention to fetch the named object, so that its value reaches the answer.
    ``inputs``: the attention's forward arguments ``(x, freqs_cis, mask, ...)`` (a forward pre-hook
    records them); ``patches``: the sequence index of each patch token. One model-parallel rank."""
    rows, query, hit = (t.to(inputs[0].device) for t in targets)
    x, freqs_cis, mask = inputs[:3]
    if len(rows) == 0:
        return x.sum() * 0
    B, T, _ = x.shape
    hd = attention.head_dim
    q = attention.wq(x).view(B, T, -1, hd)
    k = attention.wk(x).view(B, T, -1, hd)
    q, k = apply_rotary_emb(q, k, freqs_cis)
    kv = head // (q.shape[2] // k.shape[2])
    scores = (k[rows, :, kv] @ q[rows, query, head][:, :, None])[..., 0].float() * hd ** -0.5  # (N, T)
    if mask is None:
        allowed = torch.arange(T, device=x.device)[None] <= query[:, None]
    else:
        allowed = mask[rows, 0, query]
    logp = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)[:, patches.to(x.device)]
    return -logp.masked_fill(~hit, float("-inf")).logsumexp(dim=-1).mean()


def expression_targets(tok: Tokenizer, ids: torch.Tensor, segments: torch.Tensor | None, targets,
                       n_image: int):
    """:func:`pointer_targets`' answers, with ``hit`` over the whole sequence (image tokens
    counted: (N, n_image + T)) marking the pieces of each answer's referring expression: the text
    of its question after the question's last colon, up to its final full stop ("...: the red
    star." -> "the red star"). Answers whose question has no colon of its own are left out.
    ``segments``: packed turns (the text an answer reads is the shared prefix and its own turn)."""
    rows, query, _ = targets
    keep, hit = [], torch.zeros(len(rows), n_image + ids.shape[1], dtype=torch.bool)
    for j, (b, q) in enumerate(zip(rows.tolist(), query.tolist())):
        index = torch.arange(q - n_image + 1)  # up to the piece that predicts the first coordinate
        if segments is not None:
            seg = segments[b, :len(index)]
            index = index[(seg == 0) | (seg == seg[-1])]
        index = index.numpy()
        pieces = [tok.sp.id_to_piece(int(i)).replace("\u2581", " ") for i in ids[b, index]]
        lengths = np.array([len(p) for p in pieces])
        ends, text = np.cumsum(lengths), "".join(pieces)
        turn = text.rfind("Human:")  # the question of this answer
        close = text.rfind("###")  # before the answer's "### Assistant:"
        colon = text.rfind(":", turn + len("Human:"), close)
        stop = text.rfind(".", colon, close)
        if turn < 0 or colon < 0 or stop < 0:
            continue
        inside = (ends > colon + 1) & (ends - lengths < stop)
        hit[j, n_image + index[inside]] = True
        keep.append(j)
    keep = torch.tensor(keep, dtype=torch.long)
    return rows[keep], query[keep], hit[keep]


def coordinate_weights(tok: Tokenizer, weight: float, device=None) -> torch.Tensor | None:
    """Vocabulary-sized loss weights: ``weight`` for the coordinate pieces, 1 elsewhere (None if 1).

    ``weight`` is ``TrainConfig.coordinate_weight``, checked positive there."""
    if weight == 1.0:
        return None
    w = torch.ones(tok.n_words)
    values = coordinate_values(tok)
    if values is not None:
        w[~values.isnan()] = weight
    return w.to(device)


def position_head(dim: int, device) -> torch.nn.Linear:
    "The linear head of the ``token_position`` loss, starting at the image centre on every rank."
    head = torch.nn.Linear(dim, 4)
    with torch.no_grad():  # the same start on every rank: the image centre, whatever the tokens
        head.weight.zero_()
        head.bias.fill_(0.5)
    return head.to(device)


class TokenPlaces:
    """Where the object under each image patch token is, in the whole image: targets of an
    auxiliary loss on the LLM's hidden states (``token_position`` in the training config).

    SPHINX-1k's image tokens carry no view identity: the four quadrant views go through the same
    encoders and projection as the global view, and LLaMA has no absolute position embedding
    (RoPE rotates queries and keys only, never the values), so a quadrant token's content says
    at best where its object is *within its quadrant*. Only the token's place in the sequence
    tells the quadrant, and a tiny LLM trained from scratch is slow to learn that. With this
    loss a linear head
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
    first = 1 + torch.arange(cfg.n_views)[:, None] * per + 1 + cfg.qf_queries + 1
    return (first + torch.arange(v.grid * v.grid)[None]).reshape(-1)
