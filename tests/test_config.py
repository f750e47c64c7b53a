"""Every config composes; bad names fail at once with the valid choices; --help stays light."""

import itertools
import os
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.artifacts import stage_dir
from pipeline.graph import STAGES, selected_stages
from tests.conftest import CONF, GROUPS, ROOT, compose_with, pipeline, refused

REQUIRED = {"model/hf": ["model.name_or_path=/ckpt"], "data/text": ["data.files=[a.txt]"], "data/hf": ["data.path=/ds"]}


@pytest.mark.parametrize("choice", [f"{g}/{o}" for g, opts in GROUPS.items() for o in opts])
def test_every_config_composes(choice):
    group, option = choice.split("/")
    cfg = compose_with(f"{group}={option}", *REQUIRED.get(choice, []))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert set(cfg) >= {"model", "data", "train", "tracking", "paths", "stage", "seed"}
    if group == "profile":  # a set of overrides across groups, not a group of its own
        assert cfg != compose_with(*REQUIRED.get(choice, []))
    else:
        assert cfg[group] is not None


def test_config_groups_cover_the_pipeline():
    assert {"model", "data", "train", "tracking"} <= set(GROUPS)
    assert {"tiny", "hf"} <= set(GROUPS["model"]) and {"pydoc", "text", "hf"} <= set(GROUPS["data"])


@pytest.mark.parametrize("overrides, data, lr, steps, precision", [
    # The default: the real model on chat data, its recipe, every precision compared.
    ([], "stdlib", 1e-4, 16, "compare"),
    (["model=smollm2"], "stdlib", 1e-4, 16, "compare"),
    (["model=hf", "model.name_or_path=/ckpt"], "stdlib", 1e-4, 16, "compare"),
    # The toy picks its own data and recipe, one precision; so does the smoke profile.
    (["model=base"], "pydoc", 1e-3, 300, "auto"),
    (["model=tiny"], "pydoc", 1e-3, 300, "auto"),
    (["profile=smoke"], "pydoc", 5e-3, 30, "auto"),
    (["profile=smoke", "model=hf", "model.name_or_path=/ckpt"], "pydoc", 5e-3, 30, "auto"),
    # The command line wins over the model's and the profile's picks.
    (["model=base", "train=default"], "pydoc", 1e-4, 16, "compare"),
    (["model=base", "data=stdlib"], "stdlib", 1e-3, 300, "auto"),
    (["model=smollm2", "train=base"], "stdlib", 1e-3, 300, "auto"),
    (["model=base", "train.lr=3e-4"], "pydoc", 3e-4, 300, "auto"),
    (["profile=smoke", "model=smollm2", "data=stdlib", "train.precision=compare"], "stdlib", 5e-3, 30, "compare"),
])
def test_each_model_fine_tunes_on_its_data_and_recipe_unless_told_otherwise(overrides, data, lr, steps, precision):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert (cfg.data.name, cfg.train.lr, cfg.train.max_steps, cfg.train.precision) == (data, lr, steps, precision)


def test_stage_selection():
    assert selected_stages("all") == list(STAGES)
    assert selected_stages(["train", "prepare"]) == ["prepare", "train"]  # always chain order
    with pytest.raises(ValueError, match=r"'trian'.*Valid: all, " + ", ".join(STAGES)):
        selected_stages("trian")


def test_unknown_stage_fails_before_any_work(tmp_path):
    message = refused(tmp_path, "stage=trian")
    assert "Unknown stage 'trian'" in message and "prepare, train" in message


def test_unknown_precision_names_the_choices(tmp_path):
    assert "train.precision='fp12' is not one of fp32, bf16, fp16, fp8, auto" in refused(tmp_path, "train.precision=fp12")


@pytest.mark.slow
def test_unknown_model_lists_the_available_ones(tmp_path):
    result = pipeline(tmp_path, "model=gpt9", check=False)
    assert result.returncode != 0
    assert "model/gpt9" in result.stderr and "hf" in result.stderr and "tiny" in result.stderr


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    message = refused(tmp_path, "model=hf", f"model.name_or_path={tmp_path}/nope")
    assert f"{tmp_path}/nope" in message and "does not exist" in message


def test_help_imports_no_heavy_library():
    code = (
        "import sys; sys.argv = ['pipeline', '--help']\n"
        "import pipeline.__main__ as m\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(k for k in ('torch', 'transformers', 'mlflow', 'accelerate') if k in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "stage" in result.stdout  # the help text itself
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("args, quoted", [
    # the shell splits an unquoted path at its spaces: Hydra gets three arguments
    (["model.name_or_path=/tmp/my", "model", "(v2)/ckpt"], """'model.name_or_path="/tmp/my model (v2)/ckpt"'"""),
    (["model.name_or_path=/tmp/ckpt(v2)"], """'model.name_or_path="/tmp/ckpt(v2)"'"""),
])
def test_unquoted_path_is_one_line_with_the_quoted_override(tmp_path, args, quoted):
    """Hydra's grammar error, several lines and a traceback hint, before any work: one line that
    shows the user's own override quoted, to paste."""
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage=check", "model=hf", *args], cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {' '.join(args)} is not valid Hydra override syntax (") and line.endswith(quoted)
    assert not list(tmp_path.iterdir())
    # what the line suggests is what Hydra takes: the whole path as one value
    assert compose_with("model=hf", *shlex.split(quoted)).model.name_or_path == " ".join(args).split("=", 1)[1]


def test_stage_dirs_differ_whenever_an_input_differs():
    base = compose_with()
    base.train.precision = "fp32"
    variants = [("train.precision", "bf16"), ("train.lr", 1.0), ("seed", 1), ("data.split_seed", 3),
                ("model.arch.hidden_size", 512)]
    seen = {stage_dir(base, "train")}
    for key, value in variants:
        cfg = base.copy()
        OmegaConf.update(cfg, key, value)
        seen.add(stage_dir(cfg, "train"))
    assert len(seen) == len(variants) + 1
    # settings that only change how the run is driven keep the directory, so resume finds it
    cfg = base.copy()
    OmegaConf.update(cfg, "train.resume", True)
    OmegaConf.update(cfg, "train.log_every", 1)
    assert stage_dir(cfg, "train") == stage_dir(base, "train")
    # prepare does not depend on training settings
    assert stage_dir(base, "prepare") == stage_dir(cfg, "prepare")
    assert list(itertools.islice(seen, 1))[0].parent.name == "train"


def test_slurm_launcher_config_composes():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.precision_pipeline_slurm.OneLineSlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    # Hydra instantiates launchers it found in the hydra_plugins namespace only: ours is found.
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    found = {f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(Launcher)}
    assert launcher._target_ in found


@pytest.mark.slow
def test_sweep_through_submitit_runs_each_job(tmp_path):
    """The same launcher plugin, on its local executor: a real sweep through submitit."""
    result = pipeline(tmp_path, "hydra/launcher=submitit_local", "stage=prepare", "data.split_seed=0,1",
                      "hydra.launcher.timeout_min=10", multirun=True)
    assert result.returncode == 0
    assert len(list((tmp_path / "artifacts" / "prepare").iterdir())) == 2
