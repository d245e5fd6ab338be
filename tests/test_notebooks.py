"""Run every library notebook under nbs/ (one pytest test each), as `nbdev_test` would.

Each notebook runs in its own process (nbdev's in-process runner, imported under an alias so pytest does not collect it),
so state, threads and memory never leak from one notebook into the next. A notebook that calls `smoke_run()` (09a, 12,
12a) reads the session's finished smoke run (tests/conftest.py, passed as `$DINOQPM_SMOKE_RUN`) instead of training its own.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))
SKIP_FLAGS = ['notest', 'slow', 'gpu']

RUNNER = r'''
import sys
from pathlib import Path
from nbdev.test import test_nb as run_nb
ok, secs = run_nb(Path(sys.argv[1]), skip_flags=sys.argv[2].split(','), showerr=True)
sys.exit(0 if ok else 1)
'''

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, request):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', IN_TEST='1')
    if 'smoke_run()' in nb.read_text():
        from dinoqpm.pipeline import SMOKE_RUN_ENV
        env[SMOKE_RUN_ENV] = str(request.getfixturevalue('smoke').root)
    r = subprocess.run([sys.executable, '-c', RUNNER, str(nb), ','.join(SKIP_FLAGS)],
                       cwd=nb.parent, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f'{nb.name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}'
