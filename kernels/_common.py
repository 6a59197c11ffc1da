"""Small helpers shared by the launchers."""
import functools
import inspect
import os
import sys
import warnings

import torch
from triton import knobs
from triton.runtime.autotuner import Heuristics
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (CPU tensors, one program at a time).
    Read once, as Triton reads it: Triton itself fixes the mode when the kernels are decorated,
    at import."""
    return bool(knobs.runtime.interpret)


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.6+, ~3 us per host call, and the launchers make a few hundred calls per training step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype) -> str:
    """tl.dot's input_precision for operands of ``dtype``: IEEE fp32 for fp32 (no TF32, which
    the float64-checked results could not meet), else "tf32" (ignored by 16-bit dots)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Shapes go to torch's factories and views as separate ints (torch.empty(*shape), x.view_as(y)),
# not as one tuple: torch's argument parser first tries a lone argument as the int of a varargs
# size, and for a tuple or torch.Size that attempt raises and formats a TypeError (and an
# AttributeError) before it is dropped, a few hundred times a training step (both forms timed:
# benches/host_cost.py --call-costs).
def empty(shape, dtype, device):
    """torch.empty of a shape tuple, the ints passed separately (see above)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (asked at launch time, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ------------------------------------------------------------ the work a launch must do
# For benchmarks: with OBSERVER set to a callable, every launch made through launch() or
# launch_tuned() is reported to it as (kernel name, bytes, FLOPs), the least that launch must
# move through memory and compute (launch_work); fastmae bench sets each launch's time in a
# profiled step against it. Unset (None, always outside a benchmark's profile) it costs a launch
# one global read.
OBSERVER = None


@functools.lru_cache(maxsize=None)
def _parameter_names(function):
    return tuple(inspect.signature(function).parameters)


def kernel_function(fn):
    """The Python function under a Triton kernel (JITFunction, interpreted function, autotuner
    or heuristics around one): its name is the kernel's name in a profile."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _distinct_bytes(t):
    """Bytes of a tensor's distinct elements (a stride-0, expanded dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def launch_work(fn, args, kwargs):
    """(kernel name, bytes, FLOPs) that a launch of ``fn`` with ``args`` and ``kwargs`` must at
    least move and compute. Bytes: every tensor argument (or tensor a descriptor argument
    describes) read or written once, its distinct elements only; a tensor passed again (the
    placeholder of an unused pointer) counts once.
    A kernel that touches some argument only in part or not at all, or does matmul work, says
    so in its module's ``LAUNCH_WORK[name]``: a function of the named arguments returning
    {"bytes": {argument: bytes}} (replacing those arguments' counts) and / or {"flops": n}."""
    function = kernel_function(fn)
    name = function.__name__
    named = dict(zip(_parameter_names(function), args))
    named.update(kwargs)
    rule = getattr(sys.modules.get(function.__module__), "LAUNCH_WORK", {}).get(name)
    work = rule(named) if rule is not None else {}
    replaced = work.get("bytes", {})
    total, seen = 0, set()
    for arg, value in named.items():
        if isinstance(value, TensorDescriptor):
            value = value.base  # a TMA kernel's operand: the tensor it describes
        if not isinstance(value, torch.Tensor):
            continue
        if arg in replaced:
            total += replaced[arg]
            continue
        key = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if key not in seen:
            seen.add(key)
            total += _distinct_bytes(value)
    return name, total, work.get("flops", 0)


# Triton's autotuner rebuilds its cache key from every argument on every launch (a dict of the
# ~40 arguments, the dtype of each tensor): about a fifth of the host time Triton's Python takes
# for a launch (benches/host_cost.py --launch-path triton). launch_tuned builds that key itself
# and, when the autotuner already holds a configuration for it, launches the kernel directly;
# once it has, the next calls of the same key (_TunedDirect) go straight to the C launcher.
def launch_tuned(tuned, grid, key_values, *args, **kwargs):
    """tuned[grid](*args, **kwargs), the kernel run with the configuration the autotuner would
    pick: its only one, or the one it cached for its key -- ``key_values`` (the values of its
    ``key`` arguments, in order) then the dtype of every tensor argument, as Autotuner.run builds
    it (tensors are passed positionally). A miss (a new key, or a key this function builds
    differently) goes through the autotuner. A triton.heuristics layer under the autotuner is
    evaluated here too, on the key arguments and the meta-parameters (all its functions may
    read; Heuristics.run would first build a dict of every argument). A configuration's
    pre-hook sends the launch through the autotuner, unless the hook says it only sets the block
    shapes of TensorDescriptor arguments (``hook.arguments_only``: gelu_matmul's TMA kernels):
    then it is applied here, the kernel launched through launch(), and the block shapes it set
    kept with the direct entry, which sets them again on a hit instead of calling the hook."""
    direct = _TUNED.get(id(tuned))
    if direct is None or direct.tuned is not tuned:
        direct = _TUNED[id(tuned)] = _TunedDirect(tuned, args, kwargs)
    if DIRECT_LAUNCH and direct.entries and direct.launch(grid, args, kwargs):
        if OBSERVER is not None:
            OBSERVER(*launch_work(tuned, args, kwargs))
        return
    if len(tuned.configs) > 1:
        tune_key = key_values + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        config = tuned.cache.get(tune_key)
    else:
        tune_key, config = None, tuned.configs[0]
    hook = None if config is None else config.pre_hook
    if config is None or (hook is not None and not getattr(hook, "arguments_only", False)):
        if OBSERVER is not None:
            OBSERVER(*launch_work(tuned, args, kwargs))
        searched = tune_key is not None and tune_key not in tuned.cache
        tuned[grid](*args, **kwargs)
        if searched and tune_key in tuned.cache:
            # the autotuner keeps only its latest search's timings: keep each key's here
            timings = getattr(tuned, "configs_timings", None) or {}
            TUNE_TIMINGS.setdefault(id(tuned), {})[tune_key] = {
                c: (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        return
    fn, derived = tuned.fn, {}
    if isinstance(fn, Heuristics):
        meta = {**dict(zip(tuned.keys, key_values)), **kwargs, **config.kwargs}
        derived = {name: value(meta) for name, value in fn.values.items()}
        fn = fn.fn
    meta = {**kwargs, **config.all_kwargs(), **derived}
    key = None
    if hook is not None:  # it only sets TMA descriptors' block shapes (arguments_only), before
        # the launch, as the autotuner would; the direct key is of the arguments as passed
        key = direct.key(args, kwargs) if DIRECT_LAUNCH and isinstance(fn, JITFunction) else None
        hook({**dict(zip(tuned.arg_names, args)), **meta})
    resolved = grid
    if callable(grid):
        try:
            resolved = grid(meta)  # the grids of this package read only meta-parameters
        except KeyError:
            pass  # one that reads an argument: Triton calls it with every argument
    launch(fn, resolved, *args, **meta)
    if DIRECT_LAUNCH and not callable(resolved) and (hook is None or key is not None):
        direct.remember(fn, args, kwargs, meta, tune_key, config, key)


# Triton's own launch of a compiled kernel, JITFunction.run, costs the host more than the rest
# of a fastmae launcher (benches/host_cost.py --launch-path triton) before its C launcher runs:
# it binds and specializes every argument in a generated function, builds its cache key as a
# string, reads three environment knobs, checks the kernel's globals, builds the launch metadata
# and hands the C launcher two hook chains to call, empty or not. launch() keeps, per kernel,
# the compiled kernels Triton returned, under a key that holds everything Triton's
# specialization reads -- each tensor's dtype and address mod 16, each other argument's type and
# value (a float's type only), the constexprs and the options -- so that a hit is the kernel
# Triton would itself have looked up, handed to its C launcher with the same arguments
# (tests/_launch_check.py compares the two on every launch of training steps). A miss, a launch
# hook or pre-run hook being set, a callable grid, or an argument pattern the kernel's key
# function does not fit goes through JITFunction.run. Taken as fixed for the process, as
# fastmae never changes them: Triton's environment knobs (TRITON_DEBUG, ...) and the globals a
# kernel reads. FASTMAE_TRITON_LAUNCH=triton (read at import) sends every launch through
# Triton's own path.
DIRECT_LAUNCH = os.environ.get("FASTMAE_TRITON_LAUNCH", "direct").strip().lower() != "triton"
_DIRECT = {}  # id(JITFunction) -> _DirectLaunch
_TUNED = {}  # id(Autotuner) -> _TunedDirect
# id(Autotuner) -> {its cache key: {Config: median ms}}: each search's timings, as the autotuner
# measured them (its configs_timings holds the latest search's only); empty where it searched
# nothing (one configuration kept) or found its choice in Triton's on-disk autotune cache
TUNE_TIMINGS = {}
_KEY_TYPES = (bool, int, float, str, type(None), torch.dtype, type)
_MAX_KERNELS = 256  # per kernel; past it, new keys are launched by Triton without being kept


def launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs) for a Triton kernel, through fastmae's direct path when
    ``fn`` is a compiled JITFunction (not under the interpreter) and DIRECT_LAUNCH is on.
    ``grid`` is a tuple of 1 to 3 ints."""
    if OBSERVER is not None:
        OBSERVER(*launch_work(fn, args, kwargs))
    direct = _DIRECT.get(id(fn))
    if direct is None or direct.fn is not fn:
        if not isinstance(fn, JITFunction):
            fn[grid](*args, **kwargs)
            return
        direct = _DIRECT[id(fn)] = _DirectLaunch(fn, args, kwargs)
    if DIRECT_LAUNCH:
        direct(grid, args, kwargs)
    else:
        fn[grid](*args, **kwargs)


def _key_function(args, keywords, passed_keywords=None):
    """The generated ``bind(device, *args, **{keyword: value})`` of _DirectLaunch (see there):
    the key of a call, and with ``passed_keywords`` (names, in the kernel's parameter order) also
    the C launcher's kernel arguments: the positional ones, then those keywords' values. None
    where a keyword would clash with a generated name."""
    positional = [f"_a{i}" for i in range(len(args))]
    if {"_device", *positional} & set(keywords):
        return None
    key = ["_device"]
    for name, a in zip(positional, args):
        if isinstance(a, torch.Tensor):
            key += [f"{name}.dtype", f"{name}.data_ptr() & 15"]
        elif isinstance(a, TensorDescriptor):  # Triton specializes on its dtype and block shape
            key += [f"{name}.base.dtype", f"str({name}.block_shape)", f"{name}.padding"]
        elif isinstance(a, float):  # any float is one fp32 argument; an int is specialized
            key += [f"{name}.__class__", f"None if {name}.__class__ is float else {name}"]
        else:
            key += [f"{name}.__class__", name]
    key += [part for name in keywords for part in (f"{name}.__class__", name)]
    signature = ", ".join(["_device", *positional, *(["*"] if keywords else []), *keywords])
    returned = f"({', '.join(key)},)"
    if passed_keywords is not None:
        returned += f", ({''.join(a + ', ' for a in positional + list(passed_keywords))})"
    namespace = {}
    exec(f"def bind({signature}):\n    return {returned}\n", namespace)  # noqa: S102
    return namespace["bind"]


def _hooked(hook):
    """Whether a launch hook is set: a triton HookChain with calls in it, or any other callable."""
    return bool(getattr(hook, "calls", hook))


def _hooks_set(fn):
    """Whether ``fn`` has a pre-run hook or Triton a launch hook: then Triton's own path runs."""
    runtime = knobs.runtime
    return bool(fn.pre_run_hooks or _hooked(runtime.launch_enter_hook)
                or _hooked(runtime.launch_exit_hook))


def _run_compiled(kernel, grid, stream, kernel_args):
    """Triton's C launcher on ``kernel`` = (launcher, function, packed metadata), as
    JITFunction.run calls it, without launch metadata or hooks."""
    run, function, metadata = kernel
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, metadata,
        None, None, None, *kernel_args)


class _DirectLaunch:
    """The kernels of one JITFunction that Triton compiled, by fastmae's key, and the generated
    function that builds the key and the C launcher's argument tuple of a call.

    The key function is generated on the first call from the kind of each argument then: a
    tensor's part of the key is its dtype and its address mod 16 (Triton specializes on 16-byte
    alignment), any other argument's its type and value (Triton specializes an int on == 1,
    divisibility by 16 and the 32/64-bit range, a bool apart from an int), except a float's,
    whose value is left out (Triton passes any float as one unspecialized fp32); keyword
    arguments (the constexprs, then the options such as num_warps) likewise. A later
    call of another pattern either fails in the key function (a tensor's attribute missing, a
    keyword missing or extra) or gives a key that cannot be kept (a tensor where a value was):
    both go through Triton."""

    def __init__(self, fn, args, kwargs):
        self.fn = fn
        self.kernels = {}
        self.misses = 0  # launches that went through JITFunction.run (for tests and reports)
        self.bind = self._make_bind(fn, args, kwargs)

    @staticmethod
    def _make_bind(fn, args, kwargs):
        names = [p.name for p in fn.params]
        n = len(args)
        rest = names[n:]  # passed by keyword: the constexprs
        if (n > len(names) or any(name in kwargs for name in names[:n])
                or any(name not in kwargs for name in rest)):
            return None  # defaults or keyword-passed leading arguments: Triton's path only
        options = [k for k in kwargs if k not in rest]  # num_warps, num_stages, ...
        return _key_function(args, rest + options, rest)

    def __call__(self, grid, args, kwargs):
        fn = self.fn
        if self.bind is None or callable(grid) or _hooks_set(fn):
            self.misses += 1
            fn[grid](*args, **kwargs)
            return
        active = driver.active
        device = active.get_current_device()
        try:
            key, kernel_args = self.bind(device, *args, **kwargs)
            entry = self.kernels.get(key)
        except (AttributeError, TypeError):  # another argument pattern, or an unhashable one
            key = entry = None
        if entry is None:
            self.misses += 1
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if (key is not None and kernel is not None and len(self.kernels) < _MAX_KERNELS
                    and all(isinstance(k, _KEY_TYPES) for k in key)):
                self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata)
            return
        _run_compiled(entry, grid, active.get_current_stream(device), kernel_args)


class _TunedDirect:
    """An autotuned kernel's direct launches, by a key of the launch_tuned call (its arguments
    and keyword arguments, keyed as _DirectLaunch keys them, so the autotuner's own key, the key
    arguments' values and the tensors' dtypes, is part of it): the configuration the autotuner
    had chosen for it, the meta-parameters the grid is computed from, and the compiled kernel
    with its constexpr arguments. A hit is launched only while the autotuner still holds that
    configuration for that key (its cache cleared or its configurations replaced, as tests do:
    through launch_tuned's full path again)."""

    def __init__(self, tuned, args, kwargs):
        self.tuned = tuned
        self.entries = {}
        self.bind = _key_function(args, list(kwargs))

    def key(self, args, kwargs):
        """The direct key of a launch_tuned call, or None where it has none."""
        if self.bind is None:
            return None
        try:
            return self.bind(driver.active.get_current_device(), *args, **kwargs)
        except (AttributeError, TypeError):
            return None

    def launch(self, grid, args, kwargs):
        """Launch the call directly and return True, or return False where it cannot be."""
        if self.bind is None:
            return False
        active = driver.active
        device = active.get_current_device()
        try:
            entry = self.entries.get(self.bind(device, *args, **kwargs))
        except (AttributeError, TypeError):
            return False
        if entry is None:
            return False
        kernel, tail, meta, fn, tune_key, config, configs, shapes = entry
        tuned = self.tuned
        if (tuned.configs is not configs or _hooks_set(fn)
                or (configs[0] if tune_key is None else tuned.cache.get(tune_key)) is not config):
            return False
        if callable(grid):
            try:
                grid = grid(meta)
            except KeyError:  # a grid that reads an argument: the full path
                return False
        for i, shape in shapes:  # what the configuration's arguments-only pre-hook set
            args[i].block_shape = shape
        _run_compiled(kernel, grid, active.get_current_stream(device), args + tail)
        return True

    def remember(self, fn, args, kwargs, meta, tune_key, config, key=None):
        """After launch_tuned launched ``fn`` with ``args`` and ``meta`` (the configuration's
        and heuristics' values added to ``kwargs``): keep the kernel that launch compiled, and
        the block shapes of the TensorDescriptor arguments, which an arguments-only pre-hook
        may have set (``key``: the call's key taken before it did)."""
        inner = _DIRECT.get(id(fn))
        if (self.bind is None or len(self.entries) >= _MAX_KERNELS or inner is None
                or inner.fn is not fn or inner.bind is None):
            return
        device = driver.active.get_current_device()
        try:
            if key is None:
                key = self.bind(device, *args, **kwargs)
            inner_key, kernel_args = inner.bind(device, *args, **meta)
            kernel = inner.kernels.get(inner_key)
        except (AttributeError, TypeError):
            return
        if kernel is not None and all(isinstance(k, _KEY_TYPES) for k in key):
            shapes = tuple((i, a.block_shape) for i, a in enumerate(args)
                           if isinstance(a, TensorDescriptor))
            self.entries[key] = (kernel, kernel_args[len(args):], meta, fn, tune_key, config,
                                 self.tuned.configs, shapes)


# What keep_faster measured, for reports: (forced_env, key) -> {name: ms, or None if it raised}
TIMINGS = {}


def keep_faster(choices, key, forced_env, runs, default, timed=None):
    """The name of the fastest of ``runs`` ({name: zero-argument callable doing the whole
    computation one way}) for ``key``, whose last item is the device: each is timed on the
    first call of a key on a CUDA device and the winner is kept in ``choices`` (a dict). Only the
    names in ``timed`` (default: all) are timed -- the others run only when forced: the
    environment variable ``forced_env`` (one of the names in ``runs``) forces one. The
    interpreter, CPU devices and a call during CUDA-graph capture (nothing may be timed then) get
    ``default`` without timing. A way that raises while it is timed is not kept (a warning says
    why), as long as another one runs."""
    forced = os.environ.get(forced_env, "").strip().lower()
    if forced:
        if forced not in runs:
            raise ValueError(f"{forced_env} must be one of {tuple(runs)}, got {forced!r}")
        return forced
    choice = choices.get(key)
    if choice is not None:
        return choice
    if interpreting() or key[-1].type != "cuda" or torch.cuda.is_current_stream_capturing():
        return default
    from triton.testing import do_bench
    times, errors = {}, {}
    for name, run in runs.items():
        if timed is not None and name not in timed:
            continue
        try:
            times[name] = do_bench(run, warmup=5, rep=20)
        except Exception as exc:  # noqa: BLE001 -- the other way is kept; re-raised if none runs
            errors[name] = exc
    if not times:
        raise next(iter(errors.values()))
    TIMINGS[(forced_env, key)] = {name: times.get(name) for name in runs
                                  if timed is None or name in timed}
    for name, exc in errors.items():
        warnings.warn(f"{forced_env}: the {name!r} way failed on {key[:-1]} and is not used: "
                      f"{type(exc).__name__}: {exc}")
    choices[key] = min(times, key=times.get)
    return choices[key]
