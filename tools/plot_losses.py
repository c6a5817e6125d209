"""Plot a training run's curves (metrics.jsonl in its --save directory) to PNG: the losses of
pretraining and SFT (total, text, per codebook), or DPO's loss, reward accuracy / margin and
chosen / rejected log-probabilities per stream.

    python tools/plot_losses.py runs/quickstart/ckpt/metrics.jsonl loss.png [--keys "lm loss" "text loss"]
"""

import argparse

from megatron_ualm.training.plot import plot_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by megatron_ualm.pretrain, .finetune or .dpo")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="curves to draw (default: every loss; for DPO its losses, rewards and log-probs)")
    args = parser.parse_args()
    drawn = plot_metrics(args.metrics, args.output, args.keys)
    print(f"wrote {args.output} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
