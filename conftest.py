"""Shared pytest setup: CPU, 8 fake devices available for sharding tests, fp32 matmuls.

Compilation dominates this suite's time, and many tests compile the same programs again: fresh
``nnx.jit`` closures over equal modules in one process, and above all the trainer subprocesses
(kill/resume, two-process runs) that each start cold. One persistent XLA compilation cache per
test session, in a fresh temporary directory inherited by every subprocess through the
environment, lets them share the work. It starts empty (a run never reuses an earlier run's
executables) and is removed when the session ends. Set ``JAX_COMPILATION_CACHE_DIR`` yourself to
keep one across runs.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sift-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
