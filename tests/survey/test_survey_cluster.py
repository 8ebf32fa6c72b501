"""`survey --scheduler`: the per-file scans on a Dask distributed cluster (a LocalCluster of 2 worker processes,
started and stopped here). Same report as a local survey; a worker that dies is replaced and its scan
retried; a file a worker cannot use is one line naming the file and the worker; distributed stays quiet.

Skipped when `distributed` cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

try:
    import distributed
except ImportError as e:  # pragma: no cover - depends on the extra
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"distributed: {e} (CI=true: the cluster tests must run)", pytrace=False)
    pytest.skip(f"distributed: {e} (pip install -e '.[distributed]')", allow_module_level=True)

import cloudpickle  # noqa: E402 - comes with distributed

from gguf_split.disk.progress import NO_BAR  # noqa: E402
from gguf_split.survey.cluster import remote_scan, scan_on_cluster  # noqa: E402
from gguf_split.disk.manifest import FileManifest  # noqa: E402
from gguf_split.survey.run import KnownManifests, survey  # noqa: E402
from test_survey import folder  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not import this test module


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


def _summary(r: Any) -> Any:
    return ([(sorted(m.path for m in f.members), f.split_bytes) for f in r.families], sorted(m.path for m in r.alone),
            sorted((x.why, tuple(sorted(x.members))) for x in r.related))


def test_a_survey_on_the_cluster_is_the_local_survey(scheduler: str, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    folder(tmp_path)
    (tmp_path / "models" / "notes.gguf").write_text("not a model")
    local = survey([tmp_path / "models"], file_cost=0)
    remote = survey([tmp_path / "models"], file_cost=0, scheduler=scheduler)
    assert _summary(remote) == _summary(local) and len(remote.families) == 2
    assert remote.scan.hashed_files == local.scan.hashed_files == 13 and remote.scan.scheduler == scheduler
    (problem,) = remote.skipped
    assert problem.path.endswith("notes.gguf") and "not a GGUF file" in problem.problem
    assert "on worker tcp://" in problem.problem and "host " in problem.problem
    assert "distributed" not in capfd.readouterr().err


def _die_once(marker: str, path: str) -> Any:
    """Kill the worker process running the first scan (as the out-of-memory killer would)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return remote_scan(path)
    os.close(fd)
    os._exit(1)


def test_a_worker_that_dies_is_replaced_and_the_scan_retried(scheduler: str, tmp_path: Path) -> None:
    p = folder(tmp_path)
    paths = [p["a-base"], p["a-chat"], p["other"]]
    results: dict[str, Any] = {}
    known = KnownManifests(None)
    marker = tmp_path / "died"
    scan_on_cluster(scheduler, [(q, os.stat(q)) for q in paths], known, results, NO_BAR,
                    fn=functools.partial(_die_once, str(marker)))
    assert marker.exists()
    assert all(isinstance(results[q], FileManifest) for q in paths)
    assert {results[q].xxh3 for q in paths} == {remote_scan(q)[3].xxh3 for q in paths}  # type: ignore[union-attr]


def test_a_file_a_worker_cannot_open_names_it() -> None:
    version, worker, host, problem = remote_scan("/nonexistent/model.gguf")
    assert problem == "cannot open: No such file or directory" and host
