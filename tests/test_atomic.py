import pytest

from mlx_gpt.atomic import previous_version, replacing_directory, replacing_file


def test_directory_is_replaced_only_when_the_block_completes(tmp_path):
    out = tmp_path / "run"
    with replacing_directory(out) as d:
        (d / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with replacing_directory(out) as d:
            (d / "a").write_text("2")
            raise RuntimeError("crash while writing")
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with replacing_directory(out) as d:
        (d / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert not previous_version(out).exists()


def test_replaced_directory_has_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with replacing_directory(tmp_path / "run"):
            pass
    finally:
        os.umask(umask)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755


def test_file_is_replaced_only_when_the_block_completes(tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"old")
    with pytest.raises(OSError):
        with replacing_file(out) as f:
            f.write_bytes(b"ne")
            raise OSError("disk full")
    assert out.read_bytes() == b"old"
    with replacing_file(out) as f:
        f.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
