"""The durable queue on both backends: claims never overlap, leases recover dead claimers."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from storage import queue
from storage.db import make_engine, make_session_factory, transaction
from storage.errors import InvalidRequest
from storage.models import AuditEvent, Lineage, Ticket, TicketKind, TicketStatus

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)  # claims use explicit clocks from here on
LEASE = 30.0


def make_lineage(sessions: sessionmaker[Session], name: str = "default") -> uuid.UUID:
    with transaction(sessions) as s:
        lineage = Lineage(name=name, base_model="tiny-llama")
        s.add(lineage)
        s.flush()
        return lineage.id


def add_tickets(sessions: sessionmaker[Session], lineage_id: uuid.UUID, n: int, *,
                priority: int = 0, engine: str = "npo", kind: TicketKind = TicketKind.forget,
                not_before: datetime | None = None,
                created_at: datetime | None = None) -> list[uuid.UUID]:
    """Queue `n` tickets, created 1 ms apart starting at `created_at` (so order is known)."""
    start = created_at or datetime.now(timezone.utc)
    ids = []
    with transaction(sessions) as s:
        for i in range(n):
            ticket = Ticket(kind=kind, lineage_id=lineage_id, engine=engine, target="Jane Roe",
                            payload={"forget": {"texts": [f"secret {i}"], "qa": []}},
                            payload_sha256=f"{i:064x}", status=TicketStatus.queued,
                            priority=priority, not_before=not_before, requester="dpo",
                            created_at=start + timedelta(milliseconds=i))
            s.add(ticket)
            s.flush()
            ids.append(ticket.id)
    return ids


def get(sessions: sessionmaker[Session], ticket_id: uuid.UUID) -> Ticket:
    with sessions() as s:
        return s.get_one(Ticket, ticket_id)


def claim(sessions: sessionmaker[Session], owner: str, *, now: datetime = T0, limit: int = 1,
          max_attempts: int = 3, **kw) -> list[queue.ClaimedTicket]:  # type: ignore[no-untyped-def]
    return queue.claim(sessions, owner=owner, limit=limit, lease_seconds=LEASE,
                       max_attempts=max_attempts, now=now, **kw)


def actions(sessions: sessionmaker[Session], ticket_id: uuid.UUID) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent.action)
                              .where(AuditEvent.subject_type == "ticket",
                                     AuditEvent.subject_id == str(ticket_id))
                              .order_by(AuditEvent.id)))


@BOTH
def test_claim_sets_lease_and_counts_the_attempt(db):
    lineage = make_lineage(db.sessions)
    [tid] = add_tickets(db.sessions, lineage, 1)

    [claimed] = claim(db.sessions, "worker-a")

    assert claimed.id == tid and claimed.attempts == 1 and claimed.lease_owner == "worker-a"
    assert claimed.payload == {"forget": {"texts": ["secret 0"], "qa": []}}
    assert claimed.lease_expires_at == T0 + timedelta(seconds=LEASE)
    row = get(db.sessions, tid)
    assert (row.status, row.lease_owner, row.attempts) == (TicketStatus.running, "worker-a", 1)
    assert row.lease_expires_at == T0 + timedelta(seconds=LEASE)
    assert actions(db.sessions, tid) == ["ticket.claimed"]
    assert claim(db.sessions, "worker-b") == []  # nothing else is queued


@BOTH
def test_claim_takes_highest_priority_first_then_oldest(db):
    lineage = make_lineage(db.sessions)
    base = datetime.now(timezone.utc)
    low = add_tickets(db.sessions, lineage, 3, priority=0, created_at=base)
    high = add_tickets(db.sessions, lineage, 2, priority=5, created_at=base + timedelta(seconds=1))
    urgent = add_tickets(db.sessions, lineage, 1, priority=9,
                         created_at=base + timedelta(seconds=2))

    order = [t.id for t in claim(db.sessions, "w", limit=2)]
    order += [t.id for _ in range(4) for t in claim(db.sessions, "w")]

    assert order == urgent + high + low


@BOTH
def test_not_before_holds_a_ticket_back_until_its_time(db):
    lineage = make_lineage(db.sessions)
    [later] = add_tickets(db.sessions, lineage, 1, priority=10,
                          not_before=T0 + timedelta(minutes=5))
    [now] = add_tickets(db.sessions, lineage, 1)

    assert [t.id for t in claim(db.sessions, "w", limit=5)] == [now]
    assert queue.complete(db.sessions, ticket_id=now, owner="w", version_id=None, receipt={})
    assert claim(db.sessions, "w", now=T0 + timedelta(minutes=4)) == []
    assert [t.id for t in claim(db.sessions, "w", now=T0 + timedelta(minutes=5))] == [later]


@BOTH
def test_claim_filters_by_lineage_kind_and_engine(db):
    a, b = make_lineage(db.sessions, "a"), make_lineage(db.sessions, "b")
    [a_npo] = add_tickets(db.sessions, a, 1, engine="npo")
    [a_s3t] = add_tickets(db.sessions, a, 1, engine="s3t", kind=TicketKind.delete_records)
    [b_npo] = add_tickets(db.sessions, b, 1, engine="npo")

    assert [t.id for t in claim(db.sessions, "w", limit=9, lineage_id=b)] == [b_npo]
    assert [t.id for t in claim(db.sessions, "w", limit=9, engines=["s3t"])] == [a_s3t]
    assert claim(db.sessions, "w", limit=9, kinds=[TicketKind.delete_records]) == []
    assert [t.id for t in claim(db.sessions, "w", limit=9, kinds=["forget"])] == [a_npo]


def _claim_until_empty(url: str, owner: str, start: threading.Barrier,
                       out: dict[str, list[uuid.UUID]], errors: list[BaseException]) -> None:
    # Its own engine: two claimers share nothing but the database, as two dispatchers would.
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    got: list[uuid.UUID] = []
    try:
        start.wait(timeout=30)
        deadline = time.monotonic() + 60
        for i in range(600):  # bounded: 200 tickets, at most 2 per claim, plus empty polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"{owner} still claiming after 60 s")
            batch = queue.claim(sessions, owner=owner, limit=1 + i % 2, lease_seconds=LEASE,
                                max_attempts=3)
            if not batch:
                break
            got.extend(t.id for t in batch)
            # A real dispatcher hands the batch over before claiming again; this gap is
            # also what lets the other claimer in between on SQLite's single write lock.
            time.sleep(0.002)
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)
    finally:
        out[owner] = got
        engine.dispose()


@BOTH
def test_two_claimers_never_share_a_ticket_and_together_take_all(db):
    lineage = make_lineage(db.sessions)
    ids = add_tickets(db.sessions, lineage, 200)
    start = threading.Barrier(2)
    out: dict[str, list[uuid.UUID]] = {}
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_claim_until_empty, args=(db.url, owner, start, out, errors))
               for owner in ("claimer-1", "claimer-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    first, second = out["claimer-1"], out["claimer-2"]
    assert len(first) == len(set(first)) and len(second) == len(set(second))
    assert not set(first) & set(second), "a ticket was claimed twice"
    assert sorted(first + second) == sorted(ids)
    assert first and second, "the claimers did not run side by side; the test proved nothing"
    with db.sessions() as s:
        rows = s.scalars(select(Ticket)).all()
    assert {(r.status, r.attempts) for r in rows} == {(TicketStatus.running, 1)}
    owners = {r.id: r.lease_owner for r in rows}
    assert all(owners[i] == "claimer-1" for i in first)
    assert all(owners[i] == "claimer-2" for i in second)


@BOTH
def test_a_dead_claimers_ticket_is_claimed_again_and_the_stale_owner_cannot_touch_it(db):
    lineage = make_lineage(db.sessions)
    [tid] = add_tickets(db.sessions, lineage, 1)
    [first] = claim(db.sessions, "dead-worker")

    # Before the lease runs out nobody else gets it.
    assert claim(db.sessions, "worker-b", now=T0 + timedelta(seconds=LEASE - 1)) == []
    # After it runs out, the next claim recovers it.
    [again] = claim(db.sessions, "worker-b", now=T0 + timedelta(seconds=LEASE + 1))
    assert again.id == first.id and again.attempts == 2 and again.lease_owner == "worker-b"

    # The old owner wakes up: every write of its is refused and changes nothing.
    assert queue.renew_lease(db.sessions, ticket_ids=[tid], owner="dead-worker",
                             lease_seconds=LEASE) == []
    assert queue.set_progress(db.sessions, ticket_ids=[tid], owner="dead-worker",
                              progress={"step": 9}, status=TicketStatus.evaluating) == []
    assert not queue.complete(db.sessions, ticket_id=tid, owner="dead-worker",
                              version_id=None, receipt={"stale": True})
    assert not queue.fail(db.sessions, ticket_id=tid, owner="dead-worker", error="x",
                          retry=False, max_attempts=3)
    assert not queue.reject(db.sessions, ticket_id=tid, owner="dead-worker", error="x")
    row = get(db.sessions, tid)
    assert (row.status, row.lease_owner, row.attempts) == (TicketStatus.running, "worker-b", 2)
    assert row.receipt is None and row.error is None and row.progress == {"phase": "claimed"}

    assert queue.complete(db.sessions, ticket_id=tid, owner="worker-b", version_id=None,
                          receipt={"version": "default@v1"})
    done = get(db.sessions, tid)
    assert done.status is TicketStatus.done and done.receipt["version"] == "default@v1"
    assert done.receipt["done_at"]
    assert done.payload is None, "raw forget text must be purged once done"
    assert done.payload_sha256 == f"{0:064x}"
    assert done.lease_owner is None and done.lease_expires_at is None
    assert actions(db.sessions, tid) == ["ticket.claimed", "ticket.requeued", "ticket.claimed",
                                         "ticket.done"]


@BOTH
def test_lease_expiring_on_the_last_attempt_fails_the_ticket_keeping_its_error(db):
    lineage = make_lineage(db.sessions)
    [tid] = add_tickets(db.sessions, lineage, 1)
    claim(db.sessions, "w1", max_attempts=2)
    assert queue.fail(db.sessions, ticket_id=tid, owner="w1", error="OOM in step 3",
                      retry=True, max_attempts=2)
    row = get(db.sessions, tid)
    assert (row.status, row.error, row.lease_owner) == (TicketStatus.queued, "OOM in step 3", None)

    [second] = claim(db.sessions, "w2", max_attempts=2)
    assert second.attempts == 2
    later = T0 + timedelta(seconds=LEASE + 5)
    assert queue.requeue_expired(db.sessions, max_attempts=2, now=later) == 1

    failed = get(db.sessions, tid)
    assert failed.status is TicketStatus.failed
    assert "lease expired after 2 attempt(s) (last owner w2)" in failed.error
    assert "OOM in step 3" in failed.error
    assert claim(db.sessions, "w3", now=later, max_attempts=2) == []
    assert actions(db.sessions, tid)[-1] == "ticket.failed"


@BOTH
def test_fail_with_retry_requeues_until_attempts_are_used_up(db):
    lineage = make_lineage(db.sessions)
    [tid] = add_tickets(db.sessions, lineage, 1)
    clock = T0
    for attempt in (1, 2):
        [t] = claim(db.sessions, "w", now=clock, max_attempts=3)
        assert t.attempts == attempt
        assert queue.fail(db.sessions, ticket_id=tid, owner="w", error=f"err {attempt}",
                          retry=True, max_attempts=3, retry_delay_seconds=60, now=clock)
        row = get(db.sessions, tid)
        assert (row.status, row.error) == (TicketStatus.queued, f"err {attempt}")
        assert row.not_before == clock + timedelta(seconds=60)
        # The retry delay holds it back.
        assert claim(db.sessions, "w", now=clock + timedelta(seconds=59)) == []
        clock += timedelta(seconds=60)
    [t] = claim(db.sessions, "w", now=clock, max_attempts=3)
    assert t.attempts == 3
    assert queue.fail(db.sessions, ticket_id=tid, owner="w", error="err 3", retry=True,
                      max_attempts=3)
    row = get(db.sessions, tid)
    assert row.status is TicketStatus.failed
    assert row.error == "err 3 (gave up after 3 attempt(s))"
    assert actions(db.sessions, tid).count("ticket.retry") == 2


@BOTH
def test_heartbeat_keeps_the_lease_and_progress_moves_to_evaluating(db):
    lineage = make_lineage(db.sessions)
    ids = add_tickets(db.sessions, lineage, 2)
    claim(db.sessions, "w", limit=2)
    other = add_tickets(db.sessions, lineage, 1)

    renewed_at = T0 + timedelta(seconds=LEASE - 1)
    kept = queue.renew_lease(db.sessions, ticket_ids=ids + other, owner="w",
                             lease_seconds=LEASE, now=renewed_at)
    assert kept == ids  # the unclaimed ticket is not ours
    # The original expiry has passed, but the renewed lease has not.
    assert claim(db.sessions, "thief", now=T0 + timedelta(seconds=LEASE + 1), limit=5,
                 lineage_id=lineage, engines=["npo"])[0].id == other[0]
    assert get(db.sessions, ids[0]).lease_owner == "w"

    assert queue.set_progress(db.sessions, ticket_ids=ids, owner="w",
                              progress={"phase": "training", "step": 3}) == ids
    assert queue.set_progress(db.sessions, ticket_ids=ids, owner="w",
                              progress={"loss": 1.5}, status=TicketStatus.evaluating) == ids
    row = get(db.sessions, ids[0])
    assert row.status is TicketStatus.evaluating
    assert row.progress == {"phase": "training", "step": 3, "loss": 1.5}
    assert actions(db.sessions, ids[0]) == ["ticket.claimed", "ticket.evaluating"]
    with pytest.raises(InvalidRequest):
        queue.set_progress(db.sessions, ticket_ids=ids, owner="w", progress={},
                           status=TicketStatus.done)

    # An evaluating ticket whose lease lapses is recovered like a running one.
    assert queue.requeue_expired(db.sessions, max_attempts=3, now=T0 + timedelta(hours=1)) == 3
    assert get(db.sessions, ids[0]).status is TicketStatus.queued


@BOTH
def test_reject_is_final_and_metrics_count_by_status(db):
    lineage = make_lineage(db.sessions)
    ids = add_tickets(db.sessions, lineage, 4)
    claim(db.sessions, "w", limit=2)
    assert queue.reject(db.sessions, ticket_id=ids[0], owner="w", error="utility fell to 0.3")

    row = get(db.sessions, ids[0])
    assert (row.status, row.error, row.lease_owner) == (TicketStatus.rejected,
                                                        "utility fell to 0.3", None)
    assert not queue.fail(db.sessions, ticket_id=ids[0], owner="w", error="x", retry=True,
                          max_attempts=3)
    with db.sessions() as s:
        assert queue.queue_depth(s) == 2
        counts = queue.count_by_status(s)
    assert counts["queued"] == 2 and counts["running"] == 1 and counts["rejected"] == 1
    assert set(counts) == {s.value for s in TicketStatus}
    assert sum(counts.values()) == 4


@BOTH
def test_claim_query_reads_the_claim_index_without_sorting(db):
    """With many queued tickets the next one must be the first entry of ix_tickets_claim."""
    lineage = make_lineage(db.sessions)
    add_tickets(db.sessions, lineage, 300)
    query = queue.claim_query(now=T0, limit=1)
    with db.engine.connect() as conn:
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        if db.backend == "postgresql":
            conn.execute(text("ANALYZE tickets"))
            # The table is small: forbid the sequential scan so the planner shows its index
            # path; what matters is that this path needs no Sort step.
            conn.execute(text("SET enable_seqscan = off"))
            plan = "\n".join(conn.execute(text(f"EXPLAIN {sql} FOR UPDATE SKIP LOCKED")).scalars())
            assert "ix_tickets_claim" in plan and "Sort" not in plan, plan
        else:
            plan = "\n".join(r[-1] for r in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert "ix_tickets_claim" in plan and "TEMP B-TREE" not in plan, plan


def test_claim_refuses_nonsense_arguments(db):
    with pytest.raises(InvalidRequest):
        queue.claim(db.sessions, owner="", lease_seconds=1, max_attempts=1)
    with pytest.raises(InvalidRequest):
        queue.claim(db.sessions, owner="w", lease_seconds=0, max_attempts=1)
    with pytest.raises(InvalidRequest):
        queue.claim(db.sessions, owner="w", lease_seconds=1, max_attempts=1, limit=0)
