"""Memory one process holds: measured on a real step against opsd/runtime/memory.py's `state_bytes`, for
run.parallel ddp (one process) and fsdp (N processes under torchrun, CPU/gloo).

A tiny Llama (hidden 256, 4 layers, tied embeddings) takes one distillation-shaped step: forward,
backward, AdamW step, and a second backward so the gradients are in place; with an EMA teacher's
snapshot. Each process then counts the bytes of its own tensors (its shards under FSDP): weights,
gradients, AdamW's moments, the snapshot, and (FSDP) the whole weights while gathered. Rank 0 prints them next to the
prediction, as a ratio.

    python benchmarks/fsdp_memory.py                                           # one process
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py         # FSDP on 2
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opsd.core.models import Backbone, output_head  # noqa: E402
from opsd.core.tiny import build_tiny  # noqa: E402
from opsd.runtime import distributed  # noqa: E402
from opsd.runtime.memory import measured_state_bytes, state_bytes  # noqa: E402
from opsd.teacher.weights import TeacherWeightsConfig, TeacherWeightsState  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    rank = distributed.setup(device)
    world = distributed.world_size()
    parallel = "fsdp" if world > 1 else "ddp"
    model, _ = build_tiny(hidden_size=256, num_layers=4, seed=0)
    params = sum(p.numel() for p in model.parameters())
    backbone = distributed.wrap(Backbone(model), device, parallel)
    teacher = TeacherWeightsState(model, TeacherWeightsConfig("ema"), uses_lora=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):  # the second backward leaves gradients in place, as during a step
        hidden = backbone(ids, torch.ones_like(ids))
        (hidden @ output_head(model).T).logsumexp(-1).mean().backward()
        if not optimizer.state:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    measured = measured_state_bytes(model, optimizer, teacher.snapshot)
    with distributed.gathered(backbone):  # FSDP: the whole weights, for generation and the teacher's forward
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
    measured["gathered"] = whole if parallel == "fsdp" else 0
    most = {key: distributed.max_over_ranks(value) for key, value in measured.items()}  # the fullest process
    predicted = state_bytes(params, world, parallel, compute_bytes=4)  # float32 compute on CPU
    if rank == 0:
        print(f"{params:,} parameters, {world} process(es), run.parallel={parallel}")
        print("| part | measured bytes (fullest process) | predicted | measured / predicted |")
        print("|---|---|---|---|")
        for key, value in most.items():
            ratio = f"{value / predicted[key]:.4f}" if predicted[key] else ("1.0000" if value == 0 else "inf")
            print(f"| {key} | {value:,} | {predicted[key]:,.0f} | {ratio} |")
        exact = all(value == predicted[key] for key, value in most.items())
        print(f"RESULT processes={world} parallel={parallel} params={params} measured_equals_predicted={exact}")
    del backbone
    distributed.teardown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    code = main()
    sys.stdout.flush()
    os._exit(code)  # past the teardown: gloo's threads were seen to abort the interpreter's own exit on a busy CPU
