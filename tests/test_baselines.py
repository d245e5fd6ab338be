"""What the 07 notebooks cannot show: a glm-saga fit killed by a real signal (no Python cleanup) continues from its
progress file to exactly the result of an uninterrupted fit."""
import os, signal, subprocess, sys, time
from pathlib import Path
import torch
from dinoqpm.baselines import GLMConfig, select_features, fit_path

CFG = GLMConfig(max_epochs=60, select_k=40, path_k=40, batch_size=64)

def toy(n=400, d=24, n_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    X = torch.randn(n, d, generator=g)
    X[:, :8] += 2.0 * torch.randn(n_classes, 8, generator=g)[y]
    return X, y

CHILD = r'''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_baselines import toy, CFG
from dinoqpm.baselines import select_features, fit_path
X, y = toy()
if sys.argv[1] == 'select': select_features(X, y, 12, cfg=CFG, seed=5, checkpoint=sys.argv[2])
else: fit_path(X[:, :10], y, cfg=CFG, seed=5, checkpoint=sys.argv[2])
'''

def _kill_when_written(kind, ckpt, key, at_least, timeout=120):
    "Start a fit in a child process and SIGKILL it once its progress file holds `at_least` entries under `key`."
    p = subprocess.Popen([sys.executable, '-c', CHILD.format(tests=str(Path(__file__).parent)), kind, str(ckpt)],
                         env=dict(os.environ, TQDM_DISABLE='1'))
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None: break
            if ckpt.exists():
                try: n = len(torch.load(ckpt, weights_only=True)[key])
                except Exception: n = 0          # being replaced right now
                if n >= at_least:
                    p.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        if p.poll() is None: p.kill()
        p.wait()
    return p.returncode

def test_selection_resumes_after_sigkill(tmp_path):
    torch.set_num_threads(1)
    X, y = toy()
    straight = select_features(X, y, 12, cfg=CFG, seed=5)
    ckpt = tmp_path / 'selection_progress.pt'
    rc = _kill_when_written('select', ckpt, 'order', 4)
    assert rc == -signal.SIGKILL, f'the child was not killed mid-way (rc={rc}); make the problem bigger'
    assert len(torch.load(ckpt, weights_only=True)['order']) < 12
    resumed = select_features(X, y, 12, cfg=CFG, seed=5, checkpoint=ckpt)
    assert resumed.order == straight.order and resumed.n_restarts == straight.n_restarts

def test_path_resumes_after_sigkill(tmp_path):
    torch.set_num_threads(1)
    X, y = toy()
    straight = fit_path(X[:, :10], y, cfg=CFG, seed=5)
    ckpt = tmp_path / 'path_progress.pt'
    rc = _kill_when_written('path', ckpt, 'points', 5)
    assert rc == -signal.SIGKILL, f'the child was not killed mid-way (rc={rc}); make the problem bigger'
    resumed = fit_path(X[:, :10], y, cfg=CFG, seed=5, checkpoint=ckpt)
    assert torch.equal(resumed.weights, straight.weights) and torch.equal(resumed.biases, straight.biases)


def test_every_row_on_synthbirds(tmp_path):
    """All Table 1 baselines end to end on the smoke configuration (SynthBirds through a tiny random ViT): each trains,
    and every row gets its metrics from `evaluate`, with the dataset's masks, attributes and part maps."""
    from dinoqpm.pipeline import smoke_config, load_caches, run_qpm
    from dinoqpm.baselines import run_baseline
    from dinoqpm.baselines import GLMConfig
    torch.set_num_threads(1)
    cfg = smoke_config(tmp_path / 'data', tmp_path / 'weights')
    caches = load_caches(cfg, tmp_path / 'cache', progress=False)
    runs = tmp_path / 'runs'
    run_qpm(cfg, runs / 'qpm', cache_root=tmp_path / 'cache', progress=False, stop_after='dense')
    glm = GLMConfig(max_epochs=30, select_k=20, path_k=20)
    rows = {'linear_probe': run_baseline(cfg, 'linear_probe', runs / 'probe', caches=caches, progress=False, epochs=3),
            'dense_frozen': run_baseline(cfg, 'dense_frozen', runs / 'frozen', caches=caches, progress=False, epochs=3),
            'dense_qpm': run_baseline(cfg, 'dense_qpm', runs / 'dense_qpm', caches=caches, progress=False,
                                      dense_model=runs / 'qpm' / 'dense_model.pt'),
            'sldd': run_baseline(cfg, 'sldd', runs / 'glm', caches=caches, progress=False, dense_epochs=3, finetune_epochs=2, glm=glm),
            'qsenn': run_baseline(cfg, 'qsenn', runs / 'glm', caches=caches, progress=False, dense_epochs=3, finetune_epochs=2,
                                  later_epochs=1, glm=glm)}
    C, n_sel, k = caches[0].n_classes, cfg.qp.n_select, cfg.qp.n_per_class
    assert int((rows['sldd'].model.head_weight() != 0).sum()) == k * C
    Wq = rows['qsenn'].model.head_weight()
    assert int((Wq != 0).sum()) == k * C and len(Wq.abs().unique()) == 2
    for name, r in rows.items():
        m = r.metrics
        assert 0 <= m['Accuracy'] <= 1 and m['Plausibility'] is not None, (name, m.get('skipped'))
        for key in ('Class-Independence', 'Contrastiveness', 'Structural Grounding', 'alignment'):
            assert m.get(key) is not None, (name, key, m.get('skipped'))
        assert (r.run_dir / ('metrics.json' if name in ('linear_probe', 'dense_frozen', 'dense_qpm') else f'{name}/metrics.json')).exists()
    # the dense_qpm row is the pipeline's own dense evaluation
    import json
    qpm_dense = json.loads((runs / 'qpm' / 'results_dense.json').read_text())
    assert qpm_dense['Accuracy'] == rows['dense_qpm'].metrics['Accuracy']
