"""Issue 22: the compactness sweep and DINO-QPM Compact. The pure parts (the QP's feasibility check, the grid, the rule that
picks Compact, SID@k) on synthetic inputs; the sweep itself on the session's smoke run (4 classes, 16 features), a tiny
grid on one dense phase, killed and resumed."""
import itertools, math, os, shutil
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

from dinoqpm.config import ConfigError, update_config
from dinoqpm.qp import qp_infeasible_reason, check_qp_inputs
from dinoqpm.paper import compactness as CP
from dinoqpm.paper.compactness import COMPACT_GRID, plan_grid, choose_compact, compact_tolerance, run_grid


# ---------------------------------------------------------------- the QP's feasibility check, one function
@pytest.mark.parametrize('K, k, C, J, expected', [
    (10, 1, 20, 64, 'C(10, 1) = 10 sets exist'),          # 10 < 20 classes
    (20, 1, 20, 64, None),                                 # C(20, 1) = 20: just enough
    (20, 2, 196, 1000, 'C(20, 2) = 190 sets exist'),       # Cars: 190 < 196
    (10, 4, 200, 1000, None),                              # C(10, 4) = 210 >= 200
    (70, 5, 20, 64, 'n_select=70 exceeds the 64 features'),
    (3, 4, 2, 64, 'n_per_class=4 exceeds n_select=3'),
    (3, 0, 2, 64, 'n_per_class=0 must be >= 1'),
])
def test_qp_infeasible_reason(K, k, C, J, expected):
    why = qp_infeasible_reason(K, k, C, J)
    if expected is None: assert why is None
    else: assert expected in why, why
    assert (why is None) == (k >= 1 and K <= J and k <= K and math.comb(K, k) >= C)


def test_check_qp_inputs_and_validate_run_config_say_the_same(smoke):
    """The QP's own refusal and the run configuration's are the same sentence (the config's with its keys' names)."""
    from dinoqpm.pipeline import validate_run_config
    A, R = np.zeros((16, 4)), np.zeros((16, 16))
    with pytest.raises(ValueError) as qp_err: check_qp_inputs(A, R, 3, 2)
    with pytest.raises(ConfigError) as cfg_err:
        validate_run_config(update_config(smoke.cfg, {'qp.n_select': 3, 'qp.n_per_class': 2}))
    assert str(qp_err.value) == qp_infeasible_reason(3, 2, 4, 16)
    assert str(cfg_err.value) == qp_infeasible_reason(3, 2, 4, 16, names=('qp.n_select', 'qp.n_per_class'))


# ---------------------------------------------------------------- the grid
def test_plan_grid_demo_cub_and_the_adapter_width():
    demo = plan_grid(COMPACT_GRID, 20, 64)
    assert len(demo) == 30 and [p.key for p in demo if not p.feasible] == ['K10_k1']
    cub = plan_grid(COMPACT_GRID, 200, 768)
    skipped = {(p.n_select, p.n_per_class): p.reason for p in cub if not p.feasible}
    assert set(skipped) == {*((K, 1) for K in COMPACT_GRID['n_select']), (10, 2), (10, 3), (20, 2)}
    for (K, k), why in skipped.items():                     # every reason names the count of sets against the classes
        assert f'C({K}, {k}) = {math.comb(K, k)} sets' in why and why.startswith('200 classes'), why
    narrow = plan_grid(COMPACT_GRID, 4, 16)
    assert {p.n_select for p in narrow if p.feasible} == {10}
    assert all('exceeds the 16 features the adapter makes' in p.reason for p in narrow if p.n_select > 16)


def test_compact_grid_holds_the_reference():
    assert CP.compact_grid('column', (50, 5)) == {'n_select': (50,), 'n_per_class': (1, 2, 3, 4, 5)}
    full = CP.compact_grid('full', (6, 2))
    assert 6 in full['n_select'] and set(COMPACT_GRID['n_select']) <= set(full['n_select'])
    with pytest.raises(ConfigError, match='compact_grid'): CP.compact_grid('half', (6, 2))


# ---------------------------------------------------------------- the rule
def _synthetic_points(rng, seeds=3, drop=0.0):
    """A random grid (N_f* x N_f^c) of accuracies per seed, the reference (50, 5) among them; some records missing."""
    rows = []
    for K, k in itertools.product((10, 20, 30, 40, 50, 60), (1, 2, 3, 4, 5)):
        base = 0.80 - 0.03 * (5 - k) * rng.random() - 0.002 * (60 - K) * rng.random()
        for s in range(seeds):
            if (K, k) != (50, 5) and rng.random() < drop: continue
            rows.append(dict(seed=s, n_select=K, n_per_class=k, Accuracy=base + rng.normal(0, 0.01)))
    return pd.DataFrame(rows)


@pytest.mark.parametrize('case', range(12))
def test_choose_compact_against_brute_force(case):
    """The pick qualifies, and no qualifying point was passed over: none with fewer links (classes x N_f^c), none with as
    many links and fewer selected features. Means, tolerance and eligibility recomputed here from the raw records."""
    rng = np.random.default_rng(case)
    pts = _synthetic_points(rng, seeds=1 + case % 3, drop=0.15 if case % 2 else 0.0)
    ref = pts[(pts.n_select == 50) & (pts.n_per_class == 5)].sort_values('seed')['Accuracy'].to_numpy()
    n_classes = 200
    got = choose_compact(pts, ref, reference=(50, 5))
    seeds = set(pts.seed)
    tol = max(0.5, float(np.std(100 * ref, ddof=1)) if len(ref) > 1 else 0.0)
    assert got['tolerance'] == pytest.approx(tol) and got['reference'] == (50, 5)

    def qualifies(K, k):
        sub = pts[(pts.n_select == K) & (pts.n_per_class == k)]
        return set(sub.seed) == seeds and 100 * sub.Accuracy.mean() >= 100 * ref.mean() - tol - 1e-9

    K, k = got['n_select'], got['n_per_class']
    assert qualifies(K, k)
    for (K2, k2), _ in pts.groupby(['n_select', 'n_per_class']):
        if (n_classes * k2, K2) < (n_classes * k, K): assert not qualifies(K2, k2), ((K2, k2), (K, k))


def test_tolerance_is_half_a_point_or_one_seed_std():
    assert compact_tolerance([0.80]) == 0.5                                   # one seed: no std
    assert compact_tolerance([0.800, 0.801, 0.802]) == 0.5                    # std 0.1 points < 0.5
    assert compact_tolerance([0.7475, 0.7377, 0.7967]) == pytest.approx(np.std([74.75, 73.77, 79.67], ddof=1))


def test_rule_better_accuracy_qualifies_and_a_missing_seed_does_not():
    rows = [dict(seed=s, n_select=K, n_per_class=k, Accuracy=a) for s in (0, 1)
            for K, k, a in [(20, 5, 0.70), (20, 1, 0.90), (10, 2, 0.69)]]
    assert choose_compact(pd.DataFrame(rows), [0.70, 0.70])['n_per_class'] == 1          # 20 points better: qualifies
    rows = [r for r in rows if not (r['n_per_class'] == 1 and r['seed'] == 1)]
    got = choose_compact(pd.DataFrame(rows), [0.70, 0.70])          # (20, 1) lacks a seed; (10, 2) is 1 point worse (> 0.5)
    assert (got['n_select'], got['n_per_class']) == (20, 5)
    with pytest.raises(ValueError, match='reference point'):
        choose_compact(pd.DataFrame(rows), [0.99, 0.99])


# ---------------------------------------------------------------- SID@k
def test_sid_at_k_where_sid5_is_undefined_by_hand():
    """Two classes of three features each. Class 0's maps peak at three different positions: SID@3 = 1 (one-hot
    softmaxes after the mean-|F| normalisation on a 16x16 grid); class 1's three maps are the same map: SID@3 = 1/3. One
    test image predicted as each: SID@k = (1 + 1/3) / 2 = 2/3 at k = 3 = N_f^c, and SID@5 is undefined."""
    from dinoqpm.evaluation import evaluate_arrays
    rng = np.random.default_rng(0)
    maps = np.zeros((2, 6, 16, 16))
    maps[:, np.arange(3), [0, 5, 9], [1, 7, 12]] = 50.
    maps[:, 3:] = rng.random((1, 1, 16, 16))
    W = np.zeros((2, 6)); W[0, :3] = 1; W[1, 3:] = 1
    res = evaluate_arrays(train_features=rng.random((8, 6)), train_labels=np.arange(8) % 2, test_preds=np.array([0, 1]),
                          test_labels=np.array([0, 1]), test_maps=maps, weight=W, eval_mode=['sid'])
    assert math.isnan(res['SID@5']) and res['SID_k'] == 3
    assert res['SID@k'] == pytest.approx(2 / 3, abs=1e-12)
    assert 'k=3' in res['skipped']['sid'] and '>= 5' in res['skipped']['sid']
    W5 = np.zeros((2, 10)); W5[0, :5] = 1; W5[1, 5:] = 1
    res5 = evaluate_arrays(train_features=rng.random((8, 10)), train_labels=np.arange(8) % 2, test_preds=np.array([0, 1]),
                           test_labels=np.array([0, 1]), test_maps=rng.random((2, 10, 4, 4)), weight=W5, eval_mode=['sid'])
    assert res5['SID_k'] == 5 and res5['SID@k'] == res5['SID@5'] and not math.isnan(res5['SID@5'])
    assert 'sid' not in res5['skipped']


# ---------------------------------------------------------------- the sweep on one dense phase: planned first, resumable
def test_feasibility_of_every_point_is_checked_before_any_work(tmp_path, monkeypatch):
    events = []
    real_plan = CP.plan_grid
    monkeypatch.setattr(CP, 'plan_grid', lambda *a, **k: events.append('plan') or real_plan(*a, **k))
    def fake_run(cfg, run_dir, dense_from=None, **kw):
        events.append((cfg.qp.n_select, cfg.qp.n_per_class))
        return {'results': {'Accuracy': 0.5}}
    from dinoqpm.config import RunConfig, QPConfig
    cfg = RunConfig(qp=QPConfig(n_select=6, n_per_class=2))
    recs = run_grid(cfg, {'n_select': (3, 6), 'n_per_class': (1, 2)}, tmp_path / 'ref', lambda p: tmp_path / p.key,
                    n_classes=4, run=fake_run)
    assert events == ['plan', (6, 2), (6, 1)]
    assert [r['skipped'] is not None for r in recs] == [True, True, False, False]
    assert not (tmp_path / 'K3_k1').exists() and not (tmp_path / 'K3_k2').exists()
    events.clear()                                        # a grid without its reference point: refused before any run
    with pytest.raises(ConfigError, match='must hold the reference point'):
        run_grid(cfg, {'n_select': (3, 8), 'n_per_class': (1,)}, tmp_path / 'ref', lambda p: tmp_path / p.key, n_classes=4,
                 run=fake_run)
    assert events == ['plan']


def test_smoke_sweep_one_dense_phase_killed_and_resumed(smoke, tmp_path):
    """The smoke run (4 classes, 16 features, reference (6, 2)) on the grid {3, 4, 6} x {1, 2}: (3, 1) and (3, 2) are
    skipped (C(3, k) = 3 < 4 classes) with no run directory; (4, 1), (4, 2), (6, 1) are three new QPs and finetunes on the
    reference's dense model. The first sweep is killed after one new point; the second finishes without retraining it;
    a third retrains nothing."""
    ref_dir = tmp_path / 'qpm' / '0'
    shutil.copytree(smoke.run, ref_dir)                   # the session's run is read-only: work on a copy
    grid = {'n_select': (3, 4, 6), 'n_per_class': (1, 2)}
    point_dir = lambda p: tmp_path / 'compactness' / p.key / '0'
    kw = dict(n_classes=4, cache_root=smoke.cache, eval_mode='fast', progress=False)
    calls = []
    class Killed(Exception): pass
    def killed_after_one_point(cfg, run_dir, **k):
        if len(calls) == 2: raise Killed('the sweep was killed')
        calls.append(run_dir)
        return CP.run_qpm(cfg, run_dir, **k)
    with pytest.raises(Killed): run_grid(smoke.cfg, grid, ref_dir, point_dir, run=killed_after_one_point, **kw)
    first = calls[1] / 'finetune_model.pt'
    assert first.exists()
    t_first = first.stat().st_mtime_ns
    recs = run_grid(smoke.cfg, grid, ref_dir, point_dir, **kw)
    assert first.stat().st_mtime_ns == t_first                                   # finished before the kill: not retrained
    by = {(r['n_select'], r['n_per_class']): r for r in recs}
    assert [k for k, r in by.items() if r['skipped']] == [(3, 1), (3, 2)]
    assert all('C(3, ' in by[k]['skipped'] and by[k]['run_dir'] is None for k in [(3, 1), (3, 2)])
    assert not (tmp_path / 'compactness' / 'K3_k1').exists() and not (tmp_path / 'compactness' / 'K3_k2').exists()
    assert by[(6, 2)]['reference'] and Path(by[(6, 2)]['run_dir']) == ref_dir
    for key in [(4, 1), (4, 2), (6, 1)]:
        d = Path(by[key]['run_dir'])
        assert d == point_dir(CP.GridPoint(*key))
        assert os.path.samefile(d / 'dense_model.pt', ref_dir / 'dense_model.pt') and not (d / 'dense').exists()
        assert 0 <= by[key]['Accuracy'] <= 1 and by[key]['qp_certificate'] and 'converged' in by[key]
        assert by[key]['NFfeatures'] <= key[0] and by[key]['PerClass'] == key[1]
    mtimes = {k: (Path(r['run_dir']) / 'finetune_model.pt').stat().st_mtime_ns for k, r in by.items() if r['run_dir']}
    again = run_grid(smoke.cfg, grid, ref_dir, point_dir, **kw)
    assert {(r['n_select'], r['n_per_class']): (Path(r['run_dir']) / 'finetune_model.pt').stat().st_mtime_ns
            for r in again if r['run_dir']} == mtimes
    assert [r.get('Accuracy') for r in again] == [r.get('Accuracy') for r in recs]
    pick = choose_compact(pd.DataFrame(recs), [by[(6, 2)]['Accuracy']], reference=(6, 2))
    assert pick['n_per_class'] <= 2 and by[(pick['n_select'], pick['n_per_class'])]['Accuracy'] >= by[(6, 2)]['Accuracy'] - 0.005 - 1e-9
