"""What `pip install -e .` and the Docker image ship: every project package and subpackage, so that an installed
`metaloss` (run from any directory, no PYTHONPATH) imports the same modules the tests import from the checkout."""
from __future__ import annotations

import re
import tomllib

from setuptools import find_packages

from tests.support.cli import REPO
from tests.unit.test_import_graph import PACKAGES


def _find_include() -> list[str]:
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools_cfg["packages"]["find"]["include"]


def test_every_folder_with_modules_is_a_package_the_install_finds():
    folders = {".".join(p.parent.relative_to(REPO).parts) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    found = set(find_packages(str(REPO), include=_find_include()))
    assert folders - found == set()


def test_the_docker_image_copies_every_top_level_package():
    copied = set(re.findall(r"^COPY (\S+) \1$", (REPO / "Dockerfile").read_text(), flags=re.M))
    assert set(PACKAGES) <= copied
