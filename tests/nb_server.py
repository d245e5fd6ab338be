"""Runs the library notebooks for tests/test_notebooks.py, each in a process of its own, forked from this one.

This process imports once what every notebook's process would import (nbdev's runner, numpy, torch, pandas, the dinoqpm
modules; `import dinoqpm` first, for the numerics pins) and computes nothing, then forks one child per request: the child
starts from that freshly imported state, as a new `python -c` process would after its imports, runs the notebook as
`nbdev_test` does, and ends; nothing it does reaches the next notebook. This saves each notebook the seconds of imports.

Protocol (one JSON object a line): a request on stdin, `{"nb": path, "skip": [flags], "env": {...}, "log": path}`; the
answers on stdout, `{"pid": child}` when the child started and `{"exit": code}` when it ended. The child's stdout and
stderr go to the request's `log` file; `env` replaces the environment, the working directory is the notebook's folder.
"""
import dinoqpm  # noqa: F401  first: the numerics pins (dinoqpm.numerics), as in the notebooks' own processes
import atexit, gc, importlib, json, os, pkgutil, sys, traceback
from pathlib import Path

PRELOAD = ['numpy', 'torch', 'torch.nn', 'torch.nn.functional', 'PIL.Image', 'pandas', 'scipy.optimize', 'matplotlib',
           'nbdev.test', 'execnb.shell', 'fastcore.test']


def preload():
    """Import, and nothing else: no torch op runs here, so no OpenMP thread pool exists to be lost in a fork. A module that
    cannot be imported (an optional dependency missing) is left to the notebooks that need it, to fail there as before."""
    modules = pkgutil.walk_packages(dinoqpm.__path__, 'dinoqpm.', onerror=lambda name: None)   # every room, every module
    names = PRELOAD + [m.name for m in modules if not m.name.endswith('__main__')]
    for name in names:
        try: importlib.import_module(name)
        except Exception as e: print(f'nb_server: not preloaded: {name} ({type(e).__name__}: {e})', file=sys.stderr)


def child(req: dict):
    "In the forked child: the notebook's folder, environment and output file, then nbdev's runner; this process ends here."
    code = 3
    try:
        fd = os.open(req['log'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
        nb = Path(req['nb'])
        os.chdir(nb.parent)
        os.environ.clear(); os.environ.update(req['env'])
        sys.path[0] = ''                                   # as for `python -c`: the working directory, not this folder
        sys.argv = ['-c', str(nb), ','.join(req['skip'])]
        from nbdev.test import test_nb as run_nb
        ok, _ = run_nb(nb, skip_flags=req['skip'], showerr=True)
        code = 0 if ok else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
    atexit._run_exitfuncs()                                # as at a normal end of a process ...
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)                                         # ... but without tearing down thousands of modules (0.6 s)


def main():
    preload()
    gc.collect(); gc.freeze()      # the imports are never garbage: a full collection (the QP runs two per solve) skips them
    print(json.dumps({'ready': os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip(): continue
        req = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0: child(req)
        print(json.dumps({'pid': pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({'exit': os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == '__main__':
    main()
