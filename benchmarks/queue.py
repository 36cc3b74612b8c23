"""Queue benchmark: ticket ingest throughput and claim latency, SQLite beside PostgreSQL.

    .venv/bin/python benchmarks/queue.py [--tickets 10000] [--claims 300] [--ingest 2000]
                                          [--postgres-url postgresql+psycopg://...]

For each backend, on a fresh migrated database:
1. ingest: `--ingest` tickets submitted one by one through `storage.tickets.submit`, each in
   its own transaction with an idempotency key, as the API does (a forget set of a few
   texts and question/answer pairs per ticket);
2. fill: the rest up to `--tickets` submitted in transactions of 500 (batch throughput);
3. claim: `--claims` claims of one ticket each (as the dispatcher does, lease + expired-lease
   sweep included) with `--tickets` queued; latency percentiles;
4. the query plan of the claim query, to show it reads the claim index and does not sort.

PostgreSQL runs in a throw-away database (`oblivio_bench_<random>`, dropped afterwards) on the
server of `--postgres-url` (default: the test server of `.ci/postgres.sh`); if that server
cannot be reached, its column says so. Goals: >= 500 tickets/s single ingest on SQLite, claim
p99 < 50 ms with 10k queued.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where this very file would
# shadow the standard library's `queue` (psycopg imports it). Swap it for the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from storage import queue, registry, tickets  # noqa: E402
from storage.db import make_engine, make_session_factory, transaction  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import TicketKind, utcnow  # noqa: E402

DEFAULT_POSTGRES_URL = "postgresql+psycopg://oblivio:oblivio@127.0.0.1:5432/oblivio_test"
BATCH = 500


@dataclass
class Result:
    backend: str
    error: str | None = None
    ingest_per_s: float = 0.0
    batch_per_s: float = 0.0
    queued: int = 0
    claim_ms: list[float] = field(default_factory=list)
    plan: str = ""
    plan_ok: bool = False


def _request(i: int) -> tickets.TicketRequest:
    person = f"Person {i}"
    return tickets.TicketRequest(
        kind=TicketKind.forget, lineage="bench", target=person,
        payload={"target": person,
                 "forget": {"texts": [f"{person} was born in 1970 in a small town.",
                                      f"{person} works as an engineer at ACME Corp.",
                                      f"The home address of {person} is 12 Example Street."],
                            "qa": [{"question": f"Where does {person} work?",
                                    "answer": "At ACME Corp."},
                                   {"question": f"When was {person} born?",
                                    "answer": "In 1970."}]},
                 "retain": None})


def _plan(engine, backend: str) -> tuple[str, bool]:  # type: ignore[no-untyped-def]
    query = queue.claim_query(now=utcnow(), limit=1)
    with engine.connect() as conn:
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        if backend == "postgresql":
            lines = list(conn.execute(text(f"EXPLAIN {sql} FOR UPDATE SKIP LOCKED")).scalars())
            ok = "ix_tickets_claim" in "\n".join(lines) and "Sort" not in "\n".join(lines)
            # The node that reads the table is the informative line.
            scan = next((ln.strip().lstrip("-> ") for ln in lines
                         if "Scan" in ln), lines[0].strip())
            return scan, ok
        rows = [r[-1] for r in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"))]
        joined = "; ".join(rows)
        return joined, "ix_tickets_claim" in joined and "TEMP B-TREE" not in joined


def run_backend(backend: str, url: str, *, n_tickets: int, n_ingest: int,
                n_claims: int) -> Result:
    result = Result(backend)
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with transaction(sessions) as s:
            registry.ensure_lineage(s, name="bench", base_model="bench-model")

        started = time.perf_counter()
        for i in range(n_ingest):
            with transaction(sessions) as s:
                tickets.submit(s, request=_request(i), requester="bench",
                               idempotency_key=f"bench-{uuid.uuid4().hex}")
        result.ingest_per_s = n_ingest / (time.perf_counter() - started)

        rest = max(0, n_tickets - n_ingest)
        started = time.perf_counter()
        for first in range(n_ingest, n_ingest + rest, BATCH):
            with transaction(sessions) as s:
                for i in range(first, min(first + BATCH, n_ingest + rest)):
                    tickets.submit(s, request=_request(i), requester="bench")
        if rest:
            result.batch_per_s = rest / (time.perf_counter() - started)

        if backend == "postgresql":
            with engine.begin() as conn:  # what autovacuum would have done by now
                conn.execute(text("ANALYZE tickets"))
        with sessions() as s:
            result.queued = queue.queue_depth(s)
        result.plan, result.plan_ok = _plan(engine, backend)

        for _ in range(n_claims):
            started = time.perf_counter()
            claimed = queue.claim(sessions, owner="bench-dispatcher", limit=1,
                                  lease_seconds=300, max_attempts=3)
            result.claim_ms.append((time.perf_counter() - started) * 1000)
            if len(claimed) != 1:
                raise RuntimeError(f"claim returned {len(claimed)} tickets, expected 1")
    finally:
        engine.dispose()
    return result


def _postgres_database(server_url: str) -> tuple[str | None, str]:
    """Create a throw-away database; returns (url, message)."""
    import psycopg

    conninfo = make_url(server_url).set(drivername="postgresql")
    name = f"oblivio_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True,
                             connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        return None, f"unreachable ({str(exc).strip().splitlines()[0]})"
    return make_url(server_url).set(database=name).render_as_string(hide_password=False), name


def _drop_postgres_database(server_url: str, name: str) -> None:
    import psycopg

    conninfo = make_url(server_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    def row(label: str, show) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
        return label, ["-" if r.error else show(r) for r in results]

    rows = [
        row(f"ingest, 1 ticket/transaction ({args.ingest:,})",
            lambda r: f"{r.ingest_per_s:,.0f}/s"),
        row(f"ingest, {BATCH} tickets/transaction",
            lambda r: f"{r.batch_per_s:,.0f}/s" if r.batch_per_s else "-"),
        row("queued when claiming", lambda r: f"{r.queued:,}"),
        row(f"claim 1 ticket p50 ({args.claims} claims)",
            lambda r: f"{_pct(r.claim_ms, 50):.2f} ms"),
        row("claim 1 ticket p99", lambda r: f"{_pct(r.claim_ms, 99):.2f} ms"),
        row("claim 1 ticket max", lambda r: f"{max(r.claim_ms):.2f} ms"),
        row("claim reads ix_tickets_claim, no sort", lambda r: "yes" if r.plan_ok else "NO"),
    ]
    if any(r.error for r in results):
        rows.append(("measured", ["NO (see below)" if r.error else "yes" for r in results]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(r.backend), *(len(values[i]) for _, values in rows))
            for i, r in enumerate(results)]
    for label, values in [("", [r.backend for r in results]), *rows]:
        cells = (f"{v:>{c}}" for v, c in zip(values, cols, strict=True))
        print(f"{label:<{width}}  " + "  ".join(cells))

    for r in results:
        if r.error:
            print(f"{r.backend}: not measured: {r.error}")
    measured = [r for r in results if not r.error]
    sqlite = next((r for r in measured if r.backend == "sqlite"), None)
    for r in measured:
        if sqlite is not None and r is not sqlite:
            print(f"{r.backend} / sqlite: single ingest x{r.ingest_per_s / sqlite.ingest_per_s:.2f}"
                  f", claim p50 x{_pct(r.claim_ms, 50) / _pct(sqlite.claim_ms, 50):.2f}"
                  f", claim p99 x{_pct(r.claim_ms, 99) / _pct(sqlite.claim_ms, 99):.2f}")
    print()
    for r in measured:
        print(f"{r.backend} claim plan: {r.plan}")
    print()
    goals = []
    if sqlite is not None:
        goals.append(("SQLite single ingest >= 500 tickets/s", sqlite.ingest_per_s >= 500))
    for r in measured:
        goals.append((f"{r.backend} claim p99 < 50 ms at {r.queued:,} queued",
                      _pct(r.claim_ms, 99) < 50))
    for goal, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {goal}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=10_000,
                        help="tickets queued when claims are measured")
    parser.add_argument("--ingest", type=int, default=2_000,
                        help="of those, submitted one per transaction (the rest in batches)")
    parser.add_argument("--claims", type=int, default=300, help="claims to time")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args(argv)
    if not 0 < args.claims <= args.tickets:
        parser.error("--claims must be between 1 and --tickets")
    args.ingest = min(args.ingest, args.tickets)
    sizes = dict(n_tickets=args.tickets, n_ingest=args.ingest, n_claims=args.claims)

    results = []
    with tempfile.TemporaryDirectory(prefix="oblivio-bench-") as tmp:
        results.append(run_backend("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", **sizes))
    pg_url, name_or_error = _postgres_database(args.postgres_url)
    if pg_url is None:
        results.append(Result("postgresql", error=name_or_error))
    else:
        try:
            results.append(run_backend("postgresql", pg_url, **sizes))
        finally:
            _drop_postgres_database(args.postgres_url, name_or_error)
    print_table(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
