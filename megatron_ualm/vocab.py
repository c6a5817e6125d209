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

from dataclasses import dataclass

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
