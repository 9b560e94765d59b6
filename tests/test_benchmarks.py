"""The benchmark scripts run end to end at small sizes and agree with the naive code they compare to; the GPU
suite runs every part at toy sizes on the CPU, kills a part at its time limit and records a part's exception."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def result_line(output: str) -> dict[str, str]:
    line = [row for row in output.splitlines() if row.startswith("RESULT ")][-1]
    return dict(item.split("=", 1) for item in line.split()[1:])


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_divergence_benchmark_matches_naive_and_stays_flat():
    out = run("divergence_memory.py", "--positions", "64", "256", "--hidden", "32", "--vocab", "5000",
              "--chunk", "32", "--threads", "1")
    result = result_line(out)
    assert float(result["max_abs_diff"]) < 1e-5
    assert float(result["naive_mem_growth"]) > 1.5  # naive grows with positions (4x here) ...
    assert float(result["ours_mem_growth"]) < float(result["naive_mem_growth"])  # ... ours less
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert kind in out


def test_gpu_benchmark_runs_on_cpu_and_marks_gpu_figures_unmeasured():
    result = result_line(run("gpu_step.py", "--threads", "1"))
    assert result["device"] == "CPU"
    assert result["mfu"] == result["peak_gib_ours"] == result["generate_tokens_per_s"] == "not_measured"
    assert float(result["cpu_small_generate_tokens_per_s"]) > 0


SUITE_PARTS = ("step", "divergence", "generation", "lora", "load")


def run_suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """benchmarks/gpu_suite.py --cpu-smoke from outside the repository, with the packages the GPU machine
    lacks made unimportable; its exit, its JSON and its markdown table."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for module in ("math_verify", "hypothesis", "vllm"):
        (blocked / f"{module}.py").write_text(f"raise ImportError('no {module} on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--cpu-smoke",
                           *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    return done, json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_gpu_suite_runs_every_part_at_toy_sizes_on_cpu(tmp_path):
    done, suite, table = run_suite(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert suite["mode"] == "cpu-smoke"
    assert {name: part["status"] for name, part in suite["parts"].items()} == dict.fromkeys(SUITE_PARTS, "ok"), \
        {name: part.get("error") for name, part in suite["parts"].items()}
    step, divergence, generation, lora, load = (suite["parts"][name]["results"] for name in SUITE_PARTS)
    assert step["matmul_bf16_tflops"] > 0 and 0 < step["mfu_vs_measured_matmul"]
    assert step["teacher_s"] > 0 and step["student_s"] > 0 and step["divergence_s"] > 0
    assert step["peak_gib_ours"] is None  # no GPU memory on the CPU: null, never a made-up figure
    for label in ("ours_fp32", "ours_bf16", "naive_bf16"):
        for what in ("loss", "grad_hidden", "grad_head"):
            assert divergence[f"{label}_{what}_rel_err"] < (1e-5 if label == "ours_fp32" else 0.1), (label, what)
    assert generation["hf_tokens_per_s_at_16"] > 0 and generation["long_new_tokens"] == 16
    assert generation["vllm_tokens_per_s"].startswith("not measured: vllm not importable")
    assert lora["steps_done"] == lora["resumed_steps_done"] == lora["steps"] == 4
    assert lora["divergence_all_finite"] and lora["grad_norm_all_finite"] and lora["skipped_steps"] == 0
    assert lora["trained_weight_change_max"] > 0
    assert lora["resume_adapters_max_abs_diff"] == 0.0  # one CPU thread: the resumed run is the same run
    assert lora["math_verify_imported"] is False
    assert load["weights_equal_file"] and load["whole_float32_gib"] > load["largest_tensor_gib"] > 0
    assert load["peak_gib"] is None  # measured on a GPU only
    for name in SUITE_PARTS:
        assert f"| {name} | ok" in table


def test_gpu_suite_part_past_its_time_limit_is_killed_and_reported(tmp_path):
    done, suite, table = run_suite(tmp_path, "--only", "divergence", "--time-limit", "divergence=1")
    assert done.returncode == 0, done.stderr[-2000:]
    part = suite["parts"]["divergence"]
    assert part["status"] == "timed_out" and "time limit of 1 s" in part["error"]
    assert part["seconds"] < 30
    assert suite["parts"]["step"]["status"] == "not run"
    assert "timed_out" in table


def test_gpu_suite_part_that_raises_records_its_traceback(tmp_path, monkeypatch):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)

    def broken(sizes, record, device, deadline):
        record["before_the_error"] = 1.5
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(suite.PART_FUNCTIONS, "step", broken)
    threads = torch.get_num_threads()
    try:
        assert suite.run_part("step", True, tmp_path / "step.json", time.time() + 60, threads) == 1
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "step.json").read_text())
    assert "RuntimeError: CUDA error: an illegal memory access" in record["error"]
    assert record["results"] == {"before_the_error": 1.5} and record["environment"]["torch"] == torch.__version__


def test_generation_benchmark_prints_both_engines_or_says_vllm_is_missing():
    import importlib.util

    out = run("generation.py", "--lengths", "16", "--prompts", "2", "--prompt-tokens", "8")
    result = result_line(out)
    assert result["device"] == "cpu" and "| 16 |" in out
    if importlib.util.find_spec("vllm") is None:
        assert result["vllm"] == "no" and result["ratio_16"] == "not_measured" and "not installed" in out
    else:
        assert result["vllm"] == "yes" and float(result["ratio_16"]) > 0


def test_micro_batch_tokens_benchmark_computes_the_padded_step_with_fewer_tokens():
    result = result_line(run("micro_batch_tokens.py", "--quick"))
    assert float(result["max_grad_rel_diff"]) < 1e-5  # the same gradients, padded or packed by a token budget
    for case in ("demo_rlvr", "demo_opsd", "qwen3_layer", "qwen3_full"):
        assert 0 < float(result[f"{case}_tokens_ratio"]) < 1 and 0 < float(result[f"{case}_gflops_dense_ratio"]) < 1
    for case in ("demo_rlvr", "demo_opsd", "qwen3_layer"):
        assert 0 < float(result[f"{case}_saved_mib_ratio"]) < 1 and float(result[f"{case}_seconds_ratio"]) > 0
