import os
# Tests never reach the network and stay quiet.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TQDM_DISABLE', '1')
# OpenMP threads that wait for work sleep instead of spinning: on a busy machine (more runnable threads than cores) a
# spinning waiter makes every small two-thread torch op up to ~100x slower. Scheduling only: the results keep their bits.
# Inherited by every process the tests start (notebooks, the command line, torchrun workers).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import dinoqpm  # noqa: E402,F401  first, before any test module imports torch: the numerics pins apply to this process and
                # (through the environment) to every process it starts (dinoqpm.numerics)
import logging, sys  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """What one test changes in this process is undone for the next: torch's thread count (a test may set one thread;
    then an in-process result would differ in its last bits from the same computation in a subprocess) and the root
    logger's handlers (an in-process `dinoqpm` command line binds one to the stream pytest captured for that test)."""
    threads = sys.modules['torch'].get_num_threads() if 'torch' in sys.modules else None
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if threads is not None: sys.modules['torch'].set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)
