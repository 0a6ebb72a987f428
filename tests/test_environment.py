"""The project's own files describe one environment."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_pinned_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(item["pip"] for item in env if isinstance(item, dict))
    conda_pins = sorted(r for r in pip if not r.startswith("-e"))
    assert sorted({_name(r) for r in project}) == sorted({_name(r) for r in conda_pins})
    assert sorted(project) == conda_pins  # same versions too


def test_lock_file_agrees_with_the_direct_pins():
    lock = {_name(line): line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines() if line.strip()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in project:
        assert lock.get(_name(requirement)) == requirement, requirement


def test_known_crashing_ffi_is_not_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    assert "apache-tvm-ffi==0.1.14.post1" in text
