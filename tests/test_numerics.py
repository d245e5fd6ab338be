"""The pinned numerics reproduce the committed fixture bit for bit on whatever machine runs the suite (issue 18): the
weights of a short, fixed training run and the demo backbone's tokens, as SHA-256 digests (`tests/numerics_fixture.py`).
`tools/check_numerics.py` shows the same digests on an emulated AVX2-only Intel CPU, and other digests without the pins."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN_VARS = ('MKL_CBWR', 'ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'NPY_DISABLE_CPU_FEATURES', 'OPENBLAS_CORETYPE',
            'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'DINOQPM_NUMERICS', 'DINOQPM_THREADS')


def _digests(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in PIN_VARS}       # the defaults, as on a fresh machine
    r = subprocess.run([sys.executable, str(ROOT / 'tests' / 'numerics_fixture.py')], cwd=ROOT, capture_output=True, text=True,
                       env={**clean, 'HF_HUB_OFFLINE': '1', **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index('{'):])


def test_pinned_training_reproduces_the_fixture_bit_for_bit():
    want = json.loads((ROOT / 'tests' / 'fixtures' / 'numerics.json').read_text())
    got = _digests()
    assert got['numerics']['mode'] == 'reproducible' and got['numerics']['not_pinned'] == []
    assert got['numerics']['pins'] == want['numerics']['pins']
    assert (got['train_sha256'], got['tokens_sha256']) == (want['train_sha256'], want['tokens_sha256']), (
        f"this CPU ({got['numerics']['cpu']}, ATen {got['numerics']['aten_cpu_capability']}) computes other bits than "
        f"the fixture's ({want['numerics']['cpu']}): a pin does not suffice here")


def test_training_reaches_mkl_vector_math_only_through_the_pinned_square_root():
    """MKL's vector math (`numerics.VML_OPS`: `sqrt`, `exp`, `log`, ...) gives other bits on Intel than on AMD CPUs even with
    `MKL_CBWR=COMPATIBLE` (nbs/00_numerics.ipynb), so the training paths must not reach it on CPU tensors: the dense phase
    and the finetune (their optimiser steps run inside `pinned_vector_math`, which computes square roots by `exact_sqrt`),
    the features' statistics for the QP, and the GLM path of DINO-SLDD and DINO-QSENN. Watched by a dispatch mode entered
    outside everything, so it sees what reaches ATen's kernels."""
    import collections, torch
    from dataclasses import replace
    from torch.utils._python_dispatch import TorchDispatchMode
    from dinoqpm.numerics import VML_OPS
    from dinoqpm.config import AdapterConfig, DENSE_DEFAULTS, FINETUNE_DEFAULTS, RunConfig
    from dinoqpm.features import FeatureCache
    from dinoqpm.train import make_token_data, train_dense, finetune, compute_feature_stats
    from dinoqpm.baselines import glm
    reached = collections.Counter()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__.lstrip('_').removeprefix('foreach_').rstrip('_')
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if name in VML_OPS and any(t.device.type == 'cpu' for t in tensors): reached[str(func)] += 1
            return func(*args, **(kwargs or {}))

    cfg = RunConfig(seed=0, device='cpu', adapter=AdapterConfig(n_layers=2, hidden=32, n_features=8),
                    dense=replace(DENSE_DEFAULTS, epochs=2, batch_size=16), finetune=replace(FINETUNE_DEFAULTS, epochs=1, batch_size=16))
    train = FeatureCache.from_arrays(**make_token_data(n=64, grid=(4, 4), dim=16, seed=1))
    W = torch.zeros(4, 4); W[torch.arange(4), torch.arange(4)] = 1
    g = torch.Generator().manual_seed(0)
    with Watch():
        dense, _ = train_dense(cfg, train, progress=False)
        mean, std = compute_feature_stats(dense, train)
        finetune(cfg, dense, torch.arange(4), W, None, None, train, progress=False)
        glm.fit_path(torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g), 3, glm.GLMConfig(max_epochs=3))
    assert not reached, f'MKL vector math reached on CPU tensors (other bits on other CPUs): {dict(reached)}'
