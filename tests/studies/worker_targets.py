"""What the worker-pool tests hand a pool's workers in place of ``runner._worker_run``:
module-level functions, so a spawned worker imports them. Each wraps the real one."""

import os
import signal

from normlab.studies import runner


def _with_hook(spec, run_dir, keep_weights, index, at, hook):
    """The real worker run, with ``hook()`` called after step ``at`` of the run."""
    real = runner.run_one

    def run_one(spec, run_dir, env, corpus, on_step=None, keep_weights=True):
        def step(n):
            on_step(n)
            if n == at:
                hook()

        return real(spec, run_dir, env, corpus, on_step=step, keep_weights=keep_weights)

    runner.run_one = run_one  # in this worker process only
    try:
        return runner._worker_run(spec, run_dir, keep_weights, index)
    finally:
        runner.run_one = real


def killed_mid_run(spec, run_dir, keep_weights, index=-1):
    """Runs named "die..." are SIGKILLed at their step 2 (as the out-of-memory killer does)."""
    if spec.name.startswith("die"):
        return _with_hook(spec, run_dir, keep_weights, index, 2, lambda: os.kill(os.getpid(), signal.SIGKILL))
    return runner._worker_run(spec, run_dir, keep_weights, index)


def killed_between_runs(spec, run_dir, keep_weights, index=-1):
    """A worker handed a run named "die..." exits before it starts it, every time."""
    if spec.name.startswith("die"):
        os._exit(3)
    return runner._worker_run(spec, run_dir, keep_weights, index)


def ctrl_c_at_step_3(spec, run_dir, keep_weights, index=-1):
    """Run "first" sends SIGINT to the study's process at its step 3, as a terminal's Ctrl-C."""
    if spec.name == "first":
        return _with_hook(spec, run_dir, keep_weights, index, 3, lambda: os.kill(os.getppid(), signal.SIGINT))
    return runner._worker_run(spec, run_dir, keep_weights, index)


def cuda_error_mid_run(spec, run_dir, keep_weights, index=-1):
    """Run "bad" fails at its step 2 with the error a CUDA kernel's illegal address gives
    (after which a real CUDA context is unusable to the process)."""
    def fail():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    if spec.name == "bad":
        return _with_hook(spec, run_dir, keep_weights, index, 2, fail)
    return runner._worker_run(spec, run_dir, keep_weights, index)


def cuda_set_device_fails(spec, run_dir, keep_weights, index=-1):
    """Never called: the workers' start fails first (their initializer pins a GPU that a
    CPU build of torch cannot set)."""
    return runner._worker_run(spec, run_dir, keep_weights, index)
