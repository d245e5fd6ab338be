"""Exported models end to end, as a user meets them: `dinoqpm export` (byte-identical on a second export), the exported
model's predictions equal to the run directory's bit for bit (Python and `dinoqpm inference`), every refusal a one-line
error, the explorer page in a real browser (headless Chromium), and the paper notebook that exports the demo model."""
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
import papermill as pm, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / 'tests' / 'artifacts'          # the browser's screenshot lands here (git-ignored)

def dinoqpm(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    return subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)

def main_in_process(*args):
    "`dinoqpm ARGS` in this process (faster than a subprocess): (exit code, stderr)."
    from dinoqpm.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(['--log-level', 'ERROR', *map(str, args)])
    return code, err.getvalue()

@pytest.fixture
def exported(smoke):
    "The session's smoke run (4 SynthBirds classes, the random test ViT; tests/conftest.py) and its export; read only."
    return smoke

def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())

def test_cli_export_is_byte_identical_and_inference_equals_the_run(exported, tmp_path):
    e = exported
    r = dinoqpm('export', '--model-path', e.run, '--out', tmp_path / 'cli_model', '--cache-root', e.cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(tmp_path / 'cli_model') == _files(e.out)
    for f in _files(e.out): assert (tmp_path / 'cli_model' / f).read_bytes() == (e.out / f).read_bytes(), f
    code, err = main_in_process('inference', '--model-path', e.run, '--image-path', e.images, '--output-json', tmp_path / 'pred_run.json')
    assert code == 0, err
    code, err = main_in_process('inference', '--model-path', tmp_path / 'cli_model', '--weights-dir', e.weights,
                                '--image-path', e.images, '--output-json', tmp_path / 'pred_export.json')
    assert code == 0, err
    keys = ('image_path', 'pred_class', 'pred_class_name', 'pred_confidence', 'topk_classes', 'topk_confidences', 'features_shown')
    a, b = (json.loads((tmp_path / f).read_text())['predictions'] for f in ('pred_run.json', 'pred_export.json'))
    assert len(a) == 4 and [{k: p[k] for k in keys} for p in a] == [{k: p[k] for k in keys} for p in b]

def test_load_pretrained_predicts_bit_for_bit(exported):
    import dinoqpm
    from dinoqpm.data import load_dataset
    from dinoqpm.share import Predictor
    e = exported
    model = dinoqpm.load_pretrained(e.out, device='cpu', weights_dir=e.weights)
    ref = Predictor(e.run, device='cpu')
    ds = load_dataset('SynthBirds', 'test', root=e.data, require_masks=False)
    x = torch.stack([model.transform(ds.load_image(i)) for i in range(len(ds))])
    got, want = model.predict(x), ref.predict(x)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.maps, want.maps)
    assert model.class_names == json.loads((e.run / 'class_names.json').read_text())
    ex = model.explain(ds.samples[0].path)
    assert ex['features'] == e.card['classes'][ex['class']]['features'] and ex['picture'].shape == (224, 224, 3)

def test_the_folder_is_hub_shaped_and_pickle_free(exported):
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    e = exported
    files = _files(e.out)
    assert {'config.json', 'model.safetensors', 'README.md', 'class_names.json', 'explanation.json', 'index.html'} <= set(files)
    for f in files:                                  # JSON, safetensors, Markdown, HTML and pictures only; no pickle
        assert f.endswith(('.json', '.safetensors', '.md', '.html', '.png', '.jpg')), f
        assert not (e.out / f).read_bytes().startswith(b'\x80'), f
    with safe_open(e.out / 'model.safetensors', 'pt') as st: assert 'head.weight' in st.keys()
    meta = ModelCard.load(e.out / 'README.md').data.to_dict()
    assert meta['library_name'] == 'dinoqpm' and 'demo' in meta['tags']
    cfg = json.loads((e.out / 'config.json').read_text())
    from dinoqpm.features import weights_fingerprint
    assert cfg['backbone']['weights_sha256'] == weights_fingerprint(next(e.weights.iterdir()))['sha256']
    assert cfg['run_config']['data']['root'] is None and str(e.root) not in (e.out / 'config.json').read_text()
    assert str(e.root) not in (e.out / 'explanation.json').read_text()          # no path of the training machine

def test_refusals_are_one_line_errors(exported, tmp_path):
    e = exported
    half = tmp_path / 'half'; half.mkdir()
    for f in ('config.json', 'dense_model.pt'): shutil.copy(e.run / f, half / f)
    code, err = main_in_process('export', '--model-path', half, '--out', tmp_path / 'x')
    assert code == 2 and 'has not finished its finetune stage' in err and len(err.splitlines()) == 1, err
    mine = tmp_path / 'mine'; mine.mkdir(); (mine / 'thesis.tex').write_text('mine')
    code, err = main_in_process('export', '--model-path', e.run, '--out', mine, '--cache-root', e.cache)
    assert code == 2 and 'not a dinoqpm export (it holds thesis.tex)' in err, err
    assert sorted(p.name for p in mine.iterdir()) == ['thesis.tex'] and (mine / 'thesis.tex').read_text() == 'mine'
    bad = Path(shutil.copytree(e.out, tmp_path / 'corrupt'))
    (bad / 'model.safetensors').write_bytes((bad / 'model.safetensors').read_bytes()[:-7])
    infer = lambda model, *extra: main_in_process('inference', '--model-path', model, '--image-path', e.images,
                                                  '--output-json', tmp_path / 'p.json', *extra)
    code, err = infer(bad, '--weights-dir', e.weights)
    assert code == 2 and 'model.safetensors is corrupt or was changed' in err, err
    empty = tmp_path / 'no_weights'; empty.mkdir()
    code, err = infer(e.out, '--weights-dir', empty)
    assert code == 2 and 'not found' in err and e.card['backbone'] in err, err
    other = tmp_path / 'other_weights'; other.mkdir()
    wf = next(e.weights.iterdir())
    (other / wf.name).write_bytes(wf.read_bytes()[:-1] + bytes([wf.read_bytes()[-1] ^ 1]))
    code, err = infer(e.out, '--weights-dir', other)
    want = json.loads((e.out / 'config.json').read_text())['backbone']['weights_sha256']
    assert code == 2 and 'not the weights this model was trained on' in err and want in err and str(other / wf.name) in err, err
    code, err = infer(e.out, '--weights-dir', e.weights, '--mode', 'dense')
    assert code == 2 and 'finetuned model only' in err, err
    code, err = main_in_process('export', '--model-path', e.run, '--out', tmp_path / 'y', '--prototypes', '0')
    assert code == 2 and '--prototypes must be at least 1' in err, err

def _browser():
    "Chromium, its driver and selenium, or skip (fail in CI, where .ci/run installs them)."
    chromium, driver = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'
    try: import selenium  # noqa: F401
    except ImportError: selenium = None
    missing = [n for n, ok in (('chromium', Path(chromium).exists()), ('chromium-driver', Path(driver).exists()),
                               ('selenium', selenium is not None)) if not ok]
    if missing:
        msg = f'{", ".join(missing)} missing (apt-get install chromium chromium-driver; pip install selenium)'
        if os.environ.get('CI'): pytest.fail(msg + '; .ci/run installs them')
        pytest.skip(msg)
    return chromium, driver

def test_explorer_in_a_real_browser(exported, tmp_path):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from dinoqpm.share import browser_flags
    e, card = exported, exported.card
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in browser_flags(tmp_path / 'profile') + ['--window-size=1400,1000']: opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get((e.out / 'index.html').as_uri())           # from the file system, no server
        body = driver.find_element(By.TAG_NAME, 'body').text
        for c in card['classes']: assert c['label'] in body, c['label']
        assert 'Demo model' in body and card['qp']['certificate'] in body
        imgs = driver.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert len(imgs) > 4 and all(ok for _, ok in imgs), [s for s, ok in imgs if not ok]
        panels = driver.find_elements(By.CSS_SELECTOR, '#compare .panel')
        assert panels and all('url(' in p.value_of_css_property('background-image') for p in panels)
        c = 2
        driver.find_element(By.CSS_SELECTOR, f'th.class-head[data-class="{c}"]').click()
        shown = [x.text for x in driver.find_elements(By.CSS_SELECTOR, '#class-features .feature-chip')]
        assert shown == [str(f) for f in card['classes'][c]['features']] and len(shown) == e.cfg.qp.n_per_class
        assert driver.find_element(By.ID, 'detail-title').text == f"Class {c}: {card['classes'][c]['label']}"
        assert len(driver.find_elements(By.CSS_SELECTOR, '#examples figure')) == len(card['classes'][c]['examples'])
        driver.save_screenshot(str(tmp_path / 'class.png'))
        f = card['features'][0]
        driver.find_element(By.CSS_SELECTOR, f'th.feature-head[data-feature="{f["id"]}"]').click()
        assert len(driver.find_elements(By.CSS_SELECTOR, '#prototypes figure')) == len(f['prototypes'])
        assert [x.text for x in driver.find_elements(By.CSS_SELECTOR, '#feature-classes .class-chip')] == \
               [card['classes'][k]['label'] for k in f['classes']]
        Select(driver.find_element(By.ID, 'sort-classes')).select_by_value('name')
        first = driver.find_element(By.CSS_SELECTOR, '#assignment tbody th.class-head').text
        assert first == sorted(c['label'] for c in card['classes'])[0]
        Select(driver.find_element(By.ID, 'cmp-a')).select_by_value('0'); Select(driver.find_element(By.ID, 'cmp-b')).select_by_value('3')
        union = set(card['classes'][0]['features']) | set(card['classes'][3]['features'])
        assert len(driver.find_elements(By.CSS_SELECTOR, '#compare .fid')) == len(union)
        driver.find_element(By.CSS_SELECTOR, f'th.class-head[data-class="{c}"]').click()
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / 'explorer.png'))
        logs = [x for x in driver.get_log('browser') if x['level'] in ('SEVERE', 'WARNING')]
        assert not logs, logs                                  # no console errors (a missing picture would be one)
    finally:
        driver.quit()

def test_run_export_notebook(tmp_path):
    "The paper notebook that `make table1` runs, in smoke mode: it trains (or reuses) the run and exports it."
    out = tmp_path / 'run_export.out.ipynb'
    pm.execute_notebook(str(ROOT / 'nbs' / 'paper' / 'run_export.ipynb'), str(out), kernel_name='python3', cwd=str(tmp_path),
                        progress_bar=False, parameters={'mode': 'smoke', 'runs_root': str(tmp_path / 'runs'),
                                                        'out_dir': str(tmp_path / 'figures')})
    model = tmp_path / 'figures' / 'demo_model'
    assert (model / 'index.html').is_file() and (model / 'model.safetensors').is_file()
    assert json.loads((model / 'explanation.json').read_text())['demo'] is True


def test_a_photo_stored_sideways_is_predicted_and_drawn_upright(exported, tmp_path):
    "A bird stored as a phone does (rotated, with EXIF orientation 6): the same prediction and pictures as the upright file."
    import numpy as np
    from PIL import Image
    from dinoqpm.share import run_inference
    up = np.asarray(Image.open(sorted(exported.images.glob('*.png'))[0]).convert('RGB'))
    (tmp_path / 'in').mkdir()
    Image.fromarray(up).save(tmp_path / 'in' / 'a_upright.png')
    exif = Image.Exif(); exif[0x0112] = 6                                  # "turn it 90 degrees clockwise to view it"
    Image.fromarray(np.ascontiguousarray(np.rot90(up, 1))).save(tmp_path / 'in' / 'b_sideways.png', exif=exif)
    rep = run_inference(exported.run, tmp_path / 'in', viz_dir=tmp_path / 'viz', batch_size=1, progress=False)   # one image a pass: no batch-position rounding
    a, b = rep['predictions']
    keys = ('pred_class', 'pred_confidence', 'topk_classes', 'topk_confidences', 'features_shown')
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    for kind in a['visualisation']:
        assert Path(a['visualisation'][kind]).read_bytes() == Path(b['visualisation'][kind]).read_bytes(), kind
