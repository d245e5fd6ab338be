"""The paper notebooks (nbs/paper/) under papermill, in the seconds-long smoke mode, as a user runs them."""
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat, numpy as np, pandas as pd, papermill as pm, pytest

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
    _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared, seeds='0')
    fig = shared / 'figures'
    t = pd.read_csv(fig / 'table1.csv', index_col=0)
    compact = t.index[-1]                 # the smoke grid is N_f^c = 1, 2 at N_f* = 6: the row names the point it picked
    assert compact in ('DINO-QPM Compact (N_f*=6, N_f^c=1)', 'DINO-QPM Compact (N_f*=6, N_f^c=2)'), compact
    assert list(t.index) == ['CLS linear probe', 'Dense F^froz (avg-pooled frozen tokens)', 'Dense (DINO-QPM dense phase)',
                             'DINO-SLDD', 'DINO-QSENN', 'DINO-QPM', 'CNN baseline (EfficientNet-Lite0, end to end)',
                             'CNN QPM (EfficientNet-Lite0, end to end)', compact]
    assert (t['backbone'] == ['dinov2_test_tiny'] * 6 + ['efficientnet_lite0_os16_act'] * 2 + ['dinov2_test_tiny']).all()
    assert t.loc[compact, 'SID@5'] == '–'                                 # N_f^c < 5, as the paper prints it
    assert {'Accuracy', 'Plausibility', 'SID@5', 'Class-Independence', 'Contrastiveness', 'converged'} <= set(t.columns)
    assert t['note'].str.startswith('demo: not the paper').all()
    # smoke runs train for 2-3 epochs: no row can be judged converged, and every table says so
    assert t['note'].str.contains('not converged').all() and (t['converged'] == '0/1').all()
    md = (fig / 'table1.md').read_text()
    assert 'NOT THE PAPER' in md and 'dinov2_test_tiny' in md and 'QP (DINO-QPM): seed 0: ' in md
    assert "- CNN baseline (EfficientNet-Lite0, end to end) / CNN QPM (EfficientNet-Lite0, end to end): DEMO STAND-IN for the QPM paper's ResNet50 rows" in md
    assert 'QP (CNN QPM (EfficientNet-Lite0, end to end)): seed 0: ' in md and ', with B' in md
    assert 'NOT CONVERGED (converged: the mean epoch train error' in md and 'DINO-SLDD seed 0: dense: only 3 epoch(s)' in md
    assert 'Where each row stopped: CLS linear probe: dense ran ' in md and '(0/1 seeds stopped)' in md
    assert "CLS linear probe: the authors' recipe" in md and '1 seed (0)' in md
    assert 'Probe check: a converged scikit-learn LogisticRegression (C = 1) on the same cached CLS tokens the probe reads' in md
    assert 'On the tokens standardised per feature (which the authors\' recipe does not do) it reaches' in md
    assert 'DINO-QPM Compact is our reading of the paper' in md and 'picked N_f*=6, N_f^c=' in md
    assert "SID@5 of DINO-QPM Compact is '–' (as in the paper)" in md
    # the compactness figure, from the same records as the row: the chosen point's mean accuracy is the row's
    assert all((fig / f'compactness.{ext}').stat().st_size > 0 for ext in ('csv', 'png', 'pdf'))
    grid = pd.read_csv(fig / 'compactness.csv')
    assert grid['run_dir'].notna().any() and not grid['run_dir'].dropna().str.startswith('/').any()   # below the runs folder
    pick = grid[grid['compact'].astype(bool) & grid['seed'].astype(str).str.startswith('mean')]
    assert len(pick) == 1 and f"{pick['Accuracy mean'].iloc[0]:.1f}" == f"{float(t.loc[compact, 'Accuracy']):.1f}"
    assert 'demo' in (fig / 'table1.tex').read_text().lower()
    prov = json.loads((fig / 'table1_provenance.json').read_text())
    assert prov['demo'] is True and prov['seeds'] == [0] and prov['qp'][0]['qp_status'] in ('optimal', 'feasible')
    assert prov['cnn_qp'][0]['qp_locality_bias'] is True and prov['cnn_configs']['0']['backbone']['trainable'] is True
    assert prov['qp'][0]['qp_certificate'].startswith(('certified', 'not certified'))
    assert prov['compact']['reference'] == [6, 2] and prov['compact']['grid'] == [[6, 1], [6, 2]]
    assert 'git_commit' in prov and prov['versions']['torch']
    per_seed = pd.read_csv(fig / 'table1_per_seed.csv')
    assert len(per_seed) == 9 and per_seed['demo'].all() and per_seed['Accuracy'].between(0, 1).all()
    assert not per_seed['converged'].any() and per_seed['not_converged'].str.contains('epoch').all()


def test_compactness_notebook(shared):
    """`nbs/paper/run_compactness.ipynb` (`make compactness`) with `compact_grid=full`: its own cell files (never those of
    `make table1`), DINO-QPM and DINO-QPM Compact on the same runs, and the sweep's figure and table files."""
    _run(ROOT / 'nbs' / 'paper' / 'run_compactness.ipynb', shared, seeds='0')
    fig = shared / 'figures'
    assert all((fig / f'compactness_full.{ext}').stat().st_size > 0 for ext in ('csv', 'png', 'pdf'))
    t = pd.read_csv(fig / 'compactness_full_table1.csv', index_col=0)
    assert list(t.index)[0] == 'DINO-QPM' and list(t.index)[-1].startswith('DINO-QPM Compact (N_f*=6, N_f^c=')
    assert next((shared / 'runs').rglob('table1_qpm_full.json')).exists()
    assert 'PaperParams.compact_grid=full' in (fig / 'compactness_full_table1.md').read_text()


def _dinoqpm(*args, cwd):
    import os
    env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    return subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _dinoqpm_in_process(*args, cwd):
    "As `_dinoqpm`, but `dinoqpm.cli.main` (the code behind `python -m dinoqpm`) in this process: `returncode`, `stderr`."
    import contextlib, io, os
    from types import SimpleNamespace
    from dinoqpm.cli import main
    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err): code = main(['--log-level', 'WARNING', *map(str, args)])
    finally: os.chdir(here)
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def test_table1_merge_writes_the_same_table_without_training(shared, tmp_path):
    """`dinoqpm table1 --merge` reads the cells the notebook ran: the same table, byte for byte, and no model file touched."""
    if not (shared / 'figures' / 'table1.csv').exists(): _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared, seeds='0')
    models = {p: p.stat().st_mtime_ns for p in (shared / 'runs').rglob('*.pt')}
    r = _dinoqpm_in_process('table1', '--merge', '--set', 'mode=smoke', '--set', 'seeds=0', '--set', f'runs_root={shared / "runs"}', '--set',
                 f'out_dir={tmp_path / "merged"}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ('table1.csv', 'table1_per_seed.csv', 'table1.md'):
        assert (tmp_path / 'merged' / f).read_text() == (shared / 'figures' / f).read_text(), f
    assert {p: p.stat().st_mtime_ns for p in (shared / 'runs').rglob('*.pt')} == models


def test_table1_one_cell_then_merge_names_the_missing_cells(tmp_path):
    "The cell through `python -m dinoqpm`, the refusals after it in this process."
    args = ('--set', 'mode=smoke', '--set', 'seeds=0', '--set', f'runs_root={tmp_path / "runs"}', '--set', f'out_dir={tmp_path / "fig"}')
    r = _dinoqpm('table1', '--only', 'method=dense_frozen,seed=0', *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / 'runs' / 'SynthBirds' / 'dinov2_test_tiny').iterdir())
    assert runs == ['dense_frozen']                                         # only that cell's run directory
    assert not (tmp_path / 'fig').exists()
    r = _dinoqpm_in_process('table1', '--merge', *args, cwd=tmp_path)
    assert r.returncode == 2 and '4 Table 1 cell(s) are not finished' in r.stderr and 'method=qpm,seed=0' in r.stderr
    assert 'method=cnn_qpm,seed=0' in r.stderr
    r = _dinoqpm_in_process('table1', '--only', 'method=svm', *args, cwd=tmp_path)
    assert r.returncode == 2 and "unknown method 'svm'" in r.stderr
    cell = next((tmp_path / 'runs').rglob('table1_dense_frozen.json'))
    cell.write_text('{"params": ')                                          # a truncated cell file
    r = _dinoqpm_in_process('table1', '--merge', *args, cwd=tmp_path)
    assert r.returncode == 2 and f'{cell} is damaged' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert '--only method=dense_frozen,seed=0' in r.stderr


def test_table1_regenerates_the_committed_tables_from_their_records(synthbirds_default, tmp_path):
    """A one-dataset Table 1 is written as it always was: the committed figures/table1.{csv,md,tex}, byte for byte, from
    the committed per-seed records and parameters (nothing trained; the data root only gives the demo's training-set size)."""
    import dataclasses
    from dinoqpm.paper import paper_params, write_table1
    prov = json.loads((ROOT / 'figures' / 'table1_provenance.json').read_text())
    p = paper_params(**{**prov['params'], 'data_root': str(synthbirds_default), 'out_dir': str(tmp_path)})
    assert not p.datasets and dataclasses.asdict(p)['dataset'] == prov['params']['dataset']
    write_table1(pd.read_csv(ROOT / 'figures' / 'table1_per_seed.csv').drop(columns='demo'), p)
    for f in ('table1.csv', 'table1.md', 'table1.tex'):
        assert (tmp_path / f).read_bytes() == (ROOT / 'figures' / f).read_bytes(), f


def _grouped_md_tables(md: str) -> list:
    "Every table of a Markdown file written with column groups, as a DataFrame of strings with `(group, column)` columns."
    lines, tables, i = md.splitlines(), [], 0
    while i < len(lines):
        if not (lines[i].startswith('|') and i + 1 < len(lines) and lines[i + 1].startswith('|---')): i += 1; continue
        block = []
        while i < len(lines) and lines[i].startswith('|'):
            block.append([c.strip() for c in lines[i].strip().strip('|').split('|')]); i += 1
        groups, g = [], ''
        for c in block[0][1:]: g = c or g; groups.append(g)
        names = [c.strip('*') for c in block[2][1:]]
        tables.append(pd.DataFrame([r[1:] for r in block[3:]], index=[r[0] for r in block[3:]],
                                   columns=pd.MultiIndex.from_arrays([groups, names])))
    return tables


def _shown(v) -> str:
    "A fraction of one seed as the table shows it (in %, one decimal; '–' when missing)."
    return '–' if v is None or pd.isna(v) else f'{100 * v:.1f}'


def test_table1_two_datasets_side_by_side(shared, smoke, tmp_path):
    """SynthBirds and a folder of the same kind of images without masks/ (written from the session's smoke data), in one
    Table 1 in smoke mode (SynthBirds' cells are those the notebook test trained, reused): a column group each,
    Plausibility in SynthBirds' group only and the folder's reason in the notes, no published numbers (said), and every
    number that of its dataset's own cell records, read here from the cell files; `dinoqpm table1 --merge` writes the same."""
    from dinoqpm.data import export_cub_as_folder, load_dataset
    from dinoqpm.evaluation import TABLE1_METRICS
    from dinoqpm.paper import cell_file, list_table1_rows, paper_params, run_table1, table1_cells, write_table1, resolve_compact
    birds = export_cub_as_folder(load_dataset('SynthBirds', 'train', root=smoke.data, generate=False), tmp_path / 'birds',
                                 masks=False, progress=False)
    sets = ('--set', 'mode=smoke', '--set', 'seeds=0', '--set', f'runs_root={shared / "runs"}', '--set', f'datasets=SynthBirds,folder:{birds}')
    p = paper_params(mode='smoke', seeds='0', runs_root=str(shared / 'runs'), datasets=f'SynthBirds,folder:{birds}',
                     out_dir=str(tmp_path / 'fig'))
    write_table1(run_table1(p, progress=False), p)
    fig = tmp_path / 'fig'
    table = pd.read_csv(fig / 'table1.csv', header=[0, 1], index_col=0, dtype=str)
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ['SynthBirds', 'folder-birds']
    assert ('SynthBirds', 'Plausibility') in table and ('folder-birds', 'Plausibility') not in table
    md = (fig / 'table1.md').read_text()
    assert '- folder-birds: no Plausibility column (no segmentation masks: the image folder has no masks/ folder' in md
    assert '- No published numbers for SynthBirds, folder-birds: the paper reports CUB2011 and StanfordCars only.' in md
    assert 'Published numbers (the paper' not in md and 'Table 1 (DEMO in SynthBirds, folder-birds' in md
    assert _grouped_md_tables(md)[0].equals(table.fillna(''))                      # the Markdown shows the CSV's cells
    for q in p.per_dataset():                       # every number: its dataset's own records, from its cells' files
        group = q.dataset_label
        recs = [r for cell, seed in table1_cells(q) for r in json.loads(cell_file(q, cell, seed).read_text())['records']]
        recs = resolve_compact(q, recs)             # DINO-QPM Compact: the grid point picked across seeds, as the merge does
        assert len(recs) == len(list_table1_rows()) and {r['dataset'] for r in recs} == {group}
        for r in recs:
            assert table.loc[r['method'], (group, 'note')].startswith('demo: not the paper'), (group, r['method'])
            for k in TABLE1_METRICS:
                if (group, k) not in table:
                    assert k == 'Plausibility' and r[k] is None and 'masks/' in r['plausibility_skipped']; continue
                assert table.loc[r['method'], (group, k)] == _shown(r[k]), (group, r['method'], k)
    per_seed = pd.read_csv(fig / 'table1_per_seed.csv')
    assert list(per_seed['dataset']) == ['SynthBirds'] * len(list_table1_rows()) + ['folder-birds'] * len(list_table1_rows())
    assert per_seed['demo'].all()
    prov = json.loads((fig / 'table1_provenance.json').read_text())
    assert list(prov['datasets']) == ['SynthBirds', 'folder-birds'] and prov['params']['datasets'] == f'SynthBirds,folder:{birds}'
    r = _dinoqpm_in_process('table1', '--merge', *sets, '--set', f'out_dir={tmp_path / "merged"}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ('table1.csv', 'table1.md', 'table1.tex', 'table1_per_seed.csv'):
        assert (tmp_path / 'merged' / f).read_bytes() == (fig / f).read_bytes(), f


def test_table1_cub_and_cars_groups_with_the_published_numbers(tmp_path):
    """The paper's layout for `datasets=CUB2011,StanfordCars`, from made-up records (nothing trained): a CUB2011 and a
    StanfordCars group in that order, no Cars Plausibility, and the published numbers in the same groups, each the paper's
    column of that dataset (`published_table1`); repeated or unknown datasets are refused in one line."""
    from dinoqpm.evaluation import published_table1
    from dinoqpm.paper import paper_params, write_table1
    rows = [('linear_probe', 'CLS linear probe'), ('qpm', 'DINO-QPM')]
    recs = [{'method': m, 'row': k, 'seed': s, 'dataset': d, 'backbone': 'dinov2_vitb14_reg4', 'Accuracy': a + 0.01 * s,
             'Plausibility': None if d == 'StanfordCars' else 0.4 + i / 10, 'SID@5': 0.5 + i / 10, 'Class-Independence': 0.9,
             'Contrastiveness': 0.6 + i / 10, 'converged': True, 'plausibility_skipped': 'no masks' if d == 'StanfordCars' else None}
            for d, a in (('CUB2011', 0.8), ('StanfordCars', 0.9)) for s in (0, 1) for i, (k, m) in enumerate(rows)]
    p = paper_params(mode='full', seeds='0,1', datasets='CUB2011,StanfordCars', out_dir=str(tmp_path))
    write_table1(pd.DataFrame(recs), p)
    ours, published = _grouped_md_tables((tmp_path / 'table1.md').read_text())
    for t in (ours, published): assert list(dict.fromkeys(t.columns.get_level_values(0))) == ['CUB2011', 'StanfordCars']
    assert ('CUB2011', 'Plausibility') in ours and ('StanfordCars', 'Plausibility') not in ours
    assert ours.loc['DINO-QPM', ('CUB2011', 'Accuracy')] == '80.5 ± 0.7' and ours.loc['DINO-QPM', ('StanfordCars', 'Accuracy')] == '90.5 ± 0.7'
    assert ours.loc['DINO-QPM', ('CUB2011', 'Plausibility')] == '50.0 ± 0.0'
    assert ('CUB2011', 'Plausibility') in published and ('StanfordCars', 'Plausibility') not in published
    for d in ('CUB2011', 'StanfordCars'):
        paper = published_table1(d)
        assert list(published.index) == list(paper.index)
        for m in paper.index:
            for k in paper.columns:
                if (d, k) in published: assert published.loc[m, (d, k)] == ('–' if pd.isna(paper.loc[m, k]) else str(paper.loc[m, k])), (d, m, k)
    assert published.loc['DINO-QPM', ('CUB2011', 'Accuracy')] == '88.3' and published.loc['DINO-QPM', ('StanfordCars', 'Accuracy')] == '94.0'
    assert published.loc['ResNet50 QPM (QPM paper)', ('StanfordCars', 'SID@5')] == '88.2'
    assert r'\multicolumn{5}{c}{CUB2011} & \multicolumn{4}{c}{StanfordCars} \\' in (tmp_path / 'table1.tex').read_text()
    for bad, msg in (('CUB2011,StanfordCars,CUB2011', 'name CUB2011 twice'), ('CUB2011,Cars', "unknown dataset 'Cars'")):
        r = _dinoqpm_in_process('table1', '--merge', '--set', f'datasets={bad}', cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count('\n') == 1, r.stderr


def _row_data(p, row: str, seed: int) -> tuple:
    "The (train, test) data a Table 1 row was trained and evaluated on: the token caches, or the CNN rows' images."
    from dinoqpm.paper import paper_config, paper_cnn_config
    from dinoqpm.paper.table1 import CNN_ROWS
    from dinoqpm.pipeline import load_run_data
    return load_run_data((paper_cnn_config if row in CNN_ROWS else paper_config)(p, seed), progress=False)


def test_table1_numbers_match_an_independent_computation(shared):
    """The wiring from evaluate to the table files: Accuracy, Plausibility and SID@5 of every row, recomputed here from the
    saved model file's maps and weights with the plain-numpy metrics of tests/reference_metrics.py, equal the per-seed CSV,
    and the table shows their percentages."""
    import torch
    from reference_metrics import accuracy, plausibility_gradcam, sid_at_5
    from dinoqpm.paper import paper_params, paper_config
    from dinoqpm.pipeline import load_caches
    from dinoqpm.train import load_model, extract_features
    if not (shared / 'figures' / 'table1_per_seed.csv').exists(): _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared, seeds='0')
    per_seed = pd.read_csv(shared / 'figures' / 'table1_per_seed.csv')
    table = pd.read_csv(shared / 'figures' / 'table1.csv', index_col=0, dtype=str)
    p = paper_params(mode='smoke', runs_root=str(shared / 'runs'), out_dir=str(shared / 'figures'))
    checked = set()
    for r in per_seed.itertuples():
        _, test = _row_data(p, r.row, int(r.seed))                      # tokens, or the CNN rows' images
        y = np.asarray(test.labels)
        model = load_model(p.runs_path / r.model_file)            # relative to the runs folder
        out = extract_features(model, test, with_maps=True)
        W = model.head_weight().detach().numpy()
        rel = np.nonzero((W != 0).any(0))[0]                                 # the metrics see the relevant features only
        maps, logits = out['maps'].numpy()[:, rel], out['logits'].numpy()
        preds = logits.argmax(1)
        ref = {'Accuracy': accuracy(logits, y), 'Plausibility': plausibility_gradcam(maps, W[:, rel], preds, test.masks_dilated),
               'SID@5': sid_at_5(maps, W[:, rel], preds)}
        for k, v in ref.items():
            got = per_seed.loc[r.Index, k]
            if np.isnan(v): assert pd.isna(got), (r.method, k, got); continue
            assert got == pytest.approx(v, abs=1e-6), (r.method, k, got, v)
            assert table.loc[r.method, k] == f'{100 * v:.1f}', (r.method, k, table.loc[r.method, k], v)
            checked.add(k)
    assert checked == {'Accuracy', 'Plausibility', 'SID@5'}


def test_table1_feature_scores_are_those_of_the_features_each_model_uses(shared):
    """Class-Independence, Contrastiveness and Correlation of every row and seed in the per-seed CSV, recomputed here on
    the training features of the columns of its saved head that any class uses (tests/reference_metrics.py): for the sparse
    rows (DINO-SLDD and DINO-QSENN keep some selected features without a weight) those, not every column of the head."""
    from reference_metrics import class_independence_per_feature, contrastiveness_per_feature, correlation_per_feature, non_zero_columns
    from dinoqpm.paper import paper_params, paper_config, paper_cnn_config
    from dinoqpm.paper.table1 import CNN_ROWS
    from dinoqpm.pipeline import load_caches
    from dinoqpm.train import load_model, extract_features
    if not (shared / 'figures' / 'table1_per_seed.csv').exists(): _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared, seeds='0')
    per_seed = pd.read_csv(shared / 'figures' / 'table1_per_seed.csv')
    table = pd.read_csv(shared / 'figures' / 'table1.csv', index_col=0, dtype=str)
    p = paper_params(mode='smoke', runs_root=str(shared / 'runs'), out_dir=str(shared / 'figures'))
    unused, kinds = {}, {}
    for r in per_seed.itertuples():
        cfg = (paper_cnn_config if r.row in CNN_ROWS else paper_config)(p, int(r.seed))
        train, _ = _row_data(p, r.row, int(r.seed))
        model = load_model(p.runs_path / r.model_file)
        W = model.head_weight().detach().numpy()
        rel = non_zero_columns(W)
        unused[r.row], kinds[r.row] = W.shape[1] - len(rel), model.head.kind
        if r.row in ('sldd', 'qsenn', 'qpm', 'cnn_qpm'): assert (W != 0).sum() == cfg.qp.n_per_class * W.shape[0], r.row
        f = extract_features(model, train)['features'].numpy()[:, rel]
        ref = {'Class-Independence': class_independence_per_feature(f, np.asarray(train.labels), W.shape[0]).mean(),
               'Contrastiveness': contrastiveness_per_feature(f, int(r.seed)).mean(), 'Correlation': correlation_per_feature(f).mean()}
        for k, v in ref.items():
            assert per_seed.loc[r.Index, k] == pytest.approx(v, abs=1e-6), (r.method, k, per_seed.loc[r.Index, k], v)
            if k != 'Correlation': assert table.loc[r.method, k] == f'{100 * v:.1f}', (r.method, k, table.loc[r.method, k], v)
    assert unused['sldd'] > 0 and unused['qsenn'] > 0, unused        # the sparse rows leave features out: the check bites
    assert unused['qpm'] == 0 and unused['cnn_qpm'] == 0, unused
    assert kinds == {'linear_probe': 'dense', 'dense_frozen': 'dense', 'dense_qpm': 'dense', 'sldd': 'sparse', 'qsenn': 'sparse',
                     'qpm': 'bldd', 'cnn_dense': 'dense', 'cnn_qpm': 'bldd', 'compact': 'bldd'}, kinds   # each row's model file is that row's model


def test_global_figure_shows_each_features_most_activating_test_images(shared):
    """The global-explanation figure's image patches: for every selected feature of DINO-QPM, its `n_images` test images
    with the largest pooled activation, largest first, by an argsort written here on the saved model's test features."""
    import matplotlib.pyplot as plt
    from dinoqpm.paper import figure_data, paper_params, row_run_dir, assignment_overview_figure
    from dinoqpm.train import load_model, extract_features
    if not (shared / 'figures' / 'table1_per_seed.csv').exists(): _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', shared, seeds='0')
    p = paper_params(mode='smoke', runs_root=str(shared / 'runs'), out_dir=str(shared / 'figures'))
    d = figure_data(p, progress=False)
    f = extract_features(load_model(row_run_dir(p, d.cfg, 'qpm') / 'finetune_model.pt'), d.test_cache)['features'].numpy()
    shown, image = [], d.image
    d.image = lambda k: (shown.append(int(k)), image(k))[1]
    plt.close(assignment_overview_figure(d, n_images=3))
    want = [k for j in range(f.shape[1]) for k in sorted(range(len(f)), key=lambda k: (-float(f[k, j]), k))[:3]]
    assert shown == want

@pytest.mark.parametrize('name,files', [('run_fig_cover', ['fig_cover']), ('run_fig_classes', ['fig_classes', 'fig_global'])])
def test_figure_notebooks(shared, name, files):
    _run(ROOT / 'nbs' / 'paper' / f'{name}.ipynb', shared)
    for f in files:
        for ext in ('png', 'pdf'):
            assert (shared / 'figures' / f'{f}.{ext}').stat().st_size > 2000, f'{f}.{ext}'

def test_figures_draw_every_feature_as_the_explorer_does(shared):
    "One style per model: the figures' colours and map levels are the exported explorer's (its card), feature by feature."
    from dinoqpm.share import export_model
    from dinoqpm.paper import figure_data, figure_style, paper_params, row_run_dir
    p = paper_params(mode='smoke', runs_root=str(shared / 'runs'), out_dir=str(shared / 'figures'))
    d = figure_data(p, progress=False)
    style = figure_style(d)
    card = json.loads((export_model(row_run_dir(p, d.cfg, 'qpm'), shared / 'style_export', explorer=False, progress=False)
                       / 'explanation.json').read_text())
    assert [f['position'] for f in card['features']] == list(range(len(style)))
    assert [f['color'] for f in card['features']] == list(style.colors)
    for f in card['features']:
        assert (f['levels']['lo'], f['levels']['hi']) == pytest.approx((style.lo[f['position']], style.hi[f['position']]), abs=1e-9)
    assert len(set(style.hi)) > 1                                           # levels per feature, not one scale


def test_misspelt_parameter_fails(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match='sed'):
        _run(ROOT / 'nbs' / 'paper' / 'run_table1.ipynb', tmp_path, sed=3, seeds='0')
