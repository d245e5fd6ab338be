"""Golden and cross-check tests of dinoqpm.evaluation.metrics / explain / evaluate that do not fit in the notebooks.

The `_ref_*` functions restate the authors' metric code (method.md §5, §13: `MultiKCrossChannelMaxPooledSum` with
`SumNMax`, `CUBSegmentationOverlapAccumulator`, `ClassIndependenceAccumulator`, `get_correlation`) as literal per-image
torch loops, so that our vectorised numpy versions are checked against the formulas on random, signed inputs.
"""
import json, math, tempfile
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from dinoqpm.evaluation import metrics as M
from dinoqpm.evaluation import evaluate_arrays, resolve_eval_mode
from dinoqpm.core import json_safe as _json_safe
from dinoqpm.core import atomic_write_json
from dinoqpm.data import resize_mask_uint8, dilate_mask as data_dilate_mask


# ---------------------------------------------------------------- reference restatements
def _ref_sid(maps, W, logits, k):
    maps, W, logits = torch.as_tensor(maps).float(), torch.as_tensor(W).float(), torch.as_tensor(logits).float()
    B, J = maps.shape[:2]
    fm = maps / torch.clamp(maps.abs().mean((2, 3), keepdim=True), min=1e-5)
    fm = torch.softmax(fm.reshape(B, J, -1), 2)
    top = logits.argmax(1)
    keep = torch.count_nonzero(W, 1)[top] >= k
    if keep.sum() == 0: return math.nan
    idx = W[top].topk(k)[1][keep]
    sub = torch.gather(fm[keep], 1, idx.unsqueeze(2).repeat(1, 1, fm.shape[2]))
    return float(sub.max(1)[0].sum() / k / keep.sum())


def _ref_overlap(maps, W, logits, masks):
    maps, W, logits = torch.as_tensor(maps).float(), torch.as_tensor(W).float(), torch.as_tensor(logits).float()
    sums = dict.fromkeys(M.PLAUSIBILITY_VARIANTS, 0.0)
    for fmap, gt, c in zip(maps, masks, logits.argmax(1)):
        w = W[c]
        cam = (w[:, None, None] * fmap).sum(0)
        cam = cam - cam.min()
        mask = torch.as_tensor(gt).float()
        mdil = torch.as_tensor(binary_dilation(gt, np.ones((3, 3)), border_value=0)).float()
        if cam.sum() > 0:
            sums['gradcam'] += float((cam * mask).sum() / cam.sum()); sums['gradcam_dilated'] += float((cam * mdil).sum() / cam.sum())
        if cam.max() > 0:
            sums['gradcam_max'] += float((cam * mask).max() / cam.max()); sums['gradcam_max_dilated'] += float((cam * mdil).max() / cam.max())
        sel = w != 0
        if sel.sum() > 0:
            f = fmap[sel]
            fmax = f.amax((1, 2))
            s, sd = torch.zeros(len(f)), torch.zeros(len(f))
            v = fmax != 0                      # the authors: feat_map.max() / ... if feat_map.max() != 0 else 0
            s[v] = (f * mask).amax((1, 2))[v] / fmax[v]
            sd[v] = (f * mdil).amax((1, 2))[v] / fmax[v]
            sums['max'] += float(s.mean()); sums['max_dilated'] += float(sd.mean())
    return {k: v / len(maps) for k, v in sums.items()}


def _ref_class_independence(features, labels, n_classes, batch=100):
    f_all, y_all = torch.as_tensor(features).float(), torch.as_tensor(labels)
    sums, counts, gsum, fmin, n = torch.zeros(n_classes, f_all.shape[1]), torch.zeros(n_classes), torch.zeros(f_all.shape[1]), None, 0
    for s in range(0, len(f_all), batch):
        f, y = f_all[s:s + batch], y_all[s:s + batch]
        bmin = f.min(0, keepdim=True)[0]
        fmin = bmin if fmin is None else torch.min(fmin, bmin)
        for c in range(n_classes):
            sums[c] += f[y == c].sum(0); counts[c] += (y == c).sum()
        gsum += f.sum(0); n += len(f)
    shifted = sums - fmin * counts[:, None]
    gshift = gsum - fmin.squeeze() * n
    prop = shifted / torch.clamp(gshift, min=1e-8)
    prop[counts == 0] = 0
    return 1 - float(prop.max(0)[0].mean())


# ---------------------------------------------------------------- cross-checks on random data
@pytest.fixture
def rng(): return np.random.default_rng(7)


def _random_head(rng, C, J, per_class):
    W = np.zeros((C, J), np.float32)
    for c in range(C): W[c, rng.choice(J, per_class[c], replace=False)] = 1
    return W


@pytest.mark.parametrize('k', [1, 3, 5])
def test_sid_matches_reference_formula(rng, k):
    N, C, J = 30, 6, 12
    maps = rng.normal(size=(N, J, 5, 5)).astype(np.float32) * rng.random((N, J, 1, 1)).astype(np.float32) * 4
    W = _random_head(rng, C, J, [5, 5, 4, 6, 2, 5])          # some classes have fewer than k features
    W[3] *= rng.random(J).astype(np.float32) * 2 - 0.5        # one class with signed real weights
    logits = rng.normal(size=(N, C))
    assert M.sid_at_k(maps, W, logits, k) == pytest.approx(_ref_sid(maps, W, logits, k), abs=1e-5)


def test_sid_nan_where_reference_reports_zero(rng):
    W = _random_head(rng, 3, 8, [2, 3, 4])
    maps = rng.random((5, 8, 3, 3))
    assert math.isnan(_ref_sid(maps, W, rng.normal(size=(5, 3)), 5))
    assert math.isnan(M.sid_at_k(maps, W, rng.integers(0, 3, 5), 5))


def test_sid_range_and_extremes(rng):
    for _ in range(20):
        v = M.sid_per_image(rng.normal(size=(10, 7, 4, 4)) * 3, rng.normal(size=(3, 7)), rng.integers(0, 3, 10), k=4)
        assert np.all(v >= 0.25 - 1e-12) and np.all(v <= 1 + 1e-12)
    one_hot = np.zeros((1, 5, 16, 16)); one_hot[0, range(5), range(5), range(5)] = 1
    assert M.sid_at_k(one_hot, np.ones((1, 5)), [0]) == pytest.approx(1.0, abs=1e-12)
    assert M.sid_at_k(np.ones((1, 5, 16, 16)), np.ones((1, 5)), [0]) == pytest.approx(0.2, abs=1e-12)


def test_segmentation_overlap_matches_reference_formula(rng):
    N, C, J, h = 25, 5, 9, 6
    maps = rng.normal(size=(N, J, h, h)) + 0.3                      # signed maps: masking before the max matters
    maps[3] = 0                                                     # an all-zero CAM scores 0 and still counts
    W = _random_head(rng, C, J, [5, 5, 5, 3, 9]).astype(np.float64)
    W[1] *= rng.normal(size=J)                                      # a signed real-valued class
    logits = rng.normal(size=(N, C))
    masks = rng.random((N, h, h)) < 0.35
    ours = M.plausibility_scores(maps, W, logits, masks)
    ref = _ref_overlap(maps, W, logits, masks)
    for v in M.PLAUSIBILITY_VARIANTS:
        assert ours[v].mean() == pytest.approx(ref[v], abs=1e-5), v


def test_class_independence_matches_batched_reference(rng):
    f = rng.normal(size=(250, 7)) * rng.random(7) + rng.normal(size=7)
    f[:, 2] = 4.0                                                   # a dead feature
    y = rng.integers(0, 5, 250)
    assert M.class_independence(f, y, 6) == pytest.approx(_ref_class_independence(f, y, 6), abs=1e-5)


def test_class_independence_affine_invariance(rng):
    f, y = rng.random((80, 5)), rng.integers(0, 4, 80)
    g = f * np.array([1, 3, 0.2, 10, 1]) + np.array([0, -5, 7, 1, 100])
    assert M.class_independence(f, y) == pytest.approx(M.class_independence(g, y), abs=1e-9)


def test_correlation_shift_dependence(rng):
    f = rng.random((50, 4))
    # cosine is scale-invariant but not shift-invariant (the authors use raw, uncentred features)
    assert M.correlation(f * np.array([2, 3, 4, 5])) == pytest.approx(M.correlation(f), abs=1e-12)
    assert abs(M.correlation(f - f.mean(0)) - M.correlation(f)) > 0.05


def test_contrastiveness_bimodal_vs_unimodal(rng):
    on_off = np.where(rng.random((600, 4)) < 0.5, 3.0, 0.0) + rng.normal(0, 0.02, (600, 4))
    assert M.contrastiveness(on_off, seed=1) > 0.98
    assert M.contrastiveness(rng.normal(size=(600, 30)), seed=1) < 0.75     # a Gaussian: two overlapping halves, ~0.55
    assert M.gmm_overlap(np.full(10, 2.5)) == 1.0


def _sklearn_means_variances(x, seed):
    import warnings
    from sklearn.mixture import GaussianMixture
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        g = GaussianMixture(n_components=2, random_state=seed).fit(np.asarray(x, np.float64)[:, None])
    return g.means_.ravel(), g.covariances_.ravel()


@pytest.mark.parametrize('n,seed', [(2, 0), (7, 3), (295, 0), (600, 1)])
def test_gaussian_pairs_are_sklearns_fits(rng, n, seed):
    """`fit_gaussian_pairs` (many features at once) gives sklearn's own GaussianMixture(2, random_state=seed) means and
    variances for every feature: Gaussian, ReLU'd, rounded (ties), rarely-on, heavy-tailed; more columns than one block
    and more samples than one of sklearn's k-means chunks (256); a constant column gives NaN."""
    X = np.concatenate([rng.normal(size=(n, 90)), np.maximum(rng.normal(size=(n, 90)) * rng.uniform(0.1, 3, 90), 0),
                        np.round(rng.normal(size=(n, 60)) * 2), (rng.random((n, 40)) < 0.03) * 1.0,
                        np.clip(rng.standard_t(3, size=(n, 40)) + (rng.random((n, 40)) < 0.3) * 4, 0, 6), np.ones((n, 1))], 1)
    mu, var = M.fit_gaussian_pairs(X, seed, chunk=128)
    for j in range(X.shape[1]):
        if np.ptp(X[:, j]) == 0: assert np.isnan(mu[:, j]).all(); continue
        m, v = _sklearn_means_variances(X[:, j], seed)
        np.testing.assert_allclose(mu[:, j], m, rtol=1e-9, atol=1e-12, err_msg=f'feature {j}')
        np.testing.assert_allclose(var[:, j], v, rtol=1e-9, atol=1e-12, err_msg=f'feature {j}')


def test_gaussian_pairs_hand_a_column_to_sklearn_where_kmeans_empties_a_cluster(rng, monkeypatch):
    """Where sklearn's k-means would relocate an empty cluster (not reproduced), that column is fitted by sklearn itself."""
    X = rng.normal(size=(50, 3))
    labels, ok = M._kmeans_labels(X, 0)
    assert ok.all()
    monkeypatch.setattr(M, '_kmeans_labels', lambda x, seed: (np.zeros(x.shape, np.int64), np.array([True, False, True])))
    mu, var = M.fit_gaussian_pairs(X, 0)
    m, v = _sklearn_means_variances(X[:, 1], 0)
    np.testing.assert_allclose(mu[:, 1], m, rtol=1e-12)            # the fallback's own fit
    assert not np.allclose(mu[:, 0], _sklearn_means_variances(X[:, 0], 0)[0])      # the others: from the (bad) labels given


def test_structural_grounding_any_class_count(rng):
    for C in (3, 7, 25):
        A = rng.random((C, 10))
        assert M.structural_grounding(A, A) == pytest.approx(1.0, abs=1e-12)   # a head with the attributes as rows
        W = _random_head(rng, C, 30, [5] * C)
        assert np.isfinite(M.structural_grounding(W, A))


# ---------------------------------------------------------------- mask conventions
def test_resize_mask_point_sampling_example():
    # a soft 64x64 ellipse: the cv2 rule keeps fewer cells than any-coverage
    yy, xx = np.mgrid[:64, :64]
    ell = np.clip(300 * (1 - ((yy - 31.5) / 22) ** 2 - ((xx - 31.5) / 28) ** 2), 0, 255).astype(np.uint8)
    any_cov = (ell.reshape(16, 4, 16, 4) > 0).any((1, 3)).sum()
    point = M.resize_mask(ell, (16, 16)).sum()
    assert point < any_cov
    # exactly the pixels 4d+1 and 4d+2 are looked at
    m = np.zeros((64, 64), np.uint8); m[1::4, :] = 255
    assert M.resize_mask(m, (16, 16)).all()
    m = np.zeros((64, 64), np.uint8); m[0::4, :] = 255; m[3::4, :] = 255
    assert not M.resize_mask(m, (16, 16)).any()


def test_resize_mask_matches_opencv_when_available(rng):
    import cv2   # a dev requirement: the reference computes its masks with OpenCV
    for t in range(300):
        H, W = rng.integers(16, 520, 2)
        img = (rng.integers(0, 3, (H, W)) if t % 2 else rng.integers(0, 256, (H, W))).astype(np.uint8)
        h, w = (16, 16) if t % 3 else tuple(rng.integers(4, int(min(H, W)), 2))
        ref = cv2.resize(img, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_mask_uint8(img, (int(h), int(w))), ref)
        np.testing.assert_array_equal(M.resize_mask(img, (int(h), int(w))), ref > 0)


def test_dilation_agrees_with_the_cache(rng):
    m = rng.random((5, 9, 7)) < 0.15
    np.testing.assert_array_equal(M.dilate_mask(m), np.stack([data_dilate_mask(x) for x in m]))


def test_plausibility_dilation_conventions():
    maps = np.zeros((1, 1, 4, 4)); maps[0, 0, 1, 2] = 1.0                    # the CAM peak sits next to the mask
    mask = np.zeros((1, 4, 4), bool); mask[0, 1, 1] = True
    assert M.plausibility(maps, [[1.]], [0], mask, 'gradcam') == 0.0
    assert M.plausibility(maps, [[1.]], [0], mask, 'gradcam_dilated') == 1.0   # grown by one patch it covers the peak
    # given dilated masks are used as they are (no second dilation)
    assert M.plausibility(maps, [[1.]], [0], mask, 'gradcam_dilated', masks_dilated=mask) == 0.0
    # float16 maps (as evaluate keeps them for very large runs) give the same numbers to ~1e-3
    r = np.random.default_rng(0).random((10, 3, 4, 4))
    m = np.random.default_rng(1).random((10, 4, 4)) < 0.5
    assert M.plausibility(r.astype(np.float16), np.ones((2, 3)), np.zeros(10, int), m) == pytest.approx(
        M.plausibility(r, np.ones((2, 3)), np.zeros(10, int), m), abs=2e-3)


def test_part_faithfulness_at_image_resolution_non_integer_scale():
    # 50x50 label image on a 4x4 grid: cells are 12.5 px; the part covers pixels 38..49 -> row/col 3
    lab = np.zeros((50, 50), int); lab[38:, 38:] = 3
    cells = M.part_cells(lab, (4, 4), 3)
    assert cells.sum() == 1 and cells[3, 3]
    maps = np.zeros((2, 2, 4, 4)); maps[0, 0, 3, 3] = 1; maps[1, 1, 0, 0] = 1
    W = np.array([[1., 0.], [0., 1.]])
    assert M.part_faithfulness(maps, W, [lab, lab], [(0, 1, 3)], [0, 1]) == 0.5


# ---------------------------------------------------------------- evaluate_arrays bookkeeping
def test_evaluate_arrays_json_nan_to_null_and_reasons(rng):
    W = _random_head(rng, 3, 6, [2, 2, 2])                         # "Compact": < 5 features, SID@5 undefined
    maps = rng.random((9, 6, 4, 4))
    res = evaluate_arrays(train_features=rng.random((12, 6)), train_labels=np.arange(12) % 3, test_logits=rng.normal(size=(9, 3)),
                          test_labels=np.arange(9) % 3, test_maps=maps, weight=W, dataset='StanfordCars', eval_mode='all')
    assert math.isnan(res['SID@5']) and '>= 5' in res['skipped']['sid']
    assert res['skipped']['plausibility'] == 'dataset StanfordCars has no segmentation masks'
    with tempfile.TemporaryDirectory() as d:
        p = atomic_write_json(Path(d) / 'r.json', _json_safe(res))
        js = json.loads(p.read_text())                             # strict JSON: no NaN tokens
        assert js['SID@5'] is None and js['NFfeatures'] == len(M.relevant_features(W))


def test_eval_mode_aliases():
    assert resolve_eval_mode(['cub_segmentation_overlap', 'diversity']) == ('sid', 'plausibility')


# ---------------------------------------------------------------- evaluate end to end on SynthBirds
def test_evaluate_synthbirds_writes_complete_json(tmp_path):
    """A tiny SynthBirds (6 classes, 2 designed pairs), the tiny random DINOv2, cached tokens, a dense adapter trained for
    3 epochs and a QPM-style binary head with 5 features per class: `evaluate` must write every metric, none skipped."""
    import copy
    from dataclasses import replace
    from dinoqpm.data import load_dataset
    from dinoqpm.features import make_test_checkpoint
    from dinoqpm.features import build_feature_cache
    from dinoqpm.config import RunConfig, AdapterConfig, DENSE_DEFAULTS
    from dinoqpm.train import train_dense, compute_feature_stats, save_model
    from dinoqpm.model import SparseBLDDHead
    from dinoqpm.evaluation import evaluate
    make_test_checkpoint(tmp_path / 'w')
    load_dataset('SynthBirds', 'train', root=tmp_path, n_classes=6, images_per_class=6, img_size=128, progress=False)
    kw = dict(root=tmp_path, weights_dir=tmp_path / 'w', img_size=112, batch_size=8, progress=False)
    tr = build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', **kw)
    te = build_feature_cache('SynthBirds', 'test', 'dinov2_test_tiny', **kw)
    cfg = RunConfig(seed=0, device='cpu', adapter=AdapterConfig(n_layers=1, hidden=32, n_features=10),
                    dense=replace(DENSE_DEFAULTS, epochs=3, batch_size=8, lr=1e-2))
    dense, _ = train_dense(cfg, tr, te, progress=False)
    mu, sd = compute_feature_stats(dense, tr)
    W = torch.zeros(6, 10)
    for c in range(6): W[c, torch.randperm(10, generator=torch.Generator().manual_seed(c))[:5]] = 1
    sel = W.sum(0).nonzero().flatten()
    sparse = copy.deepcopy(dense).set_sparse_head(SparseBLDDHead(sel, W[:, sel], mu, sd))
    save_model(sparse, tmp_path / 'model.pt')
    res = evaluate(tmp_path / 'model.pt', tr, te, data_root=tmp_path, output_json=tmp_path / 'r.json', seed=3)
    js = json.loads((tmp_path / 'r.json').read_text())
    keys = ['Accuracy', 'SID@5', 'Class-Independence', 'Contrastiveness', 'Correlation', 'Structural Grounding', 'alignment',
            *[f'CUBSegmentationOverlap_{v}' for v in M.PLAUSIBILITY_VARIANTS], 'pooling_baseline_ratio', 'avg_pool_accuracy',
            'max_pool_accuracy', 'NFfeatures', 'PerClass', 'Plausibility', 'Dependence', 'PartFaithfulness', 'PartFaithfulness_chance']
    missing = [k for k in keys if js.get(k) is None]
    assert not missing and js['skipped'] == {}, (missing, js['skipped'])
    assert (js['dataset'], js['backbone'], js['paper_backbone'], js['seed'], js['head']) == ('SynthBirds', 'dinov2_test_tiny', False, 3, 'bldd')
    assert js['model'] == str(tmp_path / 'model.pt') and js['provenance']['git_commit']
    assert len(js['details']['PartFaithfulness']) == 2                       # 6 classes -> 2 designed pairs
    assert js['PerClass'] == 5.0 and js['NFfeatures'] == len(sel)
    assert res['avg_pool_accuracy'] == pytest.approx(res['Accuracy'])       # avg pooling: the baseline is the model itself
