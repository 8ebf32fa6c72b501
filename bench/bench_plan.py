"""Planner benchmark: plan_layout's time on synthetic identities, against a baseline measured in the same run
(the time to build the per-version user sets, the least any planner must do), and its result against the
dedup optimum.

    python bench/bench_plan.py            # all cases
    python bench/bench_plan.py --quick    # fewer repeats

Cases:
- many: 64 tasks x 2,000 tiny tensors (8 families of 8 tasks; a family shares 100 changed tensors, each
  task changes 30 of its own, pairs of neighbours share 10 more), default file cost, under caps, free files;
- old: 16 tasks x 1,446 tensors (the size that took the old quadratic planner 16.5 s);
- realistic: a 7B-like model (291 tensors, 32 layers, ~13.5 GB) with 4..20 export-lora-style fine-tunes
  (chat: attn_q/v everywhere; code: top-quarter FFN; summarize: output.weight + top attn_q; variants of
  each), uncapped and capped, and sharded at 20 GB.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from gguf_split.assemble import plan as P

TensorId = P.TensorId
MB = 1e6


def tid(name: str, version: int, nbytes: int, ggml_type: int = 1) -> TensorId:
    return TensorId(name, ggml_type, (nbytes,), version.to_bytes(16, "little"), nbytes)


def many(tasks: int = 64, tensors: int = 2000, seed: int = 1) -> dict[str, list[TensorId]]:
    rng = random.Random(seed)
    sizes = [rng.choice((256, 1024, 4096, 16384, 65536)) for _ in range(tensors)]
    base = [tid(f"t{i}", 0, sizes[i]) for i in range(tensors)]
    models = {}
    for k in range(tasks):
        fam = k // 8
        ts = list(base)
        for i in random.Random(100 + fam).sample(range(tensors), 100):  # the family's change
            ts[i] = tid(ts[i].name, 1000 + fam, sizes[i])
        for i in random.Random(200 + k // 2).sample(range(tensors), 10):  # shared with the neighbour
            ts[i] = tid(ts[i].name, 2000 + k // 2, sizes[i])
        for i in rng.sample(range(tensors), 30):  # its own
            ts[i] = tid(ts[i].name, 3000 + k, sizes[i])
        models[f"task{k:02d}"] = ts
    return models


def realistic(n: int, layers: int = 32) -> dict[str, list[TensorId]]:
    d, ff, vocab = 4096, 11008, 32000
    q = lambda a, b: a * b * 9 // 16  # Q4_K-ish bytes per weight
    base = [tid("token_embd.weight", 0, q(d, vocab))]
    for i in range(layers):
        base += [tid(f"blk.{i}.attn_norm.weight", 0, 4 * d)] + \
            [tid(f"blk.{i}.attn_{k}.weight", 0, q(d, d)) for k in ("q", "k", "v", "output")] + \
            [tid(f"blk.{i}.ffn_norm.weight", 0, 4 * d)] + \
            [tid(f"blk.{i}.ffn_{k}.weight", 0, q(d, ff)) for k in ("gate", "up", "down")]
    base += [tid("output_norm.weight", 0, 4 * d), tid("output.weight", 0, q(d, vocab))]

    def change(ts, pred, v):
        return [TensorId(x.name, 1, x.shape, v.to_bytes(16, "little"), x.nbytes * 2) if pred(x.name) else x
                for x in ts]

    def lay(nm):
        return int(nm.split(".")[1]) if nm.startswith("blk.") else -1
    models = {"base": base}
    kinds = [
        lambda v: change(base, lambda nm: ".attn_q." in nm or ".attn_v." in nm, v),  # chat
        lambda v: change(base, lambda nm: ".ffn_" in nm and "norm" not in nm and lay(nm) >= layers * 3 // 4, v),  # code
        lambda v: change(base, lambda nm: nm in ("output.weight", f"blk.{layers - 1}.attn_q.weight"), v),  # summarize
    ]
    for k in range(n - 1):
        models[f"ft{k:02d}"] = kinds[k % 3](100 + k)
    return models


def timeit(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def baseline(models) -> None:
    users: dict[TensorId, int] = {}
    for i, ts in enumerate(models.values()):
        bit = 1 << i
        for x in ts:
            users[x] = users.get(x, 0) | bit


# gguf-split's defaults since issue 19: groups cut by role and blocks of layers, at most 32 files per task
TOOL = dict(cut=P.DEFAULT_CUT, max_shared_files=P.DEFAULT_MAX_SHARED_FILES, max_files=P.DEFAULT_MAX_SHARED_FILES)
GOAL_S = 1.0  # issue: 64 synthetic tasks x 2,000 tiny tensors plan and report in under 1 s


def row(label: str, models, repeat: int, **kw) -> None:
    base_t = timeit(lambda: baseline(models), repeat)
    lay = None

    def run():
        nonlocal lay
        lay = P.plan_layout(models, **kw)
    t = timeit(run, repeat)
    st = lay.stats
    ntensors = sum(len(v) for v in models.values())
    holes = sum(f.kind == P.HOLE for f in lay.files)
    maxk = max(len(v) for v in lay.task_files.values())
    print(f"{label:<48} {len(models):>3} x {ntensors // len(models):>5}  {t * 1000:8.1f} ms  "
          f"{t / base_t:6.1f}x base ({base_t * 1000:6.1f} ms)  groups {st.groups:>3} in {st.pieces:>4} files  holes {holes:>2}  "
          f"max files/task {maxk:>2}  stored/dedup {st.stored_bytes / st.dedup_optimum:6.4f}  "
          f"bound/stored {st.lower_bound / st.stored_bytes:6.4f}  {'exact' if st.exact else 'greedy'}"
          + (f"  goal < {GOAL_S:.0f} s: {'PASS' if t < GOAL_S else 'FAIL'}" if len(models) >= 64 else ""))


def report_case(repeat: int, n_tasks: int = 64, n_tensors: int = 2000) -> None:
    """Plan *and report* as `gguf-split split` does, on real files: 64 tiny GGUF models of 2,000 F32 tensors
    each (8 families of 8 tasks: each family changes 100 tensors, each task 30 of its own), opened and
    hashed untimed; timed: the plan, naming the files, the split report and its text rendering (the CLI's
    table and per-task reasons, to a null console)."""
    import io
    import os
    import tempfile

    import numpy as np
    from gguf import GGUFWriter
    from gguf_split.assemble.options import SplitOptions
    from gguf_split.assemble.outputs import name_files
    from gguf_split.assemble.report import split_report
    from gguf_split.assemble.scan import hash_models, open_inputs
    from gguf_split.assemble.split import plan
    from gguf_split.cli.render import print_split

    with tempfile.TemporaryDirectory() as d:
        tasks = {}
        for k in range(n_tasks):
            fam = k // 8
            rng = random.Random(k)
            own = set(rng.sample(range(n_tensors), 30))
            changed = set(random.Random(100 + fam).sample(range(n_tensors), 100))
            path = os.path.join(d, f"t{k:02d}.gguf")
            w = GGUFWriter(path, "llama")
            for i in range(n_tensors):
                seed = 1_000_000 + k * n_tensors + i if i in own else 10_000 + fam * n_tensors + i if i in changed else i
                w.add_tensor(f"t.{i}.weight", np.random.default_rng(seed).standard_normal(8).astype(np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            tasks[f"t{k:02d}"] = path
        models = open_inputs(tasks, allow_unrelated=False)
        try:
            hash_models(list(models.values()))
            opts = SplitOptions(file_cost=0)

            def run() -> None:
                layout = plan(models, opts)
                rep = split_report(os.path.join(d, "out"), models, layout, name_files(models, layout, ""), {},
                                   dry_run=True)
                real, sys.stdout = sys.stdout, io.StringIO()
                try:
                    print_split(rep)
                finally:
                    sys.stdout = real
            t = timeit(run, repeat)
        finally:
            for m in models.values():
                m.close()
    print(f"{'plan + report (64 real files, file_cost 0)':<48} {n_tasks:>3} x {n_tensors:>5}  {t * 1000:8.1f} ms  "
          f"goal < {GOAL_S:.0f} s: {'PASS' if t < GOAL_S else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rep = 1 if a.quick else 5
    print("case                                             tasks x tensors   plan time   vs baseline (user sets)  ...")
    m = many()
    row("many: default (file_cost 1 MiB)", m, rep)
    row("many: file_cost 0", m, rep, file_cost=0)
    row("many: file_cost 64 KiB", m, rep, file_cost=64 * 1024)
    row("many: file_cost 64 KiB, cap 1", m, rep, file_cost=64 * 1024, max_shared_files=1)
    row("many: file_cost 64 KiB, cap 3", m, rep, file_cost=64 * 1024, max_shared_files=3)
    row("many: file_cost 0, shards of 4 MB", m, rep, file_cost=0, max_shard_size=4_000_000)
    row("many: tool defaults (cut, <= 32 files)", m, rep, **TOOL)
    row("many: file_cost 0, cut, <= 32 files", m, rep, **TOOL, file_cost=0)
    report_case(rep)
    row("old: 16 x 1,446 (old planner: 16.5 s)", many(16, 1446), rep)
    for n in (4, 8, 20):
        r = realistic(n)
        row(f"realistic {n}: default", r, rep)
        row(f"realistic {n}: cap 1", r, rep, max_shared_files=1)
        row(f"realistic {n}: cap 2, shards of 20 GB", r, rep, max_shared_files=2, max_shard_size=20_000_000_000)
        row(f"realistic {n}: tool defaults (cut, <= 32 files)", r, rep, **TOOL)
    row("realistic 5: shards of 2 GB", realistic(5), rep, max_shard_size=2_000_000_000)


if __name__ == "__main__":
    main()
