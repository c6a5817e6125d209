"""Throughput of the evaluation backbones: clips/s per backbone on 10 s clips.

Each backbone is its package's real, full-size architecture (random weights, written to a temp
folder and read back through the same loader the evaluation uses), fed 10 s mono clips at
16 kHz (UALM's codec rate), so the per-clip work includes each backbone's own resampling and
windowing: OpenL3 21 one-second frames at a 0.5 s hop (44.1 -> 48 kHz), PaSST one 10 s window
at 32 kHz, PANNs Cnn14 on 10 s at 16 kHz, CLAP's fused 4 x 1001 x 64 mel at 48 kHz, the
aesthetics WavLM on one 10 s window at 16 kHz. Model FLOPs per clip are counted with
``torch.utils.flop_counter`` to project the GPU time.

    python benchmarks/eval_throughput.py                 # CPU: 2 clips per backbone
    python benchmarks/eval_throughput.py --device cuda --clips 64 --batch-size 32

The target: 1,000 ten-second clips on all five metrics in under 5 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time


def _write_full(name: str, root: str) -> str:
    """A full-size random checkpoint of one backbone, in the layout its loader reads."""
    import torch

    from megatron_ualm.evaluation import backbones
    from megatron_ualm.tiny import backbones as tiny_backbones

    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    if name == "openl3":
        return tiny_backbones.write_tiny_openl3(path)  # OpenL3 has one size
    if name == "panns":
        return tiny_backbones.write_tiny_panns(path)  # Cnn14 has one size
    if name == "passt":
        return tiny_backbones.write_tiny_passt(path, embed_dim=768, depth=12, num_heads=12)  # passt_s_swa_p16_128_ap476
    if name == "aesthetics":
        from audiobox_aesthetics.model import aes

        cfg = {"proj_num_layer": 1, "proj_ln": False, "proj_act_fn": "gelu", "proj_dropout": 0.0, "nth_layer": 13,
               "use_weighted_layer_sum": True, "precision": "32", "normalize_embed": True, "output_dim": 1}
        transform = {a: {"mean": 5.0, "std": 1.5} for a in backbones.AES_AXES}
        model = aes.AesMultiOutput(**cfg, target_transform=transform)  # the released WavLM-base+ shape
        torch.save({"state_dict": model.state_dict(), "model_cfg": cfg, "target_transform": transform},
                   os.path.join(path, "checkpoint.pt"))
        return path
    if name == "clap":
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

        tiny = tiny_backbones.write_tiny_clap(os.path.join(root, "clap_tok"))  # only its tokenizer is reused
        config = ClapConfig()  # laion/clap-htsat-* shapes: HTSAT audio tower, RoBERTa-base text tower
        config.audio_config.enable_fusion = True
        ClapModel(config).save_pretrained(path)
        processor = ClapProcessor.from_pretrained(tiny)
        ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="fusion"), tokenizer=processor.tokenizer).save_pretrained(path)
        return path
    raise ValueError(name)


def _flops(model, waves, rate) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.features(waves[:1], rate)
    return counter.get_total_flops()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", type=int, default=2, help="10 s clips timed per backbone")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=16, help="network inputs per forward")
    p.add_argument("--backbones", nargs="+", default=["openl3", "passt", "panns", "clap", "aesthetics"])
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="sustained model TFLOP/s assumed for the GPU projection (H100/H200, fp32 with TF32 convs)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from megatron_ualm.evaluation.backbones import BACKBONES

    rate = 16000
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(int(args.seconds * rate))).astype(np.float32) for _ in range(args.clips)]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"device={args.device} torch threads={torch.get_num_threads()} cpu={cpu} clips={args.clips} x {args.seconds:g} s")
    print("| backbone | clips/s | s per 1,000 clips | GFLOP / clip | projected GPU s per 1,000 clips |")
    print("| --- | --- | --- | --- | --- |")
    total_s = total_gpu = 0.0
    with tempfile.TemporaryDirectory() as root:
        for name in args.backbones:
            model = BACKBONES[name](_write_full(name, root), device=args.device, batch_size=args.batch_size)
            model.features(waves[:1], rate)  # warm-up (lazy init, kernels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.features(waves, rate)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            gflop = _flops(model, waves, rate) / 1e9
            per_1000, gpu = 1000 * dt / len(waves), 1000 * gflop / (args.gpu_tflops * 1e3)
            total_s, total_gpu = total_s + per_1000, total_gpu + gpu
            print(f"| {name} | {len(waves) / dt:.3g} | {per_1000:,.0f} | {gflop:,.0f} | {gpu:.1f} |", flush=True)
            del model
    print(f"| all five | {1000 / total_s:.3g} | {total_s:,.0f} | | {total_gpu:.1f} |")


if __name__ == "__main__":
    main()
