"""deploy/ is valid: Kubernetes + KubeRay manifests against schemas (no network), the
compose file, and the Grafana dashboard's series against what /metrics really exposes."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.deploy.kuberay_schema import SCHEMAS, pod_templates
from tests.service.conftest import Api

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = kubernetes_validate.latest_version()


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def validate(doc: dict) -> None:
    """Raise if `doc` is not a valid resource (KubeRay CRD subset or core Kubernetes)."""
    if doc.get("apiVersion") == "ray.io/v1":
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        for template in pod_templates(doc):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": "t"}, "template": template},
                                         K8S, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_every_manifest_validates() -> None:
    docs = _docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayService", "RayCluster", "RayJob", "CronJob", "ConfigMap", "Secret",
            "Deployment", "Service"} <= kinds
    for name, doc in docs:
        try:
            validate(doc)
        except Exception as exc:  # name the file and resource that failed
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc}") \
                from exc


def test_the_validator_catches_mistakes() -> None:
    docs = dict(((d["kind"]), d) for _, d in _docs())
    typo = copy.deepcopy(docs["RayCluster"])
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt
    bad_pod = copy.deepcopy(docs["RayService"])
    bad_pod["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "envFrom"] = "oblivio"  # must be a list
    bad_cron = copy.deepcopy(docs["CronJob"])
    bad_cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] = 3
    for broken in (typo, bad_pod, bad_cron):
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(broken)


def test_gpu_training_group_and_config_wiring() -> None:
    docs = _docs()
    service = next(d for _, d in docs if d["kind"] == "RayService")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in
           g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "a worker group must request GPUs for DeepSpeed training"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert importlib.util.find_spec(module) is not None and attr == "app"
    workers = DEPLOY.parent / "workers"
    source = (workers / "serve_ingress.py").read_text() + (workers / "serving.py").read_text()
    for deployment in app["deployments"]:  # the names serveConfigV2 overrides must exist
        assert f'name="{deployment["name"]}"' in source, deployment["name"]
    # Every pod takes its configuration from the ConfigMap and the Secret.
    for name, doc in docs:
        for template in (pod_templates(doc) if doc["apiVersion"] == "ray.io/v1" else []):
            refs = template["spec"]["containers"][0]["envFrom"]
            assert {"configMapRef": {"name": "oblivio-config"}} in refs, name
            assert {"secretRef": {"name": "oblivio"}} in refs, name


def test_every_oblivio_variable_in_deploy_is_a_real_setting() -> None:
    fields = {f"OBLIVIO_{name.upper()}" for name in Settings.model_fields}
    fields.add("OBLIVIO_TORCH_SPEC")  # read by scripts/bootstrap.sh at image build
    found = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in ("", ".yml", ".yaml", ".cuda") or \
                path.name.startswith("Dockerfile"):
            found |= set(re.findall(r"OBLIVIO_[A-Z0-9_]+", path.read_text()))
    assert found, "no settings found in deploy/"
    assert found <= fields, f"unknown settings: {sorted(found - fields)}"


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"postgres", "minio", "oblivio", "prometheus"} <= set(compose["services"])
    env = compose["services"]["oblivio"]["environment"]
    assert env["OBLIVIO_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["OBLIVIO_OBJECT_STORE"].startswith("s3://")
    assert (DEPLOY / "Dockerfile").exists() and (DEPLOY / "Dockerfile.cuda").exists()
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"],
                                 capture_output=True).returncode == 0:
        run = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"),
                              "config", "-q"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


def test_grafana_and_prometheus_use_series_that_exist(api: Api) -> None:
    exposed = api.client.get("/metrics").text
    dashboard = json.loads((DEPLOY / "grafana" / "oblivio-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b((?:ray_)?oblivio_[a-z_]+)", " ".join(exprs)))
    assert len(names) >= 10
    worker_code = " ".join(p.read_text() for p in (DEPLOY.parent / "workers").rglob("*.py"))
    for name in names:
        base = re.sub(r"_(sum|count|bucket|total)$", "", name)
        if base.startswith("ray_"):  # exported by Ray's metrics agent from worker metrics
            assert f'"{base[4:]}"' in worker_code, f"no Ray metric {base[4:]} in workers/"
        else:
            assert re.search(rf"^# TYPE {base}(_total)? ", exposed, re.M), f"{base} not on /metrics"
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    api_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "oblivio-api")
    assert api_job["metrics_path"] == "/metrics"
