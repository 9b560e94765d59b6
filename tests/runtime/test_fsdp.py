"""run.parallel=fsdp under torchrun on CPU (gloo): two processes sharding weights, gradients, optimizer
state and the teacher's snapshot end where one process does; checkpoints load with transformers;
a run killed mid-step resumes on two processes and on one; two launchers of one job (`--nnodes 2`)
end where one launcher of two processes does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opsd.core.tiny import save_tiny
from opsd.runtime.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# uneven shares: 3 problems over 2 processes, one sequence per micro-batch, so processes run out of
# micro-batches at different times; a large learning rate so that differences would show
COMMON = ["run.report_to=[]", "optim.lr=1e-2", "optim.micro_batch_size=1", "run.threads=1", "run.problems_per_step=3",
          "run.steps=3", "run.save_every=1", "run.keep_last=0"]
DISTILL = ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.n=2", "sampling.max_new_tokens=12", *COMMON]
SFT = ["sft", str(ROOT / "configs/sft-tiny.yaml"), f"data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}",
       *COMMON]
RLVR = ["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), "sampling.max_new_tokens=12", "grpo.kl_coef=0.1", *COMMON]
FSDP = ["run.parallel=fsdp"]
TOLERANCE = 1e-5  # float sums in another order (two processes' gradients reduced), after 3 steps at lr 1e-2


def opsd(args: list[str], out: Path, processes: int = 1, crash: str | None = None,
         crash_rank: int = 1, signal_name: str = "KILL", env_extra: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env.pop("OPSD_CRASH_AT", None)
    if crash:  # that rank sends itself SIGKILL (or `signal_name`) at that point (opsd/runtime/faults.py)
        env.update({"OPSD_CRASH_AT": crash, "OPSD_CRASH_RANK": str(crash_rank), "OPSD_CRASH_SIGNAL": signal_name})
    return subprocess.run([sys.executable, *launcher, "-m", "opsd.cli", *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def trained(args: list[str], out: Path, processes: int = 1) -> dict[str, torch.Tensor]:
    result = opsd(args, out, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(out)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tolerance, f"weights differ by up to {worst:.3g}"


def moved(a: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - start[k]).abs().max()) for k in a)


POLICIES = {
    "frozen": ["teacher.weights.policy=frozen"],
    "refresh": ["teacher.weights.policy=refresh", "teacher.weights.refresh_every=2"],
    "ema": ["teacher.weights.policy=ema", "teacher.weights.ema_decay=0.5"],
    "live": ["teacher.weights.policy=live"],
    "lora": ["model.lora_rank=4", "optim.lr=5e-2"],  # LoRA: the frozen teacher is the base (adapters off)
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Distill runs that several tests compare with, each run once: `runs(policy, processes)` is the
    folder of DISTILL under that teacher policy, in one process or in two with FSDP. LoRA starts from
    a model folder: loading one draws the adapters' initial values from torch's global generator
    (builtin:tiny reseeds it), which every process must seed alike."""
    done: dict[tuple[str, int], Path] = {}
    model = save_tiny(tmp_path_factory.mktemp("model") / "tiny")

    def run(policy: str, processes: int) -> Path:
        if (policy, processes) not in done:
            out = tmp_path_factory.mktemp("runs") / f"{policy}-{processes}"
            start = [f"model.name_or_path={model}"] if policy == "lora" else []
            trained([*DISTILL, *POLICIES[policy], *start, *(FSDP if processes > 1 else [])], out, processes)
            done[policy, processes] = out
        return done[policy, processes]
    return run


@pytest.mark.parametrize("policy", POLICIES)
def test_two_sharded_processes_distill_like_one(runs, policy):
    one, two = runs(policy, 1), runs(policy, 2)
    # LoRA: each micro-batch's gradients are reduce-scattered as they come (distributed.no_sync_unless), so the
    # sums run in another order, and AdamW's normalisation of LoRA's zero-initialised B lifts that float noise
    # (5e-5 after 3 steps at lr 1e-2; a wrong gradient would move the weights by ~lr)
    assert_same(weights(one), weights(two), tolerance=2e-4 if policy == "lora" else TOLERANCE)
    first = load_file(str(one / "checkpoints/step_000001/model.safetensors"))
    assert moved(weights(one), first) > 1e-3  # steps 2-3 changed the weights: the comparison means something
    state = two / "checkpoints/step_000003"
    assert sorted(p.name for p in (state / "sharded_state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((state / "opsd_checkpoint.json").read_text())["files"].count("sharded_state") == 1


@pytest.mark.parametrize("stage", [SFT, RLVR], ids=["sft", "rlvr"])
def test_two_sharded_processes_train_sft_and_rlvr_like_one(tmp_path, stage):
    assert_same(trained(stage, tmp_path / "one"), trained([*stage, *FSDP], tmp_path / "two", processes=2))


def test_token_budget_micro_batches_under_fsdp_end_like_one_process(tmp_path):
    """optim.micro_batch_tokens: the micro-batch count depends on each process's rollouts (here 2 against 1:
    rollouts of ~200 positions, in pairs), the process with fewer makes idle passes, and the run ends where
    one process does."""
    args = [*DISTILL, *POLICIES["frozen"], "optim.micro_batch_tokens=450"]
    assert_same(trained(args, tmp_path / "one"), trained([*args, *FSDP], tmp_path / "two", processes=2))


def test_a_sharded_checkpoint_loads_with_transformers_and_generates(runs):
    prompt = torch.tensor([[5, 17, 30, 41, 8, 9]])
    outputs = []
    for processes in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(runs("frozen", processes)))
        outputs.append(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert outputs[0].shape == (1, 14)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("crash, crash_rank, processes", [
    ("decode:14", 1, 2),  # rank 1 in the middle of step 2's generation; resumed on two processes
    ("checkpoint:2", 0, 1),  # rank 0 writing step 2's checkpoint, the shards already written; resumed on one
], ids=["mid-generation-then-two", "mid-checkpoint-then-one"])
def test_a_killed_sharded_run_resumes_on_two_processes_and_on_one(tmp_path, runs, crash, crash_rank, processes):
    args = [*DISTILL, *POLICIES["ema"], *FSDP]
    killed = opsd(args, tmp_path / "run", processes=2, crash=crash, crash_rank=crash_rank)
    assert killed.returncode != 0
    assert latest_checkpoint(tmp_path / "run").name == "step_000001"  # step 2 died before its checkpoint was whole
    resumed = trained(args, tmp_path / "run", processes)
    # on two processes the same run exactly; on one, the same sums in another order
    assert_same(weights(runs("ema", 2)), resumed, 0.0 if processes == 2 else TOLERANCE)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp"))


def test_a_signal_to_one_process_stops_both_after_the_step_and_the_run_resumes_exactly(tmp_path, runs):
    """SIGTERM reaches rank 1 alone, mid-generation of step 2: both processes finish step 2, agree to
    stop, write its checkpoint and exit 75; started again, the run ends bitwise where it would have."""
    args = [*DISTILL, *POLICIES["ema"], *FSDP]
    stopped = opsd(args, tmp_path / "run", processes=2, crash="decode:14", crash_rank=1, signal_name="TERM")
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped after step 2 with its checkpoint") == 2, stopped.stderr[-3000:]
    assert "SIGTERM: stopped" in stopped.stderr and "a stop signal (on another process): stopped" in stopped.stderr
    assert "exitcode  : 75" in stopped.stderr  # torchrun's report of its workers
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert_same(weights(runs("ema", 2)), trained(args, tmp_path / "run", 2), 0.0)


def test_a_process_far_behind_is_named_by_the_one_waiting_for_it(tmp_path):
    """Rank 1 stalls 4 s mid-generation; rank 0, waiting in the step's first reduction, says every second
    (OPSD_HEARTBEAT_S) which process it waits for, and the run ends normally."""
    result = opsd([*DISTILL, *FSDP, "run.steps=2"], tmp_path / "run", processes=2, crash="decode:14",
                  env_extra={"OPSD_STALL_S": "4", "OPSD_HEARTBEAT_S": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opsd: process 0 has waited" in result.stderr and "for process(es) 1 (still generating?" in result.stderr
    assert "opsd: process 1 has waited" not in result.stderr


def test_two_launchers_of_one_job_end_like_one_launcher(tmp_path, runs):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [*DISTILL, *POLICIES["ema"], *FSDP]
    node = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "opsd-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, *node, "-m", "opsd.cli", *args, f"run.output_dir={tmp_path / 'nodes'}"]
    logs = [tmp_path / f"launcher-{number}.log" for number in (1, 2)]  # files: a full pipe would stall a launcher
    with logs[0].open("w") as first, logs[1].open("w") as second:
        launchers = [subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                     for out in (first, second)]
        codes = [launcher.wait(timeout=300) for launcher in launchers]
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-3000:]
    assert_same(weights(runs("ema", 2)), weights(tmp_path / "nodes"), 0.0)


ACCUMULATION = """
import json, os, torch
from opsd.core.models import Backbone, output_head
from opsd.core.tiny import build_tiny
from opsd.runtime import distributed
torch.set_num_threads(1)
device = torch.device("cpu")
rank = distributed.setup(device)
model, _ = build_tiny(hidden_size=64, num_layers=2, seed=0)
params = sum(p.numel() for p in model.parameters())
backbone = distributed.wrap(Backbone(model), device, "fsdp")
ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(rank))
held = []
for index in range(2):  # two micro-batches of one step: what is held between them
    with distributed.no_sync_unless(backbone, last=index == 1):
        hidden = backbone(ids, torch.ones_like(ids))
        (hidden @ output_head(model).T).logsumexp(-1).mean().backward()
    states = [m._get_fsdp_state() for m in backbone.modules() if distributed.is_sharded(m)]
    params_ = [fp for s in states for g in [s._fsdp_param_group] if g for fp in g.fsdp_params]
    def whole(fp):  # FSDP2 keeps a put-off gradient unsharded: on the unsharded parameter, or accumulated apart
        kept = [getattr(fp, "unsharded_accumulated_grad", None), getattr(fp, "_unsharded_param", None)]
        kept[1] = kept[1].grad if kept[1] is not None else None
        return sum(t.numel() * t.element_size() for t in kept if t is not None)
    unsharded = sum(whole(fp) for fp in params_)
    sharded = sum(distributed.local(p.grad).numel() * 4 for p in model.parameters() if p.grad is not None)
    held.append({"unsharded": unsharded, "sharded": sharded})
if rank == 0:
    print(json.dumps({"params": params, "held": held}), flush=True)
del backbone
distributed.teardown()
os._exit(0)  # past the teardown: gloo's threads were seen to abort the interpreter's own exit on a busy CPU
"""


def test_gradient_accumulation_under_fsdp_holds_only_sharded_gradients(tmp_path):
    """Between the micro-batches of a step each process holds its shard of the float32 gradients, not the
    whole model's (which FSDP keeps unsharded while the reduce-scatter is put off to the last micro-batch)."""
    script = tmp_path / "accumulation.py"
    script.write_text(ACCUMULATION)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    first, last = report["held"]
    assert first["unsharded"] == 0 and last["unsharded"] == 0
    assert first["sharded"] == last["sharded"] == pytest.approx(4 * report["params"] / 2, rel=0.02)


LOAD = """
import json, os, sys, torch
from safetensors.torch import load_file
from opsd.core.models import ModelConfig, causal_lm, load_model
from opsd.runtime import distributed
from opsd.runtime.training import OptimConfig, load_policy, wrap_policy
def held(field):  # bytes of this process's resident memory (VmRSS) or its peak since the last reset (VmHWM)
    return 1024 * int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field)))
torch.set_num_threads(1)
device = torch.device("cpu")
rank = distributed.setup(device)
config, optim, way = ModelConfig(name_or_path=sys.argv[1]), OptimConfig(), sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = held("VmRSS:")
if way == "sharded":  # what opsd does under run.parallel=fsdp
    source = load_policy(config, optim, device) if rank == 0 else None
    model = load_policy(config, optim, device, empty=True)
else:  # every process loads the whole model first (opsd before, and DDP)
    source, model = None, load_policy(config, optim, device)
backbone = wrap_policy(model, device, "fsdp", False, optim, source)
source = None
peak = held("VmHWM:") - before
state = {key.removeprefix("model."): distributed.full(value) for key, value in backbone.state_dict().items()}
buffers = {key.removeprefix("model."): value for key, value in backbone.named_buffers()}
if rank == 0:
    stored = load_file(os.path.join(sys.argv[1], "model.safetensors"))
    loaded = load_model(config, device)
    same = all(torch.equal(state[key], stored[key]) for key in stored)
    same_buffers = all(torch.equal(buffers[key], value) for key, value in causal_lm(loaded).named_buffers())
    whole = sum(t.numel() * t.element_size() for t in stored.values())
    print(json.dumps({"whole": whole, "same": same and len(stored) > 10, "same_buffers": same_buffers}), flush=True)
distributed.barrier_long()
if rank == 1:
    print(json.dumps({"peak": peak}), flush=True)
del backbone
distributed.teardown()
os._exit(0)
"""


def test_a_sharded_load_never_holds_the_whole_model_on_a_process_but_rank_0(tmp_path):
    """Under FSDP the processes build the policy empty and receive their shards from rank 0: a process
    other than rank 0 never holds more than its half and one whole tensor (each process loading the
    whole model first, as before, held all of it), and the weights and buffers are the file's exactly.
    Large tensors are mapped apart (MALLOC_MMAP_THRESHOLD_), so that the resident memory is what is
    alive, not what glibc keeps after a free."""
    layers = 64
    folder = save_tiny(tmp_path / "model", hidden_size=256, num_layers=layers, intermediate_size=1024)
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    reports = {}
    for way in ("sharded", "whole"):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(script), str(folder), way], capture_output=True, text=True, cwd=ROOT,
                                timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                  "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        reports[way] = {key: value for line in lines for key, value in line.items()}
    sharded, whole = reports["sharded"], reports["whole"]
    assert sharded["same"] and sharded["same_buffers"]
    assert whole["peak"] >= 0.9 * whole["whole"]  # the measurement sees a whole model where there is one
    # its half, the layers FSDP gathers around the one computing (wrap's first forward), the interpreter's own
    layer = sharded["whole"] / layers
    assert sharded["peak"] <= sharded["whole"] / 2 + 4 * layer + 32 * 2**20, (sharded["peak"], sharded["whole"])


def test_the_memory_table_counts_qwen3_parameters_as_transformers_does():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd.runtime.memory import QWEN3, Shape

    for tied in (True, False):
        config = Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
        assert Shape("small", 64, 96, 3, 4, 2, 16, 100, tied).params == sum(p.numel() for p in model.parameters())
    # the published sizes: 0.6B, 1.7B, 8.2B, 14.8B
    assert [round(shape.params / 1e8) / 10 for shape in QWEN3] == [0.6, 1.7, 8.2, 14.8]


@pytest.mark.parametrize("processes", [1, 2])
def test_the_memory_prediction_is_what_a_real_step_holds(processes):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(ROOT / "benchmarks/fsdp_memory.py")], capture_output=True,
                            text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and "bytes" not in line]
    parts = {name.strip(): (int(measured.replace(",", "")), float(predicted.replace(",", "")))
             for name, measured, predicted, _ in rows}
    assert set(parts) == {"weights", "gradients", "optimizer", "teacher", "gathered"}
    for name, (measured, predicted) in parts.items():
        assert measured == predicted, name
    assert parts["weights"][0] > 0 and (parts["gathered"][0] > 0) == (processes > 1)
    assert result.stdout.splitlines()[-1].endswith("measured_equals_predicted=True")


def test_a_pipeline_under_torchrun_shards_every_stage_and_ends_like_one_process(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
model: {{name_or_path: builtin:tiny}}
stages:
  - {{name: sft, command: sft, config: {ROOT / 'configs/sft-tiny.yaml'},
     overrides: [data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}, run.steps=3, run.problems_per_step=4]}}
  - {{name: opsd, command: distill, config: {ROOT / 'configs/tiny.yaml'},
     overrides: [run.steps=2, teacher.context=concise, sampling.max_new_tokens=12, run.problems_per_step=3,
                 sampling.temperature=0]}}
eval:
  data: [{ROOT / 'configs/examples/arithmetic.jsonl'}]
  limit: 4
  sampling: {{n: 1, max_new_tokens: 8, batch_size: 64}}
run: {{report_to: [], threads: 1}}
""")
    one = opsd(["pipeline", str(config)], tmp_path / "one")
    two = opsd(["pipeline", str(config), *FSDP], tmp_path / "two", processes=2)
    for result in (one, two):
        assert result.returncode == 0, result.stderr[-3000:]
    assert two.stdout.count("run folder:") == 1  # rank 0 alone evaluates and reports
    assert (tmp_path / "two/summary.md").is_file()
    for stage in ("sft", "opsd"):
        # from sft's checkpoint the distill stage's 2 steps magnify float reordering more: two DDP
        # processes differ from one by as much (6.6e-5 at lr 1e-2; 4.8e-6 measured here, at the config's 1e-3)
        assert_same(weights(tmp_path / "one" / stage), weights(tmp_path / "two" / stage), 5 * TOLERANCE)
        assert (latest_checkpoint(tmp_path / "two" / stage) / "sharded_state").is_dir()


@pytest.mark.parametrize("override, message", [
    ("run.parallel=zero", "run.parallel' must be one of 'ddp', 'fsdp'"),
    ("run.fsdp_offload=true", "run.fsdp_offload must be false unless run.parallel=fsdp"),
    ("run.parallel=fsdp run.fsdp_offload=true", "on a CPU they are there already"),
])
def test_parallel_options_are_checked_before_the_run_folder_exists(tmp_path, capsys, override, message):
    from opsd.cli import main

    out = tmp_path / "run"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), "run.device=cpu", *override.split(),
                 f"run.output_dir={out}"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_docs_show_the_memory_table_as_computed():
    from opsd.runtime.memory import table

    assert table() in (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")


def test_lora_on_a_layer_a_sharded_checkpoint_cannot_merge_is_refused_before_training(tmp_path):
    args = [*DISTILL, "model.lora_rank=4", "model.lora_target_modules=embed_tokens,q_proj", *FSDP]
    result = opsd(args, tmp_path / "run", processes=2)
    assert result.returncode != 0
    assert "opsd: error: run.parallel=fsdp saves LoRA merged from linear layers only, and " \
           "model.embed_tokens (Embedding) is not one" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_written_before_run_parallel_existed_still_resumes(tmp_path):
    import yaml

    from opsd.cli import main

    out = tmp_path / "run"
    args = ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.max_new_tokens=8", "run.problems_per_step=2",
            "run.report_to=[]", "run.device=cpu", f"run.output_dir={out}"]
    assert main([*args, "run.steps=1"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["run"]["parallel"], config["run"]["fsdp_offload"]  # as the previous version wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([*args, "run.steps=2"]) == 0
    assert latest_checkpoint(out).name == "step_000002"


def test_a_sharded_checkpoint_before_any_update_leaves_the_optimizer_as_it_was(tmp_path):
    """torch builds an un-stepped optimizer's state for a state dict by a step with zero gradients;
    a checkpoint after steps that trained on nothing must not count that step (AdamW's bias correction)."""
    from opsd.core.models import ModelConfig
    from opsd.core.tiny import build_tiny
    from opsd.runtime.checkpoint import restore, save_run_checkpoint, start_model
    from opsd.runtime.runs import RunConfig
    from opsd.runtime.training import Progress

    def fresh():
        model, tokenizer = build_tiny(seed=3)
        return model, tokenizer, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, tokenizer, optimizer = fresh()
    run = RunConfig(output_dir=str(tmp_path / "run"), parallel="fsdp")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    start = start_model(ModelConfig(), model)
    folder = save_run_checkpoint(tmp_path / "run", model, tokenizer, optimizer, Progress(step=1),
                                 {"stage": "distill"}, run, start)
    assert not optimizer.state
    resumed_model, _, resumed = fresh()
    assert restore(folder, resumed_model, resumed, start).step == 1
    assert not resumed.state


def test_a_process_that_keeps_no_rollout_in_a_step_still_takes_part(tmp_path):
    """The demo's SFT model solves about half of its problems: with correct-only gating and one problem
    per process, some steps leave one process with nothing to train on while the other has some."""
    from opsd.demo import toyworld

    data = toyworld.write_jsonl(toyworld.problem_rows(toyworld.problems(12, seed=5)), tmp_path / "problems.jsonl")
    args = ["distill", str(ROOT / "configs/tiny.yaml"), f"model.name_or_path={ROOT / 'opsd/demo/assets/toyworld-sft'}",
            f"data.path={data}", "gating=correct_only", "sampling.n=1", "sampling.max_new_tokens=256",
            "run.problems_per_step=2", "run.steps=4", "optim.micro_batch_size=1", "optim.lr=1e-3",
            "run.report_to=[]", "run.threads=1"]
    one = trained(args, tmp_path / "one")
    two = trained([*args, *FSDP], tmp_path / "two", processes=2)
    assert_same(one, two)
    # the metrics describe the whole step, as one process's do
    metrics = [[json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
               for out in ("one", "two")]
    for key in ("rollout/kept", "rollout/count", "train/tokens", "rollout/accuracy"):
        assert [row[key] for row in metrics[0]] == [row[key] for row in metrics[1]], key
    # samples.jsonl holds every process's rollout (one each): a step where one process kept none, the other some
    rows = [json.loads(line) for line in (tmp_path / "two/samples.jsonl").read_text().splitlines()]
    kept = {(row["step"], row["process"]): row["kept"] for row in rows}
    assert any(kept[step, 0] != kept[step, 1] for step in range(1, 5)), rows


def test_a_pipeline_stage_cannot_override_the_process_group_options(tmp_path, capsys):
    from opsd.cli import main

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
model: {{name_or_path: builtin:tiny}}
stages:
  - {{name: sft, command: sft, config: {ROOT / 'configs/sft-tiny.yaml'},
     overrides: [data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}, run.parallel=fsdp]}}
eval: {{data: [{ROOT / 'configs/examples/arithmetic.jsonl'}]}}
""")
    assert main(["pipeline", str(config), f"run.output_dir={tmp_path / 'out'}"]) == 2
    assert ("pipeline stage 'sft': run.parallel is the pipeline's (its run section), the same for every stage"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_pruning_keeps_a_checkpoint_whose_sharded_state_holds_a_file_opsd_did_not_write(tmp_path, capsys):
    from opsd.cli import main

    out = tmp_path / "run"
    args = ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.max_new_tokens=8", "run.problems_per_step=2",
            "run.report_to=[]", "run.device=cpu", "run.save_every=1", "run.keep_last=1", *FSDP, f"run.output_dir={out}"]
    assert main([*args, "run.steps=1"]) == 0
    (out / "checkpoints/step_000001/sharded_state/notes.txt").write_text("mine")
    assert main([*args, "run.steps=3"]) == 0
    assert (out / "checkpoints/step_000001/sharded_state/notes.txt").read_text() == "mine"
    assert "kept" in capsys.readouterr().err
    assert not (out / "checkpoints/step_000002").exists()  # opsd's own is pruned
