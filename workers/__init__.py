"""Agora's volunteer agent (``agora-worker``): enrolls a machine, heartbeats, claims DiLoCo tasks and
runs them with the ``diloco`` library. No Django: it installs with ``pip install ".[worker]"``.

Modules: ``cli`` (argparse entry point), ``config`` (config and state files), ``hardware`` (detection and
device choice), ``bench`` (matmul TFLOPS and memory bandwidth), ``client`` (the worker protocol over
httpx, errors and backoff), ``agent`` (the loop, states and signals), ``runner`` (one task, end to end).
"""

__version__ = "0.1.0"
