"""`opsd report`: the Pareto front and per-level compression by hand, and the folder it writes
(replaced when it is its own, refused when it is not). The report of the quick demo's folders is
checked in tests/demo/test_demo.py."""

import json
import re
import shutil
import subprocess

import pytest

from opsd.cli import main
from opsd.stages.report import (
    level_compression,
    markdown_table_html,
    pareto_front,
    write_report,
)


@pytest.mark.parametrize("points, front", [
    ([(180, 70), (30, 74), (100, 60)], [1]),  # the short accurate point beats both
    ([(180, 75), (30, 70), (100, 72)], [1, 2, 0]),  # a trade-off: every point is on the front
    ([(50, 60), (50, 60), (60, 50)], [0, 1]),  # equal points do not dominate each other
    ([(10, 10)], [0]),
])
def test_pareto_front_by_hand(points, front):
    assert pareto_front(points) == front


def row(stage, start, tokens_by_level):
    return {"stage": stage, "start": start, "benchmarks": [{"levels": [
        {"level": level, "response_tokens_mean": tokens} for level, tokens in tokens_by_level.items()]}]}


def test_compression_per_level_is_against_the_stage_started_from():
    rows = [row("sft", "", {"1": 100, "2": 200}), row("rlvr", "sft", {"1": 110, "2": 200}),
            row("opsd", "rlvr", {"1": 11, "2": 50})]
    assert level_compression(rows) == {"rlvr (vs sft)": [("1", pytest.approx(-0.1)), ("2", 0.0)],
                                       "opsd (vs rlvr)": [("1", pytest.approx(0.9)), ("2", 0.75)]}


def test_markdown_table_becomes_html():
    table = "| stage | acc |\n|---|---|\n| opsd | 74.4 <b> |\n\nAccuracy in %.\n"
    assert markdown_table_html(table) == ("<table><thead><tr><th>stage</th><th>acc</th></tr></thead><tbody><tr>"
                                          "<td>opsd</td><td>74.4 &lt;b&gt;</td></tr></tbody></table>")


def test_a_run_folder_gets_its_curves_and_a_foreign_report_folder_is_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/divergence": 1.0 / s,
                                                           "optim/grad_norm": 0.5})
                                               + "\n" for s in (1, 2, 3)) + '{"step": 4, "loss/di')  # cut by a crash
    assert main(["report", str(run)]) == 0
    page = run / "report" / "report.html"
    assert f"report: {page}" in capsys.readouterr().out and page.read_text().count("<img ") == 1
    assert main(["report", str(run)]) == 0  # its own report folder is replaced
    (run / "report" / "notes.txt").write_text("mine")
    assert main(["report", str(run)]) == 2
    assert "notes.txt" in capsys.readouterr().err and (run / "report" / "notes.txt").read_text() == "mine"
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "no pipeline summary" in capsys.readouterr().err


def synthetic_pipeline(folder):
    """A pipeline folder as `opsd pipeline` writes it: summary, stage metrics, evaluations' responses."""
    folder.mkdir()
    stages = [("sft", "", 180, 0.47), ("rlvr", "sft", 184, 0.70), ("opsd", "rlvr", 30, 0.74)]
    rows = []
    for stage, start, tokens, accuracy in stages:
        levels = [{"level": str(lv), "response_tokens_mean": tokens * lv / 2.5} for lv in (1, 2, 3, 4)]
        rows.append({"stage": stage, "start": start, "k": 4, "benchmarks": [
            {"name": "heldout", "mean_at_k": accuracy, "mean_at_k_stderr": 0.02, "maj_at_k": accuracy,
             "response_tokens_mean": tokens, "markers_per_1k_tokens": 5.0 if tokens > 100 else 0.0, "levels": levels}]})
        (folder / "eval" / stage).mkdir(parents=True)
        (folder / "eval" / stage / "responses.jsonl").write_text("".join(
            json.dumps({"id": "L1:1+1", "response": f"{stage} says 2",
                        "correct": j % 2 == 0}) + "\n" for j in range(4)))
        if start:
            (folder / stage).mkdir()
            (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(
                {"step": s, "rollout/accuracy": 0.5 + s / 100, "rollout/response_tokens_mean": tokens + s,
                 "optim/grad_norm": 1.0 / s}) + "\n" for s in range(1, 11)))
    (folder / "summary.json").write_text(json.dumps({"rows": rows}))
    (folder / "summary.md").write_text("| stage | mean@k |\n|---|---|\n" + "".join(
        f"| {s} | {100 * a:.1f} |\n" for s, _, _, a in stages))
    return folder


CHROME = shutil.which("chromium-headless-shell") or shutil.which("chromium") or shutil.which("chromium-browser")


def coloured_share(png) -> float:
    """Share of a screenshot's pixels that are clearly coloured (the plots; text and tables are grey)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).mean())


@pytest.mark.skipif(CHROME is None, reason="no headless Chromium (Debian: chromium-headless-shell)")
def test_the_page_opens_in_headless_chromium_and_shows_its_plots(tmp_path):
    page = write_report(synthetic_pipeline(tmp_path / "pipe"))
    assert page.read_text().count("<img ") == 4

    def open_page(path):
        shot = tmp_path / f"{path.stem}.png"
        done = subprocess.run([CHROME, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                               "--v=0", "--window-size=1400,3000", f"--screenshot={shot}", path.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return shot, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]

    shot, console = open_page(page)
    assert console == []
    assert coloured_share(shot) > 0.01
    # the same page without its images: the check above would have failed
    blank = tmp_path / "noimages.html"
    blank.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    assert coloured_share(open_page(blank)[0]) < 0.002


def test_a_demo_over_seeds_gets_its_across_seed_figure_and_each_seeds_pages(tmp_path):
    from opsd.demo.demo import across_seeds, across_seeds_table

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "seed_old").mkdir()  # not a seed folder of the demo's: ignored
    (demo / "seed_old" / "summary.json").write_text("{not json")
    runs = []
    for seed in (1, 2):
        rows = json.loads((synthetic_pipeline(demo / f"seed_{seed}") / "summary.json").read_text())["rows"]
        for row in rows:
            row["benchmarks"][0] |= {"mean_at_k": row["benchmarks"][0]["mean_at_k"] + seed / 100, "compression": None}
        (demo / f"seed_{seed}" / "summary.json").write_text(json.dumps({"rows": rows}))
        runs.append(rows)
    across = across_seeds(runs)
    (demo / "summary.json").write_text(json.dumps({"seeds": [1, 2], "rows": across}))
    (demo / "summary.md").write_text(across_seeds_table(across, (1, 2)))
    page = write_report(demo).read_text()
    assert "Across seeds 1, 2" in page and "<h2>seed_1</h2>" in page and "<h2>seed_2</h2>" in page
    assert page.count("<img ") == 1 + 2 * 4
    from opsd.stages.report import across_seed_rows

    opsd = across_seed_rows(across)[2]["benchmarks"][0]
    assert opsd["mean_at_k"] == pytest.approx(0.755) and opsd["mean_at_k_stderr"] == pytest.approx(0.005)
