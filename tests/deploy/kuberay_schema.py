"""JSON schemas for the KubeRay ray.io/v1 resources we ship (RayCluster, RayService, RayJob).

Written from KubeRay's v1 CRDs for the fields oblivio uses, strict (`additionalProperties:
false`) so that a misspelt field fails instead of being silently ignored by the operator.
Embedded pod templates are checked separately against Kubernetes' own schema (as a v1
PodTemplate, with kubernetes-validate's vendored schemas), so no network is needed.
"""

from __future__ import annotations

from typing import Any

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked by kubernetes-validate
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": STR_MAP,
                           "annotations": STR_MAP}, "additionalProperties": False}

HEAD_GROUP = {
    "type": "object", "required": ["template"], "additionalProperties": False,
    "properties": {"rayStartParams": STR_MAP, "template": POD_TEMPLATE,
                   "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                   "enableIngress": {"type": "boolean"}},
}
WORKER_GROUP = {
    "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0},
                   "maxReplicas": {"type": "integer", "minimum": 0},
                   "rayStartParams": STR_MAP, "template": POD_TEMPLATE,
                   "numOfHosts": {"type": "integer", "minimum": 1},
                   "suspend": {"type": "boolean"}},
}
RAY_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
    "properties": {"rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                   "headGroupSpec": HEAD_GROUP,
                   "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
                   "suspend": {"type": "boolean"}},
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": METADATA, "spec": spec}}


SCHEMAS: dict[str, dict[str, Any]] = {
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC),
    "RayService": _resource("RayService", {
        "type": "object", "required": ["rayClusterConfig", "serveConfigV2"],
        "additionalProperties": False,
        "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER_SPEC,
                       "serviceUnhealthySecondThreshold": {"type": "integer"},
                       "deploymentUnhealthySecondThreshold": {"type": "integer"},
                       "upgradeStrategy": {"type": "object"}}}),
    "RayJob": _resource("RayJob", {
        "type": "object", "required": ["entrypoint"], "additionalProperties": False,
        "properties": {"entrypoint": {"type": "string", "minLength": 1},
                       "clusterSelector": STR_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC,
                       "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                       "runtimeEnvYAML": {"type": "string"},
                       "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                       "backoffLimit": {"type": "integer", "minimum": 0},
                       "shutdownAfterJobFinishes": {"type": "boolean"},
                       "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                       "submitterPodTemplate": POD_TEMPLATE, "suspend": {"type": "boolean"}},
        "oneOf": [{"required": ["clusterSelector"]}, {"required": ["rayClusterSpec"]}]}),
}


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template inside a KubeRay resource."""
    spec = doc["spec"]
    clusters = []
    if doc["kind"] == "RayCluster":
        clusters.append(spec)
    elif doc["kind"] == "RayService":
        clusters.append(spec["rayClusterConfig"])
    elif doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        clusters.append(spec["rayClusterSpec"])
    out = []
    for c in clusters:
        out.append(c["headGroupSpec"]["template"])
        out += [g["template"] for g in c.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        out.append(spec["submitterPodTemplate"])
    return out
