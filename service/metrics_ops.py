"""Operations series read from the database at scrape time (every API replica agrees).

- `oblivio_queue_oldest_age_seconds`: how long the oldest queued ticket has waited.
- `oblivio_queue_wait_seconds` (summary): submission to job start, tickets whose job started
  in the last `window` (24 h).
- `oblivio_job_duration_seconds{phase}` (summary): finished jobs of the window; phase
  `total` is started -> finished, other phases come from the job's `progress.phase_seconds`
  (written by the job runner when it records phase timings).
- `oblivio_jobs{status}`: jobs by status.
- `oblivio_training_loss{lineage}`: the last reported loss of each running job's lineage.
- `oblivio_versions{lineage,status}`: adapter versions per lineage and status.
- `oblivio_live_version{lineage}`: the live version number (absent: base model).
- `oblivio_live_eval{lineage,metric}`: numeric evaluation results of each live version
  (forget_ratio, utility_ratio, ...).
- `oblivio_live_reevaluation{lineage,metric}`: the latest `evaluate` schedule window's
  figures for the version that is still live (metric `passed`: 1 if its verdict was pass),
  so that an alert can fire when the live stack stops forgetting its tickets.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import (
    AdapterVersion,
    Alias,
    Job,
    JobStatus,
    Lineage,
    Schedule,
    Ticket,
    TicketStatus,
    VersionStatus,
    utcnow,
)
from storage.registry import version_label

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)


def _families() -> dict[str, Any]:
    return {
        "oldest": GaugeMetricFamily("oblivio_queue_oldest_age_seconds",
                                    "Age of the oldest queued ticket (0 when none wait)."),
        "wait": SummaryMetricFamily("oblivio_queue_wait_seconds",
                                    "Submission to job start, jobs started in the last 24 h."),
        "duration": SummaryMetricFamily("oblivio_job_duration_seconds",
                                        "Job duration by phase (total = start to finish), "
                                        "jobs finished in the last 24 h.", labels=["phase"]),
        "jobs": GaugeMetricFamily("oblivio_jobs", "Jobs by status.", labels=["status"]),
        "loss": GaugeMetricFamily("oblivio_training_loss",
                                  "Last reported training loss of a running job, by lineage.",
                                  labels=["lineage"]),
        "versions": GaugeMetricFamily("oblivio_versions", "Adapter versions by lineage and "
                                      "status.", labels=["lineage", "status"]),
        "live": GaugeMetricFamily("oblivio_live_version",
                                  "Version number that `live` points at, by lineage.",
                                  labels=["lineage"]),
        "eval": GaugeMetricFamily("oblivio_live_eval", "Evaluation results of each lineage's "
                                  "live version.", labels=["lineage", "metric"]),
        "reeval": GaugeMetricFamily("oblivio_live_reevaluation", "The latest scheduled "
                                    "re-evaluation of each lineage's live version (passed: 1 "
                                    "if its verdict was pass).", labels=["lineage", "metric"]),
    }


class OperationsCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterator[Any]:
        yield from _families().values()

    def collect(self) -> Iterator[Any]:
        families = _families()
        try:
            with self._sessions() as session:
                self._fill(session, families)
        except Exception:  # a scrape must not fail because the DB blinked
            log.exception("could not read operations metrics for /metrics")
            return
        yield from families.values()

    def _fill(self, session: Session, f: dict[str, Any]) -> None:
        now = utcnow()
        since = now - WINDOW
        oldest = session.scalar(select(func.min(Ticket.created_at))
                                .where(Ticket.status == TicketStatus.queued))
        f["oldest"].add_metric([], (now - oldest).total_seconds() if oldest else 0.0)

        waits = [(started - created).total_seconds() for created, started in session.execute(
            select(Ticket.created_at, Job.started_at).join(Job, Job.id == Ticket.job_id)
            .where(Job.started_at >= since)).tuples() if started and created]
        f["wait"].add_metric([], count_value=len(waits), sum_value=sum(waits))

        durations: dict[str, list[float]] = defaultdict(list)
        for started, finished, progress in session.execute(
                select(Job.started_at, Job.finished_at, Job.progress)
                .where(Job.finished_at >= since)).tuples():
            if started and finished:
                durations["total"].append((finished - started).total_seconds())
            for phase, seconds in ((progress or {}).get("phase_seconds") or {}).items():
                if isinstance(seconds, (int, float)):
                    durations[str(phase)].append(float(seconds))
        for phase in ("total", *sorted(p for p in durations if p != "total")):
            values = durations.get(phase, [])
            f["duration"].add_metric([phase], count_value=len(values), sum_value=sum(values))

        counts = {status: n for status, n in session.execute(
            select(Job.status, func.count()).group_by(Job.status))}
        for status in JobStatus:
            f["jobs"].add_metric([status.value], float(counts.get(status, 0)))

        names = {i: n for i, n in session.execute(select(Lineage.id, Lineage.name))}
        latest_loss: dict[str, tuple[Any, float]] = {}
        for lineage_id, created, progress in session.execute(
                select(Job.lineage_id, Job.created_at, Job.progress)
                .where(Job.status.in_([JobStatus.running, JobStatus.evaluating]))).tuples():
            loss = (progress or {}).get("loss")
            name = names.get(lineage_id, str(lineage_id))
            if isinstance(loss, (int, float)) and (name not in latest_loss
                                                   or created > latest_loss[name][0]):
                latest_loss[name] = (created, float(loss))
        for name, (_created, loss) in sorted(latest_loss.items()):
            f["loss"].add_metric([name], loss)

        per: dict[tuple[str, str], int] = defaultdict(int)
        for lineage_id, status, n in session.execute(
                select(AdapterVersion.lineage_id, AdapterVersion.status, func.count())
                .group_by(AdapterVersion.lineage_id, AdapterVersion.status)).tuples():
            per[(names.get(lineage_id, str(lineage_id)), status.value)] = n
        for lineage_name in sorted(names.values()):
            for status in VersionStatus:
                f["versions"].add_metric([lineage_name, status.value],
                                         float(per.get((lineage_name, status.value), 0)))

        live_label: dict[str, str] = {}
        for lineage_name, number, metrics in session.execute(
                select(Lineage.name, AdapterVersion.version, AdapterVersion.metrics)
                .join(Alias, Alias.lineage_id == Lineage.id)
                .join(AdapterVersion, AdapterVersion.id == Alias.version_id)
                .where(Alias.name == "live").order_by(Lineage.name)).tuples():
            f["live"].add_metric([lineage_name], float(number))
            live_label[lineage_name] = version_label(lineage_name, number)
            for key, value in sorted((metrics or {}).items()):
                if _is_number(value):
                    f["eval"].add_metric([lineage_name, key], float(value))

        for lineage_name, result in session.execute(
                select(Lineage.name, Schedule.last_result)
                .join(Lineage, Lineage.id == Schedule.lineage_id)
                .where(Schedule.action == "evaluate").order_by(Lineage.name)).tuples():
            if not result or result.get("version") != live_label.get(lineage_name):
                continue  # never run, skipped, or about a version that is no longer live
            figures = result.get("evaluation") or {}
            f["reeval"].add_metric([lineage_name, "passed"],
                                   1.0 if figures.get("verdict") == "pass" else 0.0)
            for key, value in sorted(figures.items()):
                if _is_number(value):
                    f["reeval"].add_metric([lineage_name, key], float(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
