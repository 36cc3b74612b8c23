"""/metrics carries the operations series, read from the database at scrape time."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage import registry
from storage.db import transaction
from storage.models import Job, JobStatus, Lineage, Schedule, utcnow
from tests.fixtures.versions import add_version
from tests.service.conftest import Api
from workers import telemetry
from workers.job_phases import PhaseClock
from workers.logcontext import JsonFormatter, log_context
from workers.telemetry import merge_progress

TICKET = {"kind": "forget", "target": "X", "forget": {"qa": [{"question": "q?", "answer": "a"}]}}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_expose_queue_jobs_versions_and_live_eval(api: Api) -> None:
    c, op = api.client, api.headers("operator")
    for _ in range(2):
        assert c.post("/v1/tickets", headers=op, json=TICKET).status_code == 202
    store = api.settings.store_config().open()
    add_version(api.db.sessions, store, lineage="default", adapter_dir=None, promote=True,
                metrics={"forget_ratio": 0.1, "utility_ratio": 0.93, "verdict": "pass"})
    add_version(api.db.sessions, store, lineage="default", adapter_dir=None, candidate=True)
    now = utcnow()
    with transaction(api.db.sessions) as s:
        lineage_id = s.query(Lineage.id).filter(Lineage.name == "default").scalar()
        s.add(Job(lineage_id=lineage_id, engine="npo", status=JobStatus.succeeded,
                  started_at=now - timedelta(seconds=90), finished_at=now,
                  progress={"phase": "succeeded",
                            "phase_seconds": {"training": 60.0, "evaluating": 20.0}}))
        s.add(Job(lineage_id=lineage_id, engine="npo", status=JobStatus.running,
                  started_at=now, progress={"phase": "training", "step": 3, "loss": 1.25}))

        # The live version's latest scheduled re-evaluation, and one of an older version.
        for lineage_name, version in (("default", 1), ("other", 1)):
            other = registry.ensure_lineage(s, name=lineage_name, base_model="tiny-test-model")
            s.add(Schedule(lineage_id=other.id, action="evaluate", cron="0 4 * * *",
                           next_run_at=now, created_by="test", last_result={
                               "version": f"{lineage_name}@v{version}",
                               "evaluation": {"verdict": "hold", "forget_ratio": 0.4}}))

    got = _samples(c.get("/metrics").text)
    assert got[("oblivio_live_reevaluation", (("lineage", "default"), ("metric", "passed")))] \
        == 0.0
    assert got[("oblivio_live_reevaluation",
                (("lineage", "default"), ("metric", "forget_ratio")))] == 0.4
    assert not any(k[0] == "oblivio_live_reevaluation" and ("lineage", "other") in k[1]
                   for k in got)  # "other" has no live version
    assert got[("oblivio_tickets", (("status", "queued"),))] == 2
    assert got[("oblivio_queue_depth", ())] == 2
    assert got[("oblivio_queue_oldest_age_seconds", ())] >= 0
    assert ("oblivio_queue_wait_seconds_count", ()) in got
    assert got[("oblivio_job_duration_seconds_sum", (("phase", "total"),))] == 90.0
    assert got[("oblivio_job_duration_seconds_sum", (("phase", "training"),))] == 60.0
    assert got[("oblivio_jobs", (("status", "running"),))] == 1
    assert got[("oblivio_training_loss", (("lineage", "default"),))] == 1.25
    assert got[("oblivio_versions", (("lineage", "default"), ("status", "ready")))] == 2
    assert got[("oblivio_live_version", (("lineage", "default"),))] == 1
    assert got[("oblivio_live_eval", (("lineage", "default"), ("metric", "utility_ratio")))] \
        == 0.93
    # generate latency is declared even before the first generation
    assert "oblivio_generate_latency_seconds" in c.get("/metrics").text


def test_progress_updates_leave_phase_timings_to_the_phase_clock() -> None:
    # The clock's record (job_runner._save_phases) is on the job; later updates keep it.
    clock = PhaseClock(submitted_at=datetime.fromtimestamp(100.0, timezone.utc),
                       started_at=102.0)
    clock.add("training", 103.0, 130.0)
    p = merge_progress(None, {"phase": "preparing"})
    p = merge_progress(p, clock.record(live=False))
    p = merge_progress(p, {"phase": "training", "step": 2, "loss": 0.5})
    p = merge_progress(p, {"phase": "evaluating"})
    assert p["phase_seconds"] == {"queue_wait": 2.0, "training": 27.0}
    assert p["step"] == 2 and p["phase"] == "evaluating" and "phase_started_at" not in p


def test_rays_phase_histogram_reads_the_phase_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    observed: list[tuple[float, dict[str, str]]] = []

    class Histogram:
        def observe(self, value: float, tags: dict[str, str]) -> None:
            observed.append((value, tags))

    monkeypatch.setattr(telemetry, "_ray_metrics", lambda: {"phase": Histogram()})
    clock = PhaseClock(submitted_at=datetime.fromtimestamp(100.0, timezone.utc),
                       started_at=102.0)
    clock.add("training", 103.0, 130.0)
    clock.add("evaluation", 130.0, 131.5)
    telemetry.observe_phases(clock)
    assert observed == [(2.0, {"phase": "queue_wait"}), (27.0, {"phase": "training"}),
                        (1.5, {"phase": "evaluation"})]


def test_json_logs_carry_ticket_and_job_ids() -> None:
    record = logging.LogRecord("workers.jobs", logging.INFO, __file__, 1, "job %s done",
                               ("j-1",), None)
    with log_context(job_id="j-1", ticket_ids=["t-1", "t-2"]):
        line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job j-1 done" and line["level"] == "info"
    assert line["job_id"] == "j-1" and line["ticket_ids"] == ["t-1", "t-2"]
    outside = json.loads(JsonFormatter().format(record))
    assert "job_id" not in outside
