"""Static checks of infra/: every manifest parses and carries the fields clgrid relies on.

These tests only read files (no Docker, Kubernetes or cloud). The Ray cluster-launcher config
is also validated with Ray's own schema, the same check `ray up` runs, which works offline.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re

import pytest
import yaml

from clgrid.sweep.layout import check_storage

REPO = pathlib.Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})


def load_docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_one(path: pathlib.Path) -> dict:
    (doc,) = load_docs(path)
    return doc


# ---------------------------------------------------------------------------------------------
# every YAML file


def test_expected_files_exist():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {
        "ray/cluster.yaml",
        "kuberay/config.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "mlflow/docker-compose.yaml",
    } <= names
    assert (INFRA / "docker" / "Dockerfile").is_file()
    assert (INFRA / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_to_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path}: no YAML documents"
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


# ---------------------------------------------------------------------------------------------
# no inline secrets

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY", re.IGNORECASE)
# References that carry no value: ${VAR}, ${VAR:?msg}, ${VAR?msg}, ${VAR:-} (empty default), $VAR.
REFERENCE = re.compile(r"\$\{[A-Za-z_]\w*(?:(?::?\?[^}]*)|:?-)?\}|\$[A-Za-z_]\w*")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")


def _is_literal(value) -> bool:
    return value is not None and str(value).strip() != "" and not REFERENCE.fullmatch(str(value).strip())


def inline_secrets(obj, where: str = "") -> list[str]:
    """Paths of secret-looking values written literally anywhere in a parsed manifest."""
    found: list[str] = []
    if isinstance(obj, dict):
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            found.append(f"{where}: a Secret with data")
        # Kubernetes env entry: {name: AWS_SECRET_ACCESS_KEY, value: "..."}
        if isinstance(obj.get("name"), str) and SECRET_NAME.search(obj["name"]) and _is_literal(obj.get("value")):
            found.append(f"{where}.{obj['name']}")
        for key, value in obj.items():
            # a key naming a Secret object (authOptions.secretName) holds a name, and a file_mounts
            # entry (~/.ray/auth_token: ~/.ray/auth_token) a path: neither is a secret
            if isinstance(value, (str, int, float)) and SECRET_NAME.search(str(key)) and not str(key).endswith("Name") \
                    and not str(value).startswith(("/", "~/")) and _is_literal(value):
                found.append(f"{where}.{key}")
            found += inline_secrets(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            found += inline_secrets(item, f"{where}[{i}]")
    elif isinstance(obj, str):
        # compose list style: - AWS_SECRET_ACCESS_KEY=value
        key, sep, value = obj.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_]\w*", key) and SECRET_NAME.search(key) and _is_literal(value):
            found.append(f"{where}: {key}=...")
        for password in URL_PASSWORD.findall(obj):
            if _is_literal(password):
                found.append(f"{where}: password in a URL")
    return found


def test_secret_scanner_catches_literals_and_allows_references():
    planted = yaml.safe_load(
        """
        a: {env: [{name: AWS_SECRET_ACCESS_KEY, value: abc123}]}
        b: {environment: {POSTGRES_PASSWORD: hunter2}}
        c: {environment: [MINIO_ROOT_PASSWORD=hunter2]}
        d: {kind: Secret, stringData: {AWS_ACCESS_KEY_ID: AKIAXXXX}}
        e: {command: "mlflow server --backend-store-uri postgresql://u:pw@db/mlflow"}
        f: {environment: {PGPASSWORD: "${PGPASSWORD:-hunter2}"}}
        """
    )
    flagged = {hit.split(".")[1].split(":")[0] for hit in inline_secrets(planted)}
    assert flagged == {"a", "b", "c", "d", "e", "f"}
    clean = yaml.safe_load(
        """
        a: {env: [{name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: s, key: k}}}]}
        b: {environment: {POSTGRES_PASSWORD: "${POSTGRES_PASSWORD:?set in .env}", T: "${TOKEN}"}}
        c: {environment: [MINIO_ROOT_PASSWORD=$MINIO_ROOT_PASSWORD], ALLOWED: "${X:-}"}
        e: {command: "mlflow server --backend-store-uri postgresql://${U}@postgres:5432/${DB}"}
        f: {envFrom: [{secretRef: {name: clgrid-s3}}]}
        """
    )
    assert inline_secrets(clean) == []


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_no_manifest_inlines_a_secret(path):
    assert inline_secrets(load_docs(path), path.name) == []


def test_no_aws_key_ids_and_env_example_holds_placeholders():
    for path in INFRA.rglob("*"):
        if path.is_file():
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text(errors="replace")), path
    env = dict(_env_file(INFRA / "mlflow" / ".env.example"))
    secret_keys = [k for k in env if SECRET_NAME.search(k) or k == "MINIO_ROOT_USER"]  # MinIO's user is the access key
    assert secret_keys
    for key in secret_keys:
        assert "change-me" in env[key], f".env.example: {key} must be a change-me placeholder"
    ignored = (INFRA / "mlflow" / ".gitignore").read_text().split()
    assert ".env" in ignored, "infra/mlflow/.env (real credentials) must be git-ignored"


def _env_file(path: pathlib.Path):
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_one(INFRA / "ray" / "cluster.yaml")


def test_cluster_config_passes_rays_own_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # The same two steps `ray up` runs before touching the cloud (both offline); they raise on a bad config.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_has_cpu_head_and_gpu_worker_type(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_workers = [
        name
        for name, t in types.items()
        if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1
    ]
    assert gpu_workers, "need a worker type declaring a GPU resource that can scale up"
    for name in gpu_workers:
        assert types[name]["resources"].get("CPU", 0) >= 1, name
        assert types[name].get("min_workers", 0) <= types[name]["max_workers"] <= cluster["max_workers"]
    images = [cluster["docker"].get(k, "") for k in ("image", "head_image", "worker_image")]
    assert any("clgrid" in i for i in images) and all("clgrid" in i for i in images if i)


def test_cluster_start_commands(cluster):
    head = " ; ".join(cluster["head_start_ray_commands"])
    workers = " ; ".join(cluster["worker_start_ray_commands"])
    (head_start,) = re.findall(r"\bray start\b[^;&|]*", head)
    assert re.search(r"--head\b", head_start)
    # loopback-only dashboard (reach it with `ray dashboard cluster.yaml`)
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", head_start)
    assert re.search(r"\bray start\b[^;&|]*--address[= ]\$RAY_HEAD_IP:\d+", workers)


def test_cluster_nodes_share_the_storage_root(cluster):
    # the README's `--storage` for this cluster must be a path clgrid accepts, mounted on every
    # node's host by initialization_commands and bound into the container at the same place
    storage = re.search(r"--storage (\S+)", (INFRA / "ray" / "cluster.yaml").read_text()).group(1)
    check_storage(storage)
    binds = [o.split()[1].split(":") for o in cluster["docker"]["run_options"] if o.startswith("--volume")]
    shared = [host for host, inside in binds if host == inside and storage.startswith(host.rstrip("/") + "/")]
    assert shared, f"--storage {storage} is not under a folder bound into the container"
    init = " ; ".join(cluster["initialization_commands"])
    assert re.search(rf"mount -t nfs4?\b[^;]*\s{re.escape(shared[0])}\b", init), "the shared folder is an NFS mount"


def test_cluster_commands_never_run_from_a_repo_checkout(cluster):
    from ray.autoscaler._private.util import prepare_config

    merged = prepare_config(copy.deepcopy(cluster))  # includes the provider's default commands
    commands = [
        c
        for key in (
            "initialization_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in merged.get(key, [])
    ]
    for command in commands:
        # everything is in the image; a pip install as the non-root image user fails or drifts
        assert not re.search(r"\bpip3? install\b", command), command
        for target in re.findall(r"\bcd\s+(\S+)", command):
            assert target in {"~", "$HOME"}, f"run from the home dir, not a checkout: {command}"
    for local in merged.get("file_mounts", {}).values():
        assert (REPO / local).resolve() != REPO, "do not mount the repo root (platform/ shadows stdlib)"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages(path: pathlib.Path) -> list[dict]:
    """[{"base", "name", "instructions": [(INSTR, args)]}] with line continuations joined."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[dict] = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            stages.append({"base": parts[0], "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instr, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(INFRA / "docker" / "Dockerfile")


def _args(stage: dict, instr: str) -> list[str]:
    return [a for i, a in stage["instructions"] if i == instr]


def test_dockerfile_builds_a_wheel_then_installs_only_the_wheel(stages):
    assert len(stages) >= 2, "multi-stage: builder + runtime"
    *builders, final = stages
    builder_names = {s["name"] for s in builders}
    assert any(re.search(r"pip wheel|python -m build", r) for s in builders for r in _args(s, "RUN"))
    assert final["base"].startswith(("python:", "rayproject/ray")) or "${PYTHON_VERSION}" in final["base"]
    copies = _args(final, "COPY")
    assert copies and all(re.search(r"--from=(\S+)", c) for c in copies), "runtime stage copies nothing from the context"
    assert all(re.search(r"--from=(\S+)", c).group(1) in builder_names for c in copies)
    installs = [r for r in _args(final, "RUN") if "pip install" in r]
    assert any(re.search(r"clgrid-\S*\.whl", r) for r in installs)
    assert not any(re.search(r"pip install (-e )?\.(\s|$)", r) for r in installs)


def test_dockerfile_torch_variant_is_a_build_arg(stages):
    final = stages[-1]
    assert any(a.startswith("TORCH_VARIANT") for a in _args(final, "ARG"))
    assert any("TORCH_VARIANT" in r and "torch==" in r for r in _args(final, "RUN"))


def test_dockerfile_non_root_user_and_workdir_outside_any_source_tree(stages):
    *builders, final = stages
    users = _args(final, "USER")
    assert users, "runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    workdirs = _args(final, "WORKDIR")
    assert workdirs, "runtime stage must set WORKDIR"
    workdir = workdirs[-1].rstrip("/") or "/"
    assert workdir != "/"
    # the builder's WORKDIR is where the repo (with platform/) was copied; never run from there
    assert workdir not in {w.rstrip("/") for s in builders for w in _args(s, "WORKDIR")}
    assert "site-packages" not in workdir
    # the created user's uid is the one the KubeRay pods run as
    uid = re.search(rf"useradd\b.*--uid (\d+).*\b{user}\b", " ".join(_args(final, "RUN")))
    assert uid, "create the USER with an explicit --uid"
    assert int(uid.group(1)) == _kuberay_run_as_user()


def test_dockerignore_is_where_buildkit_reads_it():
    # With `docker build -f infra/docker/Dockerfile .` BuildKit reads Dockerfile.dockerignore next
    # to the Dockerfile (or .dockerignore at the context root); infra/docker/.dockerignore is ignored.
    assert not (INFRA / "docker" / ".dockerignore").exists()
    patterns = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".git" in patterns


def test_ray_version_pinned_consistently(stages):
    pins = [re.fullmatch(r"RAY_VERSION=(\S+)", a) for a in _args(stages[-1], "ARG")]
    (ray_version,) = [m.group(1) for m in pins if m]
    assert _raycluster()["spec"]["rayVersion"] == ray_version
    assert _rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


# ---------------------------------------------------------------------------------------------
# KubeRay


def _raycluster() -> dict:
    return load_one(INFRA / "kuberay" / "raycluster.yaml")


def _rayjob() -> dict:
    return load_one(INFRA / "kuberay" / "rayjob.yaml")


def _configmaps() -> dict[str, dict]:
    docs = load_docs(INFRA / "kuberay" / "config.yaml")
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


def _kuberay_run_as_user() -> int:
    specs = _pod_specs(_raycluster()["spec"]) + _pod_specs(_rayjob()["spec"]["rayClusterSpec"])
    uids = {s["securityContext"]["runAsUser"] for s in specs}
    assert len(uids) == 1 and all(s["securityContext"].get("runAsNonRoot") for s in specs)
    return uids.pop()


def check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    # the dashboard binds the pod IP inside KubeRay: the head Service must stay cluster-internal
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "need a worker group with an nvidia.com/gpu limit"
    for g in gpu_groups:
        assert g["groupName"] and g.get("minReplicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1
    configmaps = _configmaps()
    for pod in _pod_specs(spec):
        ray = pod["containers"][0]  # KubeRay treats the first container as the Ray container
        assert "clgrid" in ray["image"]
        env = {e["name"]: e for e in ray.get("env", [])}
        for var in ("MLFLOW_TRACKING_URI", "CLGRID_STORAGE"):
            ref = env[var]["valueFrom"]
            ref = ref.get("configMapKeyRef") or ref["secretKeyRef"]
            if "configMapKeyRef" in env[var]["valueFrom"]:
                assert ref["key"] in configmaps[ref["name"]], f"{var}: {ref} not in infra/kuberay/config.yaml"
        storage = configmaps["clgrid-config"]["CLGRID_STORAGE"]
        check_storage(storage)  # the same refusal clgrid run applies: a path, not a URI
        mounts = {m["name"]: m["mountPath"] for m in ray.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [n for n, path in mounts.items() if storage == path or storage.startswith(path.rstrip("/") + "/")]
        assert shared, f"{ray['name']}: CLGRID_STORAGE {storage} is on no mounted volume"
        claim = volumes[shared[0]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in _claims()[claim]["spec"]["accessModes"], f"{claim}: every node writes it"


def _claims() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in load_docs(INFRA / "kuberay" / "config.yaml")
            if d["kind"] == "PersistentVolumeClaim"}


def test_raycluster_head_and_gpu_worker_group():
    rc = _raycluster()
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(rc["spec"])


def test_rayjob_runs_clgrid_and_cleans_up():
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert re.match(r"clgrid (run|submit)\s+\S+\.ya?ml\b", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_variables_reach_the_submitter_pod():
    # KubeRay runs `bash -c "ray job submit ... -- <entrypoint>"` in the submitter pod, so every
    # $VAR in the entrypoint is expanded there and must be in that pod's environment.
    spec = _rayjob()["spec"]
    wanted = set(re.findall(r"\$\{?([A-Za-z_]\w*)", spec["entrypoint"]))
    assert {"MLFLOW_TRACKING_URI", "CLGRID_STORAGE"} <= wanted
    container = spec["submitterPodTemplate"]["spec"]["containers"][0]
    available = {e["name"] for e in container.get("env", [])}
    configmaps = _configmaps()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            available |= set(configmaps[source["configMapRef"]["name"]])
    assert wanted <= available


# ---------------------------------------------------------------------------------------------
# MLflow stack


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_one(INFRA / "mlflow" / "docker-compose.yaml")


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_compose_has_postgres_s3_store_and_mlflow(compose):
    services = compose["services"]
    postgres = [n for n, s in services.items() if s.get("image", "").startswith("postgres:")]
    s3 = [n for n, s in services.items() if "minio" in s.get("image", "")]
    assert postgres and s3
    (mlflow,) = [s for s in services.values() if "mlflow server" in _command(s)]
    command = _command(mlflow)
    backend = re.search(r"--backend-store-uri[= ]postgresql://\S*@([\w-]+)[:/]", command)
    assert backend and backend.group(1) in postgres, "backend must be the compose postgres service"
    assert re.search(r"--artifacts-destination[= ]s3://", command)
    assert re.search(r"--host[= ]0\.0\.0\.0\b", command)
    endpoint = mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert re.match(rf"https?://({'|'.join(s3)}):\d+", endpoint)
    assert set(postgres) <= set(mlflow["depends_on"])


def test_compose_creates_the_artifact_bucket_before_mlflow(compose):
    services = compose["services"]
    (name, mlflow) = [(n, s) for n, s in services.items() if "mlflow server" in _command(s)][0]
    bucket_var = re.search(r"--artifacts-destination[= ]s3://\$\{(\w+)", _command(mlflow)).group(1)
    creators = [
        n
        for n, s in services.items()
        if n != name and bucket_var in str(s.get("environment", "")) and re.search(r"\bmc mb\b", _command(s))
    ]
    assert creators, f"no init service creates the bucket ${{{bucket_var}}}"
    for creator in creators:
        assert mlflow["depends_on"][creator]["condition"] == "service_completed_successfully"
        assert bucket_var in str(services[creator]["environment"]["BUCKET"])


def test_compose_publishes_only_on_loopback_by_default(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[0] if str(port).count(":") >= 2 else None
            assert host is not None, f"{name}: {port} publishes on every interface"
            assert host == "127.0.0.1" or re.fullmatch(r"\$\{\w+:-127\.0\.0\.1\}", host), f"{name}: {port}"


def test_compose_variables_are_all_in_env_example():
    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    text = text.replace("$$", "")  # $$VAR is the container's own environment, not interpolation
    uses = re.findall(r"\$\{(\w+)([^}]*)\}", text)
    required = {var for var, rest in uses if not rest.startswith((":-", "-"))}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_BUCKET"} <= required
    assert required <= dict(_env_file(INFRA / "mlflow" / ".env.example")).keys()


def test_mlflow_image_has_the_postgres_and_s3_clients():
    runs = " ".join(a for i, a in dockerfile_stages(INFRA / "mlflow" / "Dockerfile")[-1]["instructions"] if i == "RUN")
    assert re.search(r"pip install .*mlflow\[auth\]==", runs), "the basic-auth app needs mlflow's auth extra"
    assert "psycopg2" in runs and "boto3" in runs


# ---------------------------------------------------------------------------------------------
# Authentication and least privilege (issue 19)


def _ref(value: str) -> str | None:
    """The variable a compose value refers to (``${VAR:?msg}`` -> VAR), else None."""
    found = re.fullmatch(r"\$\{(\w+)[^}]*\}", str(value).strip())
    return found.group(1) if found else None


def _change_me_vars() -> set[str]:
    return {k for k, v in _env_file(INFRA / "mlflow" / ".env.example") if "change-me" in v}


def test_mlflow_runs_its_basic_auth_app(compose):
    (mlflow,) = [s for s in compose["services"].values() if "mlflow server" in _command(s)]
    assert re.search(r"--app-name[= ]basic-auth\b", _command(mlflow))
    env = mlflow["environment"]
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert _ref(env[var]), f"{var}: from .env, not written here"
    assert _ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) in _change_me_vars()
    mounts = dict(v.rsplit(":", 2)[:2] for v in mlflow["volumes"] if v.startswith("./"))
    (ini,) = [host for host, inside in mounts.items() if inside == env["MLFLOW_AUTH_CONFIG_PATH"]]
    import configparser

    config = configparser.ConfigParser()
    assert config.read(INFRA / "mlflow" / ini)
    assert config["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert "admin_password" not in config["mlflow"], "the admin password comes from .env"
    assert config["mlflow"]["authorization_function"].endswith(":authenticate_request_basic_auth")


def test_mlflow_uses_a_scoped_minio_key_not_the_root_keys(compose):
    services = compose["services"]
    (mlflow,) = [s for s in services.values() if "mlflow server" in _command(s)]
    key, secret = _ref(mlflow["environment"]["AWS_ACCESS_KEY_ID"]), _ref(mlflow["environment"]["AWS_SECRET_ACCESS_KEY"])
    assert key and secret and not {key, secret} & {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    # the root keys reach MinIO itself and the one-shot setup, nothing else
    holders = {n for n, s in services.items() if "MINIO_ROOT_PASSWORD" in str(s.get("environment", ""))}
    (setup,) = holders - {"minio"}
    command = _command(services[setup])
    assert re.search(r'mc admin user add local "\$\$(\w+)" "\$\$(\w+)"', command)
    names = {_ref(v) for v in services[setup]["environment"].values()}
    assert {key, secret} <= names
    attach = re.search(r"mc admin policy attach local (\S+) --user", command).group(1)
    created = re.search(rf"mc admin policy create local {attach} (\S+)", command).group(1)
    written = re.search(rf"printf '([^']*)' \\\s*\"\$\$BUCKET\" \"\$\$BUCKET\" > {re.escape(created)}\n", command)
    policy = json.loads(written.group(1).replace("%s", "the-bucket"))
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"])
        assert all(re.fullmatch(r"arn:aws:s3:::the-bucket(/\*)?", r) for r in statement["Resource"])


def test_compose_refuses_to_start_with_placeholders(compose):
    services = compose["services"]
    checks = [n for n, s in services.items() if "check-env.sh" in " ".join(map(str, s.get("entrypoint", [])))]
    (check,) = checks
    assert services[check]["env_file"] == [".env"]  # every variable of .env, whatever its name
    waits = {n: {d for d, c in s.get("depends_on", {}).items() if c["condition"].startswith("service_")}
             for n, s in services.items()}

    def needs_check(name: str, seen=()) -> bool:
        return check in waits[name] or any(needs_check(d, (*seen, name)) for d in waits[name] if d not in seen)

    for name in set(services) - {check}:
        assert needs_check(name), f"{name} starts without waiting for {check}"
    for name, service in services.items():  # the check must complete, not merely start
        if check in service.get("depends_on", {}):
            assert service["depends_on"][check]["condition"] == "service_completed_successfully", name


def test_placeholder_refusal_script_names_each_variable_left(tmp_path):
    import subprocess

    script = INFRA / "mlflow" / "check-env.sh"
    example = dict(_env_file(INFRA / "mlflow" / ".env.example"))
    base = {"PATH": "/usr/bin:/bin"}
    refused = subprocess.run(["sh", str(script)], env={**base, **example}, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    named = set(re.findall(r"infra/mlflow/\.env: (\w+) still holds", refused.stderr))
    assert named == _change_me_vars() and len(named) >= 6
    assert not any(example[k] in refused.stderr for k in named), "the values themselves are never printed"
    filled = {k: (v.replace("change-me", "x7Qp") if "change-me" in v else v) for k, v in example.items()}
    one_left = {**filled, "MLFLOW_CLGRID_PASSWORD": "Change-Me-later"}
    assert subprocess.run(["sh", str(script)], env={**base, **filled}, capture_output=True, timeout=30).returncode == 0
    left = subprocess.run(["sh", str(script)], env={**base, **one_left}, capture_output=True, text=True, timeout=30)
    assert left.returncode == 1 and "MLFLOW_CLGRID_PASSWORD" in left.stderr


# ---- Ray cluster launcher


def _exports(command: str) -> dict[str, str]:
    return dict(re.findall(r"\b(RAY_AUTH_\w+)=(\S+)", command))


def test_cluster_hands_every_node_the_token(cluster):
    mounts = cluster["file_mounts"]
    remote = [r for r, local in mounts.items() if local == "~/.ray/auth_token"]  # `ray get-auth-token --generate`
    assert remote, "the token file is not mounted on the nodes"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if re.search(r"\bray start\b", c)]
        env = _exports(start.split("ray start")[0])
        assert env.get("RAY_AUTH_MODE") == "token", key
        assert env.get("RAY_AUTH_TOKEN_PATH", "").replace("$HOME", "~") in remote, key


def test_cluster_names_its_security_group_and_head_profile(cluster):
    # Without SecurityGroupIds Ray creates a group with SSH open to 0.0.0.0/0; without
    # IamInstanceProfile the head gets AmazonEC2FullAccess and AmazonS3FullAccess.
    types = cluster["available_node_types"]
    for name, node_type in types.items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    head = types[cluster["head_node_type"]]["node_config"]
    assert "instance-profile/" in head["IamInstanceProfile"]["Arn"]
    assert "0.0.0.0/0" not in (INFRA / "ray" / "cluster.yaml").read_text()


@pytest.fixture(scope="module")
def prereqs() -> dict:
    return load_one(INFRA / "ray" / "aws-prereqs.yaml")


def test_prereqs_limit_ssh_to_the_named_cidr(prereqs):
    cidr = prereqs["Parameters"]["SshCidr"]
    assert "Default" not in cidr, "the user must name the CIDR"
    pattern = re.compile(cidr["AllowedPattern"])
    assert pattern.search("203.0.113.7/32") and pattern.search("10.0.0.0/8")
    for refused in ("0.0.0.0/0", "CHANGE-ME", "203.0.113.7", "1.2.3.4/0", "::/0"):
        assert not pattern.search(refused), refused
    (group,) = [r for r in prereqs["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroup"]
    rules = group["Properties"]["SecurityGroupIngress"]
    assert rules == [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": {"Ref": "SshCidr"}}]
    extra = [r["Properties"] for r in prereqs["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert all("CidrIp" not in r and "CidrIpv6" not in r and "SourceSecurityGroupId" in r for r in extra)


def test_prereqs_head_role_is_least_privilege(prereqs):
    (role,) = [r["Properties"] for r in prereqs["Resources"].values() if r["Type"] == "AWS::IAM::Role"]
    assert not role.get("ManagedPolicyArns"), "no AWS managed (full access) policies"
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    actions = [a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert all(a.count(":") == 1 and not a.endswith("*") for a in actions), actions
    assert not {a for a in actions if a.startswith(("s3:", "iam:"))}
    for s in statements:
        if {"ec2:TerminateInstances", "ec2:StopInstances"} & set(s["Action"]):
            assert "ec2:ResourceTag/ray-cluster-name" in s["Condition"]["StringEquals"]
    (profile,) = [r["Properties"] for r in prereqs["Resources"].values() if r["Type"] == "AWS::IAM::InstanceProfile"]
    assert len(profile["Roles"]) == 1


# ---- KubeRay


def _cluster_specs() -> dict[str, dict]:
    return {"raycluster": _raycluster()["spec"], "rayjob": _rayjob()["spec"]["rayClusterSpec"]}


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def test_kuberay_hands_every_pod_the_token_from_a_secret():
    for name, spec in _cluster_specs().items():
        auth = spec.get("authOptions")
        assert auth and auth["mode"] == "token", f"{name}: explicit token auth (KubeRay authOptions)"
        assert re.fullmatch(r"[a-z0-9-]+", auth["secretName"]), f"{name}: the token comes from a Secret"
        for pod in _pod_specs(spec):
            for c in _containers(pod):
                env = {e["name"]: e for e in c.get("env", [])}
                assert "RAY_AUTH_TOKEN" not in env and env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"
    secrets = {spec["authOptions"]["secretName"] for spec in _cluster_specs().values()}
    (secret,) = secrets
    assert f"kubectl -n clgrid create secret generic {secret} --from-literal=auth_token=" in (INFRA / "README.md").read_text()


def test_kuberay_trials_get_mlflow_credentials_from_a_secret():
    for name, spec in _cluster_specs().items():
        for pod in _pod_specs(spec):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[var]["valueFrom"], f"{name}: {var}"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def _check_restricted(pod: dict, where: str) -> None:
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("runAsNonRoot") is True and pod_ctx.get("runAsUser", 1) != 0, where
    for c in _containers(pod):
        ctx = c.get("securityContext", {})
        assert ctx.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"] and not ctx["capabilities"].get("add"), c["name"]
        assert (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile", {})).get("type") == "RuntimeDefault"
        assert ctx.get("runAsNonRoot", pod_ctx["runAsNonRoot"]) is True and not ctx.get("privileged")
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{where}: volume {volume['name']}"


def test_kuberay_namespace_enforces_restricted_and_every_pod_meets_it():
    docs = load_docs(INFRA / "kuberay" / "config.yaml")
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in load_docs(path):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], f"{path.name}: {doc['kind']}"
    for name, spec in _cluster_specs().items():
        for i, pod in enumerate(_pod_specs(spec)):
            _check_restricted(pod, f"{name} pod {i}")
        # KubeRay adds the autoscaler container with autoscalerOptions.securityContext; its init
        # containers copy the Ray container's.
        _check_restricted({"securityContext": {"runAsNonRoot": True},
                           "containers": [{"name": "autoscaler", **spec["autoscalerOptions"]}]}, f"{name} autoscaler")
    _check_restricted(_rayjob()["spec"]["submitterPodTemplate"]["spec"], "rayjob submitter")


def _policies() -> list[dict]:
    return [d for d in load_docs(INFRA / "kuberay" / "networkpolicy.yaml") if d["kind"] == "NetworkPolicy"]


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] != "In" or labels.get(e["key"]) not in e["values"]:
            return False
    return bool(selector)


def _ray_pod_labels() -> dict[str, list[dict]]:
    return {name: [p["metadata"]["labels"] for p in [spec["headGroupSpec"]["template"]]
                   + [g["template"] for g in spec["workerGroupSpecs"]]] for name, spec in _cluster_specs().items()}


def test_networkpolicy_admits_gcs_and_job_api_only_from_what_needs_them():
    submitter = _rayjob()["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    for name, pods in _ray_pod_labels().items():
        for labels in pods:
            governing = [p for p in _policies() if _selects(p["spec"]["podSelector"], labels)]
            assert governing, f"{name}: pods with {labels} are open to every pod"
            for policy in governing:
                assert "Ingress" in policy["spec"]["policyTypes"]
                for rule in policy["spec"]["ingress"]:
                    assert rule.get("from"), f"{policy['metadata']['name']}: a rule admitting every source"
                    ports = {p["port"] for p in rule.get("ports", [])}
                    for peer in rule["from"]:
                        assert "ipBlock" not in peer and "podSelector" in peer, policy["metadata"]["name"]
                        own = all(_selects(peer["podSelector"], other) for other in pods)
                        if not own:  # anyone but the cluster's own pods: the job API at most
                            assert ports and ports <= {8265}, f"{policy['metadata']['name']}: {peer}"
                            assert _selects(peer["podSelector"], submitter) or _selects(peer["podSelector"], operator)
                # the cluster's own pods, the submitter and the operator do get in
                rules = policy["spec"]["ingress"]
                admitted = lambda who, port: any(  # noqa: E731
                    any(_selects(p["podSelector"], who) for p in r["from"])
                    and (not r.get("ports") or port in {x["port"] for x in r["ports"]}) for r in rules)
                assert all(admitted(other, 6379) and admitted(other, 8265) for other in pods)
                assert admitted(submitter, 8265) and admitted(operator, 8265)
                assert not admitted(submitter, 6379) and not admitted({"app": "anything-else"}, 8265)
