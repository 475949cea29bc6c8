"""Static checks of what `make images` builds and of the chart's CRD copies (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
IMAGES = REPO_ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
RUNTIME_IMAGES = ["runtime-cpu", "runtime-cuda", "runtime-rocm", "runtime-ascend"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_every_image_has_a_dockerfile() -> None:
    assert sorted(p.parent.name for p in DOCKERFILES) == sorted([*RUNTIME_IMAGES, "operator"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copied_paths_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    """The build context is the repository root, filtered by the Dockerfile's own .dockerignore."""
    ignore = [line for line in (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    included = [pattern[1:].rstrip("/") for pattern in ignore if pattern.startswith("!")]
    copies = [args for keyword, args in instructions(dockerfile) if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
            top = source.rstrip("/").split("/")[0]
            assert any(fnmatch.fnmatch(top, pattern) for pattern in included), f"{source} is .dockerignored"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_non_root_with_a_health_check(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(keyword == "HEALTHCHECK" for keyword, _ in steps)
    assert any(keyword == "EXPOSE" for keyword, _ in steps)


@pytest.mark.parametrize("name", RUNTIME_IMAGES)
def test_runtime_images_fit_the_pods_the_operator_renders(name: str) -> None:
    from bowline_operator import render

    steps = instructions(IMAGES / name / "Dockerfile")
    assert ("EXPOSE", "8000") in steps
    assert [args for keyword, args in steps if keyword == "USER"][-1] == f"{render.NON_ROOT_UID}:{render.NON_ROOT_UID}"
    # Dependencies are installed from pyproject.toml before the source is copied: code edits keep that layer.
    copies = [args for keyword, args in steps if keyword == "COPY"]
    assert copies.index("runtime/pyproject.toml /src/runtime/pyproject.toml") < copies.index("runtime/ /src/runtime/")


def test_runtime_cpu_bakes_the_tiny_model_that_the_cpu_example_serves() -> None:
    runs = " ".join(args for keyword, args in instructions(IMAGES / "runtime-cpu" / "Dockerfile") if keyword == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    assert "make-tiny-model /models/tiny" in runs
    example = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())
    assert example["spec"]["model"]["source"] == "/models/tiny"


def test_runtime_rocm_installs_torch_from_the_pytorch_rocm_index() -> None:
    steps = instructions(IMAGES / "runtime-rocm" / "Dockerfile")
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG")
    assert re.fullmatch(r"rocm6\.\d+", args["ROCM_INDEX"])
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert '--index-url "https://download.pytorch.org/whl/${ROCM_INDEX}" "torch==${TORCH_VERSION}"' in runs
    # ROCm torch names AMD GPUs "cuda": the image default must match the device the gpu/amd profile passes.
    from bowline_operator.accelerators import profile_for

    assert "BOWLINE_DEVICE=cuda" in " ".join(a for k, a in steps if k == "ENV")
    assert profile_for("gpu", "amd").device == "cuda"


def test_make_images_tags_what_the_operator_and_chart_pull() -> None:
    from bowline_operator.accelerators import profile_for

    proc = subprocess.run(["make", "-n", "images"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    [template] = set(re.findall(r"-t (\S+)", proc.stdout.replace("$image", "{image}")))
    [default_list] = re.findall(r"for image in ([^;]+);", proc.stdout)
    assert sorted(default_list.split()) == sorted(p.parent.name for p in DOCKERFILES), "IMAGES must list every image"
    built = {template.format(image=name) for name in default_list.split()}
    for accelerator, vendor in [("cpu", None), ("gpu", "nvidia"), ("gpu", "amd"), ("npu", "ascend")]:
        assert profile_for(accelerator, vendor).image in built, (accelerator, vendor)
    values = yaml.safe_load((REPO_ROOT / "charts" / "bowline" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO_ROOT / "charts" / "bowline" / "Chart.yaml").read_text())
    assert f"{values['image']['repository']}:{chart['appVersion']}" in built


def test_chart_crds_are_the_top_level_crds() -> None:
    """charts/bowline/crds is a copy of crds/ (hack/sync-chart-crds.sh); a stale copy would install an old API."""
    source = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (REPO_ROOT / "charts" / "bowline" / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert copy == source, "run hack/sync-chart-crds.sh"
