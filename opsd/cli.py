"""The `opsd` command.

    opsd distill CONFIG [key=value ...]   on-policy self-distillation (opsd/distill.py)
    opsd tiny-model DIR                    write the local tiny model + tokenizer as a HF folder

Mistakes a user can make end with one sentence on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys

from opsd.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsd", description="On-policy self-distillation for reasoning models.")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser("distill", help="post-train a model with on-policy self-distillation")
    distill.add_argument("config", help="YAML config file (see configs/)")
    distill.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.kind=forward_kl")
    tiny = commands.add_parser("tiny-model", help="write the local tiny model and tokenizer to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "distill":
            return _distill(args)
        if args.command == "tiny-model":
            from opsd.tiny import save_tiny

            print(save_tiny(args.out_dir, args.hidden_size, args.layers, args.seed))
            return 0
    except UserError as err:
        print(f"opsd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opsd: interrupted", file=sys.stderr)
        return 130
    return 1


def _distill(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from opsd.config import load_config
    from opsd.distill import DistillConfig, run_distill

    config = load_config(DistillConfig, args.config, args.overrides)
    run_dir = run_distill(config)
    if run_dir is not None:  # rank 0 under torchrun
        print(f"run folder: {run_dir}")
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
