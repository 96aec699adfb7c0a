"""`edgeft ship --kubernetes`'s part and its offline validator, on a minimal ShipContext (no model run:
the part reads only the manifest's name/version/serving and the systemd unit's MemoryMax): the
generated manifests validate (kubernetes-validate strict, both ends of its Kubernetes range; the
InferenceService against the kserve SDK's models when kserve is importable, else edgeft's subset);
each broken variant is reported naming its file; no raw key reaches the bundle or the rendered Secret
(`kubectl kustomize` when kubectl is installed)."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from edgeft.errors import EdgeftError
from edgeft.monitoring import systemd_unit
from edgeft.scale import kubernetes as k8s
from edgeft.serve.auth import add_key, read_keys
from edgeft.ship import ShipConfig, ShipContext

HAVE_VALIDATOR = importlib.util.find_spec("kubernetes_validate") is not None
MEMORY_MB = 1280


def _ctx(tmp_path: Path, name: str = "Tiny_Model", version: str = "1", image: str | None = None) -> ShipContext:
    stage = tmp_path / "stage"
    (stage / "serving").mkdir(parents=True)
    (stage / "serving" / "edgeft-serve.service").write_text(
        systemd_unit(name, version, memory_max_mb=MEMORY_MB, shutdown_timeout_s=30.0), encoding="utf-8")
    cfg = ShipConfig(run_dir=tmp_path, kubernetes=True, image=image)
    manifest = {"schema": "edgeft.bundle/1", "name": name, "version": version,
                "serving": {"max_batch_size": 32, "threads": None, "latency_budget_ms": 12.0},
                "alerts": {"budget_source": "test"}}
    return ShipContext(cfg, tmp_path, stage, name, version, None, {}, None, None, manifest)


def _ship(tmp_path: Path, **kw: Any) -> Path:
    """The part on a minimal context, then the manifest written as ship() would: a bundle root."""
    ctx = _ctx(tmp_path, **kw)
    k8s.kubernetes_part(ctx)
    (ctx.stage / "manifest.json").write_text(json.dumps(ctx.manifest), encoding="utf-8")
    return ctx.stage


def _check(root: Path) -> list[str]:
    return k8s.check_kubernetes(root, require_validator=HAVE_VALIDATOR)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _ship(tmp_path_factory.mktemp("k8s"))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def _edit(root: Path, rel: str, fn: Callable[[dict], None]) -> None:
    path = root / "kubernetes" / rel
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def _dep_container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _isvc_container(doc: dict) -> dict:
    return doc["spec"]["predictor"]["containers"][0]


def _drop_keys(c: dict) -> None:
    i = c["args"].index("--keys")
    del c["args"][i:i + 2]


# ---------------------------------------------------------------- the generated files


def test_generated_manifests_validate(bundle):
    pytest.importorskip("kubernetes_validate")
    assert k8s.check_kubernetes(bundle) == []
    section = json.loads((bundle / "manifest.json").read_text())["kubernetes"]
    assert section["applied_to_a_cluster"] is False
    assert any(v.startswith("kubernetes-validate ") and "strict" in v for v in section["validated_with"])
    assert all((bundle / f).is_file() for f in section["files"])
    assert sorted(section["files"]) == sorted(f"kubernetes/{p.relative_to(bundle / 'kubernetes').as_posix()}"
                                              for p in (bundle / "kubernetes").rglob("*") if p.is_file())


def test_sizing_threads_grace_image_and_names(bundle):
    dep = yaml.safe_load((bundle / "kubernetes/deployment.yaml").read_text())
    isvc = yaml.safe_load((bundle / "kubernetes/kserve/inferenceservice.yaml").read_text())
    for c, port in ((_dep_container(dep), k8s.PORT), (_isvc_container(isvc), k8s.KSERVE_PORT)):
        assert c["resources"]["limits"]["memory"] == f"{MEMORY_MB}Mi" == c["resources"]["requests"]["memory"]
        cpu = c["resources"]["requests"]["cpu"]
        assert c["args"][c["args"].index("--threads") + 1] == cpu
        assert c["args"][:6] == ["serve", "/bundle", "--host", "0.0.0.0", "--port", str(port)]
        assert c["args"][c["args"].index("--keys") + 1] == k8s.KEYS_PATH
        assert c["image"] == "edgeft-tiny-model:1"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert {"name": "PROTOCOL", "value": "v2"} in _isvc_container(isvc)["env"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and _isvc_container(isvc)["name"] == "kserve-container"
    assert dep["metadata"]["name"] == "edgeft-tiny-model"  # DNS-1035 from "Tiny_Model"


def test_custom_image_everywhere_and_output_is_deterministic(tmp_path):
    a = _ship(tmp_path / "a", image="registry.example/team/tiny:1.0")
    b = _ship(tmp_path / "b", image="registry.example/team/tiny:1.0")
    assert _check(a) == []
    for p in (a / "kubernetes").rglob("*.yaml"):
        assert p.read_bytes() == (b / "kubernetes" / p.relative_to(a / "kubernetes")).read_bytes()
    for rel in ("deployment.yaml", "kserve/inferenceservice.yaml", "README.md", "Dockerfile"):
        assert "registry.example/team/tiny:1.0" in (a / "kubernetes" / rel).read_text()


def test_dockerfile_non_root_verifies_and_matches_the_deployment(bundle):
    text = (bundle / "kubernetes/Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert f"USER {k8s.UID}:{k8s.UID}" in lines
    assert lines.index(f"USER {k8s.UID}:{k8s.UID}") < lines.index("RUN edgeft verify /bundle --skip-latency")
    assert "COPY --chown=0:0 . /bundle" in lines
    assert f'"--keys", "{k8s.KEYS_PATH}"' in text and f'"--port", "{k8s.PORT}"' in text


@pytest.mark.parametrize("name,expected", [("Tiny_Model", "edgeft-tiny-model"), ("a.b--c", "edgeft-a-b-c"),
                                           ("X" * 64, "edgeft-" + "x" * 33), ("9lives", "edgeft-9lives")])
def test_k8s_name(name, expected):
    assert k8s.k8s_name(name) == expected
    assert len(expected) <= 40


def test_default_image_tag_is_valid():
    assert k8s.default_image("Tiny", "1") == "edgeft-tiny:1"
    assert k8s.default_image("Tiny", ".v2") == "edgeft-tiny:v2"


# ---------------------------------------------------------------- broken variants, each named by its file


def _unknown_container_field(d):
    _dep_container(d)["readinessProbes"] = {"httpGet": {"path": "/v2/health/ready", "port": 8000}}


BROKEN_SEMANTIC = {
    "wrong liveness path": ("deployment.yaml", lambda d: _dep_container(d)["livenessProbe"]["httpGet"].update(path="/healthz"),
                            "kubernetes/deployment.yaml", "/healthz"),
    "readiness on another port": ("deployment.yaml",
                                  lambda d: _dep_container(d)["readinessProbe"]["httpGet"].update(port=9000),
                                  "kubernetes/deployment.yaml", "readinessProbe port"),
    "HPA on another Deployment": ("hpa.yaml", lambda d: d["spec"]["scaleTargetRef"].update(name="other"),
                                  "kubernetes/hpa.yaml", "Deployment/other"),
    "no --keys": ("deployment.yaml", lambda d: _drop_keys(_dep_container(d)), "kubernetes/deployment.yaml", "--keys"),
    "predictor without --keys": ("kserve/inferenceservice.yaml", lambda d: _drop_keys(_isvc_container(d)),
                                 "kubernetes/kserve/inferenceservice.yaml", "--keys"),
    "keys outside the Secret": ("deployment.yaml", lambda d: _dep_container(d)["args"].__setitem__(
        _dep_container(d)["args"].index("--keys") + 1, "/tmp/keys"), "kubernetes/deployment.yaml", "mounted Secret"),
    "predictor speaks v1": ("kserve/inferenceservice.yaml", lambda d: _isvc_container(d).update(env=[]),
                            "kubernetes/kserve/inferenceservice.yaml", "PROTOCOL=v2"),
    "short grace period": ("deployment.yaml", lambda d: d["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=34), "kubernetes/deployment.yaml", "shutdown_timeout_s 30 + the 5 s preStop"),
    "threads off the CPU request": ("deployment.yaml", lambda d: _dep_container(d)["args"].__setitem__(
        _dep_container(d)["args"].index("--threads") + 1, "8"), "kubernetes/deployment.yaml", "--threads 8"),
    "Service selects other pods": ("service.yaml", lambda d: d["spec"]["selector"].update(
        {"app.kubernetes.io/instance": "other"}), "kubernetes/service.yaml", "select"),
    "other image in the InferenceService": ("kserve/inferenceservice.yaml", lambda d: _isvc_container(d).update(
        image="evil/other:1"), "kubernetes/kserve/inferenceservice.yaml", "image differs"),
    "root filesystem writable": ("deployment.yaml", lambda d: _dep_container(d)["securityContext"].update(
        readOnlyRootFilesystem=False), "kubernetes/deployment.yaml", "readOnlyRootFilesystem"),
    "key given as a literal": ("kustomization.yaml", lambda d: d["secretGenerator"][0].update(
        literals=["keys=client:abc"]), "kubernetes/kustomization.yaml", "literals"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SEMANTIC))
def test_broken_variant_is_reported_naming_the_file(bundle, tmp_path, case):
    rel, fn, file_named, words = BROKEN_SEMANTIC[case]
    root = _copy(bundle, tmp_path)
    _edit(root, rel, fn)
    problems = _check(root)
    assert any(file_named in p and words in p for p in problems), problems


@pytest.mark.parametrize("rel,fn,file_named", [
    ("deployment.yaml", _unknown_container_field, "kubernetes/deployment.yaml"),
    ("hpa.yaml", lambda d: d["spec"].update(minReplica=1), "kubernetes/hpa.yaml"),
    ("kserve/inferenceservice.yaml", lambda d: d["spec"]["predictor"].update(minReplica=1),
     "kubernetes/kserve/inferenceservice.yaml"),
    ("kserve/inferenceservice.yaml", lambda d: _isvc_container(d).update(bogus=1), "kubernetes/kserve/inferenceservice.yaml"),
])
def test_unknown_field_is_a_schema_error(bundle, tmp_path, rel, fn, file_named):
    pytest.importorskip("kubernetes_validate")
    root = _copy(bundle, tmp_path)
    _edit(root, rel, fn)
    problems = k8s.check_kubernetes(root)
    assert any(p.startswith(file_named) and "not valid" in p and "was unexpected" in p for p in problems), problems


def test_yaml_syntax_error_names_the_file(bundle, tmp_path):
    root = _copy(bundle, tmp_path)
    (root / "kubernetes/service.yaml").write_text("apiVersion: v1\nkind: Service\nspec: {ports: [\n", encoding="utf-8")
    problems = _check(root)
    assert any(p.startswith("kubernetes/service.yaml: not valid YAML") for p in problems), problems


def test_missing_file_and_wrong_kind(bundle, tmp_path):
    root = _copy(bundle, tmp_path)
    (root / "kubernetes/hpa.yaml").unlink()
    _edit(root, "pdb.yaml", lambda d: d.update(kind="Deployment"))
    problems = _check(root)
    assert "kubernetes/hpa.yaml is missing" in problems
    assert any(p.startswith("kubernetes/pdb.yaml: kind 'Deployment'") for p in problems), problems


def test_bundle_without_manifests(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    assert k8s.check_kubernetes(tmp_path) == [k8s.NO_MANIFESTS]
    assert "edgeft ship --kubernetes" in k8s.NO_MANIFESTS


def test_missing_validator_is_a_problem_unless_waived(bundle, monkeypatch):
    real = k8s._dist_version
    monkeypatch.setattr(k8s, "_dist_version", lambda n: None if n == "kubernetes-validate" else real(n))
    problems = k8s.check_kubernetes(bundle)
    assert len(problems) == 1 and "kubernetes-validate is not installed" in problems[0]
    assert k8s.check_kubernetes(bundle, require_validator=False) == []
    assert "not schema-checked" in " ".join(k8s.validators())


def test_kubernetes_part_refuses_invalid_output(tmp_path, monkeypatch):
    monkeypatch.setattr(k8s, "serve_args", lambda s, port: ["serve", "/bundle", "--port", str(port)])
    with pytest.raises(EdgeftError, match="generated Kubernetes manifests are invalid"):
        k8s.kubernetes_part(_ctx(tmp_path))


# ---------------------------------------------------------------- the InferenceService schema source


def test_isvc_fallback_schema_catches_unknown_fields(bundle, tmp_path, monkeypatch):
    pytest.importorskip("kubernetes_validate")
    monkeypatch.setattr(k8s, "_kserve_models_dir", lambda: None)
    assert k8s.check_kubernetes(bundle) == []
    root = _copy(bundle, tmp_path)
    _edit(root, "kserve/inferenceservice.yaml", lambda d: d["spec"].update(predicter={}))
    problems = k8s.check_kubernetes(root)
    assert any("subset of KServe's API" in p and "predicter" in p for p in problems), problems


def test_isvc_against_the_kserve_sdk_models(bundle, tmp_path):
    pytest.importorskip("kubernetes_validate")
    if k8s._kserve_models_dir() is None:
        pytest.skip("kserve (its SDK models) is not installed: pip install --no-deps kserve")
    assert any(v.startswith("kserve ") for v in k8s.validators())
    assert k8s.check_kubernetes(bundle) == []
    root = _copy(bundle, tmp_path)
    _edit(root, "kserve/inferenceservice.yaml", lambda d: d["spec"]["predictor"].update(scaleTargets=70))
    problems = k8s.check_kubernetes(root)
    assert any("kserve" in p and "models" in p and "scaleTargets" in p for p in problems), problems


# ---------------------------------------------------------------- keys


def test_no_raw_key_in_the_bundle_and_planted_keys_are_flagged(bundle, tmp_path):
    key_file = tmp_path / "keys"
    _, key = add_key(key_file, "client1")
    for p in bundle.rglob("*"):
        if p.is_file():
            text = p.read_text(encoding="utf-8", errors="replace")
            assert key not in text and not k8s.RAW_KEY_RE.search(text), p
    kz = yaml.safe_load((bundle / "kubernetes/kustomization.yaml").read_text())
    assert kz["secretGenerator"] == [{"name": "edgeft-tiny-model-keys", "files": ["keys"], "type": "Opaque"}]
    root = _copy(bundle, tmp_path)
    (root / "kubernetes/README.md").write_text(f"curl -H 'Authorization: Bearer {key}'\n")
    shutil.copyfile(key_file, root / "kubernetes/keys")
    problems = _check(root)
    assert any(p.startswith("kubernetes/README.md: holds what looks like a raw API key") for p in problems), problems
    assert any(p.startswith("kubernetes/keys: a key file inside the bundle") for p in problems), problems


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
def test_kustomize_renders_the_secret_from_digests_only(bundle, tmp_path):
    deploy = Path(shutil.copytree(bundle / "kubernetes", tmp_path / "deploy"))
    _, key = add_key(deploy / "keys", "client1")
    shutil.copyfile(deploy / "keys", deploy / "kserve" / "keys")
    digests = read_keys(deploy / "keys")
    for folder, kind in ((deploy, "Deployment"), (deploy / "kserve", "InferenceService")):
        out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert key not in out.stdout and base64.b64encode(key.encode()).decode() not in out.stdout
        docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout)}
        secret = docs["Secret"]
        assert set(secret["data"]) == {"keys"}
        assert base64.b64decode(secret["data"]["keys"]).decode() == "".join(f"{i}:{h}\n" for i, h in digests.items())
        pod = docs[kind]["spec"]["predictor"] if kind == "InferenceService" else docs[kind]["spec"]["template"]["spec"]
        # the generated (hash-suffixed) name reaches the pod, the InferenceService included (kustomizeconfig.yaml)
        assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == [secret["metadata"]["name"]]
        assert secret["metadata"]["name"].startswith("edgeft-tiny-model-keys-")
        if HAVE_VALIDATOR:
            import kubernetes_validate

            for d in docs.values():
                if d["kind"] != "InferenceService":
                    kubernetes_validate.validate(d, k8s.k8s_schema_versions()[-1], strict=True)
