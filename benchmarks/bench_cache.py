"""Feature-cache benchmark (not a test): extraction vs the bare backbone forward, bytes per stored value, read throughput.

    python benchmarks/bench_cache.py [--backbones efficientnet_lite0 dinov2_vits14_reg4] [--images-per-class 8] [--out benchmarks/results/cache.json]

For each backbone, on the same SynthBirds images in the same process:
- bare forward: the backbone alone on preprocessed images already in memory (same batch size, `torch.inference_mode()`);
- extraction: `build_feature_cache` from scratch. `ratio_loop` compares the extraction loop (image decoding, preprocessing,
  forward, float16, memmap writes, flushes and progress files) with the bare forward: the goal is >= 0.9x.
  `fixed_overhead_s` is the once-per-split rest (reading the dataset index, hashing the weights, loading the backbone,
  masks, hashing the arrays, manifest and provenance); `ratio_end_to_end` includes it, so it approaches `ratio_loop` as N grows;
- bytes per stored value: (patch.npy + cls.npy bytes - their .npy headers) / values, and the constant overhead;
- cache reads: random minibatches from the memory map (`FeatureCache.batches`, float32 torch tensors) at the paper's
  size (256 x 768 tokens per image), against a training step of the paper's adapter (4 layers, 2048 hidden, 512 features)
  on the same batch size; the goal is >= 10x.
DINOv2 weights cannot be had offline, so `dinov2_*` runs use random weights written in Meta's layout (the speed does not
depend on the values). Timings are wall-clock on whatever machine runs this; the JSON records the machine.
"""
import argparse, json, logging, os, platform, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from dinoqpm.features import backbone as B
from dinoqpm.features import build_feature_cache, FeatureCache, save_feature_cache, open_feature_cache
from dinoqpm.core import atomic_write_json, provenance, get_device
from dinoqpm.data import load_dataset, make_transform


def _weights_for(name, wdir):
    spec = B.get_backbone_spec(name)
    if spec.family == 'efficientnet': return None, True
    path = Path(wdir) / spec.weights_file
    if not path.exists():
        model = B.randomize_(B.build_timm_model(spec, 224, on_meta=False), 0, scale=0.02)
        B.save_meta_checkpoint(model, path, layout='dino' if spec.family == 'dino' else 'dinov2')
    return wdir, False


def bench_extraction(name, data_root, wdir, batch_size, chunk_size, num_workers, device, repeats):
    spec = B.get_backbone_spec(name)
    wdir, real = _weights_for(name, wdir)
    img_size = spec.default_img_size
    ds = load_dataset('SynthBirds', 'train', root=data_root, transform=make_transform('paper', 'SynthBirds', img_size))
    n = len(ds)
    bb = B.create_backbone(name, weights_dir=wdir, img_size=img_size).to(device)
    images = torch.stack([ds[i]['image'] for i in range(n)])
    def bare():
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                out = bb(images[i:i + batch_size].to(device))
                if device.type == 'cuda': torch.cuda.synchronize()
        return n / (time.perf_counter() - t)
    bare()  # warm-up
    bare_ips, extract_ips, inner_ips, fixed_s = [], [], [], []
    for r in range(repeats):
        bare_ips.append(bare())
        cache_root = Path(tempfile.mkdtemp(prefix='bench-cache-'))
        t = time.perf_counter()
        fc = build_feature_cache('SynthBirds', 'train', name, root=data_root, weights_dir=wdir, img_size=img_size,
                                 cache_root=cache_root, batch_size=batch_size, chunk_size=chunk_size, device=device,
                                 num_workers=num_workers, progress=False)
        total = time.perf_counter() - t
        extract_ips.append(n / total)
        inner_ips.append(fc.manifest['extraction']['images_per_s'])
        fixed_s.append(total - fc.manifest['extraction']['seconds'])
        m = fc.manifest
        values = int(np.prod(m['arrays']['patch']['shape'])) + int(np.prod(m['arrays']['cls']['shape']))
        token_bytes = m['arrays']['patch']['bytes'] + m['arrays']['cls']['bytes']
        headers = sum(m['arrays'][a]['bytes'] - int(np.prod(m['arrays'][a]['shape'])) * 2 for a in ('patch', 'cls'))
        folder_bytes = sum(f.stat().st_size for f in fc.path.iterdir())
        shutil.rmtree(cache_root)
    med = lambda v: float(np.median(v))
    return dict(backbone=name, pretrained_weights_real=real, img_size=img_size, grid=list(bb.grid), embed_dim=bb.embed_dim,
                n_images=n, batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers, repeats=repeats,
                bare_forward_images_per_s=med(bare_ips), extraction_end_to_end_images_per_s=med(extract_ips),
                extraction_loop_images_per_s=med(inner_ips),
                ratio_loop=med(inner_ips) / med(bare_ips), ratio_end_to_end=med(extract_ips) / med(bare_ips),
                fixed_overhead_s=med(fixed_s), goal_ratio=0.9,
                all_bare=bare_ips, all_end_to_end=extract_ips, all_loop=inner_ips, all_fixed_s=fixed_s,
                bytes_per_value=(token_bytes - headers) / values, npy_header_bytes=headers,
                folder_bytes=folder_bytes, folder_overhead_bytes=folder_bytes - (token_bytes - headers),
                bytes_per_image_tokens=(token_bytes - headers) / n)


def bench_reads(n, grid, dim, batch_size, steps, device, adapter_steps):
    d = Path(tempfile.mkdtemp(prefix='bench-read-'))
    rng = np.random.default_rng(0)
    n_p = grid[0] * grid[1]
    patch = np.lib.format.open_memmap(d / 'src.npy', mode='w+', dtype=np.float16, shape=(n, n_p, dim))
    for i in range(0, n, 256): patch[i:i + 256] = rng.standard_normal((min(256, n - i), n_p, dim), dtype=np.float32)
    fc = FeatureCache.from_arrays(patch, rng.standard_normal((n, dim)), rng.integers(0, 200, n), grid, 200)
    save_feature_cache(fc, d / 'cache')
    del fc, patch
    (d / 'src.npy').unlink()
    t = time.perf_counter(); fc = open_feature_cache(d / 'cache', verify='full'); open_s = time.perf_counter() - t
    res = {}
    for label, bs in (('batch', batch_size), ('batch_x4', 4 * batch_size)):
        for _ in fc.batches(bs, seed=1, device=device):  # one warm pass (page cache)
            pass
        got, t = 0, time.perf_counter()
        for s in range(steps):
            for b in fc.batches(bs, seed=100 + s, device=device):
                got += len(b['label'])
        if device.type == 'cuda': torch.cuda.synchronize()
        res[f'read_samples_per_s_{label}'] = got / (time.perf_counter() - t)
    # the adapter's training step at the paper's size on the same batch size
    from dinoqpm.model import DinoQPMModel
    from dinoqpm.config import AdapterConfig
    model = DinoQPMModel(dim, 200, AdapterConfig(), grid=grid).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = fc.batch(np.arange(batch_size), device=device)
    tokens = torch.cat([b['patch'], b['cls'][:, None]], 1)
    def step():
        out = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits, b['label'])
        opt.zero_grad(); loss.backward(); opt.step()
    step()
    t = time.perf_counter()
    for _ in range(adapter_steps): step()
    if device.type == 'cuda': torch.cuda.synchronize()
    train_sps = adapter_steps * batch_size / (time.perf_counter() - t)
    shutil.rmtree(d)
    return dict(n_samples=n, grid=list(grid), embed_dim=dim, batch_size=batch_size, cache_bytes=n * n_p * dim * 2,
                open_verify_full_s=open_s, **res, adapter_train_samples_per_s=train_sps, adapter_steps=adapter_steps,
                read_over_train=res['read_samples_per_s_batch'] / train_sps, goal_read_over_train=10.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--backbones', nargs='+', default=['efficientnet_lite0', 'dinov2_vits14_reg4'])
    ap.add_argument('--n-classes', type=int, default=4)
    ap.add_argument('--images-per-class', type=int, default=16)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--chunk-size', type=int, default=64)
    ap.add_argument('--num-workers', type=int, default=None)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--read-samples', type=int, default=1000)
    ap.add_argument('--read-steps', type=int, default=2)
    ap.add_argument('--adapter-steps', type=int, default=3)
    ap.add_argument('--device', default='auto')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'cache.json'))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = get_device(a.device)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix='bench-cache-data-'))
    try:
        load_dataset('SynthBirds', 'train', root=work, n_classes=a.n_classes, images_per_class=a.images_per_class, img_size=256, progress=False)
        wdir = work / 'weights'; wdir.mkdir()
        from dinoqpm.features.cache import default_loader_workers
        workers = default_loader_workers() if a.num_workers is None else a.num_workers
        extraction = []
        for name in a.backbones:
            extraction.append(bench_extraction(name, work, wdir, a.batch_size, a.chunk_size, workers, device, a.repeats))
            print(json.dumps({k: v for k, v in extraction[-1].items() if not k.startswith('all_')}, indent=1), flush=True)
        reads = bench_reads(a.read_samples, (16, 16), 768, 32, a.read_steps, device, a.adapter_steps)
        print(json.dumps(reads, indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = dict(benchmark='feature cache', device=str(device),
                  device_name=torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), args=vars(a),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  note='wall-clock on a shared machine: other jobs running at the same time lower both sides of each ratio',
                  extraction=extraction, reads=reads, provenance=provenance())
    atomic_write_json(a.out, result)
    print('wrote', a.out)


if __name__ == '__main__':
    main()
