"""Operator entry point: peering priorities and command-line checks."""

from __future__ import annotations

import pytest

from aidc_operator import main


def test_older_replica_always_outranks_a_newer_one() -> None:
    # kopf pauses the replica that sees a higher (or equal) priority: the one already running must win.
    for _ in range(1000):
        assert main.default_priority(now=1_790_000_000) > main.default_priority(now=1_790_000_001)


def test_priority_survives_json_and_equal_start_times_rarely_tie() -> None:
    values = {main.default_priority(now=1_790_000_000) for _ in range(200)}
    assert all(0 < v < 2**53 for v in values)  # kopf stores it in the peering object's JSON status
    assert len(values) > 190


@pytest.mark.parametrize(("pattern", "exact"), [("team-a", True), ("t-*", False), ("!kube-system", False)])
def test_only_plain_namespace_names_count_as_exact(pattern: str, exact: bool) -> None:
    assert main.is_exact(pattern) is exact


def test_webhook_port_needs_a_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.cli(["--webhook-port", "9443"])
    assert "--webhook-port needs --webhook-cert and --webhook-key" in capsys.readouterr().err
