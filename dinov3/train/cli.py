"""``dinov3-train``: a folder of images in, a trained DINOv3 backbone out."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from .config import BUILTIN, ConfigError, config_differences, config_from_text, load_config, resume_config

PROG = "dinov3-train"
logger = logging.getLogger("dinov3.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="DINOv3 self-supervised training on a folder of images (searched recursively, no labels). "
                    "Run under torchrun for several processes.",
        epilog="Overrides: dotted config keys with YAML values, e.g. train.batch_size_per_gpu=32 "
               "schedules.lr.peak=2e-4 gram.use_loss=false crops.local_crops_number=6. Unknown keys and values of "
               "the wrong type are errors. With --resume the checkpoint's config is the run's config: overrides "
               "that change the computation need --allow-config-change.",
    )
    p.add_argument("--config", default=None,
                   help=f"YAML file or built-in recipe: {', '.join(BUILTIN)} (required unless --resume finds a "
                        "checkpoint, whose config is then used)")
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--output", required=True,
                   help="output folder (checkpoints/, metrics.jsonl, config.yaml, backbone.pth); a folder that holds "
                        "a run is refused unless --resume or --overwrite")
    p.add_argument("--max-iters", type=int, default=None,
                   help="stop after this many iterations in total (schedules still span train.iterations); "
                        "a checkpoint is written at the stop")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT exactly, from its newest readable checkpoint (starts the run "
                        "when OUTPUT has no checkpoint yet, so one command serves every restart); to start a new "
                        "run from the weights of another, use --init-from")
    p.add_argument("--init-from", metavar="WEIGHTS", default=None,
                   help="start a NEW run from these backbone weights (student.pretrained_weights): official "
                        ".pth/.safetensors, a Hugging Face DINOv3ViTModel folder or .safetensors, a backbone.pth "
                        "of dinov3-train, a training checkpoint (its EMA teacher) or a dinov3-export file. The "
                        "model is the one the "
                        "weights hold; heads, optimizer and schedules start fresh, after a head warm-up with the "
                        "backbone frozen (train.head_warmup_iters); the *-highres stages take a training checkpoint "
                        "and its heads too (student.pretrained_heads). Not --resume, which continues one run exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUTPUT: its checkpoints, metrics, config and backbone are deleted")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume, apply overrides that change the computation (the run is then no longer "
                        "one exact run)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def check_data_dir(path: str) -> int:
    """The image folder must exist and hold at least one decodable image (checked before any compute)."""
    from .data import UnreadableImage, find_images, load_rgb

    if not os.path.exists(path):
        raise ConfigError(f"--data {path}: no such folder")
    if not os.path.isdir(path):
        raise ConfigError(f"--data {path} is a file; give the folder that holds the images")
    paths = find_images(path)  # ValueError naming the extensions when there is none
    reasons = []
    for p in paths:
        try:
            load_rgb(p)
            return len(paths)
        except UnreadableImage as exc:
            reasons.append(f"{p}: {exc.reason}")
    raise ConfigError(f"--data {path}: none of the {len(paths)} image files could be decoded ({'; '.join(reasons[:3])}"
                      + (" ..." if len(reasons) > 3 else "") + ")")


def resolve_config(args):
    """(config, resume_state). With --resume and a readable checkpoint, its config plus the command line's
    overrides; otherwise --config plus overrides."""
    from .rundir import latest_readable_checkpoint

    if args.init_from is not None:  # a JSON string is a YAML string: any path survives the override parser
        args.overrides = [*args.overrides, f"student.pretrained_weights={json.dumps(args.init_from)}"]
    state = latest_readable_checkpoint(os.path.join(args.output, "checkpoints")) if args.resume else None
    if state is None:
        if args.config is None:
            raise ConfigError("--config is required" + (" (--resume found no checkpoint to take it from)"
                                                        if args.resume else ""))
        cfg = load_config(args.config, args.overrides)
        if cfg["student"]["pretrained_heads"] and not cfg["student"]["pretrained_weights"]:
            raise ConfigError(f"--config {args.config} continues a run (student.pretrained_heads=true): give its "
                              "training checkpoint with --init-from")
        teacher = cfg["distillation"]["teacher"]
        if cfg["distillation"]["enabled"] and (not teacher or not os.path.exists(teacher)):
            # checked here, before the output folder is claimed (what needs the file read is checked by the trainer)
            raise ConfigError(f"distillation.teacher={teacher}: no such file or folder")
        return cfg, None
    path, ckpt = state
    saved = config_from_text(ckpt["config"])
    cfg, changes = resume_config(saved, args.overrides, iteration=int(ckpt["iteration"]),
                                 allow_change=args.allow_config_change)
    for key, (old, new) in changes.items():
        logger.warning("--resume: %s changed from %r to %r", key, old, new)
    if args.config is not None:
        # The same command is usually repeated with --resume: say which of --config's values the checkpoint overrode.
        try:
            asked = load_config(args.config, args.overrides)
        except ConfigError:  # e.g. --init-from weights gone since the start: the checkpoint holds them
            asked = cfg
        ignored = config_differences(cfg, asked)
        if ignored:
            logger.warning("--resume: the checkpoint's config is used; --config %s differs in %s (ignored)",
                           args.config, ", ".join(sorted(ignored)))
    return cfg, state


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with --resume (and without --overwrite)."""
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "your torchrun command with " + shlex.join(["-m", "dinov3.train", *args, "--resume"])
    return shlex.join([PROG, *args, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after options
    main_rank = os.environ.get("RANK", "0") == "0"  # other torchrun ranks only report problems
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from .rundir import RunFolderError, check_output_dir

    try:
        if args.max_iters is not None and args.max_iters < 1:
            raise ConfigError("--max-iters must be >= 1")
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        if args.init_from is not None and not args.resume and not os.path.exists(args.init_from):
            raise ConfigError(f"--init-from {args.init_from}: no such file or folder")
        from .trainer import parse_device

        parse_device(args.device)
        check_output_dir(args.output)
        check_data_dir(args.data)
        cfg, resume_state = resolve_config(args)
    except (ConfigError, RunFolderError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg, data_dir=args.data, output_dir=args.output, max_iters=args.max_iters,
                          resume=args.resume, resume_state=resume_state, overwrite=args.overwrite,
                          device=args.device, allow_config_change=args.allow_config_change)
    except (ConfigError, RunFolderError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        last = trainer.train()
    finally:
        trainer.close()
    if trainer.stopped_by_signal is not None:
        if main_rank:
            print(f"{PROG}: stopped; to continue exactly from here run:\n  {resume_command(argv)}", file=sys.stderr,
                  flush=True)
        return 128 + trainer.stopped_by_signal
    if last:
        logger.info("finished: %d iterations done (of %d), total loss %.4f", last["iteration"] + 1,
                    trainer.total_iters, last["total_loss"])
    return 0

if __name__ == "__main__":
    sys.exit(main())
