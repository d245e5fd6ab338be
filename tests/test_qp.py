"""The QP (dinoqpm.qp): constants by hand, exact optimum against an independent brute force for both backends,
uniqueness, honest gaps under a time limit, refusals, save/load."""
import itertools, json, math
import numpy as np
import pytest
import dinoqpm.qp as qp
import dinoqpm.qp.solvers as qp_solvers
from dinoqpm.config import ConfigError
from dinoqpm.qp import (QPResult, choose_tau, penalised_pairs, qp_constants, scaled_similarity, solve_qp, solve_qp_exhaustive,
                        solve_qp_naive)

SOLVERS = ['highs', 'cbc']


def brute_force(A, R, n_select, n_per_class, tau, bias=None):
    "Independent reference: every selection, every assignment of distinct k-subsets to the classes; the objective by its definition."
    J, C = A.shape
    Rp = scaled_similarity(R)
    best = -np.inf
    for S in itertools.combinations(range(J), n_select):
        pen = sum(Rp[i, j] for i, j in itertools.combinations(S, 2) if R[i, j] >= tau)
        b = 0.0 if bias is None else float(np.sum(np.asarray(bias)[list(S)]))
        subsets = list(itertools.combinations(S, n_per_class))
        vals = np.array([[A[list(t), c].sum() for t in subsets] for c in range(C)])     # [C, n_subsets]
        za = max(sum(vals[c, p[c]] for c in range(C)) for p in itertools.permutations(range(len(subsets)), C))
        best = max(best, 1000.0 / (n_per_class * C) * za - pen + b)
    return best


def check_feasible(res, J, C, n_select, n_per_class):
    assert res.selection.shape == (n_select,) and len(set(res.selection.tolist())) == n_select
    assert (np.diff(res.selection) > 0).all() and res.selection.min() >= 0 and res.selection.max() < J
    assert res.weight.shape == (C, n_select) and set(np.unique(res.weight).tolist()) <= {0, 1}
    assert (res.weight.sum(1) == n_per_class).all()
    assert len({tuple(r) for r in res.weight.tolist()}) == C, 'two classes share the same features'
    assert res.bound >= res.objective - 1e-9 and res.gap >= 0


def small_instance(seed, J=8, C=4):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((J, C))
    Z = rng.standard_normal((J, 6))
    R = np.corrcoef(Z + 0.8 * Z[rng.integers(0, J, J)])
    np.fill_diagonal(R, 0)
    tau = float(np.percentile(R[np.triu_indices(J, 1)], 60))
    return A, R, tau


def test_constants_by_hand():
    # feature 0 = (1,2,3,4): corr with "class 1" = 0.5 / (sqrt(1.25) * 0.5) = 2/sqrt(5);
    # feature 1 = (1,0,0,0): corr with "class 1" = -0.125 / (sqrt(3/16) * 0.5) = -1/sqrt(3); feature 2 is constant (dead)
    F = np.array([[1., 1, 7], [2, 0, 7], [3, 0, 7], [4, 0, 7]])
    A, R = qp_constants(F, np.array([0, 0, 1, 1]), 2)
    a0, a1 = 2 / np.sqrt(5), 1 / np.sqrt(3)
    np.testing.assert_allclose(A, np.array([[-a0, a0], [a1, -a1], [0, 0]]) / a0, atol=1e-12)
    np.testing.assert_allclose(R, [[0, -1, 0], [-1, 0, 0], [0, 0, 0]], atol=1e-12)
    # R' and the penalised set of method.md §4.5: r_min is the most negative entry
    R2 = np.array([[0, .6, -.4], [.6, 0, .2], [-.4, .2, 0]])
    np.testing.assert_allclose(scaled_similarity(R2)[[0, 1], [1, 2]], [1.0, .6])
    i, j, w = penalised_pairs(R2, 0.2)
    assert (i.tolist(), j.tolist()) == ([0, 1], [1, 2]) and np.allclose(w, [1.0, .6])


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('seed', [0, 1])
def test_optimum_equals_brute_force(solver, seed):
    A, R, tau = small_instance(seed)
    exact = brute_force(A, R, 4, 2, tau)
    for kw in (dict(), dict(warm_start=False, cliques=False)):      # with our heuristics, and the bare MIP
        res = solve_qp(A, R, 4, 2, tau=tau, solver=solver, mip_gap=1e-7, time_limit=30, **kw)
        check_feasible(res, 8, 4, 4, 2)
        assert res.status == 'optimal' and res.solver == solver
        assert res.objective == pytest.approx(exact, abs=1e-6), kw
        assert res.objective == pytest.approx(res.z_a - res.z_r, abs=1e-9)
    assert solve_qp_exhaustive(A, R, 4, 2, tau=tau).objective == pytest.approx(exact, abs=1e-9)


def test_naive_formulation_equals_brute_force():
    A, R, tau = small_instance(2, J=7, C=3)
    res = solve_qp_naive(A, R, 4, 2, tau=tau, mip_gap=1e-7, time_limit=30)
    check_feasible(res, 7, 3, 4, 2)
    assert res.formulation == 'naive' and res.objective == pytest.approx(brute_force(A, R, 4, 2, tau), abs=1e-6)


@pytest.mark.parametrize('solver', SOLVERS)
def test_uniqueness_when_the_unconstrained_optimum_collides(solver):
    rng = np.random.default_rng(7)
    A = rng.standard_normal((8, 4))
    A[:, 1] = A[:, 0] + 1e-3 * rng.standard_normal(8)           # classes 0 and 1 rank the features (nearly) alike
    A[:, 2] = A[:, 0]                                            # class 2 exactly like class 0
    A[[0, 1, 2], :3] += 3                                        # all three want features 0, 1, 2
    R = np.zeros((8, 8))
    tau = 0.5
    top = [tuple(np.argsort(-A[:, c])[:2]) for c in range(3)]
    assert len({frozenset(t) for t in top}) == 1, 'the construction must collide without uniqueness'
    exact = brute_force(A, R, 4, 2, tau)
    for kw in (dict(), dict(warm_start=False)):
        res = solve_qp(A, R, 4, 2, tau=tau, solver=solver, mip_gap=1e-7, time_limit=30, **kw)
        check_feasible(res, 8, 4, 4, 2)
        assert res.objective == pytest.approx(exact, abs=1e-6)
    unconstrained = 1000 / 8 * sum(np.sort(A[res.selection, c])[-2:].sum() for c in range(4))
    assert res.z_a < unconstrained - 1e-6                        # uniqueness cost something, and it was paid


def test_bias_enters_the_objective():
    A, R, tau = small_instance(3)
    bias = np.linspace(-2, 2, 8)
    res = solve_qp(A, R, 4, 2, tau=tau, bias=bias, mip_gap=1e-7, time_limit=30)
    assert res.objective == pytest.approx(brute_force(A, R, 4, 2, tau, bias), abs=1e-6)
    assert res.z_b == pytest.approx(bias[res.selection].sum())


def test_time_limited_run_is_feasible_with_an_honest_gap(monkeypatch, caplog):
    "A solver stopped by the limit (mocked: bound 10 % above the incumbent) must give 'feasible' and that gap, never 'optimal'."
    A, R, tau = small_instance(4, J=12, C=5)
    monkeypatch.setattr(qp.TopKModel, 'solve_lp', lambda self: None)          # no root certificate
    calls = []
    def stopped_by_limit(self, seconds, gap, start=None):
        calls.append(seconds)
        OS = self.mip.OptimizationStatus
        return OS.FEASIBLE, 1.1 * inc_value[0], None, None, None
    inc_value = [None]
    real_offer_value = qp.qp_objective
    def spy(*a, **k):
        out = real_offer_value(*a, **k); inc_value[0] = max(inc_value[0] or -np.inf, out['objective']); return out
    monkeypatch.setattr(qp_solvers, 'qp_objective', spy)
    monkeypatch.setattr(qp.TopKModel, 'solve_mip', stopped_by_limit)
    with caplog.at_level('WARNING', logger='dinoqpm.qp'): res = solve_qp(A, R, 5, 2, tau=tau, time_limit=5)
    assert calls and res.status == 'feasible' and not res.certified
    assert res.bound == pytest.approx(1.1 * res.objective, rel=1e-9)
    assert res.gap == pytest.approx(0.1, rel=1e-6)
    check_feasible(res, 12, 5, 5, 2)
    warned = [r for r in caplog.records if r.levelname == 'WARNING' and 'not certified (gap 10.00% > 0.50%' in r.getMessage()]
    assert len(warned) == 1                                          # never silent
    with pytest.raises(qp.QPNotCertifiedError, match='qp.require_certified is set'):
        solve_qp(A, R, 5, 2, tau=tau, time_limit=5, require_certified=True)


def test_real_time_limit_reports_a_valid_certificate():
    "A CUB-like instance with many penalised pairs and a 3 s limit: whatever the status, the gap is (bound - obj)/obj."
    F, y = qp.synthetic_qp_features(120, 40, 1200, n_concepts=60, concepts_per_class=4, seed=1)
    A, R = qp_constants(F, y, 40)
    tau = float(np.percentile(R[np.triu_indices(120, 1)], 85))
    res = solve_qp(A, R, 20, 3, tau=tau, time_limit=3, heuristic_seconds=0.5)
    check_feasible(res, 120, 40, 20, 3)
    assert res.gap == pytest.approx((res.bound - res.objective) / abs(res.objective), abs=1e-12)
    assert res.status == ('optimal' if res.gap <= 0.005 else 'feasible')
    assert res.seconds < 3 + 10                                   # the limit holds (with slack for a loaded machine)


@pytest.mark.parametrize('kw, message', [
    (dict(n_select=9), 'n_select=9 exceeds the 8 features'),
    (dict(n_select=3, n_per_class=4), 'n_per_class=4 exceeds n_select=3'),
    (dict(n_select=3, n_per_class=2, C=4), 'only C(3, 2) = 3 sets'),
    (dict(nan='A'), 'A contains NaN'),
    (dict(nan='R'), 'R contains NaN or inf'),
    (dict(R_shape=(7, 7)), 'must be [J, J] = [8, 8]'),
    (dict(bias_shape=5), 'bias must have shape (8,)'),
    (dict(solver='gurobi'), "use 'highs' or 'cbc'"),
    (dict(tau_rule='twice'), "'reference' or 'intended'"),
])
def test_bad_input_is_refused_before_solving(kw, message, monkeypatch):
    monkeypatch.setattr(qp_solvers, 'TopKModel', None)           # any attempt to build a model would fail differently
    A, R, tau = small_instance(0, C=kw.get('C', 4))
    if kw.get('nan') == 'A': A[0, 0] = np.nan
    if kw.get('nan') == 'R': R[0, 1] = np.inf
    if 'R_shape' in kw: R = np.zeros(kw['R_shape'])
    bias = np.zeros(kw['bias_shape']) if 'bias_shape' in kw else None
    with pytest.raises(ValueError, match=None) as e:
        solve_qp(A, R, kw.get('n_select', 4), kw.get('n_per_class', 2), tau=None if 'tau_rule' in kw else tau,
                 tau_rule=kw.get('tau_rule', 'reference'), bias=bias, solver=kw.get('solver', 'highs'))
    assert message in str(e.value)


def test_unavailable_solver_names_itself_and_the_alternative(monkeypatch):
    import mip.cbc
    monkeypatch.setattr(mip.cbc, 'has_cbc', False)
    A, R, tau = small_instance(0)
    with pytest.raises(ConfigError) as e: solve_qp(A, R, 4, 2, tau=tau, solver='cbc')
    assert "'cbc' (qp.solver) is not available" in str(e.value) and "qp.solver=highs" in str(e.value)


def test_clique_rule_reference_and_intended():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(5), 4)                               # 5 groups of 4 mutually similar features
    R = np.where(g[:, None] == g[None], 0.7, 0.0) + 0.05 * rng.standard_normal((20, 20))
    R = (R + R.T) / 2; np.fill_diagonal(R, 0)
    ref, intended = choose_tau(R, 5), choose_tau(R, 5, rule='intended')
    assert ref.threshold == intended.threshold and ref.tau == ref.threshold and intended.tau == ref.threshold / 2
    cl = ref.clique
    assert len(cl) >= 5 and (2 * R[np.ix_(cl, cl)][np.triu_indices(len(cl), 1)] < ref.threshold).all()
    assert len(set(g[cl[:5]])) == 5                               # one feature from each group
    iu = np.triu_indices(20, 1)
    assert ref.n_pairs == (R[iu] >= ref.tau).sum() and intended.n_pairs == (R[iu] >= ref.tau / 2).sum()
    res = solve_qp(np.abs(rng.standard_normal((20, 6))), R, 5, 2, tau_rule='intended', time_limit=30)
    assert res.tau == pytest.approx(intended.tau) and res.tau_rule == 'intended' and res.status in ('optimal', 'feasible')


def test_save_load_roundtrip(tmp_path):
    A, R, tau = small_instance(1)
    res = solve_qp(A, R, 4, 2, tau=tau, time_limit=30)
    res.save(tmp_path / 'qp')
    back = QPResult.load(tmp_path / 'qp')
    np.testing.assert_array_equal(back.selection, res.selection); np.testing.assert_array_equal(back.weight, res.weight)
    for f in ('objective', 'bound', 'gap', 'status', 'tau', 'solver', 'n_pairs', 'z_a', 'z_r'):
        assert getattr(back, f) == getattr(res, f)
    meta = json.loads((tmp_path / 'qp' / 'qp_result.json').read_text())
    assert 'provenance' in meta and 'versions' in meta['provenance']
    full = res.assignment_full(8)
    assert full.shape == (4, 8) and (full[:, res.selection] == res.weight).all() and full.sum() == 8
    with pytest.raises(FileNotFoundError, match='selection.npy'):
        (tmp_path / 'qp' / 'selection.npy').unlink(); QPResult.load(tmp_path / 'qp')


def test_solving_prints_no_false_highs_alarm():
    "python-mip is pointed at highsbox directly: no 'HiGHS C API not accessible ... Falling back' warning on stderr."
    import subprocess, sys
    code = ("from dinoqpm.qp import solve_qp, synthetic_qp_features, qp_constants\n"
            "F, y = synthetic_qp_features(30, 6, 300, n_concepts=15, concepts_per_class=3, seed=0)\n"
            "A, R = qp_constants(F, y, 6); print(solve_qp(A, R, 8, 3, time_limit=10).status)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == 'optimal', r.stderr
    assert 'Falling back' not in r.stderr and 'not accessible' not in r.stderr, r.stderr
