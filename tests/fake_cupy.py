"""A stand-in for CuPy made of NumPy that counts every host<->device transfer.

Installed as `sys.modules["cupy"]`, it lets the model's one code path run with
backend="cupy" on a machine without a GPU, and lets a test prove that a forward
pass or a decode step moves nothing between host and device except what the
caller hands in. Like CuPy, its arrays:

- refuse to mix with NumPy arrays in arithmetic and in array functions
  (TypeError; CuPy raises too, it never copies silently there);
- count as a host->device copy: `cupy.asarray(numpy_array)`, assigning a NumPy
  array into a device array, indexing a device array with a NumPy array;
- count as a device->host copy: `.get()`, `cupy.asnumpy`, `float()`, `int()`,
  `bool()`, `.item()`, `.tolist()` (each is a synchronising copy on a GPU);
- return 0-d device arrays, not NumPy scalars, from reductions and scalar indexing.

Not caught: `np.asarray(device_array)` (CuPy raises, this fake returns a view,
since a NumPy subclass cannot intercept it).
"""

from __future__ import annotations

import types

import numpy as np


class Transfers:
    """Counts of copies, with a short note of each (for the assertion message)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.host_to_device = 0
        self.device_to_host = 0
        self.log = []

    def h2d(self, what):
        self.host_to_device += 1
        self.log.append(f"host->device: {what}")

    def d2h(self, what):
        self.device_to_host += 1
        self.log.append(f"device->host: {what}")


transfers = Transfers()


def _is_host(x):
    return type(x) is np.ndarray  # a plain NumPy array (NumPy scalars are fine, as in CuPy)


def _check_no_host(args, where):
    for a in args:
        if isinstance(a, (list, tuple)):
            _check_no_host(a, where)
        elif _is_host(a):
            raise TypeError(f"fake cupy: a NumPy array of shape {a.shape} reached {where} on device arrays; "
                            "CuPy would refuse it (an implicit host->device copy)")


def _plain(x):
    if isinstance(x, ndarray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(a) for a in x)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return x if isinstance(x, ndarray) else x.view(ndarray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(ndarray)  # CuPy returns 0-d arrays, not scalars
    if isinstance(x, tuple):
        return tuple(_wrap(a) for a in x)
    if isinstance(x, list):
        return [_wrap(a) for a in x]
    return x


class ndarray(np.ndarray):
    """A 'device' array: NumPy memory that behaves like a CuPy array at the host boundary."""

    def get(self, stream=None, order="C", out=None):
        transfers.d2h(f"get() of shape {self.shape}")
        return np.array(self.view(np.ndarray), order=order, copy=True)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _check_no_host(inputs, f"np.{ufunc.__name__}")
        if out is not None:
            _check_no_host(out, f"np.{ufunc.__name__}(out=)")
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _check_no_host(args, f"np.{func.__name__}")
        _check_no_host(tuple(kwargs.values()), f"np.{func.__name__}")
        plain_kwargs = {k: _plain(v) for k, v in kwargs.items()}
        return _wrap(func(*_plain(args), **plain_kwargs))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(_is_host(k) for k in keys):
            transfers.h2d("a NumPy index array")
        return _wrap(super().__getitem__(_plain(key)))

    def __setitem__(self, key, value):
        if _is_host(value) and value.ndim > 0:
            transfers.h2d(f"assigning a NumPy array of shape {value.shape}")
        keys = key if isinstance(key, tuple) else (key,)
        if any(_is_host(k) for k in keys):
            transfers.h2d("a NumPy index array")
        super().__setitem__(_plain(key), _plain(value))

    def __float__(self):
        transfers.d2h("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        transfers.d2h("int()")
        return int(self.view(np.ndarray))

    def __bool__(self):
        transfers.d2h("bool()")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        transfers.d2h("item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        transfers.d2h("tolist()")
        return self.view(np.ndarray).tolist()


ndarray.__module__ = "cupy"  # what minimamba.ops.array_module looks at


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    if isinstance(a, np.ndarray) or isinstance(a, (list, tuple)):
        transfers.h2d(f"asarray of a host array of shape {np.shape(a)}")
    return np.array(a, dtype=dtype, copy=True).view(ndarray)


array = asarray


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get()
    return np.asarray(a)


def _wrapped(name, func):
    def call(*args, **kwargs):
        _check_no_host(args, f"cupy.{name}")
        return _wrap(func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()}))

    call.__name__ = name
    return call


class _Runtime:
    def __init__(self, devices=1):
        self.devices = devices

    def getDeviceCount(self):
        if not self.devices:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return self.devices


def make_module(devices=1):
    """A fresh fake `cupy` module (install with monkeypatch.setitem(sys.modules, 'cupy', module))."""
    module = types.ModuleType("cupy")
    module.__file__ = __file__
    module.ndarray = ndarray
    module.asarray = asarray
    module.array = array
    module.asnumpy = asnumpy
    module.transfers = transfers
    module.cuda = types.SimpleNamespace(runtime=_Runtime(devices))

    def __getattr__(name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return _wrapped(name, attr)
        return attr  # dtypes, constants

    module.__getattr__ = __getattr__
    return module
