"""Metrics written from the specification (method.md §5, §13) in plain numpy, without calling dinoqpm.evaluation.metrics, so a test
can check the numbers that reach a table against an independent computation."""
import numpy as np


def accuracy(logits, labels) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def sid_at_5(maps, weight, preds, k=5) -> float:
    """SID@k: per image, the top-k features of the predicted class by signed weight, each map divided by its mean |F|
    (floor 1e-5) and spatially softmaxed; (1/k) Σ_p max_j P. Images whose class has < k non-zero weights are skipped."""
    maps, W = np.asarray(maps, np.float64), np.asarray(weight, np.float64)
    N, J = maps.shape[:2]
    F = maps.reshape(N, J, -1)
    vals = []
    for b in range(N):
        w = W[preds[b]]
        if np.count_nonzero(w) < k: continue
        top = np.argsort(-w, kind='stable')[:k]
        f = F[b, top]
        f = f / np.maximum(np.abs(f).mean(1, keepdims=True), 1e-5)
        e = np.exp(f - f.max(1, keepdims=True))
        P = e / e.sum(1, keepdims=True)
        vals.append(P.max(0).sum() / k)
    return float(np.mean(vals)) if vals else float('nan')


def plausibility_gradcam(maps, weight, preds, masks) -> float:
    """CUB segmentation overlap of the CAM: CAM = Σ_j W[ĉ, j] F_j, shifted by its minimum; the share of its mass inside the
    mask (multiplicative masking); an image whose CAM sums to 0 scores 0 but counts; mean over all images."""
    maps, W = np.asarray(maps, np.float64), np.asarray(weight, np.float64)
    N = len(maps)
    out = np.zeros(N)
    for b in range(N):
        cam = np.tensordot(W[preds[b]], maps[b], axes=(0, 0))
        cam = cam - cam.min()
        s = cam.sum()
        out[b] = (cam * np.asarray(masks[b], np.float64)).sum() / s if s > 0 else 0.0
    return float(out.mean())


def class_independence_per_feature(features, labels, n_classes) -> np.ndarray:
    """Per feature: 1 - the largest share of its mass (its values shifted so that its minimum over the images is 0) that
    falls on the images of one class (total mass floored at 1e-8)."""
    f, y = np.asarray(features, np.float64), np.asarray(labels)
    out = np.empty(f.shape[1])
    for j in range(f.shape[1]):
        v = f[:, j] - f[:, j].min()
        out[j] = 1.0 - max(v[y == c].sum() for c in range(n_classes)) / max(v.sum(), 1e-8)
    return out


def normal_overlap(m1, s1, m2, s2) -> float:
    """∫ min(N(m1, s1²), N(m2, s2²)) in closed form: the densities cross where a quadratic vanishes; between neighbouring
    crossings the smaller density is the same one, so the integral is a sum of CDF differences."""
    from scipy.stats import norm
    if m1 == m2 and s1 == s2: return 1.0
    a = 1 / (2 * s1 ** 2) - 1 / (2 * s2 ** 2)
    b = m2 / s2 ** 2 - m1 / s1 ** 2
    c = m1 ** 2 / (2 * s1 ** 2) - m2 ** 2 / (2 * s2 ** 2) - np.log(s2 / s1)
    roots = sorted(np.roots([a, b, c]).real) if a != 0 else [-c / b]
    edges = [-np.inf, *roots, np.inf]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mid = (lo + hi) / 2 if np.isfinite(lo) and np.isfinite(hi) else (hi - 1 if np.isfinite(hi) else lo + 1)
        m, s = (m1, s1) if norm.logpdf(mid, m1, s1) <= norm.logpdf(mid, m2, s2) else (m2, s2)   # logs: no underflow
        total += norm.cdf(hi, m, s) - norm.cdf(lo, m, s)
    return float(total)


def contrastiveness_per_feature(features, seed) -> np.ndarray:
    """Per feature: 1 - the overlap of the two Gaussians of a 2-component GaussianMixture (scikit-learn, `random_state=seed`)
    fitted to its values; a constant feature overlaps completely (0)."""
    import warnings
    from sklearn.mixture import GaussianMixture
    f = np.asarray(features, np.float64)
    out = np.zeros(f.shape[1])
    for j in range(f.shape[1]):
        x = f[:, j]
        if len(x) < 2 or x.max() == x.min(): continue
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            g = GaussianMixture(n_components=2, random_state=seed).fit(x[:, None])
        (m1, m2), (v1, v2) = g.means_.ravel(), g.covariances_.ravel()
        out[j] = 1.0 - normal_overlap(m1, np.sqrt(v1), m2, np.sqrt(v2))
    return out


def correlation_per_feature(features) -> np.ndarray:
    "Per feature: its largest cosine similarity (uncentred, norms floored at 1e-8) to any other feature."
    f = np.asarray(features, np.float64)
    J = f.shape[1]
    if J < 2: return np.zeros(J)
    norms = np.maximum(np.sqrt((f ** 2).sum(0)), 1e-8)
    return np.array([max(float(f[:, i] @ f[:, j]) / (norms[i] * norms[j]) for i in range(J) if i != j) for j in range(J)])


def dependence(features, weight, preds) -> float:
    """Mean over the images (those with any contribution) of the largest |f_j W[ĉ, j]| over their sum, ĉ the predicted
    class."""
    f, W = np.asarray(features, np.float64), np.asarray(weight, np.float64)
    vals = []
    for b in range(len(f)):
        contrib = np.abs(f[b] * W[preds[b]])
        if contrib.sum() > 0: vals.append(contrib.max() / contrib.sum())
    return float(np.mean(vals)) if vals else float('nan')


def non_zero_columns(weight) -> np.ndarray:
    "The columns of a head weight `[C, J]` that any class uses (the features a sparse model's metrics are computed on)."
    W = np.asarray(weight)
    return np.array([j for j in range(W.shape[1]) if any(W[c, j] != 0 for c in range(W.shape[0]))], dtype=np.int64)
