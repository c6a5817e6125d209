"""The one owner of UALM's token-id layout.

Stream 0 (text head, word embedding) ::

    [0, text_vocab_size)                         the text tokenizer's ids, unchanged
    [text_vocab_size, +NUM_RESERVED_SPECIAL)     UALM special tokens (SPECIAL_TOKENS, then
                                                 reserved slots for later markers)
    [.., vocab_size)                             padding rows (never produced by data)

Codebook streams 1..K: each cell holds a code in ``[0, codebook_size)`` or ``empty``
(``== codebook_size``) for a cell with no code: outside audio, and the delay-pattern cells.
Empty cells contribute nothing to the input embedding and carry no loss. The codebook
embedding table stacks the K codebooks: code ``c`` of codebook ``k`` is row ``k * card + c``.

Placing the specials right after the tokenizer keeps every text id of a pretrained
checkpoint (Qwen2.5: 151665 tokenizer ids, 151936 / 152064 embedding rows) where it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ualm.config import NUM_RESERVED_SPECIAL_TOKENS, UALMConfig

ROLES = ("system", "user", "assistant")
MODALITIES = ("text", "audio")

# Order is part of the checkpoint format: append, never reorder.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",        # end of a message
    "<|eot|>",        # end of a message when the next message has the same role
    "<|pad|>",        # sequence padding (no loss, masked out of attention by position)
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|text|>",       # modality marker: text content follows
    "<|audio|>",      # modality marker: audio content follows
    "<|audio_in|>",   # placeholder, one per 25 Hz encoder frame; replaced by adapter output
    "<|audio_out|>",  # stream-0 token at each delayed step that still starts a frame
    "<|audio_flush|>",  # stream-0 token at the K - 1 steps after the last frame
)
assert len(SPECIAL_TOKENS) <= NUM_RESERVED_SPECIAL_TOKENS


@dataclass(frozen=True)
class UALMVocab:
    """Token ids of stream 0 and the codebook streams.

    Args:
        text_vocab_size: size of the text tokenizer's vocabulary.
        vocab_size: rows of the stream-0 embedding (text + specials + padding).
        num_codebooks: K.
        codebook_size: card, codes per codebook.
    """

    text_vocab_size: int
    vocab_size: int
    num_codebooks: int
    codebook_size: int

    def __post_init__(self) -> None:
        if self.vocab_size < self.text_vocab_size + NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError(
                f"vocab_size={self.vocab_size} < text_vocab_size={self.text_vocab_size} + "
                f"{NUM_RESERVED_SPECIAL_TOKENS} reserved special tokens"
            )

    @classmethod
    def from_config(cls, config: UALMConfig) -> "UALMVocab":
        """The vocabulary layout a model config implies."""
        return cls(
            config.text_vocab_size, config.vocab_size, config.num_codebooks, config.codebook_size
        )

    def special(self, token: str) -> int:
        """Id of a special token given by its text, e.g. ``special("<|eos|>")``."""
        try:
            return self.text_vocab_size + SPECIAL_TOKENS.index(token)
        except ValueError:
            raise ValueError(f"{token!r} is not a UALM special token; see SPECIAL_TOKENS") from None

    def role(self, name: str) -> int:
        """Id of a role marker (system / user / assistant)."""
        if name not in ROLES:
            raise ValueError(f"role {name!r} is not one of {ROLES}")
        return self.special(f"<|{name}|>")

    def modality(self, name: str) -> int:
        """Id of a modality marker (text / audio)."""
        if name not in MODALITIES:
            raise ValueError(f"modality {name!r} is not one of {MODALITIES}")
        return self.special(f"<|{name}|>")

    @property
    def bos(self) -> int:
        return self.special("<|bos|>")

    @property
    def eos(self) -> int:
        return self.special("<|eos|>")

    @property
    def eot(self) -> int:
        return self.special("<|eot|>")

    @property
    def pad(self) -> int:
        return self.special("<|pad|>")

    @property
    def audio_in(self) -> int:
        return self.special("<|audio_in|>")

    @property
    def audio_out(self) -> int:
        return self.special("<|audio_out|>")

    @property
    def audio_flush(self) -> int:
        return self.special("<|audio_flush|>")

    @property
    def audio_steps(self) -> tuple:
        """Stream-0 ids of delayed audio steps (frame steps, then flush steps)."""
        return (self.audio_out, self.audio_flush)

    @property
    def code_empty(self) -> int:
        """The codebook-stream id of a cell that holds no code."""
        return self.codebook_size

    @property
    def codebook_table_size(self) -> int:
        """Rows of the stacked codebook embedding, K * card."""
        return self.num_codebooks * self.codebook_size

    def is_special(self, token_id: int) -> bool:
        return self.text_vocab_size <= token_id < self.text_vocab_size + NUM_RESERVED_SPECIAL_TOKENS

    def token_name(self, token_id: int) -> str:
        """Readable name of a stream-0 special id (for inspection tools)."""
        offset = token_id - self.text_vocab_size
        if 0 <= offset < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[offset]
        if 0 <= offset < NUM_RESERVED_SPECIAL_TOKENS:
            return f"<|reserved_{offset}|>"
        raise ValueError(f"id {token_id} is not a special token")

    def codebook_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Maps codes ``[..., K, T]`` to rows of the stacked codebook table (empty -> 0).

        Use together with ``codes != code_empty`` as the validity mask.
        """
        offsets = torch.arange(self.num_codebooks, device=codes.device) * self.codebook_size
        return codes.clamp(max=self.codebook_size - 1) + offsets[:, None]


# ---------------------------------------------------------------------------------------------
# The token-id layout as data: what a checkpoint or a shard was built with, and its fingerprint.
#
# A model's stream-0 ids mean something only together with the tokenizer that produced the text
# ids, the offset where the specials start (text_vocab_size), the specials' order, and the
# codebook geometry (K, card). These are stored with every checkpoint and every shard sidecar and
# compared wherever two of them meet (resume, blend, generation, export), so a tokenizer or a
# special-token order that changed silently is refused with both sides named.

LAYOUT_VERSION = 1


def vocab_layout(
    tokenizer: Optional[dict] = None,
    text_vocab_size: Optional[int] = None,
    num_codebooks: Optional[int] = None,
    codebook_size: Optional[int] = None,
) -> dict:
    """The token-id layout as a plain dict (JSON-able); unknown parts are None.

    Args:
        tokenizer: ``TextTokenizer.identity()`` (or any dict with ``sha256`` and
            ``vocab_size``); None when no tokenizer is known (synthetic data, a bare HF dir).
        text_vocab_size: where the specials start (the model's; shards leave it None).
        num_codebooks: K (None for data without audio out).
        codebook_size: card.
    """
    tok = None
    if tokenizer is not None:
        tok = {"sha256": tokenizer.get("sha256"), "vocab_size": tokenizer.get("vocab_size")}
    return {
        "version": LAYOUT_VERSION,
        "tokenizer": tok,
        "text_vocab_size": text_vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "num_codebooks": num_codebooks,
        "codebook_size": codebook_size,
    }


def layout_fingerprint(layout: dict) -> str:
    """A short stable hash of a layout (16 hex digits); key order does not matter."""
    blob = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layout_differences(a: dict, b: dict) -> list[str]:
    """What differs between two layouts, comparing only the parts both sides know.

    Special tokens are append-only (``SPECIAL_TOKENS``): one list extending the other is
    compatible, any other change is not. A tokenizer's ``vocab_size`` larger than the other
    side's ``text_vocab_size`` would put text ids on special rows.
    """
    out = []
    ta, tb = a.get("tokenizer"), b.get("tokenizer")
    if ta and tb and ta.get("sha256") and tb.get("sha256") and ta["sha256"] != tb["sha256"]:
        out.append(f"tokenizer sha256 {ta['sha256'][:12]}... vs {tb['sha256'][:12]}...")
    for key in ("text_vocab_size", "num_codebooks", "codebook_size"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            out.append(f"{key} {a[key]} vs {b[key]}")
    for tok, other in ((ta, b), (tb, a)):
        if tok and tok.get("vocab_size") and other.get("text_vocab_size") and tok["vocab_size"] > other["text_vocab_size"]:
            out.append(f"tokenizer has {tok['vocab_size']} ids but text_vocab_size is {other['text_vocab_size']} "
                       "(text ids would land on special rows)")
    sa, sb = a.get("special_tokens"), b.get("special_tokens")
    if sa is not None and sb is not None:
        n = min(len(sa), len(sb))
        if list(sa[:n]) != list(sb[:n]):
            first = next(i for i in range(n) if sa[i] != sb[i])
            out.append(f"special token {first} is {sa[first]!r} vs {sb[first]!r} (special-token order changed)")
    return out


class VocabMismatch(ValueError):
    """Two token-id layouts that cannot be used together."""


def check_layouts(a: dict, a_name: str, b: dict, b_name: str,
                  hint: str = "Use the tokenizer, codec and flavor the checkpoint was trained with, or rebuild the data.") -> None:
    """Raises ``VocabMismatch`` naming both sides and every difference.

    Args:
        a, b: layouts (``vocab_layout``); either may be None (nothing to compare).
        a_name, b_name: what each side is, e.g. ``"checkpoint ckpt/iter_0000100"``.
        hint: what to do about it, appended to the message.
    """
    if not a or not b:
        return
    diffs = layout_differences(a, b)
    if diffs:
        raise VocabMismatch(
            f"token-id layout mismatch between {a_name} (fingerprint {layout_fingerprint(a)}) and {b_name} "
            f"(fingerprint {layout_fingerprint(b)}): " + "; ".join(diffs)
            + f". {hint}"
        )
