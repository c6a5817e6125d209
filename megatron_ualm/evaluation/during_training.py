"""Audio evaluation during training: every N iterations, the model being trained generates a fixed
prompt set; the clips and their CLAP score go to TensorBoard / W&B and ``<save>/metrics.jsonl``.

``AudioEvalDuringTraining`` is a ``training.hooks.TrainingExtension``; ``pretrain``,
``finetune`` and ``dpo`` list it, which gives them the flags (group "UALM evaluation")::

    --eval-prompts prompts.jsonl --eval-audio-interval 1000 --eval-tokenizer tok/ \\
    --eval-codec xcodec/ [--eval-clap-path clap/] [--eval-audio-seconds 10]

How it stays out of the run's way:

- it runs after an optimizer step, on every rank (the generator keeps the model-parallel ranks in
  step; TP and PP work as in ``megatron_ualm.generate``), on the model chunk the loop's model
  provider built, under
  ``torch.inference_mode`` in eval mode, and puts every module back in the mode it was in;
- every RNG stream is saved before and restored after: Python's ``random``, numpy's global RNG,
  torch's CPU generator, every CUDA device's generator and Megatron's model-parallel RNG tracker
  (the generator samples from its own seeded ``torch.Generator``), so dropout after the hook
  draws exactly what it would have drawn without it;
- it does not touch the data iterators, the optimizer or the gradients, and writes nothing into
  checkpoints, so a run with it resumes exactly like one without;
- its ``metrics.jsonl`` rows carry ``"eval_audio": true`` and are written before the iteration's
  training row (readers that keep the last row per iteration keep the losses).

Clips are written to ``<save>/eval_audio/iter_XXXXXXX/<id>.wav`` by the last rank (the one that
logs), which also decodes them with the codec and scores them with CLAP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from typing import Optional

import numpy as np
import torch

from megatron_ualm.checkpoint_format import iteration_folder
from megatron_ualm.training.hooks import RunContext, TrainingExtension
from megatron_ualm.training.metrics import append_metrics


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the group "UALM evaluation" to a training parser."""
    g = parser.add_argument_group("UALM evaluation")
    g.add_argument("--eval-prompts", default=None,
                   help='JSONL of {"id", "prompt"}: the fixed prompts generated every --eval-audio-interval iterations')
    g.add_argument("--eval-audio-interval", type=int, default=0,
                   help="generate the --eval-prompts every N iterations (0: never)")
    g.add_argument("--eval-tokenizer", default=None, help="the text tokenizer of the run's data (tokenizer.json or folder)")
    g.add_argument("--eval-codec", default=None, help="local X-Codec folder that decodes the generated codes to audio")
    g.add_argument("--eval-clap-path", default=None,
                   help="local LAION-CLAP folder (transformers layout): adds the CLAP score of each clip")
    g.add_argument("--eval-audio-seconds", type=float, default=10.0, help="length of each generated clip")
    g.add_argument("--eval-cfg-weight", type=float, default=3.0, help="classifier-free guidance weight")
    return parser


def check_args(args) -> None:
    """Refuses an incomplete set of flags before the model is built (``ValueError`` naming the flag)."""
    if not getattr(args, "eval_audio_interval", 0):
        return
    if args.eval_audio_interval < 0:
        raise ValueError(f"--eval-audio-interval must be >= 0, got {args.eval_audio_interval}")
    for flag in ("eval_prompts", "eval_tokenizer", "eval_codec"):
        if not getattr(args, flag):
            raise ValueError(f"--eval-audio-interval needs --{flag.replace('_', '-')}")
    for flag in ("eval_prompts", "eval_tokenizer", "eval_codec"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path} does not exist")
    if args.eval_clap_path:
        from megatron_ualm.evaluation.backbones import CLAP

        try:
            CLAP.check_path(args.eval_clap_path)
        except FileNotFoundError as err:
            raise ValueError(f"--eval-clap-path: {err}") from None
    from megatron_ualm.evaluation.tta import read_prompts

    if not read_prompts(args.eval_prompts):
        raise ValueError(f"--eval-prompts {args.eval_prompts} holds no prompts")
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("--eval-audio-interval generates with one model chunk per rank: run without a virtual pipeline")


@contextlib.contextmanager
def preserved_rng():
    """Restores Python's, numpy's, torch's CPU and CUDA, and Megatron's tracker RNG states on exit."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracked = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tracker.get_states().items()}
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode for the block; every submodule gets its own previous mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class AudioEvalHook:
    """Generates the prompt set with the training model and logs clips and CLAP.

    Args:
        args: the run's parsed arguments (the ``--eval-*`` flags, ``--save``).
        model: the model chunk to generate with (an unwrapped ``UALMModel`` with both ends: the
            audio evaluation refuses a virtual pipeline).
    """

    def __init__(self, args, model) -> None:
        from megatron_ualm.data.tokenizer import TextTokenizer
        from megatron_ualm.evaluation.tta import read_prompts
        from megatron_ualm.inference import GREEDY, GenerationParams
        from megatron_ualm.inference.sampling import SamplingParams

        self.args = args
        self.model = model
        self.interval = args.eval_audio_interval
        self.prompts = read_prompts(args.eval_prompts)
        self.tokenizer = TextTokenizer(args.eval_tokenizer)
        # The paper's decoding: CFG, audio top-k 20 at temperature 0.8; one fixed seed, so the
        # clips of successive evaluations differ by the model only.
        self.params = GenerationParams(text=GREEDY, audio=SamplingParams(0.8, 20), cfg_weight=args.eval_cfg_weight,
                                       max_audio_seconds=args.eval_audio_seconds, stop_at_eot=True, seed=1234)
        self._codec = self._clap = None

    @property
    def writer_rank(self) -> bool:
        """The last global rank logs (as Megatron's TensorBoard writer and metrics.jsonl do)."""
        from megatron.training.utils import is_last_rank

        return is_last_rank()

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration > 0 and iteration % self.interval == 0

    def _decoders(self):
        from megatron_ualm.inference import CodecDecoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._codec is None:
            self._codec = CodecDecoder.load(self.args.eval_codec, device=device)
        if self._clap is None and self.args.eval_clap_path:
            from megatron_ualm.evaluation.scorers import ClapScorer

            self._clap = ClapScorer(self.args.eval_clap_path, device=device)
        return self._codec, self._clap

    def __call__(self, iteration: int) -> Optional[dict]:
        """Runs the evaluation on every rank; the writer rank returns (and logs) its row."""
        from megatron_ualm.inference import Turn, UALM

        model = self.model
        start = time.perf_counter()
        ids = list(self.prompts)
        with preserved_rng(), eval_mode(model):
            ualm = UALM(model, self.tokenizer)  # codes only: the writer decodes them below
            replies = ualm.respond([[Turn("user", text=self.prompts[i])] for i in ids], self.params, "audio")
        if not self.writer_rank:
            return None
        with preserved_rng():  # loading the codec / CLAP (random init, then weights) draws from torch's RNG too
            codec, clap = self._decoders()
            codes = [r.codes[0] if r.codes else torch.zeros(model.config.num_codebooks, 0, dtype=torch.long) for r in replies]
            waves = codec.decode(codes)
            scores = None
            if clap is not None:
                scored = [k for k, w in enumerate(waves) if w.size]
                if scored:
                    s = clap.score([waves[k] for k in scored], codec.sample_rate, [self.prompts[ids[k]] for k in scored])["clap"]
                    scores = dict(zip([ids[k] for k in scored], (float(x) for x in s)))
        row = {"iteration": iteration, "eval_audio": True,
               "eval_audio_frames": {i: int(c.shape[1]) for i, c in zip(ids, codes)},
               "eval_seconds": round(time.perf_counter() - start, 3)}
        if scores:
            row["eval_clap"] = float(np.mean(list(scores.values())))
            row["eval_clap_per_prompt"] = scores
        self._log(iteration, row, dict(zip(ids, waves)), codec.sample_rate)
        return row

    def _log(self, iteration: int, row: dict, waves: dict, rate: int) -> None:
        from megatron.training import get_tensorboard_writer, get_wandb_writer

        from megatron_ualm.inference import write_wav

        if self.args.save:
            folder = os.path.join(self.args.save, "eval_audio", iteration_folder(iteration))
            for i, w in waves.items():
                if w.size:
                    write_wav(os.path.join(folder, f"{i}.wav"), w, rate)
            append_metrics(self.args.save, row)
        tb = get_tensorboard_writer()
        if tb is not None:
            for i, w in waves.items():
                if w.size:
                    tb.add_audio(f"eval_audio/{i}", torch.from_numpy(np.clip(w, -1, 1))[None], iteration, sample_rate=rate)
            if "eval_clap" in row:
                tb.add_scalar("eval_audio/clap", row["eval_clap"], iteration)
        wandb = get_wandb_writer()
        if wandb is not None:
            import wandb as wandb_module

            logged = {f"eval_audio/{i}": wandb_module.Audio(w, sample_rate=rate, caption=self.prompts[i])
                      for i, w in waves.items() if w.size}
            if "eval_clap" in row:
                logged["eval_audio/clap"] = row["eval_clap"]
            wandb.log(logged, iteration)
        clap = f", CLAP {row['eval_clap']:.4f}" if "eval_clap" in row else ""
        print(f" [UALM eval] iteration {iteration:8d} | {len(waves)} clips{clap} | {row['eval_seconds']:.1f} s", flush=True)


class AudioEvalDuringTraining(TrainingExtension):
    """The training-loop extension: flags, their checks, and the evaluation after due steps."""

    def __init__(self) -> None:
        self.hook: Optional[AudioEvalHook] = None

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_args(parser)

    def check_args(self, args: argparse.Namespace) -> None:
        check_args(args)

    def after_step(self, ctx: RunContext, iteration: int) -> None:
        """Evaluates every ``--eval-audio-interval`` iterations (on every rank: decoding is collective)."""
        if not ctx.args.eval_audio_interval:
            return
        if self.hook is None:
            self.hook = AudioEvalHook(ctx.args, ctx.model_chunks[0])
        if self.hook.due(iteration):
            self.hook(iteration)
