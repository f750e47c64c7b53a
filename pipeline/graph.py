"""The stage graph: the registry of stage modules, in chain order, and the DVC pipeline that
follows from their declarations.

`python -m pipeline.graph > dvc.yaml` (`make dvc`) writes dvc.yaml; a test fails while the
committed file differs from what the declarations give.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, ListConfig

from pipeline.artifacts import ROOT, code_files
from pipeline.contract import StageModule
from pipeline.formats import QAT
from stages import evaluate, export, prepare, quantize, report, serve, train

# Chain order: every stage reads only what the ones before it wrote. A test keeps this in step
# with the modules in stages/.
STAGES: dict[str, StageModule] = {m.STAGE.name: m for m in (prepare, train, quantize, export, evaluate, serve, report)}
# The report's noise floor is the evaluation of an fp32 run at report.noise_seed: that run's chain.
NOISE_FLOOR = "evaluate"
COMMAND = "python -m pipeline --config-dir . --config-name params paths.fixed=dvc"
DVC_HEADER = """\
# Generated from the stage declarations in stages/*.py by `make dvc`; do not edit.
# The chain of `python -m pipeline stage=all` as DVC stages: one copy per training precision
# (matrix over report.precisions, which must include fp32: every precision is also measured
# against the fp32-trained model), plus the fp32 noise-floor chain (`*-noise`: the same settings
# at report.noise_seed, measured against the main seed's fp32 model) and the fp32 QAT chain (`*-qat`:
# train.qat=report.qat, which the report sets against PTQ at its format). Every command reads the
# composed params.yaml (`make params`) and writes to the fixed layout dvc/<stage>/<label>.
"""


def stage_names(value) -> list[str]:
    """The names in a `stage` or `rerun` setting: one name, or a list of them."""
    return list(value) if isinstance(value, (list, ListConfig)) else [str(value)]


def selected_stages(stage) -> list[str]:
    names = stage_names(stage)
    unknown = [n for n in names if n not in STAGES and n != "all"]
    if unknown or not names:
        raise ValueError(f"Unknown stage {', '.join(map(repr, unknown)) or '(none)'}. "
                         f"Valid: all, {', '.join(STAGES)} (or a list of them, e.g. stage=[prepare,train]).")
    if "all" in names:
        return list(STAGES)
    return [s for s in STAGES if s in names]


def upstream(name: str) -> list[str]:
    """Every stage whose output `name` reads, directly or not, in chain order."""
    found, todo = set(), list(STAGES[name].STAGE.reads)
    while todo:
        stage = todo.pop()
        if stage not in found:
            found.add(stage)
            todo += STAGES[stage].STAGE.reads
    return [s for s in STAGES if s in found]


def downstream(names) -> list[str]:
    """The stages that read any of `names`, directly or not, and those stages, in chain order."""
    return [s for s in STAGES if s in names or any(n in upstream(s) for n in names)]


def params(cfg: DictConfig, name: str) -> list[str]:
    """DVC's view of a stage's settings: each declared key, a section spelt out leaf by leaf
    where some of its keys are ignored or set by the command itself (the precision)."""
    spec = STAGES[name].STAGE
    keys = []
    for key in spec.settings:
        ignored = {i.rpartition(".")[2] for i in (*spec.ignores, "train.precision") if i.rpartition(".")[0] == key}
        keys += [f"{key}.{leaf}" for leaf in cfg[key] if leaf not in ignored] if ignored else [key]
    return keys


def dvc_yaml(cfg: DictConfig) -> str:
    import yaml

    labels = {"run": "${model.name}-${item.precision}-seed${seed}",
              "noise": "${model.name}-fp32-seed${report.noise_seed}",
              "qat": "${model.name}-fp32-qat_${report.qat}-seed${seed}",
              "reference": "${model.name}-fp32-seed${seed}"}
    # The noise floor and the QAT arm are each one more fp32 chain up to the evaluation.
    noise_chain = [s for s in upstream(NOISE_FLOOR) + [NOISE_FLOOR] if STAGES[s].STAGE.scope == "run"]

    def out(stage: str, label: str) -> str:
        spec = STAGES[stage].STAGE
        if spec.scope == "data":
            return f"dvc/{stage}"
        suffix = "-vs-seed${seed}" if label == "noise" and "evaluate" in spec.settings else ""
        return f"dvc/{stage}/{labels[label]}{suffix}"

    def entry(name: str, label: str) -> dict:
        spec = STAGES[name].STAGE
        code = sorted(str(p.relative_to(ROOT)) for p in code_files(name))
        reads = [f"dvc/{r}" if spec.scope == "sweep" else out(r, label) for r in spec.reads]
        reads += [out(r, "reference") for r in spec.references]
        command = f"{COMMAND} stage={name}"
        if label == "run":
            command += " train.precision=${item.precision}"
        elif label == "noise":
            command += " train.precision=fp32 seed=${report.noise_seed} evaluate.reference_seed=${seed}"
        elif label == "qat":
            command += " train.precision=fp32 train.qat=${report.qat}"
        stage = {"cmd": command, "deps": code + list(dict.fromkeys(reads)), "params": params(cfg, name)}
        if label == "noise" and "seed" in stage["params"]:  # its seed comes from there
            stage["params"].append("report.noise_seed")
        if label == "qat" and "train" in {s.split(".")[0] for s in stage["params"]}:
            # and its QAT format, with the settings any such format rounds by
            rounds_by = {k for f in QAT.values() for k in f.settings if k.split(".")[0] not in stage["params"]}
            stage["params"] += ["report.qat", *sorted(rounds_by)]
        stage["outs"] = [f"dvc/{name}" if spec.scope != "run" else out(name, label)]
        if label == "run":
            stage = {"matrix": {"precision": "${report.precisions}"}, **stage}
        return stage

    stages = {}
    for name, module in STAGES.items():
        scope = module.STAGE.scope
        stages[name] = entry(name, "run" if scope == "run" else scope)
        if name in noise_chain:
            stages[f"{name}-noise"] = entry(name, "noise")
            stages[f"{name}-qat"] = entry(name, "qat")
    report_dir = "dvc/report/${model.name}-sweep-seed${seed}"
    document = {"stages": stages, "metrics": [f"{report_dir}/metrics.json"],
                "plots": [f"{report_dir}/{p}.png" for p in report.TITLES]}
    return DVC_HEADER + yaml.safe_dump(document, sort_keys=False, width=110)


def main() -> None:
    from hydra import compose, initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        sys.stdout.write(dvc_yaml(compose("config")))


if __name__ == "__main__":
    main()
