"""Full-vocabulary divergence from final hidden states: ours (chunked, fused backward) vs naive
(full logits through plain autograd), forward and backward, float32 on CPU.

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss, minus the
resident size once the inputs exist) belongs to that computation alone; glibc is told to serve
blocks over 1 MiB from mmap, so memory freed during the computation leaves the resident set at once. Values and
gradients of the two implementations are compared in the same run.

    python benchmarks/divergence_memory.py                         # hidden 1024, vocab 151936
    python benchmarks/divergence_memory.py --positions 256 512 --vocab 32000 --hidden 256   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# noqa: E402  (imported before any memory is measured)
from opsd.objectives.divergence import DivergenceSpec, chunked_divergence


def inputs(n: int, hidden: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, hidden, generator=g) * 0.5
    head = torch.randn(vocab, hidden, generator=g) * 0.05
    ht = hs + 0.3 * torch.randn(n, hidden, generator=g)
    return hs.requires_grad_(), head.requires_grad_(), ht, head.detach().clone()


def naive(hs, head, ht, head_t, kind: str) -> torch.Tensor:
    logp_s = torch.log_softmax(hs @ head.T, -1)
    with torch.no_grad():
        logp_t = torch.log_softmax(ht @ head_t.T, -1)
    if kind == "reverse_kl":
        terms = logp_s.exp() * (logp_s - logp_t)
    elif kind == "forward_kl":
        terms = logp_t.exp() * (logp_t - logp_s)
    else:  # jsd, beta 0.5
        logp_m = torch.logaddexp(logp_s, logp_t) - torch.log(torch.tensor(2.0))
        terms = 0.5 * logp_t.exp() * (logp_t - logp_m) + 0.5 * logp_s.exp() * (logp_s - logp_m)
    return terms.sum() / hs.shape[0]


def ours(hs, head, ht, head_t, kind: str, chunk: int) -> torch.Tensor:
    weight = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
    targets = torch.zeros(hs.shape[0], dtype=torch.long)
    return chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(chunk_size=chunk, kind=kind,
                                                                                         beta=0.5)).loss


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def child(args) -> None:
    torch.set_num_threads(args.threads)
    hs, head, ht, head_t = inputs(args.n, args.hidden, args.vocab)
    base = rss_bytes()
    start = time.perf_counter()
    loss = ours(hs, head, ht, head_t, args.kind, args.chunk) if args.impl == "ours" else naive(hs, head, ht, head_t,
                                                                                               args.kind)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = torch.arange(0, args.vocab, max(1, args.vocab // 2048))
    torch.save({"loss": loss.detach(), "grad_h": hs.grad, "grad_w_rows": head.grad[rows]}, args.save)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak - base}))


def measure(impl: str, kind: str, n: int, args) -> dict:
    save = Path(tempfile.mkdtemp()) / "out.pt"
    command = [sys.executable, __file__, "--child", "--impl", impl, "--kind", kind, "--n", str(n),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
               "--threads", str(args.threads), "--save", str(save)]
    # large blocks straight from mmap, so that freed memory leaves the resident set at once and the
    # peak measures the computation rather than the allocator's retention (the same for both sides)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode == -signal.SIGKILL and impl == "naive":  # the kernel's out-of-memory killer
        return None
    if result.returncode != 0:
        sys.exit(f"{impl} {kind} at {n} positions failed:\n{result.stderr[-2000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "tensors": torch.load(save)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--kinds", nargs="+", default=["reverse_kl", "forward_kl", "jsd"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--impl")
    parser.add_argument("--kind")
    parser.add_argument("--n", type=int)
    parser.add_argument("--save")
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f"hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk}, float32, CPU, {args.threads} threads")
    print(f"{'kind':<11} {'positions':>9} {'naive MiB':>10} {'ours MiB':>9} {'mem ratio':>9} "
          f"{'naive s':>8} {'ours s':>7} {'time ratio':>10} {'max |Δ|':>9}")
    results, killed = {}, []
    for kind in args.kinds:
        for n in sorted(args.positions):
            a, b = measure("naive", kind, n, args), measure("ours", kind, n, args)
            if a is None:
                killed.append(f"{kind}@{n}")
                print(f"{kind:<11} {n:>9} {'killed':>10} {b['peak_bytes'] / 2**20:>9.0f} {'-':>9} "
                      f"{'-':>8} {b['seconds']:>7.2f}   (naive ran out of memory)", flush=True)
                continue
            diff = max(float((a["tensors"][k] - b["tensors"][k]).abs().max()) for k in a["tensors"])
            results[(kind, n)] = a, b, diff
            mem, tim = b["peak_bytes"] / a["peak_bytes"], b["seconds"] / a["seconds"]
            print(f"{kind:<11} {n:>9} {a['peak_bytes'] / 2**20:>10.0f} {b['peak_bytes'] / 2**20:>9.0f} {mem:>9.3f} "
                  f"{a['seconds']:>8.2f} {b['seconds']:>7.2f} {tim:>10.2f} {diff:>9.1e}", flush=True)
    smallest, largest = min(args.positions), max(args.positions)
    at_largest = [(b["peak_bytes"] / a["peak_bytes"], b["seconds"] / a["seconds"])
                  for (kind, n), (a, b, _) in results.items() if n == largest]
    measured = [k for k in args.kinds if (k, smallest) in results and (k, largest) in results]
    growth = lambda impl: max(results[(k, largest)][impl]["peak_bytes"] / results[(k, smallest)][impl]["peak_bytes"]
                              for k in measured)
    print(f"peak memory from {smallest} to {largest} positions ({largest // smallest}x): "
          f"naive x{growth(0):.2f}, ours x{growth(1):.2f}")
    print("RESULT " + " ".join([
        f"positions={largest}",
        f"mem_ratio_max={max(m for m, _ in at_largest):.3f}",
        f"time_ratio_max={max(t for _, t in at_largest):.2f}",
        f"max_abs_diff={max(d for _, _, d in results.values()):.1e}",
        f"naive_mem_growth={growth(0):.2f}",
        f"ours_mem_growth={growth(1):.2f}",
        f"naive_out_of_memory={','.join(killed) or 'none'}",
    ]))

if __name__ == "__main__":
    main()
