"""Long fuzz run: random mutations of real headers, gguf-split's records and commit journals, for a time budget.

    python bench/fuzz_header.py --seconds 60 [--seed 1] [--memory-gib 2]

The mutation engine and the targets are tests/test_fuzz.py's (one vocabulary for both): bit flips, byte
insertions and deletions, truncations, and overwrites of every integer field (lengths, counts, types, dims,
offsets, found by parsing) with huge or random values, applied to
- model: a small GGUFWriter model, fed to parse_header (bytes), GGUFFile + info + the loader's open_model;
- split: the same model mutated (header reshaped, or contents changed in place) and split beside a good
  one; a split that succeeds must verify and restore both inputs byte for byte;
- adaptor / shared: a real split's adaptor or shared file, either reshaped anywhere in the header or with
  only the contents of gguf-split's records changed (lengths kept, so the records get interpreted), half of
  them with the seal recomputed as a forger would; fed to plan_restore, verify, the runtime loader and
  info; when verify accepts them, restore must give the original byte for byte or refuse;
- journal: a pending commit's `.gguf-split-journal`, its bytes mutated; fed to verify, info, the loader,
  restore and `remove` (which rolls it forward); nothing outside the split directory may change.
The promise checked: only GGUFSplitError comes out, every oracle holds, and no input takes long (a loop
or an allocation on a claimed size would). The process address space is capped (RLIMIT_AS) so such an
allocation fails here instead of swapping. Inputs that raised anything else (or broke an oracle) are saved
to bench/work/fuzz-escapes/.

Printed: inputs run per target, how many were accepted, how many distinct error messages (numbers and
quoted names folded), the slowest input, and the mutated-input rate as a ratio of the rate on the
unmutated inputs measured in the same run (the baseline).
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "safety"))
import test_fuzz as engine  # noqa: E402  (tests/safety/test_fuzz.py: the mutation engine and the targets)

ESCAPES = HERE / "work" / "fuzz-escapes"


@dataclass
class Tally:
    inputs: int = 0
    accepted: int = 0
    messages: collections.Counter = field(default_factory=collections.Counter)
    escapes: list[str] = field(default_factory=list)
    slowest: float = 0.0


def fold(problem: str) -> str:
    """One message shape per distinct problem: quoted names, long tokens (ids, paths, damaged ones too),
    a role read from the file, and numbers folded."""
    problem = re.sub(r"b?'[^']*'", "'…'", problem)
    problem = re.sub(r"(is a gguf-split) \S+", r"\1 <role>", problem)
    problem = re.sub(r"\S{20,}", "<token>", problem)
    return re.sub(r"\d+", "N", problem)


def limit_memory(gib: float) -> None:
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def save_escape(data: bytes, name: str) -> Path:
    ESCAPES.mkdir(parents=True, exist_ok=True)
    path = ESCAPES / name
    path.write_bytes(data)
    return path


def run_one(tally: Tally, label: str, data: bytes, fn: Callable[[], list[str | None]]) -> None:
    tally.inputs += 1
    t0 = time.perf_counter()
    try:
        problems = fn()
    except Exception as e:  # noqa: BLE001 - anything but GGUFSplitError (or a broken oracle) is what we look for
        where = save_escape(data, f"{label}-{tally.inputs}.gguf")
        tb = traceback.extract_tb(e.__traceback__)[-1]
        tally.escapes.append(f"{type(e).__name__}: {e} at {tb.filename}:{tb.lineno} (input: {where})")
        return
    finally:
        tally.slowest = max(tally.slowest, time.perf_counter() - t0)
    if all(p is None for p in problems):
        tally.accepted += 1
    tally.messages.update(fold(p) for p in problems if p is not None)


def draw(rng: random.Random) -> list[engine.Op]:
    return [engine.random_op(rng) for _ in range(rng.randrange(1, 5))]


def mutate_journal(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(out) + 1)
        kind = rng.choice(("flip", "insert", "delete", "truncate"))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            out[at:at] = rng.choice((rng.randbytes(rng.randrange(1, 9)), b'"../x"', b'"/etc/passwd"', b"[", b"{"))
        elif kind == "delete":
            del out[at : at + rng.randrange(1, 9)]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


def one_input(rng: random.Random, corpus: engine.Corpus, work: Path, tallies: dict[str, Tally]) -> None:
    """Mutate one target at random and run it through its readers (and oracles)."""
    target = rng.choice(("model", "split", "adaptor", "shared", "journal"))
    if target == "model":
        data = corpus.model.mutated(draw(rng), contents_only=False)
        run_one(tallies["model"], "model", data, lambda: [engine.exercise_reader(data, work / "m.gguf")])
        return
    if target == "split":
        data = corpus.model.mutated(draw(rng), contents_only=rng.random() < 0.5)
        run_one(tallies["split"], "split", data, lambda: [engine.exercise_split(corpus, data, work / "split-run")])
        return
    if target == "journal":
        data = mutate_journal(rng, corpus.journal)
        run_one(tallies["journal"], "journal", data, lambda: engine.exercise_journal(corpus, data, work / "journal"))
        return
    contents_only = rng.random() < 0.5
    data = getattr(corpus, target).mutated(draw(rng), contents_only=contents_only)
    if rng.random() < 0.5:
        data = engine.reseal(data)
    pair = (data, corpus.shared.data) if target == "adaptor" else (corpus.adaptor.data, data)
    label = f"{target}-{'contents' if contents_only else 'shape'}"
    run_one(tallies[label], label, data, lambda: engine.exercise_split_files(corpus, *pair, work / "files"))


def baseline_rate(corpus: engine.Corpus, work: Path, seconds: float) -> float:
    """Unmutated inputs per second through the same readers (the run's baseline)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.exercise_reader(corpus.model.data, work / "m.gguf")
        engine.exercise_split_files(corpus, corpus.adaptor.data, corpus.shared.data, work / "files")
        n += 2
    return n / (time.perf_counter() - t0)


def report(tallies: dict[str, Tally], elapsed: float, base: float) -> int:
    total = sum(t.inputs for t in tallies.values())
    distinct = set().union(*(t.messages for t in tallies.values()))
    print(f"{total} mutated inputs in {elapsed:.1f} s: {total / elapsed:.0f}/s, "
          f"{total / elapsed / base:.2f}x the rate on unmutated inputs ({base:.0f}/s)")
    print(f"{'target':<20} {'inputs':>8} {'accepted':>9} {'messages':>9} {'slowest':>9} {'escapes':>8}")
    for label, t in tallies.items():
        print(f"{label:<20} {t.inputs:>8} {t.accepted:>9} {len(t.messages):>9} {t.slowest * 1000:>7.1f}ms "
              f"{len(t.escapes):>8}")
    print(f"{len(distinct)} distinct error messages in all; the most frequent:")
    merged = sum((t.messages for t in tallies.values()), collections.Counter())
    for msg, n in merged.most_common(8):
        print(f"  {n:>7}  {msg[:110]}")
    escapes = [e for t in tallies.values() for e in t.escapes]
    for e in escapes[:20]:
        print(f"ESCAPE {e}")
    print("no exception other than GGUFSplitError escaped" if not escapes else f"{len(escapes)} ESCAPES")
    return 1 if escapes else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget for the mutated inputs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--memory-gib", type=float, default=2.0, help="RLIMIT_AS of this process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-split-fuzz-") as tmp:
        corpus = engine.build_corpus(Path(tmp) / "corpus")
        work = Path(tmp) / "work"
        work.mkdir()
        limit_memory(args.memory_gib)
        base = baseline_rate(corpus, work, min(2.0, args.seconds / 10))
        rng = random.Random(args.seed)
        tallies = {k: Tally() for k in ("model", "split", "adaptor-shape", "adaptor-contents", "shared-shape",
                                        "shared-contents", "journal")}
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            one_input(rng, corpus, work, tallies)
        return report(tallies, time.perf_counter() - t0, base)


if __name__ == "__main__":
    sys.exit(main())
