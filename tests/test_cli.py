"""The command line end to end, as a user runs it (`python -m dinoqpm`): train → inference on a folder with a corrupt image
→ evaluate. The training is the session's smoke run (tests/conftest.py); here `dinoqpm train` finds it finished."""
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

def dinoqpm(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    return subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)

def test_train_inference_evaluate(smoke, tmp_path):
    run = Path(shutil.copytree(smoke.run, tmp_path / 'run'))          # the session's run, trained with --eval-mode fast
    res = json.loads((run / 'results_finetune.json').read_text())
    assert res['NFfeatures'] == 6 and 0 <= res['Accuracy'] <= 1 and res['qp_status'] in ('optimal', 'feasible')
    qp = json.loads((run / 'qp' / 'qp_result.json').read_text())
    assert qp['n_select'] == 6 and qp['status'] == res['qp_status']

    # a second train is a no-op: every stage is reused, no file is written
    mtimes = lambda: {p: p.stat().st_mtime_ns for p in run.rglob('*') if p.is_file() and p.name != '.dinoqpm.lock'}
    before = mtimes()
    r = dinoqpm('train', '--config', smoke.yaml, '--run-dir', run, '--cache-root', smoke.cache, '--eval-mode', 'fast', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert mtimes() == before and before[run / 'finetune_model.pt']

    imgs = tmp_path / 'imgs'; imgs.mkdir()
    src = sorted(p for p in (smoke.data / 'SynthBirds' / 'CUB_200_2011' / 'images').rglob('*') if p.is_file())[:3]
    for p in src: shutil.copy(p, imgs / p.name)
    (imgs / 'broken.png').write_bytes(b'\x89PNG not really')
    r = dinoqpm('inference', '--model-path', run, '--image-path', imgs, '--output-json', tmp_path / 'pred.json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = json.loads((tmp_path / 'pred.json').read_text())
    assert pred['num_images'] == 4 and pred['num_failed'] == 1
    ok = [p for p in pred['predictions'] if 'error' not in p]
    assert len(ok) == 3 and all(Path(f).exists() for p in ok for f in p['visualisation'].values())
    assert [p['image_path'] for p in pred['predictions'] if 'error' in p] == [str(imgs / 'broken.png')]

    r = dinoqpm('evaluate', '--model-path', run, '--mode', 'finetune', '--eval-mode', 'accuracy,sid',
                '--output-json', tmp_path / 'eval.json', '--cache-root', smoke.cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / 'eval.json').read_text())
    assert ev['Accuracy'] == res['Accuracy'] and 'Contrastiveness' not in ev

def test_user_errors_are_one_line(tmp_path):
    "A refusal through `python -m dinoqpm` (exit code 2, one line, no traceback); the other refusals run in-process."
    r = dinoqpm('train', '--demo', '--set', 'adapter.n_layer=2', cwd=tmp_path)
    assert r.returncode == 2 and 'adapter.n_layer' in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    from dinoqpm.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(['--log-level', 'WARNING', 'inference', '--model-path', str(tmp_path / 'none'), '--image-path', str(tmp_path),
                     '--output-json', str(tmp_path / 'o.json')])
    assert code == 2 and 'does not exist' in err.getvalue() and 'Traceback' not in err.getvalue()
