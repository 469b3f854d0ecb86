"""Crafting bad files for the hostile-input tests: a raw safetensors writer that writes any
header at all, and editors that change one thing in a valid delta file."""

import base64
import hashlib
import json
import os
import struct
import zlib

import torch

from deltasvd.safetensors_io import DTYPE_TO_ST, read_header


def raw_file(path, header, data=b"", header_bytes=None):
    """A file of `header` (any JSON value, or raw bytes) followed by `data`, as given."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def valid_layout(tensors):
    """(header, data) of a correct file of `tensors` ({name: tensor}), for editing."""
    header, chunks, at = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(b)]}
        chunks.append(b)
        at += len(b)
    return header, b"".join(chunks)


def read_all(path):
    """(header with __metadata__, data bytes) of a file."""
    header, meta, offset = read_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    header = dict(header)
    header["__metadata__"] = dict(meta)
    return header, data


def rewrite(path, out, edit_header=None, edit_data=None, rehash=True):
    """Copy of a safetensors file with its header and/or data edited. `rehash`: record the new
    data's sha256, as a forger who knows the format would (so only deeper checks catch it)."""
    header, data = read_all(path)
    if edit_header:
        edit_header(header)
    if edit_data:
        data = edit_data(header, data)
    if rehash and "sshs_model_hash" in header.get("__metadata__", {}):
        header["__metadata__"]["sshs_model_hash"] = hashlib.sha256(data).hexdigest()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return raw_file(out, None, data, header_bytes=raw)


def layers(header):
    return json.loads(zlib.decompress(base64.b64decode(header["__metadata__"]["deltasvd.layers"])))


def set_layers(header, records):
    header["__metadata__"]["deltasvd.layers"] = base64.b64encode(
        zlib.compress(json.dumps(records).encode())).decode()


def set_tensor(header, data, name, tensor):
    """Data with the bytes of tensor `name` replaced (same size)."""
    begin, end = header[name]["data_offsets"]
    b = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(b) == end - begin
    return data[:begin] + b + data[end:]


def get_tensor(header, data, name):
    from deltasvd.safetensors_io import ST_TO_DTYPE
    info = header[name]
    begin, end = info["data_offsets"]
    raw = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
    return raw.view(ST_TO_DTYPE[info["dtype"]]).reshape(info["shape"]).clone()


def files_in(folder):
    return sorted(os.listdir(folder))
