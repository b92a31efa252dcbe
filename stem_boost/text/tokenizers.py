"""The small tokenizer interface the evaluation suite uses (`encode` / `decode` / `bos_id`), a
byte tokenizer for models without a real one, and an adapter for Hugging Face tokenizers."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    name: str
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): the tokenizer of the tiny testbeds, and the
    character-level length measure of tasks built for models that have no real tokenizer."""

    name = "bytes"
    bos_id = None
    eos_id = None
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same interface. `encode` adds no special tokens (RULER
    counts lengths with ``tokenizer.tokenize(text)``); the runner prepends BOS itself."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str) -> "HFTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
