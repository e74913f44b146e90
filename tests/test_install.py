"""The install a device has: a wheel built here from a copy of the tree, installed without extras into a
fresh virtual environment (its base dependencies from the package index pip is configured with).

In that venv every command that needs an extra says which one in one line (exit 2), and the commands
of the base install run on bundles the main environment exported. The wheel carries every subpackage
of the source tree and the kiosk's static files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from paligemma_edge.cli import build_parser
from paligemma_edge.extras import COMMAND_NEEDS, EXTRA_MODULES

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = (2, 28)
PIP_OFFLINE = ("No matching distribution found", "Could not find a version that satisfies")


def _pyproject(root: Path) -> dict:
    """pyproject.toml, read with tomllib (Python 3.11+; on 3.10 the test that needs it is skipped)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((root / "pyproject.toml").read_text())


def _setuptools_config(root: Path) -> dict:
    return _pyproject(root)["tool"]["setuptools"]


def source_packages(root: Path) -> dict[str, Path]:
    """Every package of the source tree, by dotted name: each folder holding an __init__.py under a
    root that pyproject's package-dir maps into the namespace."""
    packages = {}
    for name, folder in _setuptools_config(root)["package-dir"].items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            packages[".".join((name, *init.parent.relative_to(base).parts))] = init.parent
    return packages


def unpackaged_modules(root: Path) -> list[Path]:
    """Python files under the mapped roots in a folder without __init__.py: a wheel leaves them out."""
    packages = set(source_packages(root).values())
    roots = {root / folder for folder in _setuptools_config(root)["package-dir"].values()}
    return sorted(p for base in roots for p in base.rglob("*.py")
                  if p.parent not in packages and "__pycache__" not in p.parts)


def missing_from_wheel(root: Path, wheel: Path) -> list[str]:
    """Files of the source tree's packages (every .py, and the package-data globs) the wheel lacks."""
    names = set(zipfile.ZipFile(wheel).namelist())
    data = _setuptools_config(root).get("package-data", {})
    expected = []
    for package, folder in source_packages(root).items():
        prefix = package.replace(".", "/")
        expected += [f"{prefix}/{p.name}" for p in folder.glob("*.py")]
        expected += [f"{prefix}/{p.relative_to(folder).as_posix()}"
                     for pattern in data.get(package, []) for p in folder.glob(pattern) if p.is_file()]
    return sorted(set(expected) - names)


def copy_tree(target: Path) -> Path:
    """The files a wheel is built from, without build outputs (a stale build/lib would hide a gap)."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for folder in set(_setuptools_config(ROOT)["package-dir"].values()):
        if "/" not in folder:
            shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def build_wheel(tree: Path, out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(tree)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("paligemma_edge-*.whl")
    return wheel


def clean_env() -> dict[str, str]:
    """This environment without what would let another Python's packages into the venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return build_wheel(copy_tree(work / "paligemma-edge"), work / "dist")


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its base dependencies only."""
    root = tmp_path_factory.mktemp("venv") / "base"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
                             "--no-input", "-q", str(wheel)], capture_output=True, text=True, timeout=600,
                            env=clean_env())
    if result.returncode != 0 and any(text in result.stderr for text in PIP_OFFLINE):
        pytest.skip("the base dependencies (numpy, pillow, tokenizers, onnxruntime) cannot be installed here: "
                    + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    print(f"base install into a fresh venv: {time.monotonic() - started:.1f} s")
    return root


def in_venv(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """paligemma-edge as the wheel installed it (its console script), run away from the source tree."""
    return subprocess.run([str(venv / "bin" / "paligemma-edge"), *args], capture_output=True, text=True,
                          cwd=cwd, env=clean_env(), timeout=300)


def assert_extra_line(result, extra: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paligemma-edge: error: "), result.stderr
    assert f"pip install 'paligemma-edge[{extra}]'" in lines[0], lines[0]


def test_pyproject_lists_every_package_of_the_source_tree():
    listed = set(_setuptools_config(ROOT)["packages"])
    assert listed == set(source_packages(ROOT)), "pyproject's [tool.setuptools] packages and the tree differ"
    assert unpackaged_modules(ROOT) == []


def test_wheel_holds_every_subpackage_and_the_kiosk_files(wheel):
    assert missing_from_wheel(ROOT, wheel) == []
    names = zipfile.ZipFile(wheel).namelist()
    static = sorted(p.name for p in (ROOT / "apps" / "static").iterdir() if p.is_file())
    assert static and all(f"paligemma_edge/apps/static/{name}" in names for name in static)
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_a_new_subpackage_left_out_of_pyproject_is_caught(tmp_path):
    tree = copy_tree(tmp_path / "tree")
    (tree / "runtime" / "newpart").mkdir()
    (tree / "runtime" / "newpart" / "__init__.py").write_text("")
    (tree / "runtime" / "newpart" / "module.py").write_text("VALUE = 1\n")
    (tree / "shapes" / "loose").mkdir()
    (tree / "shapes" / "loose" / "helper.py").write_text("VALUE = 2\n")
    assert "paligemma_edge.runtime.newpart" not in set(_setuptools_config(tree)["packages"])
    assert "paligemma_edge.runtime.newpart" in source_packages(tree)
    assert unpackaged_modules(tree) == [tree / "shapes" / "loose" / "helper.py"]
    wheel = build_wheel(tree, tmp_path / "dist")
    assert missing_from_wheel(tree, wheel) == ["paligemma_edge/runtime/newpart/__init__.py",
                                               "paligemma_edge/runtime/newpart/module.py"]


def _modules_of(distribution: str, provided: dict[str, set[str]]) -> set[str]:
    """Top-level modules a distribution installs; for a metapackage (cuda-python), those of what it requires."""
    name = re.sub(r"[-_.]+", "-", distribution).lower()
    own = provided.get(name, set())
    if own:
        return own
    requires = importlib.metadata.requires(distribution) or []
    return set().union(*(provided.get(re.sub(r"[-_.]+", "-", _distribution_name(r)).lower(), set())
                         for r in requires if "extra ==" not in r))


def _distribution_name(requirement: str) -> str:
    """The distribution a requirement line names ('numpy>=1.24' -> 'numpy')."""
    found = re.match(r"[A-Za-z0-9._-]+", requirement)
    if found is None:
        raise AssertionError(f"no distribution name in the requirement {requirement!r}")
    return found[0]


def test_the_extras_table_matches_pyproject():
    """Every extra a command can need is in pyproject, and the modules the CLI checks for it are the ones
    its packages install (read from this environment, where make install put every extra)."""
    extras = _pyproject(ROOT)["project"]["optional-dependencies"]
    developer_extras = {"test", "lint"}  # no command needs them
    assert set(extras) - developer_extras == set(EXTRA_MODULES)
    provided: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            provided.setdefault(re.sub(r"[-_.]+", "-", distribution).lower(), set()).add(module)
    checked = 0
    for extra, requirements in extras.items():
        if extra in developer_extras:
            continue
        modules = set()
        for requirement in requirements:
            distribution = _distribution_name(requirement)
            try:
                importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here: nothing to compare
            own = _modules_of(distribution, provided) & set(EXTRA_MODULES[extra])
            assert own, f"no module of {distribution} (extra '{extra}') is in EXTRA_MODULES"
            modules |= own
            checked += 1
        assert modules == set(EXTRA_MODULES[extra]) or not modules, (extra, modules)
    assert checked >= 8


def test_every_command_is_either_base_or_declares_its_extra():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    assert commands.choices is not None, "the subcommands action lists its choices"
    base = {"run", "verify", "inspect", "pack", "compare", "eval", "build-engines", "dataset", "triton-repo"}
    assert set(commands.choices) == base | set(COMMAND_NEEDS), set(commands.choices) ^ (base | set(COMMAND_NEEDS))


@pytest.fixture(scope="module")
def work(tmp_path_factory, images) -> Path:
    directory = tmp_path_factory.mktemp("device")
    shutil.copy2(images[0], directory / "picture.png")
    return directory


def test_the_venv_has_no_extra(venv, work):
    modules = sorted({m for ms in EXTRA_MODULES.values() for m in ms})
    probe = ("import importlib.util, json, paligemma_edge; print(json.dumps([paligemma_edge.__file__, "
             f"[m for m in {modules!r} if importlib.util.find_spec(m)]]))")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                            cwd=work, env=clean_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    location, found = json.loads(result.stdout)
    assert Path(location).is_relative_to(venv) and found == []


# every command that needs an extra, as a user on the base install types it
EXTRA_CASES = {
    "export": (["export", "{checkpoint}", "-o", "out"], "export"),
    "quantize": (["quantize", "{bundle}", "--precision", "int4", "-o", "out"], "export"),
    "bench": (["bench", "--model", "tiny", "--workdir", "bench"], "export"),
    "serve": (["serve", "{bundle}"], "apps"),
    "camera": (["camera", "{bundle}", "--source", "0", "--task", "caption"], "apps"),
    "finetune": (["finetune", "{checkpoint}", "--dataset", "data", "-o", "out"], "finetune"),
    "eval --dataset PATH": (["eval", "{bundle}", "--dataset", "data"], "eval"),
    "build-engines --backend tensorrt-rtx": (["build-engines", "{bundle}", "--backend", "tensorrt-rtx"], "tensorrt-rtx"),
}


def test_the_cases_cover_every_command_that_needs_an_extra():
    assert set(COMMAND_NEEDS) <= {case.split()[0] for case in EXTRA_CASES}


@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_a_command_without_its_extra_says_which_to_install(case, venv, work, bundles, checkpoints):
    args, extra = EXTRA_CASES[case]
    args = [a.format(bundle=bundles[MODEL], checkpoint=checkpoints[MODEL]) for a in args]
    assert_extra_line(in_venv(venv, *args, cwd=work), extra)
    assert not (work / "out").exists() and not (work / "bench").exists()


def test_the_base_install_runs_verifies_and_inspects_a_bundle(venv, work, bundles):
    bundle = str(bundles[MODEL])
    args = ["run", bundle, "--image", str(work / "picture.png"), "--prompt", "caption en", "--prompt", "detect cat",
            "--json", "--max-new-tokens", "6"]
    ran = in_venv(venv, *args, cwd=work)
    assert ran.returncode == 0, ran.stderr
    here = run_cli(*args, check=True)  # the source tree's runtime, in this environment
    assert [json.loads(line)["token_ids"] for line in ran.stdout.splitlines()] == [
        json.loads(line)["token_ids"] for line in here.stdout.splitlines()]
    verified = in_venv(venv, "verify", bundle, cwd=work)
    assert verified.returncode == 0 and "result: OK" in verified.stdout, verified.stderr
    inspected = in_venv(venv, "inspect", bundle, "--json", cwd=work)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout) == json.loads(run_cli("inspect", bundle, "--json", check=True).stdout)


def test_the_base_install_packs_compares_evaluates_and_benchmarks_bundles(venv, work, bundles, segment_bundle):
    bundle = str(bundles[MODEL])
    packed = in_venv(venv, "pack", bundle, "-o", "bundle.tar", cwd=work)
    assert packed.returncode == 0 and (work / "bundle.tar").stat().st_size > 0, packed.stderr
    (work / "pictures").mkdir()
    shutil.copy2(work / "picture.png", work / "pictures" / "picture.png")
    compared = in_venv(venv, "compare", bundle, bundle, "--images", "pictures", "--max-new-tokens", "2", cwd=work)
    assert compared.returncode == 0 and "| precision | fp32 | fp32 |" in compared.stdout, compared.stderr
    evaluated = in_venv(venv, "eval", str(segment_bundle), "--n", "2", cwd=work)
    assert evaluated.returncode == 0 and "segmentation_miou" in evaluated.stdout, evaluated.stderr
    bench = in_venv(venv, "bench", "--bundles", bundle, "--runs", "1", "--new-tokens", "2", "--workdir", "bw",
                    "--out-dir", "results", cwd=work)
    assert bench.returncode == 0 and "| onnxruntime | fp32 |" in bench.stdout, bench.stderr
    assert list((work / "results").glob("*.json"))  # no chart: matplotlib is the 'bench' extra


def test_the_kiosk_files_are_installed(venv, work):
    probe = ("import json; from importlib import resources; print(json.dumps(sorted(p.name for p in "
             "(resources.files('paligemma_edge.apps') / 'static').iterdir())))")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                            cwd=work, env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == sorted(p.name for p in (ROOT / "apps" / "static").iterdir() if p.is_file())
