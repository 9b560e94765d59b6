"""`opsd distill` end to end on the local tiny model: outputs, checkpoints, teacher-weight policies."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from opsd.cli import main
from opsd.core.tiny import build_tiny
from opsd.runtime.checkpoint import fingerprint

ROOT = Path(__file__).resolve().parents[2]
TINY = ["sampling.max_new_tokens=16", "sampling.n=2", "run.problems_per_step=4", "optim.micro_batch_size=3",
        "optim.lr=1e-2", "optim.chunk_size=7", "run.report_to=[]"]


def distill(tmp_path, *overrides, name="run"):
    out = tmp_path / name
    code = main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *TINY, *overrides])
    assert code == 0
    return out


def model_weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_distill_writes_config_metrics_and_a_loadable_checkpoint(tmp_path):
    out = distill(tmp_path, "run.steps=3", "run.save_every=2")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"]["steps"] == 3 and config["optim"]["chunk_size"] == 7
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss/divergence", "rollout/accuracy", "rollout/response_tokens_mean", "rollout/response_tokens_max",
                "loss/clipped_ratio", "loss/student_entropy", "optim/grad_norm", "throughput/generate_tokens_per_s",
                "time/generate_s", "time/teacher_s", "time/student_s", "rollout/truncated_ratio"):
        assert key in rows[0], key
    assert rows[0]["rollout/count"] == 8 and rows[0]["rollout/kept"] == 8
    assert rows[0]["loss/divergence"] > 0 and rows[0]["optim/grad_norm"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]

    final = out / "checkpoints" / "step_000003"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    initial = build_tiny()[0].state_dict()
    trained = model_weights(final)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_frozen_teacher_stays_at_the_initial_weights(tmp_path):
    out = distill(tmp_path, "run.steps=3", "run.save_every=1", "teacher.weights.policy=frozen")
    initial = dict(build_tiny()[0].named_parameters())
    for step in (1, 2, 3):  # no copy saved: the checkpoint records the start model's fingerprint instead
        folder = out / "checkpoints" / f"step_{step:06d}"
        assert not (folder / "teacher.safetensors").exists()
        recorded = json.loads((folder / "opsd_checkpoint.json").read_text())["start_model"]
        expected = fingerprint({f"teacher/{n}": p for n, p in initial.items()})
        assert recorded == {"path": "builtin:tiny", "sha256": expected}
    student = model_weights(out / "checkpoints/step_000003")
    assert not torch.equal(student["model.embed_tokens.weight"], initial["model.embed_tokens.weight"].detach())


def test_refresh_teacher_copies_the_student_every_m_steps(tmp_path):
    out = distill(tmp_path, "run.steps=5", "run.save_every=1", "run.keep_last=0", "teacher.weights.policy=refresh",
                  "teacher.weights.refresh_every=2")
    initial = dict(build_tiny()[0].named_parameters())
    student = {s: model_weights(out / "checkpoints" / f"step_{s:06d}") for s in range(1, 6)}
    teacher = {s: load_file(str(out / "checkpoints" / f"step_{s:06d}" / "teacher.safetensors")) for s in range(1, 6)}
    # teacher after step s: initial until step 2, student@2 during steps 3-4, student@4 at step 5
    expected = {1: {k: v.detach() for k, v in initial.items()}, 2: student[2], 3: student[2], 4: student[4],
                5: student[4]}
    for step in range(1, 6):
        for name, tensor in teacher[step].items():
            assert torch.equal(tensor, expected[step][name]), (step, name)
    assert not torch.equal(student[2]["model.embed_tokens.weight"], initial["model.embed_tokens.weight"].detach())
    assert not torch.equal(teacher[5]["model.embed_tokens.weight"], student[5]["model.embed_tokens.weight"])


def test_ema_teacher_moves_towards_the_student(tmp_path):
    out = distill(tmp_path, "run.steps=2", "run.save_every=1", "teacher.weights.policy=ema",
                  "teacher.weights.ema_decay=0.5")
    initial = build_tiny()[0].state_dict()
    s1, s2 = (model_weights(out / f"checkpoints/step_{s:06d}") for s in (1, 2))
    t2 = load_file(str(out / "checkpoints/step_000002/teacher.safetensors"))
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(t2[key], 0.25 * initial[key] + 0.25 * s1[key] + 0.5 * s2[key])


@pytest.mark.parametrize("options", [
    ["loss.kind=forward_kl", "loss.clip_tau=0.05", "loss.temperature=1.1"],
    ["loss.kind=jsd", "loss.beta=0.5", "loss.estimator=topk", "loss.top_k=8"],
    ["loss.estimator=sampled", "teacher.context=concise"],
    ["loss.kind=branched", "teacher.context=answer", "gating=correct_and_truncated"],
    ["teacher.context=template", "teacher.template=Solve: {problem} (answer {answer})", "teacher.weights.policy=live",
     "optim.schedule=cosine", "optim.warmup_steps=1"],
])
def test_every_option_family_runs(tmp_path, options):
    out = distill(tmp_path, "run.steps=2", *options)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def test_correct_only_gating_with_no_correct_rollout_skips_the_update(tmp_path):
    out = distill(tmp_path, "run.steps=2", "gating=correct_only")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/kept"] == 0 and r["optim/empty_step"] for r in rows)  # a random model is never right
    assert torch.equal(model_weights(out / "checkpoints/step_000002")["model.embed_tokens.weight"],
                       build_tiny()[0].state_dict()["model.embed_tokens.weight"])


def test_lora_frozen_teacher_is_the_base_and_checkpoint_is_merged(tmp_path):
    pytest.importorskip("peft")
    out = distill(tmp_path, "run.steps=2", "model.lora_rank=4", "optim.lr=5e-2")
    final = out / "checkpoints/step_000002"
    assert not (final / "teacher.safetensors").exists()  # adapters disabled: no copy kept
    weights = model_weights(final)
    assert not any("lora" in k for k in weights)
    initial = build_tiny()[0].state_dict()
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])
    AutoModelForCausalLM.from_pretrained(final)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_mean_is_over_the_step_not_the_micro_batch(tmp_path):
    """The same rollouts give the same gradient whatever the micro-batch size."""
    common = ["run.steps=1", "sampling.max_new_tokens=24", "optim.max_grad_norm=1e9"]
    one = metrics(distill(tmp_path, *common, "optim.micro_batch_size=1", name="one"))[0]
    all_ = metrics(distill(tmp_path, *common, "optim.micro_batch_size=8", name="all"))[0]
    assert one["rollout/response_tokens_mean"] == all_["rollout/response_tokens_mean"]
    assert one["optim/grad_norm"] == pytest.approx(all_["optim/grad_norm"], rel=1e-5)
    assert one["loss/divergence"] == pytest.approx(all_["loss/divergence"], rel=1e-5)


def test_a_non_finite_gradient_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    import dataclasses

    import opsd.stages.distill

    real, calls = opsd.stages.distill.chunked_divergence_to, []

    def poisoned_on_second_step(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return dataclasses.replace(result, loss=result.loss * float("nan")) if len(calls) == 2 else result

    monkeypatch.setattr(opsd.stages.distill, "chunked_divergence_to", poisoned_on_second_step)
    out = distill(tmp_path, "run.steps=3", "run.save_every=1", "optim.micro_batch_size=8")
    assert len(calls) == 3
    assert [r["optim/skipped_steps"] for r in metrics(out)] == [0, 1, 1]
    weights = [model_weights(out / f"checkpoints/step_{s:06d}") for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # step 3 trained again


def test_steps_with_nothing_to_train_on_warn_once_then_stop(tmp_path, capsys):
    """A model that solves nothing under correct-only gating: a warning at the first empty step, a stop
    with exit 2 naming the gating and the accuracy after run.max_empty_steps_in_a_row, never a silent
    no-op run that exits 0."""
    out = tmp_path / "run"
    code = main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *TINY, "run.steps=6",
                 "gating=correct_only", "run.max_empty_steps_in_a_row=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("opsd: warning: step 1 had nothing to train on (gating=correct_only kept none of the 8 "
                     "rollouts; rollout accuracy 0.00)") == 1
    assert err.strip().splitlines()[-1].startswith("opsd: error: training stopped after step 3: 3 steps in a row had "
                                                   "nothing to train on (gating=correct_only")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4 and not any(s["kept"] or s["correct"] for s in samples)
    assert all(s["teacher_prompt"] is None and s["divergence"] is None for s in samples)  # never met the teacher


def test_a_stage_ends_with_a_summary_line(tmp_path, capsys):
    out = distill(tmp_path, "run.steps=2")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["train/tokens"] for r in rows)
    assert tokens > 0
    assert (f"opsd distill: 2 steps done (0 skipped as non-finite, 0 with nothing to train on), {tokens:,} response "
            "tokens trained on") in capsys.readouterr().err


def recording(monkeypatch, stage, packers):
    """The gradients each optimizer step of `stage` (a stage module) is handed, and every pack call
    (who, flat, sequences) of the modules in `packers` (name → module): what a run really computed."""
    grads, packs = [], []
    real_step = stage.guarded_step

    def step(model, *args, **kwargs):
        grads.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None])
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(stage, "guarded_step", step)
    for who, module in packers.items():
        def pack(*args, real=module.pack, who=who, **kwargs):
            packed = real(*args, **kwargs)
            packs.append((who, packed.attention_mask_B_L is None, len(args[0])))
            return packed
        monkeypatch.setattr(module, "pack", pack)
    return grads, packs


def assert_same_gradients(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
    for x, y in zip(a, b):
        for gx, gy in zip(x, y):
            torch.testing.assert_close(gx, gy, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("budget,context", [(1, "reference"), (600, "purified")])
def test_token_budget_micro_batches_give_the_padded_result(tmp_path, monkeypatch, budget, context):
    """optim.micro_batch_tokens packs the kept rollouts back to back without padding, the teacher's views
    (purified: three) like the student's, cut by a token budget (1: every sequence is longer, and goes alone):
    the same gradients, divergence and per-rollout divergences in samples.jsonl as padded micro-batches of 3."""
    import opsd.stages.distill
    import opsd.teacher.target

    grads, packs = recording(monkeypatch, opsd.stages.distill,
                             {"student": opsd.stages.distill, "teacher": opsd.teacher.target})
    common = ["run.steps=1", "optim.max_grad_norm=1e9", "samples_per_step=8", f"teacher.context={context}"]
    padded = distill(tmp_path, *common, name="padded")
    padded_grads, padded_packs = grads[:], packs[:]
    grads.clear(), packs.clear()
    flat = distill(tmp_path, *common, f"optim.micro_batch_tokens={budget}", name="flat")
    assert [(who, f, n) for who, f, n in padded_packs if who == "student"] == [("student", False, 3)] * 2 + \
        [("student", False, 2)]
    student = [n for who, f, n in packs if who == "student"]
    views = 3 if context == "purified" else 1
    assert all(f for _, f, _ in packs) and [n for who, _, n in packs if who == "teacher"] == \
        [n for n in student for _ in range(views)]
    assert sum(student) == 8 and (student == [1] * 8 if budget == 1 else 1 < max(student) < 8)
    assert_same_gradients(padded_grads, grads)
    (a,), (b,) = metrics(padded), metrics(flat)
    # ~2e-4 here, a difference of nearly equal float32 log-probabilities: their rounding (~1e-7) is what may differ
    assert a["loss/divergence"] == pytest.approx(b["loss/divergence"], rel=1e-5, abs=2e-7)
    assert a["optim/grad_norm"] == pytest.approx(b["optim/grad_norm"], rel=1e-5)
    rows = [[json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] for out in (padded, flat)]
    assert [r["response"] for r in rows[0]] == [r["response"] for r in rows[1]]
    # each rollout's divergence (~2e-4 here, a difference of nearly equal log-probabilities): float error of 1e-7
    assert [r["divergence"] for r in rows[0]] == pytest.approx([r["divergence"] for r in rows[1]], rel=1e-4, abs=2e-7)


def test_the_prompt_section_reaches_the_students_the_teachers_and_the_memo_prompts(tmp_path):
    """A system prompt and an instruction after the problem, in every prompt distill renders (samples.jsonl
    shows them as rendered); the memo teacher's prompt is rendered per rollout, after its memo is written."""
    out = distill(tmp_path, "run.steps=1", "teacher.context=memo", "teacher.memo_max_tokens=4",
                  "prompt.system_prompt=Be exact.", "prompt.instruction=Answer last.",
                  "prompt.instruction_position=after")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    system = "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n"
    for sample in samples:
        assert sample["prompt"].startswith(system)
        assert sample["prompt"].endswith("\n\nAnswer last.<|im_end|>\n<|im_start|>assistant\n")
        assert sample["teacher_prompt"].startswith(system)
        assert "A memo you wrote to yourself" in sample["teacher_prompt"]
        assert sample["teacher_prompt"].endswith("\n\nAnswer last.<|im_end|>\n<|im_start|>assistant\n")
