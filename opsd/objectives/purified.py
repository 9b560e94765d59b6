"""Purified OPSD (Shen et al., 2026; METHODS.md §4): distil toward what the reference teaches about
*this problem*, not toward copying the reference.

Three frozen views at each response position: πT(·|q, r, y<t) (problem + reference), πR(·|r, y<t)
(reference only, no problem) and P0(·|q, y<t) (problem only). With Δ = log πT − log πR centred over the
vocabulary and softly clipped, Δ̃ = c·tanh(Δ̄/c), the target is

    P* = softmax(log P0 + Δ̃ / β)        (c = 10, β = 1 by default)

the maximiser of E_P[Δ̃] − β·KL(P‖P0). The student then minimises the generalised JSD to P*
(`loss.kind=jsd`). Everything works on one chunk of positions at a time (`PurifiedTarget` is the
teacher-logits function that `opsd.objectives.divergence.chunked_divergence_to` calls per chunk).

Diagnostics, per position: the cosine between the total gap log πT − log P0 and the
reference-induced gap log πR − log P0 (both centred), and the ratio of their norms ‖ref‖/‖total‖;
a cosine near 1 with a ratio near 1 says most of what the teacher adds comes from seeing the
reference, which is the paper's diagnosis.
"""

from __future__ import annotations

import torch


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def purified_target_logprobs(
    logp_teacher_C_V: torch.Tensor, logp_reference_C_V: torch.Tensor, logp_base_C_V: torch.Tensor,
    clip: float = 10.0, beta: float = 1.0,
) -> torch.Tensor:
    """log P* for each position (rows sum to one in probability)."""
    delta = _centre(logp_teacher_C_V - logp_reference_C_V)
    return torch.log_softmax(logp_base_C_V + clip * torch.tanh(delta / clip) / beta, dim=-1)


def gap_diagnostics(
    logp_teacher_C_V: torch.Tensor, logp_reference_C_V: torch.Tensor, logp_base_C_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, norm ratio) per position between the total and the reference-induced gap."""
    total = _centre(logp_teacher_C_V - logp_base_C_V)
    induced = _centre(logp_reference_C_V - logp_base_C_V)
    total_norm, induced_norm = total.norm(dim=-1), induced.norm(dim=-1)
    cosine = (total * induced).sum(-1) / (total_norm * induced_norm).clamp_min(1e-12)
    return cosine, induced_norm / total_norm.clamp_min(1e-12)


class PurifiedTarget:
    """Per chunk of positions: the three views' logits from their [N × H] hidden states → log P*.

    Called by the chunked divergence with a slice; the diagnostics of every chunk seen are kept."""

    def __init__(self, hidden_teacher_N_H: torch.Tensor, hidden_reference_N_H: torch.Tensor,
                 hidden_base_N_H: torch.Tensor, head_V_H: torch.Tensor, clip: float, beta: float):
        self.views = (hidden_teacher_N_H, hidden_reference_N_H, hidden_base_N_H)
        self.head, self.clip, self.beta = head_V_H, clip, beta
        self.cosines: list[torch.Tensor] = []
        self.norm_ratios: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, part: slice) -> torch.Tensor:
        logp_t, logp_r, logp_0 = (
            torch.log_softmax((h[part] @ self.head.T).float(), dim=-1) for h in self.views)
        cosine, ratio = gap_diagnostics(logp_t, logp_r, logp_0)
        self.cosines.append(cosine)
        self.norm_ratios.append(ratio)
        return purified_target_logprobs(logp_t, logp_r, logp_0, self.clip, self.beta)
