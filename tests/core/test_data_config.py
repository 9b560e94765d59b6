"""Problem files (JSONL, Parquet, remapped fields, the shared benchmark files) and typed configs."""

import json
from pathlib import Path

import pytest

from opsd.core.config import load_config
from opsd.core.data import Fields, load_problems
from opsd.core.errors import UserError
from opsd.stages.distill import DistillConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_jsonl_with_remapped_fields_keeps_extras(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Q1", "final": 3, "level": 2}) + "\n\n" + json.dumps({"question": "Q2",
                                                                                                  "final": "x"}) + "\n")
    problems = load_problems(path, Fields(problem="question", answer="final"))
    assert [(p.problem, p.answer, p.solution) for p in problems] == [("Q1", "3", None), ("Q2", "x", None)]
    assert problems[0].extra == {"level": 2}
    assert problems[0].id == "1" and problems[1].id == "3"  # line numbers when there is no id


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["P1", "P2"], "answer": ["1", "2"], "solution": ["s",
                                                                                                           None]}),
                                                                                                           path)
    problems = load_problems(path)
    assert [(p.id, p.problem, p.answer, p.solution) for p in problems] == [("a", "P1", "1", "s"), ("b", "P2", "2",
                                                                                                   None)]
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="broken.parquet"):
        load_problems(tmp_path / "broken.parquet")


@pytest.mark.parametrize("name,rows", [("gsm8k_train.jsonl", 7473), ("gsm8k_test.jsonl", 1319), ("math500_test.jsonl",
                                                                                                 500),
                                       ("aime24.jsonl", 30), ("aime25.jsonl", 30)])
def test_shared_benchmark_files_load_as_they_are(name, rows):
    if not (SHARED / name).is_file():
        pytest.skip(f"{SHARED / name} not present")
    problems = load_problems(SHARED / name)
    assert len(problems) == rows
    assert all(p.problem and p.answer for p in problems)
    if name.startswith("math500"):
        assert all(p.solution and "level" in p.extra for p in problems)


def test_config_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  kind: jsd\n  beta: 0\noptim:\n  lr: 1.0e-5\n  betas: [0.9, 0.95]\n")
    config = load_config(DistillConfig, path, ["loss.clip_tau=0.05", "optim.lr=2e-6", "data.fields.problem=question",
                                               "loss.clip_tau=null", "teacher.weights.policy=ema"])
    assert config.loss.kind == "jsd" and config.loss.beta == 0.0 and isinstance(config.loss.beta, float)
    assert config.optim.lr == 2e-6 and config.optim.betas == (0.9, 0.95)
    assert config.loss.clip_tau is None and config.data.fields.problem == "question"
    assert config.teacher.weights.policy == "ema" and config.sampling.n == 1


@pytest.mark.parametrize("override,message", [
    ("optim.lr=fast", "optim.lr"), ("run.steps=1.5", "run.steps"), ("run.overwrite=yes please", "run.overwrite"),
    ("gating=some", "gating"), ("loss=3", "'loss' must be a mapping"), ("optim.betas=0.9", "optim.betas"),
    ("loss.kind.sub=1", "loss.kind"),
])
def test_config_type_errors_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config(DistillConfig, None, [override])
