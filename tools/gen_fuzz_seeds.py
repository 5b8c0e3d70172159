"""Writes the small hand-made fuzz seeds under Tests/HRHFTests/Fixtures/fuzz-seeds/ (no torch
needed): pickles of state dicts as torch.save writes them, a zip and a legacy .pth, a safetensors
file without a card, .npy files, dataset lists. A file whose name starts with "refused-" must be
refused; every other seed must be accepted (FuzzRegressionTests checks both).
The model and pack seeds are made by the tools: see tools/fuzz.sh --make-seeds."""
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..", "Tests", "HRHFTests", "Fixtures", "fuzz-seeds")

# Stand-ins for the torch names a state dict pickle refers to: pickle records them by module and
# name, exactly as torch.save does, and nothing here is ever unpickled.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, torch_utils
torch._utils = torch_utils
for storage in ["FloatStorage", "HalfStorage", "LongStorage", "ByteStorage"]:
    cls = type(storage, (), {"__module__": "torch"})
    setattr(torch, storage, cls)


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")


def _rebuild_parameter(*args):
    raise AssertionError("never called")


for f in [_rebuild_tensor_v2, _rebuild_parameter]:
    f.__module__ = "torch._utils"
    setattr(torch_utils, f.__name__, f)


class Tensor:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride, parameter=False):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        self.parameter = parameter

    def __reduce__(self):
        inner = (_rebuild_tensor_v2, self.args)
        if self.parameter:
            return (_rebuild_parameter, (_Wrapped(inner), False, collections.OrderedDict()))
        return inner


class _Wrapped:
    def __init__(self, reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


class Storage:
    def __init__(self, cls, key, numel, view=None):
        self.cls, self.key, self.numel, self.view = cls, key, numel, view


def dumps(obj, protocol, legacy=False):
    """A pickle whose storages are persistent ids, zip style or (legacy) with a view tuple."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=protocol)

    def persistent_id(o):
        if isinstance(o, Storage):
            if legacy:
                return ("storage", o.cls, o.key, "cpu", o.numel, o.view)
            return ("storage", o.cls, o.key, "cpu", o.numel)
        return None

    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buffer.getvalue()


def state_dict():
    # Storage keys 0-7 of 256 bytes: the pickle harness provides exactly these.
    s0 = Storage(torch.FloatStorage, "0", 64)
    s1 = Storage(torch.HalfStorage, "1", 128)
    s2 = Storage(torch.LongStorage, "2", 32)
    return collections.OrderedDict([
        ("conv.weight", Tensor(s0, 0, [2, 3, 2, 2], [12, 4, 2, 1], parameter=True)),
        ("conv.bias", Tensor(s0, 24, [2], [1])),
        ("bn.running_mean", Tensor(s1, 4, [3, 2], [1, 3])),  # transposed: not contiguous
        ("bn.num_batches_tracked", Tensor(s2, 0, [], [])),
    ])


def write(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def storages_bytes(key_count=8):
    return {str(k): bytes((i * 7 + k) % 256 for i in range(256)) for k in range(key_count)}


def zip_checkpoint(pkl):
    buffer = io.BytesIO()
    entries = [("archive/data.pkl", pkl)]
    entries += [(f"archive/data/{key}", data) for key, data in storages_bytes(3).items()]
    entries += [("archive/version", b"3\n")]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def legacy_checkpoint():
    s0 = Storage(torch.FloatStorage, "140", 64, None)
    view = Storage(torch.FloatStorage, "141", 16, ("142", 4, 8))
    sd = collections.OrderedDict([
        ("a.weight", Tensor(s0, 0, [4, 4], [4, 1])),
        ("a.bias", Tensor(view, 0, [4], [2])),
    ])
    out = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    out += pickle.dumps(1001, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out += dumps(sd, protocol=2, legacy=True)
    out += pickle.dumps(["140", "141"], protocol=2)
    for count in [64, 16]:
        out += struct.pack("<q", count) + struct.pack(f"<{count}f", *[i / 8 for i in range(count)])
    return out


def safetensors_without_card():
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "h": {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]},
              "b": {"dtype": "BOOL", "shape": [2], "data_offsets": [22, 24]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + struct.pack("<4f", 1, 2, 3, 4) + b"\x00\x3c" * 3 + b"\x01\x00"


def npy(array, version):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def main():
    sd = state_dict()
    write("pickle", "state_dict_protocol2.pkl", dumps(sd, 2))
    write("pickle", "state_dict_protocol4.pkl", dumps(sd, 4))
    write("pickle", "wrapped.pkl", dumps({"state_dict": sd, "epoch": 3, "best": 0.5}, 2))
    write("pickle", "refused-eval.pkl", b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.")
    write("pth", "zip_small.pth", zip_checkpoint(dumps(sd, 2)))
    write("pth", "legacy_small.pth", legacy_checkpoint())
    write("safetensors", "refused-no_card.safetensors", safetensors_without_card())
    write("npy", "f32_2x3.npy", npy(np.arange(6, dtype="<f4").reshape(2, 3), (1, 0)))
    write("npy", "f32_rank1_v2.npy", npy(np.arange(5, dtype="<f4"), (2, 0)))
    write("npy", "f32_scalar.npy", npy(np.float32(1.5).reshape(()), (1, 0)))
    write("npy", "refused-f64.npy", npy(np.zeros(3, dtype="<f8"), (1, 0)))
    write("list", "names.txt", b"a\nb\n")
    write("list", "mib_pairs.txt",
          b"/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/b.png /SegmentationClass/b.png\n")
    write("list", "crlf_blank_lines.txt", b"a\r\n\r\n  b  \r\n")
    write("list", "refused-missing.txt", b"a\nc\n")


if __name__ == "__main__":
    main()
