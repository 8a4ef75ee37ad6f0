"""Adding a network is one registration (networks.ARCHITECTURES): a small torchvision network added
that way trains, is checkpointed and loaded, classifies photos through predict.py, folds for
inference and is explained by Grad-CAM, with no other code changed."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import trained_with_thresholds

import common
import networks
import predict


def mobilenet_v3_small(pretrained, weights_file):
    """torchvision's MobileNetV3-Small without its ImageNet download (the test runs offline)."""
    import torchvision
    network = torchvision.models.mobilenet_v3_small(weights=None)
    return network, {"mean": list(networks.IMAGENET_MEAN), "std": list(networks.IMAGENET_STD)}


def test_a_torchvision_network_added_through_the_registry_trains_loads_predicts_and_explains(
        synthetic_cache, synthetic_data, tmp_path, monkeypatch):
    # its last linear layer is the fourth of its classifier block: the features before it (1,024) feed the head
    monkeypatch.setitem(networks.ARCHITECTURES, "mobilenet_v3_small",
                        networks.Architecture(mobilenet_v3_small, "classifier.3"))
    run = trained_with_thresholds(synthetic_cache, tmp_path / "run", "--arch", "mobilenet_v3_small", "--epochs", "1",
                                  "--metadata", "--input-size", "64")
    model, checkpoint = common.load_checkpoint(run / "model.pt")
    assert checkpoint["arch"] == "mobilenet_v3_small" and checkpoint["input_size"] == 64
    assert model.head.in_features == 1024 + networks.METADATA_WIDTH

    photos = sorted((synthetic_data / "images").iterdir())[:6]
    predict.main(predict.parse_args(["--run", str(run), *map(str, photos), "--out", str(tmp_path / "p.csv")]))
    rows = pd.read_csv(tmp_path / "p.csv")
    assert len(rows) == 6 and rows["malignancy_prob"].between(0, 1).all()

    index, arrays = common.load_cache(synthetic_cache)
    images = common.model_inputs(arrays, index["row"][:8], "full", 64)
    cpu = torch.device("cpu")
    trained, _ = common.predict_probs(model, images, checkpoint["normalisation"], cpu)
    folded, _ = common.predict_probs(networks.for_inference(copy.deepcopy(model)), images,
                                     checkpoint["normalisation"], cpu)
    np.testing.assert_allclose(folded, trained, atol=1e-5)  # inference's form is the same function

    layer = networks.gradcam_layer(model, "mobilenet_v3_small")
    assert layer is networks.last_convolution(model.backbone) and isinstance(layer, torch.nn.Conv2d)
    cams = common.gradcam_maps(model, images, checkpoint["normalisation"], cpu, "binary", arch="mobilenet_v3_small")
    assert cams.shape[0] == 8 and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1

    monkeypatch.delitem(networks.ARCHITECTURES, "mobilenet_v3_small")  # a checkpoint of an unknown network
    with pytest.raises(common.ToolkitError, match="model.pt: arch 'mobilenet_v3_small' is not one of resnet18, "):
        common.load_checkpoint(run / "model.pt")
