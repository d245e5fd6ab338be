import os
# Tests never reach the network and stay quiet.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TQDM_DISABLE', '1')
# Threads that wait for work sleep instead of spinning, OpenMP's (torch, MKL) and OpenBLAS's (numpy, scipy, scikit-learn):
# on a busy machine (more runnable threads than cores) a spinning waiter makes every small two-thread op up to ~100x
# slower. Scheduling only: the results keep their bits. Inherited by every process the tests start (notebooks, the
# command line, torchrun workers).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '4')      # spin 2^4 cycles, not OpenBLAS's default 2^28, before sleeping
import dinoqpm  # noqa: E402,F401  first, before any test module imports torch: the numerics pins apply to this process and
                # (through the environment) to every process it starts (dinoqpm.numerics)
import gc, logging, sys  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """What one test changes in this process is undone for the next: torch's thread count (a test may set one thread;
    then an in-process result would differ in its last bits from the same computation in a subprocess) and the root
    logger's handlers (an in-process `dinoqpm` command line binds one to the stream pytest captured for that test).
    And what is alive when a test starts (modules, fixtures) is frozen out of the cyclic GC: the QP collects twice per
    solve (`dinoqpm.qp.solver_gc_guard`), which otherwise walks the whole test session's heap each time (0.3 s)."""
    gc.collect(); gc.freeze()
    threads = sys.modules['torch'].get_num_threads() if 'torch' in sys.modules else None
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if threads is not None: sys.modules['torch'].set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)


def _snapshot(folder) -> dict:
    "Every file below `folder` with its size and SHA-256 (lock files aside: a reader may take a lock)."
    import hashlib
    from pathlib import Path
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob('*')) if p.is_file() and p.name != '.dinoqpm.lock'}


@pytest.fixture(scope='session')
def smoke(tmp_path_factory):
    """One finished smoke run for the session (`dinoqpm.pipeline.smoke_run`: 4 SynthBirds classes, the random test ViT,
    `eval_mode='fast'`) with its data, weights and cache, its configuration as `smoke.yaml`, its export (`model/`) and four
    test images (`images/`), shared by the tests and notebooks (`$DINOQPM_SMOKE_RUN`) that only read them. A test that
    changes one of them works on a copy; the session ends with a check that nobody wrote into the shared folder."""
    import json, shutil
    from types import SimpleNamespace
    import yaml
    from dinoqpm.config import config_to_dict
    from dinoqpm.share import export_model
    from dinoqpm.pipeline import smoke_run
    root = tmp_path_factory.mktemp('smoke')
    sr = smoke_run(root)
    (root / 'smoke.yaml').write_text(yaml.safe_dump(config_to_dict(sr['cfg'])))
    out = export_model(sr['run_dir'], root / 'model', cache_root=sr['cache_root'], progress=False)
    images = root / 'images'; images.mkdir()
    for p in sorted((sr['data_root'] / 'SynthBirds' / 'CUB_200_2011' / 'images').rglob('*.png'))[:4]: shutil.copy(p, images / p.name)
    before = _snapshot(root)
    yield SimpleNamespace(root=root, cfg=sr['cfg'], data=sr['data_root'], weights=sr['weights_dir'], cache=sr['cache_root'],
                          run=sr['run_dir'], yaml=root / 'smoke.yaml', out=out, images=images,
                          card=json.loads((out / 'explanation.json').read_text()))
    after = _snapshot(root)
    assert after == before, f'a test wrote into the shared smoke folder {root}: ' + \
        ', '.join(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))


@pytest.fixture(scope='session')
def synthbirds_default(tmp_path_factory):
    """The default SynthBirds (20 classes, 600 images: the embedded demo's data) in a data root, generated once and shared
    by the tests that only read it (checked at the end of the session)."""
    from dinoqpm.data import load_dataset
    root = tmp_path_factory.mktemp('synthbirds_default')
    load_dataset('SynthBirds', 'train', root=root, progress=False)
    before = _snapshot(root)
    yield root
    assert _snapshot(root) == before, f'a test wrote into the shared SynthBirds {root}'


@pytest.fixture
def browser_paths():
    """`(chromium, chromedriver)` for the tests of the explorer page in a real browser; skipped where they or selenium
    are missing (a failure in CI, where .ci/run installs them)."""
    import shutil
    from pathlib import Path
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


@pytest.fixture(scope='session')
def cnn_world(tmp_path_factory):
    """For the end-to-end path (a CNN trained on images): a tiny SynthBirds (4 classes, 6 images each, 64 px) in `data`, a
    random ResNet50 in torchvision's layout in `weights` (`make_test_resnet_checkpoint`), and `config(**overrides)`: QPM's
    recipe (`qpm_config`) shrunk to that data, the shipped EfficientNet-Lite0 at 64 px, 2 + 2 epochs of batch 4, no
    loader process. Shared by the tests that only read the folders (checked at the end of the session)."""
    from types import SimpleNamespace
    from dinoqpm.config import qpm_config
    from dinoqpm.data import load_dataset
    from dinoqpm.features import make_test_resnet_checkpoint
    root = tmp_path_factory.mktemp('cnn_world')
    load_dataset('SynthBirds', 'train', root=root / 'data', n_classes=4, images_per_class=6, img_size=64, progress=False)
    make_test_resnet_checkpoint(root / 'weights', seed=0)
    def config(**overrides):
        base = {'seed': 0, 'device': 'cpu', 'data.dataset': 'SynthBirds', 'data.root': str(root / 'data'), 'data.img_size': 64,
                'data.synth_classes': 4, 'data.synth_images_per_class': 6, 'data.synth_img_size': 64, 'data.workers': 0,
                'backbone.name': 'efficientnet_lite0_os16_act', 'backbone.weights_dir': str(root / 'weights'),
                'dense.epochs': 2, 'dense.batch_size': 4, 'finetune.epochs': 2, 'finetune.batch_size': 4,
                'qp.n_select': 6, 'qp.n_per_class': 2}
        return qpm_config(**{**base, **overrides})
    before = _snapshot(root)
    yield SimpleNamespace(root=root, data=root / 'data', weights=root / 'weights', config=config)
    assert _snapshot(root) == before, f'a test wrote into the shared cnn_world {root}'


@pytest.fixture(scope='session')
def cnn_qpm_run(cnn_world, tmp_path_factory):
    """One finished QPM run on a CNN trained end to end, for the session (`dinoqpm.pipeline.cnn_smoke_config`: the random
    ResNet50 of `cnn_world` in torchvision's layout at 32 px, QPM's recipe, the QP with the locality bias B, every metric
    on both models), with its export (`model/`) and four test images (`images/`). Shared by the tests that only read them
    (checked at the end of the session); a test that changes one works on a copy."""
    import shutil
    from types import SimpleNamespace
    from dinoqpm.pipeline import cnn_smoke_config, run_qpm
    from dinoqpm.share import export_model
    root = tmp_path_factory.mktemp('cnn_qpm')
    cfg = cnn_smoke_config(cnn_world.data, cnn_world.weights, device='cpu')
    out = run_qpm(cfg, root / 'run', eval_mode='all', progress=False)
    export = export_model(root / 'run', root / 'model', n_prototypes=2, n_examples=1, progress=False)
    images = root / 'images'; images.mkdir()
    for p in sorted((cnn_world.data / 'SynthBirds' / 'CUB_200_2011' / 'images').rglob('*.png'))[:4]: shutil.copy(p, images / p.name)
    before = _snapshot(root)
    yield SimpleNamespace(root=root, cfg=cfg, run=root / 'run', out=out, export=export, images=images, world=cnn_world)
    assert _snapshot(root) == before, f'a test wrote into the shared CNN QPM run {root}: ' + \
        ', '.join(sorted(k for k in set(before) | set(_snapshot(root)) if before.get(k) != _snapshot(root).get(k)))
