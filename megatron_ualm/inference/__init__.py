"""Generation with a UALM model: KV-cache decoding under the delay pattern with classifier-free
guidance (``decoding``), prompts and replies in the sequence format (``prompt``), codec
decoding and audio in (``audio``), the conversation API (``pipeline``) and the UALM-Reason
loops (``reasoning``); the model from a checkpoint and the flags that name it
(``checkpoint``)."""

from megatron_ualm.inference.audio import AudioListener, CodecDecoder, Upsampler, load_upsampler, write_wav
from megatron_ualm.inference.decoding import Generation, GenerationParams, Generator
from megatron_ualm.inference.pipeline import UALM, Reply, Turn
from megatron_ualm.inference.prompt import Prompt, Segment, build_prompt, empty_condition_prompt, parse_response
from megatron_ualm.inference.sampling import GREEDY, SamplingParams

__all__ = [
    "AudioListener", "CodecDecoder", "Upsampler", "load_upsampler", "write_wav",
    "Generation", "GenerationParams", "Generator", "UALM", "Reply", "Turn",
    "Prompt", "Segment", "build_prompt", "empty_condition_prompt", "parse_response",
    "GREEDY", "SamplingParams",
]
