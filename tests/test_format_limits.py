"""Limits of the strict GGUF reader: shapes llama.cpp refuses, and sizes a file claims but may not hold.

Why: gguf-split must refuse what llama.cpp's loader (ggml/src/gguf.cpp) refuses, and a header's counts,
lengths, dims and offsets come from the file: every claim must end in one GGUFSplitError naming the file,
in bounded time and memory, never in an allocation of the size claimed. Sparse files (`truncate`) make a
claim of a few GB "almost" true without using disk, so the reader cannot lean on a small file size.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

from gguf_split.errors import GGUFSplitError
from gguf_split.gguf_format import (
    GGUFFile,
    align_up,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    parse_tensor_infos,
)

BLOCK_TYPES = [q for q, (block, _) in GGML_QUANT_SIZES.items() if block > 1]
PLAIN_TYPES = [q for q, (block, _) in GGML_QUANT_SIZES.items() if block == 1]


def gguf_bytes(kvs: list[bytes], infos: list[bytes], *, data: bytes = b"", alignment: int = 32,
               n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF from raw KV and tensor-info records, zero padding, then `data` at the data section."""
    head = encode_prefix(3, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(align_up(len(head), alignment) - len(head)) + data


def refused(path: Path) -> GGUFSplitError:
    with pytest.raises(GGUFSplitError) as err:
        GGUFFile(path)
    assert err.value.path == str(path)
    assert str(err.value) == f"{path}: {err.value.problem}"
    return err.value


# ---------------------------------------------------------------------------------------------------------
# Tensors with no dimensions, and tensors smaller than a block.
#
# llama.cpp (gguf.cpp, gguf_init_from_reader): ne[j] = 1 for every j >= n_dims, so a tensor with n_dims = 0
# is a scalar of 1 element; then "ne[0] % blck_size != 0" refuses it for every type whose block holds more
# than one element. A 0-dim F32 (or F16, I32, ...) tensor is a legitimate scalar: 1 element, type-size bytes.


def scalar_file(tmp_path: Path, qtype: int, shape: tuple[int, ...] = ()) -> Path:
    path = tmp_path / f"{Q(qtype).name}-{len(shape)}d.gguf"
    path.write_bytes(gguf_bytes([], [encode_tensor_info("s", shape, int(qtype), 0)], data=bytes(512)))
    return path


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_scalar_of_a_block_type_is_refused(tmp_path: Path, qtype: Q) -> None:
    """It used to be accepted with nbytes = 1 // block * type_size = 0."""
    block = GGML_QUANT_SIZES[qtype][0]
    err = refused(scalar_file(tmp_path, qtype))
    n_dims_at = 24 + 8 + 1  # prefix, name length, name "s"
    assert err.problem == (f"tensor 's' has no dimensions (a scalar: 1 element), but a {qtype.name} block "
                           f"holds {block} elements (at byte {n_dims_at})")


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1,), (1, 1, 1, 1), "half-block"], ids=str)
def test_fewer_elements_than_a_block_are_refused(tmp_path: Path, qtype: Q, shape: Any) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (block // 2, 4) if shape == "half-block" else shape
    err = refused(scalar_file(tmp_path, qtype, shape))
    type_at = 24 + 8 + 1 + 4 + 8 * len(shape)
    assert err.problem == (f"tensor 's': first dimension {shape[0]} is not a multiple of {qtype.name}'s block "
                           f"size {block} (at byte {type_at})")


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda q: q.name)
def test_scalar_of_a_plain_type_is_one_element(tmp_path: Path, qtype: Q) -> None:
    with GGUFFile(scalar_file(tmp_path, qtype)) as f:
        (t,) = f.header.tensors
        assert (t.shape, t.nbytes) == ((), GGML_QUANT_SIZES[qtype][1])
        assert len(f.tensor_view(t)) == t.nbytes


def test_scalar_written_by_gguf_writer_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "scalar.gguf"
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_tensor("scale", np.array(2.5, dtype=np.float32))
    w.add_tensor("v", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = {t.name: t for t in GGUFReader(path).tensors}
    with GGUFFile(path) as f:
        t = f.header.tensor_by_name["scale"]
        assert (t.shape, t.nbytes) == ((), 4) and t.nbytes == ref["scale"].n_bytes
        assert f.header.data_start + t.offset == ref["scale"].data_offset
        assert struct.unpack("<f", f.tensor_view(t)) == (2.5,)


SHAPES = [(), (1,), (3,), (1, 1, 1, 1), "block", "block,3", "2block,1,2,1", "block-1,2", "block+1"]


def concrete(shape: Any, block: int) -> tuple[int, ...]:
    if not isinstance(shape, str):
        return shape
    dims = []
    for d in shape.split(","):
        d = d.replace("2block", str(2 * block)).replace("block", str(block))
        dims.append(eval(d, {}))  # "64-1" and the like, from the list above only
    return tuple(dims)


def test_no_accepted_tensor_has_zero_bytes() -> None:
    """Every ggml type x a set of small shapes: accepted means nbytes = elements / block x type size > 0
    and ne0 a multiple of the block (ne0 = 1 with no dims); anything else (also a zero dim) is refused by name."""
    accepted = 0
    for qtype, (block, type_size) in GGML_QUANT_SIZES.items():
        for raw_shape in SHAPES:
            shape = concrete(raw_shape, block)
            rec = encode_tensor_info("t", shape, int(qtype), 0)
            n = int(np.prod(shape, dtype=object)) if shape else 1
            ne0 = shape[0] if shape else 1
            if ne0 % block or n == 0:  # (block-1, 2) of a plain type is (0, 2): no element
                with pytest.raises(GGUFSplitError, match=r"^mem: tensor 't'"):
                    parse_tensor_infos(rec, "mem", 32)
                continue
            (t,) = parse_tensor_infos(rec, "mem", 32)
            assert t.nbytes == n // block * type_size > 0, (qtype.name, shape)
            accepted += 1
    assert accepted > len(GGML_QUANT_SIZES) * 3
