"""deploy/values.yaml and dagster.yaml against Dagster's own config schemas; the GPU tags as Kubernetes objects.

No Kubernetes or helm here: the test renders the instance blocks the way the chart's templates
(helm/dagster/templates/helpers/instance/*.tpl) do for the keys deploy/values.yaml sets, then validates them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config

from bge_pipeline.defs.assets.embeddings import GPU_POD_CONFIG, build_embedding_batches

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "deploy" / "values.yaml"
K8S_CONFIG_TAG = "dagster-k8s/config"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def _postgres_config(values: dict[str, Any]) -> dict[str, Any]:
    pg = values["postgresql"]
    return {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": pg.get("postgresqlParams", {}),
        }
    }


def render_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The dagster.yaml the chart writes into its instance ConfigMap, for the keys deploy/values.yaml uses."""
    storage = _postgres_config(values)
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = launcher.get("runK8sConfig", {})
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator_config = {
        k: v
        for k, v in {
            "max_concurrent_runs": queued.get("maxConcurrentRuns"),
            "tag_concurrency_limits": queued.get("tagConcurrencyLimits") or None,
            "dequeue_interval_seconds": queued.get("dequeueIntervalSeconds"),
        }.items()
        if v is not None
    }
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    return {
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": storage},
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": storage,
        },
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": storage,
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": values["runLauncher"]["type"],
            "config": {
                "load_incluster_config": launcher["loadInclusterConfig"],
                "job_namespace": launcher.get("jobNamespace") or "bge",
                "image_pull_policy": launcher["imagePullPolicy"],
                "service_account_name": "bge-dagster",
                "dagster_home": values["global"]["dagsterHome"],
                "instance_config_map": "bge-dagster-instance",
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "fail_pod_on_run_failure": launcher.get("failPodOnRunFailure", False),
                "run_k8s_config": {
                    "container_config": run_k8s.get("containerConfig", {}),
                    "pod_spec_config": run_k8s.get("podSpecConfig", {}),
                },
            },
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": values["dagsterDaemon"]["runCoordinator"]["type"],
            "config": coordinator_config,
        },
        "concurrency": {
            "pools": {"granularity": pools["granularity"], "default_limit": pools["defaultLimit"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"]},
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def _check_instance_yaml(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    validated, _ = dagster_instance_config(str(tmp_path))  # raises DagsterInvalidConfigError with the reasons
    return dict(validated)


def test_project_dagster_yaml_is_a_valid_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://postgres:@/dagster?host=/tmp")
    config = _check_instance_yaml(yaml.safe_load((ROOT / "dagster.yaml").read_text()), tmp_path)
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] >= 1


def test_helm_values_render_a_valid_instance(values, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "secret")
    rendered = render_instance(values)
    config = _check_instance_yaml(rendered, tmp_path)
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    # The chart would refuse to render max_concurrent_runs twice; Dagster refuses it at startup.
    assert "max_concurrent_runs" not in rendered["run_coordinator"]["config"]
    assert config["concurrency"]["pools"]["granularity"] == "run"

    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    for storage in (PostgresRunStorage, PostgresEventLogStorage, PostgresScheduleStorage):
        result = validate_config(storage.config_type(), rendered["run_storage"]["config"])
        assert result.success, [error.message for error in result.errors]


def test_k8s_run_launcher_accepts_the_values(values):
    dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s==0.29.27 holds the K8sRunLauncher schema")
    config = render_instance(values)["run_launcher"]["config"]
    result = validate_config(dagster_k8s.K8sRunLauncher.config_type(), config)
    assert result.success, [error.message for error in result.errors]


def _resources(container_config: dict[str, Any]) -> dict[str, dict[str, str]]:
    return container_config["resources"]


def test_gpu_request_is_the_same_in_values_and_the_asset_tag(values):
    run_pod = _resources(values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"])
    step_pod = _resources(GPU_POD_CONFIG["container_config"])
    for resources in (run_pod, step_pod):
        assert set(resources) <= {"requests", "limits"}
        # Kubernetes: an extended resource must be in limits, and a request for it must equal the limit.
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        assert all(isinstance(q, str) for part in resources.values() for q in part.values())
    assert json.loads(build_embedding_batches(8).op.tags[K8S_CONFIG_TAG]) == GPU_POD_CONFIG


def test_k8s_config_tag_parses_as_kubernetes_objects(values):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s==0.29.27 parses dagster-k8s/config tags")
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
    from kubernetes.client import V1PodSpec, V1ResourceRequirements, V1Toleration

    run_k8s = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    for tag_value in (
        build_embedding_batches(8).op.tags[K8S_CONFIG_TAG],  # the op tag, as k8s_job_executor reads it
        json.dumps({"container_config": run_k8s["containerConfig"], "pod_spec_config": run_k8s["podSpecConfig"]}),
    ):
        # The run/op tag path: JSON, validated against dagster-k8s's USER_DEFINED_K8S_JOB_CONFIG_SCHEMA.
        parsed: UserDefinedDagsterK8sConfig = get_user_defined_k8s_config({K8S_CONFIG_TAG: tag_value})
        resources = k8s_model_from_dict(V1ResourceRequirements, parsed.container_config["resources"])
        assert resources.limits["nvidia.com/gpu"] == "1" and resources.requests["nvidia.com/gpu"] == "1"
        pod_spec = k8s_model_from_dict(
            V1PodSpec, k8s_snake_case_dict(V1PodSpec, {**parsed.pod_spec_config, "containers": []})
        )
        assert all(isinstance(t, V1Toleration) and t.key == "nvidia.com/gpu" for t in pod_spec.tolerations)
