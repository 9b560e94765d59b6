"""Packing prompt ‖ response sequences for one forward pass, and reading the hidden states that
predict the response tokens. Teacher and student views of the same responses line up position for
position: that is how a teacher scores exactly the tokens the student sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Packed:
    """Sequences prompt ‖ response laid out for one forward pass, and where their response tokens sit.

    Padded layout: row b holds prompts[b] + responses[b], right-padded, with an attention mask.
    Flat (padding-free) layout: one row holding every sequence back to back, position ids restarting
    at 0 for each, no attention mask (transformers then keeps attention inside each sequence).
    Either way the hidden state at flat position `predict_index_N[n]` predicts `targets_N[n]`, the
    n-th response token of the batch in sequence order. Two `Packed` built from the same responses and
    different prompts have the same N and the same targets: that is the teacher/student alignment.
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor | None
    position_ids_B_L: torch.Tensor | None
    predict_index_N: torch.Tensor
    targets_N: torch.Tensor
    row_N: torch.Tensor  # which sequence each response token belongs to


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
         flat: bool = False) -> Packed:
    sequences = [p + r for p, r in zip(prompts, responses)]
    if flat:
        starts = [0]
        for sequence in sequences[:-1]:
            starts.append(starts[-1] + len(sequence))
        ids_B_L = torch.tensor([[t for s in sequences for t in s]], dtype=torch.long)
        positions_B_L = torch.cat([torch.arange(len(s)) for s in sequences])[None]
        mask_B_L = None
    else:
        width = max(len(s) for s in sequences)
        starts = [row * width for row in range(len(sequences))]
        ids_B_L = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask_B_L = torch.zeros_like(ids_B_L)
        for row, sequence in enumerate(sequences):
            ids_B_L[row, : len(sequence)] = torch.tensor(sequence)
            mask_B_L[row, : len(sequence)] = 1
        positions_B_L = None
    predict, targets, rows = [], [], []
    for row, (start, prompt, response) in enumerate(zip(starts, prompts, responses)):
        first = start + len(prompt) - 1  # the last prompt position predicts the first response token
        predict.append(torch.arange(first, first + len(response)))
        targets += response
        rows += [row] * len(response)
    to = lambda t: None if t is None else t.to(device)
    return Packed(to(ids_B_L), to(mask_B_L), to(positions_B_L), torch.cat(predict).to(device),
                  torch.tensor(targets, dtype=torch.long, device=device), torch.tensor(rows, dtype=torch.long,
                                                                                       device=device))


def response_hidden(backbone: nn.Module, packed: Packed) -> torch.Tensor:
    """The [N × H] final hidden states that predict the response tokens, padding-free."""
    hidden_B_L_H = backbone(packed.input_ids_B_L, packed.attention_mask_B_L, packed.position_ids_B_L)
    return hidden_B_L_H.reshape(-1, hidden_B_L_H.shape[-1]).index_select(0, packed.predict_index_N)


def micro_batch_bounds(lengths: list[int], size: int, tokens: int = 0) -> list[slice]:
    """Where a step's sequences (their positions, prompt + response, in order) are cut into micro-batches:
    `size` sequences each when `tokens` is 0, else runs of consecutive sequences holding at most `tokens`
    positions in all (`optim.micro_batch_tokens`), a longer sequence alone: never dropped, never split.
    The order is kept, so that each micro-batch's results line up with the rollouts without a permutation;
    in the flat layout sorting would only change how many micro-batches there are, not the padding (none)."""
    if tokens <= 0:
        return [slice(start, start + size) for start in range(0, len(lengths), size)]
    bounds, start, held = [], 0, 0
    for index, length in enumerate(lengths):
        if index > start and held + length > tokens:
            bounds.append(slice(start, index))
            start, held = index, 0
        held += length
    if start < len(lengths):
        bounds.append(slice(start, len(lengths)))
    return bounds


def per_sequence_mean(value_N: torch.Tensor, row_N: torch.Tensor, sequences: int) -> torch.Tensor:
    """[sequences] mean of a per-response-token quantity over each sequence's tokens (`Packed.row_N`);
    NaN for a sequence without response tokens."""
    sums_S = torch.zeros(sequences, dtype=torch.float64, device=value_N.device).index_add_(0, row_N, value_N.double())
    counts_S = torch.bincount(row_N, minlength=sequences).to(sums_S)
    return sums_S / counts_S
