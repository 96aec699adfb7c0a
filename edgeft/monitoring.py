"""The bundle's operations files: Prometheus alert rules (+ their ``promtool test rules`` unit tests),
an example scrape config, and a hardened systemd unit.

Metric names are the contract with ``edgeft serve`` (edgeft/serve/metrics.py): ``edgeft_requests_total{status}``,
``edgeft_rejections_total{reason}``, ``edgeft_request_duration_seconds`` (histogram),
``edgeft_pending_requests``, ``edgeft_queue_capacity``, ``edgeft_model_ready``, ``edgeft_auth_failures_total``;
the scrape job is ``edgeft`` (``up{job="edgeft"}``).

Rules and tests are generated from one table (``alert_rules``) so each test's expected labels and
annotations are exactly what the rule produces; annotations use only ``$labels.instance`` (no
``$value``) so that holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

JOB = "edgeft"
SEL = f'job="{JOB}"'
INSTANCE = "edgeft-1:8000"  # the instance label used in the unit tests


@dataclass(frozen=True)
class AlertSettings:
    latency_budget_s: float  # p99 of request time above this fires EdgeftLatencyOverBudget
    error_ratio: float = 0.05  # share of answers that are server errors (5xx except 503)
    shed_ratio: float = 0.01  # share of requests refused for load (queue_full, timeout)
    queue_full_fraction: float = 0.8  # pending / capacity
    auth_failures_per_s: float = 1.0  # sustained rate of bad keys (guessing, or a client lost its key)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def alert_rules(s: AlertSettings, model: str) -> list[dict[str, Any]]:
    where = "{{ $labels.instance }}"
    by = "sum by (instance)"
    budget_ms = s.latency_budget_s * 1000
    return [
        _rule("EdgeftDown", f"up{{{SEL}}} == 0", "1m", "critical", f"edgeft server {where} is down",
              f"Prometheus cannot scrape {where} (process dead, port closed or host down). "
              "Check `systemctl status edgeft-serve` and its journal."),
        _rule("EdgeftTargetMissing", f"absent(up{{{SEL}}})", "5m", "critical", "no edgeft scrape target",
              "No target of scrape job 'edgeft' exists: the scrape config or service discovery lost it."),
        _rule("EdgeftNotReady", f"edgeft_model_ready{{{SEL}}} == 0", "2m", "critical",
              f"edgeft server {where} is up but not ready",
              f"{where} answers /metrics but its model is not ready (stuck warming up, or draining after SIGTERM)."),
        _rule("EdgeftHighErrorRate",
              f'{by} (rate(edgeft_requests_total{{{SEL},status=~"5..",status!="503"}}[5m])) / '
              f"{by} (rate(edgeft_requests_total{{{SEL}}}[5m])) > {s.error_ratio}", "5m", "critical",
              f"edgeft server {where} answers server errors",
              f"More than {s.error_ratio:.0%} of requests to {where} end in a 5xx other than 503 (engine failures). "
              "Read the server log's error lines."),
        _rule("EdgeftLoadShedding",
              f'{by} (rate(edgeft_rejections_total{{{SEL},reason=~"queue_full|timeout"}}[5m])) / '
              f"{by} (rate(edgeft_requests_total{{{SEL}}}[5m])) > {s.shed_ratio}", "5m", "warning",
              f"edgeft server {where} is shedding load (503)",
              f"More than {s.shed_ratio:.0%} of requests to {where} are refused with 503 (queue full or deadline "
              "passed): offered load exceeds capacity. Add replicas or lower the load."),
        _rule("EdgeftQueueNearFull",
              f"edgeft_pending_requests{{{SEL}}} / edgeft_queue_capacity{{{SEL}}} > {s.queue_full_fraction}", "2m",
              "warning", f"edgeft server {where} queue is near full",
              f"More than {s.queue_full_fraction:.0%} of queue_capacity on {where} is in use; 503s follow when it fills."),
        _rule("EdgeftLatencyOverBudget",
              f"histogram_quantile(0.99, sum by (instance, le) "
              f"(rate(edgeft_request_duration_seconds_bucket{{{SEL}}}[5m]))) > {s.latency_budget_s:g}", "10m",
              "warning", f"edgeft server {where} p99 latency over budget",
              f"p99 request time on {where} is above the bundle's budget of {budget_ms:g} ms for {model} "
              "(3x its benchmarked p99 at batch 1, see manifest.json serving.latency_budget_ms)."),
        _rule("EdgeftAuthFailureSpike", f"{by} (rate(edgeft_auth_failures_total{{{SEL}}}[5m])) > {s.auth_failures_per_s}",
              "5m", "warning", f"edgeft server {where} refuses many API keys",
              f"More than {s.auth_failures_per_s:g} requests/s to {where} carry a missing, malformed or wrong key "
              "(key guessing, or a client whose key was revoked)."),
    ]


def alerts_yaml(s: AlertSettings, model: str) -> str:
    doc = {"groups": [{"name": "edgeft", "rules": alert_rules(s, model)}]}
    return "# Prometheus alerting rules for edgeft serve (written by edgeft ship).\n" \
           "# promtool check rules alerts.yml && promtool test rules alerts_test.yml\n" + \
        yaml.safe_dump(doc, sort_keys=False, width=1000)


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    lab = ",".join(f'{k}="{v}"' for k, v in {"job": JOB, "instance": INSTANCE, **labels}.items())
    return {"series": f"{name}{{{lab}}}", "values": values}


def _expected(rules: dict[str, dict], name: str, extra_labels: dict[str, str] | None = None,
              instance: str | None = INSTANCE) -> list[dict[str, Any]]:
    r = rules[name]
    labels = {"severity": r["labels"]["severity"], **(extra_labels or {})}
    if instance is not None:
        labels = {"job": JOB, "instance": instance, **labels} if name in (
            "EdgeftDown", "EdgeftNotReady", "EdgeftQueueNearFull") else {"instance": instance, **labels}
    ann = {k: v.replace("{{ $labels.instance }}", instance or "") for k, v in r["annotations"].items()}
    return [{"exp_labels": labels, "exp_annotations": ann}]


def _case(at: str, name: str, expected: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


def alerts_test_yaml(s: AlertSettings, model: str) -> str:
    """promtool unit tests: each alert fires on a series built to cross its threshold, and stays quiet
    on a healthy one (1-minute samples; counters given as per-minute increments)."""
    rules = {r["alert"]: r for r in alert_rules(s, model)}
    ok_req = _series("edgeft_requests_total", {"status": "200"}, "0+600x40")  # 10 req/s
    budget = s.latency_budget_s
    fast, slow = budget / 4, budget * 2  # bucket edges well under and over the budget
    edges = [f"{fast:g}", f"{budget:g}", f"{slow:g}", "+Inf"]

    def hist(counts: list[str]) -> list[dict[str, str]]:
        return [_series("edgeft_request_duration_seconds_bucket", {"le": le}, c) for le, c in zip(edges, counts)]

    tests = [
        {"name": "down and not ready", "interval": "1m", "input_series": [
            _series("up", {}, "1 1 1 0 0 0 0 0"),
            _series("edgeft_model_ready", {}, "1 0 0 0 0 0 0 0")],
         "alert_rule_test": [_case("2m", "EdgeftDown", []), _case("6m", "EdgeftDown", _expected(rules, "EdgeftDown")),
                             _case("2m", "EdgeftNotReady", []),
                             _case("4m", "EdgeftNotReady", _expected(rules, "EdgeftNotReady"))]},
        {"name": "target missing", "interval": "1m", "input_series": [],
         "alert_rule_test": [_case("6m", "EdgeftTargetMissing",
                                   [{"exp_labels": {"severity": "critical", "job": JOB},
                                     "exp_annotations": rules["EdgeftTargetMissing"]["annotations"]}])]},
        {"name": "healthy server stays quiet", "interval": "1m", "input_series": [
            _series("up", {}, "1+0x40"), _series("edgeft_model_ready", {}, "1+0x40"), ok_req,
            _series("edgeft_requests_total", {"status": "503"}, "0+1x40"),  # a trickle of 503s: < shed_ratio
            _series("edgeft_rejections_total", {"reason": "queue_full"}, "0+1x40"),
            _series("edgeft_requests_total", {"status": "400"}, "0+100x40"),  # client errors are not server errors
            _series("edgeft_pending_requests", {}, "10+0x40"), _series("edgeft_queue_capacity", {}, "256+0x40"),
            _series("edgeft_auth_failures_total", {}, "0+6x40"),  # 0.1/s
            *hist(["0+600x40"] * 4)],
         "alert_rule_test": [_case("30m", name, []) for name in rules if name != "EdgeftTargetMissing"]},
        {"name": "server errors", "interval": "1m", "input_series": [
            ok_req, _series("edgeft_requests_total", {"status": "500"}, "0+120x40")],
         "alert_rule_test": [_case("3m", "EdgeftHighErrorRate", []),
                             _case("15m", "EdgeftHighErrorRate", _expected(rules, "EdgeftHighErrorRate"))]},
        {"name": "load shedding", "interval": "1m", "input_series": [
            ok_req, _series("edgeft_requests_total", {"status": "503"}, "0+120x40"),
            _series("edgeft_rejections_total", {"reason": "queue_full"}, "0+120x40"),
            _series("edgeft_pending_requests", {}, "250+0x40"), _series("edgeft_queue_capacity", {}, "256+0x40")],
         "alert_rule_test": [_case("15m", "EdgeftLoadShedding", _expected(rules, "EdgeftLoadShedding")),
                             _case("15m", "EdgeftQueueNearFull", _expected(rules, "EdgeftQueueNearFull")),
                             _case("15m", "EdgeftHighErrorRate", [])]},  # 503 is shedding, not an error
        {"name": "latency over budget", "interval": "1m", "input_series": hist(["0+0x40", "0+0x40", "0+600x40",
                                                                                "0+600x40"]),
         "alert_rule_test": [_case("8m", "EdgeftLatencyOverBudget", []),
                             _case("20m", "EdgeftLatencyOverBudget", _expected(rules, "EdgeftLatencyOverBudget"))]},
        {"name": "auth failure spike", "interval": "1m", "input_series": [
            _series("edgeft_auth_failures_total", {}, "0+300x40")],  # 5/s
         "alert_rule_test": [_case("15m", "EdgeftAuthFailureSpike", _expected(rules, "EdgeftAuthFailureSpike"))]},
    ]
    doc = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    return "# promtool test rules alerts_test.yml  (unit tests of alerts.yml, written by edgeft ship)\n" + \
        yaml.safe_dump(doc, sort_keys=False, width=1000)


def prometheus_yaml(port: int = 8000) -> str:
    doc = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
           "rule_files": ["alerts.yml"],
           "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics", "scrape_interval": "15s",
                               "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    return ("# Example Prometheus config for edgeft serve (written by edgeft ship). /metrics needs no key;\n"
            "# keep the port reachable only from Prometheus. promtool check config prometheus.yml\n"
            + yaml.safe_dump(doc, sort_keys=False))


def systemd_unit(name: str, version: str, *, memory_max_mb: int, shutdown_timeout_s: float,
                 bundle_dir: str = "/opt/edgeft/bundles/{name}-{version}", edgeft_bin: str = "/opt/edgeft/venv/bin/edgeft",
                 port: int = 8000) -> str:
    bundle = bundle_dir.format(name=name, version=version)
    stop_s = int(math.ceil(shutdown_timeout_s)) + 15
    return f"""# Hardened systemd unit for edgeft serve (an example written by edgeft ship).
# Install: unpack the bundle to {bundle}, put edgeft in {edgeft_bin.rsplit('/bin/', 1)[0]},
# create keys with `edgeft keys add /etc/edgeft/keys`, copy this file to
# /etc/systemd/system/edgeft-serve.service, then `systemctl daemon-reload && systemctl enable --now edgeft-serve`.
# The key file reaches the service as a systemd credential (root-owned 0600 file, readable by the
# dynamic user only through $CREDENTIALS_DIRECTORY); after adding a key, `systemctl restart edgeft-serve`.
[Unit]
Description=edgeft model server ({name} {version})
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
ExecStart={edgeft_bin} serve {bundle} --host 127.0.0.1 --port {port} --keys ${{CREDENTIALS_DIRECTORY}}/keys
LoadCredential=keys:/etc/edgeft/keys
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: not ready, finish queued and in-flight requests (shutdown_timeout_s {shutdown_timeout_s:g} s), exit 0.
KillSignal=SIGTERM
TimeoutStopSec={stop_s}
Restart=on-failure
RestartSec=2
Environment=TOKENIZERS_PARALLELISM=false
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
ReadOnlyPaths={bundle}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
UMask=0077
MemoryMax={memory_max_mb}M
TasksMax=256
LimitNOFILE=4096

[Install]
WantedBy=multi-user.target
"""
