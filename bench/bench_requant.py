"""Re-derived quantizations (issue 22): how often our deterministic port (`gguf_split.pack.requant`) gives
llama.cpp's bytes on real model ladders, what the residual of a published quant costs, how fast the port
runs (numpy, numba, llama.cpp itself) and how small the F16/BF16 source can be coded.

    python bench/bench_requant.py ladder              # make the model ladders (once; llama-cpp-python)
    python bench/bench_requant.py match [--fma LIB]   # per type: blocks equal to the quant, residual bytes
    python bench/bench_requant.py speed               # elements/s and output MB/s per type, 1 and 2 threads
    python bench/bench_requant.py ladder-speed        # the unpacking work of a whole ladder (F16 + 5 quants)
    python bench/bench_requant.py source              # F16/BF16 source coding ratios and decode speed
    python bench/bench_requant.py all

Ladders (under $GGUF_SPLIT_BENCH_WORK/requant/<model>/, default bench/work): the bench models (Gemma-3-270M
Q4_K_M, SmolLM2-135M Q4_1) requantized to F16 and BF16 by llama.cpp's own `llama_model_quantize`
(llama-cpp-python, allow_requantize), then F16 -> Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, Q5_0,
Q4_1, and Q4_K_M / Q5_K_M / Q6_K again with a synthetic importance matrix (`imat-*`). Caveat: these
sources are dequantized quants (few distinct values per block), not trained F16 weights; the match rates
do not depend on that, the source-coding ratios do (`source` also measures a real trained float32
network when one is given with --real).

`--fma LIB`: the "published" quant is re-made tensor by tensor with another libggml-base (e.g. one built
with `-march=haswell -ffp-contract=fast`, i.e. FMA-contracting, as ARM/Apple and older native x86 builds
are), with the types read from the real quant file; that measures what a build whose rounding differs
costs in residual bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import GEMMA3, SMOLLM2, WORK, model_path  # noqa: E402
from ggufhdr import read_header  # noqa: E402

import ggml_oracle  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402
from gguf_split.pack import requant  # noqa: E402
from gguf_split.pack.requant import residual as requant_codec  # noqa: E402

OUT = WORK / "requant"
CHUNK_ELEMS = 1 << 20  # the pack's chunking (codec.CHUNK_ELEMS)
ZLEVEL = 19

# name -> llama_ftype (llama.h); imat-* are made with the synthetic importance matrix
LADDER: dict[str, int] = {"F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2,
                          "Q3_K_M": 12, "Q2_K": 10, "Q5_0": 8, "Q4_1": 3,
                          "imat-Q6_K": 18, "imat-Q5_K_M": 17, "imat-Q4_K_M": 15}


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Ladders


def synthetic_imatrix(hdr: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Per 2-D weight tensor, a positive importance vector of ne0 values (mean squared activations of a
    heavy-tailed random input: a few columns far more important, like real ones)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in hdr.tensors:
        if len(t.ne) >= 2 and t.name.endswith(".weight") and "norm" not in t.name and "token_embd" not in t.name:
            out[t.name] = (rng.standard_t(3, size=t.ne[0]) ** 2 + 0.05).astype(np.float32)
    return out


def quantize_file(src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = ftype
    p.allow_requantize = True
    keep: list[Any] = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vec) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(vec, dtype=np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed ({rc})")
    os.replace(tmp, dst)


def make_ladder(model: str) -> Path:
    d = OUT / model
    d.mkdir(parents=True, exist_ok=True)
    src = model_path(model)
    for name in ("F16", "BF16"):
        if not (d / f"{name}.gguf").exists():
            log(f"{model}: {name} from {src.name}")
            quantize_file(src, d / f"{name}.gguf", LADDER[name])
    hdr = read_header(str(d / "F16.gguf"))
    imat = synthetic_imatrix(hdr)
    np.savez(d / "imatrix.npz", **imat)
    for name, ftype in LADDER.items():
        if name in ("F16", "BF16") or (d / f"{name}.gguf").exists():
            continue
        log(f"{model}: {name}")
        t0 = time.time()
        quantize_file(d / "F16.gguf", d / f"{name}.gguf", ftype, imat if name.startswith("imat-") else None)
        log(f"  {time.time() - t0:.1f} s")
    return d


# ---------------------------------------------------------------------------------------------------------
# Tensor access


class Model:
    """A GGUF file's tensors as numpy views of a memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hdr = read_header(str(path))
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.by_name = {t.name: t for t in self.hdr.tensors}

    def raw(self, name: str) -> np.ndarray:
        t = self.by_name[name]
        start = self.hdr.data_start + t.offset
        return self.buf[start:start + t.nbytes]

    def rows(self, name: str) -> tuple[int, int]:
        t = self.by_name[name]
        return int(np.prod(t.ne[1:])) if len(t.ne) > 1 else 1, t.ne[0]

    def float_rows(self, name: str) -> np.ndarray:
        """The tensor as float32 rows (F16/BF16/F32 exactly, as llama-quantize converts)."""
        t = self.by_name[name]
        n_rows, n = self.rows(name)
        raw = self.raw(name)
        if t.ggml_type == Q.F32:
            return raw.view(np.float32).reshape(n_rows, n)
        if t.ggml_type == Q.F16:
            return raw.view(np.float16).astype(np.float32).reshape(n_rows, n)
        if t.ggml_type == Q.BF16:
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n_rows, n)
        raise ValueError(f"{name}: type {t.ggml_type} is not a float source")


def chunks(n_rows: int, n: int) -> Iterator[tuple[int, int]]:
    k = max(1, CHUNK_ELEMS // n)
    for r0 in range(0, n_rows, k):
        yield r0, min(n_rows, r0 + k)


# ---------------------------------------------------------------------------------------------------------
# Match rates and residuals


def match(models: list[str], fma: str | None, threads: int, names: list[str] | None,
          ignore_imatrix: bool = False) -> dict[str, Any]:
    fmalib = ggml_oracle.load(fma) if fma else None
    results: dict[str, Any] = {}
    for model in models:
        d = OUT / model
        src = Model(d / "F16.gguf")
        imat = dict(np.load(d / "imatrix.npz"))
        for qname in (names or [k for k in LADDER if k not in ("F16", "BF16")]):
            path = d / f"{qname}.gguf"
            if not path.exists():
                continue
            qm = Model(path)
            per_type: dict[str, dict[str, int]] = {}
            not_requant: dict[str, int] = {}
            t0 = time.time()
            for t in qm.hdr.tensors:
                qt = Q(t.ggml_type)
                if qt not in requant.REQUANT_TYPES:
                    not_requant[qt.name] = not_requant.get(qt.name, 0) + t.nbytes
                    continue
                n_rows, n = qm.rows(t.name)
                x_all = src.float_rows(t.name)
                im = imat.get(t.name) if qname.startswith("imat-") and not ignore_imatrix else None
                target_all = qm.raw(t.name).reshape(n_rows, -1)
                acc = per_type.setdefault(qt.name, {"bytes": 0, "blocks": 0, "flagged": 0, "header": 0,
                                                    "codes": 0, "residual": 0, "xor_residual": 0})
                _, ts = GGML_QUANT_SIZES[qt]
                for r0, r1 in chunks(n_rows, n):
                    x = np.ascontiguousarray(x_all[r0:r1])
                    pred = requant.quantize(x, qt, im, threads=threads)
                    im_pub = imat.get(t.name) if qname.startswith("imat-") else None
                    target = (ggml_oracle.quantize(x, qt, im_pub, lib=fmalib) if fmalib is not None
                              else np.asarray(target_all[r0:r1]))
                    buf, st = requant_codec.encode_residual(x, target, pred, qt)
                    z = zstandard.ZstdCompressor(level=ZLEVEL).compress(buf)
                    assert np.array_equal(requant_codec.apply_residual(x, pred, buf, qt), target)
                    fl = (target.reshape(-1, ts) != pred.reshape(-1, ts)).any(axis=1)
                    naive = np.packbits(fl).tobytes() + (target.reshape(-1, ts)[fl] ^ pred.reshape(-1, ts)[fl]).T.tobytes()
                    acc["bytes"] += target.nbytes
                    acc["blocks"] += st.blocks
                    acc["flagged"] += st.flagged
                    acc["header"] += st.header_changed
                    acc["codes"] += st.codes_changed
                    acc["residual"] += len(z)
                    acc["xor_residual"] += len(zstandard.ZstdCompressor(level=ZLEVEL).compress(naive))
            total_q = sum(v["bytes"] for v in per_type.values())
            total_r = sum(v["residual"] for v in per_type.values())
            log(f"{model} {qname}{' (FMA build)' if fma else ''}: {total_q / 1e6:.1f} MB of requantizable tensors, "
                f"residual {total_r} B = {100 * total_r / max(1, total_q):.4f} %  ({time.time() - t0:.0f} s); "
                f"other tensors: {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in not_requant.items()) or '-'}")
            for tn, v in sorted(per_type.items()):
                log(f"    {tn:5s} {v['bytes'] / 1e6:8.1f} MB  blocks equal {100 * (1 - v['flagged'] / v['blocks']):8.4f} %  "
                    f"header misses {v['header']:6d} code misses {v['codes']:6d}  residual {100 * v['residual'] / v['bytes']:.4f} %"
                    f"  (whole-block xor {100 * v['xor_residual'] / v['bytes']:.4f} %)")
            results[f"{model}/{qname}"] = {"per_type": per_type, "other": not_requant}
    return results


# ---------------------------------------------------------------------------------------------------------
# Speed


def _best_of(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _oracle_threads(x: np.ndarray, qt: int, im: np.ndarray | None, threads: int) -> np.ndarray:
    if threads == 1:
        return ggml_oracle.quantize(x, qt, im)
    b = np.linspace(0, x.shape[0], threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL
        parts = list(pool.map(lambda ab: ggml_oracle.quantize(x[ab[0]:ab[1]], qt, im), zip(b[:-1], b[1:])))
    return np.concatenate(parts)


def speed(model: str, numpy_too: bool, repeat: int) -> dict[str, Any]:
    d = OUT / model
    src = Model(d / "F16.gguf")
    # a realistic sample: the first attention and FFN matrices (about 3M elements)
    names = [t.name for t in src.hdr.tensors if t.name.startswith("blk.0.") and len(t.ne) == 2]
    x = np.concatenate([src.float_rows(n).reshape(-1, 256) for n in names])[: (3 << 20) // 256]
    x = np.ascontiguousarray(x.reshape(-1, 1024)) if x.shape[0] % 4 == 0 else np.ascontiguousarray(x)
    im = (np.random.default_rng(0).standard_t(3, size=x.shape[1]) ** 2 + 0.05).astype(np.float32)
    res: dict[str, Any] = {}
    log(f"speed on {x.size / 1e6:.1f} M elements of {model} ({len(names)} tensors of block 0), best of {repeat}")
    log(f"{'type':10s} {'engine':8s} {'1 thread':>22s} {'2 threads':>22s}")
    for qt in sorted(requant.REQUANT_TYPES):
        for imx in (None, im):
            label = qt.name + ("+imat" if imx is not None else "")
            out_bytes = x.shape[0] * requant.row_bytes(qt, x.shape[1])
            engines: dict[str, Callable[[int], Any]] = {
                "llama.cpp": lambda th: _oracle_threads(x, qt, imx, th),
                "numba": lambda th: requant.quantize(x, qt, imx, engine="numba", threads=th),
            }
            if numpy_too:
                engines["numpy"] = lambda th: requant.quantize(x, qt, imx, engine="numpy", threads=th)
            ref = ggml_oracle.quantize(x, qt, imx)
            for eng, fn in engines.items():
                assert np.array_equal(fn(1), ref), (label, eng)
                cells = []
                for th in (1, 2):
                    t = _best_of(lambda: fn(th), repeat if eng != "numpy" else 1)
                    cells.append(f"{x.size / t / 1e6:6.1f} Me/s {out_bytes / t / 1e6:6.1f} MB/s")
                    res[f"{label}/{eng}/{th}"] = {"elems_per_s": x.size / t, "out_MB_per_s": out_bytes / t / 1e6}
                log(f"{label:10s} {eng:8s} {cells[0]:>22s} {cells[1]:>22s}")
    return res


# ---------------------------------------------------------------------------------------------------------
# Source coding


def _rows2d(a: np.ndarray) -> np.ndarray:
    """A weight as (rows, ne0): numpy's last dimension is GGUF's ne0; vectors are one row."""
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


def _bf16(f: np.ndarray) -> np.ndarray:
    b = f.view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def source(models: list[str], real: list[Path], ladders: bool = True) -> dict[str, Any]:
    """F16/BF16 source coding. The ladders' sources are dequantized quants (few distinct values per
    block: far more compressible than trained weights); `real` .npz files of trained float32 weights are
    the figures that count."""
    from gguf_split.pack.source import planes
    res: dict[str, Any] = {}
    sets: list[tuple[str, str, list[np.ndarray]]] = []
    for model in models if ladders else []:
        d = OUT / model
        for kind in ("F16", "BF16"):
            m = Model(d / f"{kind}.gguf")
            parts = [np.asarray(m.raw(t.name)).view(np.uint16).reshape(-1, t.ne[0]) for t in m.hdr.tensors
                     if t.ggml_type in (Q.F16, Q.BF16)]
            sets.append((f"{model} {kind} (dequantized quant: not a real source)", kind, parts))
    for path in real:
        w = np.load(path)
        f32s = [_rows2d(w[k].astype(np.float32)) for k in w.files]
        sets.append((f"{path.stem} F16 (trained fp32 -> f16)", "F16", [f.astype(np.float16).view(np.uint16) for f in f32s]))
        sets.append((f"{path.stem} BF16 (trained fp32 -> bf16)", "BF16", [_bf16(f) for f in f32s]))
    for label, kind, bits in sets:
        log(f"{label}: {sum(b.nbytes for b in bits) / 1e6:.1f} MB in {len(bits)} tensors")
        res[label] = planes.compare(bits, kind, log=log)
    return res


def ladder_speed(model: str, rungs: list[str], threads: int, engine: str) -> dict[str, Any]:
    """The unpacking work of a ladder: re-quantize every requantizable tensor of each rung from the F16
    source (F16 -> float32 included), timed; plus the F16 source itself through fplanes decode."""
    from gguf_split.pack.source import planes

    d = OUT / model
    src = Model(d / "F16.gguf")
    res: dict[str, Any] = {}
    total_out = 0
    total_t = 0.0
    f16_bits = np.concatenate([np.asarray(src.raw(t.name)).view(np.uint16) for t in src.hdr.tensors
                               if t.ggml_type == Q.F16])
    bodies = [planes.encode(f16_bits[i:i + CHUNK_ELEMS], "F16", 3) for i in range(0, f16_bits.size, CHUNK_ELEMS)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda ib: planes.decode(ib[1], "F16", min(CHUNK_ELEMS, f16_bits.size - ib[0] * CHUNK_ELEMS)),
                      enumerate(bodies)))
    t = time.perf_counter() - t0
    log(f"{model} F16 source {f16_bits.nbytes / 1e6:.0f} MB: fplanes decode {t:.1f} s, {f16_bits.nbytes / t / 1e6:.0f} MB/s")
    total_out += f16_bits.nbytes
    total_t += t
    for rung in rungs:
        qm = Model(d / f"{rung}.gguf")
        out_bytes = 0
        per_type: dict[str, float] = {}
        t0 = time.perf_counter()
        for tt in qm.hdr.tensors:
            qt = Q(tt.ggml_type)
            if qt not in requant.REQUANT_TYPES:
                continue
            n_rows, n = qm.rows(tt.name)
            x_all = src.float_rows(tt.name)
            t1 = time.perf_counter()
            for r0, r1 in chunks(n_rows, n):
                requant.quantize(np.ascontiguousarray(x_all[r0:r1]), qt, engine=engine, threads=threads)
            per_type[qt.name] = per_type.get(qt.name, 0.0) + time.perf_counter() - t1
            out_bytes += tt.nbytes
        t = time.perf_counter() - t0
        log(f"{model} {rung}: {out_bytes / 1e6:.0f} MB re-quantized in {t:.1f} s = {out_bytes / t / 1e6:.1f} MB/s "
            f"({threads} threads; " + ", ".join(f"{k} {v:.1f} s" for k, v in per_type.items()) + ")")
        res[rung] = {"bytes": out_bytes, "seconds": t, "per_type_s": per_type}
        total_out += out_bytes
        total_t += t
    log(f"{model} ladder: {total_out / 1e6:.0f} MB of output in {total_t:.1f} s = {total_out / total_t / 1e6:.1f} MB/s")
    res["total"] = {"bytes": total_out, "seconds": total_t}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("ladder", "match", "speed", "ladder-speed", "source", "all"))
    ap.add_argument("--engine", default="numba")
    ap.add_argument("--models", nargs="+", default=[GEMMA3, SMOLLM2])
    ap.add_argument("--quants", nargs="+", default=None, help="ladder rungs to check (default: all)")
    ap.add_argument("--fma", default=None, help="libggml-base built differently: the 'publisher' for match")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numpy", action="store_true", help="also time the numpy engine (slow)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real", type=Path, nargs="*", default=[], help=".npz files of trained float32 weights for `source`")
    ap.add_argument("--real-only", action="store_true", help="`source`: only the --real weights")
    ap.add_argument("--ignore-imatrix", action="store_true",
                    help="`match`: re-quantize imat-* rungs without their importance matrix (the cost of not having it)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out: dict[str, Any] = {}
    if a.what in ("ladder", "all"):
        for m in a.models:
            make_ladder(m)
    if a.what in ("match", "all"):
        out["match"] = match(a.models, a.fma, a.threads, a.quants, a.ignore_imatrix)
    if a.what in ("speed", "all"):
        out["speed"] = speed(a.models[0], a.numpy, a.repeat)
    if a.what in ("ladder-speed", "all"):
        out["ladder_speed"] = ladder_speed(a.models[0], a.quants or ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"],
                                           a.threads, a.engine)
    if a.what in ("source", "all"):
        out["source"] = source(a.models, a.real, not a.real_only)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
