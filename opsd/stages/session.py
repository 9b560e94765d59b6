"""What every training stage (sft, rlvr, distill) does around its own loop, in the one order that is right.

    begun = begin(config, check_options)          # no weights yet: checks, threads, resume point, tokenizer
    ... the stage's data and prompts, from begun.tokenizer ...
    with session(config, name, "distill", begun, Needs(...)) as s:
        for step in s.steps():
            ... the stage's step, top to bottom, on s.model / s.backbone / s.engine ...
            s.end_step(step, StepResult(...))    # progress, metrics, samples, the checkpoint or a stop

`begin` does what needs no weights, so that a mistake stops the command before anything loads.
`session` then builds, in this order (why each comes where it does):
  1. the process group (torchrun), then one seed on every process: FSDP shards each process's own
     LoRA initialisation, which must therefore be the same everywhere;
  2. the policy, checked against the longest sequence the stage will feed it;
  3. the start model (what checkpoints record of it: a fingerprint of the frozen teacher's or LoRA
     base's weights, read before wrapping). Under run.parallel=fsdp the policy is built empty on every
     process and only rank 0 reads its weights, into CPU memory, then sends them tensor by tensor while
     each process keeps its shard (no GPU ever holds the whole float32 model);
  4. the policy wrapped as run.parallel says (DDP, FSDP2); then the second set of weights (`shadow`:
     the teacher's, or the KL reference's), sharded like the parameters it shadows, and the
     optimizer: both after wrapping, which replaces the parameters;
  5. the checkpoint the run continues from, loaded into all of that;
  6. the generation engine, before the run folder: vLLM refuses a model it cannot serve here, and
     then nothing may have been written;
  7. the run folder (rank 0), the verifiers, samples.jsonl and metrics.jsonl.
On the way out the wrapped module is released before the process group goes (a live DDP reducer or
FSDP state would outlive it: distributed.teardown), the stage prints its summary line, and the
process group is torn down.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from opsd.core.config import to_dict
from opsd.core.errors import UserError
from opsd.core.models import check_fits, load_tokenizer, model_config
from opsd.core.packing import micro_batch_bounds
from opsd.generation import (
    Engine,
    SamplingConfig,
    check_engine_fits,
    closing_on_error,
    make_engine,
)
from opsd.runtime import distributed
from opsd.runtime.checkpoint import (
    checkpoint_due,
    restore,
    save_run_checkpoint,
    start_model,
    stop_reason,
)
from opsd.runtime.faults import crash_point
from opsd.runtime.metrics import MetricsLog
from opsd.runtime.plan import GIB, HEADROOM, Checks, architecture, plan, vllm_share_too_small, what_would_fit
from opsd.runtime.preemption import Preempted, catching_stop_signals
from opsd.runtime.runs import open_run_dir, resume_point, use_threads
from opsd.runtime.samples import SamplesLog
from opsd.runtime.training import (
    Progress,
    compute_dtype,
    load_policy,
    make_optimizer,
    set_lr,
    stage_summary,
    wrap_policy,
)
from opsd.teacher.target import ExternalTeacher, check_same_vocabulary
from opsd.teacher.weights import (
    TeacherWeightsConfig,
    TeacherWeightsState,
    start_snapshot,
)
from opsd.verifiers import VerifierConfig, Verifiers

T = TypeVar("T")


@dataclass(frozen=True)
class Begun:
    """What a stage knows before any weights load."""

    world: int  # processes (torchrun), 1 alone
    device: torch.device
    resume_from: Path | None  # the checkpoint the run continues from (None: a fresh start)
    tokenizer: Any


def begin(config: Any, check_options: Callable[[Any, int], None]) -> Begun:
    """The stage's own checks, torch's threads, the resume point (a folder holding a run of another
    config is refused here), the device and the tokenizer."""
    world = distributed.world_size()
    check_options(config, world)
    use_threads(config.run.threads)
    resume_from = resume_point(config.run, to_dict(config), type(config))
    return Begun(world, distributed.device(config.run.device), resume_from, load_tokenizer(config.model))


@dataclass(frozen=True)
class Needs:
    """What a stage needs built beside its policy, known before any weights load."""

    fits: tuple[tuple[int, str], ...]  # (positions, what they are in words): sequences the policy must hold
    shadow: TeacherWeightsConfig | None = None  # a second set of weights kept beside the policy (teacher, KL reference)
    external: ExternalTeacher | None = None  # another checkpoint as the teacher, checked against the policy's
    #   vocabulary
    sampling: SamplingConfig | None = None  # rollouts through a generation engine (None: no engine)
    engine_positions: int = 0  # the longest prompt + response the engine decodes
    engine_what: str = ""  # those in words
    verifier: VerifierConfig | None = None  # grading (None: the stage grades nothing)
    samples_per_step: int | None = None  # samples.jsonl rows per step (0: none; None: the stage writes no samples)


@dataclass(frozen=True)
class StepResult:
    """What a step hands back to the session: its metrics, its samples and what the run's counters need."""

    metrics: dict[str, float]
    skipped: bool  # the optimizer step was skipped: a non-finite gradient norm
    tokens: int  # response tokens trained on, over all processes (0: nothing to train on)
    postfix: dict[str, float]  # the progress bar's numbers
    rows: list[dict] = field(default_factory=list)  # samples.jsonl rows
    why_empty: str = ""  # what a step with nothing to train on means for this stage, for the warning and the stop


class Session:
    """What a stage's steps work with, built by `session` (nothing here trains: the stage's loop does)."""

    def __init__(self, config: Any, name: str, stage: str, begun: Begun):
        self.config, self.name, self.stage, self.world, self.device = config, name, stage, begun.world, begun.device
        self.tokenizer = begun.tokenizer
        self.rank = 0
        self.model: torch.nn.Module | None = None  # the policy (PEFT-wrapped with LoRA)
        self.backbone: torch.nn.Module | None = None  # its final hidden states, wrapped by run.parallel
        self.optimizer: torch.optim.Optimizer | None = None
        self.shadow: TeacherWeightsState | None = None  # the teacher's or the KL reference's weights
        self.engine: Engine | None = None
        self.verifiers: Verifiers | None = None
        self.samples: SamplesLog | None = None
        self.log: MetricsLog | None = None
        self.run_dir: Path | None = None  # None on ranks other than 0
        self.progress = Progress()
        self.start = None  # what checkpoints record of the start model (checkpoint.StartModel)
        self.signals: list[str] = []  # the stop signals this process received (runtime/preemption.py)

    def steps(self) -> Iterator[int]:
        """The steps left (1-based), each with its learning rate set."""
        for step in range(self.progress.step + 1, self.config.run.steps + 1):
            set_lr(self.optimizer, self.config.optim, step, self.config.run.steps)
            yield step

    def my_share(self, items: list[T]) -> list[int]:
        """The positions in `items` (a step's problems) that this process takes."""
        return distributed.shard(list(range(len(items))), self.rank, self.world)

    def micro_batches(self, items: list[T], lengths: list[int]) -> Iterator[list[T]]:
        """`items` (of `lengths` positions each) in the micro-batches of `cut_micro_batches`, as many on
        every process (the most any has: with a token budget the count depends on the data): past its
        own a process gets [] and makes an idle pass (`idle_pass`), so that the collectives stay in
        step. Gradients are synchronised on the last one only."""
        batches = self.cut_micro_batches(items, lengths)
        count = distributed.max_over_ranks(len(batches))
        for index in range(count):
            with distributed.no_sync_unless(self.backbone, last=index == count - 1):
                yield batches[index] if index < len(batches) else []

    def cut_micro_batches(self, items: list[T], lengths: list[int]) -> list[list[T]]:
        """This process's micro-batches of `items`, in order: `optim.micro_batch_size` items each, or
        (`optim.micro_batch_tokens` > 0) runs of at most that many positions, `lengths` being each item's."""
        optim = self.config.optim
        return [items[bound] for bound in micro_batch_bounds(lengths, optim.micro_batch_size,
                                                             optim.micro_batch_tokens)]

    def idle_pass(self) -> None:
        """A zero-weight forward and backward: this process has run out of micro-batches."""
        distributed.idle_backward(self.backbone, self.model, self.tokenizer.pad_token_id, self.device)

    def end_step(self, step: int, result: StepResult) -> None:
        """After the optimizer step: the counters, the engine told the weights changed, samples and
        metrics written, a warning at the first step with nothing to train on, then the checkpoint
        when due, or a checkpoint and a stop after too many bad steps in a row."""
        self.progress = self.progress.after(step, result.skipped, result.tokens)
        if self.engine is not None:
            self.engine.update_weights()
        if self.samples is not None:
            self.samples.write(step, result.rows)
        self.log.write(step, {**result.metrics, "optim/skipped_steps": self.progress.skipped}, postfix=result.postfix)
        if result.tokens == 0 and self.progress.empty == 1:
            self.log.say(f"opsd: warning: step {step} had nothing to train on ({result.why_empty})")
        crash_point("step")
        stop = stop_reason(self.progress, self.config.run, self.config.optim.max_skipped_in_a_row, result.why_empty)
        signalled = self._signalled(step)
        if stop or signalled or checkpoint_due(step, self.config.run.steps, self.config.run.save_every):
            self.save_checkpoint()
        if signalled:
            raise Preempted(signalled)
        if stop:
            raise UserError(stop)

    def _signalled(self, step: int) -> str:
        """The sentence to stop with when SIGTERM or SIGUSR1 reached any process during the step, else ""
        (runtime/preemption.py); every process learns it from the same all-reduce, so all stop here."""
        if not distributed.max_over_ranks(int(bool(self.signals))):
            return ""
        which = self.signals[0] if self.signals else "a stop signal (on another process)"
        checkpoint = Path(self.config.run.output_dir) / "checkpoints" / f"step_{step:06d}"
        return (f"{which}: stopped after step {step} with its checkpoint ({checkpoint}); the same command continues "
                "from there")

    def save_checkpoint(self) -> None:
        """The checkpoint of the step just done (rank 0; under FSDP every process writes its shards),
        the others waiting for it without NCCL's 10-minute limit."""
        run = self.config.run
        if self.run_dir is not None or (run.parallel == "fsdp" and distributed.active()):
            teacher = self.shadow.checkpoint_state() if self.shadow is not None else None
            save_run_checkpoint(self.run_dir, self.model, self.tokenizer, self.optimizer, self.progress,
                                {"stage": self.stage}, run, self.start, teacher)
        distributed.barrier_long()


def check(config: Any, needs: Needs, external: Any = None, checks: Any = True) -> None:
    """Every check of `session` that needs no weights, on the model's config.json instead (`--check`):
    the engine's lengths, the lengths the policy must hold, the external teacher's vocabulary
    (`external`: its config), and the memory plan (runtime/plan.py; `checks`: a plan.Checks, or True)."""
    if needs.sampling is not None:
        check_engine_fits(needs.sampling, "sampling", needs.engine_positions, needs.engine_what)
    student = model_config(config.model)
    for positions, what in needs.fits:
        check_fits(student, positions, what)
    check_same_vocabulary(student, external)
    check_memory(config, student, max(p for p, _ in needs.fits), external,
                 checks if isinstance(checks, Checks) else Checks())


def check_memory(config: Any, student: Any, positions: int, external: Any, checks: Checks) -> None:
    """The memory plan of the run: printed when asked, and refused with the change that would make it fit
    when one GPU's memory is known (this machine's, or `--gpu-gib`) and a phase needs more."""
    processes = checks.gpus or distributed.world_size()
    gpu = checks.gpu_gib * GIB if checks.gpu_gib else (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    arch = architecture(student)
    teacher = architecture(external) if external is not None else None
    memory = plan(config, arch, positions, processes, gpu, teacher, on_gpu=gpu is not None)
    if checks.show_plan:
        print(memory.table())
    too_small = vllm_share_too_small(getattr(config, "sampling", None), arch, gpu, positions)
    if too_small:
        raise UserError(too_small)
    if not memory.fits():
        phase, need = memory.peak()
        knob = what_would_fit(config, arch, positions, processes, gpu, teacher)
        raise UserError(f"the memory plan does not fit: {phase} needs {need / GIB:.1f} GiB per process, more than "
                        f"{HEADROOM:.0%} of a {gpu / GIB:.0f} GiB GPU on {processes} process(es); "
                        + (f"{knob} would make it fit" if knob else "more GPUs, LoRA or shorter sequences would"))


def _start_model(config: Any, needs: Needs, whole: torch.nn.Module | None, sharded: bool) -> Any:
    """What checkpoints record of the start model, read from its whole weights (`whole`; under a sharded
    load only rank 0 has them, and sends the record to the others)."""
    start = None
    if whole is not None:
        uses_lora = config.model.lora_rank > 0
        snapshot = start_snapshot(whole, needs.shadow, uses_lora) if needs.shadow is not None else None
        start = start_model(config.model, whole, snapshot)
    return distributed.from_rank0(start) if sharded else start


@contextlib.contextmanager
def session(config: Any, name: str, stage: str, begun: Begun, needs: Needs) -> Iterator[Session]:
    """The stage's policy, engine and run, in the order of the module docstring; torn down on the way
    out. `name` labels the progress bar (a pipeline: the stage's name), `stage` is the command."""
    if needs.sampling is not None:
        check_engine_fits(needs.sampling, "sampling", needs.engine_positions, needs.engine_what)
    s = Session(config, name, stage, begun)
    s.rank = distributed.setup(s.device, cpu_collectives=config.run.fsdp_offload,
                               timeout_min=config.run.collective_timeout_min)
    torch.manual_seed(config.run.seed)  # the same on every process: FSDP shards each one's own LoRA initialisation
    # FSDP: every process builds the policy empty and receives its shards from rank 0, which alone reads
    # the whole weights, into CPU memory; elsewhere each process loads the whole policy on its device
    sharded = config.run.parallel == "fsdp" and distributed.active()
    source = load_policy(config.model, config.optim, torch.device("cpu")) if sharded and s.rank == 0 else None
    s.model = load_policy(config.model, config.optim, s.device, empty=sharded)
    for positions, what in needs.fits:
        check_fits(s.model, positions, what)
    check_same_vocabulary(s.model, needs.external)
    s.start = _start_model(config, needs, source if sharded else s.model, sharded)
    s.backbone = wrap_policy(s.model, s.device, config.run.parallel, config.run.fsdp_offload, config.optim, source)
    source = None  # rank 0's whole copy: every process holds its shards now
    uses_lora = config.model.lora_rank > 0
    s.shadow = TeacherWeightsState(s.model, needs.shadow, uses_lora) if needs.shadow is not None else None
    s.optimizer = make_optimizer(s.model, config.optim)
    if begun.resume_from is not None:
        s.progress = restore(begun.resume_from, s.model, s.optimizer, s.start, s.shadow)
    open_folder = lambda: open_run_dir(config.run, to_dict(config), s.rank, s.progress.step)
    if needs.sampling is not None:  # before the run folder: vLLM refuses a model it cannot serve here
        s.engine = make_engine(s.model, s.tokenizer, needs.sampling, s.device, compute_dtype(config.optim, s.device),
                               lambda: distributed.gathered(s.backbone), needs.engine_positions)
        s.run_dir = closing_on_error(s.engine, open_folder)
    else:
        s.run_dir = open_folder()
    with contextlib.ExitStack() as stack:
        s.signals = stack.enter_context(catching_stop_signals())
        if s.engine is not None:
            stack.enter_context(s.engine)
        if needs.verifier is not None:
            s.verifiers = stack.enter_context(Verifiers(needs.verifier))
        if needs.samples_per_step is not None:
            s.samples = stack.enter_context(SamplesLog(s.run_dir, needs.samples_per_step, s.progress.step, s.world))
        s.log = stack.enter_context(MetricsLog(s.run_dir, config.run.steps, config.run.report_to,
                                               done=s.progress.step, name=name, config=to_dict(config)))
        try:
            yield s
        finally:
            s.backbone = s.shadow = None  # DDP's reducer / FSDP's state go before the process group
    if s.run_dir is not None:
        print(stage_summary(stage, s.progress), file=sys.stderr)
    distributed.teardown()
