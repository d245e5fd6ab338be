"""Feature cache beyond the notebook: a real SIGKILL in the middle of a chunk, concurrent builders, stale caches."""
import json, os, subprocess, sys, textwrap, threading, time
from pathlib import Path
import numpy as np
import pytest
from dinoqpm.features import backbone as B
from dinoqpm.features import cache as C
from dinoqpm.data import load_dataset

ARRAYS = ('patch', 'cls', 'labels', 'image_ids', 'masks', 'masks_dilated')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('cache')
    data, weights = d / 'data', d / 'weights'
    load_dataset('SynthBirds', 'train', root=data, n_classes=3, images_per_class=8, img_size=96, progress=False)
    B.make_test_checkpoint(weights, seed=2)
    kw = dict(root=data, weights_dir=weights, img_size=70, batch_size=2, chunk_size=4, progress=False, num_workers=0)
    ref = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=d / 'ref', **kw)
    return d, kw, ref


def same(a, b):
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None: assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f'{name} differs'


KILLER = '''
import os, signal, sys
from pathlib import Path
import dinoqpm.features.backbone as B
from dinoqpm.features import build_feature_cache
calls = [0]
orig = B.FrozenBackbone.forward
def forward(self, x):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]): os.kill(os.getpid(), signal.SIGKILL)   # dies in the middle of a chunk
    return orig(self, x)
B.FrozenBackbone.forward = forward
kw = {KW}
build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=Path(sys.argv[1]), **kw)
'''


def _killer_script(kw):
    return KILLER.replace('{KW}', repr({k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}))


@pytest.mark.parametrize('kill_at_call', [4])   # batch 4 = images 6-7: images 4-5 of that chunk are written, not yet recorded
def test_sigkill_mid_chunk_then_resume_gives_identical_arrays(setup, kill_at_call):
    d, kw, ref = setup
    root = d / f'killed{kill_at_call}'
    r = subprocess.run([sys.executable, '-c', _killer_script(kw), str(root), str(kill_at_call)], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert r.returncode == -9, r.stderr[-2000:]
    partial = ref.path.relative_to(d / 'ref')
    partial = root / partial.parent / f'{partial.name}.partial'
    chunks = sorted(int(p.name) for p in (partial / C.CHUNKS_DIR).iterdir())
    assert chunks == list(range((kill_at_call - 1) * 2 // 4))  # only whole flushed chunks count as done
    done = 4 * len(chunks)
    assert not (partial.parent / ref.path.name).exists()
    res = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=root, **{**kw, 'batch_size': 3})
    assert res.manifest['extraction']['resumed_at'] == done
    assert res.manifest['extraction']['batch_size'] == 2      # the interrupted run's batch size is kept
    same(res, ref)


def test_partial_of_another_key_is_not_reused(setup, tmp_path):
    d, kw, ref = setup
    C.save_feature_cache(ref, tmp_path / 'x')  # any folder
    partial = tmp_path / 'x' / 'train.partial'
    partial.mkdir()
    (partial / C.PROGRESS_FILE).write_text(json.dumps(dict(key_hash='deadbeef', n=1, grid=[1, 1], embed_dim=1, batch_size=1, chunk_size=1, done=1)))
    ds = load_dataset('SynthBirds', 'train', root=kw['root'], transform=__import__('dinoqpm.data', fromlist=['x']).make_transform('paper', 'SynthBirds', 70))
    bb = B.create_backbone('dinov2_test_tiny', weights_dir=kw['weights_dir'], img_size=70)
    res = C.extract_tokens(ds, bb, tmp_path / 'x' / 'train', key=ref.manifest['key'], batch_size=2, chunk_size=4, progress=False, num_workers=0)
    assert res.manifest['extraction']['resumed_at'] == 0
    same(res, ref)


def test_flipped_byte_is_detected_and_rebuilt(setup):
    d, kw, ref = setup
    root = d / 'flip'
    fc = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=root, **kw)
    with open(fc.path / 'patch.npy', 'r+b') as f:
        f.seek(-7, 2); c = f.read(1); f.seek(-7, 2); f.write(bytes([c[0] ^ 0x10]))
    with pytest.raises(C.StaleCacheError, match='patch.npy: checksum mismatch'): C.open_feature_cache(fc.path)
    C.open_feature_cache(fc.path, verify='quick')   # the quick check only looks at headers and sizes
    same(C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=root, **kw), ref)
    C.open_feature_cache(fc.path, key=ref.manifest['key'])


def test_key_follows_weights_and_settings(setup, tmp_path):
    d, kw, ref = setup
    assert ref.manifest['key']['weights']['sha256'] == C.sha256_file(Path(kw['weights_dir']) / 'dinov2_test_tiny_pretrain.pth')
    B.make_test_checkpoint(tmp_path, seed=5)      # other weights -> another key, another folder
    other = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=d / 'ref', **{**kw, 'weights_dir': tmp_path})
    assert other.path != ref.path and other.path.parent.parent == ref.path.parent.parent
    assert not np.array_equal(np.asarray(other.patch), np.asarray(ref.patch))
    imnet = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=d / 'ref', preprocessing='imagenet', **kw)
    assert imnet.path.parent != ref.path.parent and imnet.manifest['key']['preprocessing'] == 'imagenet'
    with pytest.raises(FileNotFoundError, match='dinov2_test_tiny_pretrain.pth'):
        C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=d / 'ref', **{**kw, 'weights_dir': tmp_path / 'none'})


def test_a_second_job_on_the_same_cache_is_refused(setup):
    d, kw, ref = setup
    root = d / 'concurrent'
    slow = KILLER.replace('os.kill(os.getpid(), signal.SIGKILL)', 'None').replace('return orig(self, x)', 'import time; time.sleep(0.15); return orig(self, x)')
    kws = repr({k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})
    p = subprocess.Popen([sys.executable, '-c', slow.replace('{KW}', kws), str(root), '0'], env=dict(os.environ, HF_HUB_OFFLINE='1'))
    try:
        lock = None
        for _ in range(300):   # wait until the other process holds the lock and has started
            parts = list(root.rglob('train.partial'))
            if parts: lock = parts[0]; break
            time.sleep(0.1)
        assert lock is not None
        calls = []
        with pytest.raises(C.RunLockedError, match=f'being built by another job \\(pid {p.pid} on'):
            C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=root, **kw, on_chunk=lambda a, b: calls.append(a))
        assert calls == []          # nothing computed, nothing written by the refused job
        assert p.wait(timeout=120) == 0
        fc = C.build_feature_cache('SynthBirds', 'train', 'dinov2_test_tiny', cache_root=root, **kw)   # afterwards: reused
        same(fc, ref)
    finally:
        if p.poll() is None: p.kill()


def test_read_batches_match_arrays(setup):
    _, _, ref = setup
    seen = []
    for b in ref.batches(5, seed=3):
        i = b['index'].numpy()
        assert (np.diff(i) > 0).all()
        np.testing.assert_array_equal(b['patch'].numpy(), np.asarray(ref.patch[i], dtype=np.float32))
        np.testing.assert_array_equal(b['mask'].numpy(), ref.masks[i])
        seen += i.tolist()
    assert sorted(seen) == list(range(len(ref)))
