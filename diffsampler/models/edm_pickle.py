"""Load NVlabs EDM network snapshots (``network-snapshot-*.pkl``) without EDM's repository.

The file format
---------------
A snapshot is an ordinary Python pickle of a dict, typically
``{'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}``.  EDM's classes are
"persistent": each instance is pickled with the source code of the module that defines its class,
so the file does not depend on the code that wrote it.  In the pickle stream a persistent object is
a call (``STACK_GLOBAL`` + ``REDUCE``) of

    torch_utils.persistence._reconstruct_persistent_obj(meta)

with a single dict argument ``meta`` whose keys are, in this order:

    'type'        'class' (the only kind EDM writes)
    'version'     6 (EDM's format version; :data:`FORMAT_VERSION`)
    'module_src'  the full source of the defining module, as a string
    'class_name'  the class's name in that module
    'state'       the object's state (for a torch module: its ``__dict__`` copy, with parameters,
                  buffers and submodules; nested persistent objects appear as nested calls).
                  EDM also keeps the constructor arguments here, as ``_init_args`` / ``_init_kwargs``.

Rebuilding an object means: execute ``module_src`` into a fresh module, take the class named
``class_name``, make an instance without calling ``__init__`` and give it ``state``.  Executing the
source is running code from the file, which is why :func:`load_edm_snapshot` wants ``trust=True``.

The executed sources import ``torch_utils.persistence`` (for the ``persistent_class`` decorator),
sometimes ``torch_utils.misc``, and the pickle may refer to ``dnnlib.util.EasyDict``.  While a
snapshot is being read, this module puts small stand-ins for those modules into ``sys.modules`` and
removes them (restoring whatever was there) afterwards.  They are written here from the format
description above; no EDM code is used.  Tensors inside the state are pickled by torch itself
(plain pickle, no ``torch.save`` zip); storages are mapped to the CPU while loading.
"""
from __future__ import annotations

import contextlib
import io
import math
import pickle
import sys
import threading
import types
import uuid
import weakref
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from .base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, NetworkDenoiser

FORMAT_VERSION = 6
RECONSTRUCT_MODULE = "torch_utils.persistence"
RECONSTRUCT_NAME = "_reconstruct_persistent_obj"
META_KEYS = ("type", "version", "module_src", "class_name", "state")
SOURCE_MODULE_PREFIX = "_diffsampler_edm_source_"

PathLike = Union[str, Path]


class EDMSnapshotError(ValueError):
    """A file is not a loadable EDM network snapshot (the message names the file and the reason)."""


class UntrustedPickleError(EDMSnapshotError):
    """Refusal to unpickle a snapshot without explicit trust (unpickling runs code from the file)."""


# ------------------------------------------------------------------------------------------------
# The stand-in modules: torch_utils (persistence, misc) and dnnlib (util.EasyDict)
# ------------------------------------------------------------------------------------------------

class EasyDict(dict):
    """A dict whose items are also attributes (the role of ``dnnlib.EasyDict``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# Pickles name it dnnlib.util.EasyDict; so does ours when the writer pickles one under the shims.
EasyDict.__module__ = "dnnlib.util"

# Classes marked persistent (by the decorator, while their source was executed) -> that source.
# A class decorated in an ordinary module maps to None: its source is looked up when pickled.
_PERSISTENT: "weakref.WeakKeyDictionary[type, Optional[str]]" = weakref.WeakKeyDictionary()


def persistent_class(cls):
    """The decorator pickled sources apply to their classes: marks ``cls`` persistent, returns it.

    Unlike EDM's, it does not wrap the class; the test writer (tests/edm_snapshot_format.py) finds the
    marked classes and pickles their instances in the persistent format.
    """
    if not isinstance(cls, type):
        raise TypeError(f"persistent_class decorates classes, got {type(cls).__name__}")
    session = _SESSION
    _PERSISTENT[cls] = session.source_of_module(cls.__module__) if session is not None else None
    return cls


def is_persistent(obj) -> bool:
    """Whether a class (or the class of an object) is marked persistent."""
    cls = obj if isinstance(obj, type) else type(obj)
    try:
        return cls in _PERSISTENT
    except TypeError:
        return False


def _reconstruct_persistent_obj(meta):
    """What the pickle stream calls for every persistent object (see the module docstring)."""
    if _SESSION is None:
        raise EDMSnapshotError("EDM persistent objects can only be rebuilt through "
                               "diffsampler.models.edm_pickle.load_edm_pickle")
    return _SESSION.rebuild(meta)


# The pickle stream names it torch_utils.persistence._reconstruct_persistent_obj.
_reconstruct_persistent_obj.__module__ = RECONSTRUCT_MODULE


def assert_shape(tensor: torch.Tensor, ref_shape) -> None:
    """Raise AssertionError unless ``tensor`` has ``len(ref_shape)`` dims matching ``ref_shape``
    (``None`` entries match any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"tensor has {tensor.ndim} dimensions, expected {len(ref_shape)}")
    for dim, (size, want) in enumerate(zip(tensor.shape, ref_shape)):
        if want is not None and size != want:
            raise AssertionError(f"tensor has size {size} in dimension {dim}, expected {want}")


def constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """A tensor holding ``value`` (broadcast to ``shape`` if given)."""
    out = torch.as_tensor(value, dtype=dtype, device=device)
    if shape is not None:
        out = torch.broadcast_to(out, tuple(shape))
    if memory_format is not None:
        out = out.contiguous(memory_format=memory_format)
    return out


def const_like(ref: torch.Tensor, value, shape=None, dtype=None, device=None, memory_format=None):
    """:func:`constant` with ``ref``'s dtype and device unless given."""
    return constant(value, shape, dtype if dtype is not None else ref.dtype,
                    device if device is not None else ref.device, memory_format)


def _make_shims() -> Dict[str, types.ModuleType]:
    def module(name, doc, package=False, **attrs):
        mod = types.ModuleType(name, doc)
        if package:
            mod.__path__ = []          # a package, with no submodules beyond the ones set here
        mod.__dict__.update(attrs)
        return mod

    note = " (diffsampler stand-in, present only while an EDM snapshot is being read)"
    persistence = module(RECONSTRUCT_MODULE, "Persistent classes" + note, persistent_class=persistent_class,
                         is_persistent=is_persistent, **{RECONSTRUCT_NAME: _reconstruct_persistent_obj})
    misc = module("torch_utils.misc", "Tensor helpers" + note, assert_shape=assert_shape, constant=constant,
                  const_like=const_like)
    torch_utils = module("torch_utils", "EDM's torch_utils" + note, package=True,
                         persistence=persistence, misc=misc)
    util = module("dnnlib.util", "EDM's dnnlib.util" + note, EasyDict=EasyDict)
    dnnlib = module("dnnlib", "EDM's dnnlib" + note, package=True, util=util, EasyDict=EasyDict)
    return {m.__name__: m for m in (torch_utils, persistence, misc, dnnlib, util)}


SHIMS = _make_shims()


# ------------------------------------------------------------------------------------------------
# A load (or write) session: shims installed, sources executed once per session
# ------------------------------------------------------------------------------------------------

class _Unrebuilt:
    """Stands where a persistent object could not be rebuilt (its source failed to run).

    Other entries of a snapshot (``loss_fn``, ``augment_pipe``) may need modules we do not provide;
    that must not stop the network from loading.  Asking for such an entry raises the error.
    """

    def __init__(self, class_name: str, error: BaseException):
        self.class_name, self.error = class_name, error

    def __repr__(self) -> str:
        return f"<unrebuilt {self.class_name}: {type(self.error).__name__}: {self.error}>"


class _Session:
    def __init__(self):
        self.modules: Dict[str, types.ModuleType] = {}      # source -> executed module
        self.failed: Dict[str, BaseException] = {}          # source -> why it did not execute
        self.sources: Dict[str, str] = {}                   # module name -> source

    def source_of_module(self, name: str) -> Optional[str]:
        return self.sources.get(name)

    def module_for(self, source: str, label: str) -> types.ModuleType:
        """Execute ``source`` into a fresh module (once per session and source)."""
        if source in self.failed:
            raise self.failed[source]
        module = self.modules.get(source)
        if module is None:
            name = SOURCE_MODULE_PREFIX + uuid.uuid4().hex
            module = types.ModuleType(name)
            self.modules[source] = module
            self.sources[name] = source
            sys.modules[name] = module     # some code (dataclasses, typing) looks its module up
            try:
                exec(compile(source, f"<pickled source of {label}>", "exec"), module.__dict__)
            except Exception as err:       # noqa: BLE001 - kept and reported when the object is asked for
                self.failed[source] = err
                raise
        return module

    def rebuild(self, meta):
        if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise EDMSnapshotError(f"malformed persistent-object record (expected keys {list(META_KEYS)}, got {got})")
        if meta["type"] != "class":
            raise EDMSnapshotError(f"unsupported persistent object type {meta['type']!r} (only 'class' is known)")
        if meta["version"] != FORMAT_VERSION:
            raise EDMSnapshotError(f"persistence format version {meta['version']!r}; this loader reads "
                                   f"version {FORMAT_VERSION}")
        name = meta["class_name"]
        try:
            module = self.module_for(meta["module_src"], name)
            if not isinstance(module.__dict__.get(name), type):
                raise LookupError(f"the pickled source defines no class {name!r}")
        except Exception as err:  # noqa: BLE001
            return _Unrebuilt(name, err)
        cls = module.__dict__[name]
        obj = cls.__new__(cls)
        state = EasyDict(meta["state"] or {})
        setstate = getattr(obj, "__setstate__", None)
        if callable(setstate):
            setstate(state)
        else:
            obj.__dict__.update(state)
        return obj

    def close(self) -> None:
        for name in self.sources:
            sys.modules.pop(name, None)


_LOCK = threading.RLock()
_SESSION: Optional[_Session] = None


@contextlib.contextmanager
def edm_shims() -> Iterator[_Session]:
    """Install the stand-in ``torch_utils`` / ``dnnlib`` modules for the duration of the block.

    Whatever those names held before (nothing, or a real EDM checkout) is put back afterwards, as
    are the modules the block executed sources into.  Re-entrant; one session at a time.
    """
    global _SESSION
    with _LOCK:
        if _SESSION is not None:          # nested: share the outer session
            yield _SESSION
            return
        saved = {name: sys.modules.get(name) for name in SHIMS}
        sys.modules.update(SHIMS)
        _SESSION = session = _Session()
        try:
            yield session
        finally:
            _SESSION = None
            session.close()
            for name, previous in saved.items():
                if previous is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous


# ------------------------------------------------------------------------------------------------
# Reading a snapshot
# ------------------------------------------------------------------------------------------------

def _storage_from_bytes(data: bytes):
    """torch's own unpickler for a storage, mapped to the CPU (snapshots saved on a GPU load anywhere)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class _SnapshotUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as err:
            raise EDMSnapshotError(f"the snapshot refers to {module}.{name}, which is not available here "
                                   f"({type(err).__name__}: {err}); only EDM's persistent classes (which carry "
                                   "their source) and torch objects can be loaded without EDM's repository") from err


def _check_header(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"EDM snapshot {path} does not exist")
    if not path.is_file():
        raise EDMSnapshotError(f"{path} is not a file (expected an EDM network-snapshot .pkl)")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        raise EDMSnapshotError(f"{path} is a zip archive (a torch.save checkpoint?), not an EDM network-snapshot "
                               "pickle")
    if len(head) < 2 or head[0] != pickle.PROTO[0] or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        raise EDMSnapshotError(f"{path} is not a pickle file (EDM network snapshots are pickles, protocol >= 2)")


def load_edm_pickle(path: PathLike, trust: bool = False):
    """Unpickle an EDM snapshot file (whatever it holds, usually a dict) with the stand-in modules.

    Executes the class sources stored in the file: needs ``trust=True``.  Entries whose source cannot
    run here come back as placeholders; :func:`load_edm_snapshot` reports them if asked for.
    """
    path = Path(path)
    _check_header(path)
    if not trust:
        raise UntrustedPickleError(
            f"refusing to load {path} without trust: an EDM snapshot is a Python pickle that carries the "
            "source code of its network classes, and unpickling it executes that code (and can run anything "
            "else the file asks for). Only load files from a source you trust, then pass trust=True "
            "(load_edm_snapshot / load_model(..., trust_pickle=True)) or --trust-pickle on the command line.")
    with open(path, "rb") as f, edm_shims():
        try:
            return _SnapshotUnpickler(f).load()
        except EDMSnapshotError as err:
            raise EDMSnapshotError(f"{path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
            raise EDMSnapshotError(f"{path} could not be unpickled (corrupt or truncated file?): "
                                   f"{type(err).__name__}: {err}") from err


def _find_unrebuilt(obj) -> Optional[_Unrebuilt]:
    """The first placeholder inside a rebuilt network (its attributes, submodules, containers)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _Unrebuilt):
            return item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, torch.nn.Module):
            stack.append(item.__dict__)
    return None


def load_edm_snapshot(path: PathLike, trust: bool = False, key: str = "ema", device="cpu") -> "EDMNetworkDenoiser":
    """The network stored under ``key`` in an EDM snapshot, as a :class:`Denoiser`.

    ``trust=True`` is required: loading executes code stored in the file (see
    :func:`load_edm_pickle`).  The network is put in eval mode, without gradients, on ``device``.
    """
    path = Path(path)
    data = load_edm_pickle(path, trust=trust)
    if not isinstance(data, dict):
        raise EDMSnapshotError(f"{path} holds a {type(data).__name__}, not an EDM network snapshot "
                               f"(a pickled dict with the network under {key!r})")
    if key not in data:
        raise EDMSnapshotError(f"{path} has no {key!r} entry (keys: {', '.join(map(repr, data))}); "
                               "EDM network snapshots keep the network under 'ema'")
    net = data[key]
    broken = _find_unrebuilt(net)
    if broken is not None:
        raise EDMSnapshotError(f"{path}: the class {broken.class_name} in {key!r} could not be rebuilt from its "
                               f"pickled source: {type(broken.error).__name__}: {broken.error}") from broken.error
    if not isinstance(net, torch.nn.Module):
        raise EDMSnapshotError(f"{path}: {key!r} is a {type(net).__name__}, not a torch network")
    missing = [a for a in ("img_resolution", "img_channels") if not hasattr(net, a)]
    if missing:
        raise EDMSnapshotError(f"{path}: {key!r} ({type(net).__name__}) is not an EDM preconditioned network "
                               f"(it has no {', '.join(missing)})")
    net = net.eval().requires_grad_(False).to(device)
    return EDMNetworkDenoiser(net, name=f"{path}[{key!r}]")


# ------------------------------------------------------------------------------------------------
# The denoiser
# ------------------------------------------------------------------------------------------------

class EDMNetworkDenoiser(NetworkDenoiser):
    """An EDM preconditioned network (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``, ...) as a Denoiser.

    Such a network already is ``D(x, sigma, class_labels) -> x0`` in the VE parametrization (it
    applies c_skip / c_out / c_in / c_noise itself), so this only adapts the call:

    * ``shape = (img_channels, img_resolution, img_resolution)``, ``num_classes = label_dim``;
    * class labels are one-hot rows ``(batch, label_dim)`` through cond ``class_labels``; an all-zero
      row (or no labels) is unconditional; integer labels ``(batch,)`` are one-hot encoded;
    * the sigma range is the network's own intersected with EDM's sampling range [0.002, 80], as
      EDM's sampler does (``EDMPrecond`` declares [0, inf), ``VEPrecond`` [0.02, 100]).

    The network chooses its compute dtype itself (EDM's cast to float32, or float16 with
    ``use_fp16`` on CUDA); the result is returned in ``x``'s dtype.
    """

    def __init__(self, net: torch.nn.Module, name: Optional[str] = None):
        self.net = net
        self.name = name or type(net).__name__
        res = int(net.img_resolution)
        self.shape: Tuple[int, ...] = (int(net.img_channels), res, res)
        self.num_classes = int(getattr(net, "label_dim", 0) or 0)
        net_min = float(getattr(net, "sigma_min", 0.0) or 0.0)
        net_max = float(getattr(net, "sigma_max", math.inf) or math.inf)
        self.sigma_min = max(EDM_SIGMA_MIN, net_min)
        self.sigma_max = min(EDM_SIGMA_MAX, net_max)
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))

    def _labels(self, class_labels, batch: int, device) -> Optional[torch.Tensor]:
        if self.num_classes <= 0:
            if class_labels is not None and torch.as_tensor(class_labels).abs().sum() > 0:
                raise ValueError("this EDM network is unconditional; class_labels must be None or zeros")
            return None
        if class_labels is None:
            return torch.zeros(batch, self.num_classes, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.ndim == 1 and not labels.is_floating_point():
            labels = torch.nn.functional.one_hot(labels.long(), self.num_classes).to(torch.float32)
        if labels.ndim == 2 and labels.shape[0] == 1 and batch > 1:
            labels = labels.expand(batch, -1)
        if tuple(labels.shape) != (batch, self.num_classes):
            raise ValueError(f"class_labels must be one-hot rows of shape ({batch}, {self.num_classes}) "
                             f"(or integer classes of shape ({batch},)), got {tuple(labels.shape)}")
        return labels

    def denoise(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"unexpected conditioning keywords {sorted(cond)}; EDM networks take only class_labels")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.to(x.dtype if x.is_floating_point() else torch.float32)
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1 and batch > 1:
            sigma = sigma.expand(batch)
        if sigma.shape[0] != batch:
            raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        out = self.net(x, sigma, class_labels=self._labels(class_labels, batch, x.device))
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return (f"EDMNetworkDenoiser({self.name}, {type(self.net).__name__}, shape={self.shape}, "
                f"num_classes={self.num_classes}, sigma=[{self.sigma_min}, {self.sigma_max}])")
