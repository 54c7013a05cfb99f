"""`regap --version` prints the installed distribution's version, which is pyproject.toml's when
regap was installed from this tree (CI's fresh editable install; the wheel check covers the wheel)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from typer.testing import CliRunner

from regap.cli import app, main

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _installed_version() -> str:
    try:
        return distribution("regap").version
    except PackageNotFoundError:
        pytest.skip("regap is not installed (running from the source tree only)")


def test_version_option_prints_the_installed_version_and_exits(capsys):
    result = CliRunner().invoke(app, ["--version", "models"])  # eager: the command never runs
    assert result.exit_code == 0
    assert result.output == f"regap {_installed_version()}\n"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"regap {_installed_version()}\n"


def test_installed_from_this_tree_the_version_is_pyprojects():
    version = _installed_version()
    direct_url = distribution("regap").read_text("direct_url.json")
    url = json.loads(direct_url).get("url", "") if direct_url else ""
    if not url.startswith("file://") or Path(unquote(urlparse(url).path)).resolve() != ROOT:
        pytest.skip("regap is installed from another tree or a wheel")
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == expected, f"installed metadata says {version}, pyproject.toml {expected}: reinstall"
