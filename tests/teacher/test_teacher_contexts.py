"""Purified OPSD's target, the reflection memo, the external teacher (METHODS.md §3–§5)."""

import json
from pathlib import Path

import pytest
import torch

from opsd.cli import main
from opsd.core.data import Problem
from opsd.core.tiny import char_tokenizer, save_tiny
from opsd.objectives.divergence import (
    DivergenceSpec,
    chunked_divergence,
    chunked_divergence_to,
)
from opsd.objectives.purified import (
    PurifiedTarget,
    gap_diagnostics,
    purified_target_logprobs,
)
from opsd.teacher.memo import memo_prompt, memo_teacher_message, strip_thinking

ROOT = Path(__file__).resolve().parents[2]
V = 23


def logps(seed: int, n: int = 6, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, V, generator=g, dtype=torch.float64), -1)


def test_reference_only_equal_to_base_and_no_clip_gives_the_teacher():
    teacher, base = logps(0), logps(1)
    target = purified_target_logprobs(teacher, base, base, clip=1e6, beta=1.0)
    torch.testing.assert_close(target, teacher)


def test_teacher_equal_to_reference_only_gives_the_base():
    teacher, base = logps(0), logps(1)
    torch.testing.assert_close(purified_target_logprobs(teacher, teacher, base), base)


def test_target_is_a_distribution_and_finite_under_extreme_logits():
    extreme = [torch.log_softmax(torch.tensor([[1e4, -1e4, 0.0] * 7 + [3e3, -3e3]], dtype=torch.float32), -1),
               torch.log_softmax(torch.tensor([[-1e4] * 22 + [1e4]], dtype=torch.float32), -1),
               torch.log_softmax(torch.zeros(1, V), -1)]
    for t in extreme:
        for r in extreme:
            for b in extreme:
                target = purified_target_logprobs(t, r, b)
                assert torch.isfinite(target).all()
                torch.testing.assert_close(target.exp().sum(-1), torch.ones(1))


def test_soft_clip_bounds_the_tilt_and_beta_scales_it():
    teacher, reference, base = logps(0, scale=50.0), logps(1, scale=50.0), logps(2)
    tilt = purified_target_logprobs(teacher, reference, base, clip=0.5) - base
    spread = (tilt - tilt.mean(-1, keepdim=True)).abs().max()
    assert spread <= 2 * 0.5 + 1e-9  # c·tanh(·/c) ∈ (−c, c), up to the normalising constant
    mild = purified_target_logprobs(teacher, reference, base, beta=1e6)
    torch.testing.assert_close(mild, base, atol=1e-4, rtol=0)


def test_gap_diagnostics():
    teacher, base = logps(0), logps(1)
    cosine, ratio = gap_diagnostics(teacher, teacher, base)  # the reference alone explains the whole gap
    torch.testing.assert_close(cosine, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(ratio, torch.ones(6, dtype=torch.float64))
    cosine, ratio = gap_diagnostics(teacher, base, base)  # the reference explains nothing
    assert torch.all(ratio == 0)


def test_chunked_purified_equals_the_naive_target():
    g = torch.Generator().manual_seed(0)
    n, h = 11, 5
    views = [torch.randn(n, h, generator=g, dtype=torch.float64) for _ in range(3)]
    head = torch.randn(V, h, generator=g, dtype=torch.float64)
    student = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight, targets = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    fused = chunked_divergence_to(student, head, PurifiedTarget(*views, head, 10.0, 1.0), weight, targets,
                                  spec=DivergenceSpec(chunk_size=4, kind="jsd", beta=0.5))
    naive_target = purified_target_logprobs(*(torch.log_softmax(v @ head.T, -1) for v in views))
    reference = student.detach().clone().requires_grad_()
    naive = chunked_divergence_to(reference, head, lambda part: naive_target[part], weight, targets,
                                  spec=DivergenceSpec(chunk_size=1000, kind="jsd", beta=0.5))
    fused.loss.backward()
    naive.loss.backward()
    torch.testing.assert_close(fused.loss, naive.loss)
    torch.testing.assert_close(student.grad, reference.grad)


def test_memo_lands_in_the_teacher_prompt_only():
    tok = char_tokenizer()
    problem = Problem("a", "Compute 2 + 3.", "5")
    asked = tok.decode(memo_prompt(tok, problem, "2+3=6. Answer: 6", False, "Write a memo."))
    assert "Compute 2 + 3." in asked and "2+3=6" in asked and "The correct final answer is 5." in asked
    assert "correct." in tok.decode(memo_prompt(tok, problem, "Answer: 5", True, "Write a memo."))
    message = memo_teacher_message(problem, strip_thinking("<think>hmm, {problem}</think>Add carefully: 2+3=5."))
    assert message.endswith("Add carefully: 2+3=5.") and "hmm" not in message and message.startswith("Compute 2 + 3.")
    assert strip_thinking("<think>never closed") == ""


def test_memo_run_puts_memos_into_teacher_prompts_and_not_the_student(tmp_path, monkeypatch):
    import opsd.stages.distill
    import opsd.teacher.target

    seen = {}
    real_pack = opsd.stages.distill.pack

    def spy(side):
        def packing(prompts, responses, pad_id, device, flat=False):
            seen.setdefault(side, []).extend(char_tokenizer().decode(prompt) for prompt in prompts)
            return real_pack(prompts, responses, pad_id, device, flat)
        return packing

    monkeypatch.setattr(opsd.stages.distill, "pack", spy("student"))  # the student forward
    monkeypatch.setattr(opsd.teacher.target, "pack", spy("teacher"))  # the teacher forward
    out = tmp_path / "memo"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", "run.steps=1",
                 "teacher.context=memo", "teacher.memo_max_tokens=8", "sampling.max_new_tokens=8",
                 "run.report_to=[]"]) == 0
    assert len(seen["teacher"]) == 16 and len(seen["student"]) == 16  # 8 problems × 2 samples, kept by gating=all
    assert all("A memo you wrote" not in text for text in seen["student"])
    assert all("A memo you wrote" in text for text in seen["teacher"])
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["time/memo_s"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["kept"] and isinstance(s["memo"], str) for s in samples)
    assert all("A memo you wrote" in s["teacher_prompt"] and s["memo"] in s["teacher_prompt"] for s in samples)
    assert all("A memo you wrote" not in s["prompt"] for s in samples)


def test_external_teacher_with_the_same_weights_gives_the_self_teacher_loss(tmp_path):
    folder = save_tiny(tmp_path / "teacher")  # the builtin tiny model's initial weights
    common = [str(ROOT / "configs/tiny.yaml"), "run.steps=1", "run.report_to=[]", "sampling.max_new_tokens=12"]
    assert main(["distill", *common, f"run.output_dir={tmp_path / 'self'}"]) == 0
    assert main(["distill", *common, f"run.output_dir={tmp_path / 'ext'}", f"teacher.model.name_or_path={folder}"]) == 0
    own, ext = (json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in ("self", "ext"))
    assert own["rollout/response_tokens_mean"] == ext["rollout/response_tokens_mean"]
    assert ext["loss/divergence"] == pytest.approx(own["loss/divergence"], rel=1e-5)
    assert ext["optim/grad_norm"] == pytest.approx(own["optim/grad_norm"], rel=1e-5)


def test_external_teacher_with_another_vocabulary_is_refused(tmp_path, capsys):
    folder = save_tiny(tmp_path / "teacher", alphabet="0123456789+-=. \nAnswer:")
    code = main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={tmp_path / 'x'}",
                 f"teacher.model.name_or_path={folder}"])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary" in err and "tokens" in err and not (tmp_path / "x").exists()


def test_purified_run_logs_its_diagnostics(tmp_path):
    out = tmp_path / "pur"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", "run.steps=1",
                 "teacher.context=purified", "loss.kind=jsd", "sampling.max_new_tokens=8", "run.report_to=[]"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert -1.0 <= row["purified/gap_cosine"] <= 1.0 and row["purified/gap_norm_ratio"] >= 0
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])  # the three views: πT, πR, P0
    problem = sample["prompt"].split("user\n")[1].split("<|im_end|>")[0]
    assert problem in sample["teacher_prompt"] and problem not in sample["reference_only_prompt"]
    assert "Here is a reference solution to a problem:" in sample["reference_only_prompt"]


def test_chunked_divergence_to_a_linear_teacher_is_the_plain_one():
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    head = torch.randn(V, 4, generator=g)
    w, y = torch.full((7,), 1 / 7), torch.zeros(7, dtype=torch.long)
    a = chunked_divergence(hs, head, ht, head, w, y, spec=DivergenceSpec(chunk_size=3))
    b = chunked_divergence_to(hs, head, lambda part: ht[part] @ head.T, w, y, spec=DivergenceSpec(chunk_size=3))
    torch.testing.assert_close(a.loss, b.loss)


def test_external_teacher_in_another_dtype(tmp_path):
    folder = save_tiny(tmp_path / "teacher")
    common = [str(ROOT / "configs/tiny.yaml"), "run.steps=1", "run.report_to=[]", "sampling.max_new_tokens=12",
              f"teacher.model.name_or_path={folder}"]
    assert main(["distill", *common, f"run.output_dir={tmp_path / 'fp32'}"]) == 0
    assert main(["distill", *common, f"run.output_dir={tmp_path / 'bf16'}", "teacher.model.dtype=bfloat16"]) == 0
    fp32, bf16 = (json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in ("fp32", "bf16"))
    assert bf16["loss/divergence"] == pytest.approx(fp32["loss/divergence"], rel=0.2, abs=1e-3)
