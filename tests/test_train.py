"""Training tests a notebook cannot do: a run killed with SIGKILL at random moments resumes to bitwise the same weights,
plus API checks used by other modules (QP result duck typing, SLDD-style heads, DataLoader batching)."""
import os, random, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r'''
    import sys, torch
    torch.set_num_threads(1)
    from dataclasses import replace
    from pathlib import Path
    from dinoqpm.config import RunConfig, AdapterConfig, DENSE_DEFAULTS, FINETUNE_DEFAULTS
    from dinoqpm.features import FeatureCache
    from dinoqpm.train import make_token_data, train_dense, finetune
    run = Path(sys.argv[1])
    cfg = RunConfig(seed=7, device='cpu', adapter=AdapterConfig(n_layers=2, hidden=128, n_features=16),
                    dense=replace(DENSE_DEFAULTS, epochs=5, batch_size=16, lr=1e-2),
                    finetune=replace(FINETUNE_DEFAULTS, epochs=4, batch_size=16))
    train = FeatureCache.from_arrays(**make_token_data(n=1200, grid=(4, 4), dim=64, seed=1))
    test = FeatureCache.from_arrays(**make_token_data(n=100, grid=(4, 4), dim=64, seed=2))
    dense, _ = train_dense(cfg, train, test, run_dir=run, progress=False)
    sel = torch.arange(0, 16, 2)
    W = torch.zeros(4, 8); W[torch.arange(4).repeat_interleave(2), torch.arange(8)] = 1
    ft, hist = finetune(cfg, dense, sel, W, None, None, train, test, run_dir=run, progress=False)
    torch.save({'dense': dense.state_dict(), 'finetune': ft.state_dict(), 'history': hist}, run / 'result.pt')
''')

def _start(run_dir):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', OMP_NUM_THREADS='1', DINOQPM_CHECKPOINT_SECONDS='0')
    return subprocess.Popen([sys.executable, '-c', CHILD, str(run_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def _kill_when(proc, path, rng, timeout=240):
    "SIGKILL `proc` a random moment after `path` appears; True if the kill happened before the process ended."
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None: return False
        if time.time() - t0 > timeout: proc.kill(); raise TimeoutError(f'{path} never appeared')
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.15))
    if proc.poll() is not None: return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True

def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    rng = random.Random(0)
    ref = _start(tmp_path / 'ref')                                  # the uninterrupted reference, beside the killed runs
    try:
        kills = 0
        for watch in ('dense/checkpoint.pt', 'finetune/checkpoint.pt'):
            p = _start(tmp_path / 'run')
            kills += _kill_when(p, tmp_path / 'run' / watch, rng)   # a checkpoint after every epoch (DINOQPM_CHECKPOINT_SECONDS=0)
        p = _start(tmp_path / 'run')
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        out, err = ref.communicate(timeout=600)
        assert ref.returncode == 0, err[-3000:]
    finally:
        if ref.poll() is None: ref.kill(); ref.wait()
    assert kills >= 1, 'no run was killed mid-way: the test data is too small for this machine'
    a = torch.load(tmp_path / 'ref' / 'result.pt', weights_only=True)
    b = torch.load(tmp_path / 'run' / 'result.pt', weights_only=True)
    assert _same(a['dense'], b['dense']) and _same(a['finetune'], b['finetune'])
    strip = lambda h: [{k: v for k, v in r.items() if k != 'seconds'} for r in h]
    assert strip(a['history']) == strip(b['history'])

# ---------------------------------------------------------------------------------------------------------------------
from dataclasses import replace
from types import SimpleNamespace
from dinoqpm.config import RunConfig, AdapterConfig, DENSE_DEFAULTS, FINETUNE_DEFAULTS
from dinoqpm.features import FeatureCache
from dinoqpm.model import SparseHead
from dinoqpm.train import (make_token_data, train_dense, finetune, load_model, TokenDataset,
                           extract_features, compute_feature_stats)

@pytest.fixture(scope='module')
def small():
    cfg = RunConfig(seed=3, device='cpu', adapter=AdapterConfig(n_layers=2, hidden=32, n_features=8),
                    dense=replace(DENSE_DEFAULTS, epochs=2, batch_size=16, lr=1e-2),
                    finetune=replace(FINETUNE_DEFAULTS, epochs=1, batch_size=16))
    train = FeatureCache.from_arrays(**make_token_data(n=64, seed=1))
    dense, _ = train_dense(cfg, train, progress=False)
    return cfg, train, dense

def test_load_model_and_qp_result_duck_typing(small, tmp_path):
    cfg, train, dense = small
    qp = SimpleNamespace(selection=np.array([1, 3, 4, 6]), weight=np.eye(4, dtype=np.float32), status='optimal')
    ft, hist = finetune(cfg, dense, train_cache=train, qp_result=qp, run_dir=tmp_path, progress=False)
    m = load_model(tmp_path / 'finetune_model.pt')
    assert m.head.kind == 'bldd' and m.selection.tolist() == [1, 3, 4, 6] and not m.training
    assert torch.equal(m.head_weight(), torch.eye(4))
    x = TokenDataset(train).read(range(8))[0]
    assert torch.equal(m(x).logits, ft(x).logits)
    ft2, hist2 = finetune(cfg, dense, train_cache=train, qp_result=qp, run_dir=tmp_path, progress=False)   # finished: reused
    assert hist2 == hist
    mean, std = compute_feature_stats(dense, train)
    assert torch.allclose(m.head.mean, mean[[1, 3, 4, 6]]) and torch.allclose(m.head.std, std[[1, 3, 4, 6]])

def test_sldd_style_head_trains_only_mu_sigma_and_mlp(small):
    cfg, train, dense = small
    mean, std = compute_feature_stats(dense, train)
    W, b = torch.randn(4, 3), torch.randn(4)
    head = SparseHead([0, 2, 5], W, b, mean, std, trainable_norm=True, dropout=0.1)
    ft, _ = finetune(cfg, dense, train_cache=train, head=head, phase='finetune_sldd', progress=False)
    assert torch.equal(ft.head.weight, W) and torch.equal(ft.head.bias, b)
    assert not torch.equal(ft.head.mean.detach(), mean[[0, 2, 5]])          # μ is trained
    assert ft.head.mean.requires_grad and not ft.head.weight.requires_grad

def test_sldd_style_head_resumes_bitwise(small, tmp_path):
    "A resumed finetune with trainable μ, σ keeps training the model's own parameters (the head is loaded in place)."
    cfg, train, dense = small
    cfg = replace(cfg, finetune=replace(cfg.finetune, epochs=3))
    mean, std = compute_feature_stats(dense, train)
    W, b = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(4)
    mk = lambda: SparseHead([0, 2, 5], W, b, mean, std, trainable_norm=True, dropout=0.1)
    straight, _ = finetune(cfg, dense, train_cache=train, head=mk(), run_dir=tmp_path / 'a', progress=False)
    class Killed(Exception): pass
    def kill(info):
        if info['epoch'] == 1: raise Killed()
    with pytest.raises(Killed):
        finetune(cfg, dense, train_cache=train, head=mk(), run_dir=tmp_path / 'b', progress=False, on_epoch_end=[kill])
    resumed, _ = finetune(cfg, dense, train_cache=train, head=mk(), run_dir=tmp_path / 'b', progress=False)
    assert _same(straight.state_dict(), resumed.state_dict())

def test_dataloader_batches_via_getitems(small):
    _, train, _ = small
    ds = TokenDataset(train, indices=np.arange(10, 30))
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, collate_fn=lambda b: b)
    tokens, labels, idx = next(iter(dl))
    assert tokens.shape == (8, 17, 32) and idx.tolist() == list(range(10, 18))
    assert torch.equal(labels, torch.from_numpy(train.labels[10:18]))

def test_extract_features_in_cache_order(small):
    _, train, dense = small
    r = extract_features(dense, train, batch_size=5, with_maps=True)
    assert r['features'].shape == (64, 8) and r['maps'].shape == (64, 8, 4, 4)
    assert torch.equal(r['labels'], torch.from_numpy(train.labels))
    assert torch.allclose(r['features'], r['maps'].mean((2, 3)), atol=1e-6)
    assert torch.equal(r['preds'], r['logits'].argmax(1))
