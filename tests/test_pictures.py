"""Pictures of what a selection kept: report.html and PNGs beside the manifest, checked as a person would see them
(a headless Chromium screenshot, where Chromium is installed) and as a parsed page everywhere."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from slimtune.bench.pictures import online_rows, selection_rows, write_kept_report
from slimtune.cli import app
from slimtune.data.example import make_example
from slimtune.select.base import Cost, Selection


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page, " ".join(page.text)


def _pool():
    tasks = ["gsm8k"] * 6 + ["p3"] * 4
    return [make_example([{"role": "user", "content": "q" * (10 + 5 * i)}, {"role": "assistant", "content": "a"}],
                         id=f"r{i}", task=task) for i, task in enumerate(tasks)]


def test_a_selection_report_shows_the_cut_the_tasks_and_the_cost(tmp_path):
    pool = _pool()
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, np.nan], dtype=float)
    selection = Selection(method="loss", params={"budget": "3"}, pool_ids=[ex.id for ex in pool], scores=scores,
                          kept=[0, 1, 2], pool_hash="h", cost=Cost(seconds=1.5, forward_tokens=1234))
    path = write_kept_report(tmp_path, selection_rows(selection, pool))
    page, text = _parse(path)
    assert {img["alt"] for img in page.images} == {"scores, kept and passed over, with the cut",
                                                   "kept share per task", "lengths offered and kept"}
    assert all(img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 2000 for img in page.images)
    for name in ("scores.png", "tasks.png", "lengths.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the facts a reader needs, as numbers: kept 3 of 10, one unscored row, the cost
    assert "1,234" in text and "unscored rows" in text and "0.3" in text


def test_an_online_report_counts_each_steps_kept_share_from_the_selection_log(tmp_path):
    pool = _pool()
    records = [{"step": 0, "phase": "warmup", "ids": ["r0", "r1"], "chosen_ids": ["r0", "r1"]},
               {"step": 1, "phase": "select", "ids": ["r0", "r1", "r6", "r7"], "chosen_ids": ["r6"],
                "loss": [1.0, 2.0, 3.0, 4.0], "scores": [0.1, 0.2, 0.9, 0.3]},
               {"step": 2, "phase": "select", "ids": ["r2", "r3", "r8", "r9"], "chosen_ids": ["r2", "r9"],
                "loss": [1.0, 2.0, 3.0, 4.0], "scores": None}]
    rows = online_rows(records, pool, {"policy": "uds", "scoring_seconds": 2.0})
    assert rows.kept.tolist() == [False, False, True, False, True, False, False, True]
    assert rows.tasks[2] == "p3" and rows.steps[1].tolist() == [0.25, 0.5]
    path = write_kept_report(tmp_path, rows)
    assert (tmp_path / "steps.png").exists() and "kept share per step" in _parse(path)[1]


def test_slimtune_select_writes_the_pictures_beside_the_manifest(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"q{i} " * (i + 1), "output": "a"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "sel"
    result = CliRunner().invoke(app, ["select", "--method", "length", "--budget", "4", "--data", str(pool),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists() and (out / "report.html").exists()
    _, text = _parse(out / "report.html")
    assert "length" in text and "12" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_in_a_real_browser_without_console_errors(tmp_path):
    pool = _pool()
    selection = Selection(method="random", params={}, pool_ids=[ex.id for ex in pool],
                          scores=np.linspace(0, 1, len(pool)), kept=[9, 8, 7], pool_hash="h", cost=Cost())
    path = write_kept_report(tmp_path / "sel", selection_rows(selection, pool))
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1100,1400",
                           path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    assert "Uncaught" not in done.stderr and "CONSOLE(" not in done.stderr
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.std() > 10  # not blank: figures and text drawn


def test_slimtune_train_online_writes_the_pictures_of_what_each_step_kept(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"add {i} and {i}", "output": str(2 * i)}) + "\n"
                            for i in range(16)))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(pool), "--model", "tiny", "--online", "big-loss",
                                      "--keep", "0.5", "--batch-size", "4", "--max-steps", "3", "--max-length",
                                      "64", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _, text = _parse(out / "report.html")
    assert (out / "steps.png").exists() and "kept share per step" in text
    assert "big-loss" in text
