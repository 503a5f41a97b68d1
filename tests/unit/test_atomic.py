"""atomic_write: the target is either the old file or the complete new one; an OSError names the target."""
import errno

import pytest

from common.atomic import atomic_write, atomic_write_text


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_os_error_names_the_target(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(OSError) as e:
        with atomic_write(target, "wb"):
            raise OSError(errno.ENOSPC, "No space left on device")  # what f.write raises: no file name
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert not target.exists()
