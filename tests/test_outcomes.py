"""The outcomes nobody checked before: every number and list that `dinoqpm export` writes into the explanation card, the
model card and the explorer page, and the learning rate DINOv2's linear evaluation picks, recomputed here independently
and compared. The recomputation starts from what was saved (the run's model file, its token caches, the dataset's own
CUB text files) and uses only code written in this file or in tests/reference_metrics.py: an argsort for the prototypes,
the head's non-zero entries for the assignment, plain-numpy metrics for the scores. Table 1's numbers are checked the same
way in tests/test_paper.py. Everything reads the session's smoke run and its export (tests/conftest.py)."""
import json, re
from decimal import Decimal, ROUND_HALF_UP
import numpy as np
import pytest
import torch
from PIL import Image

import reference_metrics as ref


@pytest.fixture(scope='module')
def saved(smoke):
    """What the export was made from, recomputed: the run's finetuned model file, its train and test outputs (pooled
    features, maps, logits) over the cached tokens, its head `W [C, J']` and selection, and the dataset's own records
    (`images.txt`, `image_class_labels.txt`, `train_test_split.txt`) by image id."""
    from types import SimpleNamespace
    from dinoqpm.pipeline import load_caches
    from dinoqpm.train import load_model, extract_features
    model = load_model(smoke.run / 'finetune_model.pt')
    train, test = load_caches(smoke.cfg, smoke.cache, progress=False)
    tr, te = (extract_features(model, c, with_maps=True) for c in (train, test))
    cub = smoke.data / 'SynthBirds' / 'CUB_200_2011'
    read = lambda name: dict(line.split(' ', 1) for line in (cub / name).read_text().splitlines() if line.strip())
    return SimpleNamespace(
        model=model, train=train, test=test, W=model.head_weight().detach().numpy(), sel=model.selection.numpy(),
        f_tr=tr['features'].numpy(), maps_tr=tr['maps'].numpy(), logits_tr=tr['logits'].numpy(), y_tr=tr['labels'].numpy(),
        maps_te=te['maps'].numpy(), logits_te=te['logits'].numpy(), y_te=te['labels'].numpy(), cub=cub,
        files={int(k): 'images/' + v for k, v in read('images.txt').items()},
        labels={int(k): int(v) - 1 for k, v in read('image_class_labels.txt').items()},
        is_train={int(k): v.strip() == '1' for k, v in read('train_test_split.txt').items()},
        names=json.loads((smoke.run / 'class_names.json').read_text()))


def _most_activating(f, j, n):
    "Rows of the `n` largest values of column `j` of `f`, largest first, the earlier row first among equals."
    return sorted(range(len(f)), key=lambda k: (-float(f[k, j]), k))[:n]


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _fixed(v, digits):
    "JavaScript's `v.toFixed(digits)`: the exact binary value rounded half away from zero."
    return str(Decimal(float(v)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


# ---------------------------------------------------------------- the explanation card
def test_prototypes_are_each_features_most_activating_training_images(smoke, saved):
    s, card = saved, smoke.card
    n = int(re.search(r"each feature's (\d+) training images", card['images']['prototypes_rule']).group(1))
    assert n == 5 and len(card['features']) == len(s.sel)
    assert np.allclose(s.f_tr, s.maps_tr.mean((2, 3)), atol=1e-5)     # f is the average-pooled map (the card says so)
    for j, feat in enumerate(card['features']):
        rows = _most_activating(s.f_tr, j, n)
        protos = feat['prototypes']
        assert [p['image_id'] for p in protos] == [int(s.train.image_ids[k]) for k in rows], (feat['id'], protos)
        assert [p['rank'] for p in protos] == list(range(n))
        rest = np.delete(s.f_tr[:, j], rows)
        assert all(p['activation'] >= rest.max(initial=-np.inf) - 1e-6 for p in protos)   # none of the others activates it more
        for p, k in zip(protos, rows):
            iid = p['image_id']
            assert s.is_train[iid], f'prototype image {iid} of feature {feat["id"]} is not a training image'
            assert p['file'] == s.files[iid] and p['label'] == s.labels[iid] == int(s.y_tr[k])
            assert p['class_name'] == s.names[p['label']]
            assert p['activation'] == pytest.approx(float(s.f_tr[k, j]), abs=1e-6)
            r, c = np.unravel_index(int(np.argmax(s.maps_tr[k, j])), s.maps_tr.shape[2:])
            assert (p['peak']['row'], p['peak']['col']) == (r, c), (feat['id'], p['rank'])


def test_prototype_pictures_show_the_images_they_name(smoke, saved):
    """Each prototype's patch is the window of its own training image (the image named by `file`) that the record's box
    gives: of every training image's window there, its own is the nearest to the picture."""
    s, card = saved, smoke.card
    size, view = card['images']['patch_size'], card['images']['view']
    ids = sorted(i for i, t in s.is_train.items() if t)
    squares = {i: np.asarray(Image.open(s.cub / s.files[i]).convert('RGB').resize((view, view), Image.BILINEAR), np.float64)
               for i in ids}
    for feat in card['features']:
        for p in feat['prototypes']:
            (h, w), b = p['peak']['grid'], p['box']
            cut = lambda a: a[round(b['row0'] * view / h):round(b['row1'] * view / h), round(b['col0'] * view / w):round(b['col1'] * view / w)]
            windows = {i: np.asarray(Image.fromarray(cut(a).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float64)
                       for i, a in squares.items()}
            pic = np.asarray(Image.open(smoke.out / p['patch']).convert('RGB'), np.float64)
            err = {i: float(np.abs(pic - x).mean()) for i, x in windows.items()}
            assert min(err, key=err.get) == p['image_id'] and err[p['image_id']] < 8, (p['patch'], p['image_id'], sorted(err.items(), key=lambda t: t[1])[:3])
            assert (smoke.out / p['overlay']).is_file()


def test_assignment_in_the_card_is_the_saved_head(smoke, saved):
    s, card = saved, smoke.card
    C, J = s.W.shape
    assert (card['n_classes'], card['n_selected'], card['n_features']) == (C, J, s.model.n_features)
    assert card['selected_features'] == [int(i) for i in s.sel]
    assert card['n_per_class'] == max(int((s.W[c] != 0).sum()) for c in range(C)) == smoke.cfg.qp.n_per_class
    for j, feat in enumerate(card['features']):
        assert (feat['id'], feat['position']) == (int(s.sel[j]), j)
        assert feat['classes'] == [c for c in range(C) if s.W[c, j] != 0], feat['id']
    for c, cls in enumerate(card['classes']):
        assert (cls['index'], cls['name']) == (c, s.names[c])
        assert cls['features'] == [int(s.sel[j]) for j in range(J) if s.W[c, j] != 0], c
    assert sorted({f for cls in card['classes'] for f in cls['features']}) == [f['id'] for f in card['features']]


def test_per_feature_scores_in_the_card_are_the_training_features(smoke, saved):
    "Class-Independence, Contrastiveness and Correlation of every selected feature, on the training split's pooled features."
    s, card = saved, smoke.card
    want = {'Class-Independence': ref.class_independence_per_feature(s.f_tr, s.y_tr, s.W.shape[0]),
            'Contrastiveness': ref.contrastiveness_per_feature(s.f_tr, smoke.cfg.seed),
            'Correlation': ref.correlation_per_feature(s.f_tr)}
    direction = {'Class-Independence': 'higher', 'Contrastiveness': 'higher', 'Correlation': 'lower'}
    for j, feat in enumerate(card['features']):
        assert set(feat['metrics']) == set(want)
        for m, v in want.items():
            assert feat['metrics'][m] == {'value': pytest.approx(float(v[j]), abs=1e-6), 'direction': direction[m]}, (feat['id'], m)


def test_feature_levels_in_the_card_are_the_training_maps(smoke, saved):
    """Each feature's map levels (drawn transparent at `lo`, in full colour at `hi`): `lo` the median over the training
    images of each image's median, `hi` the 0.99-quantile (linear interpolation) of each image's maximum."""
    def quantile(v, q):
        v = sorted(float(x) for x in v)
        pos = (len(v) - 1) * q
        i = int(pos)
        return v[i] + (v[min(i + 1, len(v) - 1)] - v[i]) * (pos - i)
    s, card = saved, smoke.card
    per_image = s.maps_tr.reshape(*s.maps_tr.shape[:2], -1).astype(np.float32)
    for j, feat in enumerate(card['features']):
        lo = quantile([quantile(m, 0.5) for m in per_image[:, j]], 0.5)
        hi = max(quantile(per_image[:, j].max(1), 0.99), lo + 1e-6)
        assert (feat['levels']['lo'], feat['levels']['hi']) == pytest.approx((lo, hi), abs=1e-6), feat['id']
        assert card['style']['lo'][j] == feat['levels']['lo'] and card['style']['hi'][j] == feat['levels']['hi']

def test_examples_and_comparison_images_are_the_test_predictions(smoke, saved):
    """Per class: its test images' count and accuracy; its first test images in cache order with the predicted class, its
    probability and its features; its comparison image (the most confident correct one, else the most confident)."""
    s, card = saved, smoke.card
    pred, prob = s.logits_te.argmax(1), _softmax(s.logits_te.astype(np.float64))
    n = int(re.search(r'the first (\d+) test images', card['images']['examples_rule']).group(1))
    J = s.W.shape[1]
    for c, cls in enumerate(card['classes']):
        mine = [k for k in range(len(s.y_te)) if s.y_te[k] == c]
        assert cls['n_test'] == len(mine) and cls['test_accuracy'] == pytest.approx(np.mean([pred[k] == c for k in mine]))
        assert [e['image_id'] for e in cls['examples']] == [int(s.test.image_ids[k]) for k in mine[:n]]
        for e, k in zip(cls['examples'], mine[:n]):
            p = int(pred[k])
            assert (e['label'], e['pred'], e['correct']) == (c, p, p == c) and not s.is_train[e['image_id']]
            assert e['file'] == s.files[e['image_id']]
            assert e['confidence'] == pytest.approx(prob[k, p], abs=1e-6)
            assert e['features'] == [int(s.sel[j]) for j in range(J) if s.W[p, j] != 0]
        right = [k for k in mine if pred[k] == c]
        pool = right or mine
        best = max(pool, key=lambda k: (prob[k, c], -k))
        assert cls['compare']['image_id'] == int(s.test.image_ids[best]), c
        assert (cls['compare']['pred'], cls['compare']['correct']) == (int(pred[best]), bool(pred[best] == c))


def test_model_scores_in_the_card_and_the_model_card(smoke, saved):
    """The model's scores in `explanation.json` and in README.md's tables: Accuracy on the test split, and the feature
    scores on the non-zero columns of the head, recomputed; the rest as the run's results file holds them."""
    s, card = saved, smoke.card
    rel = ref.non_zero_columns(s.W)
    f = s.f_tr[:, rel]
    want = {'Accuracy': ref.accuracy(s.logits_te, s.y_te),
            'Class-Independence': float(ref.class_independence_per_feature(f, s.y_tr, s.W.shape[0]).mean()),
            'Correlation': float(ref.correlation_per_feature(f).mean()),
            'Dependence': ref.dependence(f, s.W[:, rel], s.logits_tr.argmax(1))}
    results = json.loads((smoke.run / 'results_finetune.json').read_text())
    m = card['metrics']
    for k, v in want.items(): assert m[k]['value'] == pytest.approx(v, abs=1e-6), (k, m[k], v)
    for k, rec in m.items(): assert rec['value'] == results[k], k
    readme = (smoke.out / 'README.md').read_text()
    for k, rec in m.items():
        assert f"| {k} | {rec['value']:.4f} | {'↑' if rec['direction'] == 'higher' else '↓'} |" in readme, k
    t1 = [k for k, rec in m.items() if rec['table1']]
    head = next(i for i, line in enumerate(readme.splitlines()) if line.startswith('| Accuracy |') and 'Class-Independence' in line)
    cols = [c.strip() for c in readme.splitlines()[head].strip('|').split('|')]
    vals = [c.strip() for c in readme.splitlines()[head + 2].strip('|').split('|')]
    assert set(cols) == set(t1) and 'Accuracy' in cols
    for k, v in zip(cols, vals): assert v == f'{100 * want.get(k, m[k]["value"]):.1f}', (k, v)


# ---------------------------------------------------------------- the explorer page
def test_the_explorer_page_carries_the_card(smoke):
    page = (smoke.out / 'index.html').read_text()
    data = re.search(r'<script id="card" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data) == smoke.card


def test_the_explorer_shows_the_recomputed_numbers(smoke, saved, tmp_path, browser_paths):
    """What the page shows in a real browser, against this file's recomputation: the Table 1 scores, a class's count and
    accuracy, and for every feature (picked by its id, which differs from its position) its scores and its prototypes."""
    chromium, driver_path = browser_paths
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from dinoqpm.share import browser_flags
    s, card = saved, smoke.card
    rel = ref.non_zero_columns(s.W)
    pred = s.logits_te.argmax(1)
    scores = {'Class-Independence': ref.class_independence_per_feature(s.f_tr, s.y_tr, s.W.shape[0]),
              'Contrastiveness': ref.contrastiveness_per_feature(s.f_tr, smoke.cfg.seed),
              'Correlation': ref.correlation_per_feature(s.f_tr)}
    table1 = {'Accuracy': ref.accuracy(s.logits_te, s.y_te),
              'Class-Independence': float(ref.class_independence_per_feature(s.f_tr[:, rel], s.y_tr, s.W.shape[0]).mean())}
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in browser_flags(tmp_path / 'profile') + ['--window-size=1400,1000']: opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get((smoke.out / 'index.html').as_uri())
        head = [c.text.split(' ')[0] for c in driver.find_elements(By.CSS_SELECTOR, '#metrics tr:first-child th')][1:]
        shown = [c.text for c in driver.find_elements(By.CSS_SELECTOR, '#metrics tr:nth-child(2) td')][1:]
        assert set(table1) <= set(head)
        for k, v in table1.items(): assert shown[head.index(k)] == _fixed(100 * v, 1) + '%', (k, shown, v)
        for c in range(s.W.shape[0]):
            driver.find_element(By.CSS_SELECTOR, f'th.class-head[data-class="{c}"]').click()
            mine = s.y_te == c
            text = driver.find_element(By.CSS_SELECTOR, '#detail p').text
            assert f'{int(mine.sum())} test images, {_fixed(100 * (pred[mine] == c).mean(), 1)}% correct' in text, text
        assert any(int(i) != j for j, i in enumerate(s.sel))           # ids and positions differ: a mix-up would show
        for j, fid in enumerate(s.sel):
            driver.find_element(By.CSS_SELECTOR, f'th.feature-head[data-feature="{int(fid)}"]').click()
            names = [x.text.split(' ')[0] for x in driver.find_elements(By.CSS_SELECTOR, '#detail table.metrics th')]
            vals = [x.text for x in driver.find_elements(By.CSS_SELECTOR, '#detail table.metrics td')]
            assert dict(zip(names, vals)) == {m: _fixed(v[j], 3) for m, v in scores.items()}, (int(fid), names, vals)
            captions = [x.text for x in driver.find_elements(By.CSS_SELECTOR, '#prototypes figure div.muted')]
            want = []
            for k in _most_activating(s.f_tr, j, len(captions)):
                r, c = np.unravel_index(int(np.argmax(s.maps_tr[k, j])), s.maps_tr.shape[2:])
                want.append(f'image {int(s.train.image_ids[k])}, token ({r}, {c})')
            assert captions == want and len(captions) == 5, (int(fid), captions, want)
    finally:
        driver.quit()



# ---------------------------------------------------------------- predictions on image files
def test_predictions_name_the_predicted_class_and_its_features(smoke, saved, tmp_path):
    """`dinoqpm inference` on the exported folder: the classes ranked by probability (the model's logits on the cached
    tokens of the same images agree, up to the cache's float16), and the features shown are the predicted class's
    non-zero weights, strongest first, by their ids."""
    from dinoqpm.share import run_inference
    s = saved
    rep = run_inference(smoke.out, smoke.images, tmp_path / 'preds.json', weights_dir=smoke.weights, device='cpu', progress=False)
    id_of = {v: k for k, v in s.files.items()}
    rows = {split: {int(i): k for k, i in enumerate(c.image_ids)} for split, c in (('train', s.train), ('test', s.test))}
    logits = {'train': s.logits_tr, 'test': s.logits_te}
    assert len(rep['predictions']) == 4
    for r in rep['predictions']:
        iid = next(i for f, i in id_of.items() if f.endswith('/' + r['image_path'].rsplit('/', 1)[-1]))
        split = 'train' if s.is_train[iid] else 'test'
        prob = _softmax(logits[split][rows[split][iid]][None].astype(np.float64))[0]
        c = r['pred_class']
        assert r['topk_classes'][0] == c and r['pred_class_name'] == s.names[c]
        assert sorted(r['topk_confidences'], reverse=True) == r['topk_confidences'] and sum(r['topk_confidences']) == pytest.approx(1, abs=1e-5)
        assert sorted(r['topk_classes']) == list(range(len(s.names)))
        assert r['topk_confidences'] == pytest.approx([prob[k] for k in r['topk_classes']], abs=2e-2), (r['image_path'], prob)
        w = s.W[c]
        assert r['features_shown'] == [int(s.sel[j]) for j in sorted(np.flatnonzero(w), key=lambda j: (-abs(w[j]), j))], r
        assert r['features_shown'] == smoke.card['classes'][c]['features']

# ---------------------------------------------------------------- DINOv2's linear evaluation
def test_linear_eval_picks_its_learning_rate_on_images_it_did_not_train_on(monkeypatch):
    """Every classifier of the grid is trained on one part of the training split and judged on the rest: the rows it
    trained on (recorded as they are passed to training) and the held-out rows are disjoint, the held-out part is about
    `val_fraction` of every class, each reported validation accuracy is that classifier's accuracy on the held-out rows,
    and the chosen classifier is the first best of them."""
    from dinoqpm.baselines import linear_eval as le_module
    from dinoqpm.baselines import LinearEvalConfig, dinov2_linear_eval
    from dinoqpm.features import FeatureCache
    from dinoqpm.train import make_token_data
    torch.set_num_threads(1)
    cache = FeatureCache.from_arrays(**make_token_data(n=200, seed=3, n_classes=4, signal=0.6))
    cls = np.asarray(cache.cls, np.float32)
    labels = np.asarray(cache.labels)
    row_of = {cls[k].tobytes(): k for k in range(len(cls))}
    assert len(row_of) == len(cls)
    fits, real = {}, le_module.train_linear_classifiers
    def recording(X, y, *a, **kw):
        out = real(X, y, *a, **kw)
        fits[X.shape[1] != cls.shape[1]] = (X.clone(), y.clone(), out)
        return out
    monkeypatch.setattr(le_module, 'train_linear_classifiers', recording)
    cfg = LinearEvalConfig(iterations=60, batch_size=16, log_every=20)
    res = dinov2_linear_eval(cache, cfg, seed=0)
    assert set(fits) == {False, True}
    D = cls.shape[1]
    mean_patch = np.asarray(cache.patch, np.float32).mean(1)
    grid = {(r['avgpool'], r['base_lr']): r for r in res.grid}
    accs = []
    for avg, (X, y, out) in fits.items():
        trained = [row_of[x[:D].numpy().tobytes()] for x in X]
        assert len(set(trained)) == len(trained) and labels[trained].tolist() == y.tolist()
        held = sorted(set(range(len(cls))) - set(trained))
        assert held and (res.n_train, res.n_val) == (len(trained), len(held))
        for c in range(4):
            n_c, h_c = int((labels == c).sum()), int((labels[held] == c).sum())
            assert h_c == max(1, round(cfg.val_fraction * n_c)), (c, h_c, n_c)
        inputs = np.concatenate([cls, mean_patch], 1) if avg else cls
        if avg: assert np.allclose(X.numpy(), inputs[trained], atol=1e-6)
        for i, base_lr in enumerate(cfg.learning_rates):
            logits = inputs[held] @ out['weight'][i].numpy() + out['bias'][i].numpy()
            acc = float((logits.argmax(1) == labels[held]).mean())
            assert grid[(avg, base_lr)]['val_acc'] == pytest.approx(acc, abs=1e-9), (avg, base_lr)
            accs.append((acc, avg, base_lr, i))
    assert len({a for a, *_ in accs}) > 1                               # the choice is not decided by a tie
    best = max(accs, key=lambda t: t[0])                                # max keeps the first of equals: DINOv2's order
    assert (res.avgpool, res.lr, res.val_acc) == (best[1], best[2] * cfg.batch_size / 256, best[0])
    W = fits[best[1]][2]['weight'][best[3]]
    with torch.no_grad():
        Wm = res.model.head.linear.weight.T
        assert torch.equal(Wm, torch.cat([W[D:], W[:D]], 0) if best[1] else W)


# ---------------------------------------------------------------- QPM on a CNN trained end to end
def test_cnn_card_is_the_finetuned_cnn_on_the_unaugmented_training_images(cnn_qpm_run):
    """The export of QPM on a CNN (the session's ResNet50 run): every feature's prototypes are the training images on which
    the finetuned CNN, run here image by image on the unaugmented images (no loader, no batch), activates it most, largest
    first, each with its pooled activation and its peak cell; every feature's classes and every class's features are
    the saved head's non-zero entries."""
    from dinoqpm.pipeline import load_run_data
    from dinoqpm.train import load_model
    card = json.loads((cnn_qpm_run.export / 'explanation.json').read_text())
    model = load_model(cnn_qpm_run.run / 'finetune_model.pt')
    train, _ = load_run_data(cnn_qpm_run.cfg)
    with torch.no_grad(): maps = torch.cat([model(train.image(i)[None], model.grid).maps for i in range(len(train))]).numpy()
    f, W, sel = maps.mean((2, 3)), model.head_weight().detach().numpy(), model.selection.numpy()
    assert card['trained_end_to_end'] and card['n_features'] == 2048 and len(card['features']) == len(sel)
    for j, feat in enumerate(card['features']):
        assert feat['id'] == int(sel[j]) and feat['classes'] == [int(c) for c in np.flatnonzero(W[:, j])]
        pos = {int(i): k for k, i in enumerate(train.image_ids)}
        rows = [pos[p['image_id']] for p in feat['prototypes']]
        acts = [float(f[k, j]) for k in rows]
        assert all(a >= b - 1e-5 for a, b in zip(acts, acts[1:]))                       # largest first
        assert min(acts) >= np.delete(f[:, j], rows).max(initial=-np.inf) - 1e-5        # no other image activates it more
        for p, k in zip(feat['prototypes'], rows):
            assert p['activation'] == pytest.approx(float(f[k, j]), rel=1e-4, abs=1e-5)
            assert p['label'] == int(train.labels[k])
            r, c = np.unravel_index(int(np.argmax(maps[k, j])), maps.shape[2:])
            assert (p['peak']['row'], p['peak']['col']) == (r, c), (feat['id'], p['rank'])
    assert [c['features'] for c in card['classes']] == [[int(sel[j]) for j in np.flatnonzero(W[c])] for c in range(W.shape[0])]
