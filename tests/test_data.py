"""dinoqpm.data and dinoqpm.data.synthbirds: readers on tiny hand-written archives, every bad-input case, the reference
mask resize, preprocessing, and SynthBirds determinism and ground truth."""
import hashlib
from pathlib import Path
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dinoqpm.data import (DATASETS, DATASET_STATS, IMAGENET_STATS, CUB2011Dataset, DatasetError, StanfordCarsDataset, compute_mean_std,
                          dilate_mask, load_dataset, make_transform, resize_mask_to_grid, resize_mask_uint8)
from dinoqpm.data import FolderDataset, check_images, image_size, open_rgb
from dinoqpm.data import (PART_NAMES, design_classes, load_synthbirds_truth, make_synthbirds, pair_difference,
                          part_label_map)


# ---------------------------------------------------------------- tiny hand-written archives
def write_cub(root, n_classes=3, per_class=2, masks=True):
    """A CUB_200_2011 tree: class c has images 2c+1 (train) and 2c+2 (test); includes a malformed attribute line."""
    a = Path(root) / 'CUB200' / 'CUB_200_2011'
    for d in ('images', 'parts', 'attributes'): (a / d).mkdir(parents=True, exist_ok=True)
    classes = [f'{c + 1:03d}.Bird_{chr(65 + c)}' for c in range(n_classes)]
    imgs, lab, split, bbox, locs, attl = [], [], [], [], [], []
    rng = np.random.default_rng(0)
    for c, cn in enumerate(classes):
        (a / 'images' / cn).mkdir(exist_ok=True)
        for k in range(per_class):
            iid = len(imgs) + 1
            stem = f'Bird_{chr(65 + c)}_{k:04d}'
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(a / 'images' / cn / f'{stem}.jpg')
            if masks:
                (a.parent / 'segmentations' / cn).mkdir(parents=True, exist_ok=True)   # beside CUB_200_2011, as unpacked
                sm = np.zeros((30, 40), np.uint8); sm[5:25, 10:30] = 255
                Image.fromarray(sm).save(a.parent / 'segmentations' / cn / f'{stem}.png')
            imgs.append(f'{iid} {cn}/{stem}.jpg'); lab.append(f'{iid} {c + 1}'); split.append(f'{iid} {int(k == 0)}')
            bbox.append(f'{iid} {iid}.0 5.0 20.0 20.0')
            locs += [f'{iid} 1 {10 + iid}.0 8.0 1', f'{iid} 2 0.0 0.0 0']
            attl += [f'{iid} 1 {c % 2} 4 1.5', f'{iid} 2 1 3 2.0']
    attl.append('3 2 0 2 4.0 17')                                # malformed: an extra field; overrides image 3's line
    w = lambda f, lines: (a / f).write_text('\n'.join(lines) + '\n')
    w('images.txt', imgs); w('image_class_labels.txt', lab); w('train_test_split.txt', split)
    w('classes.txt', [f'{c + 1} {n}' for c, n in enumerate(classes)]); w('bounding_boxes.txt', bbox)
    w('parts/parts.txt', ['1 crown', '2 left eye']); w('parts/part_locs.txt', locs)
    w('attributes/attributes.txt', ['1 has_crown_color::red', '2 has_eye_color::black'])
    w('attributes/image_attribute_labels.txt', attl)
    w('attributes/class_attribute_labels_continuous.txt', [f'{10.0 * c:.1f} {100 - 10.0 * c:.1f}' for c in range(n_classes)])
    return a


def edit(path, old, new):
    p = Path(path); t = p.read_text(); assert old in t, old; p.write_text(t.replace(old, new, 1))


def write_cars(root, n_classes=3, per_class=2):
    base = Path(root) / 'StanfordCars'
    for d in ('car_devkit', 'cars_train', 'cars_test'): (base / d).mkdir(parents=True, exist_ok=True)
    names = np.array([f'Make {c} Model 2012' for c in range(n_classes)], dtype=object).reshape(1, -1)
    scipy.io.savemat(base / 'car_devkit' / 'cars_meta.mat', {'class_names': names})
    dt = [('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'), ('class', 'O'), ('fname', 'O')]
    for split, f in (('train', 'car_devkit/cars_train_annos.mat'), ('test', 'cars_test_annos_withlabels.mat')):
        recs = []
        for k in range(n_classes * per_class):
            fn = f'{k + 1:05d}.jpg'
            Image.new('RGB', (48, 32), (10 * k, 90, 160)).save(base / f'cars_{split}' / fn)
            recs.append(tuple(np.array([[v]]) for v in (1, 2, 40, 30, k % n_classes + 1)) + (fn,))
        scipy.io.savemat(base / f, {'annotations': np.array(recs, dtype=dt).reshape(1, -1)})
    return base


def write_cars_annos(base, recs):
    dt = [('class', 'O'), ('fname', 'O')]
    arr = np.array([(np.array([[c]]), f) for c, f in recs], dtype=dt).reshape(1, -1)
    scipy.io.savemat(base / 'car_devkit' / 'cars_train_annos.mat', {'annotations': arr})



# ---------------------------------------------------------------- images: upright, and checked before any work
# how a camera stores an upright picture under each EXIF orientation (the tag says how to turn it back), written with
# numpy from the EXIF specification's table, independently of PIL's `ImageOps.exif_transpose`
STORED_AS = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.transpose(1, 0, 2),
             6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, -1)}


def save_as_camera(upright: np.ndarray, path, orientation: int, **kw):
    "Store the upright picture `upright` as a camera does under `orientation`, with the EXIF tag saying so."
    exif = Image.Exif(); exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED_AS[orientation](upright))).save(path, exif=exif, **kw)
    return Path(path)


@pytest.mark.parametrize('orientation', list(STORED_AS))
@pytest.mark.parametrize('fmt', ['png', 'jpg'])
def test_images_are_read_upright(tmp_path, orientation, fmt):
    "Every EXIF orientation, in PNG (exactly) and JPEG (its blocks): `open_rgb` and `image_size` give the upright picture."
    up = np.zeros((64, 96, 3), np.uint8); up[:32, :48] = (250, 10, 10); up[32:, 48:] = (10, 10, 250)   # red top left, blue bottom right
    p = save_as_camera(up, tmp_path / f'photo.{fmt}', orientation, **({'quality': 95} if fmt == 'jpg' else {}))
    got = np.asarray(open_rgb(p)).astype(int)
    assert got.shape == up.shape and image_size(p) == (96, 64)
    assert (np.array_equal(got, up) if fmt == 'png' else np.abs(got - up).mean() < 4), np.abs(got - up).mean()


def test_a_sideways_photo_trains_as_the_upright_one(tmp_path):
    "A folder dataset with a photo stored sideways: its item is the upright one's, and a mask drawn on the upright picture fits."
    rng = np.random.default_rng(0)
    pics = {c: (rng.random((40, 56, 3)) * 255).astype(np.uint8) for c in ('a', 'b')}
    for d, turn in (('upright', 1), ('sideways', 6)):
        for c, px in pics.items():
            for i in range(2):
                (tmp_path / d / c).mkdir(parents=True, exist_ok=True)
                save_as_camera(px, tmp_path / d / c / f'{i}.png', turn if (c, i) == ('a', 0) else 1)
                (tmp_path / d / 'masks' / c).mkdir(parents=True, exist_ok=True)
                Image.new('L', (56, 40), 255).save(tmp_path / d / 'masks' / c / f'{i}.png')      # the upright picture's size
    tf = make_transform('imagenet', 'folder', 28)
    sets = {d: FolderDataset(tmp_path / d, 'train', transform=tf, test_fraction=0.5) for d in ('upright', 'sideways')}
    assert len(sets['sideways']) == 2
    for i in range(2):
        assert torch.equal(sets['sideways'][i]['image'], sets['upright'][i]['image'])
        assert np.array_equal(sets['sideways'].mask(i), sets['upright'].mask(i))


def _bomb_png(path, side=20000):
    "A PNG whose header declares `side` x `side` pixels (over PIL's decompression-bomb limit); a few bytes on disk."
    import struct, zlib
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    Path(path).write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0))
                           + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
    return Path(path)


def _cut(path, keep=0.5):
    data = Path(path).read_bytes(); Path(path).write_bytes(data[:int(len(data) * keep)]); return Path(path)


BAD_IMAGES = {   # name -> (how the file is made from a good JPEG at `p`, text of the refusal)
    'jpeg_cut_in_half': (lambda p: _cut(p), 'the file is truncated (it ends after'),
    'jpeg_cut_near_the_end': (lambda p: _cut(p, 0.97), 'the file is truncated'),
    'decompression_bomb': (lambda p: _bomb_png(p.with_suffix('.png')), 'too large to open safely: Image size (400000000 pixels)'),
    'not_an_image': (lambda p: (p.write_bytes(b'GIF? no'), p)[1], 'UnidentifiedImageError'),
    'empty_file': (lambda p: (p.write_bytes(b''), p)[1], 'UnidentifiedImageError'),
}


@pytest.mark.parametrize('name', list(BAD_IMAGES))
def test_a_bad_image_is_one_line_naming_it(tmp_path, name):
    "Checked from the header and the file's structure (nothing decoded): one line with the file and why."
    make, why = BAD_IMAGES[name]
    good = tmp_path / 'good.jpg'
    Image.fromarray((np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8)).save(good, quality=90)
    bad = make(_copy(good, tmp_path / 'bad.jpg'))
    with pytest.raises(DatasetError) as e: check_images([good, bad], 'my photos')
    msg = str(e.value)
    assert msg.startswith(f'my photos: cannot read image {bad}: ') and why in msg and '\n' not in msg, msg


def _copy(src, dst):
    Path(dst).write_bytes(Path(src).read_bytes()); return Path(dst)


# ---------------------------------------------------------------- CUB reader
def test_cub_reader(tmp_path):
    write_cub(tmp_path)
    tr, te = CUB2011Dataset(tmp_path, 'train'), CUB2011Dataset(tmp_path, 'test')
    assert (len(tr), len(te), tr.n_classes) == (3, 3, 3)
    assert tr.root == tmp_path / 'CUB200' / 'CUB_200_2011'
    assert [s.image_id for s in tr.samples] == [1, 3, 5] and tr.labels.tolist() == [0, 1, 2]
    assert [s.image_id for s in te.samples] == [2, 4, 6] and te.labels.tolist() == [0, 1, 2]
    item = te[2]
    assert (item['label'], item['image_id'], item['index']) == (2, 6, 2)
    assert item['image'].mode == 'RGB' and item['image'].size == (40, 30)
    assert tr.class_names == ['001.Bird_A', '002.Bird_B', '003.Bird_C']
    assert tr.bounding_boxes.tolist() == [[1, 5, 20, 20], [3, 5, 20, 20], [5, 5, 20, 20]]
    assert tr.part_names == ['crown', 'left eye']
    assert tr.part_locs.shape == (3, 2, 3) and tr.part_locs[1, 0].tolist() == [13, 8, 1] and not tr.part_locs[:, 1, 2].any()
    assert tr.attribute_names == ['has_crown_color::red', 'has_eye_color::black']
    present, cert = tr.image_attributes()
    assert present.dtype == np.int8 and present.shape == (3, 2)
    assert present.tolist() == [[0, 1], [1, 0], [0, 1]]          # image 3's second label comes from the malformed line
    assert cert.tolist() == [[4, 3], [4, 2], [4, 3]]
    ca = tr.class_attributes()
    assert ca.shape == (3, 2) and ca[2].tolist() == [20, 80]
    assert tr.has_masks and tr.mask(0).dtype == np.uint8 and tr.mask(0).shape == (30, 40)
    tm = tr.token_masks((3, 4), dilate=True)
    assert tm.shape == (3, 3, 4) and tm.dtype == bool
    assert np.array_equal(tm[1], resize_mask_to_grid(tr.mask(1), (3, 4), dilate=True))
    t = make_transform('paper', 'CUB2011', 32)
    tr.transform = t
    assert tr[0]['image'].shape == (3, 32, 32)


def test_cub_without_masks_and_top_level_attributes(tmp_path):
    a = write_cub(tmp_path, masks=False)
    (a / 'attributes' / 'attributes.txt').rename(a.parent / 'attributes.txt')   # the tarball's layout
    with pytest.raises(DatasetError, match='segmentations/ \\(expected folder') as e: CUB2011Dataset(tmp_path)
    assert str(a / 'segmentations') in str(e.value) and 'data.require_masks=false' in str(e.value)
    ds = CUB2011Dataset(tmp_path, require_masks=False)                   # the explicit switch: no masks, no Plausibility
    assert not ds.has_masks and ds.attribute_names[1] == 'has_eye_color::black'
    with pytest.raises(DatasetError, match='no segmentation masks'): ds.mask(0)


# ---------------------------------------------------------------- CUB bad input
def test_cub_missing_files_listed_together(tmp_path):
    with pytest.raises(DatasetError) as e: CUB2011Dataset(tmp_path)
    msg = str(e.value)
    arch = tmp_path / 'CUB200' / 'CUB_200_2011'
    for f in ('images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt', 'bounding_boxes.txt',
              'parts/parts.txt', 'parts/part_locs.txt', 'attributes/image_attribute_labels.txt',
              'attributes/class_attribute_labels_continuous.txt'):
        assert f'expected at {arch / f}' in msg, f
    assert 'attributes.txt (expected at' in msg and f'expected folder {arch / "images"}' in msg
    assert len(e.value.problems) == 12 and 'Caltech' in msg and f'expected folder {arch / "segmentations"}' in msg


def test_cub_partial_folder(tmp_path):
    a = write_cub(tmp_path)
    (a / 'bounding_boxes.txt').unlink(); (a / 'parts' / 'part_locs.txt').unlink()
    with pytest.raises(DatasetError) as e: CUB2011Dataset(tmp_path)
    assert len(e.value.problems) == 2
    assert str(a / 'bounding_boxes.txt') in str(e.value) and str(a / 'parts' / 'part_locs.txt') in str(e.value)


def test_cub_label_out_of_range(tmp_path):
    a = write_cub(tmp_path)
    edit(a / 'image_class_labels.txt', '4 2\n', '4 9\n')
    with pytest.raises(DatasetError, match=r'image id 4: label 9 outside the class range 1\.\.3'): CUB2011Dataset(tmp_path, 'test')
    edit(a / 'image_class_labels.txt', '4 9\n', '4 0\n')
    with pytest.raises(DatasetError, match=r'image id 4: label 0 outside'): CUB2011Dataset(tmp_path, 'test')


def test_cub_duplicated_ids(tmp_path):
    a = write_cub(tmp_path)
    edit(a / 'images.txt', '\n4 ', '\n3 ')
    with pytest.raises(DatasetError, match='duplicated image id 3'): CUB2011Dataset(tmp_path)
    a2 = write_cub(tmp_path / 'b')
    edit(a2 / 'classes.txt', '2 002', '1 002')
    with pytest.raises(DatasetError, match='duplicated class id 1'): CUB2011Dataset(tmp_path / 'b')


def test_cub_class_without_training_images(tmp_path):
    a = write_cub(tmp_path)
    edit(a / 'train_test_split.txt', '3 1\n', '3 0\n')
    with pytest.raises(DatasetError, match='classes without any training image.*2 002.Bird_B'): CUB2011Dataset(tmp_path, 'test')


def test_cub_all_annotation_problems_in_one_error(tmp_path):
    a = write_cub(tmp_path)
    edit(a / 'image_class_labels.txt', '2 1\n', '2 7\n')
    edit(a / 'images.txt', '\n6 ', '\n5 ')
    edit(a / 'train_test_split.txt', '1 1\n', '1 0\n')
    (a / 'train_test_split.txt').write_text((a / 'train_test_split.txt').read_text().replace('4 0\n', ''))
    with pytest.raises(DatasetError) as e: CUB2011Dataset(tmp_path)
    msg = str(e.value)
    for want in ('label 7 outside', 'duplicated image id 5', 'image id 4 has no entry', '1 001.Bird_A'): assert want in msg, want


def test_cub_corrupt_and_missing_images(tmp_path):
    a = write_cub(tmp_path)
    bad = a / 'images' / '002.Bird_B' / 'Bird_B_0000.jpg'
    bad.write_bytes(b'\xff\xd8 truncated')
    ds = CUB2011Dataset(tmp_path)
    with pytest.raises(DatasetError, match='Bird_B_0000.jpg') as e: ds[1]
    assert 'image id 3' in str(e.value)
    with pytest.raises(DatasetError, match='Bird_B_0000.jpg'): ds.load_image(1)
    (a / 'images' / '003.Bird_C' / 'Bird_C_0000.jpg').unlink()
    (a.parent / 'segmentations' / '001.Bird_A' / 'Bird_A_0000.png').unlink()
    with pytest.raises(DatasetError) as e: CUB2011Dataset(tmp_path)
    assert '003.Bird_C/Bird_C_0000.jpg' in str(e.value) and 'segmentations/001.Bird_A/Bird_A_0000.png' in str(e.value)
    CUB2011Dataset(tmp_path, 'test')                                    # the other split is intact


def test_cub_corrupt_mask(tmp_path):
    a = write_cub(tmp_path)
    (a.parent / 'segmentations' / '001.Bird_A' / 'Bird_A_0000.png').write_bytes(b'nope')
    with pytest.raises(DatasetError, match='Bird_A_0000.png'): CUB2011Dataset(tmp_path).mask(0)


def test_bad_split_and_unknown_dataset(tmp_path):
    write_cub(tmp_path)
    with pytest.raises(DatasetError, match='split'): CUB2011Dataset(tmp_path, 'val')
    with pytest.raises(DatasetError, match='CUB2011, StanfordCars, SynthBirds'): load_dataset('Birds', 'train', root=tmp_path)
    assert DATASETS == ('CUB2011', 'StanfordCars', 'SynthBirds', 'folder')
    assert load_dataset('CUB2011', 'train', root=tmp_path).n_classes == 3


def test_default_root_from_environment(tmp_path, monkeypatch):
    write_cub(tmp_path)
    monkeypatch.setenv('DINOQPM_DATA', str(tmp_path))
    assert len(CUB2011Dataset(split='test')) == 3


# ---------------------------------------------------------------- Stanford Cars
def test_cars_reader(tmp_path):
    write_cars(tmp_path)
    tr, te = StanfordCarsDataset(tmp_path, 'train'), StanfordCarsDataset(tmp_path, 'test')
    assert (len(tr), len(te), tr.n_classes, tr.has_masks) == (6, 6, 3, False)
    assert tr.class_names == ['Make 0 Model 2012', 'Make 1 Model 2012', 'Make 2 Model 2012']
    assert tr.labels.tolist() == [0, 1, 2, 0, 1, 2]                       # class - 1
    assert te.samples[3].path == tmp_path / 'StanfordCars' / 'cars_test' / '00004.jpg'
    assert tr[5]['image'].size == (48, 32) and tr[5]['image_id'] == 6
    assert tr.bounding_boxes[0].tolist() == [1, 2, 39, 28]
    with pytest.raises(DatasetError, match='no segmentation masks'): tr.mask(0)
    assert load_dataset('StanfordCars', 'test', root=tmp_path).split == 'test'


def test_cars_missing_files(tmp_path):
    with pytest.raises(DatasetError) as e: StanfordCarsDataset(tmp_path, 'test')
    msg, base = str(e.value), tmp_path / 'StanfordCars'
    assert f"car_devkit/cars_meta.mat (expected at {base / 'car_devkit/cars_meta.mat'})" in msg
    assert f"cars_test_annos_withlabels.mat (expected at {base / 'cars_test_annos_withlabels.mat'})" in msg
    assert f"expected folder {base / 'cars_test'}" in msg and len(e.value.problems) == 3
    assert 'Kaggle' in msg and 'by hand' in msg and 'Nothing is downloaded' in msg


def test_cars_bad_annotations(tmp_path):
    base = write_cars(tmp_path)
    write_cars_annos(base, [(1, '00001.jpg'), (4, '00002.jpg'), (1, '00001.jpg'), (0, '00003.jpg')])
    with pytest.raises(DatasetError) as e: StanfordCarsDataset(tmp_path, 'train')
    msg = str(e.value)
    assert 'image 00002.jpg: class 4 outside the class range 1..3' in msg and 'image 00003.jpg: class 0 outside' in msg
    assert 'image 00001.jpg listed twice' in msg
    assert 'classes without any training image: 2 Make 1 Model 2012, 3 Make 2 Model 2012' in msg
    write_cars_annos(base, [(1, '00001.jpg'), (2, '00002.jpg'), (3, '99999.jpg')])
    with pytest.raises(DatasetError, match='99999.jpg'): StanfordCarsDataset(tmp_path, 'train')
    (base / 'cars_train' / '00001.jpg').write_bytes(b'garbage')
    write_cars_annos(base, [(1, '00001.jpg'), (2, '00002.jpg'), (3, '00003.jpg')])
    with pytest.raises(DatasetError, match='00001.jpg'): StanfordCarsDataset(tmp_path, 'train')[0]


# ---------------------------------------------------------------- reference mask resize
def test_resize_hand_computed():
    m = np.zeros((64, 64), np.uint8)
    for d in range(16): m[4 * d + 1, 4 * d + 2] = 255                    # sampled pixels: one quarter of a cell each
    r = resize_mask_uint8(m, 16)
    assert np.array_equal(r, np.diag(np.full(16, 64, np.uint8)))
    m = np.zeros((64, 64), np.uint8); m[0::4] = 255; m[:, 3::4] = 255       # pixels 4d and 4d+3 are never sampled
    assert not resize_mask_to_grid(m, 16).any()
    # 2x2 -> 1x1 averages the four pixels (OpenCV swaps in INTER_AREA there; the result is the same)
    assert resize_mask_uint8(np.array([[0, 255], [255, 255]], np.uint8), 1)[0, 0] == 191
    # fixed point: 3x3 -> 2x2, cell (1, 0) is 114.5 in exact arithmetic, OpenCV truncates to 114
    m3 = np.array([[56, 173, 169], [242, 56, 72], [48, 206, 69]], np.uint8)
    assert resize_mask_uint8(m3, 2).tolist() == [[113, 145], [114, 94]]
    # the centre of a 3x3 has weight 1/16 in each of the 2x2 cells: 7 -> 0.44 -> background, 9 -> 0.56 -> foreground
    c = np.zeros((3, 3), np.uint8); c[1, 1] = 7
    assert not resize_mask_to_grid(c, 2).any()
    c[1, 1] = 9
    assert resize_mask_to_grid(c, 2).all()
    # non-square grids and upsampling, borders replicated
    assert resize_mask_uint8(np.array([[0, 255]], np.uint8), (2, 4)).tolist() == [[0, 64, 191, 255]] * 2
    assert resize_mask_to_grid(np.full((5, 9), 255, np.uint8), (3, 7)).all()
    # dilation = one 3x3 rectangle
    one = np.zeros((5, 5), bool); one[0, 2] = True
    assert np.argwhere(dilate_mask(one)).tolist() == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    with pytest.raises(ValueError, match='uint8'): resize_mask_to_grid(np.zeros((4, 4), bool), 2)
    with pytest.raises(ValueError, match='2-D'): resize_mask_to_grid(np.zeros((4, 4, 3), np.uint8), 2)


# golden values from cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) with opencv-python-headless 4.10.0.84
# (sha256 prefix of the uint8 output, number of cells > 0)
GOLDEN = [((375, 500), (16, 16), 'bec3937fb1bcd2d3', 17), ((333, 500), (16, 16), 'be6f21fbdd62b3dd', 18),
          ((500, 281), (28, 28), 'e2be2f467344da6d', 55), ((64, 64), (16, 16), 'f86066e629662245', 25),
          ((41, 29), (16, 16), 'c62069b5dcce86c0', 12), ((10, 7), (16, 16), '4bd6d14c3a38c199', 27)]


@pytest.mark.parametrize('shape,grid,digest,n_fg', GOLDEN)
def test_resize_matches_opencv(shape, grid, digest, n_fg):
    H, W = shape
    rng = np.random.default_rng(H * 1000 + W)
    m = (rng.random((H, W)) < 0.02).astype(np.uint8) * rng.choice(np.array([51, 102, 153, 204, 255], np.uint8), (H, W))
    r = resize_mask_uint8(m, grid)
    assert hashlib.sha256(r.tobytes()).hexdigest()[:16] == digest
    assert resize_mask_to_grid(m, grid).sum() == n_fg


# ---------------------------------------------------------------- preprocessing
def test_paper_transform():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    x = make_transform('paper', 'StanfordCars', 224)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and abs(float(x.max()) - 1.0) < 1e-6
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in DATASET_STATS['StanfordCars'])
    raw = torch.from_numpy(np.asarray(img.resize((224, 224), Image.BILINEAR), np.float32) / 255).permute(2, 0, 1)
    z = (raw - mean) / std
    assert torch.allclose(x, (z - z.min()) / (z.max() - z.min()), atol=1e-6)
    y = make_transform('imagenet', img_size=224)(img)
    assert y.shape == (3, 224, 224) and float(y.min()) < -1 and float(y.max()) > 1
    with pytest.raises(ValueError, match='no mean/std'): make_transform('paper', 'Aircraft')
    assert set(DATASET_STATS) == set(DATASETS) - {'folder'}
    f = make_transform('paper', 'folder')                      # your own images: ImageNet's statistics
    assert (f.mean, f.std) == IMAGENET_STATS and f.mode == 'paper'


# ---------------------------------------------------------------- SynthBirds
def tree_hashes(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob('*')) if p.is_file()}


def test_synthbirds_deterministic(tmp_path):
    kw = dict(seed=5, n_classes=4, images_per_class=4, img_size=128, progress=False)
    a = make_synthbirds(tmp_path / 'a', **kw)
    make_synthbirds(tmp_path / 'b', **kw)
    ha, hb = tree_hashes(tmp_path / 'a'), tree_hashes(tmp_path / 'b')
    assert ha == hb and len(ha) > 16 * 3
    make_synthbirds(tmp_path / 'c', **{**kw, 'seed': 6})
    assert tree_hashes(tmp_path / 'c') != ha
    assert a == tmp_path / 'a' / 'SynthBirds' / 'CUB_200_2011'


def test_synthbirds_ground_truth(tmp_path):
    tr = load_dataset('SynthBirds', 'train', root=tmp_path, seed=0, n_classes=4, images_per_class=4, img_size=128, progress=False)
    te = load_dataset('SynthBirds', 'test', root=tmp_path)
    truth = load_synthbirds_truth(tr.archive)
    assert truth['part_names'] == list(PART_NAMES) and len(truth['classes']) == 4
    assert truth['params'] == dict(seed=0, n_classes=4, images_per_class=4, img_size=128)
    assert set(tr.labels) == set(te.labels) == {0, 1, 2, 3}                # every class in both splits
    pair = truth['pairs'][0]
    a, b = (truth['classes'][i]['parts'] for i in pair['classes'])
    assert [(p, k) for p in a for k in a[p] if a[p][k] != b[p][k]] == [(pair['part'], pair['attribute'])]
    for ds in (tr, te):
        for i in range(len(ds)):
            pm, seg = part_label_map(ds.archive, ds.relpaths[i]), ds.mask(i)
            assert pm.shape == seg.shape == ds.load_image(i).size[::-1]
            assert set(np.unique(seg)) <= {0, 255} and np.array_equal(pm > 0, seg > 0)
            assert np.array_equal(ds.part_map(i), pm) and pm.max() <= len(PART_NAMES)
            vis = ds.part_locs[i, :, 2] > 0
            assert np.array_equal(vis, np.bincount(pm.ravel(), minlength=11)[1:] >= 3)
            for k in np.nonzero(vis)[0]:                                     # a visible part's location is near its pixels
                x, y = ds.part_locs[i, k, :2]
                yy, xx = np.nonzero(pm == k + 1)
                assert np.min(np.hypot(xx - x, yy - y)) < 20
    # the designed pair differs only inside (and 2 px around) the stated part, for shared pose and background
    specs, _, pairs = design_classes(20, seed=0)
    for pr in pairs:
        d = pair_difference(specs[pr['classes'][0]], specs[pr['classes'][1]], pr['part'], [9, 9, 9], 160)
        assert d['outside'] == 0 and d['inside'] > 0, pr


def test_synthbirds_settings_mismatch(tmp_path):
    load_dataset('SynthBirds', 'train', root=tmp_path, n_classes=3, images_per_class=2, img_size=96, progress=False)
    with pytest.raises(DatasetError, match='other settings'):
        load_dataset('SynthBirds', 'train', root=tmp_path, n_classes=4, images_per_class=2, img_size=96)
    with pytest.raises(ValueError, match='images_per_class'): make_synthbirds(tmp_path / 'x', images_per_class=1)


def test_synthbirds_default_stats(synthbirds_default):
    """The hard-coded DATASET_STATS['SynthBirds'] is what compute_mean_std gives on the default SynthBirds (generated with the
    default settings by `load_dataset`: the session's, tests/conftest.py)."""
    root = synthbirds_default
    tr = load_dataset('SynthBirds', 'train', root=root, progress=False)
    assert (tr.n_classes, len(tr) + len(load_dataset('SynthBirds', 'test', root=root))) == (20, 600)
    mean, std = compute_mean_std(tr, img_size=224)
    assert np.allclose(mean, DATASET_STATS["SynthBirds"][0], atol=5e-4), mean
    assert np.allclose(std, DATASET_STATS["SynthBirds"][1], atol=5e-4), std
