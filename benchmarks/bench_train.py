"""Training throughput from the memory-mapped feature cache vs. one tensor file per image (the reference's layout).

Both loaders feed the same model, loss (CE + L_div) and schedule-free AdamW step in the same process. The cache is a
real on-disk `dinoqpm.features.cache` folder opened as memory maps; the per-image loader reads `feat_map.pt` and `feat_vec.pt`
(fp16) with `torch.load` for every sample through a `torch.utils.data.DataLoader`, as the reference's `DinoData` does.
Both read from a warm page cache (the files were just written). Reported: samples/s of the data path alone and of
full training steps, per adapter size. Writes JSON to benchmarks/results/train.json (not part of the test suite).

    python benchmarks/bench_train.py [--n 1280] [--steps 30] [--adapters demo,paper] [--workers 0,2] [--repeats 2] [--device auto]
"""
import argparse, json, os, platform, shutil, sys, tempfile, time
from dataclasses import replace
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm.config import AdapterConfig, DENSE_DEFAULTS
from dinoqpm.core import atomic_write_json, get_device, provenance
from dinoqpm.features import FeatureCache, save_feature_cache, open_feature_cache
from dinoqpm.model import DinoQPMModel
from dinoqpm.model import feature_diversity_loss
from dinoqpm.train import TokenDataset, iter_batches, epoch_order, make_optimizer, set_optimizer_mode

ADAPTERS = {'probe': AdapterConfig(n_layers=0),                                 # linear probe on pooled patch tokens (no MLP)
            'demo': AdapterConfig(n_layers=2, hidden=256, n_features=64),      # demo_config's adapter
            'paper': AdapterConfig()}                                            # 768→2048→2048→2048→512
BETA = {'probe': 0.0, 'demo': 0.5, 'paper': 0.5}                                 # the reference's no-MLP config has fdl = 0


class PerImageFiles(torch.utils.data.Dataset):
    "The reference layout: `<i>/feat_map.pt` [Np, D] and `<i>/feat_vec.pt` [D] (fp16), one `torch.load` each per sample."
    def __init__(self, folder, labels):
        self.folder, self.labels = Path(folder), labels
    def __len__(self): return len(self.labels)
    def __getitem__(self, i):
        d = self.folder / str(i)
        fmap = torch.load(d / 'feat_map.pt', weights_only=True)
        fvec = torch.load(d / 'feat_vec.pt', weights_only=True)
        return torch.cat([fmap, fvec[None]]).float(), int(self.labels[i])


def write_data(tmp, n, n_patches, dim, n_classes, seed=0):
    rng = np.random.default_rng(seed)
    patch = rng.standard_normal((n, n_patches, dim), dtype=np.float32).astype(np.float16)
    cls = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    labels = (np.arange(n) % n_classes).astype(np.int64)
    side = int(round(n_patches ** 0.5))
    save_feature_cache(FeatureCache.from_arrays(patch, cls, labels, (side, side), n_classes), tmp / 'cache')
    for i in range(n):
        (tmp / 'files' / str(i)).mkdir(parents=True)
        torch.save(torch.from_numpy(patch[i].copy()), tmp / 'files' / str(i) / 'feat_map.pt')
        torch.save(torch.from_numpy(cls[i].copy()), tmp / 'files' / str(i) / 'feat_vec.pt')
    return labels


def cache_batches(ds, bs, device, seed=0, prefetch=None):
    order, _ = epoch_order(len(ds), seed, 'bench', 0)
    return iter_batches(ds, bs, order, device, prefetch=prefetch)


def file_batches(ds, bs, device, workers, seed=0):
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, pin_memory=device.type == 'cuda',
                                     generator=torch.Generator().manual_seed(seed))
    for tokens, labels in dl: yield tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True), None


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def time_loader(make_iter, steps, warmup, bs, device):
    it = make_iter()
    for _ in range(warmup): next(it)
    sync(device); t = time.perf_counter()
    for _ in range(steps): next(it)
    sync(device)
    return steps * bs / (time.perf_counter() - t)


def time_training(make_iter, steps, warmup, bs, device, acfg, dim, n_classes, grid, beta):
    torch.manual_seed(0)
    model = DinoQPMModel(dim, n_classes, acfg, head_dropout=0.2, grid=grid).to(device).train()
    opt = make_optimizer(DENSE_DEFAULTS, model.parameters())
    set_optimizer_mode(opt, True)
    it = make_iter()
    def step():
        tokens, labels, _ = next(it)
        out = model(tokens)
        loss = F.cross_entropy(out.logits, labels)
        if beta: loss = loss + feature_diversity_loss(out.maps, out.final_features, out.logits, model.head_weight(), beta)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss.item()
    for _ in range(warmup): step()
    sync(device); t = time.perf_counter()
    for _ in range(steps): step()
    sync(device)
    return steps * bs / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=1280, help='samples written (each 256×768 fp16 tokens ≈ 0.39 MB, twice)')
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--adapters', default=None, help='probe,demo,paper (default: all on a GPU; probe,demo on CPU, where the paper MLP is compute-bound)')
    ap.add_argument('--repeats', type=int, default=3, help='each measurement is repeated and the best kept (shared machines are noisy)')
    ap.add_argument('--paper-steps', type=int, default=None, help='steps for the paper-size adapter (default: --steps; use fewer on CPU)')
    ap.add_argument('--workers', default='0,2', help='DataLoader workers for the per-image loader (the reference uses 5)')
    ap.add_argument('--device', default='auto')
    ap.add_argument('--tmp', default=None, help='scratch folder (default: a temporary folder, removed afterwards)')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'train.json'))
    a = ap.parse_args(argv)
    device = get_device(a.device)
    a.adapters = a.adapters or ('probe,demo,paper' if device.type == 'cuda' else 'probe,demo')
    n_patches, dim, n_classes, grid = 256, 768, 200, (16, 16)
    bs, workers = a.batch_size, [int(w) for w in a.workers.split(',') if w != '']
    need = (max(a.steps, a.paper_steps or 0) + a.warmup) * bs
    if a.n < need: raise SystemExit(f'--n {a.n} is too small for {a.steps}+{a.warmup} steps of batch {bs} (need {need})')
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix='bench_train_'))
    try:
        t = time.perf_counter()
        labels = write_data(tmp, a.n, n_patches, dim, n_classes)
        os.sync()                                   # no write-back of the fresh files during the measurements
        setup_s = time.perf_counter() - t
        cache_ds = TokenDataset(open_feature_cache(tmp / 'cache', verify='quick'))
        assert isinstance(cache_ds.cache.patch, np.memmap), 'the benchmark must read a memory-mapped cache'
        file_ds = PerImageFiles(tmp / 'files', labels)
        loaders = {'memmap_cache': lambda: cache_batches(cache_ds, bs, device),     # the training default (auto prefetch)
                   'memmap_cache_prefetch': lambda: cache_batches(cache_ds, bs, device, prefetch=True),
                   'memmap_cache_no_prefetch': lambda: cache_batches(cache_ds, bs, device, prefetch=False)}
        for w in workers: loaders[f'per_image_files_w{w}'] = (lambda w=w: file_batches(file_ds, bs, device, w))
        res = {'data_only': {}, 'training': {}}
        for name, mk in loaders.items():
            res['data_only'][name] = round(max(time_loader(mk, a.steps, a.warmup, bs, device) for _ in range(a.repeats)), 1)
            print(f'data only  {name:22s} {res["data_only"][name]:10.1f} samples/s', flush=True)
        for an in a.adapters.split(','):
            steps = a.paper_steps if an == 'paper' and a.paper_steps else a.steps
            res['training'][an] = {}
            for name, mk in loaders.items():
                sps = max(time_training(mk, steps, a.warmup, bs, device, ADAPTERS[an], dim, n_classes, grid, BETA[an]) for _ in range(a.repeats))
                res['training'][an][name] = round(sps, 1)
                print(f'train {an:5s} {name:22s} {sps:10.1f} samples/s', flush=True)
        def ratios(d):
            base = d['memmap_cache']
            return {k: round(base / v, 2) for k, v in d.items() if k.startswith('per_image')}
        out = {'benchmark': 'train_throughput', 'unit': 'samples/s', 'device': str(device),
               'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine(),
               'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
               'shape': {'n': a.n, 'n_patches': n_patches, 'dim': dim, 'n_classes': n_classes, 'batch_size': bs},
               'steps': a.steps, 'paper_steps': a.paper_steps or a.steps, 'warmup': a.warmup, 'repeats': a.repeats,
               'page_cache': 'warm', 'load_average_at_start': os.getloadavg()[0],
               'adapters': {k: vars(ADAPTERS[k]) for k in a.adapters.split(',')},
               'results': res,
               'speedup_memmap_over_per_image': {'data_only': ratios(res['data_only']),
                                                 **{f'training_{k}': ratios(v) for k, v in res['training'].items()}},
               'setup_seconds': round(setup_s, 1), 'goal': 'memmap >= 5x per-image files',
               'provenance': provenance()}
        atomic_write_json(a.out, out)
        print(json.dumps(out['speedup_memmap_over_per_image'], indent=1))
        print('wrote', a.out)
    finally:
        if a.tmp is None: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
