"""The paper notebooks (nbs/paper/) under papermill, in the seconds-long smoke mode, as a user runs them."""
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat, pandas as pd, papermill as pm, pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / 'nbs' / 'paper').glob('*.ipynb'))

@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    "One runs folder for the module, so the figure notebooks reuse the runs the Table 1 notebook trained."
    return tmp_path_factory.mktemp('paper')

def _run(nb, tmp, **params):
    out = tmp / f'{nb.stem}.out.ipynb'
    pm.execute_notebook(str(nb), str(out), kernel_name='python3', cwd=str(tmp), progress_bar=False,
                        parameters={'mode': 'smoke', 'runs_root': str(tmp / 'runs'), 'out_dir': str(tmp / 'figures'), **params})
    return nbformat.read(out, as_version=4)

def test_every_paper_notebook_has_one_parameters_cell():
    assert {p.stem for p in PAPER} >= {'run_table1', 'run_fig_cover', 'run_fig_classes'}
    for nb in PAPER:
        tagged = [c for c in nbformat.read(nb, as_version=4).cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1, f'{nb.name}: {len(tagged)} cells tagged parameters'

def test_nbdev_clean_keeps_the_parameters_tag(tmp_path):
    repo = tmp_path / 'repo'
    shutil.copytree(ROOT / 'nbs', repo / 'nbs')
    shutil.copy(ROOT / 'settings.ini', repo / 'settings.ini')
    r = subprocess.run([sys.executable, '-c', 'from nbdev.clean import nbdev_clean; nbdev_clean()'], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for nb in (repo / 'nbs' / 'paper').glob('*.ipynb'):
        assert any('parameters' in c.metadata.get('tags', []) for c in nbformat.read(nb, as_version=4).cells), nb.name

def test_table1_notebook(shared):
    _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared)
    fig = shared / 'figures'
    t = pd.read_csv(fig / 'table1.csv', index_col=0)
    assert list(t.index) == ['CLS linear probe', 'Dense F^froz (avg-pooled frozen tokens)', 'Dense (DINO-QPM dense phase)',
                             'DINO-SLDD', 'DINO-QSENN', 'DINO-QPM']
    assert {'Accuracy', 'Plausibility', 'SID@5', 'Class-Independence', 'Contrastiveness'} <= set(t.columns)
    assert (t['note'] == 'demo: not the paper').all()
    md = (fig / 'table1.md').read_text()
    assert 'NOT THE PAPER' in md and 'dinov2_test_tiny' in md and 'QP: seed 0:' in md
    assert 'demo' in (fig / 'table1.tex').read_text().lower()
    prov = json.loads((fig / 'table1_provenance.json').read_text())
    assert prov['demo'] is True and prov['seeds'] == [0] and prov['qp'][0]['qp_status'] in ('optimal', 'feasible')
    assert 'git_commit' in prov and prov['versions']['torch']
    per_seed = pd.read_csv(fig / 'table1_per_seed.csv')
    assert len(per_seed) == 6 and per_seed['demo'].all() and per_seed['Accuracy'].between(0, 1).all()

@pytest.mark.parametrize('name,files', [('run_fig_cover', ['fig_cover']), ('run_fig_classes', ['fig_classes', 'fig_global'])])
def test_figure_notebooks(shared, name, files):
    _run(ROOT / 'nbs' / 'paper' / f'{name}.ipynb', shared)
    for f in files:
        for ext in ('png', 'pdf'):
            assert (shared / 'figures' / f'{f}.{ext}').stat().st_size > 2000, f'{f}.{ext}'

def test_misspelt_parameter_fails(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match='sed'):
        _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', tmp_path, sed=3)
