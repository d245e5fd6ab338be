"""The command line end to end, as a user runs it: train → inference on a folder with a corrupt image → evaluate."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest, yaml

from dinoqpm.config import config_to_dict
from dinoqpm.pipeline import smoke_config

def dinoqpm(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    return subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)

def test_train_inference_evaluate(tmp_path):
    cfg = smoke_config(tmp_path / 'data', tmp_path / 'weights')
    (tmp_path / 'smoke.yaml').write_text(yaml.safe_dump(config_to_dict(cfg)))
    run = tmp_path / 'run'
    r = dinoqpm('train', '--config', tmp_path / 'smoke.yaml', '--run-dir', run, '--cache-root', tmp_path / 'cache', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / 'results_finetune.json').read_text())
    assert res['NFfeatures'] == 6 and 0 <= res['Accuracy'] <= 1 and res['qp_status'] in ('optimal', 'feasible')
    qp = json.loads((run / 'qp' / 'qp_result.json').read_text())
    assert qp['n_select'] == 6 and qp['status'] == res['qp_status']

    # a second train is a no-op: every stage is reused
    before = (run / 'finetune_model.pt').stat().st_mtime_ns
    r = dinoqpm('train', '--config', tmp_path / 'smoke.yaml', '--run-dir', run, '--cache-root', tmp_path / 'cache', cwd=tmp_path)
    assert r.returncode == 0 and (run / 'finetune_model.pt').stat().st_mtime_ns == before

    imgs = tmp_path / 'imgs'; imgs.mkdir()
    src = sorted(p for p in (tmp_path / 'data' / 'SynthBirds' / 'CUB_200_2011' / 'images').rglob('*') if p.is_file())[:3]
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
                '--output-json', tmp_path / 'eval.json', '--cache-root', tmp_path / 'cache', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / 'eval.json').read_text())
    assert ev['Accuracy'] == res['Accuracy'] and 'Contrastiveness' not in ev

def test_user_errors_are_one_line(tmp_path):
    r = dinoqpm('train', '--demo', '--set', 'adapter.n_layer=2', cwd=tmp_path)
    assert r.returncode == 2 and 'adapter.n_layer' in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = dinoqpm('inference', '--model-path', tmp_path / 'none', '--image-path', tmp_path, '--output-json', tmp_path / 'o.json', cwd=tmp_path)
    assert r.returncode == 2 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
