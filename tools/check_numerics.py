"""Check that the numerics pins suffice beyond this CPU: run the pinned-numerics fixture (`tests/numerics_fixture.py`)
natively and under valgrind, whose emulated CPU is a GenuineIntel with AVX2 and without AVX-512, and compare the digests;
the same without the pins (`DINOQPM_NUMERICS=native`) shows what they change. Writes benchmarks/results/numerics.json.

    .venv/bin/python tools/check_numerics.py        # ~5 minutes (valgrind runs torch ~20x slower); needs Debian's valgrind
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN_VARS = ('MKL_CBWR', 'ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'NPY_DISABLE_CPU_FEATURES', 'OPENBLAS_CORETYPE',
            'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'DINOQPM_NUMERICS', 'DINOQPM_THREADS')


def run(emulated: bool, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    env.update(DINOQPM_NUMERICS=mode, HF_HUB_OFFLINE='1')
    cmd = [sys.executable, str(ROOT / 'tests' / 'numerics_fixture.py')]
    if emulated: cmd = ['valgrind', '--tool=none', '-q', *cmd]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode: raise SystemExit(f'{" ".join(cmd)} failed:\n{r.stderr[-3000:]}')
    out = json.loads(r.stdout[r.stdout.index('{'):])
    out['seconds'] = round(time.time() - t0, 1)
    return out


def main():
    if not shutil.which('valgrind'): raise SystemExit('valgrind is not installed (apt-get install valgrind)')
    res = {f'{mode}_{where}': run(where == 'valgrind', mode) for mode in ('reproducible', 'native') for where in ('native_cpu', 'valgrind')}
    same = lambda a, b: all(res[a][k] == res[b][k] for k in ('train_sha256', 'tokens_sha256'))
    verdict = {'pinned_equal_across_cpus': same('reproducible_native_cpu', 'reproducible_valgrind'),
               'unpinned_equal_across_cpus': same('native_native_cpu', 'native_valgrind')}
    fixture = json.loads((ROOT / 'tests' / 'fixtures' / 'numerics.json').read_text())
    verdict['fixture_reproduced'] = all(res['reproducible_native_cpu'][k] == fixture[k] for k in ('train_sha256', 'tokens_sha256'))
    out = {'what': __doc__.strip().splitlines()[0], 'runs': res, 'verdict': verdict}
    (ROOT / 'benchmarks' / 'results').mkdir(parents=True, exist_ok=True)
    (ROOT / 'benchmarks' / 'results' / 'numerics.json').write_text(json.dumps(out, indent=1) + '\n')
    print(json.dumps(verdict, indent=1))
    return 0 if verdict['pinned_equal_across_cpus'] and verdict['fixture_reproduced'] else 1


if __name__ == '__main__':
    raise SystemExit(main())
