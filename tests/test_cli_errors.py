"""Every user mistake ends in one clear error, never a traceback: a table of cases, each run through the command line
(`dinoqpm.cli.main`, the code behind `python -m dinoqpm`) and checked for exit code 2, no traceback, the culprit named in
stderr, and the watched folders left exactly as they were."""
import dataclasses, errno, hashlib, json, math, os, shutil, subprocess, sys, textwrap, time, typing
from pathlib import Path
import numpy as np
import pytest, yaml

from dinoqpm.cli import main
from dinoqpm.config import RunConfig


def snapshot(*folders) -> dict:
    "Every file below `folders` with its size and SHA-256 (what 'unchanged' means; the lock's holder note aside)."
    out = {}
    for d in folders:
        for p in sorted(Path(d).rglob('*')) if Path(d).exists() else []:
            if p.is_file() and p.name != '.dinoqpm.lock': out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def cli(capsys, *argv) -> tuple:
    "Run the command line in-process; `(exit code, stderr)`."
    capsys.readouterr()
    try: code = main(['--log-level', 'WARNING', *map(str, argv)])
    except SystemExit as e: code = e.code                      # argparse's own errors
    return code, capsys.readouterr().err


@pytest.fixture
def world(smoke):
    """The session's trained smoke run (tests/conftest.py: `smoke/`), its config file `smoke.yaml`, data, weights, cache and
    a few test images (`images/`), shared by the cases; each case works on copies where it changes something."""
    return smoke.root


def copy_run(world, tmp_path) -> Path:
    shutil.copytree(world / 'smoke', tmp_path / 'run')
    return tmp_path / 'run'


def a_bird(world) -> Path:
    return sorted((world / 'images').glob('*.png'))[0]


def train_args(world, tmp_path, *extra, run=None):
    return ['train', '--config', world / 'smoke.yaml', '--run-dir', run or tmp_path / 'run', '--cache-root', world / 'cache',
            '--no-progress', *extra]


def _yaml(world, tmp_path, **over):
    cfg = yaml.safe_load((world / 'smoke.yaml').read_text())
    for k, v in over.items():
        sec, key = k.split('.')
        cfg[sec][key] = v
    p = tmp_path / 'c.yaml'; p.write_text(yaml.safe_dump(cfg))
    return p


def _bad_weights(world, tmp_path, how):
    w = tmp_path / 'weights'; shutil.copytree(world / 'weights', w)
    f = w / 'dinov2_test_tiny_pretrain.pth'
    if how == 'truncated': f.write_bytes(f.read_bytes()[:1000])
    elif how == 'pickle': _pickle(f)                             # a pickle that would run code on loading
    elif how == 'torch_pickle':                                  # the same inside torch.save's zip file
        import torch
        class Evil:
            def __reduce__(self): return (os.system, ('echo pwned > /tmp/dinoqpm_pwned',))
        torch.save({'pos_embed': torch.zeros(1), 'hook': Evil()}, f)
    else:                                                        # a checkpoint of another architecture under this name
        import torch
        torch.save({'cls_token': torch.zeros(1, 1, 8), 'pos_embed': torch.zeros(1, 5, 8)}, f)
    return ['--set', f'backbone.weights_dir={w}']


def _broken_cub(world, tmp_path, how):
    data = tmp_path / 'data'; shutil.copytree(world / 'data', data)
    a = data / 'SynthBirds' / 'CUB_200_2011'
    if how == 'classes': (a / 'classes.txt').unlink()
    else:
        p = a / 'image_class_labels.txt'; lines = p.read_text().splitlines(); lines[0] = lines[0].split()[0] + ' 99'
        p.write_text('\n'.join(lines) + '\n')
    return ['--set', f'data.root={data}', '--set', 'data.synth_classes=4', '--set', 'data.synth_images_per_class=6',
            '--set', 'data.synth_img_size=64']


# name -> (how to build the arguments, text stderr must contain); `tmp_path/run` and the shared world must not change
CASES = {
    'epochs_not_an_integer': (lambda w, t: train_args(w, t, '--set', 'dense.epochs=2.5'), "'dense.epochs': expected an integer, got '2.5'"),
    'batch_size_zero': (lambda w, t: train_args(w, t, '--set', 'dense.batch_size=0'), 'dense.batch_size=0: must be >= 1'),
    'unknown_key': (lambda w, t: train_args(w, t, '--set', 'adapter.n_layer=2'), 'adapter.n_layer'),
    'unknown_dataset': (lambda w, t: train_args(w, t, '--set', 'data.dataset=CUB2012'), "unknown dataset 'CUB2012' (data.dataset)"),
    'unknown_backbone': (lambda w, t: train_args(w, t, '--set', 'backbone.name=dinov5_vitb14'), "unknown backbone 'dinov5_vitb14'"),
    'img_size_not_a_patch_multiple': (lambda w, t: train_args(w, t, '--set', 'data.img_size=50'), 'data.img_size=50 is not a multiple of the patch size 14'),
    'invalid_yaml': (lambda w, t: ['train', '--config', (t / 'b.yaml', (t / 'b.yaml').write_text('dense: [1\n'))[0]], 'b.yaml is not valid YAML'),
    'eval_mode_bogus_train': (lambda w, t: train_args(w, t, '--eval-mode', 'bogus'), "unknown metric id(s) ['bogus']"),
    'eval_mode_bogus_evaluate': (lambda w, t: ['evaluate', '--model-path', w / 'smoke', '--eval-mode', 'bogus'], "unknown metric id(s) ['bogus']"),
    'run_dir_is_a_file': (lambda w, t: train_args(w, t, run=(t / 'afile', (t / 'afile').write_text('x'))[0]), 'afile is a file, not a folder'),
    'solver_gurobi': (lambda w, t: train_args(w, t, '--set', 'qp.solver=gurobi'), "unknown solver 'gurobi' (qp.solver)"),
    'n_per_class_too_large': (lambda w, t: train_args(w, t, '--set', 'qp.n_per_class=7'), 'qp.n_select=6: must be >= qp.n_per_class (7)'),
    'negative_time_limit': (lambda w, t: train_args(w, t, '--set', 'qp.time_limit=-1'), 'qp.time_limit=-1.0: must be > 0'),
    'too_few_distinct_sets': (lambda w, t: train_args(w, t, '--set', 'qp.n_select=3', '--set', 'qp.n_per_class=2'), '4 classes cannot each get their own set'),
    'weights_truncated': (lambda w, t: train_args(w, t, *_bad_weights(w, t, 'truncated'), '--cache-root', t / 'cache'), 'is not a readable PyTorch checkpoint'),
    'weights_of_another_architecture': (lambda w, t: train_args(w, t, *_bad_weights(w, t, 'other'), '--cache-root', t / 'cache'), 'could not be converted for vit_small_patch14_reg4_dinov2'),
    'dataset_missing_classes_txt': (lambda w, t: train_args(w, t, *_broken_cub(w, t, 'classes'), '--cache-root', t / 'cache'), 'classes.txt (expected at'),
    'dataset_label_99': (lambda w, t: train_args(w, t, *_broken_cub(w, t, 'label'), '--cache-root', t / 'cache'), 'label 99 outside the class range 1..4'),
    'inference_batch_size_zero': (lambda w, t: ['inference', '--model-path', w / 'smoke', '--image-path', w / 'images', '--output-json', t / 'o.json', '--batch-size', '0'], 'argument --batch-size: must be a positive integer'),
    'inference_top_k_zero': (lambda w, t: ['inference', '--model-path', w / 'smoke', '--image-path', w / 'images', '--output-json', t / 'o.json', '--top-k', '0'], 'argument --top-k: must be a positive integer'),
    'inference_top_k_negative': (lambda w, t: ['inference', '--model-path', w / 'smoke', '--image-path', w / 'images', '--output-json', t / 'o.json', '--top-k', '-1'], 'argument --top-k: must be a positive integer'),
    'model_path_is_backbone_weights': (lambda w, t: ['inference', '--model-path', w / 'weights' / 'dinov2_test_tiny_pretrain.pth', '--image-path', w / 'images', '--output-json', t / 'o.json'], 'looks like backbone weights'),
    'evaluate_not_a_run': (lambda w, t: ['evaluate', '--model-path', w / 'images'], 'images is not a dinoqpm run directory (it has no config.json)'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_user_mistake_is_one_clear_error(world, tmp_path, capsys, name):
    build, expect = CASES[name]
    argv = build(world, tmp_path)
    watched = (world, tmp_path / 'run')
    before = snapshot(*watched)
    code, err = cli(capsys, *argv)
    assert code == 2, (code, err)
    assert 'Traceback' not in err and expect in err, err
    assert snapshot(*watched) == before, 'the command changed files it should not have touched'
    assert not (tmp_path / 'run').exists(), 'a refused configuration wrote a run directory'




# ------------------------------------------------------------------ bad files found before any work, each in one line
def _broken_image(world, tmp_path, how):
    "A copy of the smoke run's SynthBirds with one image (or mask) truncated or replaced by a decompression bomb."
    data = tmp_path / 'data'; shutil.copytree(world / 'data', data)
    a = data / 'SynthBirds' / 'CUB_200_2011'
    split = dict(line.split() for line in (a / 'train_test_split.txt').read_text().splitlines())
    rel = next(line.split()[1] for line in (a / 'images.txt').read_text().splitlines() if split[line.split()[0]] == '0')
    f = (a / 'segmentations' / rel).with_suffix('.png') if how == 'mask' else a / 'images' / rel   # a test image: both splits are checked
    if how == 'bomb':
        import struct, zlib
        chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
        f.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 20000, 20000, 8, 2, 0, 0, 0))
                      + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
    else: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    args = ['--set', f'data.root={data}', '--cache-root', tmp_path / 'cache']
    return [*args, *[x for k in ('synth_classes', 'synth_images_per_class', 'synth_img_size')
                     for x in ('--set', f'data.{k}={getattr(_smoke_cfg(world).data, k)}')]], f


def _smoke_cfg(world):
    from dinoqpm.config import load_config
    return load_config(world / 'smoke.yaml')


BAD_FILES = {   # name -> (the files, text of the one-line refusal); the culprit's path must be named too
    'truncated_image': (lambda w, t: _broken_image(w, t, 'truncated'), 'cannot read image'),
    'truncated_mask': (lambda w, t: _broken_image(w, t, 'mask'), 'cannot read image'),
    'decompression_bomb': (lambda w, t: _broken_image(w, t, 'bomb'), 'too large to open safely'),
    'weights_malicious_pickle': (lambda w, t: (_bad_weights(w, t, 'pickle'), t / 'weights' / 'dinov2_test_tiny_pretrain.pth'),
                                 'refusing to load the weights file'),
    'weights_malicious_torch_save': (lambda w, t: (_bad_weights(w, t, 'torch_pickle'), t / 'weights' / 'dinov2_test_tiny_pretrain.pth'),
                                     "refusing to load the weights file"),
}


@pytest.mark.parametrize('name', list(BAD_FILES))
def test_bad_file_is_one_line_before_any_work(world, tmp_path, capsys, name):
    "Exit 2 with one line naming the file, before the run directory or any cache file exists, nothing else written."
    make, expect = BAD_FILES[name]
    args, culprit = make(world, tmp_path)
    before = snapshot(world, tmp_path)
    code, err = cli(capsys, *train_args(world, tmp_path, *args))
    line = err.rstrip('\n').splitlines()[-1]
    assert code == 2 and line.startswith('dinoqpm train: error: ') and expect in line and str(culprit) in line, err
    assert 'Traceback' not in err and not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()
    assert snapshot(world, tmp_path) == before and not Path('/tmp/dinoqpm_pwned').exists()


# ------------------------------------------------------------------ every setting, just outside what it accepts
def leaf_settings(cls=RunConfig, prefix=''):
    "`(dotted key, type, Allowed)` of every setting, read off the dataclasses here (not through dinoqpm's own walker)."
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]): yield from leaf_settings(hints[f.name], f'{prefix}{f.name}.')
        else: yield prefix + f.name, hints[f.name], f.metadata['allowed']


def just_outside(hint, allowed) -> list:
    """`--set` values just outside what a setting accepts: one step past each bound (the next integer, the next float),
    inf and nan for a float, an unknown choice, and what its type refuses (null where it is not optional, a fraction)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    out = [] if optional else ['null']
    if base is bool: return out + ['maybe']
    if base is str: return out + (['x' + allowed.choices[0]] if allowed.choices else [])
    down = (lambda v: v - 1) if base is int else (lambda v: math.nextafter(v, -math.inf))
    up = (lambda v: v + 1) if base is int else (lambda v: math.nextafter(v, math.inf))
    out += [down(allowed.lo)] if allowed.lo is not None else []
    out += [allowed.above] if allowed.above is not None else []
    out += [up(allowed.hi)] if allowed.hi is not None else []
    out += [allowed.below] if allowed.below is not None else []
    out += ['inf', '-inf', 'nan', '1e999'] if base is float else ['2.5', 'inf']
    return [repr(float(v)) if base is float and not isinstance(v, str) else str(v) for v in out]


def _devices_that_are_not_here() -> list:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ['gpu', 'cuda:x', f'cuda:{n}'] + ([] if n else ['cuda']) + ([] if torch.backends.mps.is_available() else ['mps'])

# settings whose values a check of their own decides: the values to try (built from the world and tmp_path)
CHECKED_BY_FUNCTION = {'device': lambda w, t: _devices_that_are_not_here()}
# free texts that a later check reads (a registry, a file): a wrong value, and what stderr names (the key, or the file)
CHECKED_LATER = {
    'data.dataset': (lambda w, t: 'CUB2012', 'data.dataset'),
    'data.root': (lambda w, t: (t / 'afile', (t / 'afile').write_text('x'))[0], 'afile'),
    'data.preprocessing': (lambda w, t: 'sharpest', 'data.preprocessing'),
    'backbone.name': (lambda w, t: 'dinov5_vitb14', 'backbone.name'),
    'backbone.weights_dir': (lambda w, t: t / 'no_weights', 'no_weights'),
    'backbone.weights_file': (lambda w, t: t / 'none.pth', 'none.pth'),
    'adapter.activation': (lambda w, t: 'swish', 'adapter.activation'),
    'adapter.feat_vec_type': (lambda w, t: 'median_pooling', 'adapter.feat_vec_type'),
    'adapter.arch_type': (lambda w, t: 'deep', 'adapter.arch_type'),
    'qp.solver': (lambda w, t: 'gurobi', 'qp.solver'),
}
SETTINGS = {key: (hint, allowed) for key, hint, allowed in leaf_settings()}


def test_every_setting_is_walked():
    "Every setting is a range (walked below), or checked by a function, or a free text with its case in CHECKED_LATER."
    later = {k for k, (_, a) in SETTINGS.items() if a.checked_by}
    assert later == set(CHECKED_LATER), later ^ set(CHECKED_LATER)
    assert {k for k, (_, a) in SETTINGS.items() if a.check} == set(CHECKED_BY_FUNCTION)
    assert all(just_outside(*SETTINGS[k]) for k in SETTINGS if k not in CHECKED_LATER | CHECKED_BY_FUNCTION.keys())
    assert {'seed', 'qp.time_limit', 'qp.mip_gap', 'dense.weight_decay', 'dense.beta_div', 'finetune.lambda_fm',
            'finetune.lambda_fv', 'data.test_fraction'} <= set(SETTINGS)


@pytest.mark.parametrize('key', list(SETTINGS))
def test_every_value_outside_its_setting_is_refused_before_any_work(world, tmp_path, capsys, key):
    """`train --set KEY=VALUE` with each value just outside what KEY accepts (and inf/nan for a float): exit 2, KEY (or
    the file it names) in stderr, no traceback, nothing written: the values are checked before any work."""
    hint, allowed = SETTINGS[key]
    if key in CHECKED_LATER:
        make, named = CHECKED_LATER[key]
        cases = [(make(world, tmp_path), named)]
    else:
        values = CHECKED_BY_FUNCTION[key](world, tmp_path) if key in CHECKED_BY_FUNCTION else just_outside(hint, allowed)
        cases = [(v, key) for v in values]
    before = snapshot(world, tmp_path)
    for value, named in cases:
        code, err = cli(capsys, *train_args(world, tmp_path, '--set', f'{key}={value}'))
        assert code == 2 and named in err and 'Traceback' not in err, (key, value, code, err)
        assert snapshot(world, tmp_path) == before and not (tmp_path / 'run').exists(), (key, value)



@pytest.mark.parametrize('entry', ['run_qpm', 'extract_caches', 'train_dense', 'finetune', 'run_baseline'])
def test_the_python_entry_points_check_every_value_first(world, tmp_path, entry):
    "The same refusal from Python, before the run directory, a cache or a model exists (here `qp.time_limit=inf`)."
    from dinoqpm.config import ConfigError, update_config
    from dinoqpm.baselines import run_baseline
    from dinoqpm.pipeline import extract_caches, run_qpm
    from dinoqpm.train import finetune, train_dense
    cfg = update_config(_smoke_cfg(world), {'qp.time_limit': 'inf', 'finetune.lambda_fm': 'nan'})
    call = {'run_qpm': lambda: run_qpm(cfg, tmp_path / 'run', cache_root=tmp_path / 'cache', progress=False),
            'extract_caches': lambda: extract_caches(cfg, cache_root=tmp_path / 'cache', progress=False),
            'train_dense': lambda: train_dense(cfg, None, None, tmp_path / 'run', progress=False),
            'finetune': lambda: finetune(cfg, None, train_cache=object(), run_dir=tmp_path / 'run', progress=False),
            'run_baseline': lambda: run_baseline(cfg, 'sldd', tmp_path / 'run', cache_root=tmp_path / 'cache', progress=False)}[entry]
    before = snapshot(world)
    with pytest.raises(ConfigError, match=r"2 invalid setting\(s\): finetune.lambda_fm=nan: must be a finite number; qp.time_limit=inf"):
        call()
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists() and snapshot(world) == before

def test_the_seed_range_is_what_numpy_scikit_learn_and_torch_take():
    "The seeds' declared bounds are exactly what their consumers accept: both ends work, one step past them fails."
    import torch
    from sklearn.utils import check_random_state
    for key in ('seed', 'data.split_seed'):
        a = SETTINGS[key][1]
        for v in (a.lo, a.hi):
            check_random_state(v); np.random.seed(v); np.random.default_rng(v); torch.manual_seed(v)
        for v in (a.lo - 1, a.hi + 1):
            with pytest.raises(ValueError): check_random_state(v)


# ------------------------------------------------------------------ damaged files of a finished run
def _truncate(p): p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
def _flip64(p):
    "64 flipped bytes inside the largest weight tensor's data (not the file's structure): a load that does not check succeeds."
    import torch
    sd = torch.load(p, weights_only=True)['model']
    t = max(sd.values(), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else 0)
    b = bytearray(p.read_bytes()); start = b.find(t.numpy().tobytes()[:256]) + 64
    assert start > 64
    for i in range(64): b[start + i] ^= 0x5A
    p.write_bytes(bytes(b))
    torch.load(p, weights_only=True)                               # still loads: only the checksum can tell
def _pickle(p):
    import pickle
    class Evil:
        def __reduce__(self): return (os.system, ('echo pwned > /tmp/dinoqpm_pwned',))
    p.write_bytes(pickle.dumps({'format': 'dinoqpm-model/1', 'x': Evil()}))

DAMAGED = {   # name -> (file in the run, how it is damaged, command, text stderr must contain)
    'finetune_model_truncated': ('finetune_model.pt', _truncate, 'evaluate', 'finetune_model.pt is truncated or damaged'),
    'finetune_model_64_flipped_bytes': ('finetune_model.pt', _flip64, 'evaluate', 'finetune_model.pt fails its checksum'),
    'finetune_model_malicious_pickle': ('finetune_model.pt', _pickle, 'inference', 'refusing to load model file'),
    'selection_npy_truncated': ('qp/selection.npy', _truncate, 'train', 'selection.npy fails its checksum'),
    'class_names_corrupt': ('class_names.json', lambda p: p.write_text('["a", '), 'inference', 'class_names.json is unreadable'),
}


@pytest.mark.parametrize('name', list(DAMAGED))
def test_damaged_file_is_named(world, tmp_path, capsys, name):
    rel, damage, command, expect = DAMAGED[name]
    run = copy_run(world, tmp_path)
    damage(run / rel)
    argv = {'evaluate': ['evaluate', '--model-path', run, '--eval-mode', 'accuracy', '--cache-root', world / 'cache', '--output-json', tmp_path / 'e.json'],
            'inference': ['inference', '--model-path', run, '--image-path', world / 'images', '--output-json', tmp_path / 'o.json'],
            'train': train_args(world, tmp_path, '--eval-mode', 'fast', run=run)}[command]
    before = snapshot(world, run)
    code, err = cli(capsys, *argv)
    assert code == 2 and 'Traceback' not in err and expect in err, (code, err)
    assert str(run / rel) in err or rel.split('/')[-1] in err
    assert snapshot(world, run) == before and not Path('/tmp/dinoqpm_pwned').exists()


# ------------------------------------------------------------------ disks and locks
@pytest.mark.parametrize('code_,expect', [(errno.ENOSPC, 'No space left on device'), (errno.EROFS, 'the file system is read-only')])
def test_full_or_read_only_disk_is_one_line(world, tmp_path, capsys, monkeypatch, code_, expect):
    "A write that fails (disk full, read-only file system) ends in one line naming the file; no temporary file is left."
    real = os.replace
    def failing(src, dst, *a, **k):
        if str(tmp_path / 'run') in str(dst): raise OSError(code_, os.strerror(code_), str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, 'replace', failing)
    code, err = cli(capsys, *train_args(world, tmp_path))
    assert code == 2 and 'Traceback' not in err and expect in err and str(tmp_path / 'run') in err, err
    assert not [p for p in (tmp_path / 'run').rglob('*') if p.name.startswith('.') and p.name != '.dinoqpm.lock']


def test_a_finished_rerun_writes_nothing(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    before = snapshot(run)
    code, err = cli(capsys, *train_args(world, tmp_path, '--eval-mode', 'fast', run=run))
    assert code == 0, err
    after = snapshot(run)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_second_writer_is_refused_naming_the_holder(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import time
        from dinoqpm.pipeline import run_dir_lock
        with run_dir_lock({str(run)!r}): print('locked', flush=True); time.sleep(120)''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        before = snapshot(run)
        code, err = cli(capsys, *train_args(world, tmp_path, run=run))
        assert code == 2 and f'is in use by another dinoqpm process (pid {holder.pid}' in err, err
        assert snapshot(run) == before
    finally: holder.kill(); holder.wait()


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    capsys.readouterr()
    code = main(['--log-level', 'DEBUG', *map(str, train_args(world, tmp_path, '--set', 'qp.solver=gurobi'))])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' in err and "unknown solver 'gurobi'" in err


def test_worker_error_names_the_image(world, tmp_path, capsys):
    "An unreadable image met by a DataLoader worker (more than one batch) is named, not 'Caught ... in worker process 0'."
    data = tmp_path / 'data'
    from dinoqpm.data import load_dataset
    load_dataset('SynthBirds', 'train', root=data, n_classes=4, images_per_class=20, img_size=64, progress=False)
    bad = sorted((data / 'SynthBirds' / 'CUB_200_2011' / 'images').rglob('*.png'))[-1]
    bad.write_bytes(b'not a png')
    code, err = cli(capsys, *train_args(world, tmp_path, '--set', f'data.root={data}', '--set', 'data.synth_images_per_class=20',
                                        '--cache-root', tmp_path / 'cache'))
    assert code == 2 and f'cannot read image {bad}' in err and 'worker process' not in err, err


def test_a_later_stage_setting_reuses_the_earlier_stages(world, tmp_path, capsys):
    "Changing a QP setting of a finished run redoes the QP and the finetune only; the old files are kept aside, not lost."
    run = copy_run(world, tmp_path)
    dense = snapshot(run / 'dense_model.pt', run / 'dense')
    old_ft = (run / 'finetune_model.pt').read_bytes()
    code, err = cli(capsys, *train_args(world, tmp_path, '--eval-mode', 'fast', '--set', 'qp.time_limit=30', run=run))
    assert code == 0, err
    assert 'qp.time_limit changed; the qp, finetune stage(s) will be redone, the earlier ones are reused' in err, err
    assert snapshot(run / 'dense_model.pt', run / 'dense') == dense                        # the dense phase was reused
    sup = list((run / 'superseded').iterdir())
    assert len(sup) == 1 and (sup[0] / 'finetune_model.pt').read_bytes() == old_ft and (sup[0] / 'qp' / 'qp_result.json').exists()
    assert json.loads((run / 'qp' / 'qp_result.json').read_text())['time_limit'] == 30.0


def test_huge_images_are_drawn_at_a_sane_size(world, tmp_path):
    "Explanations of an 3000 x 2400 photo are drawn on it shrunk to 1024 px (an 8000 x 8000 one once took 7.7 GB)."
    from PIL import Image
    from dinoqpm.share import MAX_VIZ_SIDE, run_inference
    imgs = tmp_path / 'big'; imgs.mkdir()
    Image.open(a_bird(world)).convert('RGB').resize((3000, 2400)).save(imgs / 'big.png')
    rep = run_inference(world / 'smoke', imgs, tmp_path / 'o.json', progress=False)
    for f in rep['predictions'][0]['visualisation'].values():
        assert max(Image.open(f).size) <= MAX_VIZ_SIDE * 8, f          # a feature row holds up to 8 panels side by side
    assert max(Image.open(rep['predictions'][0]['visualisation']['cam']).size) == MAX_VIZ_SIDE
