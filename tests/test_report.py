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


# ---------------------------------------------------------------------- connector families side by side


class _Tables(HTMLParser):
    """Every <table> as rows of cell texts, and every <h2> text."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._in_h2, self._text = True, []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2":
            self.headings.append("".join(self._text).strip())
            self._in_h2 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h2:
            self._text.append(data)


def _family(root: Path, model: str, mir: float, unsafe: float) -> None:
    """A fake demo family: summary, two lambdas x two checkpoints, safety summaries, every figure."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps({"setup": {"model": model}}))
    for label, shift in (("plain", 0.0), ("regap-l1", -1.0)):
        for step in (1, 2):
            folder = root / "eval" / f"{label}@{step}"
            (folder / "gap").mkdir(parents=True)
            (folder / "gap" / "gap.json").write_text(json.dumps(
                {"mir": mir + shift + step, "mir_ci": [mir + shift + step - 0.1, mir + shift + step + 0.1],
                 "layer0_gap": 10 * (mir + shift), "n_pairs": 4}))
            (folder / "safety").mkdir()
            rows = [{"condition": c, "unsafe": {"rate": unsafe + shift / 10, "ci": [0.0, 1.0], "n": 4},
                     "refused": {"rate": 0.0}, "off_topic": {"rate": 0.0}} for c in ("text", "blank")]
            (folder / "safety" / "summary.json").write_text(json.dumps({"judges": {"keyword": {"by_condition": rows}}}))
    for figure in ("training_curves.png", "gap_compare/gap_layers.png", "safety_conditions.png", "correlate/correlation.png"):
        _png(root / figure)


def _parse(root: Path) -> tuple[_Tables, str]:
    assert main(["report", str(root)]) == 0
    html_text = (root / "report.html").read_text()
    parser = _Tables()
    parser.feed(html_text)
    return parser, html_text


def test_report_shows_both_families_side_by_side(tmp_path):
    root = tmp_path / "demo"
    _family(root, "tiny", mir=3.0, unsafe=0.5)
    _family(root / "qformer", "tiny-qformer", mir=7.0, unsafe=0.25)
    parser, html_text = _parse(root)
    assert parser.headings[0] == "Connector families side by side"
    assert "Q-Former: Modality gap" in parser.headings and "MLP projector: Modality gap" in parser.headings
    table = parser.tables[0]
    assert table[0] == ["run", "metric", "MLP projector (tiny)", "Q-Former (tiny-qformer)"]
    cells = {(row[0], row[1]): row[2:] for row in table[1:]}
    # The final checkpoint (@2) of each lambda, one column per family.
    assert cells[("plain", "MIR [95% CI]")] == ["5.000 [4.900, 5.100]", "9.000 [8.900, 9.100]"]
    assert cells[("regap-l1", "layer-0 gap")] == ["20", "60"]
    assert cells[("regap-l1", "unsafe rate: blank (keyword)")] == ["0.400", "0.150"]
    assert [row[0] for row in table[1:]].index("regap-l1") > [row[0] for row in table[1:]].index("plain")
    figures = parser.tables[1]
    assert figures[0] == ["figure", "MLP projector (tiny)", "Q-Former (tiny-qformer)"] and len(figures) == 5
    # Both families' four figures, each inlined exactly once.
    assert html_text.count("data:image/png;base64,") == 8
    markdown = (root / "report.md").read_text()
    assert "](qformer/gap_compare/gap_layers.png)" in markdown and "](gap_compare/gap_layers.png)" in markdown
    assert "| qformer/plain@2 |" not in markdown and "| plain@2 | 5.000 |" in markdown  # per-family sections


def test_report_of_one_family_has_no_side_by_side(tmp_path):
    root = tmp_path / "demo"
    _family(root, "tiny", mir=3.0, unsafe=0.5)
    parser, html_text = _parse(root)
    assert "Connector families side by side" not in parser.headings and "Modality gap" in parser.headings
    assert html_text.count("data:image/png;base64,") == 4
    # Only the Q-Former family ran (`--family qformer`): its study, read from qformer/.
    only = tmp_path / "only"
    _family(only / "qformer", "tiny-qformer", mir=7.0, unsafe=0.25)
    parser, html_text = _parse(only)
    assert "Connector families side by side" not in parser.headings and "Q-Former: Modality gap" in parser.headings
    assert html_text.count("data:image/png;base64,") == 4
    assert "| plain@2 | 9.000 |" in (only / "report.md").read_text()
    assert "- `summary.json`" not in (only / "report.md").read_text()  # nothing looked for outside qformer/


def test_values_from_run_files_are_escaped_not_rendered(run_dir):
    """A run folder may come from anyone: its text must not become markup in report.html."""
    script = "<script>alert(1)</script>"
    (run_dir / "summary.json").write_text(json.dumps({
        "setup": {"model": script, "note|cell": "![pixel](http://evil.example/p.png)"},
        "notes": [f"{script} and <img src=x onerror=alert(2)> and [link](http://evil.example)"]}))
    variant = run_dir / "eval" / "<i>v`1" / "safety"
    variant.mkdir(parents=True)
    (variant / "summary.json").write_text(json.dumps({"judges": {f"k`w{script}": {"by_condition": [
        {"condition": script, "unsafe": {"rate": 0.5, "ci": [0.1, 0.9], "n": 4}, "refused": {"rate": 0.5},
         "off_topic": {"rate": 0.0}}]}}}))
    assert main(["report", str(run_dir)]) == 0
    html_text = (run_dir / "report.html").read_text()
    parser = _Resources()
    parser.feed(html_text)
    assert all(s.startswith("data:image/png;base64,") for s in parser.sources)  # no <img src=x>, no pixel
    assert parser.links == [] and "<script" not in html_text and "<i>" not in html_text
    assert 'href="http' not in html_text and "<img src=x" not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert html_text.count("&lt;script&gt;") >= 4  # setup, note, judge name, condition
    assert "&lt;i&gt;v`1" in html_text  # the folder name, shown as it is


# ---------------------------------------------------------------------- what `regap report` may write


def test_a_users_own_report_is_never_replaced(run_dir, capsys):
    mine = "# My notes\n\nkeep me\n"
    (run_dir / "report.md").write_text(mine)
    assert main(["report", str(run_dir)]) == 2
    assert "report.md was not written by regap" in capsys.readouterr().err
    assert (run_dir / "report.md").read_text() == mine and not (run_dir / "report.html").exists()
    (run_dir / "report.md").unlink()
    (run_dir / "report.html").write_text("<html>mine</html>")
    assert main(["report", str(run_dir)]) == 2
    assert (run_dir / "report.html").read_text() == "<html>mine</html>" and not (run_dir / "report.md").exists()


def test_a_report_regap_wrote_is_rewritten(run_dir):
    assert main(["report", str(run_dir)]) == 0
    first = (run_dir / "report.md").read_text()
    assert first.startswith("<!-- written by regap") and "<!-- written by regap" in (run_dir / "report.html").read_text()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.md").read_text() == first
    # a report written before the marker existed is recognised by its header
    (run_dir / "report.md").write_text("# regap report: `demo`\n\nold\n")
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.md").read_text() == first


@pytest.mark.parametrize("content", [None, {"report.md": "# mine\n"}, {"data.json": "{}"},
                                     {"summary.json": json.dumps({"judges": {}})}])
def test_a_folder_without_a_regap_run_is_refused(tmp_path, capsys, content):
    folder = tmp_path / "f"
    folder.mkdir()
    for name, text in (content or {}).items():
        (folder / name).write_text(text)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["report", str(folder)]) == 2
    assert "holds no regap run" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_study_folder_is_rendered_as_the_study(tmp_path):
    source = Path(__file__).resolve().parents[1] / "results" / "tiny-study"
    if not (source / "summary.json").is_file():
        pytest.skip("results/tiny-study is not in this checkout")
    study = tmp_path / "tiny-study"
    shutil.copytree(source, study)
    assert (study / "report.md").read_text().startswith("# regap study `tiny-study`")  # written before the marker
    assert main(["report", str(study)]) == 0
    rebuilt = (study / "report.md").read_text()  # the study's own report, rebuilt from its files
    assert rebuilt.startswith("# regap study `tiny-study`") and "The paper's four claims" in rebuilt
    assert "# regap report:" not in rebuilt and "Missing files" not in rebuilt
    assert "regap study <code>tiny-study</code>" in (study / "report.html").read_text()


def test_a_finished_demo_lists_no_file_it_never_makes(run_dir):
    """The attack-input gap is measured on the final plain and ReGap checkpoints only, and judge
    validation runs only with --xstest: neither is missing elsewhere."""
    (run_dir / "summary.json").write_text(json.dumps({"setup": {"model": "tiny", "settings": {
        "regap_lambda": 1.0, "xstest": None}}}))
    shutil.rmtree(run_dir / "eval")
    for variant in ("plain@1", "plain@2", "regap-l1@1", "regap-l1@2"):
        (run_dir / "eval" / variant / "gap").mkdir(parents=True)
        (run_dir / "eval" / variant / "gap" / "gap.json").write_text(json.dumps({"mir": 3.0, "layer0_gap": 1.0}))
    for variant in ("plain@2", "regap-l1@1"):  # regap-l1@1 is not final: its attack gap is not expected
        (run_dir / "eval" / variant / "gap_attack").mkdir()
        (run_dir / "eval" / variant / "gap_attack" / "gap.json").write_text(json.dumps({"mir": 3.0, "layer0_gap": 1.0}))
    (run_dir / "comparison.json").write_text("[]")
    (run_dir / "correlate").mkdir()
    (run_dir / "correlate" / "correlation.json").write_text(json.dumps({"undefined": "too few points", "points": []}))
    _png(run_dir / "correlate" / "correlation.png")
    for variant in ("plain@1", "plain@2", "regap-l1@1", "regap-l1@2"):
        for sub, name in (("safety", "summary.json"), ("utility", "utility.json")):
            (run_dir / "eval" / variant / sub).mkdir()
            (run_dir / "eval" / variant / sub / name).write_text(json.dumps({"judges": {}, "tasks": {}}))
    from regap.report.demo import build_report

    result = build_report(run_dir)
    assert result["missing"] == ["eval/regap-l1@2/gap_attack/gap.json"]
    (run_dir / "eval" / "regap-l1@2" / "gap_attack").mkdir()
    (run_dir / "eval" / "regap-l1@2" / "gap_attack" / "gap.json").write_text(json.dumps({"mir": 3.0, "layer0_gap": 1.0}))
    assert build_report(run_dir)["missing"] == []
    assert "Missing files" not in (run_dir / "report.md").read_text()
