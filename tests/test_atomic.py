"""One atomic writer for every file sam-probe writes: all or nothing, open()'s permissions, no leftovers."""
from __future__ import annotations

import os

import pytest

from sam_probe.atomic import atomic_write, file_mode


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_replaces_the_target_with_open_permissions_and_makes_folders(tmp_path):
    target = tmp_path / "a" / "b" / "unit.h5"
    with atomic_write(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and os.path.basename(tmp).startswith(".unit.h5.")
        assert not target.exists()  # nothing visible before the block ends
        with open(tmp, "w") as fh:
            fh.write("new")
    assert target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == file_mode() == (0o666 & ~_umask())
    assert os.listdir(target.parent) == ["unit.h5"]


@pytest.mark.parametrize("fsync", [True, False])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, fsync):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target, fsync=fsync) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half of it")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]
