"""Feature-interface invariants for every model in the zoo (METHOD.md section 1)."""

import pytest
import torch

from dfakd import models

NAMES = models.available()


@pytest.fixture(scope="module", params=NAMES)
def net_and_feats(request):
    torch.manual_seed(0)
    net = models.build(request.param, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net(x)
    return request.param, net, x, feats, logits


def test_groups_named_and_shaped(net_and_feats):
    name, net, _, feats, logits = net_and_feats
    assert logits.shape == (2, 10)
    assert len(feats.candidates) == len(net.group_names) == net.num_groups >= 3
    names = net.candidate_names()
    assert len(names) == len(set(names)), "candidate names must be unique"
    modules = dict(net.named_modules())
    for group_names, group in zip(net.group_names, feats.candidates, strict=True):
        assert len(group) == len(group_names) >= 1
        assert all(n in modules for n in group_names), f"{name}: names must be module paths"
        assert len({tuple(t.shape) for t in group}) == 1, f"{name}: candidates of a group differ in shape"
    sizes = [g[-1].shape[-1] for g in feats.candidates]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_plain_forward_equals_feature_forward(net_and_feats):
    _, _, _, feats, logits = net_and_feats
    assert torch.equal(feats.logits, logits)


def test_forward_from_every_group_reproduces_logits(net_and_feats):
    _, net, _, feats, logits = net_and_feats
    with torch.no_grad():
        for i, end in enumerate(feats.group_ends):
            assert torch.equal(net.forward_from(i, end), logits), f"group {i}"


def test_features_are_pre_activation(net_and_feats):
    _, _, _, feats, _ = net_and_feats
    # a pre-ReLU feature has negative entries; a clobbered (post in-place ReLU) one would not
    for group in feats.candidates:
        for t in group:
            assert (t < 0).any()


def test_group_info_matches_features(net_and_feats):
    _, net, _, feats, _ = net_and_feats
    info = net.describe_groups(32)
    assert [g.channels for g in info] == [t[-1].shape[1] for t in feats.candidates]
    assert [g.spatial for g in info] == [t[-1].shape[-1] for t in feats.candidates]


def test_unknown_model_is_a_clear_error():
    from dfakd.errors import DfakdError

    with pytest.raises(DfakdError, match="unknown model 'resnet9'"):
        models.build("resnet9", 10)
