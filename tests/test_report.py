"""`regap report`: self-contained HTML, every figure inlined, missing files named."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from regap.cli import main


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if tag in ("link", "script") and ("href" in attrs or "src" in attrs):
            self.links.append(attrs.get("href") or attrs.get("src"))


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [0, 1])
    figure.savefig(path)
    plt.close(figure)


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "demo"
    (root / "eval" / "plain" / "gap").mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps({"setup": {"model": "tiny", "seed": 0}}))
    (root / "eval" / "plain" / "gap" / "gap.json").write_text(json.dumps({"mir": 3.1, "mir_ci": [3.0, 3.2], "layer0_gap": 12.0, "n_pairs": 10}))
    for figure in ("training_curves.png", "gap_compare/gap_layers.png", "safety_conditions.png"):
        _png(root / figure)
    return root


def test_report_inlines_figures_and_names_missing_files(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    html_text = (run_dir / "report.html").read_text()
    parser = _Resources()
    parser.feed(html_text)
    assert len(parser.sources) == 3 and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert parser.links == [] and "http://" not in html_text and "https://" not in html_text
    markdown = (run_dir / "report.md").read_text()
    assert "| plain | 3.100 | [3.000, 3.200] | 12.000 | 10 |" in markdown
    assert "`correlate/correlation.json`" in markdown  # missing step named, the rest rendered
    assert "missing:" in capsys.readouterr().err


def test_report_of_a_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    main(["report", str(run_dir)])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    (run_dir / "report.html").as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 10_000
