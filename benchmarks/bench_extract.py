"""Token extraction on this machine (not part of the test suite): how many CPU loader processes a backbone needs, what
`channels_last` buys a CNN, and what a second process buys. Writes benchmarks/results/extract.json; every number is a
ratio or a rate measured in this one run, on this machine.

1. Input pipeline alone: decode + resize + normalise + collate of SynthBirds images (`DataLoader` with 0, 1, 2 worker
   processes, no model), in images/s, against the bare backbone forward on the same machine (random input batches):
   `forward / pipeline-per-worker` is how many loader processes keep the backbone busy.
2. EfficientNet-Lite0 at 448 px, NCHW against `channels_last`: images/s of the bare forward and of the whole
   extraction (`dinoqpm extract` path, a fresh cache each time), and the largest token difference.
3. Extraction with 1 and with 2 processes (`torchrun --standalone --nproc-per-node 2 -m dinoqpm extract`) on the same
   configuration: wall-clock ratio (on 2 cores the two processes share the CPU; the ratio says what sharding costs or
   buys here, not on a GPU node).

    python benchmarks/bench_extract.py [--images 96] [--batch 16]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm.core import atomic_write_json, provenance, setup_logging
from dinoqpm.features import create_backbone
from dinoqpm.data import load_dataset, make_transform
from dinoqpm.features import extract_tokens


def rate(fn, n_images, repeat=2):
    "Images/s of `fn()` (which processes `n_images`), best of `repeat` after one warm-up."
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return n_images / best

def _timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def pipeline_rate(ds, batch, workers, n):
    from torch.utils.data import DataLoader, Subset
    sub = Subset(ds, range(n))
    def run():
        for _ in DataLoader(sub, batch_size=batch, num_workers=workers, persistent_workers=False): pass
    return rate(run, n, repeat=1)


def forward_rate(bb, batch, img_size, n_batches=3):
    x = torch.randn(batch, 3, img_size, img_size)
    def run():
        with torch.inference_mode():
            for _ in range(n_batches): bb(x)
    return rate(run, batch * n_batches)


def extraction_seconds(ds, bb, folder, batch):
    t = time.perf_counter()
    extract_tokens(ds, bb, folder, batch_size=batch, chunk_size=64, progress=False, num_workers=None)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--images', type=int, default=96)
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'extract.json'))
    a = ap.parse_args()
    setup_logging('WARNING')
    tmp = Path(tempfile.mkdtemp(prefix='bench_extract_'))
    res = {'machine': {'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads()}, 'images': a.images,
           'batch_size': a.batch}
    try:
        ds = load_dataset('SynthBirds', 'train', transform=make_transform('paper', 'SynthBirds', 448))
        n = min(a.images, len(ds))
        res['images'] = n
        # 1. the input pipeline against the backbone
        pipe = {str(w): round(pipeline_rate(ds, a.batch, w, n), 2) for w in (0, 1, 2)}
        eff = create_backbone('efficientnet_lite0')
        fwd = round(forward_rate(eff, a.batch, 448), 2)
        res['input_pipeline'] = {'images_per_s_by_workers': pipe, 'efficientnet_lite0_forward_images_per_s': fwd,
                                 'workers_needed_per_backbone': round(fwd / pipe['0'], 2),
                                 'note': 'workers=0 is the pipeline in the main process: one process\'s decode rate'}
        # 2. channels_last for the CNN
        cl = {}
        for on in (False, True):
            eff.set_channels_last(on)
            key = 'channels_last' if on else 'nchw'
            cl[key] = {'forward_images_per_s': round(forward_rate(eff, a.batch, 448), 2),
                       'extraction_images_per_s': round(n / extraction_seconds(_Named(ds, n), eff,
                                                                                tmp / f'cl_{key}' / 'train', a.batch), 2)}
        x = torch.stack([ds[i]['image'] for i in range(4)])
        with torch.inference_mode():
            t_cl = eff.set_channels_last(True)(x).patch
            t_nchw = eff.set_channels_last(False)(x).patch
        eff.set_channels_last(True)
        cl['forward_speedup'] = round(cl['channels_last']['forward_images_per_s'] / cl['nchw']['forward_images_per_s'], 3)
        cl['extraction_speedup'] = round(cl['channels_last']['extraction_images_per_s'] / cl['nchw']['extraction_images_per_s'], 3)
        cl['max_abs_token_difference'] = float((t_cl - t_nchw).abs().max())
        cl['max_abs_token'] = float(t_nchw.abs().max())
        res['channels_last_efficientnet_lite0_448'] = cl
        # 3. one process against two (torchrun) on the demo configuration's extraction
        cfg = tmp / 'demo.yaml'
        import yaml
        from dinoqpm.config import demo_config, config_to_dict
        cfg.write_text(yaml.safe_dump(config_to_dict(demo_config())))
        env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
        walls = {}
        for name, procs, threads in (('1', 1, None), ('2', 2, None), ('1_thread1', 1, '1')):
            cmd = ([sys.executable, '-m', 'dinoqpm'] if procs == 1 else
                   [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'dinoqpm'])
            e = dict(env, OMP_NUM_THREADS=threads) if threads else env
            t = time.perf_counter()
            r = subprocess.run([*cmd, '--log-level', 'WARNING', 'extract', '--config', str(cfg), '--cache-root',
                                str(tmp / f'procs{name}'), '--no-progress'], env=e, capture_output=True, text=True)
            if r.returncode: raise SystemExit(r.stderr[-3000:])
            walls[name] = round(time.perf_counter() - t, 2)
        same = lambda a: all((tmp / f'procs{a}' / f.relative_to(tmp / 'procs2')).read_bytes() == f.read_bytes()
                             for f in (tmp / 'procs2').rglob('*.npy'))
        res['processes'] = {'wall_seconds': {'1 process, 2 threads': walls['1'], '2 processes, 1 thread each': walls['2'],
                                             '1 process, 1 thread': walls['1_thread1']},
                            'two_over_one': round(walls['2'] / walls['1'], 3),
                            'identical_to_1_process_1_thread': same('1_thread1'),
                            'identical_to_1_process_2_threads': same('1'),
                            'what': 'dinoqpm extract on the demo configuration (train + test), process start and model '
                                    'load included; oneDNN convolutions depend on the thread count in the last bits, so '
                                    'the cache equals the single-process one with the same threads per process'}
        res['provenance'] = provenance()
        atomic_write_json(a.out, res)
        print(json.dumps({k: v for k, v in res.items() if k != 'provenance'}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Named(torch.utils.data.Dataset):
    "The first `n` items of `ds`, with the attributes `extract_tokens` reads (a `Subset` hides them); no masks."
    def __init__(self, ds, n): self.ds, self.n = ds, n; self.n_classes, self.class_names, self.has_masks = ds.n_classes, ds.class_names, False
    def __len__(self): return self.n
    def __getitem__(self, i): return self.ds[i]


if __name__ == '__main__':
    main()
