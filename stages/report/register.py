"""The report's answer handed to deployment: the deployable artifact (stats.deployable) as a version
of a registered model in MLflow's Model Registry, its files uploaded with the report run, the
evidence as the version's tags, and the alias `candidate` moved to it only where every gate passed.
A deploy job reads models:/<report.registered_model>@candidate. The same file registered again (a
second report of the same settings) adds no version."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import read_json, sha256_dir, stage_dir, variant
from pipeline.contract import declared
from pipeline.formats import MANIFEST, gguf_files, quantized_checkpoints
from stages.report.collect import column
from stages.report.text import fmt, interval

CANDIDATE = "candidate"


def registering(cfg: DictConfig) -> bool:
    """report.register, where null means: on where tracking.uri is a server (a team's store)."""
    r = cfg.report.register
    return bool(r) if r is not None else str(cfg.tracking.uri).startswith(("http://", "https://"))


def artifact(cfg: DictConfig, precision: str, name: str) -> tuple[Path, str]:
    """The deployable's file or checkpoint folder, and its content hash (the export's own, for GGUF)."""
    run = variant(cfg, {"train.precision": precision})
    export = stage_dir(run, "export")
    files = {column(n): path for n, path in gguf_files(export)}
    if name in files:
        source, kind = files[name].parent.name, files[name].stem.removeprefix("model-")
        return files[name], read_json(export / MANIFEST)[source][kind]["sha256"]
    folder = quantized_checkpoints(stage_dir(run, "quantize"))[name]
    return folder, sha256_dir(folder)


def evidence(data: dict, precision: str, name: str) -> dict[str, str]:
    """The quality and speed figures behind the choice, each with its interval, as tag values."""
    cell = data["rows"][precision]["artifacts"][name]
    tags = {key: f"{fmt(cell[key])}{interval(cell.get(f'{key}_ci'))}" for key in
            ("kl", "top1", "size_mb", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99") if cell.get(key) is not None}
    own = data["comparisons"]["own"][precision].get(name)
    if own:
        tags["perplexity_ratio_to_trained"] = f"{fmt(own['ratio'])}{interval(own['ratio_ci'])}"
    against = data["comparisons"]["vs_fp32"].get(precision, {}).get(name)
    if against:
        tags["perplexity_ratio_to_fp32"] = f"{fmt(against['ratio'])}{interval(against['ratio_ci'])} ({against['verdict']})"
    if cell.get("served_by"):
        tags["served_by"] = cell["served_by"]
    return tags


def run_link(tracker, run_id: str | None) -> dict[str, str]:
    if run_id is None:
        return {}
    uri = tracker.uri.rstrip("/")
    url = f"{uri}/#/experiments/{tracker.experiment_id}/runs/{run_id}" if uri.startswith("http") else f"runs:/{run_id}"
    return {"id": run_id, "url": url}


def training_run(cfg: DictConfig, tracker, precision: str) -> str | None:
    """The MLflow run that trained the deployable's model (not one that reused its output), where this
    experiment has it."""
    out = stage_dir(variant(cfg, {"train.precision": precision}), "train")
    found = tracker.client.search_runs([tracker.experiment_id], f"tags.output = '{out}' and tags.reused = 'false' "
                                       "and attributes.run_name = 'train'", max_results=1)
    return found[0].info.run_id if found else None


def register(cfg: DictConfig, tracker, data: dict) -> str:
    """Registers the deployable where it is not registered yet, and moves `candidate` to it where the
    gates passed; returns what happened, in words."""
    name, deploy = cfg.report.registered_model, data["deploy"]
    if "reason" in deploy:
        return f"Model Registry: nothing registered: {deploy['reason']}."
    client, precision, fmt_name = tracker.client, deploy["precision"], deploy["format"]
    path, digest = artifact(cfg, precision, fmt_name)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"Deployable models of {cfg.model.name} fine-tuned on "
                                       f"{cfg.data.name}, registered by the precision-pipeline report.")
    found = client.search_model_versions(f"name = '{name}' and tags.sha256 = '{digest}'")
    if found:
        version, how = found[0].version, "already registered as"
    else:
        if path.is_file():
            tracker.log_artifact(path, "deploy")
        else:
            tracker.log_artifacts(path, f"deploy/{path.name}")
        source = f"{client.get_run(tracker.run_id).info.artifact_uri}/deploy"
        links = {f"{role}_run_{k}": v for role, run_id in (("training", training_run(cfg, tracker, precision)),
                                                            ("report", tracker.run_id))
                 for k, v in run_link(tracker, run_id).items()}
        tags = {"precision": precision, "format": fmt_name, "decision": deploy["decision"], "sha256": digest,
                "file": path.name, "kl_budget": str(deploy["kl_budget"]),
                "data_hash": read_json(stage_dir(cfg, "prepare") / declared("prepare").names["manifest"])["data_hash"],
                **evidence(data, precision, fmt_name), **links,
                **({"weights_origin": origin} if (origin := data["rows"][precision]["train"].get("weights_origin")) else {})}
        version, how = client.create_model_version(name, source, run_id=tracker.run_id, tags=tags).version, "registered as"
    tracker.set_tags({"registry.model": name, "registry.version": str(version)})
    failed = [g for g in data["gates"] if g["status"] == "FAIL"]
    if failed:
        return (f"Model Registry: {precision}-trained {fmt_name} {how} {name} version {version}; the alias "
                f"{CANDIDATE} stays where it was: {len(failed)} gate(s) failed.")
    client.set_registered_model_alias(name, CANDIDATE, version)
    return (f"Model Registry: {precision}-trained {fmt_name} {how} {name} version {version}, alias {CANDIDATE} "
            f"(models:/{name}@{CANDIDATE}).")
