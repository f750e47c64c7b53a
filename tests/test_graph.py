"""The stage contract and the one stage graph: the registry, the declarations, the imports between
modules, the DVC pipeline generated from them, and the checks made before any work."""

import ast
import difflib
import inspect
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pipeline.artifacts import ROOT, code_files, stage_dir, stage_inputs
from pipeline.contract import Stage, StageModule
from pipeline.graph import STAGES, downstream, dvc_yaml, upstream
from pipeline.preflight import forced, preflight
from tests.conftest import compose_with

PROTOCOL = [name for name, member in vars(StageModule).items() if inspect.isfunction(member) and not name.startswith("_")]


def test_the_registry_lists_every_stage_module_in_chain_order():
    assert PROTOCOL == ["check", "run", "record"]
    modules = sorted([p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"] +
                     [p.parent.name for p in (ROOT / "stages").glob("*/__init__.py")])
    assert sorted(STAGES) == modules
    for position, (name, module) in enumerate(STAGES.items()):
        assert isinstance(module.STAGE, Stage) and module.STAGE.name == name == module.__name__.split(".")[-1]
        assert set(module.STAGE.reads) | set(module.STAGE.references) <= set(list(STAGES)[:position])


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_keeps_the_contract(name):
    module, cfg = STAGES[name], compose_with()
    for function in PROTOCOL:
        parameters = list(inspect.signature(getattr(module, function)).parameters)
        assert parameters == list(inspect.signature(getattr(StageModule, function)).parameters)[1:], (name, function)
    for key in module.STAGE.settings:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", (name, key)
    for key in module.STAGE.ignores:
        assert key.rpartition(".")[0] in module.STAGE.settings and OmegaConf.select(cfg, key, default="missing") != "missing"
    assert module.STAGE.scope in ("data", "run", "sweep")


def imports(path):
    """Project modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pipeline", "stages"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if (ROOT / (n.replace(".", "/") + ".py")).exists()} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "stages")}
    return found


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_stage_imports_another_and_no_module_cycle():
    """A stage is a module or a package of modules (stages/report/), which import one another."""
    files = [p for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
             if module_name(p) not in ("pipeline", "stages")]
    graph = {module_name(p): imports(p) for p in files}
    for module, targets in graph.items():
        if module.startswith("stages."):
            own = ".".join(module.split(".")[:2])
            assert not {t for t in targets if t.startswith("stages") and not t.startswith(own)}, module

    def visit(module, path):
        assert module not in path, " -> ".join([*path, module])
        for target in graph.get(module, ()):
            visit(target, [*path, module])

    for module in graph:
        visit(module, [])


def test_committed_dvc_yaml_is_the_generated_one():
    committed, generated = (ROOT / "dvc.yaml").read_text(), dvc_yaml(compose_with())
    difference = "".join(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True), "dvc.yaml", "generated"))
    assert not difference, "dvc.yaml differs from the stage declarations; run `make dvc`:\n" + difference


def test_dvc_stages_track_what_the_addresses_track():
    """Every setting a stage's address depends on is a DVC param or dependency of that stage, and
    every code file of the address is one of its deps."""
    import yaml

    cfg, stages = compose_with(), yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        entry = stages[name]
        assert {str(p.relative_to(ROOT)) for p in code_files(name)} <= set(entry["deps"]), name
        own = stage_inputs(cfg, name)
        tracked = set(entry["params"]) | {"train.precision"}  # the matrix sets the precision
        for key in STAGES[name].STAGE.settings:
            assert key in tracked or all(f"{key}.{leaf}" in tracked for leaf in own[key] if f"{key}.{leaf}"
                                         not in STAGES[name].STAGE.ignores and f"{key}.{leaf}" != "train.precision"), (name, key)


def test_addresses_follow_settings_code_and_upstream():
    base = compose_with("train.precision=fp32")
    changed = OmegaConf.merge(base, {"quantize": {"group_size": 64}})
    moved = [s for s in STAGES if stage_dir(base, s) != stage_dir(changed, s)]
    assert moved == ["quantize", "export", "evaluate", "serve", "report"]
    assert {k for k in stage_inputs(base, "serve") if k.startswith("code:")} == {f"code:{s}" for s in upstream("serve") + ["serve"]}
    assert downstream(["export"]) == ["export", "evaluate", "serve", "report"]


def test_rerun_forces_a_stage_and_what_reads_it():
    everything = list(STAGES)
    assert forced([], everything) == set()
    assert forced(["serve"], everything) == {"serve", "report"}
    assert forced("all", ["train", "quantize"]) == {"train", "quantize"}
    assert forced(["quantize"], ["prepare", "train", "quantize", "export"]) == {"quantize", "export"}
    with pytest.raises(ValueError, match=r"unknown stage 'serv'.*Valid: all, prepare"):
        forced(["serv"], everything)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "train.max_steps=0 must be at least 1"),
    ("quantize.methods=[awq,hqq]", "quantize.methods=['awq', 'hqq'] must be a non-empty list of awq, rtn, gptq, fp8_dynamic"),
    ("quantize.awq.n_grid=2", "quantize.awq.n_grid=2 must be at least 3"),
    ("serve.load.profile=burst", "serve.load.profile='burst' is not one of concurrent, constant"),
    ("train.precision=fp12", "train.precision='fp12' is not one of fp32, bf16, fp16, fp8, auto"),
    ("stage=trian", "Unknown stage 'trian'"),
    ("rerun=[trian]", "unknown stage 'trian'"),
    ("report.noise_seed=0", "report.noise_seed=0 equals seed=0"),
    ("evaluate.confidence=1.5", "evaluate.confidence=1.5 must be at most 0.999"),
    ("train.warmup_steps=500", "train.warmup_steps=500 must be below train.max_steps=300"),
    ("train.warmup_ratio=0.8", "train.warmup_ratio=0.8 must be at most 0.5"),
    ("verbose=maybe", "verbose='maybe' is not one of true, false"),
])
def test_bad_settings_are_refused_before_any_work(override, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        preflight(compose_with(override, f"paths.artifacts={tmp_path}/artifacts"))
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_unwritable_artifacts_path_is_refused_with_the_path_and_reason(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=rf"paths.artifacts='{tmp_path}/file/artifacts' is not a writable "
                                                 rf"directory \({tmp_path}/file is not a directory\)"):
        preflight(compose_with(f"paths.artifacts={tmp_path}/file/artifacts", "stage=prepare"))


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ("train.max_step=3", "Key 'max_step' not in 'Train'"),
    ("serve.port=http", "could not be converted to Integer"),
])
def test_the_typed_config_refuses_wrong_types_and_unknown_keys_as_it_composes(override, message):
    with pytest.raises(Exception) as error:
        compose_with(override)
    text = f"{error.value} {error.value.__cause__}"
    assert message in text and override.split("=")[0].rpartition(".")[2] in text


def test_an_address_needs_no_particular_import_order():
    """Whichever stage module a process imports first, every address it asks for resolves."""
    code = ("from hydra import compose, initialize_config_dir\n"
            "from pipeline.config import register\n"
            "from pipeline.artifacts import stage_dir\n"
            "register()\n"
            f"with initialize_config_dir({str(ROOT / 'conf')!r}, version_base='1.3'):\n"
            "    print(stage_dir(compose('config'), 'report').name)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("smollm2-135m-instruct-sweep-seed0-")
