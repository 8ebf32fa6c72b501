"""The planner (gguf_split/assemble/plan/): every plan is checked by one validity oracle; small random instances are
checked against a brute-force optimum; the realistic shapes (base + fine-tunes) against expected groups."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from gguf_split.assemble import plan as P

TensorId, FixedFile, plan_layout = P.TensorId, P.FixedFile, P.plan_layout
MiB = 1 << 20


def T(name: str, version: int = 0, nbytes: int = 4 * MiB, ggml_type: int = 1, shape: tuple[int, ...] = (8,)) -> TensorId:
    return TensorId(name, ggml_type, shape, version.to_bytes(16, "little"), nbytes)


# --- the validity oracle: used on every plan in this file ---------------------------------------------------

def padded(ts, alignment):
    return sum(-(-x.nbytes // alignment) * alignment for x in ts)


def check(models, lay, *, cap=None, file_cost=P.DEFAULT_FILE_COST, max_shard_size=None, alignment=32,
          adaptor_header_bytes=None, header_bound=P.default_header_bound, fixed_files=(), max_files=None,
          cut=P.NO_CUT):
    tasks = list(models)
    files = lay.files
    assert set(lay.task_files) == set(tasks) and set(lay.adaptor_tensors) == set(tasks)
    assert [f.position for f in files] == sorted(f.position for f in files), "files ordered by position"
    fixed_by_name = {f.name: f for f in fixed_files}
    hole_positions = Counter(f.position for f in files if f.kind == P.HOLE)
    assert all(c == 1 for c in hole_positions.values()), "one hole file per position"
    for fi, f in enumerate(files):
        assert f.kind in (P.SHARED, P.HOLE, P.OWN) and f.position >= 1
        assert list(f.tasks) == [t for t in tasks if t in f.tasks], "tasks in input order"
        for t in f.tasks:
            assert fi in lay.task_files[t], f"{f} lists {t} but {t} does not load it"
        if f.kind == P.HOLE:
            assert f.tensors == ()
            if f.fixed is not None:
                assert fixed_by_name[f.fixed].position == f.position and not fixed_by_name[f.fixed].tensors
            else:
                assert not any(ff.position == f.position and not ff.tensors for ff in fixed_files), \
                    "a fixed hole at this position exists: reuse it"
        elif f.kind == P.OWN:
            assert len(f.tasks) == 1 and f.tensors and f.fixed is None
        else:
            assert f.tensors, "a shared file holds tensors"
            if f.fixed is not None:
                ff = fixed_by_name[f.fixed]
                assert ff.position == f.position and tuple(ff.tensors) == f.tensors, "fixed files never change"
    assert lay.cut == cut
    # sharded groups (and cut pieces): consecutive positions, parts 0..parts-1, one task set
    by_group: dict[int, list] = {}
    for f in files:
        if f.kind == P.SHARED and f.fixed is None:
            by_group.setdefault(f.group, []).append(f)
    for g, fs in by_group.items():
        fs.sort(key=lambda f: f.part)
        assert [f.part for f in fs] == list(range(fs[0].parts)) and all(f.parts == len(fs) for f in fs)
        assert [f.position for f in fs] == list(range(fs[0].position, fs[0].position + len(fs)))
        assert len({f.tasks for f in fs}) == 1
    for t in tasks:
        mine = [files[i] for i in lay.task_files[t]]
        assert [f.position for f in mine] == list(range(1, len(mine) + 1)), f"{t}: positions run 1..k"
        held = list(lay.adaptor_tensors[t]) + [x for f in mine for x in f.tensors]
        assert Counter(held) == Counter(models[t]), f"{t}: each of its tensors exactly once, nothing else"
        have = set(models[t])
        for f in mine:
            assert set(f.tensors) <= have
        fixed_keys = {fixed_by_name[f.fixed].group or f.fixed for f in mine if f.fixed and f.tensors}
        if cap is not None:  # family groups (a cut group's pieces and a sharded group's parts count once)
            new_groups = {f.tasks for f in mine if f.kind == P.SHARED and f.fixed is None}
            assert len(new_groups) + len(fixed_keys) <= cap, f"{t}: cap"
        if max_files is not None:  # every file, holes included (parts of one piece once, OWN parts not)
            pieces = {f.group for f in mine if f.kind == P.SHARED and f.fixed is None}
            holes = sum(f.kind == P.HOLE for f in mine)
            assert len(pieces) + len(fixed_keys) + holes <= max_files, f"{t}: max_files"
        own = list(lay.adaptor_tensors[t]) + [x for f in mine if f.kind == P.OWN for x in f.tensors]
        assert set(lay.reasons[t]) == {x.name for x in own}
        order = {x: k for k, x in enumerate(models[t])}
        assert [order[x] for x in lay.adaptor_tensors[t]] == sorted(order[x] for x in lay.adaptor_tensors[t])
    # shared files: tensors in the model order of the first loading task
    for f in files:
        if f.kind == P.SHARED and f.fixed is None:
            order = {x: k for k, x in enumerate(models[f.tasks[0]])}
            ks = [order[x] for x in f.tensors]
            assert ks == sorted(ks)
    if max_shard_size is not None:
        for f in files:
            if f.fixed is None and len(f.tensors) > 1:
                assert header_bound(f.tensors) + padded(f.tensors, alignment) <= max_shard_size
        for t in tasks:
            a = lay.adaptor_tensors[t]
            if a:
                h = (adaptor_header_bytes or {}).get(t)
                h = header_bound(a) if h is None else h
                assert h + padded(a, alignment) <= max_shard_size
    # stats agree with the files
    st = lay.stats
    new_shared = [f for f in files if f.kind == P.SHARED and f.fixed is None]
    stored = sum(x.nbytes for t in tasks for x in lay.adaptor_tensors[t]) + \
        sum(f.nbytes for f in files if f.kind != P.HOLE and f.fixed is None)
    ngroups = len({f.tasks for f in new_shared})
    assert st.stored_bytes == stored and st.groups == ngroups and st.pieces == len({f.group for f in new_shared})
    assert st.holes == sum(files[i].kind == P.HOLE for t in tasks for i in lay.task_files[t])
    assert st.max_task_files == max((len(lay.task_files[t]) for t in tasks), default=0)
    if cut.kind == "none":
        assert st.pieces == st.groups and all(f.piece == "" for f in new_shared)
    assert st.objective == stored + file_cost * ngroups
    assert st.input_bytes == sum(x.nbytes for t in tasks for x in models[t])
    fixed_tensors = {x for ff in fixed_files for x in ff.tensors}
    assert st.dedup_optimum == sum(x.nbytes for x in {x for t in tasks for x in models[t]} - fixed_tensors)
    assert st.dedup_optimum <= st.lower_bound <= st.stored_bytes
    assert st.objective_bound <= st.objective
    if st.exact:
        assert st.lower_bound == st.stored_bytes and st.objective_bound == st.objective
    return lay


def plan(models, **kw):
    if isinstance(kw.get("cut"), str):
        kw["cut"] = P.Cut.parse(kw["cut"])
    return check(models, plan_layout(models, **kw), cap=kw.get("max_shared_files"),
                 **{k: v for k, v in kw.items() if k != "max_shared_files"})


def shared_sets(lay):
    """{task set: tensor names} of the new shared groups."""
    out: dict[frozenset, set] = {}
    for f in lay.files:
        if f.kind == P.SHARED and f.fixed is None:
            out.setdefault(frozenset(f.tasks), set()).update(x.name for x in f.tensors)
    return out


# --- brute force: the minimum objective over every family of task sets ---------------------------------------

def brute_force(models, cap, cost):
    tasks = list(models)
    users: dict[TensorId, frozenset] = {}
    for t in tasks:
        for x in models[t]:
            users[x] = users.get(x, frozenset()) | {t}
    groups: Counter = Counter()
    for x, u in users.items():
        groups[u] += x.nbytes
    base = sum(x.nbytes * len(u) for x, u in users.items())
    cands = [frozenset(c) for k in range(2, len(tasks) + 1) for c in itertools.combinations(tasks, k)
             if any(set(c) <= u for u in groups)]

    def pack(U, fam):
        U = set(U)
        if len(U) < 2:
            return 0
        t = min(U, key=tasks.index)
        best = pack(U - {t}, fam)
        for S in fam:
            if t in S and S <= U:
                best = max(best, len(S) - 1 + pack(U - S, fam))
        return best

    best = base
    for k in range(len(cands) + 1):
        for fam in itertools.combinations(cands, k):
            if cap is not None and any(sum(t in S for S in fam) > cap for t in tasks):
                continue
            saving = sum(B * pack(U, fam) for U, B in groups.items())
            best = min(best, base - saving + cost * len(fam))
    return best


def random_models(rng, n, names, nbytes_choices=(1, 2, 3, 5, 8)):
    """n tasks over `names` tensors: each task has each name with probability .9, with one of a few versions,
    so that versions are shared by various task sets."""
    sizes = {nm: rng.choice(nbytes_choices) * 1000 for nm in range(names)}
    models = {}
    for i in range(n):
        ts = []
        for nm in range(names):
            if rng.random() < 0.9:
                ts.append(T(f"t{nm}", rng.choice([0, 0, 1, 2]), sizes[nm]))
        models[f"task{i}"] = ts
    return models


@pytest.mark.parametrize("seed", range(60))
def test_brute_force_small(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 3, 4, 4])
    models = random_models(rng, n, rng.randint(3, 9))
    cap = rng.choice([None, None, 1, 2])
    cost = rng.choice([0, 1000, 3000, 9000])
    lay = plan(models, max_shared_files=cap, file_cost=cost)
    opt = brute_force(models, cap, cost)
    assert lay.stats.objective >= opt, "below the brute-force optimum: the plan is not what it says"
    assert lay.stats.objective_bound <= opt
    assert lay.stats.exact, "small instances are searched exactly"
    assert lay.stats.objective == opt


@pytest.mark.parametrize("seed", range(40))
def test_greedy_and_its_bounds_against_brute_force(seed, monkeypatch):
    """The greedy (forced on small instances) is valid, never below the optimum, and its bound never above."""
    monkeypatch.setattr(P, "EXACT_MAX_TASKS", 0)
    rng = random.Random(1000 + seed)
    n = rng.choice([3, 4])
    models = random_models(rng, n, rng.randint(3, 8))
    cap = rng.choice([None, 1, 1, 2])
    cost = rng.choice([0, 1000, 4000])
    lay = plan(models, max_shared_files=cap, file_cost=cost)
    opt = brute_force(models, cap, cost)
    assert lay.stats.objective >= opt
    assert lay.stats.objective_bound <= opt
    if lay.stats.exact:
        assert lay.stats.objective == opt
    # and the stored-bytes bound: no plan with at most as many groups stores less
    assert lay.stats.lower_bound <= lay.stats.stored_bytes


@pytest.mark.parametrize("seed", range(20))
def test_uncapped_free_files_reach_dedup(seed):
    rng = random.Random(seed)
    models = random_models(rng, rng.randint(2, 12), rng.randint(5, 60))
    lay = plan(models, file_cost=0)
    assert lay.stats.stored_bytes == lay.stats.dedup_optimum
    assert lay.stats.exact


@pytest.mark.parametrize("seed", range(12))
def test_large_random_is_valid_under_every_option(seed):
    rng = random.Random(77 + seed)
    models = random_models(rng, rng.randint(6, 16), rng.randint(20, 80), nbytes_choices=(100, 300, 1000, 3000))
    cap = rng.choice([None, 1, 2, 3])
    kw = dict(max_shared_files=cap, file_cost=rng.choice([0, 50_000, 1_000_000]))
    if rng.random() < 0.5:
        kw.update(max_shard_size=1_500_000 + 1024 * 256, adaptor_header_bytes={t: 70_000 for t in models})
    lay = plan(models, **kw)
    assert lay.stats.objective_bound <= lay.stats.objective


# --- the realistic shapes ---------------------------------------------------------------------------------------

LAYERS = 8


def base_model(nbytes=4 * MiB):
    ts = [T("token_embd.weight", 0, 8 * MiB)]
    for i in range(LAYERS):
        for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            ts.append(T(f"blk.{i}.{k}.weight", 0, nbytes))
    ts.append(T("output_norm.weight", 0, 64 * 1024))
    return ts


def changed(ts, pred, version):
    return [T(x.name, version, x.nbytes, x.ggml_type, x.shape) if pred(x.name) else x for x in ts]


def layer(name):
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def fine_tunes():
    base = base_model()
    chat = changed(base, lambda n: ".attn_q." in n or ".attn_v." in n, 1)
    code = changed(base, lambda n: ".ffn_" in n and layer(n) >= LAYERS * 3 // 4, 2)
    summarize = changed(base, lambda n: n == f"blk.{LAYERS - 1}.attn_q.weight", 3) + [T("output.weight", 3, 8 * MiB)]
    return {"base": base, "chat": chat, "code": code, "summarize": summarize}


def test_base_and_three_fine_tunes_get_the_expected_groups():
    models = fine_tunes()
    lay = plan(models)
    top_q = f"blk.{LAYERS - 1}.attn_q.weight"
    qv = {f"blk.{i}.attn_{k}.weight" for i in range(LAYERS) for k in "qv"}
    top_ffn = {f"blk.{i}.ffn_{k}.weight" for i in range(LAYERS * 3 // 4, LAYERS) for k in ("gate", "up", "down")}
    everything = {x.name for x in models["base"]}
    assert shared_sets(lay) == {
        frozenset(models): everything - qv - top_ffn,  # the foundation
        frozenset({"base", "code", "summarize"}): qv - {top_q},  # attn_q/v as the base has them
        frozenset({"base", "chat", "summarize"}): top_ffn,  # the top FFN as the base has it
        frozenset({"base", "code"}): {top_q},
    }
    foundation = next(f for f in lay.files if len(f.tasks) == 4)
    assert foundation.position == 1
    assert lay.stats.stored_bytes == lay.stats.dedup_optimum and lay.stats.exact
    # base shares everything: its adaptor is empty; the others keep exactly their changes
    assert lay.adaptor_tensors["base"] == ()
    assert {x.name for x in lay.adaptor_tensors["chat"]} == qv
    assert {x.name for x in lay.adaptor_tensors["code"]} == top_ffn
    assert {x.name for x in lay.adaptor_tensors["summarize"]} == {top_q, "output.weight"}
    assert lay.reasons["summarize"] == {top_q: P.CHANGED, "output.weight": P.ONLY_HERE}
    assert set(lay.reasons["chat"].values()) == {P.CHANGED}
    # four groups pairwise overlapping (all hold base) need 4 positions; code cannot avoid one hole
    assert len(lay.task_files["base"]) == 4
    assert sum(f.kind == P.HOLE for f in lay.files) == 1


def test_one_fine_tune_changing_token_embd():
    base = base_model()
    ft = changed(base, lambda n: n == "token_embd.weight", 1)
    lay = plan({"base": base, "ft": ft})
    assert shared_sets(lay) == {frozenset({"base", "ft"}): {x.name for x in base} - {"token_embd.weight"}}
    assert [x.name for x in lay.adaptor_tensors["base"]] == ["token_embd.weight"]
    assert lay.reasons == {"base": {"token_embd.weight": P.CHANGED}, "ft": {"token_embd.weight": P.CHANGED}}
    assert lay.stats.exact and lay.stats.stored_bytes == lay.stats.dedup_optimum
    # a retyped token_embd says so
    ft2 = [T(x.name, 0, x.nbytes, 8) if x.name == "token_embd.weight" else x for x in base]
    lay = plan({"base": base, "ft": ft2})
    assert lay.reasons["ft"] == {"token_embd.weight": P.RETYPED}


def test_cap_one_every_task_one_shared_file_chosen_to_save_most():
    models = fine_tunes()
    lay = plan(models, max_shared_files=1)
    for t in models:
        assert sum(lay.files[i].kind == P.SHARED for i in lay.task_files[t]) <= 1
    assert lay.stats.exact
    assert lay.stats.objective == brute_force(models, 1, P.DEFAULT_FILE_COST)
    # here the foundation is big: one file for all four saves most; the other groups are capped out
    qv = {f"blk.{i}.attn_{k}.weight" for i in range(LAYERS) for k in "qv"}
    top_ffn = {f"blk.{i}.ffn_{k}.weight" for i in (6, 7) for k in ("gate", "up", "down")}
    assert shared_sets(lay) == {frozenset(models): {x.name for x in models["base"]} - qv - top_ffn}
    assert lay.reasons["base"] == {n: P.CAPPED for n in qv | top_ffn}
    # with a smaller foundation, the attn_q/v group takes the foundation's versions along instead (the
    # intersection {base, code, summarize} saves more), and chat keeps everything
    small = {t: [x for x in ts if x.name.startswith("blk.") and (layer(x.name) >= 6 or ".attn_" in x.name)]
             for t, ts in models.items()}
    lay = plan(small, max_shared_files=1)
    assert lay.stats.objective == brute_force(small, 1, P.DEFAULT_FILE_COST) and lay.stats.exact
    assert shared_sets(lay) == {frozenset({"base", "code", "summarize"}):
                                {x.name for x in small["base"]} - {"blk.7.attn_q.weight"} - top_ffn}
    assert set(lay.reasons["chat"].values()) == {P.CHANGED, P.CAPPED}
    assert lay.stats.small_group_bytes == sum(
        x.nbytes for t in models for x in lay.adaptor_tensors[t] if lay.reasons[t][x.name] in (P.CAPPED, P.TOO_SMALL))


def test_cap_one_different_tasks_different_files():
    # A,B share a lot; C,D share a lot; all four share a little: N=1 gives {A,B} and {C,D} each a file
    common = [T("c", 0, 1 * MiB)]
    ab = [T(f"ab{i}", 0) for i in range(5)]
    cd = [T(f"cd{i}", 0) for i in range(5)]
    models = {"A": common + ab, "B": common + ab, "C": common + cd, "D": common + cd}
    lay = plan(models, max_shared_files=1)
    assert shared_sets(lay) == {frozenset("AB"): {"c", *(x.name for x in ab)},
                                frozenset("CD"): {"c", *(x.name for x in cd)}}
    assert {f.position for f in lay.files} == {1}, "disjoint task sets share position 1"


def test_cap_prefers_an_intersection():
    # N=1, versions used by {A,B,C} (x bytes) and {A,B} (y > x): one file for {A,B} with both wins
    x, y = 10 * MiB, 30 * MiB
    models = {"A": [T("abc", 0, x), T("ab", 0, y)], "B": [T("abc", 0, x), T("ab", 0, y)],
              "C": [T("abc", 0, x), T("ab", 1, y)]}
    lay = plan(models, max_shared_files=1)
    assert shared_sets(lay) == {frozenset("AB"): {"abc", "ab"}}
    assert lay.reasons["C"] == {"abc": P.CAPPED, "ab": P.CHANGED}
    assert lay.stats.exact


def test_small_groups_stay_in_adaptors_or_pack_into_an_opened_file():
    big = [T(f"big{i}", 0) for i in range(4)]
    models = {"A": big + [T("tiny_abc", 0, 1000), T("tiny_bc", 0, 1000)],
              "B": big + [T("tiny_abc", 0, 1000), T("tiny_bc", 0, 1000)],
              "C": [T("big0", 1)] + big[1:] + [T("tiny_abc", 0, 1000), T("tiny_bc", 1, 1000)]}
    lay = plan(models)
    # {A,B} pays for a file (big0); {A,B,C} pays (big1..3); tiny_bc ({A,B}) packs into the {A,B} file for free
    assert shared_sets(lay) == {frozenset("ABC"): {"big1", "big2", "big3", "tiny_abc"}, frozenset("AB"): {"big0", "tiny_bc"}}
    # with only tiny things shared beyond the foundation, they stay in adaptors: too small for a file
    models2 = {"A": big + [T("tiny", 0, 1000)], "B": big + [T("tiny", 0, 1000)], "C": big + [T("tiny", 1, 1000)]}
    lay2 = plan(models2)
    assert shared_sets(lay2) == {frozenset("ABC"): {x.name for x in big}}
    assert lay2.reasons["A"] == {"tiny": P.TOO_SMALL} and lay2.reasons["C"] == {"tiny": P.CHANGED}
    assert lay2.stats.small_group_bytes == 2000


def test_determinism_and_input_order():
    models = fine_tunes()
    a, b = plan_layout(models), plan_layout(dict(models))
    assert a == b
    for cap in (1, 2):
        assert plan_layout(models, max_shared_files=cap) == plan_layout(models, max_shared_files=cap)
    # another task order: same groups and bytes (no ties in this instance), tensors still in model order
    rev = dict(reversed(list(models.items())))
    r = plan(rev)
    assert shared_sets(r) == shared_sets(a)
    assert r.stats.stored_bytes == a.stats.stored_bytes
    rng = random.Random(5)
    for _ in range(5):
        m = random_models(rng, 7, 40, nbytes_choices=(100, 1000, 5000))
        assert plan_layout(m, file_cost=3000, max_shared_files=2) == plan_layout(m, file_cost=3000, max_shared_files=2)


# --- shards -------------------------------------------------------------------------------------------------------

def test_max_shard_size_cuts_groups_and_adaptors():
    models = fine_tunes()
    limit = 20 * MiB
    lay = plan(models, max_shard_size=limit, adaptor_header_bytes={t: 100_000 for t in models})
    foundation = [f for f in lay.files if f.kind == P.SHARED and len(f.tasks) == 4]
    assert len(foundation) > 1 and foundation[0].position == 1
    own = [f for f in lay.files if f.kind == P.OWN]
    assert own, "chat's 16 changed tensors (64 MiB) overflow its split 0"
    assert all(f.tasks == ("chat",) for f in own) or {f.tasks for f in own} <= {(t,) for t in models}
    # the same groups as without shards
    assert {S: n for S, n in shared_sets(lay).items()} == shared_sets(plan(models))


def test_oversized_tensor_gets_a_file_of_its_own_and_split0_may_be_empty():
    big = T("huge", 0, 50 * MiB)
    models = {"A": [big, T("a", 1, MiB)], "B": [big, T("a", 2, MiB)], "C": [T("x", 0, 30 * MiB), T("y", 0, 30 * MiB)]}
    lay = plan(models, max_shard_size=8 * MiB, adaptor_header_bytes={"A": 1000, "B": 1000, "C": 1000})
    assert [f.tensors for f in lay.files if f.kind == P.SHARED] == [(big,)]
    assert lay.adaptor_tensors["C"] == ()
    assert [len(f.tensors) for f in lay.files if f.tasks == ("C",) and f.kind == P.OWN] == [1, 1]


def test_own_parts_fill_a_tasks_holes_first():
    models = fine_tunes()
    lay = plan(models, max_shard_size=12 * MiB, adaptor_header_bytes={t: 1000 for t in models})
    for t in models:
        mine = [lay.files[i] for i in lay.task_files[t]]
        last_shared = max((f.position for f in mine if f.kind == P.SHARED), default=0)
        if any(f.kind == P.HOLE for f in mine):
            assert all(f.position < last_shared for f in mine if f.kind == P.OWN), \
                f"{t}: an own part went after its shared files while a hole remained"
    code = [lay.files[i].kind for i in lay.task_files["code"]]
    assert code[:3] == [P.SHARED] * 3 and P.OWN in code


# --- fixed files (gguf-split add) ----------------------------------------------------------------------------------

def test_add_reuses_fixed_files_and_positions():
    models = fine_tunes()
    first = plan_layout({t: models[t] for t in ("base", "chat", "code")})
    fixed = [FixedFile(f"f{i}", f.position, f.tensors) for i, f in enumerate(first.files)]
    new = {"summarize": models["summarize"], "chat2": changed(models["chat"], lambda n: n == "output_norm.weight", 9)}
    lay = plan(new, fixed_files=fixed)
    used = {f.fixed for f in lay.files if f.fixed}
    assert "f0" in used, "the old foundation serves the new tasks"
    # summarize can load the {base, code} file of attn_q/v (it shares all but the top attn_q? no: that one differs)
    for t in new:
        for i in lay.task_files[t]:
            f = lay.files[i]
            if f.fixed:
                assert set(f.tensors) <= set(new[t])
    # stored bytes exclude the fixed files
    assert lay.stats.stored_bytes == sum(x.nbytes for t in new for x in lay.adaptor_tensors[t]) + \
        sum(f.nbytes for f in lay.files if f.fixed is None and f.kind != P.HOLE)


def test_add_fixed_hole_is_reused_and_new_files_avoid_taken_positions():
    f1 = [T(f"w{i}", 0) for i in range(4)]
    f3 = [T(f"v{i}", 0) for i in range(4)]
    fixed = [FixedFile("found", 1, tuple(f1)), FixedFile("hole2", 2, ()), FixedFile("g3", 3, tuple(f3))]
    extra = [T(f"e{i}", 0) for i in range(3)]
    models = {"X": f1 + f3 + extra, "Y": f1 + f3 + extra, "Z": f1 + f3 + [T("z", 0)], "W": f1}
    lay = plan(models, fixed_files=fixed)
    pos = {t: [(lay.files[i].fixed or lay.files[i].kind, lay.files[i].position) for i in lay.task_files[t]] for t in models}
    assert pos["X"] == pos["Y"] == [("found", 1), (P.SHARED, 2), ("g3", 3)], "the new {X,Y} file fills the free 2"
    assert pos["Z"] == [("found", 1), ("hole2", 2), ("g3", 3)], "the existing hole, not a new one"
    assert pos["W"] == [("found", 1)]
    assert lay.stats.dedup_optimum == sum(x.nbytes for x in extra) + T("z").nbytes
    assert lay.stats.stored_bytes == sum(x.nbytes for x in extra) + T("z").nbytes
    # a fixed file at position 2 that X loads: the new file must go elsewhere
    fixed2 = fixed[:1] + [FixedFile("g2", 2, tuple(f3))]
    lay = plan({"X": f1 + f3 + extra, "Y": f1 + f3 + extra}, fixed_files=fixed2)
    assert [(lay.files[i].fixed or lay.files[i].kind, lay.files[i].position) for i in lay.task_files["X"]] == \
        [("found", 1), ("g2", 2), (P.SHARED, 3)]


def test_add_cap_chooses_the_biggest_fixed_file_and_groups_count_once():
    a = [T(f"a{i}", 0) for i in range(2)]
    b = [T(f"b{i}", 0) for i in range(5)]
    fixed = [FixedFile("A", 1, tuple(a)), FixedFile("B", 1, tuple(b)), FixedFile("B2", 2, (T("b9", 0),), group="g"),
             FixedFile("B1", 1, (T("b8", 0),), group="g")]
    models = {"new": a + b + [T("b8", 0), T("b9", 0)]}
    lay = plan(models, fixed_files=fixed, max_shared_files=1)
    assert [lay.files[i].fixed for i in lay.task_files["new"]] == ["B"]
    fixed2 = [FixedFile("P1", 1, tuple(b[:3]), group="g"), FixedFile("P2", 2, tuple(b[3:]), group="g"),
              FixedFile("A", 1, tuple(a))]
    lay = plan({"new": a + b}, fixed_files=fixed2, max_shared_files=1)
    assert [lay.files[i].fixed for i in lay.task_files["new"]] == ["P1", "P2"], "two parts of one group count once"
    assert [(lay.files[i].part, lay.files[i].parts) for i in lay.task_files["new"]] == [(0, 2), (1, 2)]


# --- edges ------------------------------------------------------------------------------------------------------------

def test_edges():
    assert plan_layout({}).files == ()
    lay = plan({"only": [T("a"), T("b")]})
    assert lay.files == () and lay.reasons == {"only": {"a": P.ONLY_HERE, "b": P.ONLY_HERE}}
    lay = plan(fine_tunes(), max_shared_files=0)
    assert lay.files == () and lay.stats.exact
    with pytest.raises(ValueError, match="twice|two tensors"):
        plan_layout({"a": [T("x", 0), T("x", 1)]})
    with pytest.raises(ValueError):
        plan_layout({"a": [T("x")]}, max_shared_files=-1)


def test_cap_one_families_get_a_file_each_in_the_greedy():
    """12 tasks in 3 families (a family changes its own 10 tensors alike; each task changes 2 of its own),
    cap 1: each family shares one file holding what its members share (not one file for everyone, which
    could hold only what all 12 share)."""
    base = [T(f"w{i}", 0, 100_000) for i in range(60)]
    models = {}
    for k in range(12):
        fam = k // 4
        models[f"t{k}"] = [T(x.name, 100 + fam, x.nbytes) if fam * 10 <= i < fam * 10 + 10 else
                           T(x.name, 1000 + k, x.nbytes) if i in (40 + k, 41 + k) else x for i, x in enumerate(base)]
    lay = plan(models, max_shared_files=1, file_cost=0)
    assert not lay.stats.exact
    assert set(shared_sets(lay)) == {frozenset(f"t{k}" for k in range(f * 4, f * 4 + 4)) for f in range(3)}
    assert lay.stats.lower_bound <= lay.stats.stored_bytes


def test_search_out_of_budget_says_so(monkeypatch):
    monkeypatch.setattr(P, "EXACT_NODE_BUDGET", 1)
    rng = random.Random(3)
    seen_inexact = False
    for _ in range(10):
        models = random_models(rng, 4, 8)
        lay = plan(models, file_cost=2000)
        opt = brute_force(models, None, 2000)
        assert lay.stats.objective_bound <= opt <= lay.stats.objective
        seen_inexact |= not lay.stats.exact
    assert seen_inexact


# --- the package's shape (issue 18): small steps ----------------------------------------------------------------

def _decisions(fn) -> int:
    """McCabe's number as ruff's C901 counts it, near enough: 1 + branches, loops, handlers, boolean operands,
    conditional expressions and comprehension conditions (nested functions counted on their own)."""
    import ast

    n = 1
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp, ast.With,
                             ast.Assert)):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        todo.extend(ast.iter_child_nodes(node))
    return n


def test_planner_functions_stay_small():
    """Every function of the planner package: at most 80 lines and complexity at most 25."""
    import ast
    import pathlib

    pkg = pathlib.Path(P.__file__).parent
    assert len(list(pkg.glob("*.py"))) >= 8, "the planner is a package of step modules"
    big = []
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, cc = node.end_lineno - node.lineno + 1, _decisions(node)
                if lines > 80 or cc > 25:
                    big.append(f"{path.name}:{node.name}: {lines} lines, complexity {cc}")
    assert not big, big


def test_planner_records_are_frozen_dataclasses():
    import dataclasses

    from gguf_split.assemble.plan import contents, files, fixed, positions, shards, versions

    for cls in (versions.Versions, fixed.FixedCandidate, fixed.FixedChoice, contents.Contents, shards.Shards,
                positions.Placement, files._Entry, P.TensorId, P.FixedFile, P.PlannedFile):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert hasattr(cls, "__slots__"), cls


# --- cuts (issue 19): shared groups cut along roles and blocks of layers so that `add` reuses more -------------

from gguf_split.assemble.plan import cut as C, roles as R  # noqa: E402

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")


def role_base(rng, layers, scale=1000):
    """A llama-like model: token_embd, per layer every role (norms tiny), output_norm; random sizes."""
    size = {r: (rng.choice([20, 50, 100]) if "norm" not in r else 1) * scale for r in ROLES}
    ts = [T("token_embd.weight", 0, rng.choice([100, 300]) * scale)]
    ts += [T(f"blk.{i}.{r}.weight", 0, size[r]) for i in range(layers) for r in ROLES]
    return ts + [T("output_norm.weight", 0, scale)]


def fine_tune(base, roles, layers, version):
    """What llama-export-lora makes: the chosen roles of the chosen layers changed, all else identical."""
    def hit(name):
        role, layer = R.role_and_layer(name)
        if layer is None:
            return name.split(".")[0] in roles
        return role.removeprefix("blk.") in roles and layer in layers
    return changed(base, hit, version)


def role_models(rng, n_tasks, layers):
    base = role_base(rng, layers)
    models = {"base": base}
    for k in range(1, n_tasks):
        roles = set(rng.sample(ROLES[:7] + ("token_embd",), rng.randint(1, 3)))
        lo = rng.randrange(layers)
        models[f"ft{k}"] = fine_tune(base, roles, set(range(lo, layers)), 100 + k)
    return models


def test_role_and_layer_from_names_only():
    assert R.role_and_layer("blk.12.attn_q.weight") == ("blk.attn_q", 12)
    assert R.role_and_layer("blk.3.attn_q.bias") == ("blk.attn_q", 3), "a weight and its bias share a role"
    assert R.role_and_layer("token_embd.weight") == ("token_embd", None)
    assert R.role_and_layer("output_norm.weight") == ("output_norm", None)
    assert R.role_and_layer("v.blk.0.attn_k.weight") == ("v.blk.attn_k", 0)
    assert R.role_and_layer("rope_freqs") == ("rope_freqs", None)
    assert R.role_and_layer("blk.1.ffn_up.7.weight") == ("blk.ffn_up.7", 1), "the first number is the layer"
    with pytest.raises(ValueError, match="scheme 2"):
        R.role_and_layer("blk.0.attn_q.weight", 2)


def test_cut_parse_and_text():
    for text in ("none", "role", "role:8", "tensor"):
        assert str(P.Cut.parse(text)) == text
    assert P.Cut.parse("role:8") == P.Cut("role", 8) and P.Cut.parse("role") == P.Cut("role", 0)
    for bad in ("role:0", "role:x", "layers", "tensor:2", "", "role:-1", "none:1"):
        with pytest.raises(ValueError, match="cut"):
            P.Cut.parse(bad)
    with pytest.raises(ValueError):
        P.Cut("tensor", 4)


def test_unit_order_puts_what_fine_tunes_change_most_last():
    units = [("blk.attn_q", 0), ("blk.ffn_up", 1), ("blk.attn_norm", 0), ("token_embd", -1), ("blk.ffn_up", 0),
             ("blk.attn_v", 0), ("blk.attn_k", 0)]
    assert sorted(units, key=R.unit_order) == [("blk.attn_norm", 0), ("token_embd", -1), ("blk.attn_k", 0),
                                               ("blk.ffn_up", 0), ("blk.ffn_up", 1), ("blk.attn_q", 0),
                                               ("blk.attn_v", 0)]


def _partitions(n):
    for mask in range(1 << (n - 1)):
        yield [i for i in range(1, n) if mask >> (i - 1) & 1] + [n]


@pytest.mark.parametrize("seed", range(150))
def test_paying_partition_is_the_finest_paying_one(seed):
    """Against every contiguous partition: the most pieces that all pay, then the fewest pieces mixing roles,
    then the smallest largest piece."""
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 5, 8, 13]) for _ in range(rng.randint(1, 9))]
    roles = sorted(rng.choice("abc") for _ in sizes)  # units come role by role
    w, cost = rng.choice([1, 2, 3]), rng.choice([0, 4, 9, 15, 40])
    ends = C.paying_partition(sizes, w, cost, roles)
    assert ends[-1] == len(sizes) and ends == sorted(set(ends))

    def pieces(e):
        return [sum(sizes[a:b]) for a, b in zip([0] + e[:-1], e)]

    def mixed(e):
        return sum(len(set(roles[a:b])) > 1 for a, b in zip([0] + e[:-1], e))
    paying = [e for e in _partitions(len(sizes)) if all(s * w > cost for s in pieces(e))]
    if not paying:
        assert ends == [len(sizes)], "nothing pays: the group stays whole"
        return
    assert all(s * w > cost for s in pieces(ends))
    key = (len(ends), -mixed(ends), -max(pieces(ends)))
    assert key == max((len(e), -mixed(e), -max(pieces(e))) for e in paying)


def _pieces_by_group(lay):
    out: dict[int, list] = {}
    for f in lay.files:
        if f.kind == P.SHARED and f.fixed is None:
            out.setdefault(f.group, []).append(f)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_a_cut_only_adds_files(seed):
    """Same bytes, same groups, same adaptors as the uncut plan; every piece pays for its file unless its
    group is whole; a unit (a role within a block) never spans two pieces; pieces hold consecutive units."""
    rng = random.Random(seed)
    layers = rng.randint(2, 10)
    models = role_models(rng, rng.randint(2, 6), layers)
    cost = rng.choice([0, 30_000, 150_000, 600_000])
    whole = plan(models, file_cost=cost)
    for text in ("role", "role:1", "role:3", "tensor"):
        cut = P.Cut.parse(text)
        lay = plan(models, file_cost=cost, cut=cut)
        assert lay.stats.stored_bytes == whole.stats.stored_bytes and lay.stats.groups == whole.stats.groups
        assert lay.adaptor_tensors == whole.adaptor_tensors and lay.reasons == whole.reasons
        assert shared_sets(lay) == shared_sets(whole)
        by_set: dict[tuple, list] = {}
        for fs in _pieces_by_group(lay).values():
            by_set.setdefault(fs[0].tasks, []).append(fs)
        for tasks, pieces in by_set.items():
            pieces.sort(key=lambda fs: fs[0].position)
            positions = [f.position for fs in pieces for f in fs]
            assert positions == list(range(positions[0], positions[0] + len(positions))), "a group's pieces in a run"
            if len(pieces) > 1:
                for fs in pieces:
                    assert sum(f.nbytes for f in fs) * (len(tasks) - 1) > cost, f"{fs[0].piece} does not pay"
            seen: dict = {}
            spans = []
            for k, fs in enumerate(pieces):
                units = {R.unit_of(x, cut) for f in fs for x in f.tensors}
                for u in units:
                    assert seen.setdefault(u, k) == k, f"unit {u} in two pieces"
                spans.append((min(map(R.unit_order, units)), max(map(R.unit_order, units))))
            assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), "pieces hold runs of units, in unit order"


@pytest.mark.parametrize("seed", range(40))
def test_max_files_counts_every_file_holes_included(seed):
    rng = random.Random(500 + seed)
    models = role_models(rng, rng.randint(2, 8), rng.randint(2, 8)) if seed % 2 else \
        random_models(rng, rng.randint(2, 7), rng.randint(3, 12))
    cut = rng.choice(["none", "role", "role:2", "tensor"])
    max_files = rng.randint(0, 8)
    kw = dict(cut=cut, max_files=max_files, file_cost=rng.choice([0, 3000, 100_000]))
    if rng.random() < 0.3:
        kw["max_shared_files"] = rng.randint(0, 3)
    if rng.random() < 0.3:
        kw.update(max_shard_size=400_000, adaptor_header_bytes={t: 5000 for t in models})
    lay = plan(models, **kw)
    assert lay.stats.max_task_files <= max_files or kw.get("max_shard_size"), "parts and OWN parts aside"


def test_max_files_avoids_a_hole_the_groups_alone_would_need():
    """Three tasks, each pair sharing much: three pairwise groups need three positions, so one task of each
    pair gets a hole (3 files). With max_files 2 that is refused: a group is given up instead."""
    ab, bc = [T(f"ab{i}", 0) for i in range(3)], [T(f"bc{i}", 0) for i in range(3)]
    ac = [T(f"ac{i}", 0) for i in range(2)]
    models = {"A": ab + ac, "B": ab + bc, "C": bc + ac}
    free = plan(models, max_shared_files=2)
    assert free.stats.groups == 3 and free.stats.max_task_files == 3 and free.stats.holes >= 1
    lay = plan(models, max_shared_files=2, max_files=2)
    assert lay.stats.max_task_files <= 2 and lay.stats.groups == 2
    assert not lay.stats.exact and lay.stats.objective_bound <= lay.stats.objective
    assert set(shared_sets(lay)) == {frozenset("AB"), frozenset("BC")}, "the smallest group goes"


def test_cut_under_max_files_merges_blocks_of_one_role_first():
    rng = random.Random(7)
    base = role_base(rng, 8)
    models = {"base": base, "qv": fine_tune(base, {"attn_q", "attn_v"}, set(range(8)), 1)}
    fine = plan(models, cut="role:1", file_cost=0)
    assert fine.stats.max_task_files > 20
    lay = plan(models, cut="role:1", file_cost=0, max_files=12)
    assert lay.stats.max_task_files == 12
    labels = [f.piece for f in lay.files]
    assert all("+" not in p for p in labels), f"no piece mixes roles while blocks can merge: {labels}"


def test_cut_is_deterministic_and_recorded():
    rng = random.Random(3)
    models = role_models(rng, 5, 6)
    for text in ("role:2", "tensor"):
        a = plan_layout(models, cut=P.Cut.parse(text), max_files=10, file_cost=10_000)
        b = plan_layout({t: list(v) for t, v in models.items()}, cut=P.Cut.parse(text), max_files=10, file_cost=10_000)
        assert a == b and a.cut == P.Cut.parse(text)
    assert plan_layout(models).cut == P.NO_CUT


@pytest.mark.parametrize("role", ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                                  "token_embd", "attn_norm"])
@pytest.mark.parametrize("cut", ["role", "role:2", "tensor"])
def test_add_reuses_every_piece_the_new_task_holds(role, cut):
    """A split of base + a q/v fine-tune, cut; then `add` of a fine-tune of one role in the top layers: every
    existing file whose tensors the new task holds byte-identical is loaded, and the new task writes only
    what no loadable file holds."""
    rng = random.Random(11)
    layers = 6
    base = role_base(rng, layers, scale=10_000)
    first = {"base": base, "qv": fine_tune(base, {"attn_q", "attn_v"}, set(range(layers)), 1)}
    split = plan(first, cut=cut, max_files=P.DEFAULT_MAX_SHARED_FILES, file_cost=0)  # every unit pays
    fixed = [FixedFile(f"f{i}", f.position, f.tensors) for i, f in enumerate(split.files) if f.kind != P.OWN]
    new = fine_tune(base, {role}, set(range(layers - 2, layers)), 2)
    lay = plan({"new": new}, cut=cut, fixed_files=fixed, file_cost=0)
    loaded = {lay.files[i].fixed for i in lay.task_files["new"] if lay.files[i].fixed}
    holdable = {f.name for f in fixed if f.tensors and set(f.tensors) <= set(new)}
    assert loaded >= holdable
    in_loaded = {x for f in fixed if f.name in loaded for x in f.tensors}
    assert lay.stats.stored_bytes == sum(x.nbytes for x in new if x not in in_loaded)
    if cut != "role" and role not in ("attn_q", "attn_v"):  # (base's q and v sit in its adaptor: not shared)
        untouched = {x for x in new if R.role_and_layer(x.name) in ((f"blk.{role}", 0), (f"blk.{role}", 1))}
        assert untouched <= in_loaded, "blocks of the changed role that it does not change stay shared"
