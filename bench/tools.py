"""llama.cpp's own tools for the benchmarks: llama-server, llama-cli, llama-gguf-split, llama-quantize,
llama-export-lora, llama-imatrix; and ggufpacker, the quant-ladder packer, in a virtualenv of its own.

Built once from the llama.cpp source that llama-cpp-python's source distribution carries (the same
llama.cpp the `llama` extra runs in-process), so the tools and the Python binding agree on the format:

- the sdist `llama_cpp_python-<LLAMA_CPP_PYTHON>.tar.gz` is fetched with
  `pip download --no-binary :all: --no-deps` into `<work>/sdist/` (once) and its `vendor/llama.cpp`
  unpacked to `<work>/llama.cpp/src/`;
- cmake Release, CPU only, static libraries, no HTTPS (`LLAMA_OPENSSL=OFF`; curl is gone from this
  llama.cpp), no web UI (neither npm nor the prebuilt download: the server's UI table stays empty), no tests
  or examples; only the six targets of TOOLS are built, `-j2` (this machine has 2 cores);
- binaries land in `<work>/llama.cpp/build/bin/`, where `<work>` is `$GGUF_SPLIT_BENCH_WORK` or
  `bench/work/` (see common.py).

`GGUF_SPLIT_LLAMA_BIN=/some/bin` uses an existing directory of these binaries instead (nothing is built;
a missing tool is an error).

ggufpacker (PyPI, GGUFPACKER pinned) re-derives quantizations by running llama-quantize, so the ladder
benchmarks use it as their yardstick. It needs Python >= 3.11 and its own dependencies, so it lives in a
virtualenv of its own, `<work>/ggufpacker-venv/`, never in the project's: `ggufpacker_bin()` creates it once
(`pip install ggufpacker==<GGUFPACKER>`) and returns the command's path.

    python bench/tools.py              # build if needed, print the paths
    python bench/tools.py --rebuild    # configure and build again
    python bench/tools.py --ggufpacker # install ggufpacker if needed, print its path and version
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-server", "llama-cli", "llama-gguf-split", "llama-quantize", "llama-export-lora", "llama-imatrix")
ENV_BIN = "GGUF_SPLIT_LLAMA_BIN"

ROOT = WORK / "llama.cpp"
SRC = ROOT / "src"
BUILD = ROOT / "build"
STAMP = ROOT / "build-info.json"

GGUFPACKER = "0.4.2"
GGUFPACKER_VENV = WORK / "ggufpacker-venv"

CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",        # self-contained binaries: no clash with llama-cpp-python's libllama.so
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",           # no npm build of the web UI
    "-DLLAMA_USE_PREBUILT_UI=OFF",    # and no download of it (no network here)
    "-DLLAMA_OPENSSL=OFF",            # no HTTPS: the tools read local files only
    "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DGGML_BLAS=OFF",
]


def _sdist() -> Path:
    dest = WORK / "sdist"
    tgz = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tgz.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        "-d", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    return tgz


def _unpack() -> None:
    if (SRC / "CMakeLists.txt").exists():
        return
    tgz = _sdist()
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    tmp = ROOT / "src.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tgz) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    tmp.rename(SRC)


def build(rebuild: bool = False, jobs: int = 2) -> Path:
    """Configure and build the tools of TOOLS; returns the bin directory. Times the steps into build-info.json."""
    _unpack()
    if rebuild:
        shutil.rmtree(BUILD, ignore_errors=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.perf_counter()
    subprocess.run(["cmake", "-S", str(SRC), "-B", str(BUILD), *gen, *CMAKE_OPTIONS], check=True)
    t1 = time.perf_counter()
    subprocess.run(["cmake", "--build", str(BUILD), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True)
    t2 = time.perf_counter()
    bindir = BUILD / "bin"
    missing = [t for t in TOOLS if not (bindir / t).exists()]
    if missing:
        raise SystemExit(f"build finished but {missing} are missing from {bindir}")
    info = {"llama_cpp_python": LLAMA_CPP_PYTHON, "configure_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1),
            "jobs": jobs, "cmake_options": CMAKE_OPTIONS, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cores": os.cpu_count()}
    STAMP.write_text(json.dumps(info, indent=1))
    return bindir


def bin_dir(build_if_missing: bool = True) -> Path:
    """Directory holding the tools of TOOLS: $GGUF_SPLIT_LLAMA_BIN, else the cached build (built on first use)."""
    env = os.environ.get(ENV_BIN)
    if env:
        d = Path(env)
        missing = [t for t in TOOLS if not (d / t).is_file()]
        if missing:
            raise SystemExit(f"{ENV_BIN}={env}: missing {', '.join(missing)}")
        return d
    d = BUILD / "bin"
    if all((d / t).is_file() for t in TOOLS) and STAMP.exists():
        return d
    if not build_if_missing:
        raise SystemExit(f"llama.cpp tools not built: run python bench/tools.py (or set {ENV_BIN})")
    return build()


def tool(name: str) -> Path:
    """Path of one tool, e.g. tool("llama-export-lora")."""
    if name not in TOOLS:
        raise ValueError(name)
    return bin_dir() / name


def ggufpacker_bin() -> Path:
    """The `ggufpacker` command of a virtualenv of its own under <work>, made on first use.

    A stamp file written after a successful install marks the venv complete: an interrupted install is
    redone from scratch rather than half-used. The venv is made from the running interpreter (>= 3.11)."""
    exe = GGUFPACKER_VENV / "bin" / "ggufpacker"
    stamp = GGUFPACKER_VENV / f"installed-ggufpacker-{GGUFPACKER}"
    if stamp.exists() and exe.is_file():
        return exe
    if sys.version_info < (3, 11):
        raise SystemExit(f"ggufpacker {GGUFPACKER} needs Python >= 3.11 (this is {sys.version.split()[0]})")
    shutil.rmtree(GGUFPACKER_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(GGUFPACKER_VENV)], check=True)
    pip = [str(GGUFPACKER_VENV / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", f"ggufpacker=={GGUFPACKER}"], check=True)
    freeze = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout
    stamp.write_text(freeze)
    return exe


def ggufpacker_version() -> str:
    """`ggufpacker --version` of the venv's command, e.g. "ggufpacker 0.4.2"."""
    r = subprocess.run([str(ggufpacker_bin()), "--version"], check=True, capture_output=True, text=True)
    return (r.stdout or r.stderr).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="remove the build directory and build again")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--ggufpacker", action="store_true", help="install ggufpacker (own venv) and print its path")
    args = ap.parse_args()
    if args.ggufpacker:
        print(ggufpacker_bin())
        print(ggufpacker_version())
        return
    if args.rebuild or (not os.environ.get(ENV_BIN) and not all((BUILD / "bin" / t).is_file() for t in TOOLS)):
        d = build(rebuild=args.rebuild, jobs=args.jobs)
    else:
        d = bin_dir()
    for t in TOOLS:
        print(d / t)
    if STAMP.exists() and not os.environ.get(ENV_BIN):
        info = json.loads(STAMP.read_text())
        print(f"# built {info['date']} from llama-cpp-python {info['llama_cpp_python']} sdist: configure "
              f"{info['configure_s']} s, build {info['build_s']} s (-j{info['jobs']}, {info['cores']} cores)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
