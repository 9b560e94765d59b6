"""GRPO/DAPO pieces as pure functions (METHODS.md §3, the RLVR stage; DAPO: Yu et al., 2025).

Shapes: P prompts, G samples per prompt, N response tokens of the batch.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_P_G: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's std (unbiased=False)."""
    centred_P_G = rewards_P_G - rewards_P_G.mean(-1, keepdim=True)
    if not scale_by_std:
        return centred_P_G
    return centred_P_G / (rewards_P_G.std(-1, unbiased=False, keepdim=True) + eps)


def informative_groups(rewards_P_G: torch.Tensor) -> torch.Tensor:
    """[P] True for groups whose rewards are not all equal (DAPO drops the others: zero advantage)."""
    return (rewards_P_G != rewards_P_G[:, :1]).any(-1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max − buffer tokens, then falling linearly to −1 at max."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -(over / buffer).clamp(max=1.0)


def clipped_policy_loss(
    logp_N: torch.Tensor, old_logp_N: torch.Tensor, advantage_N: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO objective with DAPO's decoupled clip: −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A).

    Returns (loss_N, clipped_N) where clipped_N marks tokens whose clipped term was the active one."""
    ratio_N = torch.exp(logp_N - old_logp_N)
    unclipped_N = ratio_N * advantage_N
    clipped_N = ratio_N.clamp(1.0 - eps_low, 1.0 + eps_high) * advantage_N
    return -torch.minimum(unclipped_N, clipped_N), (clipped_N < unclipped_N).detach()


def kl_k3(logp_N: torch.Tensor, reference_logp_N: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per sampled token: exp(Δ) − Δ − 1 with Δ = log π_ref − log π."""
    delta_N = reference_logp_N - logp_N
    return torch.exp(delta_N) - delta_N - 1.0
