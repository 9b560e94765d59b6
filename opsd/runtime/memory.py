"""How much memory a training process holds, by run.parallel and number of processes.

Full fine-tuning with AdamW keeps, per parameter, the float32 weights (4 bytes, the master copy),
their float32 gradients (4) and AdamW's two moments (8): 16 bytes. A self-teacher with a snapshot
(teacher.weights.policy frozen, refresh or ema) adds 4 more. DDP holds all of it in every process;
FSDP divides it by the number of processes N. FSDP's price: the work without autograd (generation,
the teacher's and the reference's forwards) runs with the whole weights gathered in the compute dtype
(2 bytes per parameter in bf16 on GPU), once per process, on top of its shards.

Activations are per micro-batch and the same for both: with gradient checkpointing, each layer's
input (tokens × hidden × 2 bytes in bf16) plus one layer's working set, plus what the chunked
divergence holds (the [chunk × vocabulary] float32 logits of student and teacher, and the float32
[vocabulary × hidden] gradient of the output head it accumulates).

    python -m opsd.runtime.memory            # docs/scale.md's table
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from opsd.runtime.distributed import local

GIB = 1024**3
LAYER_WORKING_BYTES = 34  # per token and hidden unit: one transformer layer's saved activations in
# bf16 with an attention kernel that stores no scores (Korthikanti et al. 2022, sbh·34), recomputed per layer


@dataclass(frozen=True)
class Shape:
    """A Qwen3-style decoder (its config.json): grouped-query attention with a norm on queries and keys."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # tie_word_embeddings

    @property
    def params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 2 * self.head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


QWEN3 = (Shape("Qwen3-0.6B", 1024, 3072, 28, 16, 8, 128, 151_936, True),
         Shape("Qwen3-1.7B", 2048, 6144, 28, 16, 8, 128, 151_936, True),
         Shape("Qwen3-8B", 4096, 12288, 36, 32, 8, 128, 151_936, False),
         Shape("Qwen3-14B", 5120, 17408, 40, 40, 8, 128, 151_936, False))


def state_bytes(params: int, processes: int, parallel: str, teacher_snapshot: bool = True,
                compute_bytes: int = 2) -> dict[str, float]:
    """Bytes one process holds between steps for full fine-tuning of `params` parameters with AdamW:
    weights, gradients, optimizer moments, the teacher's snapshot; and `gathered`, the whole weights
    in the compute dtype that FSDP all-gathers for generation and the teacher's forward."""
    shards = processes if parallel == "fsdp" else 1
    return {"weights": 4 * params / shards, "gradients": 4 * params / shards, "optimizer": 8 * params / shards,
            "teacher": (4 * params / shards) if teacher_snapshot else 0.0,
            "gathered": compute_bytes * params if parallel == "fsdp" and processes > 1 else 0.0}


def activation_bytes(shape: Shape, tokens: int, chunk_size: int = 256) -> float:
    """Bytes of one micro-batch of `tokens` tokens with gradient checkpointing and the chunked divergence."""
    checkpoints = shape.layers * tokens * shape.hidden * 2
    one_layer = tokens * shape.hidden * LAYER_WORKING_BYTES
    divergence = 2 * chunk_size * shape.vocab * 4 + shape.vocab * shape.hidden * 4
    return checkpoints + one_layer + divergence


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer,
                         snapshot: list[torch.Tensor] | None) -> dict[str, int]:
    """What this process really holds of the same (local shards under FSDP), after a step whose
    gradients are still in place: the check of `state_bytes` on a real run."""
    def held(tensor: torch.Tensor) -> int:
        shard = local(tensor)
        return shard.numel() * shard.element_size()

    params = [p for p in model.parameters() if p.requires_grad]
    moments = [value for state in optimizer.state.values() for key, value in state.items()
               if key in ("exp_avg", "exp_avg_sq")]
    return {"weights": sum(held(p) for p in params),
            "gradients": sum(held(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(held(m) for m in moments), "teacher": sum(held(s) for s in snapshot or [])}


def table(processes: tuple[int, ...] = (1, 2, 4, 8), tokens: int = 8192) -> str:
    """docs/scale.md's table: GiB per GPU for each Qwen3 size, DDP (the same on any number of GPUs, and
    what one GPU holds) and FSDP at 2/4/8 GPUs."""
    lines = [f"| model | params | {' | '.join('DDP (any K)' if n == 1 else f'FSDP {n}' for n in processes)} | "
             f"gathered (FSDP) | activations, {tokens // 1024}k tokens |",
             "|---|---|" + "---|" * (len(processes) + 2)]
    for shape in QWEN3:
        cells = []
        for n in processes:
            state = state_bytes(shape.params, n, "ddp" if n == 1 else "fsdp")
            cells.append(f"{sum(v for k, v in state.items() if k != 'gathered') / GIB:.1f}")
        gathered = state_bytes(shape.params, 2, "fsdp")["gathered"]
        lines.append(f"| {shape.name} | {shape.params / 1e9:.2f}B | {' | '.join(cells)} | "
                     f"{gathered / GIB:.1f} | {activation_bytes(shape, tokens) / GIB:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
