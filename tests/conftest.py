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


def synthetic_dataset(out, n):
    fetch_data.main(fetch_data.parse_args(["--synthetic", str(n), "--out", str(out), "--seed", "1"]))
    return out


def preprocessed(data, out, img_size, workers):
    preprocess.main(preprocess.parse_args(["--data", str(data), "--cache-size", str(img_size), "--out", str(out),
                                           "--workers", str(workers)]))
    return out


def trained_with_thresholds(cache, run, *flags):
    """EfficientNet-Lite0 from its packaged ImageNet weights, batch 32, seed 0, in fp32 (what the
    tests assert of it must not hang on whether this CPU has native bf16), and `flags`; thresholds
    chosen on validation."""
    train.main(train.parse_args(["--cache", str(cache), "--run-dir", str(run), "--arch", "efficientnet_lite0",
                                 "--batch-size", "32", "--seed", "0", "--precision", "fp32", *flags]))
    threshold.main(threshold.parse_args(["--run", str(run)]))
    return run


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", 240)


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_data, tmp_path_factory):
    return preprocessed(synthetic_data, tmp_path_factory.mktemp("cache") / "synthetic_64", 64, workers=2)


@pytest.fixture(scope="session")
def trained_run(synthetic_cache, tmp_path_factory):
    """A few epochs at 64 px with flips, so that test-time flips and rotations see a model used to them."""
    return trained_with_thresholds(synthetic_cache, tmp_path_factory.mktemp("runs") / "tiny", "--epochs", "4",
                                   "--aug", "basic")


@pytest.fixture(scope="session")
def evaluated_run(trained_run):
    evaluate.main(evaluate.parse_args(["--run", str(trained_run), "--bootstrap", "200"]))
    return trained_run
