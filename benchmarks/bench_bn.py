"""What recomputing the BatchNorm statistics changes: DINO-QPM on the embedded demo with `recompute_bn` off (the authors'
behaviour, our default) and on, for several seeds, plus the running-variance bias of recomputing in the cache's stored,
class-sorted order instead of shuffled batches.

For each seed the dense phase is trained once (the training trajectory does not depend on `recompute_bn`: only the
model that is evaluated and kept does). The "on" dense model is that model with its statistics recomputed over shuffled
training batches (`dinoqpm.train.recompute_bn_stats`, exactly what `train_dense` keeps with `recompute_bn=True`); each of
the two then goes through the QP and its own finetune (with the same setting) and evaluation. Writes
benchmarks/results/bn_recompute.json (not part of the test suite).

    python benchmarks/bench_bn.py [--seeds 0,1,2] [--runs-root runs/bench_bn] [--data-root DIR]
"""
import argparse, copy, json, sys, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm.config import demo_config, update_config
from dinoqpm.core import atomic_write_json, provenance, setup_logging
from dinoqpm.pipeline import load_caches, solve_qp_once
from dinoqpm.train import (TokenDataset, iter_batches, train_dense, finetune, recompute_bn_stats, save_model,
                           extract_features, load_model)


def accuracy(model, cache) -> float:
    out = extract_features(model, cache)
    return float((out['preds'] == out['labels']).float().mean())


def variance_bias(model, train_cache, seed) -> dict:
    """Running variance of the first BatchNorm after recomputation over the population variance of its input (the first
    linear layer's output over every training token, which no other BatchNorm influences): stored (class-sorted) order
    against shuffled batches."""
    ds = TokenDataset(train_cache)
    first_bn = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm1d)][0]
    m = copy.deepcopy(model).eval()
    inputs = []
    h = first_bn(m).register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].detach().double()))
    with torch.no_grad():
        for tokens, _, _ in iter_batches(ds, 64): m.dense_features(tokens, ds.grid)
    h.remove()
    pop = torch.cat(inputs).var(0, unbiased=False)
    ratio = {}
    for name, shuffle in (('stored_order', False), ('shuffled', True)):
        r = recompute_bn_stats(copy.deepcopy(model), ds, batch_size=128, seed=seed, shuffle=shuffle)
        ratio[name] = float((first_bn(r).running_var.double() / pop.clamp_min(1e-12)).mean())
    return {'first_bn_running_var_over_population': ratio, 'stored_order_underestimates_by': 1 - ratio['stored_order'] / ratio['shuffled']}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--seeds', default='0,1,2')
    ap.add_argument('--runs-root', default=str(ROOT / 'runs' / 'bench_bn'))
    ap.add_argument('--data-root', default=None)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'bn_recompute.json'))
    args = ap.parse_args()
    setup_logging('WARNING')
    seeds = [int(s) for s in args.seeds.split(',')]
    runs = Path(args.runs_root)
    per_seed, t0 = [], time.perf_counter()
    for seed in seeds:
        base = demo_config(seed=seed, **({'data.root': args.data_root} if args.data_root else {}))
        train_c, test_c = load_caches(base, progress=False)
        rec = {'seed': seed}
        dense, dense_history = train_dense(base, train_c, test_c, runs / f"seed{seed}" / "off", progress=False)
        rec['bias'] = variance_bias(dense, train_c, seed)
        for mode in ('off', 'on'):
            cfg = update_config(base, {'dense.recompute_bn': mode == 'on', 'finetune.recompute_bn': mode == 'on'})
            d = runs / f'seed{seed}' / mode
            if mode == 'on':
                dense_path = d / 'dense_model.pt'
                if not dense_path.exists():
                    on = recompute_bn_stats(copy.deepcopy(dense), TokenDataset(train_c), batch_size=max(cfg.dense.batch_size, 128),
                                            seed=seed)
                    save_model(on, dense_path, phase='dense', history=dense_history)
                dm = load_model(dense_path)
            else: dense_path, dm = d / 'dense_model.pt', dense
            qp = solve_qp_once(cfg, dense_path, train_c, d / 'qp')
            ft, _ = finetune(cfg, dm, train_cache=train_c, test_cache=test_c, run_dir=d, qp_result=qp, progress=False)
            rec[mode] = {'dense_accuracy': accuracy(dm, test_c), 'final_accuracy': accuracy(ft, test_c),
                         'selection': qp.selection.tolist(), 'qp': qp.certificate()}
        a, b = set(rec['off']['selection']), set(rec['on']['selection'])
        rec['on']['qp_selection_overlap_with_off'] = len(a & b) / max(len(a), 1)
        per_seed.append(rec)
        print(json.dumps({k: rec[k] for k in ('seed', 'off', 'on')}, default=str)[:400], flush=True)
    def stat(mode, key):
        v = np.array([r[mode][key] for r in per_seed])
        return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else None, 'per_seed': v.tolist()}
    result = {'benchmark': 'bn_recompute', 'what': __doc__.split('\n\n')[0], 'seeds': seeds,
              'config': 'demo_config() (SynthBirds + EfficientNet-Lite0, 4,700 dense / 2,000 finetune steps)',
              'accuracy': {m: {k: stat(m, k) for k in ('dense_accuracy', 'final_accuracy')} for m in ('off', 'on')},
              'final_accuracy_on_minus_off': [r['on']['final_accuracy'] - r['off']['final_accuracy'] for r in per_seed],
              'qp_selection_overlap': [r['on']['qp_selection_overlap_with_off'] for r in per_seed],
              'variance_bias': [r['bias'] for r in per_seed], 'per_seed': per_seed,
              'seconds': round(time.perf_counter() - t0, 1), 'provenance': provenance(seeds=seeds)}
    atomic_write_json(args.out, result)
    print(json.dumps(result['accuracy'], indent=1))


if __name__ == '__main__':
    main()
