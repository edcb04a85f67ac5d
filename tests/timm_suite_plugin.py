"""pytest plugin that runs timm's own ``tests/test_models.py`` on lknets' models only.

Loaded with ``-p timm_suite_plugin`` by tests/test_timm_suite.py, in a pytest process of its own
whose only test file is the ``test_models.py`` of the installed timm's sdist. Importing this
module registers lknets' models with timm before that file is collected, so its
``list_models()`` parametrizations include them. Collection then keeps the tests whose
``model_name`` is one of ``LKNETS_TIMM_MODELS`` (comma-separated timm names; a pretrained tag
such as ``.in1k`` is ignored when matching) and deselects every other test: those belong to
timm's own models. The tests that lknets' models cannot pass are skipped with the reason below.
Each kept test's outcome is written as JSON to ``LKNETS_TIMM_REPORT``:
``{model: {test: "passed" | "skipped: why" | "failed: message"}}``, a tagged name's tests
under its model (a failure wins over a pass of another tag).
"""
import fnmatch
import json
import os
from typing import Dict, List, Optional, Tuple

import pytest

import models  # noqa: F401  (registers lknets' models with timm)

# (test function, model-name pattern) -> why lknets does not pass it.
EXCLUDED: Dict[Tuple[str, str], str] = {
    ("test_model_forward_torchscript", "*"):
        "TorchScript is unsupported (tests/test_timm_api.py says why); torch.export is the "
        "supported path, as timm leaves out models it cannot script",
    ("test_model_forward_fx_torchscript", "*"):
        "TorchScript is unsupported (tests/test_timm_api.py says why); fx tracing itself is "
        "tested by test_model_forward_fx / test_model_backward_fx",
    ("test_model_load_pretrained", "*"):
        "downloads the released weights: lknets never downloads (pretrained=True raises an "
        "error naming the upstream file and how to load it), and tests run offline",
    ("test_model_features_pretrained", "*"):
        "downloads the released weights, as test_model_load_pretrained",
    ("test_model_backward", "convnext_*_[12]d*"):
        "oriented 1D kernels keep upstream's theta as an nn.Parameter (checkpoints, parameter "
        "counts and the optimizer's groups match upstream) with requires_grad=False: it is "
        "never trained, so it has no gradient, and timm requires one on every parameter",
    ("test_model_backward_fx", "convnext_*_[12]d*"):
        "as test_model_backward: the oriented convs' theta is a frozen parameter, no gradient",
}
TIMM_MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features",
                "fxforward", "fxbackward", "timeout(seconds)")


def selected_models() -> List[str]:
    names = [n for n in os.environ.get("LKNETS_TIMM_MODELS", "").split(",") if n]
    if not names:
        raise pytest.UsageError("LKNETS_TIMM_MODELS names no model")
    return names


def exclusion(test_name: str, model_name: str) -> Optional[str]:
    for (test, pattern), reason in EXCLUDED.items():
        if test == test_name and fnmatch.fnmatch(model_name, pattern):
            return reason
    return None


def pytest_configure(config: pytest.Config) -> None:
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm's test_models.py marker")


# nodeid -> (model, test) of the kept tests, and what happened to them.
_KEPT: Dict[str, Tuple[str, str]] = {}
_OUTCOMES: Dict[str, Dict[str, str]] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    wanted = set(selected_models())
    kept, deselected = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        model_name = callspec.params.get("model_name") if callspec else None
        if not isinstance(model_name, str) or model_name.split(".")[0] not in wanted:
            deselected.append(item)
            continue
        model = model_name.split(".")[0]
        _KEPT[item.nodeid] = (model, item.originalname)
        reason = exclusion(item.originalname, model)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"lknets: {reason}"))
        kept.append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _KEPT:
        return
    model, test = _KEPT[report.nodeid]
    if report.failed:
        outcome = f"failed: {report.longreprtext.strip().splitlines()[-1:]}"
    elif report.skipped:
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
        outcome = f"skipped: {why.removeprefix('Skipped: ')}"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    tests = _OUTCOMES.setdefault(model, {})
    if not tests.get(test, "").startswith("failed"):
        tests[test] = outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("LKNETS_TIMM_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_OUTCOMES, f, indent=1, sort_keys=True)
