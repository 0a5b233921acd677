"""Ports for test and cluster servers come from outside the kernel's ephemeral range, so an outgoing
connection can never take one between the pick and the server's bind (the EADDRINUSE flake)."""

from __future__ import annotations

import socket

import pytest

import cluster_processes
from cluster_processes import _ephemeral_range, free_port


def test_ports_lie_below_the_ephemeral_range_differ_and_bind() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports), (low, high, ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    held = socket.socket()
    held.bind(("0.0.0.0", free_port()))
    held.listen()
    taken = held.getsockname()[1]
    other = free_port()  # known free, and no longer a candidate once handed out: release it for the picker
    cluster_processes._handed_out.difference_update({taken, other})  # only the bind check may refuse `taken`
    proposals = iter([taken, other])

    class Scripted:
        def __init__(self, _seed: int) -> None: ...

        def randrange(self, _a: int, _b: int) -> int:
            return next(proposals)

    monkeypatch.setattr(cluster_processes.random, "Random", Scripted)
    try:
        assert free_port() == other
    finally:
        held.close()
