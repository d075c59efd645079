"""`SphinxModel`: the user-facing model object (load, preprocess, logits, generate, stream, chat)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from . import dist
from .conversation import RESPONSE_END, build_prompt
from .errors import CheckpointError
from .generate import Generation, decode_stream
from .checkpoint import build_meta, check_keys, find_shards, load_shard, materialize, read_config
from .model import SphinxConfig, Transformer
from .tokenizer import Tokenizer
from .transforms import PaddedResize

STOP = (RESPONSE_END,)


class SphinxModel:
    """A SPHINX model (this process's model-parallel slice) with its tokenizer.

    Example:
        >>> m = SphinxModel.from_pretrained(make_tiny_checkpoint("/tmp/tiny"))
        >>> m.chat([["What is in the image?", None]], image)
    """

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.cfg = transformer.cfg
        self.transform = PaddedResize(self.cfg.image_size)
        self.load_stats: dict = {}
        # {task: {option: value}}: the prompt wording this checkpoint was trained on
        # (its task_options.json); run_task, label and serve start from these options.
        self.task_options: dict[str, dict] = {}
        # The Generations of the latest generate / generate_multi / stream call (a stream's
        # logprobs and finish reason are read here once it is exhausted).
        self.last_generations: list[Generation] = []

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | SphinxConfig, tokenizer_path=None, device="meta",
                    dtype=torch.float32, mp_group=None, seed: int | None = None) -> "SphinxModel":
        """Build a model from a preset name or a SphinxConfig.

        On ``device="meta"`` nothing is allocated (shapes only). On a real device the weights
        are random (``seed``), e.g. for tests; use ``from_pretrained`` for real weights.
        """
        cfg = SphinxConfig.from_name(config) if isinstance(config, str) else config
        dist.init_model_parallel(mp_group if isinstance(mp_group, int) else None)
        tok = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
        if tok is not None and tok.n_words != cfg.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_path} has {tok.n_words} words, config vocab_size is "
                f"{cfg.vocab_size}"
            )
        model = build_meta(cfg)
        if str(device) != "meta":
            from .tiny import init_random_

            model = model.to_empty(device=device).to(dtype)
            init_random_(model, seed=0 if seed is None else seed)
            model.requires_grad_(False)
        return cls(model.eval(), tok)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, mp_group=None,
                        quantize: str | None = None) -> "SphinxModel":
        """Load a checkpoint folder (``consolidated.NN-of-MM.model.pth``, ``tokenizer.model``,
        ``config.json``, ``meta.json``, optionally ``task_options.json``) into this process's
        model-parallel slice.

        Args:
            path: the folder, or ``"demo"`` for the embedded demo model when it is installed.
            device: where the weights go (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
            dtype: weight dtype (``torch.float32`` or ``torch.bfloat16``...).
            mp_group: the model-parallel size (int) or ``None`` (existing fairscale groups, or the
                whole torchrun world, or 1 in a plain process).
            quantize: ``"int8"`` stores the LLM's linear weights as int8 with per-channel scales
                (weight-only, torchao; see ``quantize.py``), or None.
        """
        from .checkpoint import read_task_options, resolve
        from .quantize import check_mode, quantize_llm

        check_mode(quantize)
        t0 = time.perf_counter()
        path = resolve(path)
        shards_files = find_shards(path)
        tok_file = path / "tokenizer.model"
        if not tok_file.is_file():
            raise CheckpointError(f"no tokenizer.model in {path}")
        tokenizer = Tokenizer(tok_file)
        task_options = read_task_options(path)  # a bad file fails before the shards are read
        mp = dist.init_model_parallel(mp_group if isinstance(mp_group, int) else None)
        shards = [load_shard(f) for f in shards_files]
        keysets = {frozenset(sd) for sd in shards}
        if len(keysets) > 1:
            raise CheckpointError(f"the shards in {path} hold different tensor names")
        cfg = read_config(path, tokenizer.n_words, shards)  # sizes checked against the shards
        if cfg.n_heads % mp or cfg.n_kv_heads % mp:
            raise CheckpointError(
                f"n_heads {cfg.n_heads} (n_kv_heads {cfg.n_kv_heads}) of {path} is not divisible "
                f"by the model-parallel size {mp}"
            )
        if cfg.n_experts and cfg.ffn_hidden % mp:
            raise CheckpointError(
                f"the expert hidden_dim {cfg.ffn_hidden} of {path} is not divisible by the "
                f"model-parallel size {mp} (each expert's rows are split over the ranks)"
            )
        model = build_meta(cfg)
        check_keys(model, shards[0], path)
        materialize(model, shards, device, dtype, dist.mp_rank(), mp, path)
        del shards
        if quantize is not None:
            quantize_llm(model, quantize)
        m = cls(model.eval(), tokenizer)
        m.task_options = task_options
        m.load_stats = {"load_s": time.perf_counter() - t0, "checkpoint_mp": len(shards_files),
                        "runtime_mp": mp, "path": str(path)}
        return m

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.output.weight.dtype

    def state_dict(self) -> dict:
        "Parameters under their checkpoint names (without the ``llma.`` prefix)."
        return self.transformer.state_dict()

    # -- image ---------------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        "PIL image -> FloatTensor (3, S, S): padded resize and CLIP normalization."
        return self.transform.apply_image(image)

    def _image_tensor(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            t = image
        else:
            t = self.preprocess(image)
        s = self.cfg.image_size
        if t.shape != (3, s, s):
            raise ValueError(f"image tensor must have shape (3, {s}, {s}), got {tuple(t.shape)}")
        return t

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        "(B, 3, S, S) preprocessed images -> (B, image_tokens, dim) embeddings."
        return self.transformer.encode_image(images.to(self.device, self.dtype))

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Text-position logits, as the reference's training forward.

        Args:
            tokens: LongTensor (B, T), BOS first.
            images: FloatTensor (B, 3, S, S) preprocessed, or None.

        Returns:
            FloatTensor (B, T, V): row j predicts token j+1.
        """
        tr = self.transformer
        tokens = tokens.to(self.device)
        img = self.encode_images(images) if images is not None else None
        h = tr.embed(tokens, img)
        B, L, _ = h.shape
        positions = torch.arange(L, device=self.device).expand(B, L)
        tr.clear_caches()
        return tr(h, positions, keep_last=tokens.shape[1])

    # -- generation ----------------------------------------------------------------------------
    def _rows(self, prompts: Sequence[str], images) -> list[torch.Tensor]:
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        feats = self._encode_list(images)
        tr = self.transformer
        rows = []
        with torch.inference_mode():
            for i, p in enumerate(prompts):
                ids = torch.tensor(self.tokenizer.encode(p, bos=True), device=self.device)
                img = feats.get(i)
                rows.append(tr.embed(ids[None], None if img is None else img[None])[0])
        return rows

    def _stop_check(self, stop: Sequence[str], budgets: list[int]):
        eos, tok = self.tokenizer.eos_id, self.tokenizer
        window = 8 + 2 * max((len(tok.encode(s, bos=False)) for s in stop), default=0)

        def is_done(row: int, ids: list[int]) -> bool:
            if ids[-1] == eos or len(ids) >= budgets[row]:
                return True
            tail = tok.decode(ids[-window:])
            return any(s in tail for s in stop)

        return is_done

    def _finish(self, ids: list[int], lps: list[float], stop: Sequence[str]) -> Generation:
        tok = self.tokenizer
        reason = "length"
        if tok.eos_id in ids:
            cut = ids.index(tok.eos_id)
            ids, lps, reason = ids[:cut], lps[:cut], "eos"
        text = tok.decode(ids)
        offsets = tok.offsets(ids)
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            end = min(hits)
            text, reason = text[:end], "stop"
            keep = sum(1 for o in offsets if o < end)
            ids, lps, offsets = ids[:keep], lps[:keep], offsets[:keep]
        return Generation(text, ids, lps, offsets, reason)

    def generate(self, prompts: Sequence[str], images=None, max_gen_len: int | Sequence[int] = 512,
                 temperature: float = 0.0, top_p: float = 0.95, stop: Sequence[str] = STOP,
                 seed: int = 0) -> list[Generation]:
        """Generate answers for full conversation prompts (see ``conversation.build_prompt``).

        Args:
            prompts: one prompt per row; rows may differ in length.
            images: per row a PIL image, a preprocessed (3, S, S) tensor, or None.
            max_gen_len: most tokens generated per row: one budget for all, or one per row.
            temperature: 0 for greedy; else softmax(logits / T) with top-p sampling.
            top_p: nucleus mass for sampling.
            stop: strings that end a row (cut from the text, never returned).
            seed: sampling seed, the same on every model-parallel rank.

        Returns:
            One ``Generation(text, token_ids, logprobs, offsets, finish_reason)`` per row.
        """
        stop = tuple(stop or ())
        for _ in self._steps(prompts, images, max_gen_len, temperature, top_p, stop, seed):
            pass
        return self.last_generations

    def generate_multi(self, images: Sequence, questions: Sequence[Sequence[str]],
                       max_gen_len: int | Sequence[Sequence[int]] = 512, temperature: float = 0.0,
                       top_p: float = 0.95, stop: Sequence[str] = STOP,
                       seed: int = 0, max_rows: int | None = None,
                       on_image: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """Answer several prompts per image, sharing the work common to them.

        Each image is preprocessed and encoded once; the longest common token prefix of its
        prompts (BOS + image tokens + system prompt + ...) is prefilled once and attended by
        every prompt (no copies); the prompts of all images then decode as one batch of at most
        ``max_rows`` rows (default: all), a finished row's slot going to the next prompt. Greedy
        results equal independent :meth:`generate` calls.

        Args:
            images: per image a PIL image, a preprocessed (3, S, S) tensor, or None.
            questions: per image, its full conversation prompts.
            max_gen_len: one budget for every prompt, or per image one per prompt (a short
                answer's row stops at its own budget while longer ones go on).
            max_rows: most prompts decoded at once (continuous batching), or None for all.
            on_image: called with an image's index as soon as all its prompts are answered
                (while other images' prompts may still be decoding); once per image.

        Returns:
            Per image, one Generation per prompt, in order.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} question lists")
        flat = [p for qs in questions for p in qs]
        if not flat:
            for j in range(len(images) if on_image is not None else 0):
                on_image(j)
            return [[] for _ in images]
        if not all(isinstance(p, str) for p in flat):
            raise ValueError("every prompt must be a str")
        stop = tuple(stop or ())
        if not isinstance(max_gen_len, int):
            if len(max_gen_len) != len(questions) or any(
                    len(b) != len(qs) for b, qs in zip(max_gen_len, questions)):
                raise ValueError("`max_gen_len` per prompt must have the shape of `questions`")
            max_gen_len = [b for bs in max_gen_len for b in bs]
        shared, rows, index = self._shared_rows(images, questions)
        on_row = None
        if on_image is not None:
            image_of = [j for j, qs in enumerate(questions) for _ in qs]
            left = [len(qs) for qs in questions]
            for j in (j for j, n in enumerate(left) if n == 0):
                on_image(j)

            def on_row(row: int) -> None:
                j = image_of[row]
                left[j] -= 1
                if left[j] == 0:
                    on_image(j)
        for _ in self._decode(rows, max_gen_len, temperature, top_p, stop, seed, shared, index,
                              max_rows, on_row):
            pass
        out, k = [], 0
        for qs in questions:
            out.append(self.last_generations[k: k + len(qs)])
            k += len(qs)
        return out

    def _shared_rows(self, images, questions):
        tr, tok = self.transformer, self.tokenizer
        feats = self._encode_list(images)
        shared, rows, index = [], [], []
        with torch.inference_mode():
            for j, qs in enumerate(questions):
                if not qs:
                    continue
                ids = [tok.encode(p, bos=True) for p in qs]
                n = min(len(x) for x in ids) - 1  # every row keeps >= 1 token of its own
                lcp = next((i for i in range(n) if len({x[i] for x in ids}) > 1), n)
                img = feats.get(j)
                pre = torch.tensor(ids[0][:lcp], device=self.device)[None]
                shared.append(tr.embed(pre, None if img is None else img[None])[0])
                for x in ids:
                    rows.append(tr.tok_embeddings(torch.tensor(x[lcp:], device=self.device)[None])[0])
                    index.append(len(shared) - 1)
        return shared, rows, index

    def _encode_list(self, images) -> dict:
        idx = [i for i, im in enumerate(images) if im is not None]
        if not idx:
            return {}
        enc = self.encode_images(torch.stack([self._image_tensor(images[i]) for i in idx]))
        return {i: enc[j] for j, i in enumerate(idx)}

    def _steps(self, prompts, images, max_gen_len, temperature, top_p, stop, seed):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a list of strings, got {prompts!r:.80}")
        rows = self._rows(list(prompts), images)
        yield from self._decode(rows, max_gen_len, temperature, top_p, stop, seed)

    def _decode(self, rows, max_gen_len, temperature, top_p, stop, seed, shared=None, index=None,
                max_rows=None, on_row: Callable[[int], None] | None = None):
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: build it with tokenizer_path=...")
        B = len(rows)
        budgets = [max_gen_len] * B if isinstance(max_gen_len, int) else [int(b) for b in max_gen_len]
        if len(budgets) != B:
            raise ValueError(f"got {len(budgets)} `max_gen_len` budgets for {B} prompts")
        if min(budgets, default=1) < 1:
            raise ValueError(f"`max_gen_len` must be >= 1, got {min(budgets)}")
        ids: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        gen = dist.make_generator(seed, self.device)
        stream = decode_stream(self.transformer, rows, max(budgets, default=1), temperature, top_p,
                               gen, self._stop_check(stop, budgets), shared, index, max_rows)
        finished = [False] * B
        for nxt, lp, done in stream:
            nxt_l, lp_l, done_l = nxt.tolist(), lp.tolist(), done.tolist()
            for i in range(B):
                if not finished[i] and nxt_l[i] >= 0:  # -1: no token for row i in this step
                    ids[i].append(nxt_l[i])
                    lps[i].append(lp_l[i])
                    finished[i] = done_l[i]
                    if finished[i] and on_row is not None:
                        on_row(i)
            yield ids
        self.last_generations = [self._finish(ids[i], lps[i], stop) for i in range(B)]

    def stream(self, prompt: str, image=None, max_gen_len: int = 512, temperature: float = 0.0,
               top_p: float = 0.95, stop: Sequence[str] = STOP, seed: int = 0) -> Iterator[str]:
        "Yield the answer text so far after each token; stop strings (or their prefixes) never leak."
        stop = tuple(stop or ())
        last = ""
        for ids in self._steps([prompt], [image], max_gen_len, temperature, top_p, stop, seed):
            row = [i for i in ids[0] if i != self.tokenizer.eos_id]
            text = _hold_back(self.tokenizer.decode(row), stop)
            if text != last:
                last = text
                yield text
        final = self.last_generations[0].text
        if final != last:
            yield final

    def chat(self, qas: list, image=None, **sampling) -> str:
        "Answer the last question of ``[[q, a], ..., [q, None]]`` about ``image``."
        return self.generate([build_prompt(qas)], [image], **sampling)[0].text.strip()


def _hold_back(text: str, stop: Sequence[str]) -> str:
    "Cut at a stop string, and hold back a tail that may be the start of one."
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                return text[:-k]
    return text
