"""pyproject.toml: every dependency floor is a version the test suite has passed with, and the
optional tool extras exist. Lower a floor only after running the suite with that version."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

#: The versions the suite passed with (the lowest tested, per package). transformers 5.0.0,
#: which the old floor allowed, lacks CLIPImageProcessorPil and fails the tiny test models.
TESTED_WITH = {
    "torch": "2.13", "transformers": "5.24", "accelerate": "1.15", "peft": "0.21.2", "safetensors": "0.8",
    "numpy": "2.4.6", "scipy": "1.17.1", "pandas": "3.1.1", "matplotlib": "3.11.2", "pillow": "12.3",
    "scikit-image": "0.26", "pyyaml": "6.0.4", "typer": "0.29.2", "rich": "15.0", "tqdm": "4.70.1",
    "markdown-it-py": "4.3", "filelock": "3.12", "onnx": "1.23.2", "pytest": "9.2", "statsmodels": "0.15", "onnxruntime": "1.32",
    "mkdocs": "1.6.1", "mkdocs-material": "9.8.2", "mkdocstrings": "1.0.8",
}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_every_floor_is_a_tested_version():
    project = _project()
    requirements = [Requirement(r) for r in project["dependencies"]]
    for group in ("offline", "test", "docs"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][group]]
    for requirement in requirements:
        floor = _floor(requirement)
        assert floor is not None, f"{requirement} has no floor"
        tested = TESTED_WITH.get(requirement.name.lower())
        if tested is not None:  # pinned data wheels (==) need no entry
            assert floor >= Version(tested), f"{requirement}: floor below the tested {tested}"
    names = {r.name.lower() for r in requirements}
    assert set(TESTED_WITH) <= names


def test_tool_extras():
    extras = _project()["optional-dependencies"]
    assert [Requirement(r) for r in extras["lmms"]][0].specifier.contains("0.6")
    vllm = Requirement(extras["vllm"][0])
    assert vllm.name == "vllm" and _floor(vllm) >= Version("0.11")  # prompt embeds on the V1 engine
