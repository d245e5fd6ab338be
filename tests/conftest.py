import os
# Tests never reach the network and stay quiet.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TQDM_DISABLE', '1')
import dinoqpm  # noqa: E402,F401  first, before any test module imports torch: the numerics pins apply to this process and
                # (through the environment) to every process it starts (dinoqpm.numerics)
