"""Kubernetes manifests for a bundle (``edgeft ship --kubernetes``) and their offline validator.

``kubernetes_part`` writes ``kubernetes/`` into the bundle: a Dockerfile (the bundle baked into an image
of ``edgeft serve``, verified at build time, run as a non-root user), the embedded server's Deployment,
Service, HorizontalPodAutoscaler and PodDisruptionBudget, a kustomization.yaml whose secretGenerator turns
the user's key file (``edgeft keys add``: SHA-256 digests only) into the Secret, and ``kserve/``: a KServe
InferenceService (serving.kserve.io/v1beta1, custom predictor container, V2 protocol) with its own
kustomization. No key, and no key file, is ever in the bundle: the user copies ``kubernetes/`` out of
the (checksummed) bundle and adds the key file there.

``check_kubernetes`` validates the files offline: the built-in kinds against the Kubernetes OpenAPI
schemas that ``kubernetes-validate`` ships (strict: unknown fields are errors; the oldest and the newest
Kubernetes version it knows), the InferenceService against a schema built from the models of the
``kserve`` Python SDK when it is installed (else against edgeft's subset of KServe's documented API,
and says so), then the semantics edgeft relies on: V2 health probes on the container port, ``--keys`` on
the mounted Secret, one image everywhere, the HPA and Service pointing at the Deployment, a grace period
longer than the server's drain. Nothing here talks to a cluster.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeft import __version__
from edgeft.errors import EdgeftError

from edgeft.bundle import KUBERNETES_DIR as K8S_DIR  # noqa: E402
FILES = {"dockerfile": "Dockerfile", "readme": "README.md", "kustomization": "kustomization.yaml",
         "deployment": "deployment.yaml", "service": "service.yaml", "hpa": "hpa.yaml", "pdb": "pdb.yaml",
         "kserve_kustomization": "kserve/kustomization.yaml", "kserve_config": "kserve/kustomizeconfig.yaml",
         "inferenceservice": "kserve/inferenceservice.yaml"}
KINDS = {"deployment": "Deployment", "service": "Service", "hpa": "HorizontalPodAutoscaler",
         "pdb": "PodDisruptionBudget", "inferenceservice": "InferenceService"}
BUNDLE_PATH = "/bundle"  # where the Dockerfile copies the bundle
KEYS_DIR = "/etc/edgeft"  # the Secret's mount; its one entry is the key file
KEYS_ENTRY = "keys"
KEYS_PATH = f"{KEYS_DIR}/{KEYS_ENTRY}"
PORT = 8000  # the Deployment's port (edgeft serve's default)
KSERVE_PORT = 8080  # KServe's (and Knative's) default container port for custom predictors
UID = 10001  # numeric, so that runAsNonRoot can be checked by the kubelet
DEFAULT_CPUS = 2  # CPU request = limit = ONNX Runtime threads
MIN_REPLICAS, MAX_REPLICAS = 2, 10  # 2: a rollout or a node drain never leaves zero ready pods
CPU_TARGET_PERCENT = 70
SCALE_DOWN_WINDOW_S = 300  # don't drop replicas on a short lull (pods take a while to warm up)
PRESTOP_S = 5  # let endpoints drop the pod before the server stops accepting connections
DEFAULT_MEMORY_MIB = 1536
HEALTH_LIVE, HEALTH_READY = "/v2/health/live", "/v2/health/ready"
RAW_KEY_RE = re.compile(r"eft_[A-Za-z0-9_-]{20,}")  # edgeft keys add prints eft_ + 43 url-safe chars
NO_MANIFESTS = "the bundle has no Kubernetes manifests: re-ship it with `edgeft ship --kubernetes`"


@dataclass(frozen=True)
class K8sSettings:
    """Everything the manifests are made of; derived from the bundle at ship time."""

    model: str
    version: str
    name: str  # Kubernetes object name (DNS-1035 label)
    image: str
    cpus: int = DEFAULT_CPUS
    memory_mib: int = DEFAULT_MEMORY_MIB
    shutdown_timeout_s: float = 30.0

    @property
    def secret_name(self) -> str:
        return f"{self.name}-keys"

    @property
    def grace_s(self) -> int:
        return int(math.ceil(self.shutdown_timeout_s)) + PRESTOP_S + 10

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "edgeft", "app.kubernetes.io/instance": self.name}


# ---------------------------------------------------------------- names


def k8s_name(model: str) -> str:
    """A DNS-1035 label from a bundle name (which may hold capitals, '.' and '_'): 'edgeft-' + slug,
    short enough for KServe's derived names ('-predictor' + Service/HPA suffixes)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model"
    return re.sub(r"-+", "-", f"edgeft-{slug}")[:40].rstrip("-")


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "0"


def default_image(model: str, version: str) -> str:
    """edgeft-NAME:VERSION with a lower-case repository and a valid tag."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", version).lstrip(".-")[:128] or "latest"
    return f"{k8s_name(model)}:{tag}"


def memory_mib_from_unit(unit_text: str) -> int | None:
    """MemoryMax=NNNM of the bundle's systemd unit (serving_part's sizing), in MiB (systemd's M is 1024^2)."""
    m = re.search(r"^MemoryMax=(\d+)M\s*$", unit_text, re.M)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- manifests


def serve_args(s: K8sSettings, port: int) -> list[str]:
    # ort_spinning off: spinning ORT threads burn CPU between batches, which would read as load to the HPA.
    return ["serve", BUNDLE_PATH, "--host", "0.0.0.0", "--port", str(port), "--keys", KEYS_PATH,
            "--threads", str(s.cpus), "--set", "ort_spinning=false"]


def _probe(path: str, port: int, period_s: int, failures: int, timeout_s: int = 2) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "timeoutSeconds": timeout_s,
            "failureThreshold": failures}


def container(s: K8sSettings, name: str, port: int, extra_env: list[dict[str, str]] = ()) -> dict[str, Any]:
    quantity = {"cpu": str(s.cpus), "memory": f"{s.memory_mib}Mi"}
    return {
        "name": name, "image": s.image, "imagePullPolicy": "IfNotPresent",
        "command": ["edgeft"], "args": serve_args(s, port),
        "ports": [{"name": "http1" if port == KSERVE_PORT else "http", "containerPort": port, "protocol": "TCP"}],
        "env": [*extra_env, {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                {"name": "OMP_NUM_THREADS", "value": str(s.cpus)}, {"name": "HOME", "value": "/tmp"}],
        # ready only after the warm-up batches: liveness starts then, so warm-up CPU never gets a pod killed
        "startupProbe": _probe(HEALTH_READY, port, 5, 60),
        "livenessProbe": _probe(HEALTH_LIVE, port, 10, 3, 3),
        "readinessProbe": _probe(HEALTH_READY, port, 5, 2),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        # request == limit: Guaranteed QoS, and whole CPUs can be pinned by the static CPU manager
        "resources": {"requests": dict(quantity), "limits": dict(quantity)},
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def pod_spec_extras(s: K8sSettings) -> dict[str, Any]:
    return {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "terminationGracePeriodSeconds": s.grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "keys", "secret": {"secretName": s.secret_name, "defaultMode": 0o440}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
    }


def _metadata(s: K8sSettings, name: str | None = None) -> dict[str, Any]:
    return {"name": name or s.name, "labels": {**s.labels, "app.kubernetes.io/version": _label_value(s.version),
                                               "app.kubernetes.io/managed-by": "edgeft"}}


def _scrape(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def deployment(s: K8sSettings) -> dict[str, Any]:
    extras = pod_spec_extras(s)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(s),
            # no spec.replicas: the HPA owns the count, and re-applying must not reset it
            "spec": {"selector": {"matchLabels": dict(s.labels)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": dict(s.labels), "annotations": _scrape(PORT)},
                                  "spec": {"automountServiceAccountToken": extras["automountServiceAccountToken"],
                                           "terminationGracePeriodSeconds": extras["terminationGracePeriodSeconds"],
                                           "securityContext": extras["securityContext"],
                                           "containers": [container(s, "edgeft", PORT)],
                                           "volumes": extras["volumes"]}}}}


def service(s: K8sSettings) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(s),
            "spec": {"type": "ClusterIP", "selector": dict(s.labels),
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]}}


def hpa(s: K8sSettings) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(s),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": s.name},
                     "minReplicas": MIN_REPLICAS, "maxReplicas": MAX_REPLICAS,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": CPU_TARGET_PERCENT}}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
                                  "scaleUp": {"stabilizationWindowSeconds": 0,
                                              "policies": [{"type": "Percent", "value": 100, "periodSeconds": 30}]}}}}


def pdb(s: K8sSettings) -> dict[str, Any]:
    # maxUnavailable (not minAvailable): a drain can always proceed, one pod at a time
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _metadata(s),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(s.labels)}}}


def inference_service(s: K8sSettings) -> dict[str, Any]:
    extras = pod_spec_extras(s)
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {**_metadata(s), "annotations": {
                # a plain Deployment + HPA (no Knative): probes may name the port, scaling is on CPU.
                # "RawDeployment" is the name every KServe release accepts (newer ones call it Standard).
                "serving.kserve.io/deploymentMode": "RawDeployment",
                "serving.kserve.io/autoscalerClass": "hpa"}},
            "spec": {"predictor": {
                "minReplicas": MIN_REPLICAS, "maxReplicas": MAX_REPLICAS,
                "scaleMetric": "cpu", "scaleTarget": CPU_TARGET_PERCENT,
                "annotations": _scrape(KSERVE_PORT), **extras,
                # KServe reads a custom container's protocol from its PROTOCOL variable (default v1)
                "containers": [container(s, "kserve-container", KSERVE_PORT, [{"name": "PROTOCOL", "value": "v2"}])]}}}


def kustomization(s: K8sSettings) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [FILES[k] for k in ("deployment", "service", "hpa", "pdb")],
            # the key file (digests only) becomes the Secret; its content hash in the name rolls the pods
            # whenever a key is added or revoked
            "secretGenerator": [{"name": s.secret_name, "files": [KEYS_ENTRY], "type": "Opaque"}]}


def kserve_kustomization(s: K8sSettings) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["inferenceservice.yaml"],
            "secretGenerator": [{"name": s.secret_name, "files": [KEYS_ENTRY], "type": "Opaque"}],
            "configurations": ["kustomizeconfig.yaml"]}


def kserve_kustomize_config() -> dict[str, Any]:
    # kustomize renames generated Secrets (hash suffix) only in fields it knows: teach it KServe's
    return {"nameReference": [{"kind": "Secret", "version": "v1", "fieldSpecs": [
        {"kind": "InferenceService", "group": "serving.kserve.io",
         "path": "spec/predictor/volumes/secret/secretName"}]}]}


def dockerfile(s: K8sSettings) -> str:
    return f"""# syntax=docker/dockerfile:1
# edgeft serve with bundle {s.model} {s.version} baked in (written by edgeft ship --kubernetes).
# Build it from inside the bundle folder (the bundle is the build context; nothing is added to it):
#   docker build -f kubernetes/Dockerfile -t {s.image} .
# EDGEFT_SPEC is any pip requirement: the default version from your package index, or e.g.
#   --build-arg EDGEFT_SPEC="edgeft @ https://artifacts.example/edgeft-{__version__}-py3-none-any.whl"
FROM python:3.11-slim
ARG EDGEFT_SPEC="edgeft=={__version__}"
# edgeft pins a torch release; this index has its CPU build (the default Linux wheel is a multi-GB CUDA one)
ARG PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HOME=/tmp
# kubernetes-validate: `edgeft verify` below also checks these manifests
RUN pip install --no-cache-dir "$EDGEFT_SPEC" "kubernetes-validate>=1.37"
# root-owned and read-only for the server's user: a compromised server cannot change the model
COPY --chown=0:0 . {BUNDLE_PATH}
USER {UID}:{UID}
# checksums, model load and golden outputs, as the user the pod runs as (latency varies by node)
RUN edgeft verify {BUNDLE_PATH} --skip-latency
EXPOSE {PORT} {KSERVE_PORT}
ENTRYPOINT ["edgeft"]
CMD ["serve", "{BUNDLE_PATH}", "--host", "0.0.0.0", "--port", "{PORT}", "--keys", "{KEYS_PATH}"]
"""


def readme(s: K8sSettings) -> str:
    return f"""# Kubernetes manifests for {s.model} {s.version} (written by edgeft ship --kubernetes)

Checked offline by `edgeft verify` (schemas and edgeft's rules); not applied to a cluster by edgeft.
Never add files inside the bundle (its checksums would fail): copy this folder out first.

1. Image: from inside the bundle folder, `docker build -f kubernetes/Dockerfile -t {s.image} .`
   and push it where your cluster pulls from (another name: re-ship with `edgeft ship --kubernetes --image REF`).
2. Keys: `cp -r kubernetes/ ~/deploy-{s.name} && edgeft keys add ~/deploy-{s.name}/keys --id CLIENT`
   prints the key once; the file `keys` holds only its SHA-256 digest and becomes the Secret `{s.secret_name}`.
   For KServe, copy that file to `kserve/keys` too.
3. Apply one of:
   - plain Deployment + Service + HPA + PDB: `kubectl apply -k ~/deploy-{s.name}`
   - KServe (RawDeployment mode, V2 protocol): `kubectl apply -k ~/deploy-{s.name}/kserve`
4. Call it: `kubectl port-forward svc/{s.name} {PORT}:{PORT}`, then
   `curl -H "Authorization: Bearer $KEY" localhost:{PORT}/v2/models/{s.model}`.
5. Add or revoke a key: edit the key file (`edgeft keys add`, or delete a line) and re-apply: the Secret's
   name changes with its content, so the pods roll over to the new keys.

Sizing: {s.cpus} CPUs (= ONNX Runtime threads) and {s.memory_mib} MiB per pod (the systemd unit's MemoryMax),
{MIN_REPLICAS}-{MAX_REPLICAS} replicas at {CPU_TARGET_PERCENT}% CPU; SIGTERM drains for {s.shutdown_timeout_s:g} s
within a {s.grace_s} s grace period.
"""


def _yaml(header: str, doc: dict[str, Any]) -> str:
    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(doc, sort_keys=False, width=1000)


def render(s: K8sSettings) -> dict[str, str]:
    """Relative path (under kubernetes/) -> file text."""
    by = f"edgeft ship --kubernetes ({s.model} {s.version})"
    return {
        FILES["dockerfile"]: dockerfile(s), FILES["readme"]: readme(s),
        FILES["kustomization"]: _yaml(f"{by}.\nBefore `kubectl apply -k .`: create the key file here with "
                                      f"`edgeft keys add keys --id NAME` (digests only; see README.md).",
                                      kustomization(s)),
        FILES["deployment"]: _yaml(f"{by}: edgeft serve, keys from the Secret, V2 health probes.\n"
                                   "defaultMode 288 is octal 0440: the key file is readable by the pod's group only.",
                                   deployment(s)),
        FILES["service"]: _yaml(by, service(s)),
        FILES["hpa"]: _yaml(f"{by}: CPU-based; ORT spinning is off so CPU use is real work.", hpa(s)),
        FILES["pdb"]: _yaml(by, pdb(s)),
        FILES["kserve_kustomization"]: _yaml(f"{by}.\nBefore `kubectl apply -k .`: put the key file here as `keys` "
                                             f"(`edgeft keys add keys --id NAME`; digests only).", kserve_kustomization(s)),
        FILES["kserve_config"]: _yaml(by, kserve_kustomize_config()),
        FILES["inferenceservice"]: _yaml(f"{by}: KServe custom predictor speaking the V2 protocol.", inference_service(s)),
    }


def settings_from_ctx(ctx: Any) -> K8sSettings:
    from edgeft.bundle import SERVING_DIR
    from edgeft.serve.config import ServeConfig

    unit = Path(ctx.stage) / SERVING_DIR / "edgeft-serve.service"
    memory = memory_mib_from_unit(unit.read_text(encoding="utf-8")) if unit.is_file() else None
    serving = ctx.manifest.get("serving") or {}
    shutdown = float(serving.get("shutdown_timeout_s") or ServeConfig().shutdown_timeout_s)
    image = getattr(ctx.cfg, "image", None) or default_image(ctx.name, ctx.version)
    return K8sSettings(model=ctx.name, version=ctx.version, name=k8s_name(ctx.name), image=image,
                       memory_mib=memory or DEFAULT_MEMORY_MIB, shutdown_timeout_s=shutdown)


def kubernetes_part(ctx: Any) -> None:
    """kubernetes/ (see the module docstring) and the manifest's kubernetes section. Refuses to ship
    manifests its own checks reject."""
    s = settings_from_ctx(ctx)
    folder = Path(ctx.stage) / K8S_DIR
    for rel, text in render(s).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    section = {"files": sorted(f"{K8S_DIR}/{rel}" for rel in render(s)), "image": s.image, "name": s.name,
               "port": PORT, "kserve_port": KSERVE_PORT, "keys_path": KEYS_PATH, "secret": s.secret_name,
               "cpus": s.cpus, "memory_mib": s.memory_mib, "replicas": {"min": MIN_REPLICAS, "max": MAX_REPLICAS},
               "termination_grace_period_s": s.grace_s, "validated_with": validators(), "applied_to_a_cluster": False}
    problems = check_folder(folder, {**ctx.manifest, "kubernetes": section}, require_validator=False)
    if problems:
        more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise EdgeftError(f"the generated Kubernetes manifests are invalid: {'; '.join(problems[:2])}{more}",
                          "this is an edgeft bug: report it with the message")
    ctx.manifest["kubernetes"] = section


# ---------------------------------------------------------------- schema validation


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def k8s_schema_versions() -> tuple[str, ...]:
    """The oldest and the newest Kubernetes versions kubernetes-validate ships schemas for."""
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    return tuple(dict.fromkeys((versions[0], versions[-1])))


def validators() -> list[str]:
    """What check_kubernetes validates with on this machine (for the manifest)."""
    out = ["edgeft semantic checks"]
    kv = _dist_version("kubernetes-validate")
    if kv is None:
        return out + ["not schema-checked: kubernetes-validate is not installed"]
    out.append(f"kubernetes-validate {kv} strict (Kubernetes {', '.join(k8s_schema_versions())})")
    ks = _kserve_models_dir()
    out.append(f"kserve {_dist_version('kserve')} SDK models (InferenceService)" if ks
               else "edgeft's subset of KServe's v1beta1 API (InferenceService; kserve not installed)")
    return out


def _definitions(version: str) -> dict[str, Any]:
    import importlib.resources

    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict" \
        / "_definitions.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _kserve_models_dir() -> Path | None:
    """kserve/models/ of an installed kserve, found without importing kserve (its __init__ pulls in
    its whole model server: fastapi, grpc, ...)."""
    try:
        spec = importlib.util.find_spec("kserve")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if (folder / "v1beta1_inference_service.py").is_file() else None


@functools.lru_cache(maxsize=2)
def _kserve_models(folder: str) -> dict[str, tuple[dict[str, str], dict[str, str], frozenset[str]]]:
    """class -> (attribute -> openapi type, attribute -> JSON name, required attributes), read from the
    generated sources with ast (nothing of kserve is executed)."""
    out = {}
    for path in sorted(Path(folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            types: dict[str, str] = {}
            names: dict[str, str] = {}
            required = set()
            for node in cls.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    if node.targets[0].id == "openapi_types":
                        types = ast.literal_eval(node.value)
                    elif node.targets[0].id == "attribute_map":
                        names = ast.literal_eval(node.value)
                elif isinstance(node, ast.FunctionDef):
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                            m = re.match(r"Invalid value for `(\w+)`, must not be `None`", sub.value)
                            if m and m.group(1) == node.name:
                                required.add(m.group(1))
            if types:
                out[cls.name] = (types, names, frozenset(required))
    return out


_DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def _k8s_ref(type_name: str, defs: dict[str, Any]) -> str | None:
    """A Kubernetes type as the openapi generator names it (V1Container, K8sIoApiAppsV1DeploymentStrategy)
    -> its key in the Kubernetes definitions."""
    m = re.match(r"^K8sIoApi([A-Z][a-z0-9]+)(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)$", type_name)
    if m:
        key = f"io.k8s.api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"
        return key if key in defs else None
    m = re.match(r"^(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)$", type_name)
    if not m:
        return None
    ver, kind = m.group(1).lower(), m.group(2)
    for key in (f"io.k8s.api.core.{ver}.{kind}", f"io.k8s.apimachinery.pkg.apis.meta.{ver}.{kind}"):
        if key in defs:
            return key
    hits = [k for k in defs if k.endswith(f".{ver}.{kind}")]
    return hits[0] if len(hits) == 1 else None


def _kserve_schema(models: dict, defs: dict[str, Any]) -> dict[str, Any]:
    """A strict JSON schema of V1beta1InferenceService from the SDK models; Kubernetes types by reference."""
    schemas: dict[str, Any] = {}

    def of(t: str) -> dict[str, Any]:
        t = t.strip()
        if t.startswith("list[") and t.endswith("]"):
            return {"type": "array", "items": of(t[5:-1])}
        if t.startswith("dict(") and t.endswith(")"):
            return {"type": "object", "additionalProperties": of(t[5:-1].split(",", 1)[1])}
        simple = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                  "float": {"type": "number"}, "datetime": {"type": "string"}, "date": {"type": "string"},
                  "object": {}, "ResourceQuantity": {"type": ["string", "number"]}}
        if t in simple:
            return simple[t]
        if t in models:
            if t not in schemas:
                schemas[t] = {}  # placeholder: recursive types
                types, names, required = models[t]
                schemas[t] = {"type": "object", "additionalProperties": False,
                              "properties": {names.get(a, a): of(at) for a, at in types.items()},
                              "required": sorted(names.get(a, a) for a in required)}
            return {"$ref": f"#/$defs/{t}"}
        key = _k8s_ref(t, defs["$defs"])
        return {"$ref": f"{_DEFS_URI}#/$defs/{key}"} if key else {}

    root = of("V1beta1InferenceService")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:edgeft:kserve-isvc",
            **root, "$defs": schemas}


# KServe's v1beta1 ComponentExtensionSpec and predictor framework fields (kserve.github.io API reference),
# beside the PodSpec the predictor inlines: used only when the kserve SDK is not installed.
_KSERVE_PREDICTOR_EXTRA = {
    "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"}, "scaleTarget": {"type": "integer"},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]}, "scaleMetricType": {"type": "string"},
    "containerConcurrency": {"type": "integer"}, "timeout": {"type": "integer"},
    "canaryTrafficPercent": {"type": "integer"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "logger": {"type": "object"}, "batcher": {"type": "object"}, "deploymentStrategy": {"type": "object"},
    "autoScaling": {"type": "object"}, "storageUris": {"type": "array"}, "workerSpec": {"type": "object"},
    "model": {"type": "object"}, "storageContainerName": {"type": "string"},
    **{f: {"type": "object"} for f in ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx",
                                        "huggingface", "pmml", "lightgbm", "paddle")},
}


def _absolute_refs(node: Any) -> Any:
    """Copied parts of the Kubernetes definitions, their local "#/$defs/..." refs made absolute."""
    if isinstance(node, dict):
        return {k: (f"{_DEFS_URI}{v}" if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute_refs(v))
                for k, v in node.items()}
    return [_absolute_refs(x) for x in node] if isinstance(node, list) else node


def _fallback_kserve_schema(defs: dict[str, Any]) -> dict[str, Any]:
    pod = _absolute_refs(defs["$defs"]["io.k8s.api.core.v1.PodSpec"])
    predictor = {"type": "object", "additionalProperties": False,
                 "properties": {**pod["properties"], **_KSERVE_PREDICTOR_EXTRA}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:edgeft:kserve-isvc-subset",
            "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
                           "metadata": {"$ref": f"{_DEFS_URI}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                           "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False,
                                    "properties": {"predictor": predictor, "transformer": {"type": "object"},
                                                   "explainer": {"type": "object"}}}}}


def _first_error(validator: Any, doc: Any) -> str | None:
    import jsonschema

    errors = sorted(validator.iter_errors(doc), key=jsonschema.exceptions.relevance)
    if not errors:
        return None
    e = errors[0]
    return f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"


def _isvc_problem(rel: str, doc: dict[str, Any]) -> str | None:
    import jsonschema
    from referencing import Registry, Resource

    defs = _definitions(k8s_schema_versions()[-1])
    folder = _kserve_models_dir()
    schema = _kserve_schema(_kserve_models(str(folder)), defs) if folder else _fallback_kserve_schema(defs)
    registry = Registry().with_resources([(_DEFS_URI, Resource.from_contents(defs)),
                                          (schema["$id"], Resource.from_contents(schema))])
    err = _first_error(jsonschema.Draft202012Validator(schema, registry=registry), doc)
    source = f"kserve {_dist_version('kserve')} models" if folder else "edgeft's subset of KServe's API"
    return f"{rel}: InferenceService is not valid ({source}): {err}" if err else None


def _schema_problems(rel: str, doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    kind = doc.get("kind")
    if kind == "InferenceService":
        return [p for p in [_isvc_problem(rel, doc)] if p]
    if kind == "Kustomization":
        return []  # no schema in kubernetes-validate: its semantic checks below (and `kubectl kustomize`)
    for version in k8s_schema_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            return [f"{rel}: {kind} is not valid Kubernetes {e.version} (strict): {path}: {e.message}"]
        except kubernetes_validate.SchemaNotFoundError as e:
            return [f"{rel}: {e.message}"]
    return []


# ---------------------------------------------------------------- semantic checks


def _containers(doc: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(pod spec, containers) of a Deployment or an InferenceService predictor."""
    spec = doc.get("spec") or {}
    pod = (spec.get("predictor") or {}) if doc.get("kind") == "InferenceService" else \
        ((spec.get("template") or {}).get("spec") or {})
    return pod, [c for c in pod.get("containers") or [] if isinstance(c, dict)]


def _arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return str(args[i + 1])
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _set_value(args: list[str], key: str) -> str | None:
    vals = [str(args[i + 1]).split("=", 1)[1] for i, a in enumerate(args[:-1])
            if a == "--set" and str(args[i + 1]).startswith(key + "=")]
    return vals[-1] if vals else None


def _cpu(q: Any) -> float | None:
    text = str(q)
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _server_problems(rel: str, doc: dict[str, Any], shutdown_s: float) -> list[str]:
    """The edgeft serve container of a Deployment or an InferenceService: keys, port, probes, resources,
    threads, hardening, grace period."""
    pod, containers = _containers(doc)
    if not containers:
        return [f"{rel}: {doc.get('kind')} has no containers"]
    c = containers[0]
    args = [str(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
    out = []
    if "serve" not in args:
        out.append(f"{rel}: the container does not run `edgeft serve`")
    ports = c.get("ports") or [{}]
    port, port_name = ports[0].get("containerPort"), ports[0].get("name")
    if _arg(args, "--port") != str(port):
        out.append(f"{rel}: --port {_arg(args, '--port')} is not the containerPort {port}")
    keys = _arg(args, "--keys")
    secret_vols = {v.get("name"): v["secret"].get("secretName") for v in pod.get("volumes") or []
                   if isinstance(v, dict) and isinstance(v.get("secret"), dict)}
    mounts = [m for m in c.get("volumeMounts") or [] if m.get("name") in secret_vols]
    if keys is None:
        out.append(f"{rel}: the server has no --keys: off loopback edgeft serve refuses to start without API keys")
    elif not any(keys.startswith(str(m.get("mountPath", "")).rstrip("/") + "/") for m in mounts):
        out.append(f"{rel}: --keys {keys} is not in a mounted Secret volume")
    if "--insecure-no-auth-public" in args:
        out.append(f"{rel}: --insecure-no-auth-public serves the model to anyone")
    if (doc.get("kind") == "InferenceService"
            and {"name": "PROTOCOL", "value": "v2"} not in [{"name": e.get("name"), "value": e.get("value")}
                                                           for e in c.get("env") or []]):
        out.append(f"{rel}: the predictor container lacks env PROTOCOL=v2 (KServe assumes v1)")
    for probe, path in (("livenessProbe", HEALTH_LIVE), ("readinessProbe", HEALTH_READY), ("startupProbe", HEALTH_READY)):
        get = (c.get(probe) or {}).get("httpGet")
        if not isinstance(get, dict):
            out.append(f"{rel}: no {probe} (httpGet {path})")
            continue
        if get.get("path") != path:
            out.append(f"{rel}: {probe} checks {get.get('path')!r}, not edgeft's {path}")
        if get.get("port") not in (port, port_name):
            out.append(f"{rel}: {probe} port {get.get('port')!r} is not the container port {port}")
    res = c.get("resources") or {}
    for side in ("requests", "limits"):
        for what in ("cpu", "memory"):
            if what not in (res.get(side) or {}):
                out.append(f"{rel}: no resources.{side}.{what}")
    cpu = _cpu((res.get("requests") or {}).get("cpu"))
    threads = _arg(args, "--threads")
    if cpu is not None and threads != str(max(1, int(cpu))):
        out.append(f"{rel}: --threads {threads} does not match the CPU request {cpu:g}")
    sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        out.append(f"{rel}: runAsNonRoot is not set")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{rel}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{rel}: allowPrivilegeEscalation is not false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        out.append(f"{rel}: capabilities do not drop ALL")
    # the grace period runs from preStop's start: the sleep and then the whole drain must fit in it
    stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
    pre_s = float(stop[1]) if len(stop) == 2 and stop[0] == "sleep" and str(stop[1]).isdigit() else 0.0
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not isinstance(grace, (int, float)) or grace <= shutdown_s + pre_s:
        out.append(f"{rel}: terminationGracePeriodSeconds {grace} does not exceed shutdown_timeout_s {shutdown_s:g}"
                   + (f" + the {pre_s:g} s preStop sleep" if pre_s else ""))
    return out


def _selects(selector: dict[str, Any] | None, labels: dict[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _shutdown_s(manifest: dict[str, Any], args: list[str]) -> float:
    from edgeft.serve.config import ServeConfig

    value = _set_value(args, "shutdown_timeout_s") or (manifest.get("serving") or {}).get("shutdown_timeout_s")
    try:
        return float(value) if value is not None else ServeConfig().shutdown_timeout_s
    except ValueError:
        return ServeConfig().shutdown_timeout_s


def _semantic_problems(docs: dict[str, dict[str, Any]], folder: Path, manifest: dict[str, Any]) -> list[str]:
    out = []
    rel = {k: f"{K8S_DIR}/{v}" for k, v in FILES.items()}
    dep, svc, hp, isvc = docs.get("deployment"), docs.get("service"), docs.get("hpa"), docs.get("inferenceservice")
    images = {}
    for key in ("deployment", "inferenceservice"):
        doc = docs.get(key)
        if doc is None:
            continue
        _, containers = _containers(doc)
        args = [str(a) for a in (containers[0].get("args") or [])] if containers else []
        out += _server_problems(rel[key], doc, _shutdown_s(manifest, args))
        if containers:
            images[rel[key]] = containers[0].get("image")
    expected = (manifest.get("kubernetes") or {}).get("image")
    if expected:
        images["manifest.json kubernetes.image"] = expected
    if len(set(map(str, images.values()))) > 1:
        out.append("the image differs between files: " + ", ".join(f"{k}: {v}" for k, v in images.items()))
    if dep is not None:
        dname = (dep.get("metadata") or {}).get("name")
        tmpl = (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {})
        labels = tmpl.get("labels") or {}
        if not _selects(((dep.get("spec") or {}).get("selector") or {}).get("matchLabels"), labels):
            out.append(f"{rel['deployment']}: spec.selector does not match the pod template's labels")
        _, containers = _containers(dep)
        port = ((containers[0].get("ports") or [{}])[0] if containers else {})
        ann = tmpl.get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(port.get("containerPort")) \
                or ann.get("prometheus.io/path") != "/metrics":
            out.append(f"{rel['deployment']}: the pod lacks Prometheus scrape annotations for /metrics on the container port")
        if svc is not None:
            sspec = svc.get("spec") or {}
            if not _selects(sspec.get("selector"), labels):
                out.append(f"{rel['service']}: the selector does not select the Deployment's pods")
            targets = [p.get("targetPort", p.get("port")) for p in sspec.get("ports") or []]
            if not any(t in (port.get("containerPort"), port.get("name")) for t in targets):
                out.append(f"{rel['service']}: no port targets the container port {port.get('containerPort')}")
        if hp is not None:
            hspec = hp.get("spec") or {}
            ref = hspec.get("scaleTargetRef") or {}
            if (ref.get("kind"), ref.get("name"), ref.get("apiVersion")) != ("Deployment", dname, "apps/v1"):
                out.append(f"{rel['hpa']}: scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not the "
                           f"Deployment {dname}")
            if not any(((m.get("resource") or {}).get("name") == "cpu") for m in hspec.get("metrics") or []):
                out.append(f"{rel['hpa']}: no CPU utilisation metric")
            if (((hspec.get("behavior") or {}).get("scaleDown") or {}).get("stabilizationWindowSeconds")) is None:
                out.append(f"{rel['hpa']}: no scale-down stabilization window")
            if (dep.get("spec") or {}).get("replicas") is not None:
                out.append(f"{rel['deployment']}: spec.replicas is set: each apply would reset the HPA's count")
        if docs.get("pdb") is not None and not _selects(
                ((docs["pdb"].get("spec") or {}).get("selector") or {}).get("matchLabels"), labels):
            out.append(f"{rel['pdb']}: the selector does not select the Deployment's pods")
    for key, target in (("kustomization", dep), ("kserve_kustomization", isvc)):
        kz = docs.get(key)
        if kz is None:
            continue
        base = (folder / FILES[key]).parent
        for r in kz.get("resources") or []:
            if not (base / str(r)).is_file():
                out.append(f"{rel[key]}: resource {r} does not exist")
        gens = [g for g in kz.get("secretGenerator") or [] if isinstance(g, dict)]
        if any(g.get("literals") or g.get("envs") for g in gens):
            out.append(f"{rel[key]}: a secretGenerator takes literals: keys must come from the key file")
        if target is not None:
            pod, _ = _containers(target)
            wanted = {v["secret"].get("secretName") for v in pod.get("volumes") or [] if isinstance(v.get("secret"), dict)}
            if not wanted or not wanted <= {g.get("name") for g in gens if g.get("files")}:
                out.append(f"{rel[key]}: no secretGenerator (from the key file) makes the Secret {sorted(wanted)}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        r = f"{K8S_DIR}/{path.relative_to(folder).as_posix()}"
        if path.name == KEYS_ENTRY:
            out.append(f"{r}: a key file inside the bundle: copy kubernetes/ out of the bundle and keep it there")
        elif RAW_KEY_RE.search(path.read_text(encoding="utf-8", errors="replace")):
            out.append(f"{r}: holds what looks like a raw API key: never ship keys")
    return out


def _load(folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    docs, out = {}, []
    for key, name in FILES.items():
        path, rel = folder / name, f"{K8S_DIR}/{name}"
        if not path.is_file():
            out.append(f"{rel} is missing")
            continue
        if not name.endswith(".yaml"):
            continue
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            out.append(f"{rel}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "") + f": "
                       f"{getattr(e, 'problem', None) or type(e).__name__}")
            continue
        except UnicodeDecodeError:
            out.append(f"{rel}: not UTF-8 text")
            continue
        if len(loaded) != 1 or not isinstance(loaded[0], dict):
            out.append(f"{rel}: expected one YAML mapping, found {len(loaded)} document(s)")
            continue
        want = KINDS.get(key, "Kustomization" if key.endswith("kustomization") else None)
        if want and loaded[0].get("kind") != want:
            out.append(f"{rel}: kind {loaded[0].get('kind')!r}, expected {want}")
            continue
        docs[key] = loaded[0]
    return docs, out


def check_folder(folder: Path, manifest: dict[str, Any], *, require_validator: bool = True) -> list[str]:
    """Problems with the kubernetes/ folder ``folder`` of a bundle whose manifest is ``manifest``."""
    if not folder.is_dir():
        return [NO_MANIFESTS]
    docs, out = _load(folder)
    if _dist_version("kubernetes-validate") is None:
        if require_validator:
            out.append("kubernetes-validate is not installed: the manifests' schemas were not checked "
                       "(fix: pip install kubernetes-validate)")
    else:
        for key, doc in docs.items():
            if key != "kserve_config":
                out += _schema_problems(f"{K8S_DIR}/{FILES[key]}", doc)
    return out + _semantic_problems(docs, folder, manifest)


def check_kubernetes(bundle_root: Path, *, require_validator: bool = True) -> list[str]:
    """One-line problems with a bundle's Kubernetes manifests (empty: valid). Offline: schemas (see the
    module docstring) and edgeft's rules. ``require_validator``: a missing kubernetes-validate is a problem."""
    root = Path(bundle_root)
    manifest: dict[str, Any] = {}
    try:
        loaded = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        manifest = loaded if isinstance(loaded, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return check_folder(root / K8S_DIR, manifest, require_validator=require_validator)
