"""
Run test files where pytest is not installed (a GPU image may lack it, and such a machine has no network): the
part of pytest that tests/test_device.py and tests/test_placement.py use (parametrize, skipif, raises, approx,
skip, fixtures with monkeypatch and tmp_path) stands in for it, each test is run and reported as pytest -v
would, and the exit code is 1 if any failed. With pytest installed, it is pytest that runs.

    python bench/minitest.py tests/test_device.py tests/test_placement.py
    python bench/minitest.py --fallback tests/test_device.py       # the stand-in even where pytest exists
"""
import importlib.util
import inspect
import itertools
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name, args, kwargs):
        self.name, self.args, self.kwargs = name, args, kwargs

    def __call__(self, fn):
        fn.__dict__.setdefault("marks", []).append(self)
        return fn


class _MarkGen:
    def __getattr__(self, name):
        return lambda *args, **kwargs: _Mark(name, args, kwargs)


class _Raises:
    def __init__(self, expected, match=None):
        self.expected, self.match = expected, match

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            raise AssertionError(f"did not raise {self.expected}")
        if not issubclass(kind, self.expected):
            return False
        if self.match and not re.search(self.match, str(value)):
            raise AssertionError(f"{value!r} does not match {self.match!r}")
        return True


class _Approx:
    def __init__(self, expected, rel=None, abs=None):
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def _close(self, a, b):
        return a == b or math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs)

    def __eq__(self, other):
        if isinstance(self.expected, (list, tuple)):
            return len(other) == len(self.expected) and all(self._close(a, b) for a, b in zip(other, self.expected))
        return self._close(other, self.expected)


class _MonkeyPatch:
    def __init__(self):
        self.undo = []

    def setattr(self, target, name, value):
        self.undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def setenv(self, name, value):
        self.undo.append((os.environ, name, os.environ.get(name)))
        os.environ[name] = value

    def restore(self):
        for target, name, old in reversed(self.undo):
            if target is os.environ:
                os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old)
            else:
                setattr(target, name, old)


def fixture(fn=None, **kwargs):
    if fn is None:
        return fixture
    fn.is_fixture = True
    return fn


def _skip(reason=""):
    raise Skipped(reason)


def stand_in():
    """A module named pytest with what the device tests use."""
    mod = types.ModuleType("pytest")
    mod.mark, mod.raises, mod.approx, mod.fixture, mod.skip = _MarkGen(), _Raises, _Approx, fixture, _skip
    mod.is_stand_in = True
    return mod


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cases(fn):
    """(id, kwargs) for each parametrization of a test function."""
    grids = []
    for mark in getattr(fn, "marks", []):
        if mark.name == "parametrize":
            names, values = mark.args[0], mark.args[1]
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            grids.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    for combo in itertools.product(*grids):
        kw = {k: v for d in combo for k, v in d.items()}
        yield ("[" + "-".join(str(v).replace("torch.", "") for v in kw.values()) + "]" if kw else ""), kw


def run_file(path, fixtures, tmp):
    module = load(path, os.path.splitext(os.path.basename(path))[0])
    local = dict(fixtures, **{n: f for n, f in vars(module).items() if getattr(f, "is_fixture", False)})
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for name, fn in list(vars(module).items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        for case_id, params in cases(fn):
            skip = [m for m in getattr(fn, "marks", []) if m.name == "skipif" and m.args and m.args[0]]
            label = f"{os.path.relpath(path, ROOT)}::{name}{case_id}"
            mp = _MonkeyPatch()
            try:
                if skip:
                    raise Skipped(skip[0].kwargs.get("reason", ""))
                kwargs = dict(params)
                for arg in inspect.signature(fn).parameters:
                    if arg in kwargs:
                        continue
                    if arg == "monkeypatch":
                        kwargs[arg] = mp
                    elif arg == "tmp_path":
                        import pathlib
                        kwargs[arg] = pathlib.Path(tempfile.mkdtemp(dir=tmp))
                    elif arg in local:
                        kwargs[arg] = local[arg]()
                    else:
                        raise RuntimeError(f"fixture {arg!r} is not available without pytest")
                fn(**kwargs)
                counts["passed"] += 1
                print(f"{label} PASSED", flush=True)
            except Skipped as e:
                counts["skipped"] += 1
                print(f"{label} SKIPPED ({e})", flush=True)
            except Exception:  # noqa: BLE001 - a failing test is reported and the next one runs
                counts["failed"] += 1
                print(f"{label} FAILED\n{traceback.format_exc()}", flush=True)
            finally:
                mp.restore()
    return counts


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    fallback = "--fallback" in argv
    files = [a for a in argv if a != "--fallback"]
    if not fallback and importlib.util.find_spec("pytest") is not None:
        import pytest
        return pytest.main(["-v", "-p", "no:cacheprovider", *files])
    sys.modules["pytest"] = stand_in()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    conftest = load(os.path.join(ROOT, "tests", "conftest.py"), "conftest")
    fixtures = {n: f for n, f in vars(conftest).items() if getattr(f, "is_fixture", False)}
    tmp = tempfile.mkdtemp(prefix="minitest-")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        for path in files:
            for k, v in run_file(os.path.abspath(path), fixtures, tmp).items():
                total[k] += v
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"without pytest: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
