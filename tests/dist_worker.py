"""Run by tests/test_distributed.py, with and without `torchrun`: one job of the smoke configuration.

    python dist_worker.py extract CONFIG CACHE_ROOT [KILL_RANK KILL_AFTER_CHUNKS]
    python dist_worker.py train CONFIG CACHE_ROOT RUN_DIR WRITES_LOG
    python dist_worker.py decide OUT_DIR
    python dist_worker.py images CONFIG OUT_FILE [everywhere]

`extract` builds both caches in small chunks (batch 2, chunk 2) so that both ranks have several; with KILL_RANK the
process of that rank kills itself (SIGKILL) after KILL_AFTER_CHUNKS of its chunks. `train` runs `dinoqpm train`; every
rank but 0 records each file it opens for writing, creates, renames or deletes under RUN_DIR into WRITES_LOG. `decide`
lets rank 0 fail in `distributed.decide_on_rank0` (an OSError, a RuntimeError, a ConfigError), writes what every rank
raised into OUT_DIR/rank<r>.json, and ends with a RuntimeError on rank 0 that no rank catches.
"""
import json, os, signal, sys
from pathlib import Path


def record_writes(under: Path, log_file: Path):
    "An audit hook: every write-mode open, mkdir, rename, replace or removal of a path under `under`."
    seen, under = [], str(under.resolve())
    def hook(event, args):
        path = None
        if event == 'open':
            p, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or \
                      (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            path = p if writing else None
        elif event in ('os.mkdir', 'os.rename', 'os.replace', 'os.remove', 'os.rmdir', 'shutil.rmtree', 'os.truncate'):
            path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            p = os.path.abspath(os.fsdecode(path))
            if p.startswith(under): seen.append(f'{event} {p}')
    sys.addaudithook(hook)
    import atexit
    atexit.register(lambda: log_file.write_text(json.dumps(seen)))


def decide(out: Path, rank: int):
    from dinoqpm import distributed as D
    from dinoqpm.config import ConfigError
    D.init_distributed('cpu')
    def fails(e):
        def fn():
            if D.rank() != 0: raise AssertionError(f'fn ran on rank {D.rank()}')
            raise e
        return fn
    seen = {}
    for name, e in (('oserror', OSError(28, 'No space left on device', '/cache/x.npy')),
                    ('runtime', RuntimeError('CUDA out of memory')), ('config', ConfigError('qp.n_select=0 is not positive'))):
        try: seen[name] = ['returned', D.decide_on_rank0(fails(e), f'deciding {name}')]
        except Exception as err: seen[name] = [type(err).__name__, str(err)]
    seen['ok'] = D.decide_on_rank0(lambda: {'decided by': D.rank()}, 'deciding ok')
    (out / f'rank{rank}.json').write_text(json.dumps(seen))
    D.barrier()
    D.decide_on_rank0(fails(RuntimeError('the last straw')), 'the last decision')   # raised on every rank, caught by none


def images(config: str, out: Path, everywhere: bool = False):
    import torch
    from dinoqpm import distributed as D
    from dinoqpm.config import load_config
    from dinoqpm.model import CNNQPMModel
    from dinoqpm.train import load_image_splits, train_dense
    if everywhere:
        built = CNNQPMModel.__init__
        def init(self, *a, **kw):
            built(self, *a, **kw); D.use_global_batch_norm(self, everywhere=True)
        CNNQPMModel.__init__ = init
    D.init_distributed('cpu')
    cfg = load_config(config)
    model, history = train_dense(cfg, *load_image_splits(cfg), progress=False, eval_every=1)
    if D.is_main(): torch.save({'state': model.state_dict(), 'history': history, 'processes': D.world_size()}, out)
    D.shutdown()


def main():
    rank = int(os.environ.get('RANK', 0))
    if sys.argv[1] == 'decide': return decide(Path(sys.argv[2]), rank)
    if sys.argv[1] == 'images': return images(sys.argv[2], Path(sys.argv[3]), sys.argv[4:] == ['everywhere'])
    cmd, config, cache_root = sys.argv[1], sys.argv[2], sys.argv[3]
    if cmd == 'extract':
        from dinoqpm import distributed as D
        from dinoqpm.features import get_feature_cache
        from dinoqpm.config import load_config
        D.init_distributed('cpu')
        cfg = load_config(config)
        kill = None
        if len(sys.argv) > 5 and int(sys.argv[4]) == rank:
            left = [int(sys.argv[5])]
            def kill(done, total):
                left[0] -= 1
                if left[0] <= 0: os.kill(os.getpid(), signal.SIGKILL)
        for split in ('train', 'test'):
            get_feature_cache(cfg, split, cache_root=cache_root, progress=False, batch_size=2, chunk_size=2, on_chunk=kill)
        D.shutdown()
    elif cmd == 'train':
        run_dir, writes = Path(sys.argv[4]), Path(sys.argv[5])
        if rank != 0: record_writes(run_dir, writes)
        from dinoqpm.cli import main as cli
        sys.exit(cli(['--log-level', 'WARNING', 'train', '--config', config, '--cache-root', cache_root, '--run-dir',
                      str(run_dir), '--no-progress']))


if __name__ == '__main__':
    main()
