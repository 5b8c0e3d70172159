"""Shared by the fixture generators: a dependency-free safetensors writer (float32)."""
import json
import os
import struct

import numpy as np


def save_safetensors(path, tensors, metadata=None):
    """Writes {name: torch tensor or numpy array} as float32 safetensors, keys sorted, atomically."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        value = tensors[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().double().numpy()
        data = np.ascontiguousarray(value, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(value)), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
