"""UALMModel: embed text + codebooks + audio-in -> Megatron decoder -> text head + RVQ heads."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_ualm.config import UALMConfig
from megatron_ualm.models.adapter import build_adapter
from megatron_ualm.models.embedding import UALMEmbedding
from megatron_ualm.models.encoder import FrozenAudioEncoder
from megatron_ualm.models.heads import CodebookHeads
from megatron_ualm.models.specs import decoder_block_spec
from megatron_ualm.vocab import UALMVocab


class UALMModel(LanguageModule):
    """A Qwen2.5 decoder that reads and writes text and audio.

    First pipeline stage (``pre_process``): the frozen audio encoder and the adapter turn
    log-mel windows into one vector per 25 Hz frame; ``UALMEmbedding`` sums the stream-0 and
    codebook embeddings and writes those vectors over the ``<|audio_in|>`` placeholders.
    Every stage: Megatron-Core's ``TransformerBlock`` (local or TE spec) with RoPE.
    Last stage (``post_process``): the text head for stream 0 and the K RVQ heads; with labels,
    the unreduced per-token cross-entropies (``losses.ualm_loss`` reduces them).

    Parameter names of the backbone match ``GPTModel`` (``embedding.word_embeddings``,
    ``decoder.*``, ``output_layer``), so GPT tooling and checkpoints line up.

    Args:
        config: the model config.
        pre_process: this stage holds the embeddings, encoder and adapter.
        post_process: this stage holds the final norm and the heads.
        vp_stage: virtual pipeline stage index, for interleaved schedules.
        pg_collection: process groups (default: Megatron's global ones).
    """

    def __init__(
        self,
        config: UALMConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.vocab = UALMVocab.from_config(config)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.model_type = ModelType.encoder_or_decoder
        self.position_embedding_type = "rope"

        if pre_process:
            self.embedding = UALMEmbedding(config, self.vocab, self.tp_group)
            if config.audio_encoder_type is not None:
                self.audio_encoder = FrozenAudioEncoder(config)
                self.audio_adapter = build_adapter(
                    config,
                    self.audio_encoder.hidden_size,
                    stack_factor=self.audio_encoder.frame_rate // config.audio_in_frame_rate,
                    tp_group=self.tp_group,
                )

        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=decoder_block_spec(config, vp_stage),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )

        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                config.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.tp_group,
            )
            self.codebook_heads = CodebookHeads(config, self.tp_group)

        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Receives the previous pipeline stage's activations (called by the schedules)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "UALMModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def encode_audio(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Frozen encoder + adapter over log-mel windows, keeping each window's valid frames.

        Args:
            features: ``[n, n_mels, window]`` log-mel windows.
            lengths: ``[n]`` valid 25 Hz frames per window.

        Returns:
            ``[sum(lengths), h]`` adapter outputs, window by window.
        """
        if not hasattr(self, "audio_encoder"):
            raise ValueError("the batch has audio_in_features but the model has no audio encoder")
        if lengths is None or lengths.shape != features.shape[:1]:
            raise ValueError("audio_in_lengths must give one frame count per audio_in_features window")
        encoded = self.audio_encoder(features)  # [n, frames_enc, d]
        projected, _ = self.audio_adapter(encoded)  # [frames, n, h]
        projected = projected.transpose(0, 1)  # [n, frames, h]
        frames = projected.shape[1]
        if int(lengths.max()) > frames or int(lengths.min()) < 0:
            raise ValueError(f"audio_in_lengths must lie in [0, {frames}] (frames per window), got {lengths.tolist()}")
        valid = torch.arange(frames, device=projected.device)[None, :] < lengths.to(projected.device)[:, None]
        return projected[valid]  # [sum(lengths), h]

    def _rotary(self, decoder_input, position_ids, packed_seq_params, inference_context) -> torch.Tensor:
        """RoPE table: ``[s, 1, 1, d]``, or ``[s, b, 1, d]`` for per-sample position ids.

        With a KV-cache inference context the table covers the context's maximum length and
        the attention layers pick the rows of the current offset.
        """
        seq_len = self.rotary_pos_emb.get_rotary_seq_len(
            inference_context, self.decoder, decoder_input, self.config, packed_seq_params
        )
        if position_ids is None:
            thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            return self.rotary_pos_emb(seq_len, packed_seq=thd)
        table = self.rotary_pos_emb(self.config.max_sequence_length)  # [S, 1, 1, d]
        return table[:, 0][position_ids.transpose(0, 1)]  # [s, b, 1, d]

    def forward(
        self,
        input_ids: torch.Tensor,
        codes: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        audio_in_features: Optional[torch.Tensor] = None,
        audio_in_lengths: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        code_labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        decoder_input: Optional[torch.Tensor] = None,
        gather_output: bool = False,
        inference_context=None,
    ):
        """Runs this pipeline stage.

        Args:
            input_ids: ``[b, s]`` stream-0 ids.
            codes: ``[b, K, s]`` codebook ids.
            position_ids: ``[b, s]`` per-document positions for packed samples; None means
                ``0..s-1`` for every sample.
            attention_mask: ``[b, 1, s, s]`` bool, True = masked; None = causal.
            audio_in_features: ``[n, n_mels, window]`` log-mel windows, or None.
            audio_in_lengths: ``[n]`` valid 25 Hz frames per window.
            labels: ``[b, s]`` stream-0 targets; with ``code_labels`` switches to loss output.
            code_labels: ``[b, K, s]`` codebook targets.
            packed_seq_params: TE packed-sequence (THD) parameters.
            decoder_input: precomputed ``[s, b, h]`` embeddings (skips the embedding).
            gather_output: gather the vocab-parallel logits over TP (inference).
            inference_context: Megatron ``BaseInferenceContext`` holding the KV cache for
                incremental decoding (``megatron.core.inference``); None for training.

        Returns:
            Not the last stage: hidden states ``[s, b, h]``. Last stage with labels:
            ``(text_loss [b, s], code_loss [b, K, s])`` unreduced cross-entropies. Without:
            ``(text_logits [b, s, V], code_logits [b, K, s, card])`` (V, card divided by TP
            unless ``gather_output``).
        """
        if decoder_input is None and self.pre_process:
            audio_embeds = None
            if audio_in_features is not None and audio_in_features.shape[0] > 0:
                audio_embeds = self.encode_audio(audio_in_features, audio_in_lengths)
            decoder_input = self.embedding(input_ids, codes, audio_embeds)  # [s(/tp), b, h]

        rotary_pos_emb = self._rotary(decoder_input, position_ids, packed_seq_params, inference_context)
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
        )
        if not self.post_process:
            return hidden

        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        text_logits, _ = self.output_layer(hidden, weight=output_weight)  # [s, b, V/tp]
        code_logits = self.codebook_heads(hidden)  # [s, b, K, card/tp]

        if labels is None:
            if gather_output:
                text_logits = gather_from_tensor_model_parallel_region(text_logits, group=self.tp_group)
                code_logits = gather_from_tensor_model_parallel_region(code_logits, group=self.tp_group)
            return text_logits.transpose(0, 1).contiguous(), code_logits.permute(1, 2, 0, 3).contiguous()

        text_loss = self.compute_language_model_loss(labels, text_logits)  # [b, s]
        # Empty cells (id == card) carry no loss; clamp keeps them a valid index.
        targets = code_labels.clamp(max=self.config.codebook_size - 1).permute(2, 0, 1).contiguous()  # [s, b, K]
        code_loss = tensor_parallel.vocab_parallel_cross_entropy(
            code_logits, targets, tp_group=self.tp_group
        )  # [s, b, K]
        return text_loss, code_loss.permute(1, 2, 0).contiguous()
