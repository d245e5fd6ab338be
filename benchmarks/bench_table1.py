"""Table 1 on the embedded demo, measured (issue 18): where the time of `make table1` goes, what stopping at convergence
costs in accuracy, whether the stop rule is safe on held-out training images, what the numerics pins cost, and how the
demo's tokens were chosen. Writes benchmarks/results/table1.json (not part of the test suite).

    .venv/bin/python benchmarks/bench_table1.py [--parts job,stop,heldout,numerics,tokens] [--seeds 0,1,2] [--work DIR]

- job: `make table1`'s four notebooks, run one by one on a fresh data, cache and runs folder (the install excluded):
  the whole job's wall time, each notebook's, and per row and phase the optimizer steps run and budgeted, the phase's
  wall time and the part of it spent in its epochs (the rest is overhead: checkpoints, logs, the final model copy).
- stop: Table 1 again with every phase trained to its whole budget (`stop=off`) beside the job's: each row's test
  accuracy and Plausibility, mean ± std over the seeds both ways; the difference must stay within the seed-to-seed
  spread (the larger of the two standard deviations), and the JSON says whether it does.
- heldout: the rule validated where it may be, on held-out *training* images, never on test images: per seed a
  stratified 20 % of the training split is held out, every phase of every row trains on the other 80 % for its whole
  budget with the held-out accuracy after every epoch, and the rule is applied to that history afterwards (it only ever
  looks at the epochs before): held-out accuracy where it stops against at the end of the budget. The histories are kept
  in `<work>/heldout_histories.json`; part `rejudge` applies the current rules to them again without training.
- rejudge, restop, tables: parts heldout, stop and the job's table comparison summarised again from what they left in
  `--work` (nothing is trained; their timings are kept).
- numerics: the demo's DINO-QPM dense phase for a fixed number of epochs, with the numerics pins and without
  (`DINOQPM_NUMERICS=native`), in alternating fresh processes.
- tokens: the demo's token choice: the earlier demo (EfficientNet-Lite0 at 448 px, 1280-d tokens, adapter width 256)
  against the new one (output stride 16 at 224 px, 320-d tokens, width 128): extraction time, time per dense epoch,
  DINO-QPM's test accuracy and Plausibility (seed 0, both stopped at convergence).
"""
import dinoqpm  # noqa: F401  (pins the numerics before torch is imported)
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path
import numpy as np
from dinoqpm.core import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ('run_table1', 'run_fig_cover', 'run_fig_classes', 'run_export')
TABLE_FILES = ('table1.csv', 'table1.md', 'table1.tex', 'table1_per_seed.csv')
ROW_PHASE_FILES = {'CLS linear probe': ('linear_probe', ['dense_model.pt']),
                   'Dense F^froz (avg-pooled frozen tokens)': ('dense_frozen', ['dense_model.pt']),
                   'DINO-QPM': ('qpm', ['dense_model.pt', 'finetune_model.pt']),
                   'DINO-SLDD': ('sldd_qsenn', ['dense_model.pt', 'sldd/sldd_finetune_model.pt']),
                   'DINO-QSENN': ('sldd_qsenn', ['qsenn/qsenn_iter0_model.pt', 'qsenn/qsenn_iter1_model.pt',
                                                 'qsenn/qsenn_iter2_model.pt', 'qsenn/qsenn_iter3_model.pt'])}


def papermill(nb: str, work: Path, seeds: str, **params) -> float:
    "Run one paper notebook as `make table1` does, in a fresh kernel; returns its wall seconds."
    args = ['-p', 'runs_root', str(work / 'runs'), '-p', 'out_dir', str(work / 'figures'), '-p', 'data_root', str(work / 'data'),
            '-p', 'seeds', seeds if nb == 'run_table1' else seeds.split(',')[0]]
    for k, v in params.items(): args += ['-p', k, str(v)]
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).with_name('papermill')), '-k', 'python3', str(ROOT / 'nbs' / 'paper' / f'{nb}.ipynb'),
                        str(work / f'{nb}.out.ipynb'), *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1'))
    if r.returncode: raise SystemExit(f'{nb} failed:\n{r.stderr[-4000:]}')
    return time.perf_counter() - t0


def phase_records(runs: Path, seeds) -> list:
    "Per seed, row and phase: steps run and budgeted, wall and epoch seconds, stopped or not (from the saved model files)."
    from dinoqpm.core import load_checked
    out = []
    for seed in seeds:
        for row, (sub, files) in ROW_PHASE_FILES.items():
            for f in files:
                p = next(runs.rglob(f'{sub}/{seed}/{f}'), None)
                if p is None: continue
                ck = load_checked(p, 'model file')
                c = ck.get('convergence') or {}
                out.append({'seed': seed, 'row': row, 'phase': ck.get('phase'), 'steps': c.get('steps'),
                            'budget_steps': c.get('budget_steps'), 'stopped_at_convergence': c.get('stopped_at_convergence'),
                            'converged': c.get('converged'), 'wall_seconds': c.get('wall_seconds'),
                            'epoch_seconds': c.get('epoch_seconds')})
    return out


def _untimed(path: Path) -> str:
    "A table's text with the QP's wall-clock solve times masked (`0.41s,` in the notes; the `qp_seconds` column)."
    import re
    text = re.sub(r'\b\d+(\.\d+)?s, ', 's, ', path.read_text())
    if path.suffix == '.csv':
        import io, pandas as pd
        df = pd.read_csv(io.StringIO(text))
        text = df.drop(columns=[c for c in ('qp_seconds',) if c in df]).to_csv(index=False)
    return text


def part_tables(work: Path) -> dict:
    "The job's fresh tables against the committed `figures/` ones."
    same = {f: _untimed(ROOT / 'figures' / f) == _untimed(work / 'figures' / f) for f in TABLE_FILES if (ROOT / 'figures' / f).exists()}
    return {'tables_equal_the_committed_ones': same,
            'tables_equal_byte_for_byte': {f: (ROOT / 'figures' / f).read_bytes() == (work / 'figures' / f).read_bytes() for f in same},
            'tables_compared': 'every value and note; the QP solve times (wall-clock seconds, in the QP notes and the '
                               'qp_seconds column) are left out of the comparison'}


def part_job(work: Path, seeds: str) -> dict:
    times = {nb: round(papermill(nb, work, seeds), 1) for nb in NOTEBOOKS}
    phases = phase_records(work / 'runs', [int(s) for s in seeds.split(',')])
    wall = sum(r['wall_seconds'] or 0 for r in phases)
    epochs = sum(r['epoch_seconds'] or 0 for r in phases)
    return {'notebook_seconds': times, 'job_seconds': round(sum(times.values()), 1), 'budget_seconds': 300,
            **part_tables(work),
            'job_over_budget': round(sum(times.values()) / 300, 3), 'phases': phases,
            'training_wall_seconds': round(wall, 1), 'training_epoch_seconds': round(epochs, 1),
            'training_overhead_share': round(1 - epochs / max(wall, 1e-9), 3),
            'steps_run_over_budget': round(sum(r['steps'] or 0 for r in phases) / max(sum(r['budget_steps'] or 0 for r in phases), 1), 3)}


def _stats(v) -> dict:
    v = [float(x) for x in v if x is not None and np.isfinite(x)]
    return {'mean': float(np.mean(v)) if v else None, 'std': float(np.std(v, ddof=1)) if len(v) > 1 else None, 'per_seed': v}


def stop_rows(work: Path, full) -> dict:
    """Each row's test metrics stopped at convergence (the job's `<work>/figures`) against at the whole budget (`full`, the
    tidy table of `runs_full`), mean ± std over the seeds: the difference, the seed-to-seed spread (the larger std), whether
    it is within the spread either way, and whether stopping loses more than the spread."""
    import pandas as pd
    stopped = pd.read_csv(work / 'figures' / 'table1_per_seed.csv')
    rows = {}
    for method in stopped['method'].unique():
        r = {}
        for metric in ('Accuracy', 'Plausibility'):
            a = _stats(stopped[stopped['method'] == method][metric]); b = _stats(full[full['method'] == method][metric])
            if a['mean'] is None or b['mean'] is None: continue
            spread, diff = max(a['std'] or 0, b['std'] or 0), a['mean'] - b['mean']
            r[metric] = {'stopped': a, 'full_budget': b, 'difference': diff, 'seed_spread': spread,
                         'within_seed_spread': abs(diff) <= spread, 'loses_more_than_the_spread': diff < -spread}
        rows[method] = r
    loses = lambda metric: any(r[metric]['loses_more_than_the_spread'] for r in rows.values() if metric in r)
    return {'rows': rows, 'every_row_within_seed_spread': all(m['within_seed_spread'] for r in rows.values() for m in r.values()),
            'no_row_loses_accuracy_beyond_the_spread': not loses('Accuracy'),
            'no_row_loses_plausibility_beyond_the_spread': not loses('Plausibility')}


def _full_params(work: Path, seeds: str):
    from dinoqpm.paper import paper_params
    return paper_params(seeds=seeds, stop='off', runs_root=str(work / 'runs_full'), out_dir=str(work / 'figures_full'),
                        data_root=str(work / 'data'))


def part_stop(work: Path, seeds: str) -> dict:
    "The rows at their whole budget beside the job's (stopped) rows, on the test split as Table 1 reports them."
    from dinoqpm.paper import run_table1
    t0 = time.perf_counter()
    full = run_table1(_full_params(work, seeds), progress=False)
    return {**stop_rows(work, full), 'full_budget_training_seconds': round(time.perf_counter() - t0, 1),
            'full_budget_phases': phase_records(work / 'runs_full', [int(s) for s in seeds.split(',')])}


def part_restop(work: Path, seeds: str) -> dict:
    "Part `stop` summarised again from its finished cells (trains nothing)."
    from dinoqpm.paper import merge_table1
    return stop_rows(work, merge_table1(_full_params(work, seeds)))


def heldout_split(cache, fraction: float, seed: int):
    "`(fit, held-out)` in-memory caches: a stratified `fraction` of every class held out, drawn by `seed`."
    from dinoqpm.features import FeatureCache
    labels = np.asarray(cache.labels)
    rng = np.random.default_rng([seed, 20])
    held = np.sort(np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[:max(1, round(fraction * (labels == c).sum()))]
                                   for c in np.unique(labels)]))
    fit = np.setdiff1d(np.arange(len(labels)), held)
    P, C = np.asarray(cache.patch), np.asarray(cache.cls)
    mk = lambda i: FeatureCache.from_arrays(P[i], C[i], labels[i], tuple(cache.grid), int(cache.n_classes))
    return mk(fit), mk(held)


HISTORY_KEYS = ('step', 'train_loss', 'train_ce', 'train_div', 'train_sparsity', 'train_acc', 'heldout_acc')


def heldout_seed(work: Path, seeds: str, seed: int) -> list:
    "One seed of part `heldout`: every phase of every row to its whole budget on 80 % of the training split."
    from dinoqpm.baselines import train_dense_frozen, train_linear_probe, train_qsenn, train_sldd
    from dinoqpm.baselines import GLMConfig
    from dinoqpm.paper import QUICK_STEPS, one_thread_per_cell, paper_config, paper_params, steps_to_epochs
    from dinoqpm.pipeline import load_caches
    from dinoqpm.qp import qp_constants, solve_qp
    from dinoqpm.train import eval_accuracy, extract_features, finetune, load_model, train_dense
    p = paper_params(seeds=seeds, stop='off', data_root=str(work / 'data'), runs_root=str(work / 'runs_heldout'))
    out = []
    with one_thread_per_cell():
        cfg = paper_config(p, seed)                               # the quick budgets, stop off: every phase to its cap
        train, _ = load_caches(cfg, progress=False)
        fit, held = heldout_split(train, 0.2, seed)
        n = len(train.labels)
        e = lambda key, bs: steps_to_epochs(QUICK_STEPS[key], n, bs)
        hist = {}
        def watch(d):                                              # held-out accuracy of the model as it would be kept
            r = eval_accuracy(d['model'], held); d['history'][-1]['heldout_acc'] = r['acc']
        rd = work / 'runs_heldout' / str(seed)
        dense, hist['DINO-QPM dense'] = train_dense(cfg, fit, progress=False, on_epoch_end=[watch])
        f = extract_features(dense, fit)
        A, R = qp_constants(f['features'].numpy(), f['labels'].numpy(), int(fit.n_classes))
        q = cfg.qp
        qp = solve_qp(A, R, q.n_select, q.n_per_class, time_limit=q.time_limit, mip_gap=q.mip_gap, seed=seed)
        _, hist['DINO-QPM finetune'] = finetune(cfg, dense, train_cache=fit, qp_result=qp, progress=False, on_epoch_end=[watch])
        glm = GLMConfig(select_k=30, path_k=30)
        ev = {'eval_mode': ['accuracy']}
        r = train_sldd(cfg, fit, held, rd / 'sq', dense_epochs=e('sldd_dense', cfg.dense.batch_size),
                       finetune_epochs=e('finetune', cfg.finetune.batch_size), glm=glm, progress=False, on_epoch_end=[watch],
                       evaluate_kwargs=ev)
        hist['DINO-SLDD dense'], hist['DINO-SLDD finetune'] = load_model(rd / 'sq' / 'dense_model.pt').history, r.info['history']
        r = train_qsenn(cfg, fit, held, rd / 'sq', dense_epochs=e('sldd_dense', cfg.dense.batch_size),
                        finetune_epochs=e('qsenn_iteration', cfg.finetune.batch_size), glm=glm, progress=False,
                        on_epoch_end=[watch], evaluate_kwargs=ev)
        for it in r.info['iterations']: hist[f'DINO-QSENN iteration {it["iteration"]}'] = it['history']
        hist['CLS linear probe'] = train_linear_probe(cfg, fit, held, rd / 'probe', epochs=e('probe', cfg.dense.batch_size),
                                                      progress=False, on_epoch_end=[watch], evaluate_kwargs=ev).info['history']
        hist['Dense F^froz'] = train_dense_frozen(cfg, fit, held, rd / 'frozen', epochs=e('probe', cfg.dense.batch_size),
                                                  progress=False, on_epoch_end=[watch], evaluate_kwargs=ev).info['history']
        for phase, h in hist.items():
            out.append({'seed': seed, 'phase': phase, 'epochs': len(h), 'budget_steps': h[-1]['step'],
                        'heldout_acc_at_end': h[-1]['heldout_acc'], 'heldout_acc_best': max(r['heldout_acc'] for r in h),
                        'history': [{k: r.get(k) for k in HISTORY_KEYS} for r in h]})
    return out


HEAD_PHASES = ('CLS linear probe', 'Dense F^froz')          # a head on fixed features: judged by the 'head' rule
NEVER_STOPPED = {'DINO-SLDD finetune': 'trains its whole budget (dinoqpm.baselines.train_sldd), because the rule fails this '
                                       'check for it'}


def judge_heldout(phases: list) -> dict:
    """Each phase's rule (`dinoqpm.train.CONVERGENCE_RULES`) applied to each seed's whole-budget history: held-out accuracy
    where it would stop against at the end of the budget, and whether the mean difference stays within the seed spread."""
    from dinoqpm.train import CONVERGENCE_RULES, stop_epoch
    by = {}
    for r in phases:
        h = r['history']
        t = stop_epoch(h, CONVERGENCE_RULES['head' if r['phase'] in HEAD_PHASES else 'adapter']) or len(h)
        r.update(stop_epoch=t, stop_step=h[t - 1]['step'], heldout_acc_at_stop=h[t - 1]['heldout_acc'])
        by.setdefault(r['phase'], []).append(r)
    summary = {}
    for ph, v in by.items():
        d = [r['heldout_acc_at_stop'] - r['heldout_acc_at_end'] for r in v]
        spread = float(np.std([r['heldout_acc_at_end'] for r in v], ddof=1)) if len(v) > 1 else None
        summary[ph] = {'rule': 'head' if ph in HEAD_PHASES else 'adapter', 'mean_stop_over_end': float(np.mean(d)),
                       'per_seed_stop_over_end': [round(x, 4) for x in d], 'seed_spread_at_end': spread,
                       'steps_share': float(np.mean([r['stop_step'] / r['budget_steps'] for r in v])),
                       'as_good_as_the_budget': spread is not None and float(np.mean(d)) >= -spread}
        if ph in NEVER_STOPPED: summary[ph]['never_stopped'] = NEVER_STOPPED[ph]
    return {'rules': {k: r.describe() for k, r in CONVERGENCE_RULES.items()}, 'summary': summary,
            'every_phase_as_good_as_the_budget': all(s['as_good_as_the_budget'] for s in summary.values()),
            'every_stopped_phase_as_good_as_the_budget': all(s['as_good_as_the_budget'] for ph, s in summary.items()
                                                             if ph not in NEVER_STOPPED)}


def part_rejudge(work: Path) -> dict:
    "Part `heldout` judged again by the current rules, from the histories it kept (`<work>/heldout_histories.json`)."
    out = json.loads((work / 'heldout_histories.json').read_text())
    out.pop('rule', None)                                              # (older runs recorded one rule)
    out.update(judge_heldout(out['phases']))
    atomic_write_json(work / 'heldout_histories.json', out)
    for r in out['phases']: r['heldout_acc'] = [round(x['heldout_acc'], 4) for x in r.pop('history')]
    return out


def part_heldout(work: Path, seeds: str) -> dict:
    """Every seed in a worker process of its own, on one thread (as Table 1's cells), two at a time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dinoqpm.paper import paper_config, paper_params
    from dinoqpm.pipeline import load_caches
    seed_list = [int(s) for s in seeds.split(',')]
    load_caches(paper_config(paper_params(seeds=seeds, data_root=str(work / 'data')), seed_list[0]), progress=False)  # data, caches
    out = {'fraction_held_out': 0.2, 'phases': []}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn')) as ex:
        for phases in ex.map(heldout_seed, [work] * len(seed_list), [seeds] * len(seed_list), seed_list):
            out['phases'] += phases
    out.update(judge_heldout(out['phases']))
    atomic_write_json(work / 'heldout_histories.json', out)            # the histories, to judge other rules on them later
    for r in out['phases']: r['heldout_acc'] = [round(x['heldout_acc'], 4) for x in r.pop('history')]
    return out


NUMERICS_RUN = r'''
import dinoqpm, json, sys, time
from dinoqpm.config import update_config
from dinoqpm.paper import paper_config, paper_params
from dinoqpm.pipeline import load_caches
from dinoqpm.train import train_dense
p = paper_params(seeds='0', stop='off', data_root=sys.argv[1])
cfg = update_config(paper_config(p, 0), {'dense.epochs': int(sys.argv[2])})
train, _ = load_caches(cfg, progress=False)
t0 = time.perf_counter(); train_dense(cfg, train, progress=False); print(json.dumps({'seconds': time.perf_counter() - t0}))
'''


def part_numerics(work: Path, epochs: int = 15, repeats: int = 3) -> dict:
    times = {'reproducible': [], 'native': []}
    for _ in range(repeats):
        for mode in times:
            env = {k: v for k, v in os.environ.items() if k not in ('MKL_CBWR', 'ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY',
                                                                 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')}
            r = subprocess.run([sys.executable, '-c', NUMERICS_RUN, str(work / 'data'), str(epochs)], capture_output=True,
                               text=True, env={**env, 'DINOQPM_NUMERICS': mode, 'TQDM_DISABLE': '1'})
            if r.returncode: raise SystemExit(r.stderr[-3000:])
            times[mode].append(json.loads(r.stdout.strip().splitlines()[-1])['seconds'])
    med = {m: statistics.median(v) for m, v in times.items()}
    return {'what': f'DINO-QPM dense phase of the demo, {epochs} epochs, fresh process each, alternating', 'seconds': times,
            'median_seconds': med, 'pinned_over_native': round(med['reproducible'] / med['native'], 3)}


def part_tokens(work: Path, seeds: str) -> dict:
    """DINO-QPM (the row whose accuracy and Plausibility the demo is about) for each token design: the earlier demo on
    seed 0 only (it is the expensive one), the two widths of this demo on every seed."""
    from dinoqpm.config import demo_config, update_config
    from dinoqpm.pipeline import load_caches, run_qpm
    from dinoqpm.train import load_model
    designs = {'earlier demo: efficientnet_lite0, 448 px, 1280-d tokens, adapter width 256':
               ({'backbone.name': 'efficientnet_lite0', 'data.img_size': 448, 'adapter.hidden': 256}, [0]),
               'this demo at adapter width 64: efficientnet_lite0_os16, 224 px, 320-d tokens':
               ({'adapter.hidden': 64}, [int(s) for s in seeds.split(',')]),
               'this demo: efficientnet_lite0_os16, 224 px, 320-d tokens, adapter width 32':
               ({}, [int(s) for s in seeds.split(',')])}
    out = {}
    for i, (name, (over, seed_list)) in enumerate(designs.items()):
        rec = {'seeds': seed_list, 'per_seed': []}
        for seed in seed_list:
            cfg = update_config(demo_config(**{'data.root': str(work / 'data'), 'seed': seed}), over)
            t0 = time.perf_counter()
            caches = load_caches(cfg, cache_root=work / 'tokens_cache', progress=False)
            extract = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = run_qpm(cfg, work / 'tokens' / str(i) / str(seed), cache_root=work / 'tokens_cache', progress=False)
            dense = load_model(res['dense_model'])
            rec['per_seed'].append({'seed': seed, 'accuracy': res['results']['Accuracy'],
                                    'plausibility': res['results'].get('Plausibility'),
                                    'dense_accuracy': res['results_dense']['Accuracy'], 'run_seconds': round(time.perf_counter() - t0, 1),
                                    'dense_epochs': len(dense.history), 'extraction_seconds': round(extract, 1)})
        rec.update(tokens=list(caches[0].patch.shape[1:]), grid=list(caches[0].grid),
                   accuracy=_stats([r['accuracy'] for r in rec['per_seed']]),
                   plausibility=_stats([r['plausibility'] for r in rec['per_seed']]))
        out[name] = rec
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--parts', default='job,stop,heldout,numerics,tokens')
    ap.add_argument('--seeds', default='0,1,2')
    ap.add_argument('--work', default=str(ROOT / 'runs' / 'bench_table1'))
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'table1.json'))
    args = ap.parse_args()
    from dinoqpm.core import atomic_write_json, provenance, setup_logging
    setup_logging('WARNING')
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}          # parts not run this time are kept
    result.update({'benchmark': 'table1', 'what': __doc__.split('\n\n')[0], 'seeds': args.seeds})
    for part in args.parts.split(','):
        t0 = time.perf_counter()
        fn = {'job': lambda: part_job(work, args.seeds), 'stop': lambda: part_stop(work, args.seeds),
              'heldout': lambda: part_heldout(work, args.seeds), 'rejudge': lambda: part_rejudge(work), 'restop': lambda: part_restop(work, args.seeds), 'tables': lambda: part_tables(work), 'numerics': lambda: part_numerics(work),
              'tokens': lambda: part_tokens(work, args.seeds)}[part]
        key = {'rejudge': 'heldout', 'restop': 'stop', 'tables': 'job'}.get(part, part)   # summarised again: the same part, kept timings
        result[key] = ({**result.get(key, {}), **fn()} if key != part else {**fn(), 'bench_seconds': round(time.perf_counter() - t0, 1)})
        result['provenance'] = provenance(seeds=args.seeds, parts=args.parts)       # the latest run's
        result[key]['provenance'] = result['provenance']                             # each part keeps its own
        atomic_write_json(out, result)
        print(part, json.dumps({k: v for k, v in result[key].items() if not isinstance(v, (list, dict))}), flush=True)


if __name__ == '__main__':
    main()
