"""The test extra installs without pip searching: the CUDA plugin is pinned, on each Python CI
runs, to one jax release that has its plugin (an unpinned `jax[cuda12-local]` sent pip
backtracking for minutes through older jax releases once a jax came out before its plugin)."""

from __future__ import annotations

import os
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python versions CI installs the test extra on (.ci/run), on Linux.
PYTHONS = ("3.11", "3.12")


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _applying(requirements: list[str], python: str) -> list[Requirement]:
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "extra": "test"}
    parsed = [Requirement(r) for r in requirements]
    return [r for r in parsed if r.marker is None or r.marker.evaluate(env)]


@pytest.mark.parametrize("python", PYTHONS)
def test_the_cuda_plugin_is_pinned_to_one_jax(python):
    project = _project()
    test = _applying(project["optional-dependencies"]["test"], python)
    plugin = [r for r in test if r.name == "jax" and "cuda12-local" in r.extras]
    assert len(plugin) == 1, plugin
    (spec,) = plugin[0].specifier
    assert spec.operator == "==", plugin[0]  # one jax: no range for pip to search
    # The rest of the requirements allow it, so pip takes it as it is.
    for r in _applying(project["dependencies"], python) + test:
        if r.name in ("jax", "jaxlib"):
            assert SpecifierSet(str(r.specifier)).contains(spec.version), r
