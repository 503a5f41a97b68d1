"""launch/check_image.py, offline part (the registry checks run by hand: they need the network and a minute):
the Dockerfile's COPY sources exist and cover every package, and the image's Python is the one the README and
the DALI wheel script name."""
from __future__ import annotations

from launch.check_image import REPO, check_copies, check_versions, python_version


def test_the_dockerfile_copies_existing_paths_and_every_package():
    ok, why = check_copies(REPO / "Dockerfile")
    assert ok, why


def test_a_missing_copy_source_or_package_is_named(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM x\nCOPY trainer trainer\nCOPY no_such_dir \\\n    /opt/x\n")
    ok, why = check_copies(bad)
    assert not ok and "no_such_dir" in why and "common" in why and "launch" in why


def test_one_python_version_everywhere(tmp_path):
    py = python_version(REPO / "Dockerfile")
    assert py == "3.12"
    script = tmp_path / "dali_wheels.sh"
    script.write_text("pip download --python-version 3.12 x\n")
    assert check_versions(py, script)[0]
    script.write_text("pip download --python-version 3.11 x\n")
    ok, why = check_versions(py, script)
    assert not ok and "3.11" in why
