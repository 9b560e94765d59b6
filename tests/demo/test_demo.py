"""`opsd demo --quick`: every stage of the built-in pipeline runs and the summary has every field."""

import json

import pytest
import yaml

from opsd.cli import main
from opsd.demo import toyworld
from opsd.demo.demo import DEMO_BUDGETS, SHIPPED_SFT, SHIPPED_SMALL_SFT


@pytest.mark.parametrize("folder", [SHIPPED_SFT, SHIPPED_SMALL_SFT])
def test_shipped_sft_checkpoints_are_model_folders(folder):
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    info = json.loads((folder / "opsd_checkpoint.json").read_text())
    assert info["stage"] == "sft"
    assert (folder / "tokenizer.json").read_text() == (SHIPPED_SFT / "tokenizer.json").read_text()  # one tokenizer


def check_report(folder, stages, k):
    """The demo's report: every figure a PNG that is not blank, embedded in the page; the stage
    table and the before/after responses on it."""
    import matplotlib.image

    page = (folder / "report.html").read_text()
    pngs = sorted(folder.glob("*.png"))
    assert [p.name.split("-", 1)[1] for p in pngs] == ["accuracy-tokens.png", "accuracy-against-budget.png",
                                                       "training-curves.png", "compression-per-level.png",
                                                       "reflective-markers.png"]
    assert page.count("<img ") == len(pngs) and page.count("src='data:image/png;base64,") == len(pngs)
    for png in pngs:
        pixels = matplotlib.image.imread(png)
        assert pixels.std() > 0.05, png.name  # something is drawn on the white page
    assert all(f"<td>{stage}</td>" in page for stage in stages)
    assert "One problem before and after 'opsd'" in page and "One problem before and after 'small-opsd'" in page
    assert page.count("<pre class=") == 2 * 2 * min(k, 3)


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "pipeline" / "summary.json").read_text())
    assert [(r["stage"], r["start"]) for r in summary["rows"]] == [("sft", ""), ("small-sft", ""), ("rlvr", "sft"),
                                                                   ("opsd", "rlvr"), ("small-opsd", "small-sft")]
    params = {r["stage"]: r["benchmarks"][0]["parameters"] for r in summary["rows"]}
    assert params["small-opsd"] == params["small-sft"] and 3.5 < params["rlvr"] / params["small-opsd"] < 4.5
    # its teacher
    assert summary["checkpoints"]["rlvr"] in (out / "pipeline" / "small-opsd" / "config.yaml").read_text()
    for row in summary["rows"]:
        (bench,) = row["benchmarks"]
        assert bench["problems"] == 10 * len(toyworld.LEVELS)
        for key in ("mean_at_k", "mean_at_k_stderr", "maj_at_k", "response_tokens_mean", "correct_response_tokens_mean",
                    "compression", "truncation_rate", "markers_per_1k_tokens"):
            assert key in bench, key
        assert [level["level"] for level in bench["levels"]] == [str(level) for level in toyworld.LEVELS]
        assert [point["budget"] for point in bench["budgets"]] == list(DEMO_BUDGETS)  # accuracy at fixed budgets
        assert bench["budgets"][0]["cut_rate"] > bench["budgets"][-1]["cut_rate"]
    printed = capsys.readouterr().out
    assert "| opsd | rlvr | heldout |" in printed and "standard error" in printed
    assert "mean@k at 256 tokens" in printed
    assert f"report: {out / 'pipeline' / 'report' / 'report.html'}" in printed
    check_report(out / "pipeline" / "report", stages=["sft", "small-sft", "rlvr", "opsd", "small-opsd"],
                 k=summary["rows"][0]["k"])
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0  # a demo folder holding its report is replaced


def test_seed_reaches_the_rlvr_and_opsd_stages_only(tmp_path):
    from opsd.demo.demo import demo_config

    files = {name: tmp_path / f"{name}.jsonl" for name in ("heldout", "rlvr", "opsd")}
    config = demo_config(tmp_path, files, quick=False, ablation=True, from_scratch=False, seed=7)
    assert [s.name for s in config.stages] == ["rlvr", "opsd", "opsd-all", "opsd-incorrect-only", "ref-correct-only",
                                               "ref-incorrect-only", "ref-all", "ref-all-jsd", "purified", "small-opsd",
                                               "small-self"]
    assert all("run.seed=7" in stage.overrides for stage in config.stages)
    assert all(stage.start == "rlvr" for stage in config.stages[1:-2])  # every experiment from the same RLVR model
    # big → small
    assert [(s.start, s.teacher) for s in config.stages[-2:]] == [("small-sft", "rlvr"), ("small-sft", "")]
    assert config.eval.seed == 0 and config.model.name_or_path == str(SHIPPED_SFT)  # evaluation and start unchanged


def test_across_seeds_is_the_mean_and_standard_error_over_seeds():
    from opsd.demo.demo import across_seeds

    def run(accuracy, tokens, compression):
        bench = {"name": "heldout", "mean_at_k": accuracy, "mean_at_k_stderr": 0.02, "response_tokens_mean": tokens,
                 "compression": compression, "markers_per_1k_tokens": 5.0}
        return [{"stage": "opsd", "start": "rlvr", "benchmarks": [bench]}]

    (row,) = across_seeds([run(0.4, 100.0, 0.5), run(0.6, 50.0, 0.7), run(0.8, 30.0, None)])
    assert row["mean_at_k"]["mean"] == pytest.approx(0.6)
    assert row["mean_at_k"]["stderr"] == pytest.approx(0.2 / 3 ** 0.5)
    assert row["mean_at_k_per_seed"] == [0.4, 0.6, 0.8] and row["within_run_stderr"] == pytest.approx(0.02)
    assert row["response_tokens_mean"]["mean"] == pytest.approx(60.0)
    assert row["compression"] == {"mean": None, "stderr": None}  # a seed without it: not averaged


@pytest.mark.slow
def test_quick_demo_over_seeds_reports_the_spread_across_them(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "1,2", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    assert [row["stage"] for row in summary["rows"]] == ["sft", "small-sft", "rlvr", "opsd", "small-opsd"]
    per_seed = {seed: json.loads((out / f"seed_{seed}" / "summary.json").read_text())["rows"] for seed in (1, 2)}
    for index, row in enumerate(summary["rows"]):
        values = [per_seed[seed][index]["benchmarks"][0]["mean_at_k"] for seed in (1, 2)]
        assert row["mean_at_k_per_seed"] == values
        assert abs(row["mean_at_k"]["mean"] - sum(values) / 2) < 1e-12
        assert abs(row["mean_at_k"]["stderr"] - abs(values[0] - values[1]) / 2) < 1e-12  # s.d./√2 for two
    assert yaml.safe_load((out / "seed_2" / "rlvr" / "config.yaml").read_text())["run"]["seed"] == 2
    assert "across seeds" in capsys.readouterr().out


def test_ablation_rows_are_the_papers_experiments(tmp_path):
    """Each ablation stage resolves to the distill config its name promises (a row mislabelled here
    would put a wrong claim in the README's table)."""
    from opsd.core.config import load_config
    from opsd.demo.demo import REFERENCE_LR, demo_config
    from opsd.stages.distill import DistillConfig

    files = {name: tmp_path / f"{name}.jsonl" for name in ("heldout", "rlvr", "opsd")}
    stages = {s.name: s for s in demo_config(tmp_path, files, quick=False, ablation=True, from_scratch=False).stages}
    resolved = {name: load_config(DistillConfig, s.config, list(s.overrides))
                for name, s in stages.items() if name != "rlvr"}
    demo_lr = resolved["opsd"].optim.lr
    expect = {  # name: (teacher context, gating, divergence, learning rate)
        "opsd": ("concise", "correct_only", "forward_kl", demo_lr),
        "opsd-all": ("concise", "all", "forward_kl", demo_lr),
        "opsd-incorrect-only": ("concise", "incorrect_only", "forward_kl", demo_lr),
        "ref-correct-only": ("reference", "correct_only", "forward_kl", REFERENCE_LR),
        "ref-incorrect-only": ("reference", "incorrect_only", "forward_kl", REFERENCE_LR),
        "ref-all": ("reference", "all", "forward_kl", REFERENCE_LR),
        "ref-all-jsd": ("reference", "all", "jsd", demo_lr),
        "purified": ("purified", "all", "jsd", demo_lr),
        "small-opsd": ("concise", "correct_only", "forward_kl", demo_lr),  # the RLVR model as its external teacher
        "small-self": ("concise", "correct_only", "forward_kl", demo_lr),  # the small student as its own teacher
    }
    got = {name: (c.teacher.context, c.gating, c.loss.kind, c.optim.lr) for name, c in resolved.items()}
    assert got == expect
    assert REFERENCE_LR < demo_lr
    assert resolved["purified"].loss.beta == resolved["ref-all-jsd"].loss.beta == 0.5
    assert all(c.teacher.weights.policy == "frozen" and c.run.steps == 30 for c in resolved.values())
