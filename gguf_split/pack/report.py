"""What a pack run reports: the pack's bytes against its inputs', per codec and per distinct tensor (the
CLI's summary and the benchmark's tables read it)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType as Q

from .format import CODEC_DELTA, CODEC_FPLANES, CODEC_REQUANT
from .inventory import Inventory
from .planning import TensorPlan
from .records import Written


@dataclass
class CodecStat:
    count: int = 0
    input_bytes: int = 0  # bytes of the tensors (as they are in the files, once per distinct tensor)
    stored_bytes: int = 0  # bytes of their records in the pack (headers included)


@dataclass
class TensorStat:
    name: str
    ggml_type: str
    nbytes: int
    codec: str  # "zstd", "raw", "delta", "requant", "fplanes"
    stored_bytes: int
    occurrences: int
    rank: int | None = None
    base: str | None = None
    factor_type: str | None = None
    residual: str | None = None


@dataclass
class PackReport:
    path: str
    pack_bytes: int
    input_bytes: int
    files: list[tuple[str, int]]
    codecs: dict[str, CodecStat]  # "delta", "requant", "fplanes", "zstd", "raw", "ref" (repeats of a tensor
    #                               stored once), "headers"
    tensors: list[TensorStat]
    seconds: float

    @property
    def ratio(self) -> float:
        return self.pack_bytes / max(1, self.input_bytes)


def pack_report(out_path: str, pack_bytes: int, names: list[str], inv: Inventory, plans: list[TensorPlan],
                written: Written, seconds: float) -> PackReport:
    codecs: dict[str, CodecStat] = {k: CodecStat() for k in ("delta", "requant", "fplanes", "zstd", "raw", "ref",
                                                              "headers")}
    stats = [_tensor_stat(i, inv, plans, written, codecs) for i in range(len(inv.tensors))]
    hdr = codecs["headers"]
    for f in inv.files:
        hdr.input_bytes += f.size - sum(t.nbytes for t in f.header.tensors)
    hdr.count = len(inv.blobs)
    hdr.stored_bytes = sum(b.stored for b in written.blobs)
    return PackReport(out_path, pack_bytes, sum(f.size for f in inv.files),
                      [(n, f.size) for n, f in zip(names, inv.files)], codecs, stats, seconds)


def _tensor_stat(i: int, inv: Inventory, plans: list[TensorPlan], written: Written,
                 codecs: dict[str, CodecStat]) -> TensorStat:
    """Tensor i's line of the report, counted into `codecs`."""
    t, plan, rec = inv.tensors[i], plans[i], written.tensors[i]
    if plan.codec in (CODEC_DELTA, CODEC_REQUANT, CODEC_FPLANES):
        kind = plan.codec
    else:
        kind = "raw" if rec.all_stored_raw else "zstd"
    c = codecs[kind]
    c.count += 1
    c.input_bytes += t.geo.nbytes
    c.stored_bytes += rec.stored
    reps = t.occurrences - 1
    if reps:
        codecs["ref"].count += reps
        codecs["ref"].input_bytes += reps * t.geo.nbytes
    ts = TensorStat(t.names[0], Q(t.ggml_type).name, t.geo.nbytes, kind, rec.stored, t.occurrences)
    if plan.delta is not None and plan.base is not None:
        b = inv.tensors[plan.base]
        ts.rank, ts.base = plan.delta.rank, b.names[0] + f" ({Q(b.ggml_type).name})"
        ts.factor_type, ts.residual = plan.delta.factor_type, plan.delta.mode
    if plan.source is not None:
        s = inv.tensors[plan.source]
        ts.base = s.names[0] + f" ({Q(s.ggml_type).name})"
    return ts
