"""What every benchmark shares so that a GPU session brings its figures back whatever happens: the JSON is written
again after every part (a mode, a side, a workload), a part that fails or runs out of time is recorded as such and
the next one runs, and a run stopped by SIGTERM (the `timeout` of bench/steps.sh) still removes its temporary
files. A SIGKILL runs no Python: bench/steps.sh removes the temporary folder of the whole script instead."""
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_json  # noqa: E402

RUNNING = "running: no result (the run stopped during this part)"


class PartTimeout(Exception):
    pass


def _on_term(signum, frame):
    # SystemExit unwinds the stack, so `finally` blocks and context managers clean up (Python's default for
    # SIGTERM is to die at once, leaving temporary checkpoints behind)
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm():
    signal.signal(signal.SIGTERM, _on_term)


class Results:
    """One benchmark's JSON, written atomically after every change: a run killed at any point leaves what it had
    measured, and "running: ..." under the part it was in."""

    def __init__(self, path, deadline=None, **fields):
        self.path, self.deadline, self.data = path, deadline, dict(fields)
        self.save()

    def set(self, keys, value):
        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        self.save()

    def get(self, keys):
        d = self.data
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    def save(self):
        if self.path:
            write_json(self.path, self.data, indent=1)

    def left(self):
        return None if self.deadline is None else self.deadline - time.time()

    def part(self, keys, fn, min_seconds=5):
        """fn() -> a dict stored under keys; a failure (an exception, the time limit) is stored there instead and
        None returned. The part gets the time left before the deadline (SIGALRM interrupts it at the next Python
        line; a part stuck inside one long kernel is left to the `timeout` of the shell step)."""
        left = self.left()
        if left is not None and left < min_seconds:
            self.set(keys, {"error": f"not run: the time limit was reached ({left:.0f} s left)"})
            return None
        self.set(keys, {"status": RUNNING})
        t0 = time.time()
        old = None
        if left is not None:
            old = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, left)
        try:
            value = fn()
        except PartTimeout:
            value = {"error": f"time limit: stopped after {time.time() - t0:.0f} s"}
        except Exception as e:  # noqa: BLE001 - any failure of a part is a result to record, then the next part runs
            traceback.print_exc()
            value = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            free_device_memory()
        except BaseException as e:  # SIGTERM (SystemExit), Ctrl-C: record it, then stop as asked
            self.set(keys, {"error": f"killed ({type(e).__name__} {e}) after {time.time() - t0:.0f} s"})
            raise
        finally:
            if left is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        value.setdefault("part_seconds", round(time.time() - t0, 1))
        self.set(keys, value)
        return None if "error" in value else value


def _on_alarm(signum, frame):
    raise PartTimeout()


def free_device_memory():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def temporary_folder():
    """A folder removed when the block ends, however it ends short of a SIGKILL (see exit_cleanly_on_sigterm)."""
    path = tempfile.mkdtemp(prefix="bench-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def deadline_from(seconds):
    """The deadline of a run given --time-limit seconds, or BENCH_TIME_LIMIT (what bench/steps.sh gives each
    step: its own limit less a margin to write the JSON and clean up); None for no limit."""
    seconds = seconds or float(os.environ.get("BENCH_TIME_LIMIT", 0))
    return time.time() + seconds if seconds else None
