"""torch.save files read without torch, checked against torch; hostile pickles refused unrun."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.formats.torch_pickle import read_torch

torch = pytest.importorskip("torch")

LAYOUTS = {"zip": True, "legacy": False}


def _state():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 8, generator=g)
    return {
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(10).reshape(2, 5),
        "bool": torch.tensor([True, False, True]),
        "transposed": big.t(),  # a strided view of big's storage
        "rows": big[2:4],  # an offset into the same storage
        "big": big,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _expected(t):
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensors_equal_torchs(tmp_path, layout):
    state = _state()
    path = tmp_path / "sd.bin"
    torch.save(state, path, _use_new_zipfile_serialization=LAYOUTS[layout])
    tensors = read_torch(path)
    assert set(tensors) == set(state)
    for name, t in state.items():
        assert tensors[name].shape == tuple(t.shape), name
        got = tensors[name].read() if tensors[name].dtype in ("bfloat16", "float16") else tensors[name].load()
        np.testing.assert_array_equal(got, _expected(t), err_msg=name)
    # views of one storage say so, which is how a tied head is recognised without reading
    assert tensors["big"].where != tensors["rows"].where


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_storage_is_recognised(tmp_path, layout):
    w = torch.randn(5, 4)
    torch.save({"a": w, "b": w}, tmp_path / "t.bin", _use_new_zipfile_serialization=LAYOUTS[layout])
    t = read_torch(tmp_path / "t.bin")
    assert t["a"].where == t["b"].where


def test_parameters_are_read_as_tensors(tmp_path):
    lin = torch.nn.Linear(3, 2)
    torch.save(dict(lin.named_parameters()), tmp_path / "p.bin")
    t = read_torch(tmp_path / "p.bin")
    np.testing.assert_array_equal(t["weight"].load(), lin.weight.detach().numpy())


# ---------------------------------------------------------------------------- hostile pickles


class _Payload:
    """Pickles as a call of os.system: what an attacker's pytorch_model.bin contains."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_pickles(marker) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    eval_call = f"__import__('os').system('touch {marker}')".encode()
    return {
        "reduce_os_system": pickle.dumps(_Payload(marker), protocol=2),
        "global_posix_system": b"cposix\nsystem\n(S'" + cmd + b"'\ntR.",
        "reduce_os_system_protocol4": pickle.dumps(_Payload(marker), protocol=4),
        "eval_stack_global": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c" + bytes([len(eval_call)]) + eval_call
                             + b"\x85R.",
        # a plausible tensor whose storage type slot names os.system
        "storage_type_is_system": b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n"
                                  b"_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000"
                                  b"X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89ccollections\n"
                                  b"OrderedDict\n)RtRu.",
    }


def _torch_zip(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", b"\0" * 4)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.mark.parametrize("payload", ["reduce_os_system", "global_posix_system", "reduce_os_system_protocol4",
                                     "eval_stack_global"])
def test_the_payloads_are_live(tmp_path, payload):
    """Plain pickle does run them, so refusing them below is what keeps the marker away."""
    marker = tmp_path / "RAN"
    pickle.loads(_hostile_pickles(marker)[payload])
    assert marker.exists()


@pytest.mark.parametrize("payload", list(_hostile_pickles("m")))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hostile_pickles_are_refused_and_never_run(tmp_path, payload, layout):
    marker = tmp_path / "PWNED"
    data = _hostile_pickles(marker)[payload]
    path = tmp_path / "pytorch_model.bin"
    if layout == "zip":
        path.write_bytes(_torch_zip(data))
    else:  # the legacy layout's first pickle is the payload itself
        path.write_bytes(data)
    with pytest.raises(UserError, match="refused|not a PyTorch|corrupt"):
        read_torch(path)
    assert not marker.exists()


def test_refusal_names_what_was_refused(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(_torch_zip(pickle.dumps(_Payload(tmp_path / "m"), protocol=2)))
    with pytest.raises(UserError, match=r"refused: its pickle calls (posix|os)\.system"):
        read_torch(path)


# ---------------------------------------------------------------------------- damage


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("damage", ["truncated", "flipped_data"])
def test_damaged_files_are_user_errors(tmp_path, layout, damage):
    path = tmp_path / "sd.bin"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=LAYOUTS[layout])
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 3000]
    else:  # a flipped bit inside the tensor's bytes: the zip's CRC catches it
        if layout == "legacy":
            pytest.skip("the legacy layout has no checksum to catch a flipped bit")
        i = raw.find(np.float32(torch.load(io.BytesIO(bytes(raw)))["w"][0, 0].item()).tobytes())
        raw[i + 100] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        for t in read_torch(path).values():
            t.load()
    assert "\n" not in str(e.value)


def test_not_a_torch_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello world")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        read_torch(tmp_path / "a.bin")
    with zipfile.ZipFile(tmp_path / "b.bin", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UserError, match="no <archive>/data.pkl"):
        read_torch(tmp_path / "b.bin")
