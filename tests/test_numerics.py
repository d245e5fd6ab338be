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
