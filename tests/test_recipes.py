"""The recipes (configs/recipes/): each paper's run at its real scale passes the run-time checks of `--check`
on 8 GPUs of 80 GB — config, data, lengths against Qwen3's 40,960-token context, the engine options and the
memory plan — with weightless stand-ins of the recipe's models (Qwen3's real config.json shapes, a local
tokenizer), on the machine the recipes are written for: vLLM installed, a GPU, torchrun's 8 processes.

Each recipe names its paper in its header and holds only real keys (the config loader refuses any other);
the same checks refuse a recipe changed back to what does not fit, so they can fail."""

import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.config import load_config
from opsd.core.errors import UserError
from opsd.core.tiny import char_tokenizer
from opsd.runtime.plan import qwen3_config
from opsd.stages import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
SHARED_DATA = ROOT.parent / "shared" / "data"
EIGHT_GPUS = ["--gpus", "8", "--gpu-gib", "80"]

# recipe → (command, the student's shape, the external teacher's shape or None, the words its header must hold)
RECIPE = {
    "opsdc_qwen3_8b": ("distill", "Qwen3-8B", None, ("OPSDC", "Sang et al.")),
    "opsdc_qwen3_14b": ("distill", "Qwen3-14B", None, ("OPSDC", "Sang et al.")),
    "kim_lee_qwen3_8b": ("distill", "Qwen3-8B", None, ("OPSD compresses what RLVR teaches", "Kim & Lee")),
    "purified_opsd_qwen3_8b": ("distill", "Qwen3-8B", None, ("Purified OPSD", "Shen et al.")),
    "big_to_small_qwen3_1p7b": ("distill", "Qwen3-1.7B", "Qwen3-8B", ("METHODS.md §5", "Thinking Machines")),
    "eval_math": ("eval", "Qwen3-8B", None, ("OPSDC", "Kim & Lee", "MATH-500", "AIME")),
}
TRAINING = [name for name, (command, *_) in RECIPE.items() if command != "eval"]


def test_the_table_names_every_recipe():
    assert sorted(path.stem for path in RECIPES.glob("*.yaml")) == sorted(RECIPE)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Qwen3-1.7B/8B/14B without weights: their config.json and a tokenizer with a chat template."""
    folders = {}
    for name in ("Qwen3-1.7B", "Qwen3-8B", "Qwen3-14B"):
        folder = tmp_path_factory.mktemp(name)
        qwen3_config(name).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory) -> Path:
    """Training rows at the long end of real ones (one token a character with the stand-in's tokenizer): a
    1,000-token problem and a 4,000-token reference solution, so the teacher's views are planned long."""
    path = tmp_path_factory.mktemp("data") / "long.jsonl"
    row = {"id": "long_0", "problem": ("Compute 26 + 28. " * 60)[:1000], "solution": ("26 + 28 = 54. " * 300)[:4000],
           "answer": "54"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "long_1"}) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def target_machine(monkeypatch):
    """The recipes' paths are relative to the repository. `--gpus 8 --gpu-gib 80` makes the checks those of
    that machine (a GPU, vLLM, 8 processes), whatever this one has (a login node's case)."""
    monkeypatch.chdir(ROOT)


def recipe_args(name: str, stand_ins: dict[str, Path], data: Path) -> list[str]:
    command, student, teacher, _ = RECIPE[name]
    args = [command, str(RECIPES / f"{name}.yaml"), f"model.name_or_path={stand_ins[student]}"]
    if teacher is not None:
        args.append(f"teacher.model.name_or_path={stand_ins[teacher]}")
    return [*args, f"data.path={data}"]


@pytest.mark.parametrize("name,extra", [*[(name, []) for name in TRAINING],
                                        ("kim_lee_qwen3_8b", ["gating=incorrect_only"])])
def test_each_training_recipe_passes_its_checks_on_8_gpus_of_80_gb(name, extra, stand_ins, long_rows,
                                                                   target_machine, capsys):
    assert main([*recipe_args(name, stand_ins, long_rows), *extra, "--plan", *EIGHT_GPUS]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| GiB per process (8 processes) |" in out and "every check that needs no weights passed" in out


@pytest.mark.parametrize("name,change", [
    ("opsdc_qwen3_8b", "run.parallel=ddp"),  # the whole float32 model, gradients and AdamW on every GPU
    ("kim_lee_qwen3_8b", "run.parallel=ddp"),
    ("big_to_small_qwen3_1p7b", "sampling.gpu_memory_utilization=0.75"),  # vLLM held beside the 8B teacher
    ("opsdc_qwen3_14b", "sampling.sleep_mode=false"),  # vLLM held through the teacher's gathered forward
])
def test_the_same_checks_refuse_a_recipe_that_does_not_fit(name, change, stand_ins, long_rows, target_machine,
                                                           capsys):
    assert main([*recipe_args(name, stand_ins, long_rows), change, "--check", *EIGHT_GPUS]) == 2
    assert "the memory plan does not fit" in capsys.readouterr().err


def test_a_recipe_longer_than_qwen3s_context_is_refused(stand_ins, long_rows, target_machine, capsys):
    args = recipe_args("opsdc_qwen3_8b", stand_ins, long_rows)
    assert main([*args, "sampling.max_new_tokens=40000", "--check", *EIGHT_GPUS]) == 2
    assert "40960" in capsys.readouterr().err.replace(",", "")


def shared_benchmarks() -> list[Path]:
    paths = [SHARED_DATA / name for name in ("math500_test.jsonl", "aime24.jsonl", "aime25.jsonl")]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"the shared benchmark files are not in {SHARED_DATA}")
    return paths


@pytest.mark.parametrize("student", ["Qwen3-8B", "Qwen3-14B"])
def test_the_eval_recipe_passes_its_checks_on_the_shared_benchmarks(student, stand_ins, target_machine, capsys):
    shared_benchmarks()
    args = ["eval", str(RECIPES / "eval_math.yaml"), f"model.name_or_path={stand_ins[student]}"]
    assert main([*args, "--check", *EIGHT_GPUS]) == 0, capsys.readouterr().err
    # the same check refuses an engine too short for the longest prompt plus the 30k budget
    assert main([*args, "sampling.max_model_len=30000", "--check", *EIGHT_GPUS]) == 2
    assert "sampling.max_model_len=30000" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_each_recipe_names_its_paper_and_holds_only_real_keys(name):
    text = (RECIPES / f"{name}.yaml").read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    command, *_, words = RECIPE[name]
    assert all(word in header for word in words)
    assert "METHODS.md" in header and f"opsd.cli {command} configs/recipes/{name}.yaml" in header
    config = load_config(COMMANDS[command]().config, RECIPES / f"{name}.yaml", [])  # unknown keys are refused
    assert config.sampling.engine == "vllm"
    if command != "eval":
        assert config.run.parallel == "fsdp"


def test_the_loader_refuses_a_recipe_with_a_key_that_does_not_exist(tmp_path):
    recipe = (RECIPES / "opsdc_qwen3_8b.yaml").read_text(encoding="utf-8")
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(recipe.replace("refresh_every:", "refresh_evry:"), encoding="utf-8")
    with pytest.raises(UserError, match="refresh_evry"):
        load_config(COMMANDS["distill"]().config, misspelt, [])
