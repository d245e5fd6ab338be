"""Run every library notebook under nbs/ (one pytest test each), as `nbdev_test` would.

Each notebook runs in its own process (nbdev's in-process runner), so state, threads and memory never leak from one
notebook into the next. The processes are forked from one that has done the imports they all share, and nothing else
(tests/nb_server.py): each notebook starts where a new process would be after its imports, without paying for them.
A notebook that calls `smoke_run()` (07, 09a, 09b, 09c) reads the session's finished smoke run (tests/conftest.py, passed as
`$DINOQPM_SMOKE_RUN`) instead of training its own.
"""
import json, os, queue, signal, subprocess, sys, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))
SKIP_FLAGS = ['notest', 'slow', 'gpu']
TIMEOUT = 1800


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1', IN_TEST='1')


class NotebookServer:
    "tests/nb_server.py in a subprocess: `run(nb, env, log)` runs a notebook in a process of its own, returns its exit code."
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name('nb_server.py'))], cwd=ROOT, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout] + [self.lines.put('')], daemon=True).start()
        assert 'ready' in self._answer(600), 'the notebook server did not start'

    def _answer(self, timeout) -> dict:
        line = self.lines.get(timeout=timeout)
        if not line: raise RuntimeError(f'the notebook server ended (exit code {self.proc.wait()})')
        return json.loads(line)

    def run(self, nb: Path, env: dict, log: Path) -> int:
        self.proc.stdin.write(json.dumps({'nb': str(nb), 'skip': SKIP_FLAGS, 'env': env, 'log': str(log)}) + '\n')
        self.proc.stdin.flush()
        pid = self._answer(60)['pid']
        try: return self._answer(TIMEOUT)['exit']
        except queue.Empty:
            os.kill(pid, signal.SIGKILL)
            self._answer(60)
            raise TimeoutError(f'{nb.name} ran longer than {TIMEOUT} s')

    def close(self):
        self.proc.stdin.close()
        try: self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None: self.proc.kill()


@pytest.fixture(scope='module')
def server():
    s = NotebookServer()
    yield s
    s.close()


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, server, request, tmp_path):
    env = _env()
    if 'smoke_run()' in nb.read_text():
        from dinoqpm.pipeline import SMOKE_RUN_ENV
        env[SMOKE_RUN_ENV] = str(request.getfixturevalue('smoke').root)
    log = tmp_path / 'output.txt'
    code = server.run(nb, env, log)
    assert code == 0, f'{nb.name} failed (exit code {code}):\n{log.read_text(errors="replace")[-12000:]}'
