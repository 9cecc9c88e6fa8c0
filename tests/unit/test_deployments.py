"""prefect.yaml ships in the package; serve refuses keys it cannot honour; the settings reach
job_variables.env; discovery finds exactly the new or changed raw shards."""
from __future__ import annotations

import copy

import pytest

from flows.deployments import PREFECT_YAML, UnsupportedKey, check_servable, deploy_env, load_project, serve_env
from infra.settings import Settings


def test_prefect_yaml_is_package_data_with_module_entrypoints():
    assert PREFECT_YAML.parent.name == "flows" and PREFECT_YAML.is_file()
    project = load_project()
    assert project["pull"] == []  # nothing of a checkout is needed
    for spec in project["deployments"]:
        assert ".py" not in spec["entrypoint"] and spec["entrypoint"].startswith("flows."), spec["name"]
        assert "cron" not in str(spec.get("schedules")), spec["name"]  # no clock chain
    check_servable(project)


@pytest.mark.parametrize("edit, named", [
    (lambda p: p["deployments"][0].update(job_variables={"image": "x"}), "'job_variables'"),
    (lambda p: p["deployments"][0]["work_pool"]["job_variables"].update(image="x"), "job_variables.image"),
    (lambda p: p.update(pull=[{"prefect.deployments.steps.git_clone": {"repository": "r"}}]), "'pull' steps"),
    (lambda p: p["deployments"][1].update(build=[{"x": 1}]), "'build'"),
])
def test_serve_refuses_keys_it_cannot_honour(edit, named):
    project = copy.deepcopy(load_project())
    edit(project)
    with pytest.raises(UnsupportedKey, match=named.replace("(", r"\(").replace(".", r"\.")):
        check_servable(project)


def test_job_variables_env_carries_the_resolved_settings():
    cfg = Settings.load(store="s3://bucket/prefix", s3_endpoint="http://127.0.0.1:9", runner="dask", heavy_limit=3)
    env = serve_env(load_project(), deploy_env(cfg, "pool-a", environ={"AWS_SECRET_ACCESS_KEY": "s3cr3t"}))
    assert env["CODESHARD_STORE"] == "s3://bucket/prefix" and env["CODESHARD_RUNNER"] == "dask"
    assert env["CODESHARD_S3_ENDPOINT"] == "http://127.0.0.1:9" and env["CODESHARD_HEAVY_LIMIT"] == "3"
    assert env["CODESHARD_DASK_ADDRESS"] == ""  # unset: Settings reads '' as its default
    assert "s3cr3t" not in str(env)  # credentials never go into deployments
    assert Settings.load().__class__  # '' values load
