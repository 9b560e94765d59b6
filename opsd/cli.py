"""The `opsd` command.

    opsd distill CONFIG [--resume] [key=value ...]
                                           on-policy self-distillation (opsd/distill.py)
    opsd sft CONFIG [key=value ...]       supervised fine-tuning, loss on responses only (opsd/sft.py)
    opsd rlvr CONFIG [key=value ...]      GRPO/DAPO with the verifiable math reward (opsd/rlvr.py)
    opsd pipeline CONFIG [key=value ...]  stages in order, each evaluated, summary table (opsd/pipeline.py)
    opsd demo [--quick] [--ablation] [--from-scratch] [--seed N | --seeds A,B,C]
                                           the built-in SFT → RLVR → OPSD demo (opsd/demo.py)
    opsd eval [CONFIG] [key=value ...]    accuracy/length/marker table on benchmark files (opsd/eval.py)
    opsd tiny-model DIR                    write the local tiny model + tokenizer as a HF folder

Mistakes a user can make end with one sentence on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from opsd.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported like every other: one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"opsd: error: {message} (see '{self.prog} --help')\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="opsd", description="On-policy self-distillation for reasoning models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    distill = commands.add_parser("distill", help="post-train a model with on-policy self-distillation")
    distill.add_argument("config", help="YAML config file (see configs/)")
    distill.add_argument("--resume", action="store_true", help="continue the run in run.output_dir (refused if none)")
    distill.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.kind=forward_kl")
    evaluate = commands.add_parser("eval", help="accuracy, lengths and reflective markers on benchmark files")
    evaluate.add_argument("arguments", nargs="*", metavar="[CONFIG] key=value",
                          help="optional YAML config (the first argument without '='), then overrides, "
                               "e.g. data=[a.jsonl] --responses r.jsonl (or responses=r.jsonl)")
    sft = commands.add_parser("sft", help="supervised fine-tuning on problem/response pairs")
    sft.add_argument("config", help="YAML config file")
    sft.add_argument("--resume", action="store_true", help="continue the run in run.output_dir (refused if none)")
    sft.add_argument("overrides", nargs="*", help="key=value overrides")
    rlvr = commands.add_parser("rlvr", help="GRPO/DAPO with the verifiable math reward")
    rlvr.add_argument("config", help="YAML config file")
    rlvr.add_argument("--resume", action="store_true", help="continue the run in run.output_dir (refused if none)")
    rlvr.add_argument("overrides", nargs="*", help="key=value overrides")
    pipeline = commands.add_parser("pipeline", help="run stages in order, evaluate each, write a summary table")
    pipeline.add_argument("config", help="YAML config file (see configs/pipeline-tiny.yaml)")
    pipeline.add_argument("--resume", action="store_true", help="continue the pipeline in run.output_dir (refused if none)")
    pipeline.add_argument("overrides", nargs="*", help="key=value overrides")
    demo = commands.add_parser("demo", help="SFT → RLVR → OPSD on the built-in synthetic world, with its table")
    demo.add_argument("--quick", action="store_true", help="a 2-minute smoke run of every stage")
    demo.add_argument("--ablation", action="store_true", help="also OPSD with gating all and incorrect_only")
    demo.add_argument("--from-scratch", action="store_true", help="re-run SFT from random weights first")
    demo.add_argument("--output-dir", default="runs/demo",
                      help="demo folder (an earlier demo's is replaced; a folder holding anything else is refused)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    seeds = demo.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="run.seed of the RLVR and OPSD stages (default 0)")
    seeds.add_argument("--seeds", type=_seed_list, help="several seeds, e.g. 1,2,3: the RLVR → OPSD chain under each, "
                                                        "and a table across seeds")
    tiny = commands.add_parser("tiny-model", help="write the local tiny model and tokenizer to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(_responses_flag(sys.argv[1:] if argv is None else argv))

    try:
        if args.command in STAGES:
            return _train(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "pipeline":
            return _pipeline(args)
        if args.command == "eval":
            return _eval(args)
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


STAGES = ("distill", "sft", "rlvr")


def _train(args: argparse.Namespace) -> int:
    """Load the stage's config from the file and overrides, run it, say where its run folder is."""
    _quiet_libraries()
    from opsd.config import load_config

    if args.command == "distill":
        from opsd.distill import DistillConfig as Config, run_distill as run
    elif args.command == "sft":
        from opsd.sft import SFTConfig as Config, run_sft as run
    elif args.command == "rlvr":
        from opsd.rlvr import RLVRConfig as Config, run_rlvr as run
    else:
        raise ValueError(args.command)
    run_dir = run(load_config(Config, args.config, [*args.overrides, *(["run.resume=true"] if args.resume else [])]))
    if run_dir is not None:  # rank 0 under torchrun
        print(f"run folder: {run_dir}")
    return 0


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def _responses_flag(argv: list[str]) -> list[str]:
    """`opsd eval ... --responses FILE` anywhere among the key=value arguments → `responses=FILE`."""
    if not argv or argv[0] != "eval" or "--responses" not in argv[:-1]:
        return argv
    at = argv.index("--responses")
    return [*argv[:at], f"responses={argv[at + 1]}", *argv[at + 2 :]]


def _eval(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from opsd.config import load_config
    from opsd.eval import EvalConfig, run_eval

    has_config = bool(args.arguments) and "=" not in args.arguments[0]
    config_path, overrides = (args.arguments[0], args.arguments[1:]) if has_config else (None, args.arguments)
    out = run_eval(load_config(EvalConfig, config_path, overrides))
    print((out / "eval.md").read_text(encoding="utf-8"), end="")
    print(f"eval folder: {out}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from opsd.config import load_config
    from opsd.pipeline import PipelineConfig, run_pipeline

    out = run_pipeline(load_config(PipelineConfig, args.config, [*args.overrides, *(["run.resume=true"] if args.resume else [])]))
    print((out / "summary.md").read_text())
    print(f"run folder: {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    _quiet_libraries()
    from opsd.demo import run_demo

    torch.set_num_threads(args.threads)
    out = run_demo(args.output_dir, args.quick, args.ablation, args.from_scratch, args.seeds or (args.seed,))
    print((out / "summary.md").read_text())
    print(f"run folder: {out}")
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # library notices (PEFT's tied-embedding warning, transformers' deprecations) would come before
    # opsd's own one-sentence refusals and say nothing a user can act on
    for category in (UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(peft|transformers)(\.|$)")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
