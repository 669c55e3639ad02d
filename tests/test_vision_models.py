"""timm and torchvision architectures whose code computes sizes from shapes, tuple attributes and
function arguments, pruned at 30% and 50% through the public API (random weights, small configs
of the libraries' own classes, so their forward code is the one that runs).

These need the vision extra (timm and torchvision, on the torch build the README names for it);
without it they are skipped, saying so.  Every prune is verified by graphprune itself: the pruned
model is traced again with its own forward code and compared with the dense model node by node.
"""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import ChannelPrune

timm = pytest.importorskip("timm", reason="the vision extra (timm, torchvision) is not installed")
torchvision_models = pytest.importorskip("torchvision.models", reason="the vision extra is not installed")

pytestmark = pytest.mark.vision


def _timm(name: str, size: int, **config):
    return lambda: (timm.create_model(name, pretrained=False, num_classes=10, **config), (1, 3, size, size))


MODELS = {
    "swin (timm)": _timm(
        "swin_tiny_patch4_window7_224", 224, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)
    ),
    "poolformer (timm MetaFormer)": lambda: (
        timm.models.metaformer.MetaFormer(  # poolformer_s12's settings
            depths=(1, 1, 1, 1),
            dims=(16, 32, 64, 128),
            downsample_norm=None,
            mlp_act=torch.nn.GELU,
            mlp_bias=True,
            norm_layers=timm.models.metaformer.GroupNorm1,
            layer_scale_init_values=1e-5,
            res_scale_init_values=None,
            use_mlp_head=False,
            num_classes=10,
        ),
        (1, 3, 64, 64),
    ),
    "pvt_v2 (timm, spatial-reduction attention)": _timm(
        "pvt_v2_b0", 64, depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)
    ),
    "mixnet (timm, mixed kernels)": _timm("mixnet_s", 64),
    "davit (timm)": _timm("davit_tiny", 64, depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    "cait (timm)": _timm("cait_xxs24_224", 64, img_size=64, depth=2, embed_dim=48, num_heads=2),
    "swin_t (torchvision)": lambda: (
        torchvision_models.swin_transformer.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=32,
            depths=[1, 1, 2, 1],
            num_heads=[1, 2, 4, 8],
            window_size=[7, 7],
            num_classes=10,
        ),
        (1, 3, 224, 224),
    ),
    "maxvit_t (torchvision)": lambda: (
        torchvision_models.maxvit.MaxVit(
            input_size=(64, 64),
            stem_channels=16,
            partition_size=2,
            block_channels=[16, 32],
            block_layers=[1, 1],
            head_dim=8,
            stochastic_depth_prob=0.0,
            num_classes=10,
        ),
        (1, 3, 64, 64),
    ),
}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", list(MODELS))
def test_vision_architectures_prune_and_run_their_own_code(name, ratio):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model.eval()
    x = torch.randn(*shape)
    result = gp.prune(model, (x,), passes=[ChannelPrune(ratio=ratio, round_to=8)])
    assert result.report.params_after < 0.9 * result.report.params, result.report
    with torch.no_grad():
        assert result.module(x).shape == model(x).shape
