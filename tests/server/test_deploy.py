"""What operators deploy agrees with the server: every metric the Grafana dashboard and the HPA query
exists in /metrics; probes, draining and the Docker image are wired as the server expects."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import httpx
import yaml
from scripted import ScriptedEngine
from serverkit import ROOT

from server.settings import Settings

DEPLOY = ROOT / "deploy"
PROMQL_WORDS = {"sum", "rate", "histogram_quantile", "by", "le", "max", "label_values", "job", "model", "phase"}


def exported_names(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_metric_exists(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))
    httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
    names = exported_names(url)
    dashboard = json.loads((DEPLOY / "grafana" / "blt.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\b(?:blt|process)_[a-z_]+\b", e)}
    assert len(used) >= 15
    assert not sorted(used - names), "queried by the dashboard but not exported"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("bytes / s", "first byte", "inter-byte", "queue", "batch size", "patch length", "global steps"):
        assert topic in titles, topic


def test_kubernetes_manifests(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= {"BLT_" + f.name.upper() for f in fields(Settings)}
    assert "preStop" in container["lifecycle"]
    assert pod["terminationGracePeriodSeconds"] > float(env["BLT_SHUTDOWN_TIMEOUT"]) + 5  # preStop + drain
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "blt_num_requests_waiting" and metric in exported_names(url)


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert "pytorch" in base and "cuda" in base
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^EXPOSE 8000", text, re.M) and "COPY weights weights" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    documented = set(re.findall(r"BLT_[A-Z_]+", text))
    assert {"BLT_" + f.name.upper() for f in fields(Settings)} <= documented
