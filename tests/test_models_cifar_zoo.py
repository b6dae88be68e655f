"""ResNet, WRN, VGG and ResNet50: RepDistiller-identical state_dicts and the feature conventions.

The expected key/shape digests below were computed from RepDistiller's own ``models/`` definitions
(HobbitLong/RepDistiller: resnet.py, wrn.py, vgg.py, resnetv2.py) at ``num_classes=100``, over the text
``"\\n".join(f"{key} {tuple(shape)}" for key, shape in sorted(state_dict))`` (see :func:`_layout`).
"""

import hashlib

import pytest
import torch

from dfakd import models
from dfakd.errors import DfakdError
from dfakd.models import resnet, resnetv2, vgg, wrn

NUM_CLASSES = 100


def _layout(net: torch.nn.Module) -> str:
    return "\n".join(f"{key} {tuple(t.shape)}" for key, t in sorted(net.state_dict().items()))


# model -> (number of state_dict entries, sha256 of _layout), from RepDistiller's definitions
REPDISTILLER_LAYOUTS = {
    "resnet8x4": (62, "b2ead61a142ef3af656aca3d0ed663e02ee8b612edd3b057c33665a5918ddb16"),
    "resnet20": (128, "0386434ca6f34c26737182da2a47866def11dfa6adc91bb34df6f84903256efc"),
    "wrn_16_2": (83, "2266f04469bf5dd9bb048d688c75f56ae34cae6b62a82d4db6d400ab93c9e41f"),
    "wrn_40_1": (226, "01abc5646d8c075cefd627861ca06e4fc07f27a55c9ccf4832ef3375bef38efa"),
    "vgg8": (37, "7f85b8479109415fc27d1f5660fe49bc1f698ddc1384a4c6c0336e29acf75001"),
    "ResNet50": (320, "d5367c1bcc2c22ea7bb4420c218bf350e202dd2270aafb58ba57a69b9c3e411e"),
}

# parameter counts of RepDistiller's models at 100 classes
PARAM_COUNTS = {
    "resnet56": 861_620,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_40_2": 2_255_156,
    "wrn_28_4": 5_872_180,
    "vgg13": 9_462_180,
    "ResNet50": 23_705_252,
}

# (model, key) -> shape (None: the key must be absent)
SPOT_CHECKS = {
    ("resnet8x4", "conv1.weight"): (32, 3, 3, 3),
    ("resnet8x4", "layer1.0.downsample.0.weight"): (64, 32, 1, 1),
    ("resnet8x4", "layer1.0.downsample.1.running_var"): (64,),
    ("resnet8x4", "layer3.0.conv1.weight"): (256, 128, 3, 3),
    ("resnet8x4", "fc.weight"): (100, 256),
    ("resnet20", "layer1.0.downsample.0.weight"): None,
    ("resnet20", "layer2.0.downsample.0.weight"): (32, 16, 1, 1),
    ("resnet20", "layer3.2.bn2.weight"): (64,),
    ("wrn_16_2", "conv1.weight"): (16, 3, 3, 3),
    ("wrn_16_2", "block1.layer.0.convShortcut.weight"): (32, 16, 1, 1),
    ("wrn_16_2", "block1.layer.1.convShortcut.weight"): None,
    ("wrn_16_2", "block3.layer.1.bn1.running_mean"): (128,),
    ("wrn_16_2", "bn1.weight"): (128,),
    ("wrn_16_2", "fc.weight"): (100, 128),
    ("wrn_40_1", "block1.layer.0.convShortcut.weight"): None,  # 16 -> 16 channels: identity shortcut
    ("wrn_40_1", "block2.layer.0.convShortcut.weight"): (32, 16, 1, 1),
    ("vgg8", "block0.0.weight"): (64, 3, 3, 3),
    ("vgg8", "block0.0.bias"): (64,),  # VGG convs keep their bias
    ("vgg8", "block0.1.num_batches_tracked"): (),
    ("vgg8", "block4.1.weight"): (512,),
    ("vgg8", "classifier.weight"): (100, 512),
    ("vgg13", "block0.4.weight"): (64,),
    ("ResNet50", "layer1.0.shortcut.0.weight"): (256, 64, 1, 1),
    ("ResNet50", "layer1.1.shortcut.0.weight"): None,
    ("ResNet50", "layer4.2.bn3.weight"): (2048,),
    ("ResNet50", "linear.weight"): (100, 2048),
}

GROUP_NAMES = {
    "resnet20": [
        ["layer1.0", "layer1.1", "layer1.2"],
        ["layer2.0", "layer2.1", "layer2.2"],
        ["layer3.0", "layer3.1", "layer3.2"],
    ],
    "wrn_16_2": [
        ["block1.layer.0", "block1.layer.1"],
        ["block2.layer.0", "block2.layer.1"],
        ["block3.layer.0", "block3.layer.1"],
    ],
    "vgg8": [["block0.1"], ["block1.1"], ["block2.1"], ["block3.1", "block4.1"]],
    "vgg13": [["block0.1", "block0.4"], ["block1.1", "block1.4"], ["block2.1", "block2.4"],
              ["block3.1", "block3.4", "block4.1", "block4.4"]],
    "ResNet50": [
        [f"layer1.{j}" for j in range(3)],
        [f"layer2.{j}" for j in range(4)],
        [f"layer3.{j}" for j in range(6)],
        [f"layer4.{j}" for j in range(3)],
    ],
}  # fmt: skip


def _build(name: str) -> models.FeatureNet:
    torch.manual_seed(0)
    return models.build(name, NUM_CLASSES)


def test_registry_names():
    assert set(resnet.MODELS) == {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4",
    }  # fmt: skip
    wrn_names = {"wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_28_2", "wrn_28_4", "wrn_40_1", "wrn_40_2"}
    assert wrn_names <= set(wrn.MODELS)
    assert set(vgg.MODELS) == {"vgg8", "vgg11", "vgg13", "vgg16", "vgg19"}
    assert set(resnetv2.MODELS) == {"ResNet50"}
    assert all(models.is_available(name) for name in [*resnet.MODELS, *wrn.MODELS, *vgg.MODELS, "ResNet50"])


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count_matches_repdistiller(name):
    assert sum(p.numel() for p in _build(name).parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(REPDISTILLER_LAYOUTS))
def test_state_dict_layout_matches_repdistiller(name):
    layout = _layout(_build(name))
    count, digest = REPDISTILLER_LAYOUTS[name]
    assert layout.count("\n") + 1 == count
    assert hashlib.sha256(layout.encode()).hexdigest() == digest, f"{name} layout:\n{layout}"


@pytest.mark.parametrize(("name", "key"), sorted(SPOT_CHECKS))
def test_state_dict_spot_checks(name, key):
    state = _build(name).state_dict()
    expected = SPOT_CHECKS[(name, key)]
    if expected is None:
        assert key not in state
    else:
        assert tuple(state[key].shape) == expected


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "ResNet50"])
def test_checkpoint_in_repdistiller_format_loads_strictly(name, tmp_path):
    source = _build(name)
    with torch.no_grad():  # non-default BN statistics, so that a silently skipped buffer would show
        for key, t in source.state_dict().items():
            if key.endswith("running_mean"):
                t.normal_(0.0, 0.1)
            elif key.endswith("running_var"):
                t.uniform_(0.5, 2.0)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 240, "model": source.state_dict(), "accuracy": 0.0}, path)

    torch.manual_seed(1)
    target = models.build(name, NUM_CLASSES)
    result = target.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


@pytest.mark.parametrize("name", sorted(GROUP_NAMES))
def test_group_names(name):
    assert _build(name).group_names == GROUP_NAMES[name]


def test_group_shapes_at_32px():
    shapes = {
        "resnet20": [(16, 32), (32, 16), (64, 8)],
        "resnet8x4": [(64, 32), (128, 16), (256, 8)],
        "wrn_16_2": [(32, 32), (64, 16), (128, 8)],
        "vgg8": [(64, 32), (128, 16), (256, 8), (512, 4)],
    }
    for name, expected in shapes.items():
        assert [(g.channels, g.spatial) for g in _build(name).describe_groups(32)] == expected, name


@pytest.mark.parametrize("name", ["resnet20", "ResNet50"])
def test_resnet_candidates_are_preact_block_outputs(name):
    """Each block consumes relu(previous candidate): the candidate is the residual sum before the ReLU."""
    net = _build(name).eval()
    inputs = {}
    modules = dict(net.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0]))
        for n in net.candidate_names()
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(x)
    for h in handles:
        h.remove()
    names = net.candidate_names()
    flat = [t for group in feats.candidates for t in group]
    for prev, nxt in zip(flat, names[1:], strict=False):
        assert torch.equal(inputs[nxt], torch.relu(prev))


def test_wrn_candidate_is_the_following_bn():
    """OFD's convention: block j's feature is the next block's bn1 (or the final bn1) of its output,
    computed once per forward (so training updates each BN's running statistics once)."""
    net = _build("wrn_16_2")
    seen = {}
    follow = {
        "block1.layer.1": "block2.layer.0.bn1",
        "block2.layer.1": "block3.layer.0.bn1",
        "block3.layer.1": "bn1",
    }
    modules = dict(net.named_modules())
    for bn_name in follow.values():
        modules[bn_name].register_forward_hook(lambda _m, _i, out, n=bn_name: seen.__setitem__(n, out))
    net.train()
    feats = net.forward_features(torch.randn(4, 3, 32, 32))
    for group_names, group in zip(net.group_names, feats.candidates, strict=True):
        assert seen[follow[group_names[-1]]] is group[-1]
    assert {m.num_batches_tracked.item() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1}


def test_wrn_features_are_differentiable_and_forward_from_trains():
    net = _build("wrn_16_1").train()  # block1.layer.0 keeps 16 channels: identity shortcut on the raw input
    feats = net.forward_features(torch.randn(4, 3, 32, 32))
    logits = net.forward_from(1, feats.candidates[1][-1])
    (feats.candidates[0][0].square().mean() + logits.sum()).backward()
    assert net.conv1.weight.grad is not None and net.fc.weight.grad is not None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrn_40_2", (40, 2)),
        ("wrn_16_1", (16, 1)),
        ("wrn_10_3", (10, 3)),
        ("wrn_22_8", (22, 8)),
        ("wrn_4_2", None),  # no blocks
        ("wrn_41_2", None),
        ("wrn_40_0", None),
        ("wrn_040_2", None),
        ("wrn_40_2x", None),
        ("wrn_40", None),
        ("resnet20", None),
        ("wrn_-2_1", None),
    ],
)
def test_wrn_parse_name(name, expected):
    assert wrn.parse_name(name) == expected


def test_build_any_valid_wrn():
    net = models.build("wrn_10_3", 10)
    assert isinstance(net, wrn.WideResNet)
    assert net.group_names == [["block1.layer.0"], ["block2.layer.0"], ["block3.layer.0"]]
    assert net.fc.in_features == 192
    assert not models.is_available("wrn_41_2")


def test_vgg_keeps_repdistillers_pool3_rule():
    """RepDistiller pools between block3 and block4 only for 64 px inputs; the plain forward does too,
    while the feature groups (defined where block3 and block4 share a size) refuse that size."""
    net = _build("vgg8").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (1, NUM_CLASSES)
    with pytest.raises(DfakdError, match="64 px"):
        net.forward_features(x)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet.CifarResNet(9, (16, 16, 32, 64), 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn.WideResNet(depth=12, widen_factor=1, num_classes=10)
    with pytest.raises(ValueError, match="widen_factor"):
        wrn.WideResNet(depth=16, widen_factor=0, num_classes=10)
