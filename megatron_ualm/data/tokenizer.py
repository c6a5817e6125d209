"""Text tokenizers given by the user: a Hugging Face ``tokenizer.json`` or a sentencepiece model.

Messages are tokenised without any chat template: roles, modality markers and terminators are
UALM special tokens (``megatron_ualm.vocab``), placed by the sequence format.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (tokenizer and codec identity in shard sidecars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TextTokenizer:
    """Encodes text to ids with a Hugging Face ``tokenizers`` file or a sentencepiece model.

    Args:
        path: a ``tokenizer.json``, a directory holding one (a Qwen2.5 checkpoint directory),
            or a sentencepiece ``.model`` file.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            candidate = p / "tokenizer.json"
            if not candidate.is_file():
                raise FileNotFoundError(
                    f"tokenizer directory {p} has no tokenizer.json; give a tokenizer.json, a "
                    "directory that holds one, or a sentencepiece .model file"
                )
            p = candidate
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {p} does not exist")
        self.path = p
        if p.suffix == ".model":
            import sentencepiece

            self.kind = "sentencepiece"
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(p))
            self.vocab_size = int(self._sp.get_piece_size())
        else:
            from tokenizers import Tokenizer

            self.kind = "hf"
            self._hf = Tokenizer.from_file(str(p))
            self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))
        self.sha256 = file_sha256(p)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, with no BOS/EOS added."""
        if self.kind == "sentencepiece":
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (for inspection)."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def identity(self) -> dict:
        """What a shard sidecar records about the tokenizer."""
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256,
                "vocab_size": self.vocab_size}
