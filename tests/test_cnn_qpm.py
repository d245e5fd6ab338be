"""QPM on a CNN trained end to end, as a user runs it (issue 21): the five resumable stages on images with a random
ResNet50 in torchvision's layout (train, QP with QPM's locality bias B, finetune, evaluate), every metric on both models,
the export, inference and the command line, and the refusals before any work."""
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

from dinoqpm.config import update_config, ConfigError
from dinoqpm.pipeline import run_qpm, validate_run_config, qp_inputs, load_run_data, extract_caches
from dinoqpm.qp import QPResult, locality_bias, qp_constants
from dinoqpm.train import load_model, extract_features, read_model_file
from dinoqpm.evaluation import TABLE1_METRICS


def _files(folder) -> dict:
    "Every file below `folder` with its modification time and size (the lock file aside)."
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(folder).rglob('*'))
            if p.is_file() and p.name != '.dinoqpm.lock'}


def _in_process(*args, cwd):
    "`dinoqpm.cli.main` in this process: `(exit code, stderr)`."
    import contextlib, io, os
    from dinoqpm.cli import main
    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err): code = main(['--log-level', 'WARNING', *map(str, args)])
    finally: os.chdir(here)
    return code, err.getvalue()


def test_every_stage_on_images_with_every_metric_on_both_models(cnn_qpm_run):
    "The run's files, its QP with B, and every Table 1 metric on the dense CNN (all 2048 maps) and on QPM (the selected ones)."
    r, out, cfg = cnn_qpm_run.run, cnn_qpm_run.out, cnn_qpm_run.cfg
    for f in ('config.json', 'class_names.json', 'dense_model.pt', 'finetune_model.pt', 'results_dense.json',
              'results_finetune.json', 'qp/qp_result.json', 'qp/A.npy', 'qp/R.npy', 'qp/B.npy', 'dense/log.csv', 'finetune/log.csv'):
        assert (r / f).is_file(), f
    assert not (cnn_qpm_run.world.data / 'dinoqpm_cache').exists()                     # no token cache for a CNN
    for f in ('dense_model.pt', 'finetune_model.pt'): assert read_model_file(r / f, 'model file')['spec']['kind'] == 'cnn'
    dense, qpm = out['results_dense'], out['results']
    assert (dense['method'], qpm['method'], dense['backbone'], qpm['head']) == ('QPM dense', 'QPM', 'resnet50', 'bldd')
    assert dense['NFfeatures'] == 2048 and qpm['NFfeatures'] == cfg.qp.n_select
    for res in (dense, qpm):
        for k in TABLE1_METRICS: assert res[k] is not None and np.isfinite(res[k]), (res['method'], k, res['skipped'])
    q = QPResult.load(r / 'qp')
    assert q.locality_bias and qpm['qp_locality_bias'] is True and json.loads((r / 'qp' / 'qp_result.json').read_text())['locality_bias']
    assert q.certified and (q.weight.sum(1) == cfg.qp.n_per_class).all() and len({tuple(w) for w in q.weight}) == len(q.weight)
    assert q.z_b == pytest.approx(float(np.load(r / 'qp' / 'B.npy')[q.selection].sum()))   # B is in the objective
    model = load_model(r / 'finetune_model.pt')
    assert model.kind == 'cnn' and model.grid == (4, 4) and model.selection.tolist() == q.selection.tolist()
    for phase in ('dense', 'finetune'):             # images are not tested during training (test_every): the evaluation does it
        assert all(row['test_acc'] is None for row in load_model(r / f'{phase}_model.pt').history)


def test_rerun_reuses_every_stage(cnn_qpm_run, tmp_path):
    "A finished run run again: every stage is reused and no file of the run directory changes."
    run = tmp_path / 'run'
    shutil.copytree(cnn_qpm_run.run, run)
    before = _files(run)
    again = run_qpm(cnn_qpm_run.cfg, run, eval_mode='all', progress=False)
    assert _files(run) == before
    assert again['results']['Accuracy'] == cnn_qpm_run.out['results']['Accuracy']


def test_locality_bias_is_qpms_compute_B_on_the_cnn_maps(cnn_qpm_run):
    """QPM's `compute_B.py` written out here in bare torch on all the dense CNN's maps of the unaugmented training images
    at once: its per-image weights, softmax maxima and border flags (`:64-103`) are what `qp_inputs` computed batch by batch,
    and the B the run saved is `qp.locality_bias` of them; A and R are those of the same features."""
    train, _ = load_run_data(cnn_qpm_run.cfg)
    dense = load_model(cnn_qpm_run.run / 'dense_model.pt')
    with torch.no_grad():
        x = torch.stack([train.image(i) for i in range(len(train))])
        maps = dense.dense_features(x, dense.grid)[0].double()
    f = maps.mean((2, 3))
    w = f / f.sum(1, keepdim=True)                                                    # compute_B.py:66
    soft_max = torch.softmax(maps.flatten(2), 2).amax(2)                            # :74-75, evaluation/helpers.py:4-6
    am = maps.flatten(2).argmax(2)
    H, W = maps.shape[2:]
    edge = (am // W == 0) | (am // W == H - 1) | (am % W == 0) | (am % W == W - 1)  # :80-88
    got = qp_inputs(dense, train, locality=True, batch_size=5)                      # batches of 5, maps 2 at a time
    assert np.allclose(got['softmax_max'], soft_max.numpy(), rtol=1e-5, atol=1e-9) and (got['on_edge'] == edge.numpy()).all()
    assert np.allclose(got['features'], f.numpy(), rtol=1e-4, atol=1e-6)
    assert np.allclose((soft_max * w).sum(0).numpy() / len(f),                     # :76-77, the score B is clipped from
                       (got['softmax_max'] * got['features'] / got['features'].sum(1, keepdims=True)).sum(0) / len(f), rtol=1e-4)
    B = np.load(cnn_qpm_run.run / 'qp' / 'B.npy')
    assert np.allclose(B, locality_bias(got['softmax_max'], got['on_edge'], got['features']), atol=1e-9)
    plain = qp_inputs(dense, train)                                                  # without B: extract_features' pass
    assert np.array_equal(plain['features'], extract_features(dense, train)['features'].numpy())
    A, R = qp_constants(plain['features'], plain['labels'], train.n_classes)
    assert np.allclose(A, np.load(cnn_qpm_run.run / 'qp' / 'A.npy'), atol=1e-6) and np.allclose(R, np.load(cnn_qpm_run.run / 'qp' / 'R.npy'), atol=1e-6)


def test_refused_before_any_work(cnn_world, tmp_path):
    "A trainable backbone's mistakes are one line naming the key or the expected file, and nothing is written."
    from dinoqpm.pipeline import cnn_smoke_config
    cfg = cnn_smoke_config(cnn_world.data, cnn_world.weights)
    for over, msg in [({'backbone.weights_dir': str(tmp_path / 'none')}, str(tmp_path / 'none' / 'resnet50-19c8e357.pth')),
                      ({'qp.n_select': 3000}, 'qp.n_select=3000 exceeds the 2048 feature maps of resnet50 (backbone.trainable)'),
                      ({'backbone.name': 'dinov2_test_tiny'}, "backbone 'dinov2_test_tiny' cannot be trained end to end"),
                      ({'data.img_size': 8}, 'data.img_size=8 is too small for resnet50: its maps would be under 1x1, at least 2x2')]:
        with pytest.raises(Exception) as e: run_qpm(update_config(cfg, over), tmp_path / 'run', progress=False)
        assert msg in str(e.value) and '\n' not in str(e.value), (over, str(e.value))
    assert not (tmp_path / 'run').exists()
    with pytest.raises(ConfigError, match='no token cache to extract'): extract_caches(cfg)
    code, err = _in_process('train', '--qpm', '--set', 'data.dataset=SynthBirds', '--set', f'data.root={cnn_world.data}',
                            '--set', f'backbone.weights_dir={tmp_path / "w"}', '--run-dir', tmp_path / 'run', cwd=tmp_path)
    assert code == 2 and err.count('\n') == 1 and str(tmp_path / 'w' / 'resnet50-19c8e357.pth') in err, err
    assert not (tmp_path / 'run').exists()


def test_export_and_inference_run_the_cnn_itself(cnn_qpm_run, tmp_path):
    """The export holds the whole CNN (format 3, kind 'cnn'); read back with no weights folder at all, it predicts the test
    images as the run's finetuned model does, `dinoqpm inference` runs on it and on the run directory alike, and its
    explorer page names QPM and the CNN."""
    import dinoqpm
    from dinoqpm.share import run_inference, read_export
    ex = cnn_qpm_run.export
    config = json.loads((ex / 'config.json').read_text())
    assert config['dinoqpm_export_format'] == 3 and config['method'] == 'QPM' and config['model']['spec']['kind'] == 'cnn'
    assert config['backbone']['trainable'] is True
    from safetensors.torch import load_file
    assert any(k.startswith('backbone.model.layer4.') for k in load_file(ex / 'model.safetensors'))   # the trained CNN itself
    model = dinoqpm.load_pretrained(ex, device='cpu', weights_dir=tmp_path / 'empty')    # no backbone weights read
    _, test = load_run_data(cnn_qpm_run.cfg)
    mine = load_model(cnn_qpm_run.run / 'finetune_model.pt')
    with torch.no_grad():
        x = torch.stack([test.image(i) for i in range(len(test))])
        assert torch.allclose(model.predict(x).logits, mine(x, mine.grid).logits, atol=1e-5)
    exp = model.explain(test.dataset.load_image(0))
    assert exp['picture'].shape == (224, 224, 3) and len(exp['features']) == cnn_qpm_run.cfg.qp.n_per_class
    page = (ex / 'index.html').read_text()
    assert 'QPM on SynthBirds (resnet50, trained end to end)' in page
    readme = (ex / 'README.md').read_text()
    assert '# QPM on SynthBirds (resnet50, trained end to end)' in readme and "standing in for QPM's ResNet50" not in readme
    card = json.loads((ex / 'explanation.json').read_text())
    assert card['trained_end_to_end'] and card['method'] == 'QPM' and card['qp']['locality_bias'] is True
    for path in (ex, cnn_qpm_run.run):
        rep = run_inference(path, cnn_qpm_run.images, tmp_path / f'{path.name}.json', device='cpu', progress=False, max_features=2)
        assert rep['num_images'] == 4 and rep['num_failed'] == 0 and rep['backbone']['trainable'] is True
        assert all(Path(p).exists() for r in rep['predictions'] for p in r['visualisation'].values())
    a, b = (json.loads((tmp_path / f'{n}.json').read_text())['predictions'] for n in ('model', 'run'))
    assert [r['pred_class'] for r in a] == [r['pred_class'] for r in b]
    assert read_export(ex).backbone is not None


def test_command_line_evaluate_export_inference(cnn_qpm_run, tmp_path):
    "`dinoqpm evaluate`, `export` and `inference` on the CNN run, in this process."
    run = tmp_path / 'run'
    shutil.copytree(cnn_qpm_run.run, run)
    code, err = _in_process('evaluate', '--model-path', run, '--eval-mode', 'accuracy,plausibility', '--output-json', tmp_path / 'e.json', cwd=tmp_path)
    assert code == 0, err
    assert json.loads((tmp_path / 'e.json').read_text())['Accuracy'] == pytest.approx(cnn_qpm_run.out['results']['Accuracy'])
    code, err = _in_process('export', '--model-path', run, '--out', tmp_path / 'ex', '--prototypes', '1', '--examples', '1', cwd=tmp_path)
    assert code == 0 and (tmp_path / 'ex' / 'manifest.json').exists(), err
    code, err = _in_process('inference', '--model-path', tmp_path / 'ex', '--image-path', cnn_qpm_run.images,
                            '--output-json', tmp_path / 'p.json', '--no-visualize-feature-maps', cwd=tmp_path)
    assert code == 0 and json.loads((tmp_path / 'p.json').read_text())['num_images'] == 4, err


def test_model_file_of_another_dilation_is_one_line_naming_the_file(cnn_qpm_run, tmp_path):
    """A CNN model file whose recorded dilation is not what the package builds (a file of the dilated stand-in from before
    it was undilated) is refused by `load_model` and by the command line with one line naming the file, not a traceback."""
    from dinoqpm.core import save_checked
    ck = read_model_file(cnn_qpm_run.run / 'finetune_model.pt', 'model file')
    ck['spec'] = {**ck['spec'], 'dilate': not ck['spec']['dilate']}
    run = tmp_path / 'run'
    shutil.copytree(cnn_qpm_run.run, run)
    bad = save_checked(ck, run / 'finetune_model.pt')
    with pytest.raises(ConfigError, match=f'{bad}: .*was trained with dilate='): load_model(bad)
    code, err = _in_process('evaluate', '--model-path', bad, '--eval-mode', 'accuracy', cwd=tmp_path)
    assert code == 2 and err.count('\n') == 1 and str(bad) in err and 'train it again' in err, err
