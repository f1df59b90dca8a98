from __future__ import annotations

import pytest

from preprocessing.atomic import atomic_path, write_text_atomic


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "cases.csv"
    write_text_atomic(target, "a,b\n1,2\n")
    write_text_atomic(target, "a,b\n3,4\n")
    assert target.read_text() == "a,b\n3,4\n"
    assert [p.name for p in target.parent.iterdir()] == ["cases.csv"]


def test_failed_write_keeps_old_content_and_cleans_up(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")  # writers that pick a format by suffix still work
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


@pytest.mark.parametrize("name", ["....nii.gz", "a.b.nii.gz", "scan.nii", "plain"])
def test_temp_name_keeps_the_format_suffix(tmp_path, name):
    with atomic_path(tmp_path / name) as tmp:
        assert tmp.name.endswith(".nii.gz" if name.endswith(".nii.gz") else tmp_path.joinpath(name).suffix)
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"
