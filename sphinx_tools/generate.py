"""Batched decoding with a static KV cache, built from small functions (gpt-fast style).

Rows of a batch may have different lengths and different (or no) images. They are left-padded:
row i occupies cache slots ``pad_i .. T-1`` of the prompt and RoPE positions start at 0 on its
BOS, so each row computes what it would compute alone. Only the last position's logits are
computed; each decode step does constant work (the whole static cache is attended, masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .model import Transformer


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


@dataclass
class Batch:
    "Left-padded prompt embeddings and the bookkeeping the decode steps need."

    h: torch.Tensor  # (B, T, dim) embeddings still to prefill
    pad: torch.Tensor  # (B,) empty slots before each row's tokens: position = slot - pad
    valid: torch.Tensor  # (B, cache_len) key slot holds a real token of the row
    start: int = 0  # cache slot of h[:, 0]

    @property
    def prompt_len(self) -> int:
        "First cache slot after the prompt: where decoding starts."
        return self.start + self.h.shape[1]


def make_batch(model: Transformer, rows: list[torch.Tensor], max_gen_len: int) -> Batch:
    # rows: per-row embeddings (L_i, dim) -> left-padded Batch with a cache of T + max_gen_len
    B, T = len(rows), max(r.shape[0] for r in rows)
    dev, dt = rows[0].device, rows[0].dtype
    h = torch.zeros(B, T, rows[0].shape[-1], dtype=dt, device=dev)
    pad = torch.tensor([T - r.shape[0] for r in rows], device=dev)
    for i, r in enumerate(rows):
        h[i, T - r.shape[0]:] = r
    model.setup_caches(B, T + max_gen_len)
    valid = torch.arange(model.cache_len(), device=dev)[None, :] >= pad[:, None]
    return Batch(h, pad, valid)


def _mask(batch: Batch, q_slots: torch.Tensor) -> torch.Tensor:
    # q_slots: (Tq,) -> bool (B, 1, Tq, cache_len): causal, real keys only (a pad query sees itself)
    k = torch.arange(batch.valid.shape[1], device=q_slots.device)
    causal = k[None, :] <= q_slots[:, None]  # (Tq, S)
    own = k[None, :] == q_slots[:, None]
    return ((batch.valid[:, None, :] | own[None]) & causal[None])[:, None]


def prefill(model: Transformer, batch: Batch) -> torch.Tensor:
    # -> last-position logits (B, V)
    slots = torch.arange(batch.start, batch.prompt_len, device=batch.h.device)
    positions = (slots[None, :] - batch.pad[:, None]).clamp(min=0)  # (B, T)
    return model(batch.h, positions, _mask(batch, slots), slots, last_only=True)[:, -1]


def prefill_shared(model: Transformer, prefixes: list[torch.Tensor],
                   suffixes: list[tuple[int, torch.Tensor]], max_gen_len: int):
    """Prefill each shared prefix once, then every row's own suffix on a copy of its KV cache.

    Args:
        prefixes: per prefix, embeddings (P_j, dim) (e.g. BOS + image tokens + system prompt).
        suffixes: per row, ``(prefix index j, embeddings (L_i, dim))``; L_i >= 1.

    Returns:
        ``(batch, logits (rows, V))`` ready for :func:`decode_loop`.
    """
    S = max(x.shape[0] for _, x in suffixes)
    pre = make_batch(model, prefixes, S + max_gen_len)
    prefill(model, pre)  # fills the prefix slots of the cache, one row per prefix
    P = pre.prompt_len
    idx = torch.tensor([j for j, _ in suffixes], device=pre.h.device)
    model.select_caches(idx)  # (rows, ...) views of the prefix caches
    rows = [x for _, x in suffixes]
    h = torch.zeros(len(rows), S, rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
    gap = torch.tensor([S - r.shape[0] for r in rows], device=h.device)
    for i, r in enumerate(rows):
        h[i, S - r.shape[0]:] = r
    k = torch.arange(pre.valid.shape[1], device=h.device)[None, :]
    hole = (k >= P) & (k < P + gap[:, None])  # padding between a row's prefix and suffix
    batch = Batch(h, pre.pad[idx] + gap, pre.valid[idx] & ~hole, start=P)
    return batch, prefill(model, batch)


def decode_one_token(model: Transformer, batch: Batch, tok: torch.Tensor, slot: int):
    # tok: (B,) the token placed at cache slot `slot` -> logits (B, V)
    slots = torch.tensor([slot], device=tok.device)
    positions = (slot - batch.pad)[:, None]  # (B, 1)
    h = model.tok_embeddings(tok[:, None])
    return model(h, positions, _mask(batch, slots), slots)[:, -1]


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(next_ids (B,), logprobs (B,), done (B,) bool)`` once per generated token.

    ``rows`` are per-row prompt embeddings; with ``shared`` (prefix embeddings) and
    ``prefix_index`` (row -> prefix), rows hold only what follows their prefix, and each prefix
    is prefilled once. ``is_done(row, ids_so_far)`` is asked after each token of an unfinished
    row; the loop ends when every row is done or after ``max_gen_len`` tokens.
    """
    if shared is None:
        batch = make_batch(model, rows, max_gen_len)
        logits = prefill(model, batch)
    else:
        batch, logits = prefill_shared(model, shared, list(zip(prefix_index, rows)), max_gen_len)
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
