"""Batched decoding on the Megatron model with a KV cache, the delay pattern and CFG.

The decoding loop, per step (one position for every row of the batch):

1. the model runs the new column (stream-0 token + K codebook cells) against Megatron-Core's
   ``StaticInferenceContext`` KV cache and returns gathered logits at the last position;
2. with classifier-free guidance, rows ``[B, 2B)`` are the unconditional twins of rows
   ``[0, B)`` (same reply, empty condition, their own cache rows); rows in an audio message
   use ``uncond + w * (cond - uncond)`` for stream 0 and every codebook;
3. each row picks its next column from its state:

   - *text*: a stream-0 id (text, ``<|eos|>``, ``<|eot|>``, ``<|assistant|>``, a modality
     marker); ``<|audio|>`` opens an audio message;
   - *audio*, step ``s`` of the delayed layout: codebook k holds frame ``s - k``; cells
     outside ``0 <= s - k < T`` are forced empty. Stream 0 is ``<|audio_out|>`` until the
     frame count T is fixed (by the length limit, or by the model predicting
     ``<|audio_flush|>`` once ``min_audio_seconds`` is reached); then ``K - 1`` flush steps
     (stream 0 ``<|audio_flush|>``) complete the last frames and the model picks the
     terminator (``<|eos|>`` ends the reply, ``<|eot|>`` continues it);
4. the column is fed to all rows (twins get their row's column).

Prompts of different lengths are left-padded; an explicit attention mask hides the padding
(RoPE is relative, so a left shift of positions changes nothing). Batches without padding pass
no mask. Under tensor parallelism every rank samples with the same seed and the picks are
broadcast from the TP source rank, so all ranks write identical columns.

Under pipeline parallelism each forward runs stage by stage: a stage receives the previous
stage's hidden states ``[q, N, h]``, runs its layers against its own KV cache and sends its
output on; the last stage samples, and its picks are broadcast over the pipeline group. Every
rank then advances the same row states, so every rank holds the whole batch's replies (the
``scores`` only on the last stage). Megatron-Core's ``inference.communication_utils`` do the
same sends but assert CUDA tensors; the plain ``torch.distributed`` calls here also run on
gloo, which is how the CPU tests check PP = 2 against PP = 1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ualm.codebooks.delay import delayed_length
from megatron_ualm.inference.prompt import Prompt, Segment, empty_condition_prompt, parse_response
from megatron_ualm.inference.sampling import SamplingParams, guide, sample
from megatron_ualm.inference.static_cache import DecodeGraph, StaticKVCache, has_local_attention
from megatron_ualm.vocab import SPECIAL_TOKENS, UALMVocab

TEXT, AUDIO, DONE = 0, 1, 2


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings shared by a batch.

    Args:
        text: selection of stream-0 ids in text messages.
        audio: selection of codebook codes (each codebook sampled on its own); its
            temperature also applies to the continue/stop choice on stream 0 in audio.
        cfg_weight: classifier-free guidance weight w for audio; None runs no unconditional
            stream (w = 1 with the stream is the same result at twice the cost).
        max_new_tokens: stream-0 ids a reply may write in text messages.
        max_audio_seconds: frames per audio message = seconds * codec frame rate.
        min_audio_seconds: the model may end an audio message only after this many seconds.
        max_audio_segments: audio messages per reply; afterwards ``<|audio|>`` is blocked.
        stop_at_eot: end the reply at ``<|eot|>`` as well (no modality switch).
        seed: sampling seed (the same on every TP rank).
        kv_cache: decode with the KV cache; False recomputes the whole sequence every step
            (a reference for tests).
        static_cache: keep keys and values in fixed-shape buffers (``static_cache.py``)
            instead of Megatron's ``StaticInferenceContext``; needs the local spec.
        cuda_graphs: capture the decode step once as a CUDA graph and replay it (GPU, local
            spec, PP = 1; implies ``static_cache``).
        output_scores: keep the logits each step chose from (tests, inspection).
    """

    text: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9)
    audio: SamplingParams = SamplingParams(temperature=1.0, top_k=250)
    cfg_weight: Optional[float] = 3.0
    max_new_tokens: int = 256
    max_audio_seconds: float = 10.0
    min_audio_seconds: float = 0.0
    max_audio_segments: int = 1
    stop_at_eot: bool = False
    seed: int = 0
    kv_cache: bool = True
    static_cache: bool = False
    cuda_graphs: bool = False
    output_scores: bool = False

    def __post_init__(self) -> None:
        if self.max_audio_seconds <= 0 or self.min_audio_seconds < 0:
            raise ValueError("max_audio_seconds must be > 0 and min_audio_seconds >= 0")
        if self.min_audio_seconds > self.max_audio_seconds:
            raise ValueError(f"min_audio_seconds={self.min_audio_seconds} > max_audio_seconds={self.max_audio_seconds}")
        if self.max_new_tokens < 1 or self.max_audio_segments < 0:
            raise ValueError("max_new_tokens must be >= 1 and max_audio_segments >= 0")
        if self.fixed_shape_cache and not self.kv_cache:
            raise ValueError("static_cache / cuda_graphs are ways to keep the KV cache: they need kv_cache=True")

    @property
    def fixed_shape_cache(self) -> bool:
        """Decode over ``StaticKVCache`` (asked for, or needed by the CUDA graph)."""
        return self.static_cache or self.cuda_graphs

    @cached_property
    def audio_stop(self) -> SamplingParams:
        """The stream-0 continue / stop choices inside audio: the audio temperature only."""
        return SamplingParams(temperature=self.audio.temperature)


@dataclass
class Generation:
    """One row's reply.

    Attributes:
        segments: the reply's messages (text ids or reverted codes ``[K, T]``).
        tokens: ``[S]`` generated stream-0 ids (after the prompt).
        codes: ``[K, S]`` generated codebook ids (delayed layout).
        finished: the reply ended with ``<|eos|>`` (or ``<|eot|>`` with ``stop_at_eot``)
            rather than a limit.
        scores: with ``output_scores``: per step ``(text [V], codes [K, card])`` logits the
            row chose from (guided in audio messages), before masking; kept on the last
            pipeline stage only (empty elsewhere).
    """

    segments: list[Segment]
    tokens: torch.Tensor
    codes: torch.Tensor
    finished: bool
    scores: list = field(default_factory=list)

    @property
    def audio(self) -> list[torch.Tensor]:
        """The ``[K, T]`` codes of each audio message."""
        return [s.codes for s in self.segments if s.modality == "audio"]

    @property
    def text(self) -> list[list[int]]:
        """The ids of each text message."""
        return [s.text for s in self.segments if s.modality == "text"]


@dataclass
class _Row:
    mode: int
    step: int = -1  # index of the last delayed audio step written
    frames: Optional[int] = None  # T of the open audio message, once fixed
    text_count: int = 0
    audio_segments: int = 0
    finished: bool = False


class Generator:
    """Decodes batches of prompts with a ``UALMModel`` (any TP and PP).

    Args:
        model: this rank's pipeline stage of the model (unwrapped); every rank of the
            model-parallel group calls ``generate`` with the same prompts and parameters.
    """

    def __init__(self, model) -> None:
        if getattr(model.config, "virtual_pipeline_model_parallel_size", None):
            raise ValueError("generation runs one model chunk per rank: build it without a virtual pipeline")
        self.model = model
        self.first, self.last = model.pre_process, model.post_process
        # Left padding is hidden by an explicit mask, which only the local attention applies.
        self._masks_padding = has_local_attention(model)
        self.config = model.config
        self.vocab: UALMVocab = model.vocab
        self.device = next(model.parameters()).device
        v = self.vocab
        V = self.config.vocab_size
        known = v.text_vocab_size + len(SPECIAL_TOKENS)
        self._text_allowed = torch.zeros(V, dtype=torch.bool, device=self.device)
        self._text_allowed[:known] = True
        for name in ("<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|audio_in|>", "<|audio_out|>", "<|audio_flush|>"):
            self._text_allowed[v.special(name)] = False
        self._terminators = torch.zeros(V, dtype=torch.bool, device=self.device)
        self._terminators[[v.eos, v.eot]] = True
        self._audio_continue = torch.zeros(V, dtype=torch.bool, device=self.device)
        self._audio_continue[v.audio_out] = True
        self._audio_end = torch.zeros(V, dtype=torch.bool, device=self.device)
        self._audio_end[v.audio_flush] = True

    # ------------------------------------------------------------------ model calls
    def _forward(self, tokens, codes, mask, features, lengths, context, position_ids=None):
        """One forward of this stage; the last stage returns the last position's logits
        ``([N, V], [N, K, card])``, the others ``(None, None)``."""
        if not self.first:
            hidden = torch.empty(
                (tokens.shape[1], tokens.shape[0], self.config.hidden_size),
                dtype=self.config.pipeline_dtype or self.config.params_dtype, device=self.device,
            )
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        out = self.model(
            input_ids=tokens,
            codes=codes,
            position_ids=position_ids,
            attention_mask=mask,
            audio_in_features=features,
            audio_in_lengths=lengths,
            gather_output=True,
            inference_context=context,
        )
        if not self.last:
            torch.distributed.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None, None
        text, code = out
        return text[:, -1].float(), code[:, :, -1].float()  # [N, V], [N, K, card]

    @staticmethod
    def _mask(valid: torch.Tensor, queries: int, padded: bool = True) -> Optional[torch.Tensor]:
        """``[N, 1, q, sk]`` bool (True = masked): causal over the last ``q`` of ``sk`` keys,
        padding hidden; None when nothing is padded."""
        if not padded:
            return None
        sk = valid.shape[1]
        q_pos = torch.arange(sk - queries, sk, device=valid.device)[:, None]
        causal = torch.arange(sk, device=valid.device)[None, :] <= q_pos  # [q, sk]
        return ~(causal[None, None] & valid[:, None, None, :])

    def _broadcast(self, picks: torch.Tensor) -> torch.Tensor:
        """Makes every rank hold the picks of the last stage's TP source rank (in place)."""
        if self.last and parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                picks,
                src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                picks,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return picks

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams = GenerationParams()) -> list[Generation]:
        """Decodes one reply per prompt.

        Args:
            prompts: the batch (any lengths; from ``build_prompt``).
            params: decoding settings.

        Returns:
            One ``Generation`` per prompt, in order.
        """
        v, K = self.vocab, self.config.num_codebooks
        B = len(prompts)
        cfg = params.cfg_weight is not None
        rows = list(prompts) + ([empty_condition_prompt(v, p.modality) for p in prompts] if cfg else [])
        N = len(rows)
        frame_rate = self.config.codec_frame_rate
        max_frames = max(1, int(round(params.max_audio_seconds * frame_rate)))
        min_frames = int(math.ceil(params.min_audio_seconds * frame_rate))
        budget = params.max_new_tokens + params.max_audio_segments * (max_frames + K + 2) + 1
        L = max(len(p) for p in rows)
        total = L + budget
        if total > self.config.max_sequence_length:
            raise ValueError(
                f"prompt ({L}) + reply budget ({budget} steps) exceeds max_sequence_length="
                f"{self.config.max_sequence_length}: lower max_new_tokens / max_audio_seconds"
            )

        dev = self.device
        tokens = torch.full((N, total), v.pad, dtype=torch.long, device=dev)
        codes = torch.full((N, K, total), v.code_empty, dtype=torch.long, device=dev)
        valid = torch.zeros(N, total, dtype=torch.bool, device=dev)
        feats, lens = [], []
        for r, p in enumerate(rows):
            off = L - len(p)
            tokens[r, off:L] = p.tokens.to(dev)
            codes[r, :, off:L] = p.codes.to(dev)
            valid[r, off:L] = True
            if p.audio_in_features is not None:
                feats.append(p.audio_in_features)
                lens.append(p.audio_in_lengths)
        padded = any(len(p) < L for p in rows)  # generated columns are never padding
        if padded and not self._masks_padding:
            raise ValueError(
                "prompts of different lengths (CFG's unconditional rows included) are left-padded and "
                "need a padding mask, which Transformer Engine's causal attention ignores: build the "
                "model with transformer_impl='local' for generation (checkpoints trained with TE load "
                "into it), or decode prompts of one length without CFG"
            )
        features = torch.cat(feats).to(dev) if feats else None
        lengths = torch.cat(lens).to(dev) if lens else None

        state = [_Row(mode=AUDIO if p.modality == "audio" else TEXT) for p in prompts]
        for st in state:
            st.audio_segments = int(st.mode == AUDIO)
        scores: list[list] = [[] for _ in range(B)]
        generator = torch.Generator(device=dev).manual_seed(params.seed)

        if params.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a GPU (static_cache=True runs the same decode eagerly)")
        if params.cuda_graphs and not (self.first and self.last):
            raise ValueError("CUDA-graph decoding runs the whole model per rank: use pipeline_model_parallel_size=1")
        cache = StaticKVCache(N, total, dev) if params.fixed_shape_cache else None
        context = StaticInferenceContext(N, total) if params.kv_cache and cache is None else None
        with cache.attached(self.model) if cache is not None else contextlib.nullcontext():
            pos = L  # next position to write
            text_logits, code_logits = self._forward(
                tokens[:, :L], codes[:, :, :L], self._mask(valid[:, :L], L, padded), features, lengths, context
            )
            if context is not None:
                context.sequence_len_offset += L
            if cache is not None:
                cache.prefilled(valid[:, :L])
                # Decode inputs live in fixed buffers, so a captured step reads each new column.
                in_tok = torch.empty((N, 1), dtype=torch.long, device=dev)
                in_codes = torch.empty((N, K, 1), dtype=torch.long, device=dev)

                def step():
                    return self._forward(in_tok, in_codes, cache.mask, None, None, None, cache.positions)

                if params.cuda_graphs:
                    step = DecodeGraph(step)

            while pos < total and any(st.mode != DONE for st in state):
                if self.last:
                    picks = self._choose(text_logits, code_logits, state, params, min_frames, generator, scores)
                else:
                    picks = torch.empty((B, 3 + K), dtype=torch.long, device=dev)
                picks = self._broadcast(picks).tolist()

                col_tok, col_codes = [v.pad] * B, [[v.code_empty] * K for _ in range(B)]
                for r, st in enumerate(state):
                    if st.mode == DONE:
                        continue
                    tok, cells = self._advance(st, picks[r], params, max_frames)
                    col_tok[r] = tok
                    if cells is not None:
                        col_codes[r] = cells
                reps = 2 if cfg else 1
                new_tok = torch.tensor(col_tok * reps, dtype=torch.long).to(dev, non_blocking=True)  # [N]
                new_codes = torch.tensor(col_codes * reps, dtype=torch.long).to(dev, non_blocking=True)  # [N, K]
                tokens[:, pos] = new_tok
                codes[:, :, pos] = new_codes
                valid[:, pos] = True
                pos += 1
                if all(st.mode == DONE for st in state) or pos >= total:
                    break
                if cache is not None:
                    in_tok.copy_(tokens[:, pos - 1 : pos])
                    in_codes.copy_(codes[:, :, pos - 1 : pos])
                    cache.advance(pos - 1)
                    text_logits, code_logits = step()
                elif context is not None:
                    text_logits, code_logits = self._forward(
                        tokens[:, pos - 1 : pos], codes[:, :, pos - 1 : pos],
                        self._mask(valid[:, :pos], 1, padded), None, None, context,
                    )
                    context.sequence_len_offset += 1
                else:
                    text_logits, code_logits = self._forward(
                        tokens[:, :pos], codes[:, :, :pos], self._mask(valid[:, :pos], pos, padded), features, lengths, None
                    )

        out = []
        for r, p in enumerate(prompts):
            gen_tok, gen_codes = tokens[r, L:pos].cpu(), codes[r, :, L:pos].cpu()
            written = self._written(gen_tok)
            gen_tok, gen_codes = gen_tok[:written], gen_codes[:, :written]
            segments = parse_response(gen_tok, gen_codes, v, p.modality)
            out.append(Generation(segments, gen_tok, gen_codes, state[r].finished, scores[r]))
        return out

    def _choose(self, text_logits, code_logits, state, params: GenerationParams, min_frames: int, generator, scores):
        """Samples every candidate of the next column on the last stage.

        Returns:
            ``[B, 3 + K]`` picks per row: text id, audio continue/stop id, terminator id, and
            one code per codebook; each row's state machine (``_advance``) uses the ones its
            mode needs.
        """
        v, K, card = self.vocab, self.config.num_codebooks, self.config.codebook_size
        B = len(state)
        mode_list = [st.mode for st in state]
        t_c, c_c = text_logits[:B], code_logits[:B]
        if params.cfg_weight is not None:
            in_audio = torch.tensor(mode_list, device=self.device)[:, None] == AUDIO
            t_sel = torch.where(in_audio, guide(t_c, text_logits[B:], params.cfg_weight), t_c)
            c_sel = guide(c_c, code_logits[B:], params.cfg_weight)
        else:
            t_sel, c_sel = t_c, c_c
        if params.output_scores:
            for r in range(B):
                if state[r].mode != DONE:
                    scores[r].append((t_sel[r].cpu(), c_sel[r].cpu()))

        text_mask = self._text_allowed.expand(B, -1).clone()
        cont_mask = self._audio_continue.expand(B, -1).clone()
        for r, st in enumerate(state):
            if st.audio_segments >= params.max_audio_segments:
                text_mask[r, v.modality("audio")] = False
            if st.mode == AUDIO and st.step + 1 >= min_frames:
                cont_mask[r] |= self._audio_end
        ninf = float("-inf")
        unused = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        # Stream-0 choices only for the modes present (the full-vocabulary text sampling is
        # the costly one); every TP rank of the last stage skips the same ones.
        return torch.cat(
            [
                sample(t_sel.masked_fill(~text_mask, ninf), params.text, generator)[:, None]
                if TEXT in mode_list else unused,
                sample(t_sel.masked_fill(~cont_mask, ninf), params.audio_stop, generator)[:, None]
                if AUDIO in mode_list else unused,
                sample(t_sel.masked_fill(~self._terminators, ninf), params.audio_stop, generator)[:, None]
                if AUDIO in mode_list else unused,
                sample(c_sel.reshape(B * K, card), params.audio, generator).view(B, K),  # top-k >= card keeps all
            ],
            dim=1,
        )  # [B, 3 + K]

    def _written(self, gen_tok: torch.Tensor) -> int:
        """Columns a row wrote: up to its first trailing pad (done rows are fed pads)."""
        pads = (gen_tok == self.vocab.pad).nonzero()
        return int(pads[0]) if pads.numel() else gen_tok.numel()

    def _advance(self, st: _Row, pick: list, params: GenerationParams, max_frames: int):
        """One row's next column from its picks ``[text, audio_continue, terminator, K codes]``.

        Returns:
            ``(stream-0 id, K cells or None for all empty)``.
        """
        v, K = self.vocab, self.config.num_codebooks
        text_tok, cont_tok, term_tok, codes = pick[0], pick[1], pick[2], pick[3:]
        if st.mode == TEXT:
            st.text_count += 1
            if text_tok == v.modality("audio"):
                st.mode, st.step, st.frames = AUDIO, -1, None
                st.audio_segments += 1
            elif text_tok == v.eos or (text_tok == v.eot and params.stop_at_eot):
                st.mode, st.finished = DONE, True
            elif st.text_count >= params.max_new_tokens:
                st.mode = DONE
            return text_tok, None
        s = st.step + 1
        if st.frames is None:
            if s >= max_frames:
                st.frames = max_frames
            elif cont_tok != v.audio_out:
                st.frames = s
        if st.frames is not None and s == delayed_length(st.frames, K):
            st.mode = TEXT
            if term_tok == v.eos or params.stop_at_eot:
                st.mode, st.finished = DONE, True
            return term_tok, None
        end = st.frames if st.frames is not None else s + 1
        cells = [c if 0 <= s - k < end else v.code_empty for k, c in enumerate(codes)]
        st.step = s
        return (v.audio_out if st.frames is None or s < st.frames else v.audio_flush), cells
