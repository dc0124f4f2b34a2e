"""Text tokenizers for the LiT text tower, all working offline.

Two tokenizers share one framing, the XLM-R/fairseq convention of the MAWS CLIP models
(fairseq/data/dictionary.py; XLM-R, Conneau et al. 2020, arXiv 1911.02116; facebookresearch/maws
maws/model.py): ``<s>`` = 0 (BOS), ``<pad>`` = 1, ``</s>`` = 2 (EOS), ``<unk>`` = 3; a text becomes
``[0, t_1 .. t_k, 2]`` with ``k <= max_tokens``, right-padded with 1 to
``max_tokens + 2`` (MAWS: 100 tokens, length 102). Using pad = 1 everywhere means the text
tower's learned positions (offset by the padding index) are the same code for every tokenizer.

* :class:`ByteTokenizer` (the default): UTF-8 bytes, id = 4 + byte. Nothing to download or
  train, any language, 260 ids: right for the CPU demo and for small custom captions.
* :class:`SentencePieceTokenizer`: the XLM-R SentencePiece model from a user-given ``.model``
  file (e.g. MAWS's ``xlmr.sentencepiece.bpe.model``). fairseq's dictionary puts its four
  specials first and keeps SentencePiece's own order after them, so a regular piece with
  SentencePiece id ``i`` has id ``i + 1``, SentencePiece ``<unk>`` (0) maps to 3, and the last
  id (``vocab_size - 1``, 250001 for XLM-R) is ``<mask>``; hence ``vocab_size = pieces + 2``.

``describe()`` returns what :func:`tokenizer_from_info` needs to rebuild a tokenizer, so a
trained LiT model can be reloaded with the exact tokenizer it was trained with.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4  # <s>, <pad>, </s>, <unk>
MAWS_MAX_TOKENS = 100  # truncation of the MAWS CLIP tokenizer (length 102 with BOS/EOS)
BYTE_MAX_TOKENS = 78  # default for bytes: the synthetic captions are < 80 bytes 95% of the time


class Tokenizer(ABC):
    """Shared framing: truncate, add BOS/EOS, pad to a fixed length, return a LongTensor."""

    kind = "base"
    vocab_size: int

    def __init__(self, max_tokens: int):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        self.max_tokens = int(max_tokens)

    @property
    def context_length(self) -> int:
        """Tokens per text, BOS and EOS included (the tensor width)."""
        return self.max_tokens + 2

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without specials and without truncation."""

    def frame(self, ids: Sequence[int]) -> list[int]:
        """``[BOS] + ids[:max_tokens] + [EOS]`` padded with ``PAD_ID`` to ``context_length``."""
        body = [BOS_ID, *ids[: self.max_tokens], EOS_ID]
        return body + [PAD_ID] * (self.context_length - len(body))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, context_length) int64 ids; a single string gives N = 1."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.frame(self.encode(text)) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description; :func:`tokenizer_from_info` rebuilds the tokenizer."""
        return {"kind": self.kind, "max_tokens": self.max_tokens, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past the four specials: ships with the code, never unknown."""

    kind = "bytes"
    vocab_size = NUM_SPECIALS + 256

    def __init__(self, max_tokens: int = BYTE_MAX_TOKENS):
        super().__init__(max_tokens)

    def encode(self, text: str) -> list[int]:
        return [NUM_SPECIALS + byte for byte in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - NUM_SPECIALS for i in ids if NUM_SPECIALS <= i < NUM_SPECIALS + 256)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with fairseq/XLM-R id conventions (MAWS CLIP text towers)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, max_tokens: int = MAWS_MAX_TOKENS):
        super().__init__(max_tokens)
        try:
            import sentencepiece
        except ImportError as error:  # pragma: no cover - sentencepiece is a dependency
            raise ImportError("the XLM-R tokenizer needs the sentencepiece package") from error
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_file}")
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self._spm_unk = self._processor.unk_id()
        pieces = self._processor.get_piece_size()
        self.vocab_size = pieces + 2  # 4 fairseq specials replace SentencePiece's 3, plus <mask>
        self.mask_id = self.vocab_size - 1

    def to_fairseq(self, spm_id: int) -> int:
        """SentencePiece id -> fairseq dictionary id (regular pieces shift by one)."""
        if spm_id == self._spm_unk:
            return UNK_ID
        if self._processor.is_control(spm_id):  # <s>/</s> never come out of encode(); be safe
            return {self._processor.bos_id(): BOS_ID, self._processor.eos_id(): EOS_ID}.get(spm_id, UNK_ID)
        return spm_id + 1

    def encode(self, text: str) -> list[int]:
        return [self.to_fairseq(i) for i in self._processor.encode(text, out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        spm_ids = [i - 1 for i in ids if NUM_SPECIALS <= i < self.mask_id]
        return self._processor.decode(spm_ids)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_file": str(self.model_file)}

    def copy_model_to(self, directory: Path, name: str = "tokenizer.model") -> Path:
        """Copy the ``.model`` file beside exported weights so a run directory is self-contained."""
        target = Path(directory) / name
        if self.model_file.resolve() != target.resolve():
            shutil.copyfile(self.model_file, target)
        return target


def build_tokenizer(spec: str = "bytes", max_tokens: int = 0) -> Tokenizer:
    """``"bytes"`` (or empty) -> :class:`ByteTokenizer`; a ``.model`` path -> SentencePiece.

    ``max_tokens`` = 0 picks the tokenizer's default (bytes 78, SentencePiece 100 as MAWS).
    """
    if spec in ("", "bytes", "byte"):
        return ByteTokenizer(max_tokens or BYTE_MAX_TOKENS)
    path = Path(spec)
    if path.suffix != ".model" and not path.is_file():
        raise ValueError(f"tokenizer must be 'bytes' or a SentencePiece .model file, got {spec!r}")
    return SentencePieceTokenizer(path, max_tokens or MAWS_MAX_TOKENS)


def tokenizer_from_info(info: dict[str, Any], base_dir: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.describe` output.

    A relative ``model_file`` is looked up in ``base_dir`` (the run directory) first.
    """
    kind = info.get("kind", "bytes")
    max_tokens = int(info.get("max_tokens", 0))
    if kind == "bytes":
        return ByteTokenizer(max_tokens or BYTE_MAX_TOKENS)
    if kind == "sentencepiece":
        model_file = Path(info["model_file"])
        if base_dir is not None and not model_file.is_absolute():
            model_file = Path(base_dir) / model_file
        return SentencePieceTokenizer(model_file, max_tokens or MAWS_MAX_TOKENS)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'bytes' or 'sentencepiece')")
