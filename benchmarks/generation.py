"""Generation throughput of the two engines side by side: tokens/s of `hf` (our KV-cache sampler) and
`vllm` (vLLM's engine in this process) on the same model, prompts and response lengths, and their ratio.

The model has random weights (so responses rarely stop early) in one of two shapes: `demo`, the demo's
0.8M-parameter Llama, or `qwen3-1.7b`, Qwen3-1.7B's shape (a GPU's figure: 4k tokens there is the one
docs/PERFORMANCE.md asks for), and no stop token: every response is sampled at temperature 1 to its
full length (tokens/s counts the tokens returned, checked to be prompts × length). Each engine first decodes a short
warm-up batch. Without vLLM installed the vllm column says so and the ratio is not measured.

    python benchmarks/generation.py                                  # demo shape, 512 / 2048 / 8192 tokens
    python benchmarks/generation.py --lengths 128 --prompts 4        # quick
    python benchmarks/generation.py --shape qwen3-1.7b --device cuda --lengths 4096 --prompts 64   # GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opsd.core.tiny import char_tokenizer  # noqa: E402
from opsd.generation import SamplingConfig, make_engine  # noqa: E402

SHAPES = {
    "demo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, model_type="llama"),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, model_type="qwen3"),
}


def build(shape: str, context: int, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = stopless_tokenizer()
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tokenizer) if shape == "demo" else 151936,
                                  max_position_embeddings=context, tie_word_embeddings=True, pad_token_id=0,
                                  eos_token_id=None, bos_token_id=None, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    return model, tokenizer


def stopless_tokenizer():
    """opsd's character tokenizer without an end-of-sequence token: every response runs to its full length."""
    tokenizer = char_tokenizer()
    tokenizer.eos_token = None
    return tokenizer


def random_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, vocab, (count, length), generator=g).tolist()


def tokens_per_s(engine, batch: list[list[int]], tokens: int, batch_size: int) -> tuple[float, int]:
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=tokens, batch_size=batch_size)
    engine.generate(batch[:2], SamplingConfig(temperature=1.0, max_new_tokens=8, batch_size=batch_size), [0, 1])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    generations = engine.generate(batch, sampling, list(range(len(batch))))
    seconds = time.perf_counter() - started
    produced = sum(len(g.response_ids) for g in generations)
    if produced != len(batch) * tokens:
        raise RuntimeError(f"{produced} tokens returned, not {len(batch)} × {tokens}: a response stopped early")
    return produced / seconds, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="response tokens")
    parser.add_argument("--prompts", type=int, default=16, help="requests decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    context = max(args.lengths) + args.prompt_tokens + 16
    model, tokenizer = build(args.shape, context, device, dtype)
    batch = random_prompts(args.prompts, args.prompt_tokens, model.config.vocab_size)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {args.shape} shape, {parameters / 1e6:.2f}M parameters, random weights, {dtype}, {device}; "
          f"{args.prompts} prompts of {args.prompt_tokens} tokens; {args.threads} CPU thread(s)")
    has_vllm = importlib.util.find_spec("vllm") is not None
    engines = {"hf": make_engine(model, tokenizer, SamplingConfig())}
    if has_vllm:
        engines["vllm"] = make_engine(model, tokenizer, SamplingConfig(engine="vllm", batch_size=args.prompts,
                                                                       max_model_len=context))
    print("| response tokens | hf tokens/s | vllm tokens/s | vllm / hf |\n|---|---|---|---|")
    ratios = {}
    for length in args.lengths:
        hf, _ = tokens_per_s(engines["hf"], batch, length, args.prompts)
        vllm = tokens_per_s(engines["vllm"], batch, length, args.prompts)[0] if has_vllm else None
        ratios[length] = vllm / hf if vllm else None
        shown = f"{vllm:,.0f}" if vllm else "not installed"
        ratio = f"{ratios[length]:.2f}×" if vllm else "not measured"
        print(f"| {length} | {hf:,.0f} | {shown} | {ratio} |", flush=True)
    for engine in engines.values():
        engine.close()
    fields = " ".join(f"ratio_{length}={'not_measured' if r is None else f'{r:.3f}'}" for length, r in ratios.items())
    print(f"RESULT device={device.type} shape={args.shape} vllm={'yes' if has_vllm else 'no'} {fields}")


if __name__ == "__main__":
    main()
