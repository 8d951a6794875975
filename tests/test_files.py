"""files.py: a failed write names its file; a folder named for later writes is checked now."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from patchcore_jax import files


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it: no file


def test_a_full_disk_while_writing_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "scores.csv"
    target.write_text("previous\n")
    monkeypatch.setattr(Path, "write_text", _disk_full)
    with pytest.raises(OSError) as raised:
        files.write_csv(target, ["image", "score"], [["a.png", "1.0"]])
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"[Errno 28] cannot write {target}: No space left on device"
    monkeypatch.undo()
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no temporary left


def test_errors_that_name_their_file_or_carry_no_errno_pass_unchanged(tmp_path):
    named = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
    for error in (named, OSError("cannot download http://x: offline")):
        with pytest.raises(OSError) as raised, files.writing(tmp_path / "z"):
            raise error
        assert raised.value is error


def test_check_writable_folder_names_the_option_and_creates_nothing(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"^--spill-dir {a_file} is a file; expected"):
        files.check_writable_folder(a_file, "--spill-dir")
    with pytest.raises(NotADirectoryError, match=rf"^--spill-dir {a_file}/sub cannot be created"):
        files.check_writable_folder(a_file / "sub", "--spill-dir")
    missing = tmp_path / "new" / "spill"
    assert files.check_writable_folder(missing, "--spill-dir") == missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # created later, by use


def test_counts_in_messages_take_the_singular_only_for_one():
    assert files.quantity(1, "image") == "1 image"
    assert [files.quantity(n, "image") for n in (0, 2)] == ["0 images", "2 images"]
    assert files.quantity(3, "category", "categories") == "3 categories"
    assert files.quantity(1, "category", "categories") == "1 category"
