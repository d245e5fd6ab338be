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
