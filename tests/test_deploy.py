"""deploy/: every file is checked by a real validator, and the metric names it uses exist.

Images: hadolint. Compose: the Compose specification's schema. Kubernetes: `kubectl
kustomize` renders each overlay, `kubernetes-validate --strict` checks built-in kinds against
the Kubernetes API schemas (any warning about a built-in kind fails), custom resources are
checked against their CRD's schema kept in deploy/k8s/schemas/, and checkov lints the
rendered manifests. What needs a Docker engine or a cluster is listed in deploy/README.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from serving.client import Client, PredictionError
from tests.serving_helpers import ROOT, metric_value, running_server, wait_for

BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
# Every kustomization a user applies: the serving overlays, the retrain Job, the adapter's
# rules, and the multi-node training Job.
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "train", "prometheus-adapter", "train-multinode"]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S
    / "schemas"
    / "monitoring.coreos.com_servicemonitor_v1.json",
}
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
# checkov checks we do not follow, and why:
CHECKOV_SKIPS = {
    "CKV_K8S_21": "no namespace in the manifests: `kubectl apply -k ... -n NAMESPACE` picks it",
    "CKV_K8S_43": "images are named by tag here; pin your registry's digest in the overlay",
    "CKV_K8S_15": "IfNotPresent with immutable version tags; Always adds a registry round trip",
}


def tool(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{name} is missing from {BIN}: `make install` (dev extra) installs it"
    return path


def run(*cmd: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)


def render(kustomization: str) -> list[dict]:
    out = run(tool("kubectl"), "kustomize", K8S / kustomization)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each kustomization rendered once into a file."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for k in KUSTOMIZATIONS:
        path = out / (k.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(render(k)))
        files[k] = path
    return files


def docs_of(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile):
    out = run(tool("hadolint"), dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_image_runs_as_non_root_from_pinned_bases_and_the_serving_ones_probe_health():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda", "Dockerfile.train"}
    for path in DOCKERFILES:
        text = path.read_text()
        bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
        assert bases and all(re.search(r":\d+\.\d+\.\d+-", b) for b in bases), bases
        assert "USER 10001:10001" in text
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        assert 'CMD ["python", "-m", "serving.probe"]' in text
        assert 'ENTRYPOINT ["cnn-serve"]' in text and "torch" not in text.split("FROM")[-1]
    cpu = (DEPLOY / "docker" / "requirements-serving-cpu.txt").read_text()
    cuda = (DEPLOY / "docker" / "requirements-serving-cuda.txt").read_text()
    pins = lambda t: [ln for ln in t.splitlines() if ln and not ln.startswith("#")]  # noqa: E731
    assert all("==" in ln for ln in pins(cpu) + pins(cuda))
    assert "onnxruntime==1.31.1" in pins(cpu) and not any("-gpu" in p for p in pins(cpu))
    assert "onnxruntime-gpu==1.31.1" in pins(cuda) and "onnxruntime==1.31.1" not in pins(cuda)
    assert not any(ln.startswith("torch") for ln in pins(cpu) + pins(cuda))


@pytest.mark.slow  # about 6 s: pip resolves the whole set
def test_the_cuda_images_requirements_resolve_for_its_python_3_12():
    """The CUDA image cannot be built here (its base is not pullable): at least every pin of
    its requirements file has a wheel for the image's Python and the set is consistent."""
    cuda = DEPLOY / "docker" / "requirements-serving-cuda.txt"
    # the image's python3 is its base's: Ubuntu 24.04 ships Python 3.12
    assert re.search(
        r"^ARG CUDA_IMAGE=\S+-ubuntu24\.04$",
        (DEPLOY / "docker" / "Dockerfile.cuda").read_text(),
        re.M,
    )
    out = run(
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", "-", "--python-version", "3.12",
        "--only-binary=:all:", "-r", cuda,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731 (PEP 503 names)
    got = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    pins = dict(ln.lower().split("==") for ln in cuda.read_text().splitlines() if "==" in ln)
    assert got == pins  # nothing unpinned comes along, and every pin is what resolves


# ----------------------------------------------------------------------------- compose
def test_compose_file_is_valid_against_the_compose_specification():
    out = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml"
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_stack_wires_our_rules_dashboard_and_a_one_shot_trainer():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"cnn-train", "convserve", "prometheus", "grafana"}
    assert svc["convserve"]["depends_on"]["cnn-train"]["condition"] == (
        "service_completed_successfully"
    )
    assert svc["cnn-train"]["restart"] == "no"
    assert svc["convserve"]["read_only"] and "models:/models:ro" in svc["convserve"]["volumes"]
    grace = int(svc["convserve"]["stop_grace_period"].rstrip("s"))
    assert grace > float(svc["convserve"]["environment"]["CONVSERVE_DRAIN_TIMEOUT"])
    mounts = " ".join(svc["prometheus"]["volumes"] + svc["grafana"]["volumes"])
    for local in (
        "./prometheus/prometheus.yml",
        "./prometheus/rules",
        "./grafana/dashboards",
        "./grafana/provisioning/datasources",
        "./grafana/provisioning/dashboards",
    ):
        assert local in mounts and (DEPLOY / local).exists()
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["convserve:8000"]


# ----------------------------------------------------------------------------- kubernetes
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_and_passes_strict_kubernetes_validation(kustomization, rendered):
    out = run(tool("kubernetes-validate"), "--strict", rendered[kustomization])
    assert out.returncode == 0, out.stdout + out.stderr
    custom = {f"kind {kind} with api version {api}" for api, kind in CRD_SCHEMAS}
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith(("WARN", "ERROR")):
            # Only "no schema for a custom kind" may warn; those have a schema of their own.
            assert any(c in line for c in custom), line


def is_custom(api_version: str) -> bool:
    """Built-in kinds live in the core group ("v1"), a dotless group (apps, batch, policy,
    autoscaling) or a *.k8s.io group; anything else comes from a CRD."""
    group = api_version.rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def test_custom_resources_are_valid_against_their_crd_schemas(rendered, tmp_path):
    seen = set()
    for path in rendered.values():
        for i, doc in enumerate(docs_of(path)):
            if not is_custom(doc["apiVersion"]):
                continue
            key = (doc["apiVersion"], doc["kind"])
            assert key in CRD_SCHEMAS, f"custom kind {key} has no CRD schema in deploy/k8s/schemas"
            doc_path = tmp_path / f"{path.stem}-{i}.json"
            doc_path.write_text(json.dumps(doc))
            out = run(tool("check-jsonschema"), "--schemafile", CRD_SCHEMAS[key], doc_path)
            assert out.returncode == 0, out.stdout + out.stderr
            seen.add(key)
    assert seen == set(CRD_SCHEMAS)


def test_the_crd_schema_rejects_a_misspelt_field(tmp_path):
    (doc,) = [d for d in render("overlays/cpu") if d["kind"] == "ServiceMonitor"]
    doc["spec"]["endpoints"][0]["intervall"] = doc["spec"]["endpoints"][0].pop("interval")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    schema = CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")]
    out = run(tool("check-jsonschema"), "--schemafile", schema, bad)
    assert out.returncode != 0 and "intervall" in out.stdout


@pytest.mark.slow  # checkov's own venv (make test builds it); tens of seconds
def test_rendered_manifests_pass_the_checkov_policy_linter(rendered, tmp_path):
    if not CHECKOV.exists():
        pytest.fail("checkov is not installed: `make .venv-checkov/.installed` (make test does)")
    files = [a for k in KUSTOMIZATIONS[:3] for a in ("-f", rendered[k])]
    out = subprocess.run(
        [
            CHECKOV,
            *files,
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "--skip-download",
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
        ],
        capture_output=True,
        text=True,
        # No calls home (guidelines, version check); its cache goes to a temp HOME.
        env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert "Passed checks:" in out.stdout


def serving_objects(overlay: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in render(overlay)}


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_deployment_probes_health_drains_within_its_grace_period_and_runs_locked_down(overlay):
    objs = serving_objects(overlay)
    pod = objs["Deployment/convserve"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["CONVSERVE_DRAIN_TIMEOUT"])
    assert float(env["CONVSERVE_MAX_CONNECTION_AGE"]) > 0
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and env["CONVSERVE_MODEL_REPOSITORY"] == "/models"
    # /tmp is writable (--workers N makes its metrics folder there); nothing names a folder
    # in it that a single server would have to make (tests/test_images.py runs both).
    assert "/tmp" in mounts and "PROMETHEUS_MULTIPROC_DIR" not in env
    assert {p["containerPort"] for p in c["ports"]} == {50051, 8080, 8000}
    if overlay.endswith("gpu"):
        assert env["CONVSERVE_DEVICE"] == "cuda" and c["resources"]["limits"]["nvidia.com/gpu"]
        assert pod["tolerations"] and pod["nodeSelector"]
        assert c["image"].startswith("convserve-cuda:")
    else:
        assert env["CONVSERVE_DEVICE"] == "cpu" and c["image"].startswith("convserve:")


def test_services_select_the_pods_and_only_the_clusterip_one_is_scraped():
    objs = serving_objects("overlays/cpu")
    labels = objs["Deployment/convserve"]["spec"]["template"]["metadata"]["labels"]
    cluster, headless = objs["Service/convserve"], objs["Service/convserve-headless"]
    assert headless["spec"]["clusterIP"] == "None" and "clusterIP" not in cluster["spec"]
    for svc in (cluster, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
    monitor = objs["ServiceMonitor/convserve"]["spec"]
    wanted = monitor["selector"]["matchLabels"].items()
    assert wanted <= cluster["metadata"]["labels"].items()
    assert not wanted <= headless["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in cluster["spec"]["ports"]}
    pdb = objs["PodDisruptionBudget/convserve"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    policy = objs["NetworkPolicy/convserve"]["spec"]
    ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ports == {50051, 8080, 8000}
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_on_cpu_and_on_the_adapter_exposed_inflight_metric():
    hpa = serving_objects("overlays/cpu")["HorizontalPodAutoscaler/convserve"]["spec"]
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    pods_metric = kinds["Pods"]["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    exposed = {r["name"]["as"] for r in rules}
    assert pods_metric in exposed
    for r in rules:
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_retrain_job_exports_into_the_serving_repository_volume():
    (job,) = [d for d in render("train") if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[args.index("--repository") + 1] == "/models"
    claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
    }
    serving_claim = serving_objects("overlays/cpu")["PersistentVolumeClaim/convserve-models"]
    assert claims["models"] == serving_claim["metadata"]["name"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and c["image"].startswith("convserve-train:")


# ----------------------------------------------------------------------------- metric names
# A metric name, but not part of a recorded series' level:metric:operations name.
METRIC = re.compile(r"(?<![\w:])(convserve_[a-z0-9_]+)(?![\w:])")
RECORDED = re.compile(r"\b([a-z_]+:convserve_[a-z0-9_]+:[a-z0-9_]+)\b")


def deploy_texts() -> dict[str, str]:
    hpas = [
        d for o in ("overlays/cpu", "overlays/gpu") for d in render(o)
        if d["kind"] == "HorizontalPodAutoscaler"
    ]  # fmt: skip
    rules = sorted((DEPLOY / "prometheus/rules").glob("*.yml"))
    return {
        "prometheus rules": "\n".join(p.read_text() for p in rules),
        "grafana dashboard": (DEPLOY / "grafana/dashboards/convserve.json").read_text(),
        "adapter rules": (K8S / "prometheus-adapter/rules.yaml").read_text(),
        "hpa": json.dumps([h["spec"]["metrics"] for h in hpas]),
    }


def used_metric_names() -> dict[str, set[str]]:
    """The exported metric names each deploy file needs. The HPA names what the adapter
    exposes ("as"), which maps back to the series the adapter queries."""
    texts = deploy_texts()
    adapter = yaml.safe_load(texts["adapter rules"])["rules"]
    series_of = {r["name"]["as"]: METRIC.search(r["seriesQuery"]).group(1) for r in adapter}
    used = {where: set(METRIC.findall(text)) for where, text in texts.items()}
    used["hpa"] = {series_of.get(n, n) for n in used["hpa"]}
    used["adapter rules"] = set(series_of.values())  # the "as" names are the adapter's own
    assert all(used.values()), used
    return used


def test_every_recorded_series_the_dashboard_and_alerts_read_is_recorded():
    recording = yaml.safe_load((DEPLOY / "prometheus/rules/recording.yml").read_text())
    recorded = {r["record"] for g in recording["groups"] for r in g["rules"]}
    texts = deploy_texts()
    for where in ("prometheus rules", "grafana dashboard"):
        assert set(RECORDED.findall(texts[where])) <= recorded, where


def scraped_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)  # _total, _bucket, _sum, _count
    return names


def test_every_metric_name_in_rules_dashboard_hpa_and_adapter_is_in_a_real_scrape(
    model_repository, tmp_path
):
    """The workload: predictions, a rejected request, a hot swap to a new version and a
    version that fails to load (so the event counters have their labelled series)."""
    used = used_metric_names()
    repo = tmp_path / "models"
    shutil.copytree(model_repository, repo)
    model = repo / "fashion-mnist"
    with running_server(repo, tmp_path, "--poll-interval", "0.3") as server:
        with Client(server.target) as client:
            for _ in range(5):
                assert len(client.predict([np.zeros((1, 28, 28), np.uint8)] * 4, top_k=2)) == 4
            with pytest.raises(PredictionError) as bad:  # rejections carry a reason label
                client.predict([np.zeros((5, 5), np.uint8)])
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
            shutil.copytree(model / "1", model / "2")
            wait_for(
                "version 2 to answer",
                lambda: client.predict([np.zeros((1, 28, 28), np.uint8)])[0].version == 2,
                timeout=30,
            )
            shutil.copytree(model / "1", model / "3")
            (model / "3" / "model.onnx").write_bytes(b"not an onnx graph")
            wait_for(
                "the broken version 3 to be refused",
                lambda: metric_value(server.metrics(), "convserve_model_load_failures_total") >= 1,
                timeout=30,
            )
        exposed = scraped_names(server.metrics())
    missing = {where: sorted(n - exposed) for where, n in used.items() if n - exposed}
    assert not missing, f"metric names used in deploy/ but absent from /metrics: {missing}"
