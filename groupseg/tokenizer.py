"""Tokenizers: open_clip's BPE (shipped inside open_clip, works offline) or a Hugging Face tokenizer."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch


class BPETokenizer:
    """CLIP's byte-pair tokenizer, padded with 0 and truncated to ``context_length``
    (the end-of-text token is kept as the last token of a truncated text).

    Args:
        context_length: output length.
    """

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.sot = self._tok.encoder["<start_of_text>"]
        self.eot = self._tok.encoder["<end_of_text>"]
        self.vocab_size = len(self._tok.encoder)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) int64 ids."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self._tok.encode(t)[: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local files, returning ids padded to ``context_length``."""

    def __init__(self, path: str | Path, context_length: int = 77) -> None:
        from transformers import AutoTokenizer

        self.context_length = context_length
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt")
        return enc["input_ids"]


@lru_cache(maxsize=4)
def _bpe(context_length: int) -> BPETokenizer:
    return BPETokenizer(context_length)


def get_tokenizer(cfg=None, weights_dir: str | Path | None = None):
    """The tokenizer that matches a model config (BPE unless the text tower is a Hugging Face encoder)."""
    if cfg is not None and cfg.text.kind == "hf":
        if weights_dir is None or not (Path(weights_dir) / "tokenizer").exists():
            raise ValueError("a Hugging Face text tower needs its tokenizer/ folder beside the weights")
        return HFTokenizer(Path(weights_dir) / "tokenizer", cfg.text.context_length)
    return _bpe(cfg.text.context_length if cfg is not None else 77)


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """BPE-tokenize texts into (N, context_length) int64 ids."""
    return _bpe(context_length)(texts)
