"""mia-gen as a real package: one namespace, layers that import one way, configs shipped as package data,
user presets through `hydra.searchpath`, pre-namespace checkpoints, and (slow) the built wheel installed
into a fresh venv next to a user's own `models/` and `attacks/` packages."""

from __future__ import annotations

import ast
import configparser
import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mia_gen.errors import MiaGenError
from mia_gen.experiments.common import CONFIG_DIR
from mia_gen.models.checkpoint import load_module, save_module
from mia_gen.models.dcgan import DCGANGenerator

REPO = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).parent / "mia-gen"

# Repository folder -> the package setuptools installs it as (setup.cfg `package_dir`), lowest layer first.
LAYERS = {"mia_gen": "mia_gen", "configs": "mia_gen.configs", "models": "mia_gen.models",
          "attacks": "mia_gen.attacks", "experiments": "mia_gen.experiments"}
# What each layer must never import (DESIGN.md "Layers"): experiments -> attacks -> models -> core.
FORBIDDEN = {
    "mia_gen": ("mia_gen.models", "mia_gen.attacks", "mia_gen.experiments"),
    "configs": ("mia_gen.models", "mia_gen.attacks", "mia_gen.experiments"),
    "models": ("mia_gen.attacks", "mia_gen.experiments"),
    "attacks": ("mia_gen.experiments",),
    "experiments": (),
}
# The one exception: the package's lazy facade (`mia_gen.score`, `mia_gen.Attack`, ... resolved in its
# `__getattr__` on first use) may name the public API's modules.
FACADE_FILE, FACADE_TARGETS = "mia_gen/__init__.py", ("mia_gen.experiments.api",)
OLD_TOP_LEVEL = ("models", "attacks", "experiments", "configs")  # pre-namespace names (mia-gen <= 0.1)
PYTHON_FOLDERS = ("mia_gen", "models", "attacks", "experiments", "configs", "tests", "benchmarks")
# This file writes pre-namespace checkpoint targets ("models.dcgan...") on purpose.
LEGACY_STRINGS_ALLOWED = {"tests/test_packaging.py"}

USER_PACKAGE = (
    "from pathlib import Path\n"
    "Path(__file__).with_suffix('.imported').touch()\n"
    "raise RuntimeError('user package imported')\n"
)


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _python_files(folders=PYTHON_FOLDERS) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    """`models/dcgan.py` -> `mia_gen.models.dcgan`; `attacks/__init__.py` -> `mia_gen.attacks`."""
    rel = path.relative_to(REPO)
    parts = [LAYERS[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def _imports(path: Path):
    """Every module `path` imports or names, anywhere in it (also inside functions), as (line, module,
    is_absolute, enclosing function names, under `if TYPE_CHECKING`, kind). kind "import": an import
    statement, resolved against the package the file installs as (`from a import b` yields `a` and `a.b`:
    b may be a submodule), or `importlib.import_module` / `__import__` of a literal; kind "name": a string
    that is a dotted `mia_gen.` path (a table of modules imported later by name, a `_target_`)."""
    package = None
    if path.relative_to(REPO).parts[0] in LAYERS:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, functions, type_checking):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions = (*functions, node.name)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, functions, True)
            for child in node.orelse:
                visit(child, functions, type_checking)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, True, functions, type_checking, "import") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package is not None, f"{path}:{node.lineno}: a relative import outside the package"
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.append((node.lineno, base, not node.level, functions, type_checking, "import"))
            found.extend((node.lineno, f"{base}.{a.name}", not node.level, functions, type_checking, "import")
                         for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"):
            found.append((node.lineno, node.args[0].value, True, functions, type_checking, "import"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("mia_gen.") \
                and node.value.replace(".", "_").isidentifier():
            found.append((node.lineno, node.value, True, functions, type_checking, "name"))
        for child in ast.iter_child_nodes(node):
            visit(child, functions, type_checking)

    visit(ast.parse(path.read_text(), filename=str(path)), (), False)
    return found


def _facade_exception(rel: str, module: str, functions, type_checking, kind) -> bool:
    """In the facade file only, an API module (or its parent package: `from mia_gen.experiments import api`)
    named in a string (its lookup table) or imported inside `__getattr__` (or for type checkers only)."""
    api = _within(module, FACADE_TARGETS) or any(_within(target, (module,)) for target in FACADE_TARGETS)
    lazy = kind == "name" or functions[:1] == ("__getattr__",) or (type_checking and not functions)
    return rel == FACADE_FILE and api and lazy


def test_no_layer_imports_a_higher_one_static():
    """Every import in mia_gen/, configs/, models/, attacks/ — lazy ones inside functions too."""
    violations = []
    for path in _python_files(("mia_gen", "configs", "models", "attacks")):
        rel = path.relative_to(REPO).as_posix()
        forbidden = FORBIDDEN[rel.split("/")[0]]
        for line, module, _, functions, type_checking, kind in _imports(path):
            if _within(module, forbidden) and not _facade_exception(rel, module, functions, type_checking, kind):
                violations.append(f"{rel}:{line} {'imports' if kind == 'import' else 'names'} {module}")
    assert not violations, "a lower layer imports a higher one:\n" + "\n".join(violations)


def test_facade_exception_is_only_the_lazy_api_lookup():
    """The allowance above admits the API modules from `mia_gen/__init__.py`'s lazy lookup only."""
    api = "mia_gen.experiments.api"
    assert _facade_exception(FACADE_FILE, api, ("__getattr__",), False, "import")
    assert _facade_exception(FACADE_FILE, api, (), False, "name")  # `_LAZY = {"score": "mia_gen.experiments.api"}`
    assert _facade_exception(FACADE_FILE, "mia_gen.experiments", ("__getattr__",), False, "import")  # from ... import api
    assert not _facade_exception(FACADE_FILE, api, (), False, "import")  # an eager import
    assert not _facade_exception(FACADE_FILE, api, ("helper",), False, "import")
    assert not _facade_exception(FACADE_FILE, "mia_gen.experiments.pipeline", ("__getattr__",), False, "import")
    assert not _facade_exception(FACADE_FILE, "mia_gen.experiments.pipeline", (), False, "name")
    assert not _facade_exception("mia_gen/metrics.py", api, ("__getattr__",), False, "import")
    assert not _facade_exception("mia_gen/metrics.py", api, (), False, "name")


def test_nothing_imports_the_old_top_level_names():
    """`import models`, `from attacks.base import ...`, `experiments.x`: in a user's project those are their code.
    String literals naming them (mock.patch targets, `_target_`s, logger names) count too."""
    violations = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        for line, module, absolute, _, _, _ in _imports(path):
            if absolute and module.split(".")[0] in OLD_TOP_LEVEL:
                violations.append(f"{rel}:{line} imports {module}")
        if rel in LEGACY_STRINGS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                head, dot, tail = node.value.partition(".")
                if head in OLD_TOP_LEVEL and dot and tail.replace(".", "_").isidentifier():
                    violations.append(f"{rel}:{node.lineno} names {node.value!r}")
    assert not violations, "old top-level names (use mia_gen.models / mia_gen.attacks / ...):\n" + "\n".join(violations)


def test_config_targets_name_classes_inside_the_namespace():
    """Every `_target_` in configs/ names an importable object under `mia_gen`."""
    def targets(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_":
                    yield value
                yield from targets(value)
        elif isinstance(node, list):
            for value in node:
                yield from targets(value)

    found = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        for target in targets(yaml.safe_load(path.read_text())):
            found[target] = path.relative_to(REPO).as_posix()
    assert found, "no _target_ in configs/"
    for target, source in found.items():
        assert target.startswith("mia_gen."), f"{source}: _target_ {target} is outside the mia_gen namespace"
        module, _, attribute = target.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), f"{source}: {target} does not exist"


# A fresh interpreter that pre-imports only third-party libraries, then forks one child per module: each child
# starts with no mia_gen module loaded, imports its module and reports which forbidden modules came with it.
LAYER_PROBE = r"""
import importlib, json, os, sys
for library in ("numpy", "torch", "torchvision", "scipy", "sklearn", "omegaconf", "hydra", "safetensors", "PIL"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("mia_gen", "models", "attacks", "experiments")]
results = {}
for module, forbidden in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            loaded = sorted(m for m in sys.modules
                            if any(m == p or m.startswith(p + ".") for p in forbidden)
                            or m.split(".")[0] in ("models", "attacks", "experiments", "configs"))
            report = {"loaded": loaded}
        except BaseException as error:
            report = {"error": f"{type(error).__name__}: {error}"}
        with os.fdopen(write, "w") as handle:
            handle.write(json.dumps(report))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        text = handle.read()
    os.waitpid(pid, 0)
    results[module] = json.loads(text) if text else {"error": "the child died"}
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe forks one child per module")
def test_each_module_imports_without_its_higher_layers(tmp_path):
    """Import each module of mia_gen, models and attacks in a process of its own (sys.modules holds no
    mia_gen module before): nothing of a higher layer, and no old top-level package, is loaded with it."""
    plan = [(_module_name(p), FORBIDDEN[p.relative_to(REPO).parts[0]])
            for p in _python_files(("mia_gen", "configs", "models", "attacks"))]
    assert len(plan) > 40 and ("mia_gen", FORBIDDEN["mia_gen"]) in plan
    # cwd outside the checkout: the repository's own models/ must not be importable as `models`
    done = _run([sys.executable, "-c", LAYER_PROBE, json.dumps(plan)], tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(m for m, _ in plan)
    problems = {m: r for m, r in results.items() if r != {"loaded": []}}
    assert not problems, json.dumps(problems, indent=1)


def _config_files() -> list[str]:
    """The files of configs/ a release ships: tracked or new, not ignored (every file when git is missing)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "configs"],
                                cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = [p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()]
    return sorted(p for p in listed if (REPO / p).is_file() and "__pycache__" not in p)


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def _cfg_lines(parser, section, key) -> list[str]:
    return [line.strip() for line in parser.get(section, key).splitlines() if line.strip()]


def test_every_config_is_declared_package_data():
    parser = _setup_cfg()
    package_dir = dict(line.replace(" ", "").split("=") for line in _cfg_lines(parser, "options", "package_dir"))
    assert package_dir["mia_gen.configs"] == "configs"
    assert "mia_gen.configs" in _cfg_lines(parser, "options", "packages")
    assert (REPO / "configs" / "__init__.py").is_file()
    patterns = parser.get("options.package_data", "mia_gen.configs").replace(",", " ").split()
    # setuptools expands package_data globs relative to the package's folder, `**` recursively
    declared = {f"configs/{m}" for pattern in patterns
                for m in glob.glob(pattern, root_dir=REPO / "configs", recursive=True)}
    shipped = _config_files()
    assert "configs/config.yaml" in shipped and sum(p.endswith(".yaml") for p in shipped) > 40
    missing = [p for p in shipped if p != "configs/__init__.py" and p not in declared]
    assert not missing, f"configs/ files a wheel would leave out (add them to package_data): {missing}"


PRESET = """\
# @package _global_
defaults:
  - override /model: memorizer
seed: 7
split:
  n_members: 33
"""


@pytest.fixture()
def user_configs(tmp_path):
    """A user's own config directory with one experiment preset, outside the package."""
    (tmp_path / "myconfigs" / "experiment").mkdir(parents=True)
    (tmp_path / "myconfigs" / "experiment" / "my_preset.yaml").write_text(PRESET)
    return f"hydra.searchpath=[file://{tmp_path / 'myconfigs'}]"


def _as_dict(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def test_a_user_preset_on_the_searchpath_composes_like_its_overrides(user_configs):
    """A preset in the user's directory changes exactly what it lists, as the same command-line overrides do."""
    preset = _as_dict([user_configs, "experiment=my_preset"])
    assert _as_dict(["model=memorizer", "seed=7", "split.n_members=33"]) == preset
    assert preset["split"]["seed"] == 7 and preset["split"]["n_members"] == 33 and preset["model"]["name"] == "memorizer"
    assert _as_dict([]) != preset  # the preset did change something
    # the shipped presets stay reachable beside the user's
    assert _as_dict([user_configs, "experiment=memorizer_sanity"])["sampling"]["n_samples"] == 5000


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "MIA_GEN_CACHE")}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def _run(args, cwd, timeout=600, **env):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env=_clean_env(**env), timeout=timeout)


def test_the_console_script_finds_a_user_preset_and_refuses_a_missing_one(tmp_path, user_configs):
    shown = _run([CONSOLE, user_configs, "experiment=my_preset", "--cfg", "job"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    job = yaml.safe_load(shown.stdout)
    assert job["seed"] == 7 and job["split"]["n_members"] == 33 and job["model"]["name"] == "memorizer"
    assert not list(tmp_path.glob("outputs")), "--cfg job must not start a run"

    missing = _run([CONSOLE, user_configs, "experiment=no_such_preset", "--cfg", "job"], tmp_path)
    assert missing.returncode == 2, missing.stderr
    assert "experiment/no_such_preset" in missing.stderr and "my_preset" in missing.stderr  # the options listed


def _write_user_packages(root: Path) -> list[Path]:
    """A user's project with its own top-level `models` and `attacks` packages; importing any of them leaves
    a `.imported` file beside it and raises."""
    for rel in ("models/__init__.py", "models/dcgan.py", "models/evil.py", "attacks/__init__.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(USER_PACKAGE)
    return [root / "models", root / "attacks"]


@pytest.fixture()
def user_project_on_path(tmp_path, monkeypatch):
    project = tmp_path / "project"
    folders = _write_user_packages(project)
    monkeypatch.syspath_prepend(str(project))
    yield folders
    assert not [m for m in sys.modules if m.split(".")[0] in ("models", "attacks")]
    assert not list(project.rglob("*.imported")), "a user package was imported"


def _checkpoint(directory: Path, target: str) -> DCGANGenerator:
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, base_channels=4)
    save_module(generator, directory, "generator")
    config = json.loads((directory / "generator.json").read_text())
    (directory / "generator.json").write_text(json.dumps({**config, "_target_": target}))
    return generator.eval()


def test_a_checkpoint_written_before_the_namespace_loads_as_mia_gen_models(tmp_path, user_project_on_path):
    """`_target_: models.dcgan.DCGANGenerator` (mia-gen <= 0.1) rebuilds mia_gen's class, even with a user's
    own top-level `models` package importable."""
    saved = _checkpoint(tmp_path / "ckpt", "models.dcgan.DCGANGenerator")
    loaded = load_module(tmp_path / "ckpt", "generator")
    assert type(loaded) is DCGANGenerator and type(loaded).__module__ == "mia_gen.models.dcgan"
    assert loaded.config == saved.config
    before, after = saved.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(saved(z), loaded(z))


@pytest.mark.parametrize("target", ["os.system", "models.evil.X", "attacks.X"])
def test_a_checkpoint_naming_code_outside_mia_gen_models_is_refused(tmp_path, user_project_on_path, target):
    """`models.evil.X` maps to `mia_gen.models.evil.X`, which does not exist: refused, and the user's
    `models` package is never imported to look."""
    _checkpoint(tmp_path / "ckpt", target)
    with pytest.raises(MiaGenError, match="mia_gen.models"):
        load_module(tmp_path / "ckpt", "generator")


# The pipeline shrunk as in tests/test_pipeline.py (TINY_DCGAN): a DCGAN trained 20 steps, 1500 samples.
TINY_RUN = [
    "logger=none", "progress=false", "device=cpu", "threads=1", "utility.metric=none",
    "split.n_members=100", "split.n_non_members=100", "split.n_reference=400", "evaluation.n_bootstrap=200",
    "model=dcgan", "model.training.steps=20", "model.generator.base_channels=8",
    "model.discriminator.base_channels=8", "model.training.checkpoint_every=10",
    "model.training.sample_every=1000", "sampling.n_samples=1500", "sampling.shard_size=1000",
]


@pytest.mark.slow
def test_the_wheel_installs_one_namespace_and_runs_beside_a_users_own_packages(tmp_path):
    started = time.monotonic()
    version = _setup_cfg().get("metadata", "version")

    # 1. Build the wheel from a copy of the checkout (a build writes build/ and *.egg-info where it runs).
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        "outputs", "multirun", "wandb", ".cache", ".mia_cache", "_work", "results"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", tmp_path / "dist", source], tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("mia_gen-*.whl")
    assert wheel.name.startswith(f"mia_gen-{version}-")

    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"mia_gen-{version}.dist-info"
    assert {n.split("/")[0] for n in names} == {"mia_gen", dist_info}, "only mia_gen at the top level"
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split() == ["mia_gen"]
    expected = {"mia_gen/py.typed", "mia_gen/configs/__init__.py", "mia_gen/configs/config.yaml"}
    expected |= {f"mia_gen/{p}" for p in _config_files()}
    for folder in ("mia_gen", "models", "attacks", "experiments"):
        expected |= {f"{LAYERS[folder].replace('.', '/')}/{p.relative_to(REPO / folder).as_posix()}"
                     for p in _python_files((folder,))}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "mia-gen = mia_gen.experiments.run:main" in entry_points

    # 2. A fresh venv outside the checkout. Its dependencies come from this interpreter's site-packages through
    # a plain path line: .pth files in that folder are not processed, so the checkout's editable finder stays off.
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", venv], tmp_path)
    assert made.returncode == 0, made.stderr
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    assert site.is_relative_to(venv)
    paths = sysconfig.get_paths()
    (site / "deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys([paths["purelib"], paths["platlib"]])))
    installed = _run([bin_dir / "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # 3. Outside any checkout: the installed package, no old top-level names.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    probe = _run([python, "-c", (
        "import json, mia_gen, mia_gen.attacks, mia_gen.models, mia_gen.experiments.pipeline\n"
        "missing = {}\n"
        "for name in ('models', 'attacks', 'experiments', 'configs'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        missing[name] = error.name\n"
        "print(json.dumps({'file': mia_gen.__file__, 'models': mia_gen.models.__file__, 'missing': missing,\n"
        "                  'version': mia_gen.__version__}))"
    )], empty)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["file"]).is_relative_to(site) and Path(found["models"]).is_relative_to(site)
    assert found["missing"] == {n: n for n in ("models", "attacks", "experiments", "configs")}
    assert found["version"] == version

    shown = _run([bin_dir / "mia-gen", "--version"], empty)
    assert shown.returncode == 0 and shown.stdout.strip() == f"mia-gen {version}", shown.stdout + shown.stderr

    # 4. The installed console script runs the pipeline from a user's project that has its own `models`
    # and `attacks` packages on the path; it finds its shipped configs and never imports the user's code.
    project = tmp_path / "project"
    _write_user_packages(project)
    trap = _run([python, "-c", "import models"], project, PYTHONPATH=str(project))
    assert "user package imported" in trap.stderr  # the user's packages shadow any top-level `models`
    for marker in project.rglob("*.imported"):
        marker.unlink()
    run = _run([bin_dir / "mia-gen", *TINY_RUN, f"cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / 'run'}"], project, PYTHONPATH=str(project))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(e["attack"] for e in results["attacks"]) == ["domias", "monte_carlo", "sample_distance"]
    assert not list(project.rglob("*.imported")), "the installed mia-gen imported the user's own packages"
    assert time.monotonic() - started < 600
