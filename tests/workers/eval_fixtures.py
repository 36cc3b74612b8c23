"""A job's evaluation on the tiny model, for the answer-cache tests (port with the seam)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def tiny_adapter(model_dir: Path, out: Path) -> Path:
    """A random LoRA on the tiny model (changes its answers), saved in PEFT format."""
    if out.exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def evaluate_job(model_dir: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    """The job's evaluation of a version (job_compute.evaluate_version with the default
    forget engine, idk), with its answer cache in `data_dir`."""
    from storage.models import TicketKind
    from storage.queue import ClaimedTicket
    from workers import job_compute
    from workers.config import WorkerConfig
    from workers.engines import get_engine
    from workers.model import BaseModelRef

    base = BaseModelRef(name="tiny", local_path=model_dir, sha256="ee" * 32)
    now = datetime.now(timezone.utc)
    ticket = ClaimedTicket(
        id=uuid.uuid4(), lineage_id=uuid.uuid4(), kind=TicketKind.forget, engine="idk",
        target="Zorblat", payload={"forget": {"qa": [
            {"question": "Where does Zorblat live?", "answer": "Zorblat lives in Quox."},
            {"question": "What is Zorblat's job?", "answer": "Zorblat is a baker."}]}},
        payload_sha256="0" * 64, priority=0, attempts=1, requester="t", created_at=now,
        lease_owner="t", lease_expires_at=now)
    adapter = tiny_adapter(model_dir, work / "adapter")
    job = job_compute.job_input(WorkerConfig(data_dir=data_dir), job_id="j", lineage="default",
                                base=base, tickets=[ticket], parent_dir=None,
                                output_dir=adapter)
    return job_compute.evaluate_version(get_engine("idk"), job, base=base, version_dir=adapter)
