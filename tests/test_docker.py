"""docker/, checked as far as a machine without a Docker engine allows: the Dockerfile lints
clean, the Compose file parses with the Docker client's Compose, the scripts pass shellcheck, and
the images install with the recipe CI runs. (Building and running the images needs an engine.)"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, compose_with

BIN = Path(sys.executable).parent
DOCKER = ROOT / "docker"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_USER": "store-user", "MINIO_ROOT_PASSWORD": "store-secret"}


def compose(tmp_path: Path, *args: str, secrets: dict) -> subprocess.CompletedProcess:
    """`docker compose ARGS` through the Docker client, with Compose installed as its plugin
    (or Compose alone where there is no client)."""
    binary = Path(importlib.util.find_spec("compose").origin).parent / "docker-compose"
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | secrets
    if shutil.which("docker"):
        plugins = tmp_path / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(binary)
        command, env["DOCKER_CONFIG"] = ["docker", "compose"], str(plugins.parent)
    else:
        command = [str(binary)]
    return subprocess.run([*command, "-f", "compose.yaml", *args], cwd=DOCKER, env=env, capture_output=True, text=True)


def test_dockerfile_lints_clean():
    result = subprocess.run([BIN / "hadolint", "--config", DOCKER / "hadolint.yaml", DOCKER / "Dockerfile"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_wires_pipeline_mlflow_postgres_and_minio(tmp_path):
    result = compose(tmp_path, "--profile", "pipeline", "--profile", "gpu", "config", "--format", "json",
                     secrets=SECRETS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "mlflow", "pipeline", "pipeline-cuda"}
    mlflow = services["mlflow"]
    assert "--backend-store-uri=postgresql://mlflow:pg-secret@postgres:5432/mlflow" in mlflow["command"]
    assert "--artifacts-destination=s3://mlflow/" in mlflow["command"] and "--serve-artifacts" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["AWS_SECRET_ACCESS_KEY"] == "store-secret"
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for name in ("pipeline", "pipeline-cuda"):
        service = services[name]
        assert service["depends_on"]["mlflow"]["condition"] == "service_healthy"
        # What the container runs is a valid pipeline command line.
        python, dash_m, module, *overrides = service["entrypoint"] + service["command"]
        assert (python, dash_m, module) == ("python", "-m", "pipeline")
        assert compose_with(*overrides).tracking.uri == "http://mlflow:5000"
    assert services["pipeline-cuda"]["build"]["args"]["TORCH_INDEX"].endswith("/cu128")
    assert services["pipeline-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_refuses_to_start_without_its_secrets(tmp_path):
    result = compose(tmp_path, "config", "--quiet", secrets={})
    # Compose names the first missing secret it meets, in no fixed order.
    assert result.returncode != 0 and any(name in result.stderr for name in SECRETS) and "docker/.env" in result.stderr


def test_scripts_pass_shellcheck():
    result = subprocess.run([BIN / "shellcheck", DOCKER / "vllm-serve", ROOT / ".ci" / "run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert os.access(DOCKER / "vllm-serve", os.X_OK)


def test_images_install_with_the_recipe_ci_runs():
    def commands(target):
        # Clean of an outer make's settings: `make test` itself runs this test.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        dry = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, "VENV=/env"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        return dry.stdout.splitlines()

    install, vllm, services, test = (commands(t) for t in ("install", "install-vllm", "services", "test"))
    # CI's `make test` is this install, vLLM's environment and the tests' services, then pytest.
    assert test[:-1] == install + vllm + services and test[-1].startswith("/env/bin/python -m pytest")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'make install TORCH="${TORCH}" EXTRAS="${EXTRAS}"' in dockerfile
    # The image runs the README's command: python -m pipeline stage=all.
    assert 'ENTRYPOINT ["python", "-m", "pipeline"]' in dockerfile and 'CMD ["stage=all"]' in dockerfile
