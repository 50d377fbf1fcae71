"""The host side of the LAMMPS-bundle check (:mod:`geodite_jax.lammps_emulation`): lammps-jax's XLA CPU PJRT
plugin registered with JAX, a small FFI handler that serves the bundle's ``lammps_jax.forward_comm`` /
``reverse_comm`` custom calls (compiled here with g++ against jaxlib's XLA FFI headers), and MPI through ctypes.

Relies on interfaces that are not public API: the PJRT FFI extension's struct layout (extension type 5,
platform ``"Host"``), ``jax._src.xla_bridge.register_plugin`` / ``backends_are_initialized``, and MPICH's
integer handles; a jax or plugin upgrade may need this module updated.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from .native import build_ffi_library

PLUGIN_NAME = "lammps_jax_cpu"


_SHIM_SOURCE = r"""
// FFI handlers for lammps_jax.forward_comm / reverse_comm on the XLA CPU PJRT plugin; each call hands the
// [rows, width] feature matrix to a callback set from Python, which performs the exchange in place.
#include <dlfcn.h>
#include <cstdint>
#include <cstring>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

extern "C" {
typedef int (*geodite_exchange_fn)(int forward, int itemsize, void *rows, int64_t n_rows, int64_t width);
static geodite_exchange_fn exchange_callback = nullptr;
void geodite_set_exchange(geodite_exchange_fn fn) { exchange_callback = fn; }
}

static ffi::Error serve(bool forward, ffi::AnyBuffer x, ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Result<ffi::AnyBuffer> token_out) {
  if (x.untyped_data() != y->untyped_data()) std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  if (token.untyped_data() != token_out->untyped_data())
    std::memcpy(token_out->untyped_data(), token.untyped_data(), token.size_bytes());
  auto dims = x.dimensions();
  int itemsize = x.element_type() == ffi::DataType::F32 ? 4 : x.element_type() == ffi::DataType::F64 ? 8 : 0;
  if (itemsize == 0 || dims.size() != 2)
    return ffi::Error::InvalidArgument("exchange needs a [rows, width] float matrix");
  if (exchange_callback == nullptr) return ffi::Error::Internal("no exchange callback set");
  if (exchange_callback(forward ? 1 : 0, itemsize, y->untyped_data(), dims[0], dims[1]) != 0)
    return ffi::Error::Internal("exchange callback failed");
  return ffi::Error::Success();
}
static ffi::Error forward_comm(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::Result<ffi::AnyBuffer> y,
                               ffi::Result<ffi::AnyBuffer> to) { return serve(true, x, t, y, to); }
static ffi::Error reverse_comm(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::Result<ffi::AnyBuffer> y,
                               ffi::Result<ffi::AnyBuffer> to) { return serve(false, x, t, y, to); }
XLA_FFI_DEFINE_HANDLER(kForward, forward_comm, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                       .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER(kReverse, reverse_comm, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                       .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// The few PJRT C API layouts needed (xla/pjrt/c/pjrt_c_api.h, pjrt_c_api_ffi_extension.h).
struct ExtensionBase { size_t struct_size; int type; ExtensionBase *next; };
struct RegisterHandlerArgs { size_t struct_size; const char *target_name; size_t target_name_size; void *handler;
                             const char *platform_name; size_t platform_name_size; int traits; };
struct FfiExtension { ExtensionBase base; void *type_register; void *user_data_add;
                      void *(*register_handler)(RegisterHandlerArgs *); };
static const int kFfiExtensionType = 5;

extern "C" int geodite_register_handlers(const char *plugin_path) {
  void *lib = dlopen(plugin_path, RTLD_NOW | RTLD_GLOBAL);
  if (lib == nullptr) return 1;
  auto get_api = reinterpret_cast<const char *(*)()>(dlsym(lib, "GetPjrtApi"));
  if (get_api == nullptr) return 2;
  const char *api = get_api();
  ExtensionBase *ext = *reinterpret_cast<ExtensionBase *const *>(api + sizeof(size_t));
  while (ext != nullptr && ext->type != kFfiExtensionType) ext = ext->next;
  if (ext == nullptr || ext->struct_size < sizeof(FfiExtension)) return 3;
  auto *ffi_ext = reinterpret_cast<FfiExtension *>(ext);
  const char *names[2] = {"lammps_jax.forward_comm", "lammps_jax.reverse_comm"};
  void *handlers[2] = {reinterpret_cast<void *>(kForward), reinterpret_cast<void *>(kReverse)};
  for (int k = 0; k < 2; ++k) {
    RegisterHandlerArgs args{sizeof(RegisterHandlerArgs), names[k], std::strlen(names[k]), handlers[k], "Host", 4, 0};
    if (ffi_ext->register_handler(&args) != nullptr) return 4 + k;
  }
  return 0;
}
"""

EXCHANGE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_int64)


def plugin_path() -> Path:
    import lammps_jax_pjrt_cpu

    return Path(lammps_jax_pjrt_cpu.PLUGIN_PATH)


def build_shim(cache: str | os.PathLike | None = None) -> Path:
    """Compile the FFI handler library (once per source and jaxlib version; g++ and jaxlib's headers)."""
    return build_ffi_library("lammps_comm_shim", _SHIM_SOURCE, ["-O2"], "the exchange handlers", libs=("-ldl",),
                             cache=cache)


_state: dict[str, Any] = {}


def register_plugin() -> Any:
    """Register the CPU PJRT plugin with JAX (below the default CPU backend) and the exchange handlers with it.

    Must run before JAX starts any backend. Returns the plugin's client.
    """
    if "client" in _state:
        return _state["client"]
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("register_plugin() must be called before JAX starts a backend (first thing in the process)")
    shim = ctypes.CDLL(str(build_shim()), mode=ctypes.RTLD_GLOBAL)
    xla_bridge.register_plugin(PLUGIN_NAME, priority=-100, library_path=str(plugin_path()))
    code = shim.geodite_register_handlers(str(plugin_path()).encode())
    if code:
        raise RuntimeError(f"registering the exchange handlers with the PJRT plugin failed (code {code})")
    client = xla_bridge.backends()[PLUGIN_NAME]
    _state.update(shim=shim, client=client)
    return client


# ------------------------------------------------------------------------------------------------ MPI
class Mpi:
    """The little MPI this needs, through ctypes on the libmpi LAMMPS uses (MPICH ABI handles)."""

    COMM_WORLD = 0x44000000
    BYTE = 0x4C00010D

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libmpi.so.12", mode=ctypes.RTLD_GLOBAL)
        flag = ctypes.c_int(0)
        self.lib.MPI_Initialized(ctypes.byref(flag))
        if not flag.value:
            raise RuntimeError("MPI is not initialised: create the LAMMPS instance first")
        rank, size = ctypes.c_int(0), ctypes.c_int(0)
        self.lib.MPI_Comm_rank(self.COMM_WORLD, ctypes.byref(rank))
        self.lib.MPI_Comm_size(self.COMM_WORLD, ctypes.byref(size))
        self.rank, self.size = rank.value, size.value

    def allgather(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        n = ctypes.c_int(len(data))
        counts = (ctypes.c_int * self.size)()
        if self.lib.MPI_Allgather(ctypes.byref(n), 4, self.BYTE, counts, 4, self.BYTE, self.COMM_WORLD):
            raise RuntimeError("MPI_Allgather failed")
        displs = (ctypes.c_int * self.size)(*np.concatenate([[0], np.cumsum(list(counts))[:-1]]).astype(int))
        recv = ctypes.create_string_buffer(max(1, sum(counts)))
        send = ctypes.create_string_buffer(data, max(1, len(data)))
        if self.lib.MPI_Allgatherv(send, len(data), self.BYTE, recv, counts, displs, self.BYTE, self.COMM_WORLD):
            raise RuntimeError("MPI_Allgatherv failed")
        raw = recv.raw
        return [raw[d:d + c] for d, c in zip(displs, counts, strict=True)]

    def allgather_arrays(self, *arrays: np.ndarray) -> list[list[np.ndarray]]:
        """For each array given, the list of every rank's copy (shapes may differ in the first axis)."""
        import pickle

        parts = self.allgather(pickle.dumps([np.ascontiguousarray(a) for a in arrays]))
        per_rank = [pickle.loads(p) for p in parts]
        return [[r[k] for r in per_rank] for k in range(len(arrays))]


def set_exchange(callback: Any) -> None:
    """Serve the bundle's exchange custom calls with ``callback`` (an :data:`EXCHANGE_FN`), or none."""
    _state["shim"].geodite_set_exchange(callback if callback is not None else EXCHANGE_FN())
