"""The GPU check (run by benchmarks/gpu_check.sh on a CUDA machine; `--device cpu` runs the same code paths on a CPU
as a dry run). Writes benchmarks/results/gpu_check.json:

* extraction of SynthBirds with the ViT-B/14-reg4 architecture (random weights saved in Meta's layout) at 224 px, bf16
  autocast and fp32, and with efficientnet_lite0 at 448 px: images/s, peak GPU memory, and extraction over the bare
  forward (random input on the device: 1.0 means the input pipeline keeps up), plus how far the bf16 tokens are from the
  fp32 ones;
* the dense phase of DINO-QPM (the demo adapter) on the ViT-B tokens: seconds per epoch and peak memory;
* the smoke Table 1 (`dinoqpm table1 --set mode=smoke`): wall seconds;
* QPM on a CNN trained end to end (issue 21): the package's loop (`train_dense` on an `ImageSplit`, bf16 autocast,
  loader processes, pinned memory, channels_last) against a bare torch loop on the same model, batch, input size and
  loader (`benchmarks/bench_train_images.py`, ratio >= 0.85 required), QPM's ResNet50 (random weights saved in
  torchvision's layout) at 224 px on SynthBirds, bf16 and fp32; the first steps' losses of both precisions.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dinoqpm.core import atomic_write_json, provenance, setup_logging


def peak_reset(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()

def peak_gb(dev):
    if dev.type != 'cuda': return None
    torch.cuda.synchronize(); return round(torch.cuda.max_memory_allocated() / 1e9, 3)

def bare_forward(bb, dev, batch, size, precision, n=8):
    x = torch.randn(batch, 3, size, size, device=dev)
    ac = torch.autocast('cuda', dtype=torch.bfloat16) if (precision == 'bf16' and dev.type == 'cuda') else torch.autocast('cpu', enabled=False)
    with torch.inference_mode(), ac:
        bb(x)
        if dev.type == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n): bb(x)
        if dev.type == 'cuda': torch.cuda.synchronize()
    return batch * n / (time.perf_counter() - t)

def extraction(name, weights_dir, data_root, img_size, precision, dev, batch, tmp, limit):
    from dinoqpm.features import create_backbone
    from dinoqpm.features import extract_tokens, open_feature_cache
    from dinoqpm.data import load_dataset, make_transform
    ds = load_dataset('SynthBirds', 'train', root=data_root, transform=make_transform('paper', 'SynthBirds', img_size))
    if limit: ds.samples = ds.samples[:limit]; ds.relpaths = ds.relpaths[:limit]
    bb = create_backbone(name, weights_dir=weights_dir, img_size=img_size).to(dev)
    fwd = bare_forward(bb, dev, batch, img_size, precision)
    peak_reset(dev)
    folder = tmp / f'{name}_{precision}' / 'train'
    t = time.perf_counter()
    fc = extract_tokens(ds, bb, folder, batch_size=batch, device=dev, progress=False, precision=precision)
    sec = time.perf_counter() - t
    return fc, {'backbone': name, 'img_size': img_size, 'precision': precision if dev.type == 'cuda' else 'fp32',
                'images': len(ds), 'images_per_s': round(len(ds) / sec, 2), 'bare_forward_images_per_s': round(fwd, 2),
                'extraction_over_bare_forward': round(len(ds) / sec / fwd, 3), 'peak_gpu_gb': peak_gb(dev),
                'loader_workers': fc.manifest['extraction'].get('workers')}

def images_loop(dev, data, tmp, a) -> list:
    """The end-to-end loop on images against a bare loop (bench_train_images.loop_ratio), in bf16 and fp32: QPM's
    ResNet50 at 224 px on CUDA; the demo's EfficientNet-Lite0 at 64 px, one epoch, in a CPU dry run."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from bench_train_images import demo_cnn_config, loop_ratio
    from dinoqpm.features import make_test_resnet_checkpoint
    wd = tmp / 'resnet_weights'
    make_test_resnet_checkpoint(wd)
    cuda = dev.type == 'cuda'
    over = ({'backbone.name': 'resnet50', 'backbone.weights_dir': str(wd), 'dense.batch_size': 16} if cuda else {'dense.batch_size': 8})
    out = []
    for precision in (('bf16', 'fp32') if cuda else ('fp32',)):
        cfg = demo_cnn_config(data, 224 if cuda else 64, 0, str(dev), **over, **{'backbone.precision': precision})
        out.append(loop_ratio(cfg, epochs=2 if cuda else 1, repeats=2 if cuda else 1, device=dev, progress=False))
    return out

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--images', type=int, default=0, help='use only the first N training images (0: all)')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--dense-epochs', type=int, default=20)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'gpu_check.json'))
    a = ap.parse_args()
    setup_logging('WARNING')
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise SystemExit('no CUDA device here: nothing to check (see --device cpu)')
    tmp = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    res = {'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu (dry run)',
           'torch': torch.__version__, 'cuda': torch.version.cuda, 'cpu_count': os.cpu_count()}
    try:
        import timm
        from dinoqpm.features import meta_state_dict
        from dinoqpm.data import load_dataset
        wd, data = tmp / 'weights', tmp / 'data'
        wd.mkdir()
        vit = timm.create_model('vit_base_patch14_reg4_dinov2', pretrained=False, num_classes=0, img_size=518)
        torch.save(meta_state_dict(vit), wd / 'dinov2_vitb14_reg4_pretrain.pth')
        del vit
        load_dataset('SynthBirds', 'train', root=data, progress=False)          # the default SynthBirds (generated)
        runs = []
        fp32, r = extraction('dinov2_vitb14_reg4', wd, data, 224, 'fp32', dev, a.batch, tmp, a.images); runs.append(r)
        if dev.type == 'cuda':
            bf16, r = extraction('dinov2_vitb14_reg4', wd, data, 224, 'bf16', dev, a.batch, tmp, a.images)
            x, y = np.asarray(fp32.patch, np.float32), np.asarray(bf16.patch, np.float32)
            r['tokens_vs_fp32'] = {'max_abs': float(np.abs(x - y).max()), 'rel_rms': float(np.sqrt(((x - y) ** 2).mean() / (x ** 2).mean()))}
            runs.append(r)
        _, r = extraction('efficientnet_lite0', wd, data, 448, 'bf16', dev, max(1, a.batch // 4), tmp, a.images); runs.append(r)
        res['extraction'] = runs
        # the dense phase on the ViT-B tokens (the demo's adapter and recipe)
        from dinoqpm.config import demo_config, update_config
        from dinoqpm.train import train_dense
        cfg = update_config(demo_config(), {'dense.epochs': a.dense_epochs, 'device': str(dev), 'backbone.name': 'dinov2_vitb14_reg4'})
        peak_reset(dev)
        t = time.perf_counter()
        train_dense(cfg, fp32, None, None, progress=False)
        res['dense_phase'] = {'epochs': a.dense_epochs, 'train_images': len(fp32.labels),
                              'seconds_per_epoch': round((time.perf_counter() - t) / a.dense_epochs, 4), 'peak_gpu_gb': peak_gb(dev)}
        # the smoke Table 1 through the command line
        env = dict(os.environ, HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
        t = time.perf_counter()
        p = subprocess.run([sys.executable, '-m', 'dinoqpm', '--log-level', 'WARNING', 'table1', '--set', 'mode=smoke',
                            '--set', f'device={dev.type}', '--set', f'runs_root={tmp / "runs"}', '--set', f'out_dir={tmp / "fig"}',
                            '--no-progress'], env=env, capture_output=True, text=True)
        res['smoke_table1'] = {'returncode': p.returncode, 'wall_seconds': round(time.perf_counter() - t, 2),
                               'stderr_tail': p.stderr[-500:] if p.returncode else ''}
        res['images_loop'] = images_loop(dev, data, tmp, a)
        res['provenance'] = provenance()
        atomic_write_json(a.out, res)
        print(json.dumps({k: v for k, v in res.items() if k != 'provenance'}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
