"""Count host synchronisations: the calls that make the CPU wait for the GPU to finish its queue.

    with host_syncs() as syncs:
        one_training_step()
    assert syncs == [], syncs      # each entry: "file.py:line what"

A GPU is not needed: on the CPU every call that WOULD wait on a GPU tensor is recorded
(.item(), .tolist(), .nonzero(), bool(tensor) as in `if tensor:`, int()/float() of a tensor,
indexing with a bool mask or a 0-d tensor, .cpu(), .numpy(), .to() a cpu target, torch.equal,
unique, masked_select).
On a CUDA device torch's own detector (torch.cuda.set_sync_debug_mode) is switched on as well and
its warnings are added. Not visible on the CPU: a blocking host-to-device copy (`.to(device)` of a
CPU tensor), since every tensor already lives on the CPU there.
"""
import contextlib
import os
import sys
import threading
import warnings

import torch

_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_state = threading.local()


def _call_site():
    """file:line of the innermost caller outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _is_cpu_target(args, kwargs):
    targets = list(args[:1]) + [kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu"
               for t in targets)


def _index_syncs(index):
    """Indexing that needs a value on the host: a bool mask (its size) or a 0-d integer tensor."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and (p.dtype == torch.bool or p.dim() == 0)
               for p in parts)


def _patched(owner, name, syncs, label, when=None):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not getattr(_state, "inside", False) and (when is None or when(*args, **kwargs)):
            syncs.append(f"{_call_site()} {label}")
        _state.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            _state.inside = False
    return original, wrapper


@contextlib.contextmanager
def host_syncs():
    """Context manager yielding the list of host-synchronising call sites met inside it."""
    syncs = []
    T = torch.Tensor
    rules = [
        (T, "item", ".item()", None), (T, "tolist", ".tolist()", None),
        (T, "nonzero", ".nonzero()", None), (torch, "nonzero", "torch.nonzero", None),
        (T, "__bool__", "bool(tensor)", None), (T, "__int__", "int(tensor)", None),
        (T, "__float__", "float(tensor)", None), (T, "cpu", ".cpu()", None),
        (T, "numpy", ".numpy()", None), (torch, "equal", "torch.equal", None),
        (T, "unique", ".unique()", None), (torch, "unique", "torch.unique", None),
        (T, "masked_select", ".masked_select()", None),
        (torch, "masked_select", "torch.masked_select", None),
        # a blocking copy to the host; non_blocking=True copies (the loader's batch to the training
        # device, which is the CPU in these tests) do not wait
        (T, "to", ".to(cpu)", lambda self, *a, **kw: _is_cpu_target(a, kw)
         and not kw.get("non_blocking", False)),
        (T, "__getitem__", "indexing with a bool mask or 0-d tensor",
         lambda self, index: _index_syncs(index)),
        (T, "__setitem__", "assignment at a bool mask or 0-d tensor",
         lambda self, index, value: _index_syncs(index)),
    ]
    originals = []
    for owner, name, label, when in rules:
        original, wrapper = _patched(owner, name, syncs, label, when)
        originals.append((owner, name, original))
        setattr(owner, name, wrapper)
    cuda_mode = torch.cuda.is_available() and torch.cuda.get_sync_debug_mode()
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield syncs
        for w in caught:  # torch's detector warns "called a synchronizing CUDA operation"
            if "synchroniz" in str(w.message):
                syncs.append(f"{os.path.basename(w.filename)}:{w.lineno} cuda: {w.message}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(cuda_mode)
