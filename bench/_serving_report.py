"""bench/serving.py's results: one Result per server, protocol, model and concurrency; the tables,
the ratios (aidc / KServe in the same protocol, binary and gRPC / JSON on the same server) and
issue 16's goals checked cell by cell."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KSERVE = "kserve"
GOAL_VS_KSERVE = 1.5  # aidc's throughput / KServe's, at <= KServe's p99, in every cell
GOAL_BINARY_VS_JSON = 2.0  # aidc binary / aidc JSON throughput, transformer logits


@dataclass
class Result:
    server: str  # "aidc", "aidc+uvloop", "kserve"
    protocol: str  # "json", "binary", "grpc"
    model: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    output: str = ""  # how the server sent the output back: "json", "binary" (REST), "raw"/"typed" (gRPC)
    mean_batch: float | None = None  # rows per forward pass, from aidc_server's /metrics
    rss_ready_mib: float | None = None  # the server's processes once ready, before any load
    rss_peak_mib: float | None = None  # their high-water mark after every level of this model

    @property
    def row(self) -> str:
        return f"{self.server}/{self.protocol}"

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def ratios(results: list[Result]) -> list[dict]:
    """Per result: throughput vs KServe in the same protocol (with p99 at or below KServe's?) and
    vs the same server's JSON row."""
    by = {(r.server, r.protocol, r.model, r.concurrency): r for r in results}
    out = []
    for r in results:
        k = by.get((KSERVE, r.protocol, r.model, r.concurrency))
        j = by.get((r.server, "json", r.model, r.concurrency))
        vs_kserve = r.rps / k.rps if k and k is not r and k.rps else None
        out.append(
            {
                "row": r.row,
                "model": r.model,
                "concurrency": r.concurrency,
                "vs_kserve": vs_kserve,
                "p99_le_kserve": bool(r.p99_ms <= k.p99_ms) if vs_kserve is not None else None,  # type: ignore[union-attr]
                "vs_own_json": r.rps / j.rps if j and j is not r and j.rps else None,
            }
        )
    return out


def print_table(results: list[Result]) -> None:
    """Markdown: every row next to KServe in the same protocol and to its own server's JSON."""
    print(
        "\n| model | concurrency | server/protocol | output | req/s | p50 ms | p99 ms "
        "| vs KServe same protocol: throughput | p99 | vs own JSON |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r, q in zip(results, ratios(results), strict=True):
        vs_k = f"**{q['vs_kserve']:.2f}x**" if q["vs_kserve"] is not None else ""
        p99 = "" if q["p99_le_kserve"] is None else ("lower" if q["p99_le_kserve"] else "higher")
        vs_j = f"{q['vs_own_json']:.2f}x" if q["vs_own_json"] is not None else ""
        print(
            f"| {r.model} | {r.concurrency} | {r.row} | {r.output} | {r.rps:.0f} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {vs_k} | {p99} | {vs_j} |"
        )


def print_goals(results: list[Result]) -> None:
    """Issue 16's goals, per aidc variant and protocol: how many cells meet them, the worst ratio."""
    rows = list(zip(results, ratios(results), strict=True))
    print()
    for row in dict.fromkeys(r.row for r, _ in rows if r.server != KSERVE):
        cells = [q for r, q in rows if r.row == row and q["vs_kserve"] is not None]
        if cells:
            met = sum(q["vs_kserve"] >= GOAL_VS_KSERVE and q["p99_le_kserve"] for q in cells)
            worst = min(q["vs_kserve"] for q in cells)
            print(
                f"# goal {row} >= {GOAL_VS_KSERVE}x KServe's throughput at <= its p99: {met}/{len(cells)} "
                f"cells, lowest ratio {worst:.2f}x"
            )
        binary = [q for r, q in rows if r.row == row and r.protocol == "binary" and r.model == "transformer"]
        if binary and all(q["vs_own_json"] is not None for q in binary):
            met = sum(q["vs_own_json"] >= GOAL_BINARY_VS_JSON for q in binary)
            worst = min(q["vs_own_json"] for q in binary)
            print(
                f"# goal {row} >= {GOAL_BINARY_VS_JSON}x its JSON throughput (transformer): "
                f"{met}/{len(binary)} cells, lowest ratio {worst:.2f}x"
            )


def print_memory_table(results: list[Result]) -> None:
    """Memory is per server process (all its protocols): one line per server and model."""
    print("\n| model | server | resident once ready (MiB) | peak under load (MiB) | peak vs KServe |")
    print("|---|---|---:|---:|---:|")
    seen = set()
    by = {(r.server, r.model): r for r in results}
    for r in results:
        if (r.server, r.model) in seen or r.rss_peak_mib is None:
            continue
        seen.add((r.server, r.model))
        k = by.get((KSERVE, r.model))
        vs = k is not None and k.rss_peak_mib and r.server != KSERVE
        ratio = f"{r.rss_peak_mib / k.rss_peak_mib:.2f}x" if vs else ""  # type: ignore[union-attr]
        print(f"| {r.model} | {r.server} | {r.rss_ready_mib:.0f} | {r.rss_peak_mib:.0f} | {ratio} |")


def to_json(results: list[Result]) -> list[dict]:
    return [
        asdict(r) | {"row": r.row, "rps": r.rps} | q for r, q in zip(results, ratios(results), strict=True)
    ]
