"""The deterministic port of llama.cpp's quantizers (gguf_split.pack.requant: port, kernels, engine) and
the residual codec (requant.residual), against llama.cpp's own ggml_quantize_chunk (llama-cpp-python's libggml-base).

Oracles: llama.cpp's bytes for the same rows (both engines, with and without an importance matrix, on
distributions that hit the quantizers' edge cases); the two engines against each other; residual round
trips; the same bytes in subprocesses with numpy's SIMD dispatch restricted and with several threads;
the compiled kernels' machine code free of FMA instructions and float64 arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from gguf_split.pack import requant
from gguf_split.pack.requant import port, residual

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggml_oracle  # noqa: E402

needs_oracle = pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python's libggml-base missing")
needs_numba = pytest.mark.skipif(not requant.numba_available(), reason="numba not installed")

TYPES = sorted(requant.REQUANT_TYPES)
ENGINES = ["numpy", pytest.param("numba", marks=needs_numba)]
ROWS, N = 12, 512


def _distributions(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows that exercise the quantizers' branches: signs, zero rows and sub-blocks (including -0.0),
    constants, tiny and huge magnitudes, outliers, values on the float16 grid, small integers (ties)."""
    zeros = rng.standard_normal((ROWS, N))
    zeros[::3] = 0.0
    zeros[1::3, ::5] = 0.0
    zeros[2::6, :256] = -0.0
    outliers = rng.standard_normal((ROWS, N)) * 0.01
    outliers[rng.random((ROWS, N)) < 0.004] = 3.0
    constant = np.ones((ROWS, N))
    constant[1::2] *= -0.5
    return {
        "normal": rng.standard_normal((ROWS, N)),
        "laplace": rng.laplace(size=(ROWS, N)) * 0.02,
        "positive": np.abs(rng.standard_normal((ROWS, N))),
        "negative": -np.abs(rng.standard_normal((ROWS, N))),
        "zeros": zeros,
        "tiny": rng.standard_normal((ROWS, N)) * 1e-20,
        "huge": rng.standard_normal((ROWS, N)) * 1e4,
        "f16grid": (rng.standard_normal((ROWS, N)) * 0.05).astype(np.float16),
        "outliers": outliers,
        "constant": constant,
        "integers": rng.integers(-8, 8, (ROWS, N)),
    }


def _imatrices(rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    some_zero = rng.random(N).astype(np.float32)
    some_zero[rng.random(N) < 0.3] = 0.0  # columns the calibration never activated
    return {"none": None, "random": (rng.random(N) * 5).astype(np.float32), "some_zero": some_zero}


def _blocks_equal(a: np.ndarray, b: np.ndarray, qtype: int) -> float:
    _, ts = GGML_QUANT_SIZES[Q(qtype)]
    return float((a.reshape(-1, ts) == b.reshape(-1, ts)).all(axis=1).mean())


@needs_oracle
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_bytes_equal_llama_cpp(qtype: int, engine: str) -> None:
    rng = np.random.default_rng(int(qtype))
    ims = _imatrices(rng)
    for dname, x in _distributions(rng).items():
        x = np.asarray(x, dtype=np.float32)
        for iname, im in ims.items():
            ours = requant.quantize(x, qtype, im, engine=engine)
            ref = ggml_oracle.quantize(x, qtype, im)
            assert ours.shape == ref.shape
            assert np.array_equal(ours, ref), (
                f"{Q(qtype).name} {engine} {dname} imatrix={iname}: {_blocks_equal(ours, ref, qtype):.4%} blocks equal")


@needs_oracle
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_0, Q.Q3_K], ids=lambda t: Q(t).name)
def test_long_rows_and_one_row(qtype: int) -> None:
    """Row length matters for the legacy types' imatrix path (sigma2 over the whole row) and the
    super-block loop; one row of 4096 and rows of 256."""
    rng = np.random.default_rng(5)
    for shape in ((1, 4096), (40, 256)):
        x = (rng.standard_normal(shape) * 0.03).astype(np.float32)
        im = (rng.random(shape[1]) * 2).astype(np.float32)
        for imx in (None, im):
            assert np.array_equal(port.quantize_numpy(x, qtype, imx), ggml_oracle.quantize(x, qtype, imx))


@needs_numba
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_engines_agree_on_wide_values(qtype: int) -> None:
    """numpy and numba engines give the same bytes on values spread over many binades (no oracle needed)."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((16, 512)) * np.exp(rng.uniform(-12, 6, (16, 1)))).astype(np.float32)
    im = (rng.random(512) ** 3).astype(np.float32)
    for imx in (None, im):
        assert np.array_equal(requant.quantize(x, qtype, imx, engine="numpy"),
                              requant.quantize(x, qtype, imx, engine="numba"))


def test_threads_split_rows_without_changing_bytes() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    one = requant.quantize(x, Q.Q4_K, engine="numpy")
    assert np.array_equal(requant.quantize(x, Q.Q4_K, engine="numpy", threads=3), one)


def test_bad_arguments() -> None:
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(requant.RequantError, match="IQ4_XS"):
        requant.quantize(x, Q.IQ4_XS)
    with pytest.raises(requant.RequantError, match="not whole Q4_K blocks"):
        requant.quantize(np.zeros((2, 96), np.float32), Q.Q4_K)
    with pytest.raises(requant.RequantError, match="importance vector"):
        requant.quantize(x, Q.Q4_K, np.ones(10, np.float32))
    with pytest.raises(requant.RequantError, match="NaN"):
        requant.check_source(np.array([1.0, np.nan], np.float32))


def test_fp16_conversion_is_ggml_s() -> None:
    """ggml's float32 -> float16 on every float32 class: equal to IEEE round-to-nearest-even (numpy's
    cast) on finite values and infinities, NaN -> 0x7E00 with the sign."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001,
                        0x387FC000, 0x38800000, 0x7FC00001, 0xFFC00000], dtype=np.uint32)
    f = np.concatenate([bits, special]).view(np.float32)
    ours = port.fp32_to_fp16_bits(f)
    finite = ~np.isnan(f)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours[finite], f[finite].astype(np.float16).view(np.uint16))
    nan_bits = ours[~finite]
    assert np.all((nan_bits & 0x7FFF) == 0x7E00)


# ---------------------------------------------------------------------------------------------------------
# Residual codec


def _fake_publisher(pred: np.ndarray, x: np.ndarray, qtype: int, rng: np.random.Generator) -> np.ndarray:
    """The prediction with some blocks changed the way another build changes them: a header byte nudged
    (codes then re-derived from it, as that build's quantizer would) and a few code bytes flipped."""
    _, ts = GGML_QUANT_SIZES[Q(qtype)]
    t = pred.reshape(-1, ts).copy()
    head, _ = residual._header_cols(qtype)
    hit = rng.choice(t.shape[0], size=max(1, t.shape[0] // 20), replace=False)
    t[hit[: len(hit) // 2], head[-1]] ^= 1
    t = requant.codes_from_headers(x, t.reshape(pred.shape), qtype).reshape(-1, ts)
    t[hit[len(hit) // 2:], -1] ^= 0x10
    return t.reshape(pred.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_residual_round_trip(qtype: int) -> None:
    rng = np.random.default_rng(int(qtype) + 100)
    x = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    pred = port.quantize_numpy(x, qtype)
    # nothing differs: a bitmap of zero bits, nothing else
    buf, st = residual.encode_residual(x, pred, pred, qtype)
    assert st.flagged == 0 and len(buf) == (st.blocks + 7) // 8 and not any(buf)
    assert np.array_equal(residual.apply_residual(x, pred, buf, qtype), pred)
    target = _fake_publisher(pred, x, qtype, rng)
    buf, st = residual.encode_residual(x, target, pred, qtype)
    assert st.flagged == int((target.reshape(st.blocks, -1) != pred.reshape(st.blocks, -1)).any(axis=1).sum())
    assert np.array_equal(residual.apply_residual(x, pred, buf, qtype), target)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: Q(t).name)
def test_kquant_header_miss_costs_no_code_bytes(qtype: int) -> None:
    """A k-quant block whose scale alone differs (codes re-derived from it, as llama.cpp does) is coded
    as header bytes: its code planes are zero."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 1024)) * 0.02).astype(np.float32)
    pred = port.quantize_numpy(x, qtype)
    _, ts = GGML_QUANT_SIZES[Q(qtype)]
    head, codes = residual._header_cols(qtype)
    t = pred.reshape(-1, ts).copy()
    t[::3, head[-1]] ^= 1  # the last header byte: d's high byte or a scale byte
    target = requant.codes_from_headers(x, t.reshape(pred.shape), qtype)
    buf, st = residual.encode_residual(x, target, pred, qtype)
    assert st.codes_changed == 0 and st.flagged > 0
    nb = (st.blocks + 7) // 8
    assert not any(buf[nb + st.flagged * head.size:])
    assert np.array_equal(residual.apply_residual(x, pred, buf, qtype), target)


def test_codes_from_headers_is_the_quantizers_last_step() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 512)) * 0.02).astype(np.float32)
    for qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        pred = port.quantize_numpy(x, qtype)
        assert np.array_equal(requant.codes_from_headers(x, pred, qtype), pred)


def test_residual_refuses_damage() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    pred = port.quantize_numpy(x, Q.Q4_K)
    with pytest.raises(residual.ResidualError, match="shorter than its bitmap"):
        residual.apply_residual(x, pred, b"", Q.Q4_K)
    with pytest.raises(residual.ResidualError, match="past the chunk"):
        residual.apply_residual(x, pred, b"\x80", Q.Q4_K)
    with pytest.raises(residual.ResidualError, match="calls for"):
        residual.apply_residual(x, pred, b"\x01", Q.Q4_K)


# ---------------------------------------------------------------------------------------------------------
# Determinism across numpy dispatch, threads and compiled code

_DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from gguf_split.pack import requant
    engine, threads = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(99)
    x = (rng.standard_normal((24, 1024)) * 0.02).astype(np.float32)
    im = (rng.random(1024) * 3).astype(np.float32)
    h = hashlib.sha256()
    for t in sorted(requant.REQUANT_TYPES):
        for imx in (None, im):
            h.update(requant.quantize(x, t, imx, engine=engine, threads=threads).tobytes())
    print(h.hexdigest())
""")


def _digest(engine: str, threads: int, env: dict[str, str] | None = None) -> str:
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, engine, str(threads)], env=e, capture_output=True,
                       text=True, check=True)
    return r.stdout.strip()


def _baseline_cpu_features() -> str:
    """Every SIMD feature numpy dispatches on this machine above the x86-64 baseline."""
    import numpy._core._multiarray_umath as mu  # type: ignore[import-not-found]
    feats = [k for k, v in mu.__cpu_features__.items() if v and k not in ("SSE", "SSE2", "SSE3")]
    dispatch = set(getattr(mu, "__cpu_dispatch__", []))
    return " ".join(f for f in feats if f in dispatch)


def test_same_bytes_with_numpy_simd_dispatch_restricted_and_threads() -> None:
    base = _digest("numpy", 1)
    disabled = _baseline_cpu_features()
    if disabled:
        assert _digest("numpy", 1, {"NPY_DISABLE_CPU_FEATURES": disabled}) == base
    assert _digest("numpy", 2) == base


@needs_numba
def test_numba_engine_matches_numpy_in_a_subprocess() -> None:
    assert _digest("numba", 2) == _digest("numpy", 1)


@needs_numba
def test_numba_engine_compiled_for_a_generic_cpu_gives_the_same_bytes(tmp_path: Path) -> None:
    """The lane searches compiled for baseline x86-64 / a generic CPU (4-wide SSE2 or none, instead of
    this machine's AVX2 or AVX-512): another vector width, the same bytes. A fresh cache, so the kernels
    are compiled for that target."""
    generic = {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    assert _digest("numba", 1, generic) == _digest("numpy", 1)


_INSPECT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from gguf.constants import GGMLQuantizationType as Q
    from gguf_split.pack import requant
    from gguf_split.pack.requant import kernels
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    bad = []
    # every helper: roundf and fp16 (Q8_0); the lane searches make_q3/qx_quants (Q3_K), make_qkx/qp_quants
    # (Q4_K); compiling all ten afresh takes minutes
    for name in ("Q8_0", "Q3_K", "Q4_K"):
        kernel = kernels.KERNELS[name]
        out = np.zeros((2, requant.row_bytes(Q[name], 256)), np.uint8)
        kernel(x, out, np.ones(256, np.float32), True)
        kernel(x, out, np.zeros(256, np.float32), False)
        for sig in kernel.signatures:
            asm = kernel.inspect_asm(sig)
            ir = kernel.inspect_llvm(sig)
            if "divss" not in asm:  # not the real code (e.g. loaded from a cache, where inspection is empty)
                bad.append(name + ": no float32 division in the machine code")
            if name != "Q8_0" and "divps" not in asm:  # the lane searches' divisions, vectorised
                bad.append(name + ": the lane searches are not in the machine code, or not vectorised")
            bad += [f"{name}: {op}" for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub") if op in asm]
            bad += [f"{name}: {op}" for op in ("fadd double", "fsub double", "fmul double", "fdiv double",
                                               "llvm.fma", "llvm.fmuladd", " contract ", " fast ", " reassoc ")
                    if op in ir]
    print("\\n".join(bad) or "ok")
""")


@needs_numba
def test_compiled_kernels_have_no_fma_and_no_float64(tmp_path: Path) -> None:
    """fastmath off must mean no fused multiply-add in the machine code (LLVM contracts only with the
    `contract` flag) and no float64 arithmetic in the IR (a float32 op int64 would widen). Compiled afresh
    in a subprocess with an empty cache (numba cannot inspect cached code)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _INSPECT_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "ok", r.stdout


@needs_oracle
@needs_numba
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_numba_engine_over_many_tiles(qtype: int) -> None:
    """Units (super-blocks, blocks) well past one tile and not a multiple of it, rows of several units:
    the tiles' gathering, the partial last tile and the importance vector's columns."""
    rng = np.random.default_rng(int(qtype) + 7)
    x = (rng.standard_normal((37, 1280)) * np.exp(rng.uniform(-3, 1, (37, 1)))).astype(np.float32)
    x[5, 256:512] = 0.0
    im = (rng.random(1280) ** 2).astype(np.float32)
    for imx in (None, im):
        assert np.array_equal(requant.quantize(x, qtype, imx, engine="numba"), ggml_oracle.quantize(x, qtype, imx))
