"""The notebooks are the source: the committed library must be exactly what nbdev_export makes of them."""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]

def test_library_matches_notebooks():
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / 'repo'
        shutil.copytree(ROOT, tmp, ignore=shutil.ignore_patterns('.venv', '.git', 'runs', '__pycache__', '*.egg-info', '.pytest_cache'))
        r = subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export()'],
                           cwd=tmp, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cmp = filecmp.dircmp(ROOT / 'dinoqpm', tmp / 'dinoqpm', ignore=['__pycache__'])
        changed = cmp.diff_files + cmp.left_only + cmp.right_only
        assert not changed, f'dinoqpm/ differs from nbdev_export of nbs/: {changed}; edit the notebook and re-export'

def test_every_notebook_has_python3_kernel():
    for nb in sorted((ROOT / 'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts: continue
        meta = nbformat.read(nb, as_version=4).metadata
        assert meta.get('kernelspec', {}).get('name') == 'python3', f'{nb} lacks the python3 kernelspec (papermill needs it)'
