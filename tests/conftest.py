"""Shared fixtures: a small synthetic dataset, its preprocess cache, and a run trained on it.
They are built once per test session in a temporary folder; the scripts are run the way the
Makefile runs them (their main functions with parsed arguments)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

import evaluate  # noqa: E402
import fetch_data  # noqa: E402
import preprocess  # noqa: E402
import threshold  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    fetch_data.main(fetch_data.parse_args(["--synthetic", "240", "--out", str(out), "--seed", "1"]))
    return out


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "synthetic_64"
    preprocess.main(preprocess.parse_args(["--data", str(synthetic_data), "--img-size", "64",
                                           "--out", str(out), "--workers", "2"]))
    return out


@pytest.fixture(scope="session")
def trained_run(synthetic_cache, tmp_path_factory):
    """EfficientNet-Lite0 from its packaged ImageNet weights, a few epochs at 64 px with flips (so
    that test-time flips and rotations see a model used to them), thresholds chosen on validation.
    In fp32: what the tests assert of it must not hang on whether this CPU has native bf16."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train.main(train.parse_args(["--cache", str(synthetic_cache), "--run-dir", str(run), "--arch", "efficientnet_lite0",
                                 "--epochs", "4", "--batch-size", "32", "--aug", "basic",
                                 "--seed", "0", "--precision", "fp32"]))
    threshold.main(threshold.parse_args(["--run", str(run)]))
    return run


@pytest.fixture(scope="session")
def evaluated_run(trained_run):
    evaluate.main(evaluate.parse_args(["--run", str(trained_run), "--bootstrap", "200"]))
    return trained_run
