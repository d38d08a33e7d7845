"""Tests for brain3d.models: seed parity, shapes, logits, errors, config building."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from brain3d.errors import ConfigError
from brain3d.models.backbones import Conv3DBlock, PlainBackbone, ResNetBackbone, make_norm
from brain3d.models.heads import GlobalPoolHead, SegmentationHead, check_segmentation_shape
from brain3d.models.model import Brain3DModel, build_model, count_parameters

SEED_CLS_PARAMS = 4_781_057
SEED_SEG_PARAMS = 14_387_969
NORMS = ["batch", "instance", "group"]
W = 0.125  # small width for forward passes


# --------------------------------------------------------------------------------------
# Reference: the seed's original classes (shared/seed/3d_brain_models_seed.md), verbatim
# apart from comments and the sigmoid, which does not change the parameters.
# --------------------------------------------------------------------------------------
class SeedConv3DBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding)
        self.bn = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class SeedFeatureExtractor3D(nn.Module):
    def __init__(self, input_channels=1):
        super().__init__()
        self.conv1 = SeedConv3DBlock(input_channels, 64, stride=2)
        self.conv2 = SeedConv3DBlock(64, 128, stride=2)
        self.conv3 = SeedConv3DBlock(128, 256, stride=2)
        self.conv4 = SeedConv3DBlock(256, 512, stride=2)

    def forward(self, x):
        f1 = self.conv1(x)
        f2 = self.conv2(f1)
        f3 = self.conv3(f2)
        f4 = self.conv4(f3)
        return {"final_features": f4, "intermediate_features": [f1, f2, f3, f4]}


class SeedBrainClassifier3D(nn.Module):
    def __init__(self, input_channels=1):
        super().__init__()
        self.feature_extractor = SeedFeatureExtractor3D(input_channels)
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, 1)
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        pooled = self.global_pool(self.feature_extractor(x)["final_features"])
        return self.sigmoid(self.classifier(pooled.view(pooled.size(0), -1)))


class SeedDecoder3DBlock(nn.Module):
    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, in_channels, 2, 2)
        self.conv = SeedConv3DBlock(in_channels + skip_channels, out_channels)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class SeedBrainSegmenter3D(nn.Module):
    def __init__(self, input_channels=1):
        super().__init__()
        self.feature_extractor = SeedFeatureExtractor3D(input_channels)
        self.decoder4 = SeedDecoder3DBlock(512, 256, 256)
        self.decoder3 = SeedDecoder3DBlock(256, 128, 128)
        self.decoder2 = SeedDecoder3DBlock(128, 64, 64)
        self.decoder1 = nn.ConvTranspose3d(64, 32, 2, 2)
        self.final_conv = nn.Conv3d(32, 1, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        f1, f2, f3, f4 = self.feature_extractor(x)["intermediate_features"]
        d4 = self.decoder4(f4, f3)
        d3 = self.decoder3(d4, f2)
        d2 = self.decoder2(d3, f1)
        return self.sigmoid(self.final_conv(self.decoder1(d2)))


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


def _cls_model(backbone: nn.Module, **kw) -> Brain3DModel:
    return Brain3DModel(backbone, {"cls": GlobalPoolHead(backbone.feature_channels, **kw)})


def _seg_model(backbone: nn.Module, norm: str = "batch") -> Brain3DModel:
    return Brain3DModel(backbone, {"seg": SegmentationHead(backbone.feature_channels, norm=norm)})


def _backbone(kind: str, norm: str = "batch", width: float = W) -> nn.Module:
    if kind == "plain":
        return PlainBackbone(width=width, norm=norm)
    return ResNetBackbone(width=width, norm=norm, depth=int(kind.removeprefix("resnet")))


# ----------------------------------------------------------------------------- seed parity
def test_seed_parameter_counts_and_shapes():
    ours_cls = _cls_model(PlainBackbone())
    seed_cls = SeedBrainClassifier3D()
    assert count_parameters(ours_cls) == SEED_CLS_PARAMS == count_parameters(seed_cls)
    assert _shapes(ours_cls) == _shapes(seed_cls)

    ours_seg = _seg_model(PlainBackbone())
    seed_seg = SeedBrainSegmenter3D()
    assert count_parameters(ours_seg) == SEED_SEG_PARAMS == count_parameters(seed_seg)
    assert _shapes(ours_seg) == _shapes(seed_seg)


def test_seed_weights_load_into_ours():
    """Same architecture: the seed's weights load by position and give the same logits."""
    torch.manual_seed(0)
    seed = SeedBrainClassifier3D().eval()
    ours = _cls_model(PlainBackbone()).eval()
    with torch.no_grad():
        for p_ours, p_seed in zip(ours.parameters(), seed.parameters()):
            p_ours.copy_(p_seed)
        for b_ours, b_seed in zip(ours.buffers(), seed.buffers()):
            b_ours.copy_(b_seed)
        x = torch.randn(1, 1, 16, 16, 16)
        assert torch.allclose(torch.sigmoid(ours(x)["cls"]), seed(x), atol=1e-6)


# ----------------------------------------------------------------------------- width
def test_width_scales_channels():
    assert PlainBackbone().feature_channels == (64, 128, 256, 512)
    assert PlainBackbone(width=0.25).feature_channels == (16, 32, 64, 128)
    assert PlainBackbone(width=0.125).feature_channels == (8, 16, 32, 64)
    assert ResNetBackbone(width=0.25, depth=10).feature_channels == (16, 32, 64, 128)
    head = GlobalPoolHead((16, 32, 64, 128))
    assert head.mlp[0].in_features == 128 and head.mlp[0].out_features == 64


@pytest.mark.parametrize("width", [0, -1.0])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        PlainBackbone(width=width)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["plain", "resnet10", "resnet18"])
@pytest.mark.parametrize("norm", NORMS)
def test_feature_and_output_shapes(kind, norm):
    torch.manual_seed(0)
    backbone = _backbone(kind, norm)
    model = Brain3DModel(
        backbone,
        {
            "cls": GlobalPoolHead(backbone.feature_channels),
            "seg": SegmentationHead(backbone.feature_channels, norm=norm),
        },
    )
    for shape in [(2, 1, 32, 32, 32), (1, 1, 32, 48, 64)]:
        x = torch.randn(*shape)
        feats = backbone(x)
        assert len(feats) == 4
        for i, (f, c) in enumerate(zip(feats, backbone.feature_channels)):
            assert f.shape == (shape[0], c, *(s // 2 ** (i + 1) for s in shape[2:]))
        out = model(x)
        assert set(out) == {"cls", "seg"}
        assert out["cls"].shape == (shape[0], 1)
        assert out["seg"].shape == (shape[0], 1, *shape[2:])


def test_multi_output_head():
    backbone = PlainBackbone(width=W)
    model = _cls_model(backbone, out_features=3, hidden_features=7)
    assert model(torch.randn(2, 1, 32, 32, 32))["cls"].shape == (2, 3)
    seg = SegmentationHead(backbone.feature_channels, out_channels=4)
    assert Brain3DModel(backbone, {"s": seg})(torch.randn(2, 1, 16, 16, 16))["s"].shape == (2, 4, 16, 16, 16)


def test_group_norm_groups_divide_channels():
    for c in [1, 3, 6, 8, 12, 16, 64]:
        gn = make_norm("group", c)
        assert isinstance(gn, nn.GroupNorm) and c % gn.num_groups == 0 and gn.num_groups <= min(8, c)
    assert make_norm("group", 12).num_groups == 6
    assert isinstance(make_norm("instance", 4), nn.InstanceNorm3d) and make_norm("instance", 4).affine


def test_conv_block_attributes():
    block = Conv3DBlock(1, 4, norm="instance")
    assert isinstance(block.conv, nn.Conv3d) and isinstance(block.norm, nn.InstanceNorm3d)
    assert isinstance(block.relu, nn.ReLU)


def test_resnet_depths_differ():
    n10 = count_parameters(ResNetBackbone(width=W, depth=10))
    n18 = count_parameters(ResNetBackbone(width=W, depth=18))
    assert n18 > n10


# ----------------------------------------------------------------------------- logits
def test_heads_return_logits():
    torch.manual_seed(0)
    backbone = PlainBackbone(width=W).eval()
    head = GlobalPoolHead(backbone.feature_channels).eval()
    seg = SegmentationHead(backbone.feature_channels).eval()
    with torch.no_grad():
        nn.init.constant_(head.mlp[3].bias, 5.0)  # logits far above 1 unless squashed
        nn.init.constant_(seg.final_conv.bias, -5.0)  # logits far below 0 unless squashed
        model = Brain3DModel(backbone, {"cls": head, "seg": seg})
        x = torch.randn(2, 1, 32, 32, 32)
        out = model(x)
        feats = backbone(x)
        pooled = feats[-1].mean(dim=(2, 3, 4))
        manual = head.mlp(pooled)  # eval: dropout is the identity
    assert torch.allclose(out["cls"], manual, atol=1e-5)
    assert (out["cls"] > 1).any()
    assert (out["seg"] < 0).any()


# ----------------------------------------------------------------------------- errors
def test_segmentation_refuses_bad_shape():
    model = _seg_model(PlainBackbone(width=W))
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 1, 50, 64, 64))
    msg = str(err.value)
    assert "(50, 64, 64)" in msg and "(48, 64, 64)" in msg and "(64, 64, 64)" in msg
    check_segmentation_shape((16, 32, 48))  # no error


def test_classification_accepts_non_multiple_of_16():
    model = _cls_model(PlainBackbone(width=W)).eval()
    assert model(torch.randn(1, 1, 20, 24, 28))["cls"].shape == (1, 1)


@pytest.mark.parametrize("shape", [(1, 32, 32, 32), (1, 1, 1, 32, 32, 32)])
def test_refuses_non_5d_input(shape):
    model = _seg_model(PlainBackbone(width=W))
    with pytest.raises(ValueError, match=r"5-D") as err:
        model(torch.randn(*shape))
    assert str(tuple(shape)) in str(err.value)


def test_unknown_norm():
    for build in (
        lambda: PlainBackbone(width=W, norm="layer"),
        lambda: ResNetBackbone(width=W, norm="layer"),
        lambda: Conv3DBlock(1, 4, norm="layer"),
        lambda: SegmentationHead((8, 16, 32, 64), norm="layer"),
    ):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert "layer" in msg and all(n in msg for n in NORMS)


@pytest.mark.parametrize("depth", [34, 50, 0])
def test_resnet_bad_depth(depth):
    with pytest.raises(ValueError) as err:
        ResNetBackbone(width=W, depth=depth)
    assert "10" in str(err.value) and "18" in str(err.value)


# ----------------------------------------------------------------------------- build_model
PLAIN = {"_target_": "brain3d.models.backbones.PlainBackbone", "width": W}
RESNET = {"_target_": "brain3d.models.backbones.ResNetBackbone", "width": W, "depth": 10, "norm": "group"}
POOL = {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}
SEG = {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1}


@pytest.mark.parametrize("as_omegaconf", [False, True])
def test_build_model(as_omegaconf):
    wrap = OmegaConf.create if as_omegaconf else dict
    model = build_model(wrap(PLAIN), wrap(POOL), "sex")
    assert isinstance(model.backbone, PlainBackbone) and isinstance(model.heads["sex"], GlobalPoolHead)
    assert model.eval()(torch.randn(2, 1, 32, 32, 32))["sex"].shape == (2, 1)

    model = build_model(wrap(RESNET), wrap(SEG), "lesion")
    assert isinstance(model.backbone, ResNetBackbone) and isinstance(model.heads["lesion"], SegmentationHead)
    assert model(torch.randn(1, 1, 32, 32, 32))["lesion"].shape == (1, 1, 32, 32, 32)


def test_build_model_full_width_matches_seed():
    full = {"_target_": "brain3d.models.backbones.PlainBackbone"}
    assert count_parameters(build_model(full, POOL, "age")) == SEED_CLS_PARAMS
    assert count_parameters(build_model(full, SEG, "lesion")) == SEED_SEG_PARAMS


def test_build_model_wrong_targets():
    with pytest.raises(TypeError, match="torch.nn.Identity"):
        build_model({"_target_": "torch.nn.Identity"}, POOL, "x")  # no feature_channels
    with pytest.raises(TypeError, match="builtins.dict"):
        build_model(PLAIN, {"_target_": "builtins.dict"}, "x")  # not an nn.Module


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["plain", "resnet18"])
def test_backward_reaches_backbone_for_each_head(kind):
    torch.manual_seed(0)
    backbone = _backbone(kind, "group")
    model = Brain3DModel(
        backbone,
        {
            "cls": GlobalPoolHead(backbone.feature_channels),
            "seg": SegmentationHead(backbone.feature_channels, norm="group"),
        },
    )
    x = torch.randn(2, 1, 32, 32, 32)
    for name in ("cls", "seg"):
        model.zero_grad(set_to_none=True)
        model(x)[name].sum().backward()
        grads = [p.grad for p in backbone.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
        head_grads = [p.grad for p in model.heads[name].parameters()]
        assert all(g is not None for g in head_grads), name


def test_a_key_the_backbone_does_not_take_is_named_with_the_keys_it_takes():
    from brain3d.errors import ConfigError

    cfg = {"_target_": "brain3d.models.backbones.PlainBackbone", "width": 0.125, "depth": 10}
    head = {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}
    with pytest.raises(ConfigError, match=r"^backbone\.depth is not a setting of brain3d\.models\.backbones\."
                                          r"PlainBackbone \(it takes in_channels, width, norm\); remove it with "
                                          r"'~backbone\.depth'"):
        build_model(cfg, head, "classification")
    with pytest.raises(ConfigError, match=r"^task\.head\.pool is not a setting of .*GlobalPoolHead"):
        build_model({k: v for k, v in cfg.items() if k != "depth"},
                    {**head, "pool": "max"}, "classification")
    # every stray key at once (experiment=brain_age backbone=plain leaves two)
    with pytest.raises(ConfigError, match=r"^backbone\.depth, backbone\.stage1_stride are not settings of "
                                          r".*PlainBackbone \(it takes in_channels, width, norm\); remove them with "
                                          r"'~backbone\.depth' '~backbone\.stage1_stride'"):
        build_model({**cfg, "stage1_stride": 2}, head, "classification")


# ----------------------------------------------------------------------------- ResNet stage-1 stride
def test_resnet_stage1_stride_2_halves_every_feature_map_and_keeps_the_parameters():
    torch.manual_seed(0)
    plain = ResNetBackbone(width=W, depth=10)
    strided = ResNetBackbone(width=W, depth=10, stage1_stride=2)
    assert plain.feature_strides == (2, 4, 8, 16) and strided.feature_strides == (4, 8, 16, 32)
    # a stride-2 first block needs a 1x1x1 projection on its skip path: the only new parameters
    extra = count_parameters(strided) - count_parameters(plain)
    c1 = plain.feature_channels[0]
    assert extra == c1 * c1 + 2 * c1  # conv 1x1x1 without bias + its BatchNorm's weight and bias
    x = torch.randn(2, 1, 64, 64, 64)
    shapes = [tuple(f.shape[2:]) for f in strided(x)]
    assert shapes == [(16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]
    model = Brain3DModel(strided, {"age": GlobalPoolHead(strided.feature_channels)})
    assert model(x)["age"].shape == (2, 1)


def test_resnet_stage1_stride_is_checked_and_refused_for_segmentation():
    with pytest.raises(ValueError, match="stage1_stride must be 1 or 2"):
        ResNetBackbone(width=W, depth=10, stage1_stride=3)
    backbone = {"_target_": "brain3d.models.backbones.ResNetBackbone", "width": W, "depth": 10, "stage1_stride": 2}
    with pytest.raises(ConfigError, match=r"a segmentation head needs the backbone's features at 1/2, 1/4, "
                       r"1/8, 1/16 of the input; this backbone gives 1/4, 1/8, 1/16, 1/32: leave "
                       r"backbone.stage1_stride=1 and backbone.stem_stride=2"):
        build_model(backbone, {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1}, "seg")
    model = build_model(backbone, {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}, "age")
    assert model.backbone.feature_strides == (4, 8, 16, 32)


def test_resnet_stem_stride_4_is_a_patchify_stem_with_features_at_a_quarter():
    torch.manual_seed(0)
    backbone = ResNetBackbone(width=W, depth=10, stem_stride=4)
    assert backbone.feature_strides == (4, 8, 16, 32)
    conv = backbone.stem.conv
    assert conv.kernel_size == (4, 4, 4) and conv.stride == (4, 4, 4) and conv.padding == (0, 0, 0)
    x = torch.randn(2, 1, 64, 48, 32)
    assert [tuple(f.shape[2:]) for f in backbone(x)] == [(16, 12, 8), (8, 6, 4), (4, 3, 2), (2, 2, 1)]
    # each stem output voxel is its own 4x4x4 patch: changing one patch changes one output voxel only
    with torch.no_grad():
        backbone.eval()
        before = conv(x)
        y = x.clone()
        y[:, :, 4:8, 0:4, 8:12] += 1.0
        changed = (conv(y) - before).abs().sum(dim=(0, 1)) > 0
    assert changed.nonzero().tolist() == [[1, 0, 2]]
    # parameters: the stem's 4^3 kernel instead of 3^3 (c1 filters of one channel)
    c1 = backbone.feature_channels[0]
    assert count_parameters(backbone) - count_parameters(ResNetBackbone(width=W, depth=10)) == c1 * (64 - 27)
    with pytest.raises(ValueError, match="stem_stride must be 2 or 4, got 3"):
        ResNetBackbone(width=W, depth=10, stem_stride=3)
    seg = {"_target_": "brain3d.models.backbones.ResNetBackbone", "width": W, "depth": 10, "stem_stride": 4}
    with pytest.raises(ConfigError, match="this backbone gives 1/4, 1/8, 1/16, 1/32"):
        build_model(seg, {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1}, "seg")
