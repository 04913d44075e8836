"""bench.server.start_all: servers start together, and every one is stopped when any fails."""

from contextlib import ExitStack

import pytest

from vllm_kvsparse.bench.server import start_all


class FakeServer:
    def __init__(self, fail=False):
        self.fail, self.started, self.stopped = fail, False, False

    def __enter__(self):
        if self.fail:
            raise RuntimeError("vllm serve exited with 1")
        self.started = True
        return self

    def stop(self):
        self.stopped = True


def test_all_started_then_all_stopped():
    servers = {n: FakeServer() for n in "abc"}
    with ExitStack() as stack:
        assert start_all(stack, servers) is servers
        assert all(s.started and not s.stopped for s in servers.values())
    assert all(s.stopped for s in servers.values())


def test_one_failure_stops_the_others():
    servers = {"a": FakeServer(), "b": FakeServer(fail=True), "c": FakeServer()}
    with pytest.raises(RuntimeError, match="exited with 1"):
        with ExitStack() as stack:
            start_all(stack, servers)
    assert servers["a"].stopped and servers["c"].stopped
