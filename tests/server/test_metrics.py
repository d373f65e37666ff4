"""ServerMetrics without a network: a registry per instance, storage failures counted from
failed group commits and failed storage calls, the listen-address parser, the HTTP answers."""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from keymgmt.adapters.server.app import KeyServer
from keymgmt.adapters.server.commit import CommitFailed, GroupCommit
from keymgmt.adapters.server.metrics import (
    _BATCH,
    _BATCH_HELP,
    _COMMIT,
    _COMMIT_HELP,
    _LATENCY,
    _REQUEST_SECONDS_HELP,
    _REQUESTS_HELP,
    ServerMetrics,
    answer,
    parse_listen,
)
from keymgmt.adapters.storage.base import StorageError
from keymgmt.adapters.storage.sqlite import SQLiteStorage
from keymgmt_proto import LoginRequested


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_two_runtimes_in_one_process_keep_their_own_counters():
    first, second = ServerMetrics(), ServerMetrics()
    first.login("ok")
    assert sample(first, "keymgmt_logins_total", outcome="ok") == 1
    assert sample(second, "keymgmt_logins_total", outcome="ok") == 0


@pytest.mark.anyio
async def test_a_failed_group_commit_is_a_storage_error_and_a_batch():
    metrics = ServerMetrics()

    class Failing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise StorageError("disk full")

    committer = GroupCommit(Failing, observe=metrics.batch)
    with pytest.raises(CommitFailed):
        await committer.run(lambda: None)
    assert sample(metrics, "keymgmt_storage_errors_total") == 1
    assert sample(metrics, "keymgmt_group_commit_batch_size_count") == 1
    ok = GroupCommit(None, observe=metrics.batch)
    assert await ok.run(lambda: 7) == 7
    assert sample(metrics, "keymgmt_storage_errors_total") == 1
    assert sample(metrics, "keymgmt_group_commit_batch_size_sum") == 2


def test_a_storage_failure_while_handling_an_event_is_counted(tmp_path):
    metrics = ServerMetrics()
    storage = SQLiteStorage(tmp_path / "db")
    keyserver = KeyServer(storage, metrics=metrics)

    @contextmanager
    def broken(*args, **kwargs):
        raise StorageError("database is gone")
        yield

    storage.transaction = broken  # type: ignore[method-assign]

    class Conn:
        def __init__(self) -> None:
            self.rejected: list[int] = []

        def reject_session(self, session_id, code, reason):
            self.rejected.append(session_id)

    conn = Conn()
    keyserver(conn, LoginRequested(3, b"someone"))  # type: ignore[arg-type]
    assert conn.rejected == [3]
    assert sample(metrics, "keymgmt_storage_errors_total") == 1
    storage.close()


def test_parse_listen():
    assert parse_listen("") is None and parse_listen("  ") is None
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("65536", "host:", ":1", "x", "1:2:x", "-1"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_http_answers():
    metrics = ServerMetrics()
    assert answer(b"GET /healthz HTTP/1.1\r\n\r\n", True, metrics).startswith(b"HTTP/1.1 200 ")
    assert answer(b"GET /healthz HTTP/1.0\r\n\r\n", False, metrics).startswith(b"HTTP/1.1 503 ")
    assert answer(b"GET /healthz?x=1 HTTP/1.1\r\n\r\n", True, metrics).endswith(b"\r\n\r\nok\n")
    scraped = answer(b"GET /metrics HTTP/1.1\r\n\r\n", True, metrics)
    assert b"text/plain; version=" in scraped and b"keymgmt_logins_total" in scraped
    assert answer(b"DELETE / HTTP/1.1\r\n\r\n", True, metrics).startswith(b"HTTP/1.1 405 ")
    assert answer(b"\x16\x03\x01 binary\r\n\r\n", True, metrics).startswith(b"HTTP/1.1 400 ")


def _without_created_times(text: bytes) -> str:
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text.decode())


def test_the_request_metrics_read_as_prometheus_clients_counter_and_histogram_would():
    """ServerMetrics counts requests in plain lists (cheaper per request) and writes them out
    when scraped: the same text as a prometheus_client Counter and Histogram fed the same
    requests (bucket edges included: a time equal to a bound is in that bound's bucket)."""
    reference = CollectorRegistry(auto_describe=True)
    counter = Counter("keymgmt_requests", _REQUESTS_HELP, ["op", "status"], registry=reference)
    histogram = Histogram(
        "keymgmt_request_duration_seconds",
        _REQUEST_SECONDS_HELP,
        ["op"],
        buckets=_LATENCY,
        registry=reference,
    )
    metrics = ServerMetrics()
    requests = [("RETRIEVE", "OK", seconds) for seconds in (*_LATENCY, 0.0, 0.00011, 3.5)]
    requests += [("RETRIEVE", "NOT_FOUND", 0.0003), ("LIST_KEYS", "OK", 0.001), ("AUDIT", "ENDED", 2.0)]
    for op, status, seconds in requests:
        counter.labels(op, status).inc()
        histogram.labels(op).observe(seconds)
        metrics.request(op, status, seconds)
    ours = _without_created_times(metrics.exposition())
    theirs = _without_created_times(generate_latest(reference))
    assert "keymgmt_request_duration_seconds_bucket" in theirs and "keymgmt_requests_created" in theirs
    assert theirs in ours  # (ours has the other metrics around them)
    assert sample(metrics, "keymgmt_requests_total", op="RETRIEVE", status="OK") == len(_LATENCY) + 3
    assert (
        sample(metrics, "keymgmt_request_duration_seconds_bucket", op="RETRIEVE", le="0.0001") == 2
    )  # 0.0 and 0.0001
    assert sample(metrics, "keymgmt_request_duration_seconds_sum", op="AUDIT") == 2.0


def test_the_group_commit_histograms_read_as_prometheus_clients_histograms_would():
    """The two per-batch histograms are counted in plain lists (a third of Histogram.observe's
    cost, twice per batch) and written out when scraped: the same text as prometheus_client
    Histograms fed the same batches (a value equal to a bound is in that bound's bucket)."""
    reference = CollectorRegistry(auto_describe=True)
    size = Histogram("keymgmt_group_commit_batch_size", _BATCH_HELP, buckets=_BATCH, registry=reference)
    seconds = Histogram(
        "keymgmt_group_commit_duration_seconds", _COMMIT_HELP, buckets=_COMMIT, registry=reference
    )
    metrics = ServerMetrics()
    batches = list(zip((*_BATCH, 0, 3, 1000), (*_COMMIT, 0.0, 7.5), strict=False))
    for works, commit in batches:
        size.observe(works)
        seconds.observe(commit)
        metrics.batch(works, commit, False)
    ours = _without_created_times(metrics.exposition())
    theirs = _without_created_times(generate_latest(reference))
    assert 'keymgmt_group_commit_batch_size_bucket{le="1.0"}' in theirs
    assert theirs in ours  # (ours has the other metrics around them)
    assert sample(metrics, "keymgmt_group_commit_batch_size_count") == len(batches)
    assert sample(metrics, "keymgmt_group_commit_duration_seconds_bucket", le="0.0005") == 2  # 0.0005 and 0.0
