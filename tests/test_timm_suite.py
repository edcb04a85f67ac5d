"""timm's own model tests, unchanged, on lknets' models.

``tests/test_models.py`` is taken from the sdist of the installed timm version (downloaded from
the package index with pip, cached under ``~/.cache/lknets``; never copied into this project) and
run in a pytest process of its own with tests/timm_suite_plugin.py, which keeps only lknets'
models and skips, with the reason it states, the tests they cannot pass (TorchScript; downloads
of released weights; the gradient check of every parameter for the oriented-1D models' frozen
theta). The quick run
takes the smallest model of each family, the slow one all of them.
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest
import timm

import models

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SMALLEST = ["RepLKNet-31B", "SLaK_tiny", "unireplknet_a", "convnext_atto", "convnext_tiny_1d"]
# What each model must pass; a model without oriented convs must also pass the backward tests.
REQUIRED = {"test_model_forward", "test_model_default_cfgs", "test_model_forward_features",
            "test_model_forward_fx"}
BACKWARD = {"test_model_backward", "test_model_backward_fx"}


def timm_sdist() -> Path:
    """The sdist of the installed timm, downloaded once into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lknets"
    sdist = cache / f"timm-{timm.__version__}.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--quiet", f"timm=={timm.__version__}", "-d", str(cache)],
            capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            pytest.fail(f"cannot download the timm {timm.__version__} sdist from the package "
                        f"index:\n{done.stderr[-2000:]}")
    return sdist


@pytest.fixture(scope="module")
def timm_test_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    member = f"timm-{timm.__version__}/tests/test_models.py"
    target = tmp_path_factory.mktemp("timm_tests") / "test_models.py"
    with tarfile.open(timm_sdist()) as sdist:
        target.write_bytes(sdist.extractfile(member).read())
    (target.parent / "pytest.ini").write_text("[pytest]\n")
    return target


def run_timm_suite(test_file: Path, timm_names: List[str],
                   timeout_s: int) -> Dict[str, Dict[str, str]]:
    """Runs ``test_file`` on ``timm_names``; {model: {test: 'passed' | 'skipped: why' |
    'failed: message'}} (the plugin's report)."""
    report = test_file.parent / "report.json"
    env = dict(os.environ, LKNETS_TIMM_MODELS=",".join(timm_names),
               LKNETS_TIMM_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    env.pop("GITHUB_ACTIONS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-c", str(test_file.parent / "pytest.ini"),
         "-p", "timm_suite_plugin", "-p", "no:cacheprovider", "-q", "-rfEs"],
        cwd=test_file.parent, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return json.loads(report.read_text())


def check(results: Dict[str, Dict[str, str]], names: List[str]) -> None:
    for name in names:
        timm_name = models.timm_name(name)
        got = results.get(timm_name, {})
        oriented = "_1d" in name or "_2d" in name
        required = REQUIRED | (set() if oriented else BACKWARD)
        missing = sorted(t for t in required if got.get(t) != "passed")
        assert not missing, f"{timm_name}: {[(t, got.get(t, 'not run')) for t in missing]}"
        for test, outcome in got.items():
            assert outcome == "passed" or outcome.startswith("skipped: lknets:"), \
                f"{timm_name} {test}: {outcome}"


@pytest.mark.slow
def test_timm_suite_passes_on_the_smallest_model_of_each_family(timm_test_models):
    results = run_timm_suite(timm_test_models, [models.timm_name(n) for n in SMALLEST], 1800)
    assert sorted(results) == sorted(models.timm_name(n) for n in SMALLEST)
    check(results, SMALLEST)


@pytest.mark.slow
@pytest.mark.timm_all
def test_timm_suite_passes_on_every_model(timm_test_models):
    names = models.list_models()
    results = run_timm_suite(timm_test_models, [models.timm_name(n) for n in names], 6 * 3600)
    check(results, names)
