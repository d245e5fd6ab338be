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

def test_explorer_in_a_real_browser(exported, tmp_path, browser_paths):
    chromium, driver_path = browser_paths
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

# ---------------------------------------------------------------------------------------------------------------------
# The export as a transaction: locked, resumable after a kill or a full disk at any point, read only when finished.
import errno, importlib, time
EXPORT_MODULE = importlib.import_module('dinoqpm.share.export')

def _export_args(e, out, *extra):
    return ['export', '--model-path', e.run, '--out', out, '--cache-root', e.cache, '--no-progress', *extra]

def _assert_same_folder(got, want):
    "Every file of `got` (hidden ones too: no lock, pending record or temporary file may stay) has the bytes of `want`'s."
    assert _files(got) == _files(want), set(_files(got)) ^ set(_files(want))
    for f in _files(want): assert (got / f).read_bytes() == (want / f).read_bytes(), f

def _failing_write(n: int, how: str):
    """`atomic_write_bytes` whose `n`-th call fails: 'kill' and 'disk_full' leave half of the file in a temporary file, as
    a SIGKILL or ENOSPC in the middle of the write does (then raise KeyboardInterrupt or ENOSPC); 'after' finishes the
    write and is then killed."""
    from dinoqpm.core import atomic_write_bytes
    calls = []
    def write(path, data):
        calls.append(path)
        if len(calls) != n: return atomic_write_bytes(path, data)
        path = Path(path)
        if how == 'after': atomic_write_bytes(path, data)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f'.{path.name}.k1ll3d_0.tmp').write_bytes(data[:len(data) // 2])
        if how == 'disk_full': raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        raise KeyboardInterrupt
    return write

def _interrupted_export(e, out, monkeypatch, n, how, *extra):
    "`dinoqpm export` into `out`, interrupted at its `n`-th file write; returns its exit code and stderr."
    with monkeypatch.context() as m:
        m.setattr(EXPORT_MODULE, 'atomic_write_bytes', _failing_write(n, how))
        code, err = main_in_process(*_export_args(e, out, *extra))
    assert code == {'disk_full': 2}.get(how, 130) and len(err.splitlines()) == 1 and 'Traceback' not in err, (n, how, err)
    if how != 'disk_full':                         # a killed process leaves its lock file too (the kernel released the lock)
        (out / '.dinoqpm.lock').write_text(json.dumps({'pid': 999999, 'host': 'gone', 'started': '2026-01-01', 'command': 'dinoqpm export'}))
    return code, err

def test_an_export_interrupted_anywhere_ends_byte_identical_on_rerun(exported, tmp_path, monkeypatch):
    e = exported
    n_files = len(_files(e.out)) - 1                                  # the writes: pending record, every file, manifest
    points = [(1, 'disk_full'), (1, 'after'), (2, 'kill'), (n_files // 2, 'disk_full'), (n_files + 2, 'kill'), (n_files + 2, 'after')]
    for i, (n, how) in enumerate(points):
        out = tmp_path / f'out{i}'
        _interrupted_export(e, out, monkeypatch, n, how)
        finished = (n, how) == (n_files + 2, 'after')                  # the manifest is written: only the pending record is left
        if not finished:                                               # no reader trusts the folder
            code, err = main_in_process('inference', '--model-path', out, '--weights-dir', e.weights, '--image-path', e.images,
                                        '--output-json', tmp_path / 'p.json')
            began = n > 1 or how == 'after'                            # the pending record is there
            assert code == 2 and ('is an unfinished export' in err or not began) and len(err.splitlines()) == 1, (n, how, err)
        code, err = main_in_process(*_export_args(e, out))
        assert code == 0, (n, how, err)
        _assert_same_folder(out, e.out)
    # over an earlier export with more prototypes (files that are no longer part of it), killed in its third write
    out = tmp_path / 'over'
    assert main_in_process(*_export_args(e, out, '--prototypes', '7'))[0] == 0
    stale = set(_files(out)) - set(_files(e.out))
    assert stale and all(f.startswith('prototypes/') for f in stale)
    _interrupted_export(e, out, monkeypatch, 3, 'kill')
    code, err = main_in_process(*_export_args(e, out))
    assert code == 0, err
    _assert_same_folder(out, e.out)

def test_an_unfinished_export_of_another_model_is_refused_naming_it(exported, tmp_path, monkeypatch):
    e = exported
    out = tmp_path / 'half'
    _interrupted_export(e, out, monkeypatch, 5, 'kill')
    pending = out / '.dinoqpm_export_pending.json'
    rec = json.loads(pending.read_text())
    assert rec['run_dir'] == str(e.run.resolve()) and 'config.json' in rec['files'] and 'manifest.json' in rec['files']
    pending.write_text(json.dumps({**rec, 'run_dir': 'runs/other', 'model_sha256': 'f' * 64}))     # as another run would leave it
    files = lambda: {f: (out / f).read_bytes() for f in _files(out) if f != '.dinoqpm.lock'}      # the lock's holder note aside
    before = files()
    code, err = main_in_process(*_export_args(e, out))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f'{out} holds an unfinished export of another model (the run runs/other' in err and 'dinoqpm export --model-path runs/other' in err, err
    assert files() == before                                                     # nothing written, nothing removed

CHILD = '''
import sys, time
from pathlib import Path
import dinoqpm.share.export as export
load_caches = export.load_caches
def held(*a, **k):                # hold the folder's lock until the test says go (or kills this process)
    Path(sys.argv[1] + '.waiting').touch()
    while not Path(sys.argv[1]).exists(): time.sleep(0.02)
    return load_caches(*a, **k)
export.load_caches = held
from dinoqpm.cli import main
sys.exit(main(sys.argv[2:]))
'''

def test_two_concurrent_exports_the_second_is_refused_naming_the_first(exported, tmp_path):
    e, out, go = exported, tmp_path / 'model', tmp_path / 'go'
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    argv = ['--log-level', 'WARNING', *_export_args(e, out)]
    first = subprocess.Popen([sys.executable, '-c', CHILD, str(go), *map(str, argv)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (tmp_path / 'go.waiting').exists():                   # the first export is at work (it loads the caches)
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() - t0 < 300, 'the first export never started its work'
            time.sleep(0.02)
        assert f'"pid": {first.pid}' in (out / '.dinoqpm.lock').read_text()      # ... holding the folder's lock
        code, err = main_in_process(*_export_args(e, out))
        assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, err
        assert f'{out} is being written by another dinoqpm export (pid {first.pid} on ' in err, err
        assert os.listdir(out) == ['.dinoqpm.lock']                      # the refused export wrote nothing
        go.touch()                                                       # the first one finishes
        _, ferr = first.communicate(timeout=300)
        assert first.returncode == 0, ferr[-3000:]
    finally:
        if first.poll() is None: first.kill(); first.wait()
    _assert_same_folder(out, e.out)

def test_readers_refuse_an_unfinished_or_changed_export(exported, tmp_path, monkeypatch):
    import dinoqpm
    from dinoqpm.share import ExportError
    e = exported
    infer = lambda model: main_in_process('inference', '--model-path', model, '--weights-dir', e.weights, '--image-path', e.images,
                                          '--output-json', tmp_path / 'p.json')
    half = tmp_path / 'half'
    _interrupted_export(e, half, monkeypatch, 1, 'after')                 # only the pending record: not even config.json
    with pytest.raises(ExportError, match='is an unfinished export'): dinoqpm.load_pretrained(half, device='cpu', weights_dir=e.weights)
    code, err = infer(half)
    assert code == 2 and f'{half} is an unfinished export' in err and f'--model-path {e.run.resolve()} --out {half}' in err, err
    unsigned = Path(shutil.copytree(e.out, tmp_path / 'unsigned')); (unsigned / 'manifest.json').unlink()
    code, err = infer(unsigned)
    assert code == 2 and 'has no manifest.json: its export did not finish' in err, err
    changed = Path(shutil.copytree(e.out, tmp_path / 'changed'))
    proto = e.card['features'][0]['prototypes'][0]['patch']
    (changed / proto).write_bytes((changed / proto).read_bytes()[:-10])
    code, err = infer(changed)
    assert code == 2 and f'{proto} is corrupt or was changed' in err and len(err.splitlines()) == 1, err
    (changed / proto).unlink()
    code, err = infer(changed)
    assert code == 2 and f'{proto} is missing (manifest.json lists it)' in err, err
    code, err = main_in_process('evaluate', '--model-path', e.out, '--cache-root', e.cache, '--no-progress')
    assert code == 2 and f'{e.out} is an exported model (`dinoqpm export`), not a run directory' in err and len(err.splitlines()) == 1, err

def _tamper(config: dict, how: str):
    spec = config['model']['spec']
    if how == 'format_as_string': config['dinoqpm_export_format'] = str(config['dinoqpm_export_format'])
    elif how == 'no_model': del config['model']
    elif how == 'hidden_1e9': spec['adapter']['hidden'] = 1e9
    elif how == 'n_features_10_9': spec['adapter']['n_features'] = 10 ** 9
    elif how == 'n_features_other': spec['adapter']['n_features'] *= 4
    elif how == 'unknown_backbone': config['backbone']['name'] = 'no_such_backbone'
    elif how == 'run_config_bad': config['run_config']['seed'] = 'zero'
    elif how == 'preprocessing_bad': config['preprocessing']['mode'] = 'bogus'

TAMPERED = {'format_as_string': "'dinoqpm_export_format' must be an integer, got '2'",
            'no_model': "'model' is missing",
            'hidden_1e9': "'model.spec.adapter.hidden' must be an integer, got 1000000000.0",
            'n_features_10_9': "'model.spec.adapter.n_features' is 1000000000; it must be from 0 to 65536",
            'n_features_other': "'model.spec' does not describe",
            'unknown_backbone': "'backbone.name': unknown backbone 'no_such_backbone'",
            'run_config_bad': "'run_config': config key 'seed'",
            'preprocessing_bad': "'preprocessing': unknown preprocessing 'bogus'"}

@pytest.mark.parametrize('how', sorted(TAMPERED))
def test_a_tampered_config_is_one_line_naming_the_key(exported, tmp_path, how):
    "Each change is signed into the manifest too (as a careful tamperer would), so that the configuration's own check speaks."
    from dinoqpm.share import export_manifest
    e = exported
    bad = Path(shutil.copytree(e.out, tmp_path / 'bad'))
    config = json.loads((bad / 'config.json').read_text())
    _tamper(config, how)
    (bad / 'config.json').write_text(json.dumps(config))
    listed = json.loads((bad / 'manifest.json').read_text())['files']
    (bad / 'manifest.json').write_text(json.dumps(export_manifest(bad, listed)))
    code, err = main_in_process('inference', '--model-path', bad, '--weights-dir', e.weights, '--image-path', e.images,
                                '--output-json', tmp_path / 'p.json')
    assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert f"{bad / 'config.json'}: key {TAMPERED[how]}" in err, err

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
