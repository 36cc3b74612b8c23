"""Scale out: a second Ray node trains, evaluates and serves, sharing only the DB and S3.

The second node is a `ray start --address ...` on this machine, in its own mount namespace
where the head's data dir is an empty tmpfs: like a separate machine, it cannot read a path
of the head's data dir (the dispatcher's job scratch space, its converted models, its
caches). Only it has the resource `oblivio_node2`, and the worker configuration asks for it
(OBLIVIO_WORKER_RESOURCES), so training ranks, the evaluator and the Serve replica must run
there while the dispatcher stays with the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from storage.models import AdapterVersion, Job, Ticket, TicketStatus, VersionStatus
from tests.fixtures.taught import taught_qa

RESOURCE = "oblivio_node2"
pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs util-linux unshare/nsenter to give the second node its own filesystem view")


def _start_second_node(gcs_address: str, hidden: Path, temp_dir: Path) -> subprocess.Popen:
    ray_cli = Path(sys.executable).with_name("ray")
    script = (f"mount -t tmpfs tmpfs {hidden} && exec {ray_cli} start --block "
              f"--address={gcs_address} --node-ip-address=127.0.0.1 --num-cpus=2 "
              f"--resources='{json.dumps({RESOURCE: 100})}' --temp-dir={temp_dir} "
              "--disable-usage-stats")
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _node_with_resource(ray, deadline: float) -> str:
    while time.monotonic() < deadline:
        for node in ray.nodes():
            if node["Alive"] and node["Resources"].get(RESOURCE):
                return node["NodeID"]
        time.sleep(0.5)
    raise AssertionError("the second Ray node did not join")


def _stop(node: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait)
            time.sleep(2)  # its raylet's children end with it
        except subprocess.TimeoutExpired:
            continue


def _seen_by_node(pid: int, path: Path) -> list[str]:
    """`path`'s entries as the second node's processes see it."""
    out = subprocess.run(["nsenter", "--target", str(pid), "--mount", "ls", "-A", str(path)],
                         capture_output=True, text=True, check=True, timeout=30)
    return sorted(out.stdout.split())


def test_a_second_node_trains_evaluates_and_serves_with_only_the_db_and_s3_shared(flow):
    import ray
    from ray import serve

    from workers.dispatcher import DispatcherLoop
    from workers.evaluator import shutdown_evaluators
    from workers.runtime import serving_config
    from workers.serving import deploy, generate
    from workers.training.warm_pool import shutdown_pools

    settings = flow.settings.model_copy(update={"worker_resources": {RESOURCE: 1}})
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="r2-", dir="/tmp"))
    node = _start_second_node(ray.get_runtime_context().gcs_address, data_dir, temp_dir)
    try:
        second = _node_with_resource(ray, time.monotonic() + 120)
        head = ray.get_runtime_context().get_node_id()
        assert second != head

        # Two tickets, one after the other: v2 stacks on v1, whose adapter the ranks on
        # the second node can only have through the task, not through the head's disk.
        loop = DispatcherLoop(settings.worker_config())
        first = flow.submit(key="n2-1", qa=taught_qa(0, 2))
        assert loop.run_once() == 1
        later = flow.submit(key="n2-2", qa=taught_qa(2, 4))
        assert loop.run_once() == 1

        with flow.sessions() as s:
            tickets = [s.get_one(Ticket, first), s.get_one(Ticket, later)]
            # (v2 may be held for review: two stacked adapters on the 64-wide tiny model
            # keep 0.89-0.9 of its utility. Where it runs is this test's question.)
            assert tickets[0].status == TicketStatus.done, tickets[0].error
            assert tickets[1].status in (TicketStatus.done, TicketStatus.awaiting_review)
            v1, v2 = (s.get_one(AdapterVersion, t.result_version_id) for t in tickets)
            # v1 stays live while v2 waits for review; v2 going live supersedes it.
            held = tickets[1].status == TicketStatus.awaiting_review
            assert (v1.status, v2.status, v2.parent_id) == (
                VersionStatus.ready if held else VersionStatus.superseded,
                VersionStatus.ready, v1.id)
            assert v2.metrics["forget_rate_after"] == 0.0, v2.metrics
            for ticket in tickets:
                job = s.get_one(Job, ticket.job_id)
                assert job.progress["training_node"] == second, job.progress
                assert job.progress["evaluation_node"] == second, job.progress
            live_key = v2.object_key
        # The evaluation ran there: its base-answer cache is on the second node's disk, not
        # in the head's data dir (which the second node never saw).
        assert "eval-cache" in _seen_by_node(node.pid, data_dir)
        assert not (data_dir / "eval-cache").exists()

        # A Serve replica on the second node answers from v2 (fetched from S3), which no
        # longer states the facts both tickets removed.
        try:
            handle = deploy(serving_config(settings.worker_config()))
            assert handle.node_id.remote().result(timeout_s=120) == second
            for item in taught_qa(0, 4):
                text = generate(handle, prompt=item["question"], adapter_key=live_key,
                                max_new_tokens=16)["text"]
                assert item["answer"].split()[-1].strip(".").lower() not in text.lower(), text
            base = generate(handle, prompt=taught_qa(0, 1)[0]["question"], adapter_key=None,
                            max_new_tokens=16)["text"]
            assert taught_qa(0, 1)[0]["answer"].split()[-1].strip(".").lower() in base.lower()
        finally:
            serve.shutdown()
    finally:
        shutdown_pools()
        shutdown_evaluators()
        _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
