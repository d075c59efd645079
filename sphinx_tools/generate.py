"""Batched decoding with static KV caches, built from small functions (gpt-fast style).

Rows of a batch may have different lengths and different (or no) images. They are left-padded:
row i occupies cache slots ``pad_i .. T-1`` of the prompt and RoPE positions start at 0 on its
BOS, so each row computes what it would compute alone. Only the last position's logits are
computed.

The attention mask is built once per forward, already in the additive form attention adds to
its scores (so no layer converts it), and only as wide as the live part of the cache: the slots
written so far, rounded up to a multiple of ``LIVE_BUCKET``. Each layer's cache attends itself
(``attend``), so a decode step reads only the live slots, never the slack of the static cache.

Rows that share a prefix (``generate_multi``: BOS + image + system prompt) use cascade
attention: each prefix is prefilled once into a prefix cache, every row keeps only its own
suffix in a suffix cache, and a row's attention is the exact log-sum-exp merge of its attention
over its prefix (computed for all the rows of that prefix at once, reading the prefix once) and
over its suffix. No row holds a copy of its prefix.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import KVCache, Transformer

LIVE_BUCKET = 64  # attended cache widths are multiples of this (or the whole cache)


@dataclass
class Generation:
    """One generated answer.

    Attributes:
        text: the answer, cut before any stop string, without EOS.
        token_ids: generated token ids belonging to ``text``.
        logprobs: per-token log-probabilities under the model (untempered), same length.
        offsets: character offset in ``text`` where each token starts, same length.
        finish_reason: ``"stop"`` (a stop string), ``"eos"`` or ``"length"``.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str = "length"


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    # logits: (B, V) fp32 -> next ids (B,), their untempered logprobs (B,)
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        nxt = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        p_sort, idx = probs.sort(dim=-1, descending=True)
        mask = p_sort.cumsum(dim=-1) - p_sort > top_p  # reference's sample_top_p
        p_sort = p_sort.masked_fill(mask, 0.0)
        p_sort = p_sort / p_sort.sum(dim=-1, keepdim=True)
        pick = torch.multinomial(p_sort, 1, generator=generator)
        nxt = idx.gather(-1, pick).squeeze(-1)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)


# -- attention over caches ---------------------------------------------------------------------


def live_len(used: int, size: int) -> int:
    "Cache slots attended when ``used`` slots are written: rounded up to ``LIVE_BUCKET``."
    return min(size, -(-used // LIVE_BUCKET) * LIVE_BUCKET)


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    # q: (B, nh, T, hd) -> (B, n_kv, rep*T, hd): the query heads of each K/V head side by side
    # (head h uses K/V head h // rep), so K and V are read as they are, never repeated
    B, nh, T, hd = q.shape
    return q.reshape(B, n_kv, (nh // n_kv) * T, hd)


def _ungrouped(y: torch.Tensor, nh: int) -> torch.Tensor:
    B, n_kv, M, hd = y.shape
    return y.reshape(B, nh, M * n_kv // nh, hd)


def _attend(q, k, v, bias) -> torch.Tensor:
    # q: (B, nh, T, hd); k, v: (B, nkv, S, hd); bias: additive (B, 1, T, S) -> (B, nh, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _attend_lse(q, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp: ``(out (B, nh, T, hd), lse (B, nh, T) fp32)``.

    Shapes as :func:`_attend`; ``bias`` may broadcast over T. Numbers equal
    ``scaled_dot_product_attention``'s on CPU (the same flash kernel); elsewhere they are
    computed in float32."""
    nh, n_kv, T = q.shape[1], k.shape[1], q.shape[2]
    rep = nh // n_kv
    qg = _grouped(q, n_kv)
    if bias.shape[2] != 1 and rep > 1:
        bias = bias.repeat(1, 1, rep, 1)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, k, v, 0.0, False, attn_mask=bias)[:2]
    else:
        s = (qg.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias.float()
        lse = torch.logsumexp(s, dim=-1)
        out = (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)
    return _ungrouped(out, nh), lse.reshape(q.shape[0], nh, T)


class LiveCache(KVCache):
    "A static cache that attends only its live part: as many slots as the mask is wide."

    def write(self, slots, k, v, rows=None):
        """Write k, v (B, nkv, T, hd) at cache slots ``slots``: (T,) for every row, or (B, T) per
        row; into cache rows ``rows`` (B,) (default: 0..B-1)."""
        if rows is None and slots.dim() == 1:
            self.update(slots, k, v)
            return
        r = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        at = slots.expand(k.shape[0], -1) if slots.dim() == 1 else slots
        self.k[r[:, None], :, at] = k.transpose(1, 2)
        self.v[r[:, None], :, at] = v.transpose(1, 2)

    def live(self, L: int, rows=None):
        "The first L slots of every row (or of ``rows``)."
        K, V = self.k[:, :, :L], self.v[:, :, :L]
        return (K, V) if rows is None else (K[rows], V[rows])

    def attend(self, q, k, v, bias, slots):
        # q: (B, nh, T, hd); k, v: (B, nkv, T, hd) of cache slots `slots`; bias (B, 1, T, L), or
        # None: rows without padding fill slots 0..T-1 (causal attention, no mask to read)
        self.write(slots, k, v)
        if bias is None:
            K, V = self.live(q.shape[2])
            return F.scaled_dot_product_attention(q, K, V, is_causal=True,
                                                  enable_gqa=q.shape[1] != K.shape[1])
        return _attend(q, *self.live(bias.shape[-1]), bias)


@dataclass
class Layout:
    """The rows of a forward over a :class:`CascadeCache`.

    Attributes:
        table: (P, n) for each prefix, the forward rows that read it (smaller groups repeat one).
        where: (B,) each forward row's position in ``table.flatten()``.
        rows: (B,) the suffix-cache row of each forward row, or None: row i is cache row i.
        in_order: the rows are grouped by prefix, in order, n per prefix (``table`` is
            ``0 .. B-1`` row-major and ``where`` is ``0 .. B-1``): no gather is needed.
    """

    table: torch.Tensor
    where: torch.Tensor
    rows: torch.Tensor | None = None
    in_order: bool = False

    @classmethod
    def of(cls, owner: list[int], n_prefixes: int, device, rows: list[int] | None = None):
        "The layout of forward rows whose prefixes are ``owner`` (row -> prefix index)."
        groups = [[r for r, j in enumerate(owner) if j == p] for p in range(n_prefixes)]
        n = max(len(g) for g in groups)
        table = [g + [g[-1]] * (n - len(g)) if g else [0] * n for g in groups]
        where = [p * n + groups[p].index(r) for r, p in enumerate(owner)]
        in_order = where == list(range(len(owner))) == [r for g in table for r in g]
        return cls(torch.tensor(table, device=device), torch.tensor(where, device=device),
                   None if rows is None else torch.tensor(rows, device=device), in_order)


class CascadeCache(nn.Module):
    """Rows that share prefixes: each prefix's K/V once, each row's own suffix in ``suffix``.

    A row's attention over prefix + suffix is the log-sum-exp merge of its attention over its
    prefix and over its suffix; the prefix part is computed for all the rows of a prefix at once.

    Args:
        prefix: the prefilled cache of the prefixes (one row per prefix).
        prefix_len: prefix slots written (the prefixes are left-padded to this length).
        prefix_bias: additive (P, 1, 1, prefix_len): 0 on a prefix's real tokens, -inf on padding.
        suffix: the rows' own cache.
        layout: holds the current :class:`Layout` as ``layout.now`` (shared by every layer).
    """

    def __init__(self, prefix: KVCache, prefix_len: int, prefix_bias, suffix: LiveCache, layout):
        super().__init__()
        self.pk, self.pv = prefix.k[:, :, :prefix_len], prefix.v[:, :, :prefix_len]
        self.prefix_bias, self.suffix, self.layout = prefix_bias, suffix, layout

    def attend(self, q, k, v, bias, slots):
        B, nh, T, hd = q.shape
        lay = self.layout.now
        self.suffix.write(slots, k, v, lay.rows)
        y_s, lse_s = _attend_lse(q, *self.suffix.live(bias.shape[-1], lay.rows), bias)
        P, n = lay.table.shape
        qp = q if lay.in_order else q[lay.table.flatten()]
        qp = qp.view(P, n, nh, T, hd).transpose(1, 2)  # (P, nh, n, T, hd)
        y_p, lse_p = _attend_lse(qp.reshape(P, nh, n * T, hd), self.pk, self.pv, self.prefix_bias)
        y_p = y_p.view(P, nh, n, T, hd).transpose(1, 2).reshape(P * n, nh, T, hd)
        lse_p = lse_p.view(P, nh, n, T).transpose(1, 2).reshape(P * n, nh, T)
        if not lay.in_order:
            y_p, lse_p = y_p[lay.where], lse_p[lay.where]
        # the suffix's share of the softmax mass: exp(lse_s) / (exp(lse_s) + exp(lse_p))
        w = torch.sigmoid(lse_s - lse_p)[..., None]
        return torch.lerp(y_p.float(), y_s.float(), w).to(q.dtype)


# Per model, its decoding caches by role: reused while batch, length, dtype and device fit, so a
# cache is allocated once and written in place across calls (until Transformer.clear_caches).
_CACHES: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def _caches(model: Transformer, role: str, batch: int, length: int) -> list[LiveCache]:
    p = model.output.weight
    pool = _CACHES.setdefault(model, {})
    if model.layers[0].attention.kv_cache is None:  # clear_caches() frees them: so does the pool
        pool.clear()
    have = pool.get(role)
    c = have[0] if have else None
    if c is None or c.k.shape[0] != batch or c.k.shape[2] < length or c.k.dtype != p.dtype \
            or c.k.device != p.device:
        pool[role] = have = [
            LiveCache(batch, length, layer.attention.n_local_kv_heads, layer.attention.head_dim,
                      p.dtype, p.device) for layer in model.layers]
    return have


def install_caches(model: Transformer, batch: int, length: int, role: str = "rows") -> int:
    "Give every layer a live cache of ``batch`` rows and at least ``length`` slots; its size."
    caches = _caches(model, role, batch, length)
    for layer, c in zip(model.layers, caches):
        layer.attention.kv_cache = c
    return caches[0].k.shape[2]


# -- batches -----------------------------------------------------------------------------------


@dataclass
class Batch:
    "Left-padded prompt embeddings and the bookkeeping the decode steps need."

    h: torch.Tensor  # (B, T, dim) embeddings still to prefill
    pad: torch.Tensor  # (B,) position = slot - pad (empty slots before a row's tokens, when >= 0)
    valid: torch.Tensor  # (B, cache_len) key slot holds a real token of the row
    start: int = 0  # cache slot of h[:, 0]

    @property
    def prompt_len(self) -> int:
        "First cache slot after the prompt: where decoding starts."
        return self.start + self.h.shape[1]


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # rows: per-row embeddings (L_i, dim) -> (B, T, dim) left-padded, and each row's padding (B,)
    T = max(r.shape[0] for r in rows)
    h = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
    for i, r in enumerate(rows):
        h[i, T - r.shape[0]:] = r
    return h, torch.tensor([T - r.shape[0] for r in rows], device=h.device)


def make_batch(model: Transformer, rows: list[torch.Tensor], max_gen_len: int,
               role: str = "rows") -> Batch:
    # rows: per-row embeddings (L_i, dim) -> left-padded Batch with a cache of T + max_gen_len
    h, pad = _left_pad(rows)
    size = install_caches(model, len(rows), h.shape[1] + max_gen_len, role)
    valid = torch.arange(size, device=h.device)[None, :] >= pad[:, None]
    return Batch(h, pad, valid)


def _mask(batch: Batch, q_slots: torch.Tensor, used: int) -> torch.Tensor:
    # q_slots: (Tq,) -> additive (B, 1, Tq, L) in the batch's dtype over the live slots L >= used:
    # causal, real keys only (a pad query sees itself)
    L = live_len(used, batch.valid.shape[1])
    k = torch.arange(L, device=q_slots.device)
    causal = k[None, :] <= q_slots[:, None]  # (Tq, L)
    own = k[None, :] == q_slots[:, None]
    return _bias(((batch.valid[:, None, :L] | own[None]) & causal[None])[:, None], batch.h.dtype)


def prefill(model: Transformer, batch: Batch) -> torch.Tensor:
    # -> last-position logits (B, V)
    slots = torch.arange(batch.start, batch.prompt_len, device=batch.h.device)
    positions = (slots[None, :] - batch.pad[:, None]).clamp(min=0)  # (B, T)
    plain = batch.start == 0 and not bool(batch.pad.any())  # causal, nothing to mask
    bias = None if plain else _mask(batch, slots, batch.prompt_len)
    return model(batch.h, positions, bias, slots, last_only=True)[:, -1]


class SharedRows:
    """Rows that share prefixes, decoded in a fixed number of slots (continuous batching).

    Each prefix is prefilled once; a slot holds one row's suffix (its prompt after the prefix,
    then its answer) in a suffix cache and attends its prefix through :class:`CascadeCache`.
    When a row finishes, :meth:`refill` prefills the next waiting row into its slot, or
    :meth:`drop` removes the slot, so a step only computes rows that are still answering.

    Args:
        prefixes: per prefix, embeddings (P_j, dim) (e.g. BOS + image tokens + system prompt).
        rows: per row, embeddings (L_i, dim) of what follows its prefix; L_i >= 1.
        owner: per row, its prefix index.
        slots: rows decoded at once.
        max_gen_len: most tokens a row generates.
    """

    def __init__(self, model: Transformer, prefixes, rows, owner, slots: int, max_gen_len: int):
        self.model, self.rows, self.owner = model, rows, owner
        pre = make_batch(model, prefixes, 0, role="prefix")
        prefill(model, pre)  # fills the prefix caches, one row per prefix
        P, dev = pre.prompt_len, pre.h.device
        self.n_prefixes, self.device, self.dtype = len(prefixes), dev, pre.h.dtype
        self.plen = (P - pre.pad).tolist()  # each prefix's real length
        bias = torch.zeros(len(prefixes), 1, 1, P, dtype=pre.h.dtype, device=dev)
        bias.masked_fill_(~pre.valid[:, None, None, :P], float("-inf"))
        self.size = max(r.shape[0] for r in rows) + max_gen_len
        self.suffix = _caches(model, "suffix", slots, self.size)
        self.layout = _Now()
        for layer, pc, sc in zip(model.layers, [la.attention.kv_cache for la in model.layers],
                                 self.suffix):
            layer.attention.kv_cache = CascadeCache(pc, P, bias, sc, self.layout)
        self.slot_row: list[int] = []  # the row in each slot
        self.gap = torch.zeros(0, dtype=torch.long, device=dev)  # first suffix slot of each slot
        self.cur = torch.zeros(0, dtype=torch.long, device=dev)  # next cache slot to write
        self.pos0 = torch.zeros(0, dtype=torch.long, device=dev)  # RoPE position of slot `gap`

    def _set(self, rows_in_forward: list[int] | None):
        owner = [self.owner[r] for r in self.slot_row]
        idx = None
        if rows_in_forward is not None:
            owner = [owner[i] for i in rows_in_forward]
            idx = rows_in_forward
        self.layout.now = Layout.of(owner, self.n_prefixes, self.device, idx)

    def start(self, rows: list[int]) -> torch.Tensor:
        "Prefill ``rows`` into new slots (all slots: the first call); their logits (n, V)."
        return self.refill(list(range(len(rows))), rows, first=True)

    def refill(self, slots: list[int], rows: list[int], first: bool = False) -> torch.Tensor:
        "Prefill ``rows`` into ``slots`` (whose rows are finished); their first logits (n, V)."
        h, gap = _left_pad([self.rows[r] for r in rows])
        T, dev = h.shape[1], self.device
        pos0 = torch.tensor([self.plen[self.owner[r]] for r in rows], device=dev) - gap
        if first:
            self.slot_row = list(rows)
            self.gap, self.pos0 = gap, pos0
            self.cur = torch.full((len(rows),), T, dtype=torch.long, device=dev)
            self._set(None)
        else:
            at = torch.tensor(slots, device=dev)
            for s, r in zip(slots, rows):
                self.slot_row[s] = r
            self.gap[at], self.pos0[at], self.cur[at] = gap, pos0, T
            self._set(slots)
        q = torch.arange(T, device=dev)
        L = live_len(T, self.size)
        k = torch.arange(L, device=dev)
        see = ((k[None, None, :] >= gap[:, None, None]) | (k[None, :] == q[:, None])[None]) \
            & (k[None, :] <= q[:, None])[None]  # (n, T, L): causal, real keys (pads see themselves)
        positions = (pos0[:, None] + q[None, :]).clamp(min=0)
        logits = self.model(h, positions, _bias(see[:, None], self.dtype), q, last_only=True)[:, -1]
        self._set(None)
        return logits

    def step(self, tok: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        "One decode step of the slots (all, or ``slots``): tok (n,) -> logits (n, V)."
        idx = None if slots is None else torch.tensor(slots, device=self.device)
        cur = self.cur if idx is None else self.cur[idx]
        gap = self.gap if idx is None else self.gap[idx]
        pos0 = self.pos0 if idx is None else self.pos0[idx]
        L = live_len(int(cur.max()) + 1, self.size)
        k = torch.arange(L, device=self.device)
        see = (k[None, :] >= gap[:, None]) & (k[None, :] <= cur[:, None])  # (n, L)
        if slots is not None:
            self._set(slots)
        h = self.model.tok_embeddings(tok[:, None])
        logits = self.model(h, (pos0 + cur)[:, None], _bias(see[:, None, None], self.dtype),
                            cur[:, None])[:, -1]
        if slots is not None:
            self._set(None)
        if idx is None:
            self.cur += 1
        else:
            self.cur[idx] += 1
        return logits

    def drop(self, slots: list[int]) -> None:
        "Remove finished ``slots``; the others keep their order."
        keep = [i for i in range(len(self.slot_row)) if i not in set(slots)]
        at = torch.tensor(keep, device=self.device)
        smaller = []
        for layer, c in zip(self.model.layers, self.suffix):
            new = LiveCache(0, 0, 0, 0, c.k.dtype, c.k.device)  # the pooled cache stays as it is
            new.k, new.v = c.k[at], c.v[at]
            layer.attention.kv_cache.suffix = new
            smaller.append(new)
        self.suffix = smaller
        self.slot_row = [self.slot_row[i] for i in keep]
        self.gap, self.cur, self.pos0 = self.gap[at], self.cur[at], self.pos0[at]
        self._set(None)


class _Now:
    "A mutable holder: ``now`` is the layout of the current forward."

    now: Layout


def _bias(see: torch.Tensor, dtype) -> torch.Tensor:
    "Boolean 'may attend' -> the additive mask: 0 where true, -inf where false."
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, float("-inf"))


def decode_one_token(model: Transformer, batch: Batch, tok: torch.Tensor, slot: int):
    # tok: (B,) the token placed at cache slot `slot` -> logits (B, V)
    slots = torch.tensor([slot], device=tok.device)
    positions = (slot - batch.pad)[:, None]  # (B, 1)
    h = model.tok_embeddings(tok[:, None])
    return model(h, positions, _mask(batch, slots, slot + 1), slots)[:, -1]


@torch.inference_mode()
def decode_stream(
    model: Transformer,
    rows: list[torch.Tensor],
    max_gen_len: int,
    temperature: float = 0.0,
    top_p: float = 0.95,
    generator: torch.Generator | None = None,
    is_done: Callable[[int, list[int]], bool] | None = None,
    shared: list[torch.Tensor] | None = None,
    prefix_index: list[int] | None = None,
    max_rows: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(next_ids (B,), logprobs (B,), done (B,) bool)`` once per generated token.

    ``rows`` are per-row prompt embeddings; with ``shared`` (prefix embeddings) and
    ``prefix_index`` (row -> prefix), rows hold only what follows their prefix, each prefix is
    prefilled once and attended by its rows without copies, and at most ``max_rows`` rows
    (default: all) decode at once: when a row is done the next waiting row takes its slot, and
    a finished row with none waiting leaves the batch. A row that produced no token in a step
    (waiting, or done) has next id -1 there. ``is_done(row, ids_so_far)`` is asked after each
    token of an unfinished row; a row is also done after ``max_gen_len`` tokens.
    """
    if shared is not None:
        yield from _decode_shared(model, rows, max_gen_len, temperature, top_p, generator,
                                  is_done, shared, prefix_index, max_rows)
        return
    batch = make_batch(model, rows, max_gen_len)
    logits = prefill(model, batch)
    B = len(rows)
    done = torch.zeros(B, dtype=torch.bool)
    ids: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_gen_len):
        nxt, lp = sample(logits, temperature, top_p, generator)
        nxt_cpu = nxt.tolist()
        for i in range(B):
            if not done[i]:
                ids[i].append(nxt_cpu[i])
                if is_done is not None and is_done(i, ids[i]):
                    done[i] = True
        yield nxt, lp, done.clone()
        if bool(done.all()) or step == max_gen_len - 1:
            return
        logits = decode_one_token(model, batch, nxt, batch.prompt_len + step)


def _decode_shared(model, rows, max_gen_len, temperature, top_p, generator, is_done, shared,
                   prefix_index, max_rows):
    N = len(rows)
    slots = N if max_rows is None else max(1, min(N, int(max_rows)))
    dec = SharedRows(model, shared, rows, list(prefix_index), slots, max_gen_len)
    waiting = list(range(slots, N))[::-1]  # popped from the end: rows in order
    logits = dec.start(list(range(slots)))
    done = torch.zeros(N, dtype=torch.bool)
    ids: list[list[int]] = [[] for _ in range(N)]
    dev = logits.device
    while True:
        nxt, lp = sample(logits, temperature, top_p, generator)
        if len(dec.slot_row) == N and dec.slot_row == list(range(N)):
            out_ids, out_lp = nxt, lp  # slot i holds row i
        else:
            out_ids = torch.full((N,), -1, dtype=nxt.dtype, device=dev)
            out_lp = torch.zeros(N, dtype=lp.dtype, device=dev)
            at = torch.tensor(dec.slot_row, device=dev)
            out_ids[at], out_lp[at] = nxt, lp
        finished = []
        for s, (r, t) in enumerate(zip(dec.slot_row, nxt.tolist())):
            ids[r].append(t)
            if len(ids[r]) >= max_gen_len or (is_done is not None and is_done(r, ids[r])):
                done[r] = True
                finished.append(s)
        yield out_ids, out_lp, done.clone()
        if bool(done.all()):
            return
        if not finished:  # every slot goes on: no rows to pick or refill
            logits = dec.step(nxt)
            continue
        refill = finished[:len(waiting)]
        new_rows = [waiting.pop() for _ in refill]
        going = [s for s in range(len(dec.slot_row)) if s not in set(finished)]
        logits = torch.empty(len(dec.slot_row), logits.shape[-1], dtype=logits.dtype, device=dev)
        if going:
            step_logits = dec.step(nxt[going] if len(going) < len(nxt) else nxt,
                                   going if len(going) < len(nxt) else None)
            logits[going] = step_logits
        if refill:
            logits[refill] = dec.refill(refill, new_rows)
        gone = finished[len(refill):]
        if gone:
            keep = [s for s in range(len(dec.slot_row)) if s not in set(gone)]
            dec.drop(gone)
            logits = logits[keep]
