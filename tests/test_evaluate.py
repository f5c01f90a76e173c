"""ADM-parity evaluator: each statistic against a plain independent implementation, the Inception
wrapper's feature layout, the npz/weights refusals, and the whole CLI with random Inception weights."""
import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from conftest import run_python
from generation import adm_metrics
from generation import evaluate as ev
from generation.inception import SPATIAL_DIM, InceptionFeatureExtractor, load_inception_state_dict, random_inception_state_dict, spatial_features
from util.errors import UserError


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_inception_state_dict(), path)
    return path


def reference_fid(mu1, sigma1, mu2, sigma2):
    """Independent FID: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigensolvers only."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def reference_inception_score(probs, split_size):
    """Independent IS: explicit loops over chunks, images and classes."""
    scores = []
    for start in range(0, len(probs), split_size):
        chunk = probs[start:start + split_size]
        marginal = [sum(row[c] for row in chunk) / len(chunk) for c in range(len(chunk[0]))]
        kls = [sum(p * math.log(p / m) for p, m in zip(row, marginal) if p > 0) for row in chunk]
        scores.append(math.exp(sum(kls) / len(kls)))
    return sum(scores) / len(scores)


def reference_precision_recall(ref, sample, k=3):
    """Independent P/R: float64 brute-force squared distances, radius = k-th neighbour (self excluded)."""
    ref_radii = np.sort(cdist(ref, ref, "sqeuclidean"), axis=1)[:, k]
    sample_radii = np.sort(cdist(sample, sample, "sqeuclidean"), axis=1)[:, k]
    cross = cdist(ref, sample, "sqeuclidean")  # (N_ref, N_sample)
    precision = np.mean([(cross[:, j] <= ref_radii).any() for j in range(len(sample))])
    recall = np.mean([(cross[i, :] <= sample_radii).any() for i in range(len(ref))])
    return precision, recall


# ----------------------------------------------------------------------------- FID

def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    dim = 32
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    var1, var2 = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    ours = adm_metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert ours == pytest.approx(closed_form, rel=1e-10, abs=1e-10)
    assert adm_metrics.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-10)


def test_fid_from_activations_matches_independent_eigen_implementation():
    rng = np.random.default_rng(1)
    dim, count = 24, 400
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    acts1 = rng.normal(size=(count, dim)) @ mixing
    acts2 = rng.normal(size=(count, dim)) @ (mixing + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)) + 0.5
    stats1, stats2 = adm_metrics.FIDStatistics.from_activations(acts1), adm_metrics.FIDStatistics.from_activations(acts2)
    # np.cov(rowvar=False) is the unbiased estimate, as ADM's compute_statistics
    np.testing.assert_allclose(stats1.sigma, (acts1 - acts1.mean(0)).T @ (acts1 - acts1.mean(0)) / (count - 1))
    ours = stats1.frechet_distance(stats2)
    expected = reference_fid(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    assert abs(ours - expected) < 1e-9 * max(1.0, expected)
    assert ours > 0.1


def test_fid_singular_product_falls_back_to_eps_offset():
    mu = np.zeros(3)
    var1, var2 = np.array([1.0, 2.0, 0.0]), np.array([0.5, 0.0, 4.0])
    real_sqrtm = adm_metrics.linalg.sqrtm
    calls = []

    def sqrtm_failing_first(matrix):  # old scipy returned inf/nan for singular products
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    with mock.patch.object(adm_metrics.linalg, "sqrtm", sqrtm_failing_first), pytest.warns(UserWarning, match="singular"):
        ours = adm_metrics.frechet_distance(mu, np.diag(var1), mu, np.diag(var2))
    eps = 1e-6
    expected = np.sum(var1) + np.sum(var2) - 2 * np.sum(np.sqrt((var1 + eps) * (var2 + eps)))
    assert len(calls) == 2 and ours == pytest.approx(expected, abs=1e-12)


def test_fid_rejects_imaginary_root_and_mismatched_statistics():
    with pytest.raises(ValueError, match="imaginary"):
        adm_metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        adm_metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_on_hand_made_tables():
    confident_uniform = np.eye(4)  # every image sure of a different class: IS = number of classes
    assert adm_metrics.inception_score(confident_uniform, from_logits=False) == pytest.approx(4.0)
    undecided = np.full((6, 5), 0.2)  # p(y|x) = p(y): KL = 0, IS = 1
    assert adm_metrics.inception_score(undecided, from_logits=False) == pytest.approx(1.0)
    two_classes = np.array([[0.9, 0.1], [0.1, 0.9]])  # marginal (0.5, 0.5)
    expected = math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert adm_metrics.inception_score(two_classes, from_logits=False) == pytest.approx(expected, rel=1e-12)


def test_inception_score_chunks_and_softmax_match_loops():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(13, 7))
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    for split_size in (5, 13, 4):  # consecutive chunks, the last one short (as ADM)
        expected = reference_inception_score(probs.tolist(), split_size)
        assert adm_metrics.inception_score(logits, split_size=split_size) == pytest.approx(expected, rel=1e-12)
        assert adm_metrics.inception_score(probs, split_size=split_size, from_logits=False) == pytest.approx(expected, rel=1e-12)
    # chunking matters: one chunk of 13 is not the mean of 5/5/3
    assert adm_metrics.inception_score(logits, split_size=5) != pytest.approx(adm_metrics.inception_score(logits, split_size=13))


# ----------------------------------------------------------------------------- Precision / Recall

@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: fp16 overflows, the fp32 fallback runs
def test_precision_recall_matches_brute_force(scale):
    rng = np.random.default_rng(3)
    ref = (rng.normal(size=(70, 16)) * scale).astype(np.float32)
    sample = (rng.normal(loc=0.6, scale=1.3, size=(55, 16)) * scale).astype(np.float32)
    expected = reference_precision_recall(ref.astype(np.float64), sample.astype(np.float64))
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case where both can be wrong
    estimator = adm_metrics.ManifoldEstimator(row_batch_size=16, col_batch_size=24)  # blocks smaller than the sets
    ref_radii, sample_radii = estimator.manifold_radii(ref), estimator.manifold_radii(sample)
    precision, recall = estimator.evaluate_pr(ref, ref_radii, sample, sample_radii)
    assert (precision[0], recall[0]) == pytest.approx(expected, abs=1e-12)
    assert adm_metrics.precision_recall(ref, sample) == pytest.approx(expected, abs=1e-12)
    brute_radii = np.sort(cdist(ref, ref, "sqeuclidean"), axis=1)[:, 3]
    np.testing.assert_allclose(ref_radii[:, 0], brute_radii, rtol=2e-3)  # fp16 rounding at most


def test_pairwise_distances_fp16_rounding_and_fp32_fallback():
    rng = np.random.default_rng(4)
    u, v = rng.normal(size=(9, 64)).astype(np.float32), rng.normal(size=(7, 64)).astype(np.float32)
    estimator = adm_metrics.ManifoldEstimator()
    exact = cdist(u, v, "sqeuclidean")
    fp16 = estimator.pairwise_distances(u, v).numpy()
    assert fp16.dtype == np.float32 and np.all(fp16 == fp16.astype(np.float16))  # fp16 values
    np.testing.assert_allclose(fp16, exact, rtol=5e-3)
    big = estimator.pairwise_distances(u * 100, v * 100).numpy()  # ||u||^2 ~ 6e5 > fp16 max
    assert big.max() > np.finfo(np.float16).max  # fp32 path
    np.testing.assert_allclose(big, exact * 1e4, rtol=1e-5)
    self_distances = estimator.pairwise_distances(u, u).numpy()
    assert self_distances.min() >= 0  # clamped at 0


# ----------------------------------------------------------------------------- Inception wrapper

def test_spatial_features_are_first_seven_channels_in_hwc_order():
    activation = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    flat = spatial_features(activation)
    assert flat.shape == (2, SPATIAL_DIM)
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (1, 0, 1, 0), (1, 16, 16, 6), (0, 5, 11, 3)]:
        assert flat[n, (h * 17 + w) * 7 + c] == activation[n, c, h, w]


def test_extractor_hooks_mixed_6d_branch1x1_and_accepts_nhwc_and_nchw(random_weights):
    extractor = InceptionFeatureExtractor(random_weights)
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pool, spatial, logits = extractor.features(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    # unbiased logits: pool_3 @ W^T, no bias
    np.testing.assert_allclose(logits, pool @ extractor.network.fc.weight.T, rtol=1e-5, atol=1e-5)
    # the spatial feature is the (BN + ReLU) output of Mixed_6d.branch1x1, reordered to HWC
    fake = torch.rand(2, 192, 17, 17)
    with mock.patch.object(extractor.network.Mixed_6d.branch1x1, "forward", lambda x: fake.clone()):
        _, hooked, _ = extractor.features(torch.from_numpy(images).permute(0, 3, 1, 2))  # NCHW input
    assert torch.equal(hooked, fake[:, :7].permute(0, 2, 3, 1).reshape(2, -1))


def test_weights_file_errors(tmp_path, random_weights):
    with pytest.raises(UserError, match="does not exist.*github.com/toshas/torch-fidelity"):
        load_inception_state_dict(tmp_path / "missing.pth")
    state = torch.load(random_weights, weights_only=True)
    wrong_classes = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(wrong_classes, tmp_path / "torchvision_like.pth")
    with pytest.raises(UserError, match=r"fc.weight has shape \(1000, 2048\)"):
        load_inception_state_dict(tmp_path / "torchvision_like.pth")
    torch.save({name: value for name, value in state.items() if "Mixed_5b" not in name}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="does not match the 2015-12-05 FID Inception layout"):
        InceptionFeatureExtractor(tmp_path / "partial.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(UserError, match="weights-only state dict"):
        load_inception_state_dict(tmp_path / "module.pth")
    for error_case in ["missing.pth", "torchvision_like.pth"]:
        with pytest.raises(UserError) as info:
            load_inception_state_dict(tmp_path / error_case)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- npz handling

def _images(count, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("arrays, message", [
    ({"images": _images(5)}, "has no arr_0"),
    ({"arr_0": _images(5).astype(np.float32)}, "dtype float32, expected uint8"),
    ({"arr_0": _images(5).transpose(0, 3, 1, 2)}, r"shape \(5, 3, 8, 8\), expected \(N, H, W, 3\)"),
    ({"arr_0": _images(3)}, "at least 4"),
    ({"arr_0": _images(5), "mu": np.zeros(2048)}, "but not sigma, mu_s, sigma_s"),
    ({"arr_0": _images(5), "mu": np.full(2048, np.nan), "sigma": np.eye(2048), "mu_s": np.zeros(2023),
      "sigma_s": np.eye(2023)}, "mu contains NaN"),
    ({"arr_0": _images(5), "mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2048),
      "sigma_s": np.eye(2023)}, r"mu_s has shape \(2048,\)"),
])
def test_bad_npz_refused_with_one_sentence(tmp_path, arrays, message):
    path = tmp_path / "batch.npz"
    np.savez(path, **arrays)
    with pytest.raises(ev.UserError, match=message) as info:
        ev.NpzBatch(path)
    assert "\n" not in str(info.value)


def test_npz_streaming_and_stored_statistics(tmp_path):
    images = _images(11, size=6)
    mu, sigma = np.arange(2048.0), np.eye(2048)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=np.ones(2023), sigma_s=np.eye(2023))
    batch = ev.NpzBatch(tmp_path / "ref.npz")
    assert np.array_equal(np.concatenate(list(batch.batches(4))), images)

    class FakeExtractor:  # deterministic features, no network
        def features(self, batch_images):
            flat = torch.from_numpy(batch_images.reshape(len(batch_images), -1)[:, :1].astype(np.float32))
            return flat.repeat(1, 2048), flat.repeat(1, 2023), flat.repeat(1, 1008)

    acts, pool_stats, spatial_stats = ev.compute_npz_statistics(batch, FakeExtractor(), batch_size=4)
    assert acts.pool.shape == (11, 2048) and np.array_equal(acts.pool[:, 0], images[:, 0, 0, 0])
    assert np.array_equal(pool_stats.mu, mu) and np.array_equal(spatial_stats.mu, np.ones(2023))
    np.savez(tmp_path / "plain.npz", arr_0=images)
    _, pool_stats, _ = ev.compute_npz_statistics(ev.NpzBatch(tmp_path / "plain.npz"), FakeExtractor(), 4)
    assert pool_stats.mu[0] == pytest.approx(images[:, 0, 0, 0].mean())


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_end_to_end_with_random_inception(tmp_path, random_weights):
    ref = _images(12, size=32, seed=6)
    # samples = 8 reference images (different order): every sample lies in a reference ball
    # (precision 1) and those 8 reference images lie in sample balls (recall >= 8/12)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=ref[[7, 3, 0, 9, 1, 11, 5, 2]], arr_1=np.arange(8))
    result = run_python(["generation/evaluate.py", tmp_path / "ref.npz", tmp_path / "samples.npz",
                         "--inception-weights", random_weights, "--batch-size", "8", "--device", "cpu"],
                        env={"OMP_NUM_THREADS": "2"}, timeout=1800)  # two 2048-d scipy sqrtm: the slow part
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    metrics = json.loads((tmp_path / "samples.metrics.json").read_text())
    for label, key in [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")]:
        assert float(lines[label]) == metrics[key]  # ADM's lines, same numbers in the JSON
        assert math.isfinite(metrics[key])
    assert metrics["precision"] == 1.0 and metrics["recall"] >= 8 / 12
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["inception_score"] >= 1.0
    assert metrics["num_samples"] == 8 and metrics["reference_statistics"] == "arr_0"


@pytest.mark.slow
def test_cli_refuses_bad_input_before_loading_anything(tmp_path, random_weights, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=_images(5))
    np.savez(tmp_path / "samples.npz", arr_0=_images(5).astype(np.float64))
    result = run_python(["-m", "generation.evaluate", tmp_path / "ref.npz", tmp_path / "samples.npz",
                         "--inception-weights", random_weights], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("generation.evaluate: error:")
    assert "expected uint8" in result.stderr and result.returncode == 2  # util.errors.EXIT_USER_ERROR
    with pytest.raises(SystemExit) as info:  # same path in-process: a missing weights file
        ev.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--inception-weights", str(tmp_path / "no.pth")])
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after the small-sample warning
    assert info.value.code == 2 and message.startswith("generation.evaluate: error: Inception weights file")
    assert "torch-fidelity/releases" in message
    assert not (tmp_path / "samples.metrics.json").exists()


# ----------------------------------------------------------------------------- reference batches

def test_statistics_accumulator_matches_np_cov():
    rng = np.random.default_rng(7)
    activations = rng.normal(loc=3.0, scale=0.5, size=(250, 40)) @ rng.normal(size=(40, 40))
    accumulator = adm_metrics.StatisticsAccumulator()
    for start in range(0, 250, 64):
        accumulator.update(activations[start:start + 64].astype(np.float32))
    streamed = accumulator.statistics()
    stacked = adm_metrics.FIDStatistics.from_activations(activations.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(streamed.mu, stacked.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.sigma, stacked.sigma, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_make_reference_batch_matches_direct_statistics(tiny_image_folder, random_weights, tmp_path, capsys):
    from scripts.make_reference_batch import main as make_reference_batch
    from util.data import center_crop_arr, build_image_folder

    output = tmp_path / "ref.npz"
    make_reference_batch(["--data-path", str(tiny_image_folder / "val"), "--image-size", "24", "--inception-weights",
                          str(random_weights), "--output", str(output), "--max-images", "5", "--arr-images", "5",
                          "--batch-size", "3", "--num-workers", "0", "--device", "cpu"])
    batch = ev.NpzBatch(output)  # a valid ADM reference batch, statistics included
    pool_stats, spatial_stats = batch.stored_statistics
    with np.load(output) as arrays:
        images, labels = arrays["arr_0"], arrays["arr_1"]
    assert images.shape == (5, 24, 24, 3) and images.dtype == np.uint8
    dataset = build_image_folder(tiny_image_folder / "val")
    used = np.sort(np.random.default_rng(0).choice(len(dataset), size=5, replace=False))
    for image, label, index in zip(images, labels, used):  # ADM crop of the seeded subset, in order
        pil, expected_label = dataset[int(index)]
        assert np.array_equal(image, np.asarray(center_crop_arr(pil, 24))) and label == expected_label
    pool, spatial, _ = InceptionFeatureExtractor(random_weights).features(images)
    direct, direct_spatial = adm_metrics.FIDStatistics.from_activations(pool.numpy()), adm_metrics.FIDStatistics.from_activations(
        spatial.numpy())
    np.testing.assert_allclose(pool_stats.mu, direct.mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool_stats.sigma, direct.sigma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spatial_stats.sigma, direct_spatial.sigma, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        make_reference_batch(["--data-path", str(tmp_path / "nowhere"), "--image-size", "24", "--inception-weights",
                              str(random_weights), "--output", str(tmp_path / "x.npz")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
