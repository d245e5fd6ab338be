"""Your own images end to end: a class-folder tree trained from the command line with and without masks, the folder
reader checked against the CUB reader (a cache of the folder copy is the CUB cache byte for byte), and bad folders
refused before any work with an error that names the file. The first training runs `python -m dinoqpm` as a user does, as
does one refusal; the other commands run `dinoqpm.cli.main` (the same code) in this process, which is faster."""
import contextlib, csv, io, json, os, shutil, subprocess, sys
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest, yaml
from PIL import Image

from dinoqpm.features import make_test_checkpoint
from dinoqpm.features import build_feature_cache, sha256_file
from dinoqpm.config import config_to_dict
from dinoqpm.data import load_dataset
from dinoqpm.data import export_cub_as_folder
from dinoqpm.pipeline import smoke_config
from dinoqpm.data import make_synthbirds


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "SynthBirds (4 classes, masks) in the CUB layout, the same images as a class-folder tree, the tiny test ViT."
    t = tmp_path_factory.mktemp('folder')
    make_synthbirds(t / 'data', n_classes=4, images_per_class=6, img_size=64, progress=False)
    make_test_checkpoint(t / 'weights')
    cub = load_dataset('SynthBirds', 'train', root=t / 'data', generate=False)
    mine = export_cub_as_folder(cub, t / 'my_birds', progress=False)
    return t, mine


def dinoqpm(*args, cwd, **env):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', **env)
    return subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def cli(monkeypatch):
    """`dinoqpm ARGS` as `dinoqpm(...)` runs it, but in this process (`dinoqpm.cli.main`, the code behind `python -m
    dinoqpm`), in `cwd` and with the environment variables `env`: an object with `returncode` and `stderr`."""
    from dinoqpm.cli import main
    def run(*args, cwd, **env):
        monkeypatch.chdir(cwd)
        for k, v in env.items(): monkeypatch.setenv(k, v)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try: code = main(['--log-level', 'WARNING', *map(str, args)])
            except SystemExit as e: code = e.code                  # argparse's own errors
        return SimpleNamespace(returncode=code, stderr=err.getvalue())
    return run


def test_folder_cache_is_the_cub_cache_byte_for_byte(world):
    t, mine = world
    kw = dict(weights_dir=t / 'weights', preprocessing='imagenet', img_size=56, progress=False)
    for split in ('train', 'test'):
        a = build_feature_cache('SynthBirds', split, 'dinov2_test_tiny', root=t / 'data', cache_root=t / 'c_cub',
                                dataset_kw={'generate': False}, **kw)
        b = build_feature_cache('folder', split, 'dinov2_test_tiny', root=mine, cache_root=t / 'c_folder', **kw)
        assert b.class_names == a.class_names and b.has_masks and a.has_masks
        for name in ('patch', 'cls', 'labels', 'masks', 'masks_dilated'):
            assert sha256_file(b.path / f'{name}.npy') == sha256_file(a.path / f'{name}.npy'), (split, name)
    assert not (mine / 'dinoqpm_cache').exists()


def _smoke_yaml(t):
    cfg = smoke_config(t / 'data', t / 'weights')
    p = t / 'smoke.yaml'
    p.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return p


def test_train_on_my_images_with_masks(world, cli):
    t, mine = world
    run = t / 'run_masks'
    r = dinoqpm('train', '--config', _smoke_yaml(t), '--data', mine, '--run-dir', run, '--cache-root', t / 'cache', cwd=t)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / 'results_finetune.json').read_text())
    assert res['dataset'] == 'folder' and 0 <= res['Accuracy'] <= 1
    assert 'plausibility' not in res['skipped'] and 0 <= res['Plausibility'] <= 1
    assert 'attribute' in res['skipped']['alignment']
    names = sorted(p.name for p in (mine / 'train').iterdir())
    assert json.loads((run / 'class_names.json').read_text()) == names
    rows = list(csv.DictReader((run / 'split.csv').open()))                 # the split this run used, image by image
    n_img = sum(1 for p in mine.rglob('*') if p.is_file() and p.relative_to(mine).parts[0] != 'masks')
    assert len(rows) == n_img and {r['split'] for r in rows} == {'train', 'test'}
    assert all(r['path'].startswith(r['split'] + '/' + r['class'] + '/') for r in rows)
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['data']['dataset'] == 'folder' and cfg['data']['root'] == str(mine.resolve())

    img = next(p for p in (mine / 'test').rglob('*') if p.is_file())
    r = cli('inference', '--model-path', run, '--image-path', img, '--output-json', t / 'pred.json',
            '--no-visualize-feature-maps', cwd=t)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = json.loads((t / 'pred.json').read_text())['predictions'][0]
    assert pred['pred_class_name'] in names

    r = cli('export', '--model-path', run, '--out', t / 'shared', '--cache-root', t / 'cache', '--prototypes', 2,
            '--examples', 1, cwd=t)                                           # a model of your images, shareable
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((t / 'shared' / 'class_names.json').read_text()) == names
    assert all(n in (t / 'shared' / 'index.html').read_text() for n in names)


def test_train_on_my_images_without_masks_and_seeded_split(world, cli):
    t, mine = world
    flat = t / 'flat_birds'                                       # one folder per class, no split, no masks
    for p in (mine / 'train').iterdir(): shutil.copytree(p, flat / p.name)
    for p in (mine / 'test').iterdir(): shutil.copytree(p, flat / p.name, dirs_exist_ok=True)
    (flat / 'README.txt').write_text('my birds')
    env = dict(DINOQPM_RUNS=str(t / 'runs'), DINOQPM_DATA=str(t / 'dataroot'))
    r = cli('train', '--config', _smoke_yaml(t), '--data', flat, '--set', 'data.test_fraction=0.25', cwd=t, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'not images' in r.stderr and 'README.txt' in r.stderr                 # the skipped file is named
    run = t / 'runs' / 'folder-flat_birds' / 'dinov2_test_tiny' / 'qpm' / '0'
    res = json.loads((run / 'results_finetune.json').read_text())
    assert 'Plausibility' not in res and 'masks/' in res['skipped']['plausibility']
    rows = list(csv.DictReader((run / 'split.csv').open()))
    per_class = {}
    for row in rows: per_class.setdefault(row['class'], []).append(row['split'])
    assert len(per_class) == 4 and all(s.count('test') == min(max(round(0.25 * len(s)), 1), len(s) - 1)
                                       for s in per_class.values())             # round(0.25 n) of every class
    assert (t / 'dataroot' / 'dinoqpm_cache' / 'folder').is_dir() and not (flat / 'dinoqpm_cache').exists()
    # the written split, copied back as split.csv, is the same dataset (the split-file layout)
    shutil.copy(run / 'split.csv', flat / 'split.csv')
    a = load_dataset('folder', 'test', root=flat, test_fraction=0.25)
    assert a.layout.layout == 'split file'
    assert [s.path for s in a.samples] == [flat / r['path'] for r in rows if r['split'] == 'test']


def _bad(t, name):
    d = t / name
    shutil.rmtree(d, ignore_errors=True)
    for c in ('a', 'b'):
        (d / c).mkdir(parents=True)
        for i in range(3): Image.new('RGB', (32, 24), (80 * i, 40, 90)).save(d / c / f'{i}.png')
    return d


def _case_missing(t): return t / 'nowhere'
def _case_one_class(t): d = _bad(t, 'one'); shutil.rmtree(d / 'b'); return d
def _case_corrupt(t): d = _bad(t, 'corrupt'); (d / 'a' / 'x.jpg').write_bytes(b'\xff\xd8 no'); return d
def _case_empty_class(t): d = _bad(t, 'emptycls'); (d / 'c').mkdir(); return d
def _case_bad_mask(t):
    d = _bad(t, 'badmask')
    for p in d.rglob('*.png'):
        (d / 'masks' / p.relative_to(d)).parent.mkdir(parents=True, exist_ok=True)
        Image.new('L', (32, 24) if p.name != '1.png' else (30, 24)).save(d / 'masks' / p.relative_to(d))
    return d
def _case_bad_split(t): d = _bad(t, 'badsplit'); (d / 'split.csv').write_text('a/0.png,train\na/9.png,test\n'); return d
def _case_bad_split_name(t): d = _bad(t, 'badsplit2'); (d / 'split.csv').write_text('path,split\na/0.png,validation\n'); return d
def _case_empty_root(t): d = t / 'emptyroot'; d.mkdir(); return d
def _case_no_test(t):
    d = _bad(t, 'notest')
    (d / 'train').mkdir()
    for c in ('a', 'b'): shutil.move(d / c, d / 'train' / c)
    (d / 'test' / 'a').mkdir(parents=True)
    shutil.copy(d / 'train' / 'a' / '0.png', d / 'test' / 'a' / '0.png')
    return d
def _case_empty_first_split_class(t):
    d = _case_no_test(t); shutil.copytree(d / 'train' / 'b', d / 'test' / 'b'); (d / 'train' / '0empty').mkdir(); return d
def _case_no_train(t):
    d = _case_no_test(t); shutil.copytree(d / 'train' / 'b', d / 'test' / 'b'); shutil.copytree(d / 'test' / 'a', d / 'test' / 'c')
    return d
def _case_missing_mask(t): d = _case_bad_mask(t); (d / 'masks' / 'b' / '2.png').unlink(); return d
def _case_orphan_mask(t): d = _case_bad_mask(t); Image.new('L', (32, 24)).save(d / 'masks' / 'a' / '1.png'); Image.new('L', (4, 4)).save(d / 'masks' / 'b' / 'gone.png'); return d
def _case_case_only(t): d = _bad(t, 'caseonly'); shutil.copytree(d / 'a', d / 'A'); return d
def _case_truncated_jpeg(t):
    d = _bad(t, 'truncjpg')
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(d / 'a' / 'x.jpg', quality=90)
    data = (d / 'a' / 'x.jpg').read_bytes(); (d / 'a' / 'x.jpg').write_bytes(data[:len(data) * 2 // 3])
    return d
def _case_decompression_bomb(t):
    import struct, zlib
    d = _bad(t, 'bomb')
    chunk = lambda k, b: struct.pack('>I', len(b)) + k + b + struct.pack('>I', zlib.crc32(k + b))
    (d / 'b' / 'big.png').write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 30000, 30000, 8, 2, 0, 0, 0))
                                      + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
    return d
def _case_one_image_per_class(t):
    d = _bad(t, 'single')
    for c in ('a', 'b'):
        for i in (1, 2): (d / c / f'{i}.png').unlink()
    return d

BAD = [(_case_missing, 'is not a folder'), (_case_one_class, 'single class folder'), (_case_corrupt, 'a/x.jpg'),
       (_case_empty_class, 'has no images'), (_case_empty_first_split_class, 'train/0empty has no images'), (_case_bad_mask, 'masks/a/1.png is 30x24'),
       (_case_bad_split, 'line 2: a/9.png is not an image'), (_case_bad_split_name, 'split must be train or test'),
       (_case_empty_root, 'no class folders'), (_case_no_test, 'b: 3 train, 0 test image(s)'),
       (_case_no_train, 'classes without a folder in'), (_case_missing_mask, 'b/2.png (expected'),
       (_case_orphan_mask, 'masks/b/gone.png belongs to no image'), (_case_case_only, 'differ only in case: A, a'),
       (_case_truncated_jpeg, 'a/x.jpg: the file is truncated'), (_case_decompression_bomb, 'b/big.png: too large to open safely'),
       (_case_one_image_per_class, 'every class needs two images or more')]

@pytest.mark.parametrize('make,expect', BAD, ids=[f.__name__[6:] for f, _ in BAD])
def test_bad_folders_are_refused_before_any_work(tmp_path, cli, make, expect):
    "Each case in this process; the corrupt image through `python -m dinoqpm`, as a user meets it."
    d = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    r = (dinoqpm if make is _case_corrupt else cli)('train', '--demo', '--data', d, '--run-dir', tmp_path / 'run', cwd=tmp_path,
                                                   DINOQPM_DATA=str(tmp_path / 'dataroot'))
    assert r.returncode == 2 and expect in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before       # nothing written



@pytest.mark.parametrize('make,name', [(_case_truncated_jpeg, 'a/x.jpg'), (_case_decompression_bomb, 'b/big.png')])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, cli, make, name):
    d = make(tmp_path)
    r = cli('train', '--demo', '--data', d, '--run-dir', tmp_path / 'run', cwd=tmp_path, DINOQPM_DATA=str(tmp_path / 'dataroot'))
    last = r.stderr.rstrip('\n').splitlines()[-1]
    assert r.returncode == 2 and last.startswith('dinoqpm train: error: folder dataset: ') and f'{d}: {name}: ' in last, r.stderr
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'dataroot').exists()

def test_moving_an_image_between_splits_makes_a_new_cache(world):
    t, mine = world
    from dinoqpm.features import samples_fingerprint
    d = t / 'moving'
    shutil.copytree(mine, d)
    before = {s: samples_fingerprint(load_dataset('folder', s, root=d)) for s in ('train', 'test')}
    img = next(p for p in (d / 'test').rglob('*') if p.is_file())
    dst = d / 'train' / img.relative_to(d / 'test')
    shutil.move(img, dst)
    m = next((d / 'masks' / 'test').rglob(img.stem + '.*'))
    shutil.move(m, d / 'masks' / 'train' / m.relative_to(d / 'masks' / 'test'))
    after = {s: samples_fingerprint(load_dataset('folder', s, root=d)) for s in ('train', 'test')}
    assert all(before[s] != after[s] for s in before)
    before = after['train']
    Image.open(dst).convert('RGB').transpose(Image.FLIP_LEFT_RIGHT).save(dst)              # an image edited in place
    os.utime(dst, ns=(10**18, 10**18))
    assert samples_fingerprint(load_dataset('folder', 'train', root=d)) != before


def test_the_set_form_of_the_issue(world, cli):
    "`dinoqpm train --set data.dataset=folder --set data.root=PATH` (here on the smoke configuration)."
    t, mine = world
    run = t / 'run_set'
    r = cli('train', '--config', _smoke_yaml(t), '--set', 'data.dataset=folder', '--set', f'data.root={mine}',
            '--run-dir', run, '--cache-root', t / 'cache', cwd=t)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / 'results_finetune.json').read_text())
    assert 'Accuracy' in res and 'Plausibility' in res


def test_folder_dataset_needs_a_root(tmp_path, cli):
    r = cli('train', '--demo', '--set', 'data.dataset=folder', cwd=tmp_path, DINOQPM_DATA=str(tmp_path / 'd'))
    assert r.returncode == 2 and 'needs data.root' in r.stderr


def test_timm_backbone_from_a_file_on_my_images(world, cli):
    "Any timm model from a local file, end to end on a folder dataset (random weights saved as .safetensors)."
    import timm
    from safetensors.torch import save_file
    t, mine = world
    f = t / 'vit_tiny.safetensors'
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f)
    run = t / 'run_timm'
    r = cli('train', '--config', _smoke_yaml(t), '--data', mine, '--set', 'backbone.name=timm:vit_tiny_patch16_224',
            '--set', f'backbone.weights_file={f}', '--set', 'data.img_size=64', '--run-dir', run,
            '--cache-root', t / 'cache', cwd=t)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / 'results_finetune.json').read_text())
    assert res['backbone'] == 'timm:vit_tiny_patch16_224' and res['paper_backbone'] is False and 'Plausibility' in res
    cache = [p for p in (t / 'cache' / 'folder').iterdir()]
    assert 'timm-vit_tiny_patch16_224' in {p.name for p in cache}
    # shared and loaded elsewhere: the backbone file is found by its recorded name in the receiver's weights folder
    from dinoqpm.share import export_model, load_pretrained
    out = export_model(run, t / 'shared_timm', cache_root=t / 'cache', n_prototypes=1, n_examples=1, explorer=False, progress=False)
    assert json.loads((out / 'config.json').read_text())['backbone']['weights_file'] == f.name
    img = next(p for p in (mine / 'test').rglob('*') if p.is_file())
    assert load_pretrained(out, weights_dir=t).explain(img)['class_name'] in json.loads((run / 'class_names.json').read_text())
