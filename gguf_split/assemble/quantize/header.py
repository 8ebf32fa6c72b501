"""The header llama-quantize writes, in pure Python (a restore needs no llama.cpp), and the CLI's KVs.

GGUF v3; the source KVs in order, as `gguf_set_kv` copies them (string values cut at a NUL, bools written
0/1, a key set twice moves to the end), then `general.quantization_version` and `general.file_type`
(removed and appended), `split.*` removed, then the CLI's `quantize.imatrix.*` KVs; tensor infos with
`ggml_n_dims` dims (trailing 1s dropped) and offsets at 32-byte alignment, data padded to 32 with zeros.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Sequence

import xxhash

from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, \
    GGUFValueType, Keys

from ...format.gguf import KV, GGUFFile, align_up, encode_prefix, encode_tensor_info, encode_value
from .recipe import Recipe

OUTPUT_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT  # llama-quantize's output layout, whatever the source says
OUTPUT_VERSION = 3
IMATRIX_FILE_KEY = "quantize.imatrix.file"
IMATRIX_DATASET_KEY = "quantize.imatrix.dataset"
IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS_KEY = "quantize.imatrix.chunks_count"
_CLI_STRING_MAX = 127  # the CLI strncpy's into a char[128] KV override
SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def imatrix_kvs(recipe: Recipe) -> list[tuple[str, GGUFValueType, Any]]:
    """The KVs llama-quantize (the CLI) adds for its imatrix, in its order: (key, type, value); strings as
    bytes, cut as its strncpy cuts them."""
    imx = recipe.imatrix
    if imx is None:
        return []
    label = imx.path if recipe.imatrix_label is None else recipe.imatrix_label
    kvs: list[tuple[str, GGUFValueType, Any]] = [
        (IMATRIX_FILE_KEY, GGUFValueType.STRING, os.fsencode(label).split(b"\0")[0][:_CLI_STRING_MAX])]
    if imx.datasets:
        kvs.append((IMATRIX_DATASET_KEY, GGUFValueType.STRING, imx.datasets[0][:_CLI_STRING_MAX]))
    kvs.append((IMATRIX_ENTRIES_KEY, GGUFValueType.UINT32, len(imx.entries)))
    if imx.chunk_count > 0:
        kvs.append((IMATRIX_CHUNKS_KEY, GGUFValueType.UINT32, imx.chunk_count))
    return kvs


# ---------------------------------------------------------------------------------------------------------
# The header llama_model_quantize writes


def quantized_header(source: GGUFFile, tensors: Sequence[tuple[str, tuple[int, ...], int]], ftype: int,
                     extra_kvs: Sequence[tuple[str, GGUFValueType, Any]] = ()) -> bytes:
    """The bytes before the first tensor of the file llama-quantize writes for `source`: `tensors` are
    (name, GGUF shape, target type) in llama.cpp's order, `extra_kvs` the CLI's (imatrix_kvs). Pure
    Python: sizes come from gguf's tables."""
    kvs = _copied_kvs(source)
    _set(kvs, Keys.General.QUANTIZATION_VERSION, _U32_TYPE + struct.pack("<I", GGML_QUANT_VERSION))
    _set(kvs, Keys.General.FILE_TYPE, _U32_TYPE + struct.pack("<I", ftype))
    for key in SPLIT_KEYS:
        kvs.pop(key.encode(), None)
    for key, vtype, value in extra_kvs:
        _set(kvs, key, struct.pack("<I", vtype) + encode_value(vtype, value))
    parts = [encode_prefix(OUTPUT_VERSION, len(tensors), len(kvs))]
    parts += [encode_value(GGUFValueType.STRING, k) + v for k, v in kvs.items()]
    offset = 0
    for name, shape, t in tensors:
        parts.append(encode_tensor_info(name, _n_dims_shape(shape), t, offset))
        offset += align_up(tensor_nbytes(t, shape), OUTPUT_ALIGNMENT)
    meta = b"".join(parts)
    return meta + bytes(align_up(len(meta), OUTPUT_ALIGNMENT) - len(meta))


_U32_TYPE = struct.pack("<I", GGUFValueType.UINT32)


def _set(kvs: dict[bytes, bytes], key: str | bytes, typed_value: bytes) -> None:
    """gguf_set_val_*: an existing key is removed, the pair appended."""
    k = key if isinstance(key, bytes) else key.encode("utf-8")
    kvs.pop(k, None)
    kvs[k] = typed_value


def _copied_kvs(source: GGUFFile) -> dict[bytes, bytes]:
    """The source's KVs as gguf_set_kv copies them: key -> value type + value bytes."""
    out: dict[bytes, bytes] = {}
    for kv in source.header.kvs:
        key = kv.key.encode("utf-8").split(b"\0")[0]
        _set(out, key, _copied_value(source, kv))
    return out


def _copied_value(source: GGUFFile, kv: KV) -> bytes:
    raw = source.raw(kv.value_start - 4, kv.end)
    if kv.vtype is GGUFValueType.STRING:
        value = raw[12:]
        return raw if b"\0" not in value else raw[:4] + encode_value(kv.vtype, value.split(b"\0")[0])
    if kv.vtype is GGUFValueType.BOOL:
        return raw[:4] + (b"\1" if raw[4] else b"\0")
    if kv.vtype is GGUFValueType.ARRAY and kv.subtype is GGUFValueType.BOOL:
        return raw[:16] + bytes(1 if b else 0 for b in raw[16:])
    if kv.vtype is GGUFValueType.ARRAY and kv.subtype is GGUFValueType.STRING:
        return _c_strings(raw)
    return raw


_CUT_CACHE: dict[bytes, bytes] = {}  # xxh3-128 of a string array -> its copy: a family repeats its tokenizer


def _c_strings(raw: bytes) -> bytes:
    """A string array's type + value with every string cut at its first NUL (unchanged if none has one).
    Walking a 262k-token vocabulary takes a fifth of a second in Python; the tasks of a family share theirs,
    so the result is remembered by digest."""
    key = xxhash.xxh3_128(raw).digest()
    done = _CUT_CACHE.get(key)
    if done is None:
        done = _CUT_CACHE[key] = _cut_strings(raw)
        while len(_CUT_CACHE) > 8:
            _CUT_CACHE.pop(next(iter(_CUT_CACHE)))
    return done


def _cut_strings(raw: bytes) -> bytes:
    count = struct.unpack_from("<Q", raw, 8)[0]
    pos, cut = 16, False
    strings = []
    for _ in range(count):
        n = struct.unpack_from("<Q", raw, pos)[0]
        s = raw[pos + 8 : pos + 8 + n]
        pos += 8 + n
        if b"\0" in s:
            s, cut = s.split(b"\0")[0], True
        strings.append(s)
    if not cut:
        return raw
    return raw[:4] + encode_value(GGUFValueType.ARRAY, strings, GGUFValueType.STRING)


def _n_dims_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape as gguf writes it: ggml_n_dims dims (trailing 1s dropped, at least one)."""
    dims = list(shape) or [1]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def tensor_nbytes(t: int, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
