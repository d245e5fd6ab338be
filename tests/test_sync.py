"""The notebooks are the source: the committed library must be exactly what nbdev_export makes of them, in every
subpackage, with no file that no notebook makes."""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]

def differences(cmp: filecmp.dircmp, prefix: str = '') -> list:
    "Files (and folders) that differ or exist on one side only, in the compared folders and every folder below them."
    out = [prefix + f for f in cmp.diff_files + cmp.left_only + cmp.right_only + cmp.funny_files]
    for name, sub in sorted(cmp.subdirs.items()): out += differences(sub, f'{prefix}{name}/')
    return out

def test_library_matches_notebooks():
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / 'repo'
        shutil.copytree(ROOT, tmp, ignore=shutil.ignore_patterns('.venv', '.git', 'runs', '__pycache__', '*.egg-info', '.pytest_cache'))
        shutil.rmtree(tmp / 'dinoqpm')                     # exported from nothing: a module no notebook makes shows up
        r = subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export()'],
                           cwd=tmp, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cmp = filecmp.dircmp(ROOT / 'dinoqpm', tmp / 'dinoqpm', ignore=['__pycache__'])
        changed = differences(cmp)
        assert not changed, f'dinoqpm/ differs from nbdev_export of nbs/: {changed}; edit the notebook and re-export'

def test_every_notebook_has_python3_kernel():
    for nb in sorted((ROOT / 'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts: continue
        meta = nbformat.read(nb, as_version=4).metadata
        assert meta.get('kernelspec', {}).get('name') == 'python3', f'{nb} lacks the python3 kernelspec (papermill needs it)'

def test_differences_walks_every_folder(tmp_path):
    for side, text in (('a', 'x'), ('b', 'yy')):
        (tmp_path / side / 'sub' / 'deeper').mkdir(parents=True)
        (tmp_path / side / 'same.py').write_text('same')
        (tmp_path / side / 'sub' / 'deeper' / 'm.py').write_text(text)
    (tmp_path / 'a' / 'sub' / 'stale.py').write_text('')
    got = differences(filecmp.dircmp(tmp_path / 'a', tmp_path / 'b'))
    assert sorted(got) == ['sub/deeper/m.py', 'sub/stale.py'], got
