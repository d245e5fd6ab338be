"""The pinned-numerics fixture: a short, fixed training run and a backbone forward, reduced to SHA-256 digests.

`python tests/numerics_fixture.py` prints the digests as JSON (what `tests/fixtures/numerics.json` holds);
`tests/test_numerics.py` reproduces them bit for bit, and `tools/check_numerics.py` compares them on an emulated AVX2-only
Intel CPU (valgrind). `import dinoqpm` comes first, so the pins apply before torch starts.
"""
import dinoqpm  # noqa: F401  (pins the numerics before torch is imported)
import hashlib, json, logging
from dataclasses import replace


def state_digest(tensors: dict) -> str:
    "SHA-256 over the tensors of a state dict, in sorted key order (names, dtypes, shapes and bytes)."
    import torch
    h = hashlib.sha256()
    for k in sorted(k for k, v in tensors.items() if isinstance(v, torch.Tensor)):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f'{k}|{t.dtype}|{tuple(t.shape)}|'.encode()); h.update(t.numpy().tobytes())
    return h.hexdigest()


def fixture_digests() -> dict:
    """`train_sha256`: the weights after 3 epochs (30 steps) of the dense phase (MLP adapter, BatchNorm, L_div, dropout,
    schedule-free AdamW) on seeded synthetic tokens; `tokens_sha256`: the demo backbone's tokens of two seeded random
    images (oneDNN's convolutions)."""
    import torch
    from dinoqpm.features import create_backbone
    from dinoqpm.features import FeatureCache
    from dinoqpm.config import AdapterConfig, DENSE_DEFAULTS, RunConfig
    from dinoqpm.numerics import numerics_record
    from dinoqpm.train import make_token_data, train_dense
    cfg = RunConfig(seed=0, device='cpu', adapter=AdapterConfig(n_layers=2, hidden=64, n_features=16),
                    dense=replace(DENSE_DEFAULTS, epochs=3, batch_size=16))
    model, _ = train_dense(cfg, FeatureCache.from_arrays(**make_token_data(n=160, grid=(6, 6), dim=48, seed=1)), progress=False)
    bb = create_backbone('efficientnet_lite0_os16')
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(): tok = bb(x)
    rec = numerics_record()
    return {'train_sha256': state_digest(model.state_dict()), 'tokens_sha256': state_digest({'patch': tok.patch}),
            'numerics': {k: rec[k] for k in ('mode', 'pins', 'not_pinned', 'cpu', 'aten_cpu_capability', 'threads')}}


if __name__ == '__main__':
    logging.disable(logging.WARNING)
    print(json.dumps(fixture_digests(), indent=1))
