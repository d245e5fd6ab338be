"""Plant realistic single bugs one at a time and check that the test suite catches each (a mutation check; not part of
`make test`). Every mutant edits the notebook that is the source (and its exported module, as `nbdev_export` would) in a
scratch copy of the checkout, then runs the tests named for it; `test_sync` is left out, since it would flag any edit.

    .venv/bin/python tools/mutants.py [--only NAME,...] [--keep]     # prints one line per mutant, exit 1 if one survives
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB = 'tests/test_notebooks.py::test_notebook'

# name: (notebook stem, exported module's file under dinoqpm/ without .py, old text, new text, tests)
MUTANTS = {
    'table_columns_swapped': ('10a_paper_table1', 'paper/table1', "**{k: metrics.get(k) for k in _KEEP}",
                              "**{k: metrics.get({'Accuracy': 'Plausibility', 'Plausibility': 'Accuracy'}.get(k, k)) for k in _KEEP}",
                              ['tests/test_paper.py']),
    'published_sid_swapped': ('06d_evaluation_viz', 'evaluation/viz', "'SID@5': sc if cub else sa", "'SID@5': sa if cub else sc",
                              ['tests/test_trust.py::test_published_table1_is_the_papers']),
    'sid_with_k4': ('06_evaluation_metrics', 'evaluation/metrics', "v = sid_at_k(x.maps_rel, x.W, x.preds, k=self.k)",
                    "v = sid_at_k(x.maps_rel, x.W, x.preds, k=self.k - 1)", ['tests/test_paper.py', 'tests/test_metrics.py']),
    'labels_int8': ('02a_features_cache', 'features/cache', "labels=((n,), np.int64)", "labels=((n,), np.int8)",
                    ['tests/test_trust.py::test_end_to_end_with_more_than_128_classes']),
    'schedulefree_never_averaged': ('05c_train_loop', 'train/loop',
                                    "    if hasattr(opt, 'train') and hasattr(opt, 'eval'): opt.train() if train else opt.eval()",
                                    "    if hasattr(opt, 'train') and hasattr(opt, 'eval'): opt.train()",
                                    ['tests/test_trust.py::test_saved_model_is_the_schedule_free_average']),
    'ldiv_true_class': ('05c_train_loop', 'train/loop',
                        "div = (feature_diversity_loss(out.maps, model.diversity_features(out), out.logits, model.head_weight(), pcfg.beta_div)",
                        "div = (feature_diversity_loss(out.maps, model.diversity_features(out), F.one_hot(labels, out.logits.shape[1]).float(), model.head_weight(), pcfg.beta_div)",
                        ['tests/test_trust.py::test_logged_diversity_loss_weights_the_predicted_class']),
    'rprime_min_with_diagonal': ('04_qp_constants', 'qp/constants', "    nz = R[R != 0]\n", "    nz = R.ravel()\n",
                                 ['tests/test_trust.py::test_penalties_shift_by_the_smallest_nonzero_similarity']),
    'z_r_strict_tau': ('04c_qp_search', 'qp/search', "z_r = float(scaled_similarity(R)[np.ix_(S, S)][iu][RS[iu] >= tau].sum())",
                       "z_r = float(scaled_similarity(R)[np.ix_(S, S)][iu][RS[iu] > tau].sum())",
                       ['tests/test_trust.py::test_pairs_at_exactly_tau_are_penalised']),
    'penalised_pairs_strict_tau': ('04_qp_constants', 'qp/constants', "    keep = R[i, j] >= tau\n", "    keep = R[i, j] > tau\n",
                                   ['tests/test_trust.py::test_pairs_at_exactly_tau_are_penalised']),
    'part_visibility_threshold': ('01a_data_synthbirds', 'data/synthbirds', "if cnt[k + 1] >= min_pixels:", "if cnt[k + 1] > min_pixels:",
                                  [f'{NB}[01a_data_synthbirds]', 'tests/test_data.py']),
    'hidden_parts_present': ('01a_data_synthbirds', 'data/synthbirds', "int(visible and val == said), cert if visible else 1",
                             "int(val == said), cert if visible else 1", [f'{NB}[01a_data_synthbirds]', 'tests/test_data.py']),
    'hidden_parts_certain': ('01a_data_synthbirds', 'data/synthbirds', "int(visible and val == said), cert if visible else 1",
                             "int(visible and val == said), cert", [f'{NB}[01a_data_synthbirds]', 'tests/test_data.py']),
    'probe_undertrained': ('10_paper_params', 'paper/params', "QUICK_STEPS = {'probe': 7520,", "QUICK_STEPS = {'probe': 150,",
                           ['tests/test_trust.py::test_probe_matches_a_converged_logistic_regression']),
    'figure_levels_from_test_maps': ('10c_paper_figures', 'paper/figures', "model_style(qpm, caches[0], progress=progress))",
                                     "model_style(qpm, caches[1], progress=progress))",
                                     ['tests/test_paper.py::test_figures_draw_every_feature_as_the_explorer_does']),
    'recompute_bn_default_on': ('00b_config', 'config', "    recompute_bn: bool = setting(False)", "    recompute_bn: bool = setting(True)",
                                [f'{NB}[00b_config]', f'{NB}[10_paper_params]']),
    'bn_recompute_in_stored_order': ('05c_train_loop', 'train/loop', "             if shuffle else None)", "             if False else None)",
                                     [f'{NB}[05c_train_loop]']),
    'qsenn_paper_schedule_default': ('08b_baselines_methods', 'baselines/methods', "def train_qsenn(cfg: RunConfig, train_cache, test_cache, run_dir=None, *, iterations: int = 4, schedule: str = 'reference',",
                                     "def train_qsenn(cfg: RunConfig, train_cache, test_cache, run_dir=None, *, iterations: int = 4, schedule: str = 'qsenn',",
                                     [f'{NB}[08b_baselines_methods]']),
    'qsenn_50_epochs': ('08b_baselines_methods', 'baselines/methods', "                finetune_epochs: Optional[int] = 25, beta: Optional[float] = 0.196, head_dropout: Optional[float] = 0.1,",
                        "                finetune_epochs: Optional[int] = 50, beta: Optional[float] = 0.196, head_dropout: Optional[float] = 0.1,",
                        [f'{NB}[08b_baselines_methods]']),
    'uncertified_qp_silent': ('04f_qp_solvers', 'qp/solvers', "        log.warning('%s, or set qp.require_certified=true to make this an error', msg)",
                              "        pass", [f'{NB}[04f_qp_solvers]', 'tests/test_qp.py']),
    'uncertified_qp_not_in_table': ('10b_paper_notes', 'paper/notes', "            if len(bad): n.append('QP not certified (gap '", "            if False: n.append('QP not certified (gap '",
                                    ['tests/test_trust.py::test_uncertified_qp_and_unconverged_rows_are_marked_in_every_table']),
    'cache_key_without_masks': ('02a_features_cache', 'features/cache', "img_size=int(img_size), masks=bool(masks), precision=precision,",
                                "img_size=int(img_size), precision=precision,", [f'{NB}[02a_features_cache]']),
    'signature_without_cache_key': ('05b_train_checkpoints', 'train/checkpoints', "'labels_crc': crc32_of(np.asarray(cache.labels, dtype=np.int64)), 'key': key}",
                                    "'labels_crc': crc32_of(np.asarray(cache.labels, dtype=np.int64))}",
                                    ['tests/test_trust.py::test_a_model_trained_on_other_tokens_is_refused']),
    'silent_pos_embed_fallback': ('02_features_backbone', 'features/backbone', "        except ValueError as e:   # never fall through to timm's own resampler without a word",
                                  "        except ValueError as e:\n            pass\n        if False:", [f'{NB}[02_features_backbone]']),
    'missing_masks_silent': ('01_data_readers', 'data/readers', "            if require_masks:\n                missing.append(", "            if False:\n                missing.append(",
                             [f'{NB}[01_data_readers]', 'tests/test_data.py']),
    'convergence_never_flags': ('05a_train_rules', 'train/rules', "    if s['streak'][-1] >= s['patience'][-1]: return {**out, 'converged': True}",
                                "    return {**out, 'converged': True}", [f'{NB}[05a_train_rules]']),
    'stop_without_patience': ('05a_train_rules', 'train/rules', "    fire = np.nonzero((s['streak'] >= s['patience']) & (s['steps'] >= rule.min_steps))[0]",
                              "    fire = np.nonzero(s['holds'] & (s['steps'] >= rule.min_steps))[0]", [f'{NB}[05a_train_rules]']),
    'stop_ignores_min_steps': ('05a_train_rules', 'train/rules', "    fire = np.nonzero((s['streak'] >= s['patience']) & (s['steps'] >= rule.min_steps))[0]",
                               "    fire = np.nonzero(s['streak'] >= s['patience'])[0]", [f'{NB}[05a_train_rules]']),
    'convergence_judges_total_loss': ('05a_train_rules', 'train/rules', "    monitor: str = 'train_error'", "    monitor: str = 'train_loss'",
                                      [f'{NB}[05a_train_rules]']),
    'adapter_rule_judges_cross_entropy': ('05a_train_rules', 'train/rules', "    monitor: str = 'train_error'", "    monitor: str = 'train_ce'",
                                          [f'{NB}[05a_train_rules]']),
    'convergence_ignores_noise': ('05a_train_rules', 'train/rules', "rule.noise * np.nan_to_num(noise)", "0.0 * np.nan_to_num(noise)",
                                  [f'{NB}[05a_train_rules]']),
    'sldd_finetune_stops_early': ('08b_baselines_methods', 'baselines/methods', "    ft_cfg = update_config(scfg, {'finetune.stop_at_convergence': False})",
                                  "    ft_cfg = scfg", [f'{NB}[08b_baselines_methods]']),
    'range_upper_end_included': ('00b_config', 'config', "and (self.below is None or value < self.below))",
                                 "and (self.below is None or value <= self.below))",
                                 ['tests/test_cli_errors.py::test_every_value_outside_its_setting_is_refused_before_any_work']),
    'seed_range_off_by_one': ('00b_config', 'config', "SEED = dict(lo=0, hi=2**32 - 1,", "SEED = dict(lo=0, hi=2**32,",
                              ['tests/test_cli_errors.py::test_the_seed_range_is_what_numpy_scikit_learn_and_torch_take']),
    'infinity_accepted': ('00b_config', 'config', "if isinstance(value, float) and not math.isfinite(value):",
                          "if isinstance(value, float) and math.isnan(value):",
                          ['tests/test_cli_errors.py::test_every_value_outside_its_setting_is_refused_before_any_work']),
    'cuda_without_gpu_accepted': ('00a_core', 'core', "    if n == 0: return 'this machine has no CUDA GPU", "    if False: return 'this machine has no CUDA GPU",
                                  ['tests/test_cli_errors.py::test_every_value_outside_its_setting_is_refused_before_any_work']),
    'exif_orientation_ignored': ('01_data_readers', 'data/readers', "        im.load()\n        ImageOps.exif_transpose(im, in_place=True)\n        if im.mode",
                                 "        im.load()\n        if im.mode",
                                 ['tests/test_data.py::test_images_are_read_upright', 'tests/test_export.py::test_a_photo_stored_sideways_is_predicted_and_drawn_upright']),
    'upright_size_not_turned': ('01_data_readers', 'data/readers', "    return size[::-1] if turn in _QUARTER_TURNS else size", "    return size",
                                ['tests/test_data.py::test_a_sideways_photo_trains_as_the_upright_one']),
    'cache_key_without_orientation': ('02a_features_cache', 'features/cache', ",\n                orientation=IMAGE_ORIENTATION)", ")",
                                      [f'{NB}[02a_features_cache]']),
    'jpeg_truncation_unchecked': ('01_data_readers', 'data/readers', "                cut = _jpeg_cut_short(path.read_bytes())", "                cut = None",
                                  ['tests/test_data.py::test_a_bad_image_is_one_line_naming_it']),
    'decompression_bomb_escapes': ('01_data_readers', 'data/readers', "    except Image.DecompressionBombError as e: return f'too large to open safely: {e}'",
                                   "    except Image.DecompressionBombError as e: raise",
                                   ['tests/test_cli_errors.py::test_bad_file_is_one_line_before_any_work']),
    'images_checked_only_when_extracted': ('07_pipeline', 'pipeline', "        split.check_images()", "        pass",
                                           ['tests/test_cli_errors.py::test_bad_file_is_one_line_before_any_work']),
    'one_image_per_class_says_test_fraction': ('01b_data_folder', 'data/folder', "        if len(rels) == len(label):", "        if False:",
                                               ['tests/test_folder.py::test_bad_folders_are_refused_before_any_work']),
    'weights_pickle_refusal_in_torch_words': ('02_features_backbone', 'features/backbone',
                                              "raise WeightsError(_pickle_refusal(path, e)) from None",
                                              "raise WeightsError(f'{path}: {e}') from None",
                                              ['tests/test_cli_errors.py::test_bad_file_is_one_line_before_any_work']),
    'numerics_pin_aten_left_out': ('00_numerics', 'numerics', " 'ATEN_CPU_CAPABILITY': 'avx2',", "",
                                   ['tests/test_numerics.py']),
    # MKL's vector math differs between Intel and AMD CPUs (nbs/00_numerics.ipynb): training must not reach it
    'optimiser_sqrt_through_mkl': ('05c_train_loop', 'train/loop', "        with pinned_vector_math(): self.opt.step()",
                                   "        self.opt.step()", ['tests/test_numerics.py']),
    'feature_std_through_mkl': ('05d_train_phases', 'train/phases', "    std = exact_sqrt((s2 / n - mean * mean).clamp_min(0))",
                                "    std = (s2 / n - mean * mean).clamp_min(0).sqrt()", ['tests/test_numerics.py']),
    'glm_exp_through_mkl': ('08_baselines_glm', 'baselines/glm', "            a = z.softmax(1) - onehot[idx]",
                            "            a = z.log_softmax(1).exp() - onehot[idx]", ['tests/test_numerics.py']),
    'numpy_avx512_left_on': ('00_numerics', 'numerics', ",\n            'NPY_DISABLE_CPU_FEATURES': NUMPY_AVX512}", "}",
                             ['tests/test_numerics.py']),
    'torch_save_disk_full_unmapped': ('00a_core', 'core', "    buf = io.BytesIO(); torch.save(obj, buf)\n    return atomic_write_bytes(path, buf.getbuffer())",
                                      "    with atomic_path(path) as tmp: torch.save(obj, tmp)\n    return Path(path)",
                                      ['tests/test_disk_full.py::test_a_full_run_directory_is_one_line_and_the_rerun_resumes']),
    'disk_full_not_named': ('00a_core', 'core', "        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and not isinstance(e, DiskSpaceError):",
                            "        if False:", ['tests/test_disk_full.py::test_a_full_disk_during_export_is_one_line_and_the_rerun_completes']),
    'disk_full_temp_left_behind': ('00a_core', 'core',
                                   "        with contextlib.suppress(FileNotFoundError): os.unlink(tmp)\n"
                                   "        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and not isinstance(e, DiskSpaceError):\n"
                                   "            raise disk_full_error(path, written if size is None else size, e.errno, at_least=size is None) from None\n",
                                   "        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and not isinstance(e, DiskSpaceError):\n"
                                   "            raise disk_full_error(path, written if size is None else size, e.errno, at_least=size is None) from None\n"
                                   "        with contextlib.suppress(FileNotFoundError): os.unlink(tmp)\n",
                                   ['tests/test_disk_full.py::test_a_full_run_directory_is_one_line_and_the_rerun_resumes']),
    'disk_full_free_of_another_disk': ('00a_core', 'core',
                                       "    return shutil.disk_usage(next((q for q in (p, *p.parents) if q.exists()), Path(p.anchor))).free",
                                       "    return shutil.disk_usage(p.anchor).free",
                                       ['tests/test_disk_full.py::test_a_full_disk_during_export_is_one_line_and_the_rerun_completes']),
    'cache_margin_hidden': ('02a_features_cache', 'features/cache', "needs {byte_count(arrays + margin)} free in", "needs {byte_count(arrays)} free in",
                            ['tests/test_disk_full.py::test_a_cache_that_cannot_fit_is_refused_up_front_with_its_margin']),
    'export_lock_not_taken': ('09c_share_export', 'share/export', "    with export_lock(out):\n        previous = _previous_export(out, source)",
                              "    with contextlib.nullcontext(out):\n        previous = _previous_export(out, source)",
                              ['tests/test_export.py::test_two_concurrent_exports_the_second_is_refused_naming_the_first']),
    'export_manifest_first': ('09c_share_export', 'share/export',
                              "    for rel, data in sorted(files.items()):\n        if not _holds(out / rel, data): atomic_write_bytes(out / rel, data)\n"
                              "    _remove_files(out, [out / rel for rel in previous - names])\n"
                              "    atomic_write_bytes(out / MANIFEST_FILE, _json_bytes(export_manifest(out, files)))     # last: the export is finished\n",
                              "    atomic_write_bytes(out / MANIFEST_FILE, _json_bytes({'dinoqpm_export_manifest': 1, 'files': {n: {'bytes': len(d), "
                              "'sha256': sha256_bytes(d)} for n, d in sorted(files.items())}}))\n"
                              "    for rel, data in sorted(files.items()):\n        if not _holds(out / rel, data): atomic_write_bytes(out / rel, data)\n"
                              "    _remove_files(out, [out / rel for rel in previous - names])\n",
                              ['tests/test_export.py::test_an_export_interrupted_anywhere_ends_byte_identical_on_rerun']),
    'export_temporaries_left': ('09c_share_export', 'share/export', "    _remove_files(out, _temporaries(out, previous | names | {PENDING_FILE}))\n", "",
                                ['tests/test_export.py::test_an_export_interrupted_anywhere_ends_byte_identical_on_rerun']),
    'export_stale_files_kept': ('09c_share_export', 'share/export', "    _remove_files(out, [out / rel for rel in previous - names])\n", "",
                                ['tests/test_export.py::test_an_export_interrupted_anywhere_ends_byte_identical_on_rerun']),
    'export_pending_ignored': ('09c_share_export', 'share/export', "    pending = pending_export(out)\n", "    pending = None\n",
                               ['tests/test_export.py::test_an_export_interrupted_anywhere_ends_byte_identical_on_rerun']),
    'export_reader_skips_manifest': ('09_share_format', 'share/format', "    verify_export_files(p, config)\n", "",
                                     ['tests/test_export.py::test_readers_refuse_an_unfinished_or_changed_export']),
    'export_config_schema_unchecked': ('09_share_format', 'share/format', "    if found: raise ExportError(f\"{path}: key '{found[0]}'",
                                       "    if False: raise ExportError(f\"{path}: key '{found[0]}'",
                                       ['tests/test_export.py::test_a_tampered_config_is_one_line_naming_the_key']),
    # which images, features and rows an outcome is computed from (tests/test_outcomes.py, tests/test_paper.py recompute them)
    'prototypes_least_activating': ('09c_share_export', 'share/export', "top = np.argsort(-x.f_tr[:, j], kind='stable')[:n_prototypes]",
                                    "top = np.argsort(x.f_tr[:, j], kind='stable')[:n_prototypes]",
                                    ['tests/test_outcomes.py::test_prototypes_are_each_features_most_activating_training_images']),
    'prototypes_argsort_off_by_one': ('09c_share_export', 'share/export', "top = np.argsort(-x.f_tr[:, j], kind='stable')[:n_prototypes]",
                                      "top = np.argsort(-x.f_tr[:, j], kind='stable')[1:n_prototypes + 1]",
                                      ['tests/test_outcomes.py::test_prototypes_are_each_features_most_activating_training_images']),
    'prototypes_on_test_activations': ('09c_share_export', 'share/export', "f_tr=tr['features'].numpy()", "f_tr=te['features'].numpy()",
                                       ['tests/test_outcomes.py::test_prototypes_are_each_features_most_activating_training_images']),
    'card_feature_scores_on_test_split': ('09c_share_export', 'share/export',
                                          "per_feature = _per_feature_metrics(x.f_tr, x.tr['labels'].numpy(), x.W.shape[0], seed)",
                                          "per_feature = _per_feature_metrics(x.te['features'].numpy(), x.y_te, x.W.shape[0], seed)",
                                          ['tests/test_outcomes.py::test_per_feature_scores_in_the_card_are_the_training_features']),
    'card_class_features_by_position': ('09c_share_export', 'share/export', "'features': [int(x.sel[j]) for j in np.flatnonzero(x.W[c])],",
                                        "'features': [int(j) for j in np.flatnonzero(x.W[c])],",
                                        ['tests/test_outcomes.py::test_assignment_in_the_card_is_the_saved_head']),
    'example_features_of_true_class': ('09c_share_export', 'share/export', "pf = [int(j) for j in np.flatnonzero(x.W[pc])]",
                                       "pf = [int(j) for j in np.flatnonzero(x.W[c])]",
                                       ['tests/test_outcomes.py::test_examples_and_comparison_images_are_the_test_predictions']),
    'example_confidence_of_true_class': ('09c_share_export', 'share/export', "'confidence': float(x.prob[k, pc])", "'confidence': float(x.prob[k, c])",
                                         ['tests/test_outcomes.py::test_examples_and_comparison_images_are_the_test_predictions']),
    'compare_least_confident': ('09c_share_export', 'share/export', "k = int(pool[np.argsort(-x.prob[pool, c], kind='stable')[0]])",
                                "k = int(pool[np.argsort(x.prob[pool, c], kind='stable')[0]])",
                                ['tests/test_outcomes.py::test_examples_and_comparison_images_are_the_test_predictions']),
    'explorer_feature_by_position': ('09b_share_explorer', 'share/explorer', "const x = FEAT.get(f), d = $('detail');",
                                     "const x = card.features[f], d = $('detail');",
                                     ['tests/test_outcomes.py::test_the_explorer_shows_the_recomputed_numbers']),
    'class_independence_on_every_column': ('06_evaluation_metrics', 'evaluation/metrics',
                                           "return {self.name: class_independence(x.f_rel, x.y_train",
                                           "return {self.name: class_independence(x.f_train, x.y_train",
                                           ['tests/test_paper.py::test_table1_feature_scores_are_those_of_the_features_each_model_uses']),
    'contrastiveness_on_every_column': ('06_evaluation_metrics', 'evaluation/metrics', "return {self.name: contrastiveness(x.f_rel, seed=x.seed",
                                        "return {self.name: contrastiveness(x.f_train, seed=x.seed",
                                        ['tests/test_paper.py::test_table1_feature_scores_are_those_of_the_features_each_model_uses']),
    'inference_features_by_position': ('09a_share_inference', 'share/inference', "r['features_shown'] = [int(sel[j]) for j in ex['features_shown']]",
                                       "r['features_shown'] = [int(j) for j in ex['features_shown']]",
                                       ['tests/test_outcomes.py::test_predictions_name_the_predicted_class_and_its_features']),
    'linear_eval_lr_on_training_images': ('08a_baselines_linear_eval', 'baselines/linear_eval',
                                          "        with torch.no_grad(): pred = (torch.einsum('nd,kdc->knc', inputs[avg][va], fit['weight']) + fit['bias'][:, None]).argmax(2)\n"
                                          "        acc = (pred == y[va]).double().mean(1)",
                                          "        with torch.no_grad(): pred = (torch.einsum('nd,kdc->knc', inputs[avg][tr], fit['weight']) + fit['bias'][:, None]).argmax(2)\n"
                                          "        acc = (pred == y[tr]).double().mean(1)",
                                          ['tests/test_outcomes.py::test_linear_eval_picks_its_learning_rate_on_images_it_did_not_train_on']),
    'linear_eval_trains_on_held_out': ('08a_baselines_linear_eval', 'baselines/linear_eval', "    return np.setdiff1d(np.arange(len(labels)), val), val",
                                       "    return np.arange(len(labels)), val",
                                       ['tests/test_outcomes.py::test_linear_eval_picks_its_learning_rate_on_images_it_did_not_train_on']),
    'figure_prototypes_least_activating': ('10c_paper_figures', 'paper/figures', "top = np.argsort(-f[:, j], kind='stable')[:n_images]",
                                           "top = np.argsort(f[:, j], kind='stable')[:n_images]",
                                           ['tests/test_paper.py::test_global_figure_shows_each_features_most_activating_test_images']),
    'published_groups_swapped': ('10b_paper_notes', 'paper/notes', "    tables = {d: published_table1(d).dropna(axis=1, how='all') for d in datasets if d in PUBLISHED_DATASETS}",
                                 "    tables = {d: published_table1({'CUB2011': 'StanfordCars'}.get(d, 'CUB2011')).dropna(axis=1, how='all') for d in datasets if d in PUBLISHED_DATASETS}",
                                 ['tests/test_paper.py::test_table1_cub_and_cars_groups_with_the_published_numbers']),
    'maskless_group_keeps_plausibility': ('10b_paper_notes', 'paper/notes', "        if why: t, no_plausibility[label] = t.drop(columns='Plausibility'), why",
                                          "        if why: no_plausibility[label] = why",
                                          ['tests/test_paper.py::test_table1_cub_and_cars_groups_with_the_published_numbers']),
    'datasets_group_of_the_first_dataset': ('10b_paper_notes', 'paper/notes', "    groups = {q.dataset_label: (q, tidy[tidy['dataset'] == q.dataset_label]) for q in p.per_dataset()}",
                                            "    groups = {q.dataset_label: (q, tidy[tidy['dataset'] == p.dataset_label]) for q in p.per_dataset()}",
                                            ['tests/test_paper.py::test_table1_cub_and_cars_groups_with_the_published_numbers']),
    # QPM on a CNN trained end to end (issue 21): the locality bias B and its MeanShift
    'locality_bias_dropped': ('07_pipeline', 'pipeline', "    B = locality_bias(x['softmax_max'], x['on_edge'], x['features']) if q.locality_bias else None\n",
                              "    B = None\n", ['tests/test_cnn_qpm.py::test_every_stage_on_images_with_every_metric_on_both_models']),
    'mean_shift_keeps_near_modes': ('04_qp_constants', 'qp/constants', "        if keep[i]: keep[np.abs(centers - c) <= bandwidth] = False; keep[i] = True\n",
                                    "        pass\n", [f'{NB}[04_qp_constants]']),
}


def apply(tmp: Path, stem: str, module: str, old: str, new: str):
    "Replace `old` by `new` in the notebook's cells and in the exported module (exactly once in each)."
    nbp = tmp / 'nbs' / f'{stem}.ipynb'
    nb = json.loads(nbp.read_text())
    hits = 0
    for c in nb['cells']:
        src = ''.join(c['source'])
        if old in src:
            hits += src.count(old)
            src = src.replace(old, new)
            lines = src.split('\n')
            c['source'] = [l + '\n' for l in lines[:-1]] + [lines[-1]]
    if hits != 1: raise SystemExit(f'{stem}: the text to mutate occurs {hits} times in the notebook')
    nbp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    py = tmp / 'dinoqpm' / f'{module}.py'
    s = py.read_text()
    if s.count(old) != 1: raise SystemExit(f'{module}.py: the text to mutate occurs {s.count(old)} times')
    py.write_text(s.replace(old, new))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', default='')
    ap.add_argument('--keep', action='store_true', help='keep the scratch copies')
    args = ap.parse_args()
    names = [n for n in MUTANTS if not args.only or n in args.only.split(',')]
    survived = []
    for name in names:
        stem, module, old, new, tests = MUTANTS[name]
        tmp = Path(tempfile.mkdtemp(prefix=f'mutant-{name}-'))
        shutil.copytree(ROOT, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns('.venv', '.git', 'runs', '__pycache__', '*.egg-info', '.pytest_cache', 'figures'))
        apply(tmp, stem, module, old, new)
        env = dict(os.environ, PYTHONPATH=str(tmp), HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
        t0 = time.time()
        r = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests], cwd=tmp, env=env,
                           capture_output=True, text=True)
        caught = r.returncode != 0
        last = (r.stdout.strip().splitlines() or [''])[-1]
        print(f"{'caught  ' if caught else 'SURVIVED'} {name:32s} {time.time() - t0:6.0f}s  {last}", flush=True)
        if not caught: survived.append(name)
        if not args.keep: shutil.rmtree(tmp, ignore_errors=True)
    print(f'{len(names) - len(survived)}/{len(names)} mutants caught' + (f'; survived: {", ".join(survived)}' if survived else ''))
    sys.exit(1 if survived else 0)


if __name__ == '__main__':
    main()
