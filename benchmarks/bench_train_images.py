"""QPM on a CNN trained end to end (issue 21), measured. Writes benchmarks/results/train_images.json (not part of the
test suite).

    .venv/bin/python benchmarks/bench_train_images.py [--parts loop,steps,sizes,table1] [--sizes 64,96,128] [--seed 0]

- loop: images/s of the package's loop (`train_dense` on an `ImageSplit`: its loader, epoch order, augmentation,
  progress bar, `log.csv`, checkpoints, convergence record and final model file, the per-epoch overhead included)
  against a bare torch loop on the same model, batch, input size and DataLoader settings (the same augmented images,
  read as the split reads them, through a plain `torch.utils.data.DataLoader` with as many workers, forward + CE + L_div
  + backward + SGD step), in one process, alternating (bare, loop, loop, bare, ...), `--repeats` times each, each timed
  from building its model from the weights file to its last step; the ratio of the fastest repeats must reach 0.85
  (timeit's rule: a slower repeat measured other processes; the ratio of the medians is recorded beside it).
- steps: milliseconds per SGD step of the demo CNN (forward, CE, backward, step; no loader) on one thread, as a Table 1
  cell runs, at 64 px for batches 4, 8 and 16, with its last stage dilated (timm's `output_stride=16`) and not (QPM's
  stride 1, what `efficientnet_lite0_os16_act` builds): what chose the batch and the undilated stride.
- sizes: one Table 1 CNN cell (`dinoqpm.paper.demo_cnn_config`: quick mode's `QUICK_CNN`, stopped at convergence) per
  input size, two at a time, each on one thread in its own process as `make table1` runs them: test accuracy of the
  dense and of the QPM model, whether each phase converged and after how many steps, the QP's certificate, and the
  cell's seconds (training, QP, both evaluations). The input size of the rows is chosen from this table.
- table1: `run_table1` of quick mode from scratch (fresh data, caches and runs; the cells in two processes, as
  `make table1`), with every row and without the CNN rows: the seconds the CNN rows add, against the 5 minutes allowed.
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
BUDGET_SECONDS = 300            # what the CNN rows may add to `make table1` on 2 cores (issue 21)


def demo_cnn_config(data_root, img_size, seed, device, **over):
    "Table 1's quick CNN cell (`dinoqpm.paper.demo_cnn_config`) on the SynthBirds in `data_root`, at `img_size`."
    from dinoqpm.paper import demo_cnn_config as table1_cnn_config
    return table1_cnn_config(**{'seed': seed, 'device': device, 'data.root': str(data_root), 'data.img_size': img_size, **over})


class PlainImages(torch.utils.data.Dataset):
    "A split's training images as a bare loop reads them: decoded and augmented in the loader process, its own RNG."
    def __init__(self, split): self.split = split
    def __len__(self): return len(self.split)
    def __getitem__(self, i):
        img = self.split._read(i)                      # read as the split reads it (in memory when it fits)
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
    cfg = demo_cnn_config(data_root, args.loop_size, args.seed, str(device), **{'dense.batch_size': 16, 'data.workers': None})
    return loop_ratio(cfg, args.loop_epochs, args.repeats, device)


def step_ms(batch: int, dilate: bool, img_size: int = 64, repeats: int = 12) -> float:
    "Median milliseconds per SGD step of the demo CNN with its head (forward, CE, backward, step) on one thread."
    import dataclasses
    from dinoqpm.features import get_backbone_spec
    from dinoqpm.features.backbone import BACKBONES
    spec = get_backbone_spec(DEMO_BACKBONE)
    BACKBONES[DEMO_BACKBONE] = dataclasses.replace(spec, dilate=dilate)
    try:
        model = CNNQPMModel(DEMO_BACKBONE, 25, 0.2, img_size).train()
    finally: BACKBONES[DEMO_BACKBONE] = spec
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, img_size, img_size, generator=g), torch.randint(0, 25, (batch,), generator=g)
    times = []
    for r in range(repeats + 2):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).logits, y); opt.zero_grad(); loss.backward(); opt.step()
        if r >= 2: times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def part_steps(data_root, args, device):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = {f'batch {b}, {"dilated" if d else "undilated"}': step_ms(b, d) for b in (4, 8, 16) for d in (True, False)}
    finally: torch.set_num_threads(old)
    per_image = {k: round(v / int(k.split(',')[0].split()[1]), 2) for k, v in ms.items()}
    return {'img_size': 64, 'threads': 1, 'ms_per_step': ms, 'ms_per_image': per_image,
            'undilated_over_dilated_batch8': round(ms['batch 8, undilated'] / ms['batch 8, dilated'], 3)}


def one_cell(img_size: int, seed: int, data_root: str, run_dir: str) -> dict:
    "One Table 1 CNN cell at `img_size` as `make table1` runs it (one thread), timed; what the table reports of it."
    from dinoqpm.paper.table1 import one_thread_per_cell
    from dinoqpm.pipeline import run_qpm
    cfg = demo_cnn_config(data_root, img_size, seed, 'cpu')
    t0 = time.perf_counter()
    with one_thread_per_cell(): run_qpm(cfg, run_dir, progress=False)
    seconds = time.perf_counter() - t0
    from dinoqpm.features import cnn_grid
    rec = {'grid': list(cnn_grid(DEMO_BACKBONE, img_size)), 'seconds': round(seconds, 1)}
    for k, f in (('dense', 'results_dense.json'), ('qpm', 'results_finetune.json')):
        res = json.loads((Path(run_dir) / f).read_text())
        rec[k] = {'test_accuracy': round(res['Accuracy'], 4), 'Plausibility': round(res['Plausibility'], 4),
                  'converged': res['converged'],
                  **{ph: {c: v.get(c) for c in ('steps', 'budget_steps', 'converged', 'stopped_at_convergence', 'wall_seconds')}
                     for ph, v in res['convergence'].items()}}
    qp = json.loads((Path(run_dir) / 'qp' / 'qp_result.json').read_text())
    rec['qp'] = {k: qp.get(k) for k in ('status', 'gap', 'seconds', 'locality_bias')}
    return rec


def part_sizes(data_root, args, device):
    "Per input size, one Table 1 CNN cell (seed `--seed`), two at a time in processes of their own."
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dinoqpm.paper import QUICK_CNN
    sizes = [int(s) for s in args.sizes.split(',')]
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn')) as ex:
        futures = {s: ex.submit(one_cell, s, args.seed, str(data_root), str(Path(tmp) / f's{s}')) for s in sorted(sizes, reverse=True)}
        per_size = {s: futures[s].result() for s in sizes}
    for s, rec in per_size.items(): print('size', s, json.dumps(rec), flush=True)
    return {'backbone': DEMO_BACKBONE, 'quick_cnn': QUICK_CNN, 'seed': args.seed, 'per_size': per_size,
            'note': 'the cells ran two at a time on the 2 cores, one thread each, as make table1 runs its cells'}


def timed_table1(work: Path, rows) -> float:
    "Seconds of `run_table1` (quick mode, seeds 0-2, two processes) of `rows` from scratch in `work`, in a fresh process."
    code = ('import dinoqpm, json, sys, time; from dinoqpm.paper import paper_params, run_table1, list_table1_rows; '
            'from dinoqpm.core import setup_logging; setup_logging("WARNING"); '
            f'p = paper_params(runs_root={str(work / "runs")!r}, data_root={str(work / "data")!r}, out_dir={str(work / "figures")!r}); '
            f'rows = {rows!r}; t0 = time.perf_counter(); '
            'run_table1(p, rows=[r for r in list_table1_rows() if rows is None or r in rows], progress=False); '
            'print("SECONDS", time.perf_counter() - t0)')
    import subprocess
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1'))
    if r.returncode: raise SystemExit(f'run_table1 failed:\n{r.stderr[-4000:]}')
    return float(r.stdout.split('SECONDS')[-1])


def part_table1(data_root, args, device):
    from dinoqpm.paper import list_table1_rows
    from dinoqpm.paper.table1 import TABLE1_ROW_REGISTRY
    without = [r for r in list_table1_rows() if TABLE1_ROW_REGISTRY[r].cell != 'cnn_qpm']
    with tempfile.TemporaryDirectory() as tmp:
        t_without = timed_table1(Path(tmp) / 'without', without)
        t_with = timed_table1(Path(tmp) / 'with', None)
    added = t_with - t_without
    return {'seconds_without_cnn_rows': round(t_without, 1), 'seconds_with_cnn_rows': round(t_with, 1),
            'added_seconds': round(added, 1), 'budget_seconds': BUDGET_SECONDS, 'within_budget': added <= BUDGET_SECONDS,
            'ratio_with_over_without': round(t_with / t_without, 3), 'rows_without': without,
            'what': 'run_table1 of quick mode (seeds 0,1,2, the cells in two processes) from scratch, each in a fresh '
                    'process and folder; the notebooks after it (figures, export) do not train the CNN rows'}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--parts', default='loop,steps,sizes,table1')
    ap.add_argument('--sizes', default='64,96,128')
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
        rec = {'loop': part_loop, 'steps': part_steps, 'sizes': part_sizes, 'table1': part_table1}[part](data_root, args, device)
        rec.update(bench_seconds=round(time.perf_counter() - t0, 1), load_average_before_after=[load0[0], os.getloadavg()[0]],
                   provenance=provenance(seed=args.seed, part=part, device=str(device)))
        if part in result:                                               # earlier runs of the part are kept, newest last
            result[f'{part}_earlier'] = result.get(f'{part}_earlier', []) + [result[part]]
        result[part] = rec
        atomic_write_json(out, result)
        print(part, json.dumps({k: v for k, v in rec.items() if not isinstance(v, dict)}), flush=True)


if __name__ == '__main__':
    main()
