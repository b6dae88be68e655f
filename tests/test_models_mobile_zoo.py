"""MobileNetV2 / ShuffleV1 / ShuffleV2: RepDistiller-identical state_dicts, groups and candidate names.

The parameter counts are worked out by hand from RepDistiller's model definitions (models/mobilenetv2.py,
ShuffleNetv1.py, ShuffleNetv2.py), e.g. an inverted residual (in, out, hidden h) has
h*(in + out + 13) + 2*out parameters, a ShuffleNetV2 basic unit of c channels 2*(c/2)^2 + 15*(c/2). The
key -> shape hashes were checked against a literal transcription of those definitions.
"""

import hashlib
import io

import pytest
import torch
import torch.nn.functional as F

from dfakd import models
from dfakd.models.shufflenetv1 import channel_shuffle

# parameters at 100 classes
PARAM_COUNTS = {
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ShuffleV2_0.5": 443_716,
    "ShuffleV2_1.0": 1_355_528,
    "ShuffleV2_1.5": 2_580_548,
    "ShuffleV2_2.0": 5_521_860,
}

# sha256 of the sorted "key:shape" lines of the state_dict at 100 classes, and the number of keys
STATE_DICT_SIGNATURES = {
    "MobileNetV2": ("10e9036e17013c384b609d940aadcb1830db64b073b40b455ce84be66077bf63", 320),
    "ShuffleV1": ("eb3bcbc847930cceb3c787d8ea73acc50eadc5c1389ae98ec60944bf1cbabc61", 296),
    "ShuffleV2": ("b7e2c3e764687767a08e26294553105d83a85c9c9f3908a78a597484a4f2a7f0", 338),
    "ShuffleV2_0.5": ("b87bccef411e41347ca6f39895db03fba6aa56caf5b1fa0f5780ca38db0aa7aa", 338),
    "ShuffleV2_1.0": ("b7e2c3e764687767a08e26294553105d83a85c9c9f3908a78a597484a4f2a7f0", 338),
    "ShuffleV2_1.5": ("15f6b4fbe25801b5387546fa9e581344641d9e8b5914bc8d6de79fc79ac59e6f", 338),
    "ShuffleV2_2.0": ("e38e7270cda806e1f4a9faa378ae60caaf2072313c4001653e5164e626fa1c33", 338),
}

SPOT_KEYS = {
    "MobileNetV2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.running_mean": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),  # expansion 1 still has the 1x1 expand conv
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
        "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1),
        "blocks.3.3.conv.7.num_batches_tracked": (),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "conv2.0.weight": (1280, 160, 1, 1),
        "conv2.1.bias": (1280,),
        "classifier.0.weight": (100, 1280),
        "classifier.0.bias": (100,),
    },
    "ShuffleV1": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),  # dense first 1x1 on the stem
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer1.1.conv1.weight": (60, 80, 1, 1),
        "layer2.0.conv3.weight": (240, 20, 1, 1),
        "layer3.3.conv2.weight": (240, 1, 3, 3),
        "layer3.3.bn3.running_var": (960,),
        "linear.weight": (100, 960),
    },
    "ShuffleV2": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.0.conv3.weight": (58, 24, 1, 1),
        "layer1.0.conv4.weight": (58, 1, 3, 3),
        "layer1.0.bn5.weight": (58,),
        "layer1.3.conv1.weight": (58, 58, 1, 1),
        "layer2.7.conv3.weight": (116, 116, 1, 1),
        "layer3.3.bn3.running_var": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.num_batches_tracked": (),
        "linear.weight": (100, 1024),
    },
}

# (channels, spatial size) of each group at 32x32 input
GROUP_SHAPES = {
    "MobileNetV2": [(12, 16), (16, 8), (48, 4), (160, 2)],
    "ShuffleV1": [(240, 16), (480, 8), (960, 4)],
    "ShuffleV2": [(116, 16), (232, 8), (464, 4)],
    "ShuffleV2_0.5": [(48, 16), (96, 8), (192, 4)],
    "ShuffleV2_1.0": [(116, 16), (232, 8), (464, 4)],
    "ShuffleV2_1.5": [(176, 16), (352, 8), (704, 4)],
    "ShuffleV2_2.0": [(224, 16), (488, 8), (976, 4)],
}

SHUFFLE_V2_NAMES = [
    [f"layer1.{u}" for u in range(4)],
    [f"layer2.{u}" for u in range(8)],
    [f"layer3.{u}" for u in range(4)],
]
GROUP_NAMES = {
    "MobileNetV2": [
        ["blocks.1.0", "blocks.1.1"],
        ["blocks.2.0", "blocks.2.1", "blocks.2.2"],
        ["blocks.4.0", "blocks.4.1", "blocks.4.2"],
        ["blocks.6.0"],
    ],
    "ShuffleV1": [
        [f"layer1.{u}" for u in range(4)],
        [f"layer2.{u}" for u in range(8)],
        [f"layer3.{u}" for u in range(4)],
    ],
    **{name: SHUFFLE_V2_NAMES for name in GROUP_SHAPES if name.startswith("ShuffleV2")},
}

NAMES = sorted(PARAM_COUNTS)


def _signature(state_dict: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state_dict.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    torch.manual_seed(0)
    return request.param, models.build(request.param, 100)


def test_registered():
    assert set(NAMES) <= set(models.available())


def test_parameter_count(built):
    name, net = built
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[name]


def test_state_dict_keys_and_shapes(built):
    name, net = built
    sd = net.state_dict()
    digest, n_keys = STATE_DICT_SIGNATURES[name]
    assert len(sd) == n_keys
    for key, shape in SPOT_KEYS.get(name, {}).items():
        assert tuple(sd[key].shape) == shape, key
    assert _signature(sd) == digest


def test_checkpoint_loads_strict(built):
    name, net = built
    with torch.no_grad():  # non-default BN statistics, so that a dropped buffer would show
        for key, value in net.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "epoch": 240}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = models.build(name, 100)
    fresh.load_state_dict(checkpoint["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net.eval()(x))


def test_groups_and_candidate_names(built):
    name, net = built
    assert net.group_names == GROUP_NAMES[name]
    assert [(g.channels, g.spatial) for g in net.describe_groups(32)] == GROUP_SHAPES[name]


def test_shufflev2_units_match_repdistiller_after_relu():
    """ReLU of our pre-activation unit output equals RepDistiller's unit (ReLU on branches, cat, shuffle)."""
    torch.manual_seed(0)
    net = models.build("ShuffleV2_0.5", 10).eval()
    down, basic = net.layer2[0], net.layer2[1]
    x = F.relu(torch.randn(2, 48, 16, 16))
    with torch.no_grad():
        left = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(x)))))
        right = F.relu(down.bn3(down.conv3(x)))
        right = F.relu(down.bn5(down.conv5(down.bn4(down.conv4(right)))))
        expected = channel_shuffle(torch.cat([left, right], 1), 2)
        assert torch.equal(F.relu(down(x)), expected)

        y = expected
        x1, x2 = y[:, :48], y[:, 48:]
        branch = F.relu(basic.bn1(basic.conv1(x2)))
        branch = F.relu(basic.bn3(basic.conv3(basic.bn2(basic.conv2(branch)))))
        assert torch.equal(F.relu(basic(y)), channel_shuffle(torch.cat([x1, branch], 1), 2))
