"""The own-images tutorial (nbs/tutorials/own_images.ipynb) runs through papermill in smoke mode, as a user runs it:
it writes a class-folder tree from SynthBirds, trains on it and explains an image."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_images_tutorial_smoke(tmp_path):
    out = tmp_path / 'own_images.ipynb'
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', DINOQPM_DATA=str(tmp_path / 'dataroot'))
    r = subprocess.run([sys.executable, '-m', 'papermill', '-k', 'python3', str(ROOT / 'nbs/tutorials/own_images.ipynb'), str(out),
                        '-p', 'mode', 'smoke', '-p', 'runs_root', str(tmp_path / 'runs'), '-p', 'data_root', str(tmp_path / 'data')],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads(out.read_text())
    assert not [o for c in nb['cells'] for o in c.get('outputs', []) if o.get('output_type') == 'error']
    run = tmp_path / 'runs' / 'folder-my_birds' / 'dinov2_test_tiny' / 'qpm' / '0'
    res = json.loads((run / 'results_finetune.json').read_text())
    assert res['dataset'] == 'folder' and 'Plausibility' in res and (run / 'split.csv').exists()
    assert (tmp_path / 'dataroot' / 'dinoqpm_cache' / 'folder').is_dir()          # the cache is not in the image folder
    assert not (tmp_path / 'data' / 'tutorial' / 'my_birds' / 'dinoqpm_cache').exists()
    figs = [o for c in nb['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(figs) >= 2                                                          # the assignment overview and one explanation
