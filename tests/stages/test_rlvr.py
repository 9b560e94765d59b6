"""GRPO/DAPO pieces against hand-computed cases, and `opsd rlvr` end to end on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd.cli import main
from opsd.core.tiny import build_tiny
from opsd.objectives.policy_loss import (
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    kl_k3,
    overlong_penalty,
)

ROOT = Path(__file__).resolve().parents[2]


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = group_advantages(rewards, eps=0.0 + 1e-12)
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(advantages[1], torch.zeros(4))
    std = (0.75 * 0.25) ** 0.5  # population std of one 1 among four
    torch.testing.assert_close(advantages[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)
    torch.testing.assert_close(group_advantages(rewards, scale_by_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_filter_drops_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-0.5, 0.0]])
    assert informative_groups(rewards).tolist() == [True, False, False, True]


@pytest.mark.parametrize("ratio,advantage,loss,clipped", [
    (1.5, 1.0, -1.28, True),    # above 1+ε_high with A>0: capped, no gradient
    (0.5, 1.0, -0.5, False),    # below 1−ε_low with A>0: the unclipped term is smaller, keeps gradient
    (0.5, -1.0, 0.8, True),     # below 1−ε_low with A<0: capped at 0.8
    (1.5, -1.0, 1.5, False),    # above with A<0: unclipped (pessimistic) term
    (1.1, 2.0, -2.2, False),    # inside the range
])
def test_clipped_policy_loss_by_hand(ratio, advantage, loss, clipped):
    logp = torch.tensor([0.3], requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor([ratio]))
    value, was_clipped = clipped_policy_loss(logp, old, torch.tensor([advantage]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(value, torch.tensor([loss]))
    assert bool(was_clipped[0]) == clipped
    value.sum().backward()
    expected_grad = 0.0 if clipped else -ratio * advantage
    torch.testing.assert_close(logp.grad, torch.tensor([expected_grad]))


def test_overlong_penalty_and_k3():
    penalty = overlong_penalty(torch.tensor([10, 24, 28, 32]), max_new_tokens=32, buffer=8)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    assert overlong_penalty(torch.tensor([32]), 32, 0).item() == 0.0
    logp = torch.tensor([-1.0, -2.0])
    torch.testing.assert_close(kl_k3(logp, logp), torch.zeros(2))
    assert (kl_k3(logp, torch.tensor([-1.5, -0.5])) > 0).all()


def rlvr(tmp_path, *overrides, name="run"):
    out = tmp_path / name
    # a random model is never right; the overlong penalty makes rewards differ by length, so groups
    # are informative and the whole update path runs
    code = main(["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), f"run.output_dir={out}", "grpo.overlong_buffer=24",
                 "sampling.max_new_tokens=32", *overrides])
    assert code == 0
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rlvr_end_to_end(tmp_path):
    out, rows = rlvr(tmp_path, "run.steps=3", "optim.lr=1e-2")
    assert all(r["rollout/count"] == 16 for r in rows)
    assert any(r["rollout/kept"] > 0 for r in rows)
    trained = [r for r in rows if r["rollout/kept"] > 0]
    assert all(r["optim/grad_norm"] > 0 for r in trained)
    # one update per batch of rollouts: the old log-probs are the current ones, every ratio is 1
    assert all(r["policy/ratio_mean"] == pytest.approx(1.0,
                                                       abs=1e-5) and r["policy/clipped_ratio"] == 0 for r in trained)
    weights = load_file(str(out / "checkpoints/step_000003/model.safetensors"))
    initial = build_tiny()[0].state_dict()
    assert not torch.equal(weights["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_rlvr_several_updates_and_kl(tmp_path):
    _, rows = rlvr(tmp_path, "run.steps=2", "grpo.updates_per_step=3", "grpo.kl_coef=0.1", "optim.lr=5e-2")
    trained = [r for r in rows if r["rollout/kept"] > 0]
    assert trained and all(r["policy/ratio_mean"] != pytest.approx(1.0, abs=1e-6) for r in trained)
    assert all(r["policy/kl"] >= 0 for r in trained)


def test_rlvr_refuses_one_sample_per_problem(tmp_path, capsys):
    assert main(["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), "sampling.n=1", f"run.output_dir={tmp_path / 'x'}"]) == 2
    assert "sampling.n" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [1, 250])
def test_token_budget_micro_batches_give_the_padded_result(tmp_path, monkeypatch, budget):
    """optim.micro_batch_tokens packs the kept rollouts back to back without padding, cut by a token budget
    (1: every sequence alone), the old and the KL reference's log-probabilities cut the same way as the
    training passes: the same gradients and metrics as padded micro-batches of 3, within float error."""
    import opsd.stages.rlvr
    from tests.stages.test_distill import assert_same_gradients, recording

    grads, packs = recording(monkeypatch, opsd.stages.rlvr, {"rlvr": opsd.stages.rlvr})
    common = ["run.steps=1", "optim.micro_batch_size=3", "grpo.kl_coef=0.1", "optim.max_grad_norm=1e9"]
    _, (padded,) = rlvr(tmp_path, *common, name="padded")
    padded_grads, padded_packs = grads[:], packs[:]
    grads.clear(), packs.clear()
    _, (flat,) = rlvr(tmp_path, *common, f"optim.micro_batch_tokens={budget}", name="flat")
    kept = padded["rollout/kept"]
    assert kept == flat["rollout/kept"] >= 4
    assert not any(f for _, f, _ in padded_packs) and all(f for _, f, _ in packs)
    sizes = [n for _, _, n in packs]  # old log-probs, the reference's, then the training pass: cut alike
    assert sizes[: len(sizes) // 3] * 3 == sizes and sum(sizes) == 3 * kept
    assert sizes[: len(sizes) // 3] == [1] * kept if budget == 1 else 1 < max(sizes) < kept
    assert_same_gradients(padded_grads, grads)
    for key in ("optim/grad_norm", "policy/ratio_mean", "policy/kl", "policy/clipped_ratio", "reward/mean"):
        assert padded[key] == pytest.approx(flat[key], rel=1e-5, abs=1e-7), key


def test_rlvr_renders_its_prompts_with_the_prompt_section(tmp_path):
    out, _ = rlvr(tmp_path, "run.steps=1", "prompt.system_prompt=Be exact.", "data.instruction=Answer last.",
                  "prompt.instruction_position=after")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")
                           and s["prompt"].endswith("\n\nAnswer last.<|im_end|>\n<|im_start|>assistant\n")
                           for s in samples)
