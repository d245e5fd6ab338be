"""A full disk anywhere is one line, and the rerun with space finishes the job: a run directory, a token cache and an
export written onto a small tmpfs that fills up at a chosen step (its size computed from the session's finished smoke
run, cache and export, tests/conftest.py), each through the command line (`dinoqpm.cli.main`, in-process). Each must
exit with 2, print no traceback and one line naming the file, the bytes it needs and the bytes free; leave nothing
half-written that a later reader would trust; and, once the disk has grown (a remount), complete to the same result as
the shared one. Mounting needs root (CI runs the suite as root); elsewhere the tests are skipped, saying so."""
import errno, hashlib, os, re, shutil, subprocess
from pathlib import Path
import pytest

from dinoqpm.cli import main
from dinoqpm.share.format import PENDING_FILE

PAGE = os.sysconf('SC_PAGE_SIZE')            # tmpfs counts whole pages
ROOMY = 96 << 20                             # the disk grown for the rerun: the cache keeps 64 MiB free beyond its arrays


def pages(n: int) -> int:
    return -(-n // PAGE)


class SmallDisk:
    "A tmpfs mounted at `path`; `resize(bytes)` remounts it with another size (its files stay)."
    def __init__(self, path: Path): self.path, self.size = path, 0
    def resize(self, size: int):
        subprocess.run(['mount', '-o', f'remount,size={size}', str(self.path)], check=True, capture_output=True)
        self.size = size

    def fill_up(self) -> Path:
        "A file that takes every free byte, as another program writing there would."
        f = self.path / 'filler'
        fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for block in (1 << 20, PAGE, 1):
                try:
                    while True: os.write(fd, b'\0' * block)
                except OSError as e:
                    if e.errno != errno.ENOSPC: raise
        finally: os.close(fd)
        assert shutil.disk_usage(self.path).free == 0
        return f


@pytest.fixture
def small_disk(tmp_path):
    "A tmpfs of one page at `tmp_path/disk` (`resize` it), unmounted after the test; skipped where it cannot be mounted."
    if os.geteuid() != 0:
        pytest.skip('mounting a small tmpfs needs root (CI runs the suite as root): the disk-full paths are not tested here')
    d = tmp_path / 'disk'
    d.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={PAGE},mode=0755', 'tmpfs', str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f'cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {r.stderr.strip()}; the disk-full paths are not tested here')
    disk = SmallDisk(d)
    disk.size = PAGE
    try: yield disk
    finally: subprocess.run(['umount', '-l', str(d)], capture_output=True)


def cli(capsys, *argv, level='ERROR') -> tuple:
    "Run the command line in-process (log level ERROR: stderr holds only the error); `(exit code, stderr)`."
    capsys.readouterr()
    code = main(['--log-level', level, *map(str, argv)])
    return code, capsys.readouterr().err


FULL = re.compile(r"dinoqpm (?P<cmd>\w+): error: cannot write (?P<path>\S+): No space left on device \(it needs "
                  r"(?P<needed>[\d,]+) bytes(?: = [\d.]+ [kMGT]B)?; (?P<free>[\d,]+) bytes(?: = [\d.]+ [kMGT]B)? are free "
                  r"there\); free some space, or write elsewhere")


def one_disk_full_line(err: str, command: str, disk: SmallDisk) -> tuple:
    "`(file, bytes needed, bytes free)` of the one line a full disk printed; it must need more than is free on `disk`."
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    m = FULL.match(err.strip())
    assert m and m['cmd'] == command, err
    needed, free = int(m['needed'].replace(',', '')), int(m['free'].replace(',', ''))
    assert free < needed and free <= disk.size, err                 # the free bytes of that disk, not of another one
    return Path(m['path']), needed, free


def files(folder) -> dict:
    "Every file below `folder` (relative path: size, SHA-256), lock files aside."
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob('*')) if p.is_file() and not p.name.endswith('.lock')}


def no_temporary_files(folder):
    "No hidden file but locks and an unfinished export's own record (written whole, first: the rerun resumes from it)."
    left = [str(p) for p in Path(folder).rglob('.*') if not p.name.endswith('.lock') and p.name != PENDING_FILE]
    assert not left, f'half-written files left behind: {left}'


def test_a_full_run_directory_is_one_line_and_the_rerun_resumes(smoke, small_disk, capsys):
    """The disk fills while the finetune stage writes its checkpoint (`torch.save`, which by itself reports a full disk
    as a RuntimeError "unexpected pos"): one line with the checkpoint's bytes; the earlier stages stay valid and the rerun
    with space reuses them and finishes with the shared run's weights."""
    from dinoqpm.core import content_digest, load_checked
    shared = {k: size for k, (size, _) in files(smoke.run).items()}
    written = [k for k in shared if not k.startswith(('finetune', 'results_finetune'))] + ['finetune/log.csv', '.dinoqpm.lock']
    ck = 'finetune/checkpoint.pt'
    assert pages(shared[ck]) > 4
    small_disk.resize(PAGE * (sum(pages(shared.get(k, 1)) for k in written) + 3))    # 3 pages free for the checkpoint
    run = small_disk.path / 'run'
    argv = ['train', '--config', smoke.yaml, '--run-dir', run, '--cache-root', smoke.cache, '--no-progress', '--eval-mode', 'fast']
    code, err = cli(capsys, *argv)
    assert code == 2, err
    path, needed, free = one_disk_full_line(err, 'train', small_disk)
    assert path == run / ck, err
    no_temporary_files(run)
    assert not (run / ck).exists()
    for f in run.rglob('*.pt'): load_checked(f)                     # what is there is whole (checksums verified)
    after_fail = files(run)
    small_disk.resize(ROOMY)
    code, err = cli(capsys, *argv)
    assert code == 0, err
    done = files(run)
    assert {k: v for k, v in done.items() if k in after_fail and k != 'finetune/log.csv'} == \
           {k: v for k, v in after_fail.items() if k != 'finetune/log.csv'}     # the finished stages are reused as they were
    assert needed == done[ck][0]                                    # the bytes it needed: the checkpoint's size
    mine, theirs = load_checked(run / 'finetune_model.pt')['model'], load_checked(smoke.run / 'finetune_model.pt')['model']
    assert content_digest(mine) == content_digest(theirs)            # the same weights, bit for bit
    no_temporary_files(run)


def _cache_args(smoke, cache_root):
    return ['extract', '--config', smoke.yaml, '--cache-root', cache_root, '--no-progress']


def _same_caches(mine: Path, theirs: Path):
    "The same split folders, holding arrays of the same bytes (the manifests' SHA-256, checked against the files)."
    import json
    from dinoqpm.features import open_feature_cache
    ours = sorted(p.parent.relative_to(mine) for p in mine.rglob('manifest.json'))
    assert ours == sorted(p.parent.relative_to(theirs) for p in theirs.rglob('manifest.json')) and len(ours) == 2
    for rel in ours:
        open_feature_cache(mine / rel)                              # verified against its manifest, SHA-256 included
        a, b = (json.loads((d / rel / 'manifest.json').read_text())['arrays'] for d in (mine, theirs))
        assert a == b, rel


def test_a_cache_that_cannot_fit_is_refused_up_front_with_its_margin(smoke, small_disk, capsys):
    """Refused before anything is written: the bytes it needs are its arrays plus the stated margin, which is more than
    the bytes free (the old message said "needs 0.01 GB but only 0.02 GB are free"); with space, the extraction runs."""
    from dinoqpm.features.cache import FREE_MARGIN
    small_disk.resize(64 * PAGE)
    code, err = cli(capsys, *_cache_args(smoke, small_disk.path / 'cache'))
    assert code == 2 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    m = re.search(r'the feature cache needs ([\d,]+) bytes.* free in (\S+) \(([\d,]+) bytes.* for its arrays and '
                  r'([\d,]+) bytes.* left free for the manifest and everything else\) but only ([\d,]+) bytes.* are free there', err)
    assert m, err
    need, arrays, margin, free = (int(m[i].replace(',', '')) for i in (1, 3, 4, 5))
    assert need == arrays + margin and margin == FREE_MARGIN and free < need and free <= small_disk.size, err
    assert str(small_disk.path / 'cache') in m[2]
    assert list(small_disk.path.iterdir()) == []                   # nothing written
    small_disk.resize(ROOMY)
    code, err = cli(capsys, *_cache_args(smoke, small_disk.path / 'cache'))
    assert code == 0, err
    _same_caches(small_disk.path / 'cache', smoke.cache)


def test_a_disk_filled_during_extraction_is_one_line_and_the_rerun_resumes(smoke, small_disk, capsys, monkeypatch):
    """Another program fills the disk after the first chunk of tokens is on it: the file being written is named with
    its bytes, no finished-looking cache folder exists, and the rerun, with space again, resumes at the chunks done and
    ends with the shared cache's bytes."""
    import dinoqpm.features.cache as cache_module
    small_disk.resize(ROOMY)
    real, filler = cache_module.extract_tokens, []
    def extract_while_the_disk_fills(*a, **kw):
        return real(*a, **{**kw, 'on_chunk': lambda done, n: filler or filler.append(small_disk.fill_up())})
    monkeypatch.setattr(cache_module, 'extract_tokens', extract_while_the_disk_fills)
    code, err = cli(capsys, *_cache_args(smoke, small_disk.path / 'cache'))
    assert code == 2 and filler, err
    path, _, _ = one_disk_full_line(err, 'extract', small_disk)
    assert path.parent.name == 'train.partial', err                 # a file of the unfinished folder
    assert not (path.parent.parent / 'train').exists() and not list(small_disk.path.rglob('manifest.json'))
    assert (path.parent / 'progress.json').is_file() and list((path.parent / 'chunks').iterdir())   # its chunks kept
    no_temporary_files(small_disk.path)
    monkeypatch.setattr(cache_module, 'extract_tokens', real)
    filler[0].unlink()
    code, err = cli(capsys, *_cache_args(smoke, small_disk.path / 'cache'), level='INFO')
    assert code == 0, err
    assert re.search(r'resuming \S+/train with (\d+) of \1 images done', err), err      # not computed again
    _same_caches(small_disk.path / 'cache', smoke.cache)


def test_a_full_disk_during_export_is_one_line_and_the_rerun_completes(smoke, small_disk, capsys):
    """The disk fills in the middle of the export (at `index.html`, in the order the files are written today): one line
    naming the file with its bytes, no temporary file left; with space, the rerun ends with the shared export's bytes."""
    shared = files(smoke.out)
    stop = sorted(shared).index('index.html')
    small_disk.resize(PAGE * (sum(pages(size) for _, (size, _) in sorted(shared.items())[:stop]) + 4))
    out = small_disk.path / 'model'
    argv = ['export', '--model-path', smoke.run, '--out', out, '--cache-root', smoke.cache, '--no-progress']
    code, err = cli(capsys, *argv)
    assert code == 2, err
    path, needed, _ = one_disk_full_line(err, 'export', small_disk)
    assert out in path.parents and needed == shared[str(path.relative_to(out))][0], err
    no_temporary_files(out)
    small_disk.resize(ROOMY)
    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert files(out) == shared
