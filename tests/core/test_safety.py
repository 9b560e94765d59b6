"""Nothing runs that the user did not choose to run: no remote code from model folders, no pickle
weights, no code in checkpoints' training state, YAML through the safe loader, templates with plain
named fields only. Each refusal is shown with a payload that would leave a marker file if it ran."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd.cli import main
from opsd.core.config import load_config
from opsd.core.errors import UserError
from opsd.core.tiny import save_tiny
from opsd.stages.distill import DistillConfig
from opsd.teacher.contexts import check_template

ROOT = Path(__file__).resolve().parents[2]
RUN = [str(ROOT / "configs/tiny.yaml"), "run.steps=1", "run.problems_per_step=2", "sampling.max_new_tokens=4",
       "run.report_to=[]"]


class Payload:
    """Unpickling this writes the marker file: proof that code from the data ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_remote_code_in_a_model_folder_is_not_run(tmp_path, capsys):
    folder = save_tiny(tmp_path / "custom")
    marker = tmp_path / "marker"
    (folder / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["distill", *RUN, f"model.name_or_path={folder}", f"run.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert f"from {folder}" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys):
    folder = save_tiny(tmp_path / "pickled")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    code = main(["distill", *RUN, f"model.name_or_path={folder}", f"run.output_dir={tmp_path / 'refused'}"])
    assert code == 2
    assert "could not load a model from" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    allowed = main(["distill", *RUN, f"model.name_or_path={folder}", "model.allow_pickle=true",
                    f"run.output_dir={tmp_path / 'allowed'}"])
    assert allowed == 0  # the same folder loads once the user says so


def test_a_crafted_training_state_cannot_run_code(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *RUN, f"run.output_dir={out}", "run.steps=2", "run.save_every=1"]) == 0
    marker = tmp_path / "marker"
    state = out / "checkpoints" / "step_000002" / "training_state.pt"
    state.write_bytes(pickle.dumps({"step": Payload(marker)}))
    capsys.readouterr()
    assert main(["distill", *RUN, f"run.output_dir={out}", "run.steps=3", "run.save_every=1"]) == 2
    assert "has an unreadable training_state.pt" in capsys.readouterr().err
    assert not marker.exists()


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:pathlib.Path.write_text [{str(marker)!r}, 'code ran']\n")
    with pytest.raises(UserError, match="evil.yaml"):
        load_config(DistillConfig, evil, [])
    assert not marker.exists()


@pytest.mark.parametrize("template", ["{problem.__class__}", "{problem[0]}", "{0}", "{}", "{problem!r}",
                                      "{problem:>999999999}", "{answer.__init__.__globals__}", "{solution"])
def test_templates_take_plain_named_fields_only(template):
    with pytest.raises(UserError, match="teacher.template"):
        check_template(template, "teacher.template")
    check_template("{problem}\n\nSolution: {solution} ({answer})", "teacher.template")
