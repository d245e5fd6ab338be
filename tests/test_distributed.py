"""torchrun on the CPU (gloo, 2 processes) on the smoke configuration: sharded extraction gives the single-process
cache byte for byte and survives a killed rank (resumed with another number of processes), data-parallel training
matches one process within the tolerance stated in nbs/05c_train_loop.ipynb, and only rank 0 writes the run directory; an
error of rank 0 in `decide_on_rank0`, of any type, reaches every rank and no rank hangs."""
import json, os, shutil, signal, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch, yaml

from dinoqpm.config import config_to_dict
from dinoqpm.pipeline import smoke_config

HERE = Path(__file__).resolve().parent
WORKER = HERE / 'dist_worker.py'
ARRAYS = ('patch', 'cls', 'labels', 'image_ids', 'masks', 'masks_dilated')


def start(args, nproc=None, cwd=None) -> subprocess.Popen:
    "The worker in one process (`nproc=None`) or under `torchrun --standalone --nproc-per-node nproc`, started."
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    pre = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(nproc)] if nproc else [sys.executable]
    return subprocess.Popen([*pre, str(WORKER), *map(str, args)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    "Wait for a job of `start` (ten minutes at most): its exit code and output."
    try: out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired: p.kill(); raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def launch(args, nproc=None, cwd=None):
    "The worker in one process (`nproc=None`) or under `torchrun --standalone --nproc-per-node nproc`, to its end."
    return finish(start(args, nproc, cwd))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    t = tmp_path_factory.mktemp('dist')
    cfg = smoke_config(t / 'data', t / 'weights')
    (t / 'smoke.yaml').write_text(yaml.safe_dump(config_to_dict(cfg)))
    r = launch(['extract', t / 'smoke.yaml', t / 'c_one'])
    assert r.returncode == 0, r.stderr[-3000:]
    return t


def arrays(root: Path) -> dict:
    out = {}
    for f in sorted(root.rglob('*.npy')):
        rel = f.relative_to(root)
        if rel.parts[-2] in ('train', 'test'): out[str(rel)] = f.read_bytes()
    return out


def test_sharded_extraction_is_byte_identical_and_resumes_after_a_killed_rank(world):
    t = world
    one = arrays(t / 'c_one')
    assert len(one) == 2 * len(ARRAYS)
    two_job = start(['extract', t / 'smoke.yaml', t / 'c_two'], nproc=2)
    kill_job = start(['extract', t / 'smoke.yaml', t / 'c_kill', 1, 1], nproc=2)   # beside it: rank 1 dies after its first chunk
    r = finish(two_job)
    assert r.returncode == 0, r.stderr[-3000:]
    two = arrays(t / 'c_two')
    assert two.keys() == one.keys() and all(two[k] == one[k] for k in one), [k for k in one if two.get(k) != one[k]]
    man = json.loads(next((t / 'c_two').rglob('train/manifest.json')).read_text())
    assert man['extraction']['processes'] == 2

    r = finish(kill_job)
    assert r.returncode != 0
    partial = next((t / 'c_kill').rglob('train.partial'))
    done = sorted(int(p.name) for p in (partial / 'chunks').iterdir() if p.name.isdigit())   # not a killed write's temp file
    assert 1 in done and 3 not in done and 5 not in done                       # rank 1's finished chunk is kept, its others not
    r = launch(['extract', t / 'smoke.yaml', t / 'c_kill'])                     # resumed by one process
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads(next((t / 'c_kill').rglob('train/manifest.json')).read_text())
    assert man['extraction']['resumed_at'] == 2 * len(done)
    kill = arrays(t / 'c_kill')
    assert kill.keys() == one.keys() and all(kill[k] == one[k] for k in one)


def _state(run, name):
    from dinoqpm.train import load_model
    m = load_model(run / name)
    return {k: v for k, v in m.state_dict().items() if torch.is_tensor(v) and v.dtype.is_floating_point}, m


def test_data_parallel_training_matches_one_process_and_only_rank_0_writes(world):
    t = world
    one_job = start(['train', t / 'smoke.yaml', t / 'c_one', t / 'run_one', t / 'w_one.json'])
    two_job = start(['train', t / 'smoke.yaml', t / 'c_one', t / 'run_two', t / 'w_two.json'], nproc=2)   # beside it
    for r in (finish(one_job), finish(two_job)): assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((t / 'w_two.json').read_text()) == []                     # rank 1 wrote nothing in the run directory
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob('*') if p.is_file())
    assert files(t / 'run_two') == files(t / 'run_one')

    a, _ = _state(t / 'run_one', 'dense_model.pt')
    b, mb = _state(t / 'run_two', 'dense_model.pt')
    loose = ('adapter.layers.0.bias', 'adapter.layers.1.running_mean')            # the pre-BatchNorm bias and what it feeds
    for k in a:
        tol = 2e-2 if k in loose else 1e-5
        assert (a[k] - b[k]).abs().max() <= tol, (k, (a[k] - b[k]).abs().max().item())
    for f in ('selection.npy', 'weight.npy'):                                    # the same QP solution
        assert np.array_equal(np.load(t / 'run_one' / 'qp' / f), np.load(t / 'run_two' / 'qp' / f)), f
    ra = json.loads((t / 'run_one' / 'results_finetune.json').read_text())
    rb = json.loads((t / 'run_two' / 'results_finetune.json').read_text())
    assert ra['Accuracy'] == rb['Accuracy'] and rb['processes'] == 2
    for k in ('Plausibility', 'Class-Independence', 'Contrastiveness', 'Correlation'):
        assert abs(ra[k] - rb[k]) <= 0.05, (k, ra[k], rb[k])
    hist_a = [h['train_loss'] for h in _state(t / 'run_one', 'dense_model.pt')[1].history]
    assert np.allclose(hist_a, [h['train_loss'] for h in mb.history], rtol=1e-5)


def test_an_error_of_rank_0_of_any_type_reaches_every_rank_and_none_hangs(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', DINOQPM_DIST_TIMEOUT_MIN='3')   # a hang ends too
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', str(WORKER),
                          'decide', str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try: out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate()
        raise AssertionError('a rank hung waiting for rank 0') from None
    seen = {r: json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)}
    assert seen[0]['oserror'] == ['OSError', "[Errno 28] No space left on device: '/cache/x.npy'"]
    assert seen[1]['oserror'] == ['RankZeroError', "deciding oserror failed on rank 0 with OSError: [Errno 28] No space left "
                                                   "on device: '/cache/x.npy'"]
    assert seen[0]['runtime'] == ['RuntimeError', 'CUDA out of memory']
    assert seen[1]['runtime'] == ['RankZeroError', 'deciding runtime failed on rank 0 with RuntimeError: CUDA out of memory']
    assert seen[0]['config'] == seen[1]['config'] == ['ConfigError', 'qp.n_select=0 is not positive']   # a UserError as itself
    assert seen[0]['ok'] == seen[1]['ok'] == {'decided by': 0}
    assert p.returncode != 0 and 'the last straw' in err, err[-3000:]                  # the uncaught one ends the job
