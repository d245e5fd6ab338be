"""QPM on a CNN trained end to end (issue 21), measured. Writes benchmarks/results/train_images.json (not part of the
test suite).

    .venv/bin/python benchmarks/bench_train_images.py [--parts loop,sizes,converged] [--sizes 64,96,128] [--seed 0] [--device auto]

- loop: images/s of the package's loop (`train_dense` on an `ImageSplit`: its loader, epoch order, augmentation,
  progress bar, `log.csv`, checkpoints, convergence record and final model file, the per-epoch overhead included)
  against a bare torch loop on the same model, batch, input size and DataLoader settings (the same augmented images
  through a plain `torch.utils.data.DataLoader` with as many workers, forward + CE + L_div + backward + SGD step),
  in one process, alternating (bare, loop, loop, bare, ...), `--repeats` times each, each timed from building its model
  from the weights file to its last step; the ratio of the fastest repeats must reach 0.85 (the machine is shared: a
  slower repeat measured other processes, timeit's rule; the ratio of the medians is recorded beside it).
- sizes: the demo CNN (EfficientNet-Lite0 at output stride 16, the 1280 maps after its last ReLU6, trained end to end)
  on the default SynthBirds with QPM's recipe at batch 8 and the step budget proposed for Table 1's demo rows (`BUDGETS`:
  8 dense and 4 finetune epochs), per input size: test accuracy of the dense model and of the QPM model, optimizer
  steps, and the seconds of dense + QP + finetune of one seed (what each seed of the rows adds to `make table1`; the
  metrics' evaluation not included).
- converged: the same at one input size with every phase stopped by the convergence rule instead (caps of 20 and 12
  epochs): the steps the rule needs, and what they cost.
"""
import dinoqpm  # noqa: F401  (pins the numerics before torch is imported)
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm.config import qpm_config
from dinoqpm.core import atomic_write_json, get_device, provenance, setup_logging, seed_everything
from dinoqpm.model import CNNQPMModel, feature_diversity_loss
from dinoqpm.train import (load_image_splits, train_dense, finetune, extract_features, eval_accuracy, make_optimizer,
                           ImageLoader, autocast_for)

DEMO_BACKBONE = 'efficientnet_lite0_os16_act'
# QPM's recipe (qpm_config) at batch 8 with the demo's QP (20 features, 5 per class), and two step budgets:
# 'proposed': fixed epochs that fit three seeds into the 5 minutes Table 1 may grow by (8 dense and 4 finetune epochs of
#   the 295 training images: 296 + 148 steps); 'converged': each phase stopped by the convergence rule (at least 300
#   steps), under caps of 20 and 12 epochs
DEMO_RECIPE = {'dense.batch_size': 8, 'finetune.batch_size': 8, 'qp.n_select': 20, 'qp.n_per_class': 5, 'qp.time_limit': 30.0}
BUDGETS = {'proposed': {'dense.epochs': 8, 'finetune.epochs': 4},
           'converged': {'dense.epochs': 20, 'finetune.epochs': 12, 'dense.stop_at_convergence': True,
                         'finetune.stop_at_convergence': True}}


def demo_cnn_config(data_root, img_size, seed, device, budget='proposed', **over):
    "QPM's recipe on the default SynthBirds with the demo CNN at `img_size` and the step budget `budget` (`BUDGETS`)."
    return qpm_config(**{'seed': seed, 'device': device, 'data.dataset': 'SynthBirds', 'data.root': str(data_root),
                         'data.img_size': img_size, 'backbone.name': DEMO_BACKBONE, **DEMO_RECIPE, **BUDGETS[budget], **over})


class PlainImages(torch.utils.data.Dataset):
    "A split's training images as a bare loop reads them: decoded and augmented in the loader process, its own RNG."
    def __init__(self, split): self.split = split
    def __len__(self): return len(self.split)
    def __getitem__(self, i):
        img = self.split.dataset.load_image(i)
        aug = self.split.augmentation or self.split.transform
        return aug(img), int(self.split.labels[i])


def bare_loop(cfg, train, epochs, device, workers):
    """The same model, batch, input size and DataLoader settings in a plain torch loop: a shuffling DataLoader with as
    many (persistent) workers and pinned memory on CUDA, channels_last, forward, CE + L_div, backward, QPM's SGD step.
    Timed from the model's construction on, as the package's loop is (which builds its model from the same file)."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    model = CNNQPMModel(cfg.backbone.name, train.n_classes, cfg.dense.head_dropout, cfg.data.img_size).to(device).train()
    opt = make_optimizer(cfg.dense, model.parameters(), model.head.parameters())
    loader = torch.utils.data.DataLoader(PlainImages(train), batch_size=cfg.dense.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    n = 0
    for epoch in range(epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast_for(model, device, cfg.backbone.precision):      # bf16 on CUDA, as the package's loop
                out = model(x)
            logits, maps, f = out.logits.float(), out.maps.float(), out.feat_vec.float()
            loss = F.cross_entropy(logits, y) + feature_diversity_loss(maps, f, logits, model.head_weight(), cfg.dense.beta_div)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            n += len(y)
    if device.type == 'cuda': torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def package_loop(cfg, train, epochs, run_dir, progress=True):
    "`train_dense` for `epochs` epochs, with a run directory (log, checkpoints, model file), no test set: images/s."
    from dinoqpm.config import update_config
    c = update_config(cfg, {'dense.epochs': epochs, 'dense.stop_at_convergence': False})
    t0 = time.perf_counter()
    _, history = train_dense(c, train, None, run_dir=run_dir, progress=progress)
    return len(train) * epochs / (time.perf_counter() - t0), history


def loop_ratio(cfg, epochs: int, repeats: int, device, progress: bool = True) -> dict:
    "The package's loop against the bare loop on `cfg`'s training images, alternating, `repeats` times each."
    train, _ = load_image_splits(cfg)
    rates = {'loop': [], 'bare': []}
    workers = ImageLoader(train, device).workers                        # the package's default (data.workers unset)
    peak = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):                                        # alternating: bare, loop, loop, bare, ...
            for which in (('bare', 'loop') if r % 2 == 0 else ('loop', 'bare')):
                if which == 'bare':
                    rates['bare'].append(bare_loop(cfg, train, epochs, device, workers)); continue
                if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
                rate, history = package_loop(cfg, train, epochs, Path(tmp) / f'run{r}', progress)
                rates['loop'].append(rate)
                if device.type == 'cuda': peak = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            print('loop', r, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}                     # timeit's rule: a slower repeat measured someone else
    return {'backbone': cfg.backbone.name, 'img_size': cfg.data.img_size, 'batch_size': cfg.dense.batch_size,
            'precision': cfg.backbone.precision if device.type == 'cuda' else 'fp32', 'train_images': len(train),
            'epochs_per_measurement': epochs, 'repeats': repeats, 'augment': cfg.data.augment, 'loader_workers': workers,
            'images_per_s': {k: [round(x, 2) for x in v] for k, v in rates.items()}, 'peak_gpu_gb': peak,
            'train_loss_per_epoch': [round(h['train_loss'], 5) for h in history],
            'best_images_per_s': {k: round(v, 2) for k, v in best.items()}, 'ratio': round(best['loop'] / best['bare'], 3),
            'median_images_per_s': {k: round(v, 2) for k, v in med.items()}, 'median_ratio': round(med['loop'] / med['bare'], 3),
            'required_ratio': 0.85, 'passes': best['loop'] / best['bare'] >= 0.85}


def part_loop(data_root, args, device):
    cfg = demo_cnn_config(data_root, args.loop_size, args.seed, str(device), **{'dense.batch_size': 16})
    return loop_ratio(cfg, args.loop_epochs, args.repeats, device)


def one_seed(cfg, run_dir):
    "Dense, QP and finetune of one seed, timed: `{accuracy, steps, seconds}` (evaluation of the metrics not included)."
    from dinoqpm.qp import qp_constants, solve_qp
    train, test = load_image_splits(cfg)
    t0 = time.perf_counter()
    dense, dh = train_dense(cfg, train, test, run_dir=run_dir, progress=False, eval_every=10**6)
    t1 = time.perf_counter()
    out = extract_features(dense, train)
    A, R = qp_constants(out['features'].numpy(), out['labels'].numpy(), train.n_classes)
    q = cfg.qp
    qp = solve_qp(A, R, q.n_select, q.n_per_class, solver=q.solver, time_limit=q.time_limit, mip_gap=q.mip_gap, seed=cfg.seed)
    t2 = time.perf_counter()
    ft, fh = finetune(cfg, dense, train_cache=train, test_cache=test, run_dir=run_dir, qp_result=qp, progress=False,
                      eval_every=10**6)
    t3 = time.perf_counter()
    acc = {k: round(eval_accuracy(m, test)['acc'], 4) for k, m in (('dense', dense), ('qpm', ft))}
    return {'test_accuracy': acc, 'dense_steps': dense.convergence['steps'], 'finetune_steps': ft.convergence['steps'],
            'dense_converged': dense.convergence['converged'], 'finetune_converged': ft.convergence['converged'],
            'qp_certified': bool(qp.certified), 'qp_gap': qp.gap,
            'seconds': {'dense': round(t1 - t0, 1), 'qp': round(t2 - t1, 1), 'finetune': round(t3 - t2, 1), 'total': round(t3 - t0, 1)}}


def part_sizes(data_root, args, device, budget='proposed', sizes=None):
    "Per input size, one seed of the demo CNN rows (dense, QP, finetune) under `budget`."
    from dinoqpm.features import cnn_grid
    out = {'backbone': DEMO_BACKBONE, 'recipe': DEMO_RECIPE, 'budget': budget, 'budget_settings': BUDGETS[budget],
           'seed': args.seed, 'per_size': {}}
    with tempfile.TemporaryDirectory() as tmp:
        for s in map(int, (sizes or args.sizes).split(',')):
            rec = one_seed(demo_cnn_config(data_root, s, args.seed, str(device), budget), Path(tmp) / f's{s}')
            out['per_size'][s] = {**rec, 'grid': list(cnn_grid(DEMO_BACKBONE, s))}
            print(budget, s, json.dumps(rec), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--parts', default='loop,sizes,converged')
    ap.add_argument('--sizes', default='64,96,128')
    ap.add_argument('--converged-size', default='64')
    ap.add_argument('--loop-size', type=int, default=128)
    ap.add_argument('--loop-epochs', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=6)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='auto')
    ap.add_argument('--data', default=None, help='a data root with the default SynthBirds (generated there if missing)')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'train_images.json'))
    args = ap.parse_args()
    setup_logging('WARNING')
    device = get_device(args.device)
    data_root = Path(args.data or tempfile.mkdtemp(prefix='bench_images_'))
    from dinoqpm.data import load_dataset
    load_dataset('SynthBirds', 'train', root=data_root, progress=False)       # the default SynthBirds
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}          # parts not run this time are kept
    result.update({'benchmark': 'train_images', 'what': __doc__.split('\n\n')[0], 'device': str(device),
                   'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count()})
    for part in args.parts.split(','):
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        rec = {'loop': part_loop, 'sizes': part_sizes,
               'converged': lambda *a: part_sizes(*a, budget='converged', sizes=args.converged_size)}[part](data_root, args, device)
        rec.update(bench_seconds=round(time.perf_counter() - t0, 1), load_average_before_after=[load0[0], os.getloadavg()[0]],
                   provenance=provenance(seed=args.seed, part=part, device=str(device)))
        result[part] = rec
        atomic_write_json(out, result)
        print(part, json.dumps({k: v for k, v in rec.items() if not isinstance(v, dict)}), flush=True)


if __name__ == '__main__':
    main()
