from __future__ import annotations

import os
import stat

import pytest

from preprocessing.atomic import atomic_path, current_umask, write_text_atomic


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


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set: the probe restored (or never touched) it


def test_final_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a normally created file gets
    target = write_text_atomic(tmp_path / "cases.csv", "a\n")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    with atomic_path(tmp_path / "deep" / "mask.nii.gz") as tmp:
        tmp.unlink()  # a writer that replaces the file instead of opening it
        tmp.write_bytes(b"y")
    assert stat.S_IMODE((tmp_path / "deep" / "mask.nii.gz").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o777 & ~umask


def test_umask_without_proc_falls_back_and_restores(monkeypatch, umask):
    import preprocessing.atomic as atomic

    def no_proc(path, *args, **kwargs):  # fault injection: a system without /proc
        raise FileNotFoundError(path)

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    assert current_umask() == umask
    assert os.umask(umask) == umask
