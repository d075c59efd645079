"LLaMA SentencePiece tokenizer: encode/decode with BOS/EOS, as LLaMA2-Accessory's Tokenizer."

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


class Tokenizer:
    def __init__(self, model_path: str | Path):
        from sentencepiece import SentencePieceProcessor

        path = Path(model_path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer model not found: {path}")
        sp = SentencePieceProcessor()
        try:
            ok = sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tokenizer model {path}: {e}") from None
        if not ok:
            raise CheckpointError(f"cannot read tokenizer model {path}")
        self.sp = sp
        self.path = path
        self.n_words: int = sp.vocab_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"expected text as str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def offsets(self, ids) -> list[int]:
        "Character offset in ``decode(ids)`` at which each token's text starts."
        ids = [int(i) for i in ids]
        return [len(self.decode(ids[:k])) for k in range(len(ids))]
