"""Benchmark of the QP (`dinoqpm.qp`) on a CUB-sized instance (J=512 features, C=200 classes, 50 selected, 5 per class).

Not a test. Writes JSON to benchmarks/results/qp.json (or --out). For each backend and each threshold τ
(the clique rule as the reference applies it, as intended, and fixed percentiles of R) it measures, in one run:
- OUR model (`solve_qp`): time to a certified 0.5 % gap, or the gap at the limit; the root bounds with and without
  clique cuts (the bound without them equals the LEAN-C LP bound of qp-measurements.md);
- the NAIVE reference formulation (`solve_qp_naive`: binary W, s, E = W·s, every penalised product linearised,
  exactly 5 per class, lazy no-good uniqueness, s warm-started from the clique) on the same solver and limit;
- speed ratios naive / ours (a lower bound "≥" when the naive model does not reach the gap within its limit);
and, on instances small enough to enumerate, our objective against the exact optimum.

The instance comes from `dinoqpm.qp.synthetic_qp_features` (documented there): concept-structured ReLU features whose
A and R statistics match the instance of qp-measurements.md. Times are wall-clock seconds on whatever machine runs this
(the goal is stated for 2 CPU cores); the machine is recorded.

    python benchmarks/bench_qp.py --quick        # ~10 min: both backends for our model, naive on HiGHS at two thresholds
    python benchmarks/bench_qp.py                # full: every threshold, both backends, naive everywhere (~1 h)
"""
import argparse, json, logging, math, os, platform, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm import qp  # noqa: E402
from dinoqpm.core import atomic_write_json, provenance  # noqa: E402

log = logging.getLogger('bench_qp')


def instance_stats(A, R):
    iu = np.triu_indices(len(R), 1)
    r = R[iu]
    return dict(J=int(A.shape[0]), C=int(A.shape[1]), A_min=float(A.min()), A_max=float(A.max()),
                A_gt_02_per_class=float((A > 0.2).sum(0).mean()),
                R_percentiles={str(p): float(np.percentile(r, p)) for p in (91, 95, 97, 99)})


def root_bounds(A, R, tau, n_select, n_per_class, incumbent, solver='highs', max_rounds=400, seconds=60):
    "Root LP bounds: θ-cuts only (= LEAN-C LP) and θ + clique cuts (ours), each with its time."
    out = {}
    pairs = qp.penalised_pairs(R, tau)
    for name, cliques in (('lp_theta_only', False), ('lp_theta_cliques', True)):
        with qp.solver_gc_guard():
            t0 = time.perf_counter()
            m = qp.TopKModel(A, pairs, None, n_select, n_per_class, solver=solver)
            m.add_theta_at_ranks([n_per_class - 1, n_per_class + 2, n_per_class + 7, n_per_class + 15, n_per_class + 30])
            bound, stall, last = np.inf, 0, np.inf
            for rnd in range(max_rounds):
                obj, sv, vv, yv = m.solve_lp()
                bound = min(bound, obj)
                if time.perf_counter() - t0 > seconds: break
                n = m.separate_theta(sv, vv)
                if n == 0 and cliques:
                    stall = stall + 1 if last - obj < 1e-5 * abs(obj) else 0
                    last = obj
                    if stall >= 3: break
                    n = m.separate_cliques(sv, yv)
                if n == 0: break
            out[name] = dict(bound=float(bound), gap_to_incumbent=float((bound - incumbent) / abs(incumbent)),
                             seconds=time.perf_counter() - t0, rounds=rnd + 1, theta_cuts=len(m.theta_keys),
                             clique_cuts=len(m.clique_keys))
            del m
    return out


def summarize(res):
    return dict(status=res.status, objective=res.objective, bound=res.bound, gap=res.gap, seconds=res.seconds,
                certified=bool(res.status == 'optimal'), n_pairs=res.n_pairs, z_a=res.z_a, z_r=res.z_r,
                heuristic_objective=res.heuristic_objective, lp_bound=res.lp_bound, n_theta_cuts=res.n_theta_cuts,
                n_clique_cuts=res.n_clique_cuts, mip_rounds=res.mip_rounds, n_uniqueness_cuts=res.n_uniqueness_cuts,
                history=res.history)


def ratio(naive, ours):
    "naive time / our time to the certified gap; '>=' when naive did not get there (its limit is then a lower bound)."
    if not ours['certified']: return dict(value=None, kind='ours not certified')
    if naive['certified']: return dict(value=naive['seconds'] / ours['seconds'], kind='=')
    return dict(value=naive['seconds'] / ours['seconds'], kind='>=')


def enumerable(n_instances, seed, solvers):
    "Our objective against exhaustive enumeration on instances of J=12, C=6, 5 selected, 2 per class."
    rows = []
    for s in range(n_instances):
        F, y = qp.synthetic_qp_features(12, 6, 240, n_concepts=8, concepts_per_class=2, seed=seed + s)
        A, R = qp.qp_constants(F, y, 6)
        tau = float(np.percentile(R[np.triu_indices(12, 1)], 80))
        ex = qp.solve_qp_exhaustive(A, R, 5, 2, tau=tau)
        for solver in solvers:
            for gap in (0.005, 1e-7):
                r = qp.solve_qp(A, R, 5, 2, tau=tau, solver=solver, mip_gap=gap, time_limit=60)
                rows.append(dict(instance=s, solver=solver, mip_gap=gap, exact=ex.objective, ours=r.objective,
                                 rel_diff=(ex.objective - r.objective) / abs(ex.objective), status=r.status,
                                 seconds=r.seconds, exhaustive_seconds=ex.seconds))
    return rows


def rlt_comparison(seed=3, pct=90, J=256, C=100, K=25, k=5):
    """The brief's RLT suggestion, measured: LP bounds on a reduced instance with y for ALL pairs and
    Σ_j y_ij = (K−1) s_i, y_ij ≤ s_i, y_ij ≤ s_j (RLT of the cardinality constraint), against θ-cuts alone and θ + clique cuts.
    Built with highspy directly (a measurement, not the library), θ-cuts separated to convergence in each case. Slow (~10 min)."""
    import highspy
    F, y = qp.synthetic_qp_features(J, C, C * 30, n_concepts=J // 2, concepts_per_class=5, seed=seed)
    A, R = qp.qp_constants(F, y, C)
    iu = np.triu_indices(J, 1)
    tau = float(np.percentile(R[iu], pct))
    pairs = qp.penalised_pairs(R, tau)
    srch = qp.SelectionSearch(A, pairs, None, K, k)
    S, _ = srch.iterated(srch.local_search(srch.greedy()), seconds=5)
    out = dict(J=J, C=C, n_select=K, n_per_class=k, tau_percentile=pct, n_pairs=len(pairs[0]), incumbent=srch.value(S))
    ranks = [k - 1, k + 2, k + 7, k + 15, k + 30]
    for name, cl in (('theta_only', False), ('theta_cliques', True)):
        with qp.solver_gc_guard():
            m = qp.TopKModel(A, pairs, None, K, k); m.add_theta_at_ranks(ranks); t0 = time.perf_counter()
            for _ in range(1000):
                obj, sv, vv, yv = m.solve_lp()
                n = m.separate_theta(sv, vv)
                if n == 0 and cl: n = m.separate_cliques(sv, yv)
                if n == 0: break
            out[name] = dict(bound=obj, seconds=time.perf_counter() - t0); del m
    P = np.zeros((J, J)); P[pairs[0], pairs[1]] = pairs[2]
    pi, pj = iu; nP = len(pi); Y0 = J + C
    h = highspy.Highs(); h.setOptionValue('output_flag', False); inf = highspy.kHighsInf
    scale = 1000.0 / (k * C)
    cost = np.concatenate([np.zeros(J), np.full(C, scale), -P[pi, pj]]); n = len(cost)
    h.addVars(n, np.concatenate([np.zeros(J), np.full(C, -inf), np.zeros(nP)]),
              np.concatenate([np.ones(J), np.full(C, inf), np.full(nP, inf)]))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), cost); h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    def add(rows, lo, hi):
        starts = np.cumsum([0] + [len(r[0]) for r in rows[:-1]]).astype(np.int32)
        idx = np.concatenate([r[0] for r in rows]).astype(np.int32); val = np.concatenate([r[1] for r in rows]).astype(float)
        h.addRows(len(rows), np.array(lo, float), np.array(hi, float), len(idx), starts, idx, val)
    add([(np.arange(J), np.ones(J))], [K], [K])
    add([(np.array([i, j, Y0 + p]), np.array([1., 1., -1.])) for p, (i, j) in enumerate(zip(pi, pj))], [-inf] * nP, [1.] * nP)
    add([(np.array([Y0 + p, i]), np.array([1., -1.])) for p, i in enumerate(pi)], [-inf] * nP, [0.] * nP)
    add([(np.array([Y0 + p, j]), np.array([1., -1.])) for p, j in enumerate(pj)], [-inf] * nP, [0.] * nP)
    inc = [[] for _ in range(J)]
    for p, (i, j) in enumerate(zip(pi, pj)): inc[i].append(p); inc[j].append(p)
    add([(np.concatenate([Y0 + np.array(inc[i]), [i]]), np.concatenate([np.ones(len(inc[i])), [-(K - 1.0)]])) for i in range(J)],
        [0.] * J, [0.] * J)
    order = np.argsort(-A, axis=0, kind='stable'); Asorted = np.take_along_axis(A, order, 0)
    def theta_row(c, th):
        coef = np.maximum(A[:, c] - th, 0); nz = np.nonzero(coef)[0]
        return (np.concatenate([[J + c], nz]), np.concatenate([[1.], -coef[nz]]), k * th)
    rows = [theta_row(c, Asorted[r, c]) for c in range(C) for r in ranks]
    t0 = time.perf_counter()
    while rows:
        add([(a, b) for a, b, _ in rows], [-inf] * len(rows), [r[2] for r in rows])
        h.run(); obj = h.getInfo().objective_function_value; x = np.array(h.getSolution().col_value)
        sv, vv = x[:J], x[J:J + C]
        cap = np.cumsum(sv[order], axis=0); idx = np.minimum(np.argmax(cap >= k - 1e-9, axis=0), J - 1)
        th = Asorted[idx, np.arange(C)]; val = k * th + (np.maximum(A - th, 0) * sv[:, None]).sum(0)
        rows = [theta_row(c, th[c]) for c in np.nonzero(vv > val + 1e-6)[0]]
    out['theta_rlt'] = dict(bound=obj, seconds=time.perf_counter() - t0)
    for name in ('theta_only', 'theta_cliques', 'theta_rlt'):
        out[name]['gap_to_incumbent'] = (out[name]['bound'] - out['incumbent']) / abs(out['incumbent'])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='short version (~10 min)')
    ap.add_argument('--solvers', default='highs,cbc')
    ap.add_argument('--time-limit', type=float, default=None, help='limit per solve (default 120, quick 60)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'qp.json'))
    ap.add_argument('--rlt', action='store_true', help='also measure the RLT bound on a reduced instance (~10 min)')
    ap.add_argument('--ablation', action='store_true', help='also run our model without clique cuts / without warm start')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    solvers = args.solvers.split(',')
    limit = args.time_limit or (60.0 if args.quick else 120.0)
    t_start = time.perf_counter()

    F, y = qp.synthetic_qp_features(seed=args.seed)
    A, R = qp.qp_constants(F, y, 200)
    K, k = 50, 5
    iu = np.triu_indices(512, 1)
    t0 = time.perf_counter()
    ref = qp.choose_tau(R, K, rule='reference')
    tau_seconds = time.perf_counter() - t0
    taus = {'clique_reference': ref.tau, 'clique_intended': ref.tau / 2}
    for p in ((99, 95) if args.quick else (99, 97, 95, 91)): taus[f'p{p}'] = float(np.percentile(R[iu], p))
    taus = dict(sorted(taus.items(), key=lambda kv: -kv[1]))
    naive_taus = {'clique_reference', 'p99'} if args.quick else set(taus)
    naive_solvers = ['highs'] if args.quick else solvers
    out = dict(benchmark='qp', quick=args.quick, time_limit=limit, mip_gap=0.005, n_select=K, n_per_class=k,
               instance=dict(generator='dinoqpm.qp.synthetic_qp_features', seed=args.seed, **instance_stats(A, R)),
               clique_rule=dict(threshold=ref.threshold, clique_size=int(len(ref.clique)), seconds=tau_seconds,
                                predicted_size=ref.predicted_size),
               taus={name: dict(tau=t, n_pairs=int((R[iu] >= t).sum()), percentile=float((R[iu] < t).mean() * 100))
                     for name, t in taus.items()},
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            load_avg_start=os.getloadavg() if hasattr(os, 'getloadavg') else None),
               runs=[], enumerable=[])
    path = Path(args.out)

    def save():
        out['total_seconds'] = time.perf_counter() - t_start
        out['provenance'] = provenance()
        atomic_write_json(path, out)

    for name, tau in taus.items():
        for solver in solvers:
            log.info('tau %s = %.4f (%d pairs), %s: our model', name, tau, out['taus'][name]['n_pairs'], solver)
            res = qp.solve_qp(A, R, K, k, tau=tau, solver=solver, time_limit=limit, seed=args.seed)
            row = dict(tau_name=name, tau=tau, solver=solver, ours=summarize(res))
            log.info('  ours: %s', res.summary())
            if solver == solvers[0]:
                row['root_bounds'] = root_bounds(A, R, tau, K, k, res.objective, solver=solver)
                log.info('  root bounds: %s', {k2: round(v['bound'], 4) for k2, v in row['root_bounds'].items()})
            if solver in naive_solvers and name in naive_taus:
                nres = qp.solve_qp_naive(A, R, K, k, tau=tau, solver=solver, time_limit=limit, start=ref.clique)
                row['naive'] = summarize(nres)
                row['naive']['build_seconds'] = next((h['seconds'] for h in nres.history if h.get('event') == 'build'), None)
                row['speedup'] = ratio(row['naive'], row['ours'])
                log.info('  naive: %s; speed-up %s', nres.summary(), row['speedup'])
            out['runs'].append(row)
            save()
    if args.ablation:
        out['ablation'] = []
        for name in [n for n in ('clique_intended', 'p91') if n in taus]:
            for kw in (dict(cliques=False), dict(warm_start=False)):
                res = qp.solve_qp(A, R, K, k, tau=taus[name], solver=solvers[0], time_limit=limit, seed=args.seed, **kw)
                out['ablation'].append(dict(tau_name=name, solver=solvers[0], **{k2: str(v) for k2, v in kw.items()},
                                            result=summarize(res)))
                log.info('ablation %s %s: %s', name, kw, res.summary())
                save()
    if args.rlt:
        out['rlt'] = rlt_comparison()
        log.info('RLT comparison: %s', out['rlt'])
        save()
    out['enumerable'] = enumerable(3 if args.quick else 8, args.seed + 100, solvers)
    worst = max(abs(r['rel_diff']) for r in out['enumerable'] if r['mip_gap'] < 1e-6)
    out['enumerable_summary'] = dict(max_abs_rel_diff_exact_mode=worst,
                                     all_within_mip_gap=all(r['rel_diff'] <= r['mip_gap'] + 1e-9 for r in out['enumerable']))
    goal = [r for r in out['runs'] if r['tau'] >= taus['clique_intended'] - 1e-12]
    out['goal'] = dict(
        statement='certified gap <= 0.5% in <= 120 s at every tau up to the intended clique rule; >= 10x faster than naive',
        all_certified_up_to_intended=all(r['ours']['certified'] and r['ours']['seconds'] <= 120 for r in goal),
        speedups=[dict(tau=r['tau_name'], solver=r['solver'], **r['speedup']) for r in out['runs'] if 'speedup' in r])
    save()
    log.info('wrote %s (%.0f s)', path, out['total_seconds'])


if __name__ == '__main__':
    main()
