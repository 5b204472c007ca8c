"""``dinov3-train``: a folder of images in, a trained DINOv3 backbone out."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import BUILTIN, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinov3-train",
        description="DINOv3 self-supervised training on a folder of images (searched recursively, no labels). "
                    "Run under torchrun for several processes.",
        epilog="Overrides: dotted config keys with YAML values, e.g. train.batch_size_per_gpu=32 "
               "schedules.lr.peak=2e-4 gram.use_loss=false crops.local_crops_number=6",
    )
    p.add_argument("--config", required=True, help=f"YAML file or built-in recipe: {', '.join(BUILTIN)}")
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--output", required=True, help="output folder (checkpoints/, metrics.jsonl, backbone.pth)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="stop after this many iterations in total (schedules still span train.iterations); "
                        "a checkpoint is written at the stop")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/checkpoints")
    p.add_argument("--device", default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # other torchrun ranks only report problems
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"dinov3-train: error: {e}", file=sys.stderr)
        return 2
    if args.max_iters is not None and args.max_iters < 1:
        print("dinov3-train: error: --max-iters must be >= 1", file=sys.stderr)
        return 2
    from .trainer import train

    last = train(cfg, data_dir=args.data, output_dir=args.output, max_iters=args.max_iters, resume=args.resume,
                 device=args.device)
    if last:
        logging.getLogger("dinov3.train").info("finished at iteration %d, total loss %.4f", last["iteration"],
                                               last["total_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
