"""Our numpy safetensors reader and writer against the safetensors library."""

import json
import struct

import numpy as np
import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.formats.safetensors_file import read_safetensors, write_safetensors
from mlx_gpt.formats.tensors import LazyTensor, bfloat16_to_float32, float32_to_bfloat16

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _arrays():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((5, 7)).astype(np.float32), "h": rng.standard_normal(9).astype(np.float16),
            "d": rng.standard_normal((2, 3)), "i": np.arange(6, dtype=np.int64).reshape(3, 2),
            "empty": np.zeros((0, 4), np.float32), "scalar": np.array(3.5, np.float32)}


def test_reads_what_the_library_writes(tmp_path):
    arrays = _arrays()
    safetensors_numpy.save_file(arrays, str(tmp_path / "a.safetensors"), metadata={"format": "np"})
    tensors = read_safetensors(tmp_path / "a.safetensors")
    assert set(tensors) == set(arrays)
    for name, a in arrays.items():
        assert tensors[name].shape == a.shape
        np.testing.assert_array_equal(tensors[name].load(), a)


def test_library_reads_what_we_write(tmp_path):
    arrays = _arrays()
    path = tmp_path / "b.safetensors"
    write_safetensors(path, {n: LazyTensor.of(a) for n, a in arrays.items()}, metadata={"format": "pt"})
    back = safetensors_numpy.load_file(str(path))
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0 and json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"] == {"format": "pt"}


def test_bfloat16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.randn(64, 3) * 10
    save_file({"x": x.to(torch.bfloat16)}, str(tmp_path / "bf.safetensors"))
    t = read_safetensors(tmp_path / "bf.safetensors")["x"]
    assert t.dtype == "bfloat16"
    np.testing.assert_array_equal(t.read(), x.to(torch.bfloat16).float().numpy())
    # and our rounding to bfloat16 is torch's (round to nearest, ties to even)
    ours = bfloat16_to_float32(float32_to_bfloat16(x.numpy()))
    np.testing.assert_array_equal(ours, x.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("damage", ["truncate", "short", "garbage_header", "huge_header", "bad_offsets"])
def test_damaged_files_are_user_errors(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    safetensors_numpy.save_file(_arrays(), str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "short":
        raw = raw[:5]
    elif damage == "garbage_header":
        raw = raw[:8] + b"\xff" * n + raw[8 + n :]
    elif damage == "huge_header":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    else:
        header = json.loads(raw[8 : 8 + n])
        header["w"]["data_offsets"] = [0, 4]
        new = json.dumps(header).encode()
        raw = struct.pack("<Q", len(new)) + new + raw[8 + n :]
    path.write_bytes(raw)
    with pytest.raises(UserError) as e:
        for t in read_safetensors(path).values():
            t.load()
    assert "\n" not in str(e.value) and str(path) in str(e.value)
