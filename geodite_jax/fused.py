"""Fused sender-gather contractions for the neighbour-block layout, as XLA:CPU FFI kernels.

Three operations on steerable node arrays ``[N, S, F]`` and per-edge weights ``[E, F]`` in the block layout
(edge ``e`` has receiver ``e // M`` and sender ``senders[e]``); ``X_j`` is the sender's row, never
materialised per edge:

* :func:`gather_sum`  ``A(w, x)[n]  = Σ_{e ∈ block(n)} w_e ⊙ x_{s(e)}``                  ``[N, S, F]``
* :func:`edge_dot`    ``D(g, x)[e]  = Σ_s g_{r(e), s} ⊙ x_{s(e), s}``                      ``[E, F]``
* :func:`scatter_sum` ``T(w, g)[k]  = Σ_{e: s(e) = k} w_e ⊙ g_{r(e)}``                     ``[N, S, F]``

They are the three partial derivatives of one trilinear form ``Σ_e Σ_{s,f} w_ef x_{s(e)sf} g_{r(e)sf}``, so
the VJP of each is made of the other two (``A``: dw = D(u, x), dx = T(w, u); ``D``: dg = A(v, x),
dx = T(v, g); ``T``: dw = D(g, u), dg = A(w, u)) and the family is differentiable to any order: forces
(one VJP) and force training (two) use the same kernels.

Without the kernels XLA forms each ``[E, S, F]`` product in memory and turns every sender gather into a
scatter-add in the backward pass; a kernel keeps one receiver's ``[S, F]`` rows in L1 and reads each
sender row once. The C++ source (``fused_kernels.cc``) is compiled with the system C++ compiler at first use (cached per
source, jaxlib version and CPU, built by :mod:`geodite_jax.native`). Where it cannot be (no compiler,
another platform), :func:`available` is False and the model keeps its pure-XLA path, with the same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import GeoditeConfig
from .native import build_ffi_library

#: The kernels' C++ source (package data), compiled by :func:`build`.
_SOURCE_PATH = Path(__file__).with_name("fused_kernels.cc")

_TARGETS = {"gather_sum": "GeoditeGatherSum", "edge_dot": "GeoditeEdgeDot", "scatter_sum": "GeoditeScatterSum",
            "proj": "GeoditeProj", "proj_dc": "GeoditeProjDc", "proj_dx": "GeoditeProjDx",
            "projected_dot": "GeoditeProjectedDot", "projected_dot_bwd": "GeoditeProjectedDotBwd"}


def _cpu_flags() -> str:
    """The CPU's feature flags: the library is built for this CPU (``-march=native``), so a shared cache
    must not hand it to another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(cache: str | os.PathLike | None = None) -> Path:
    """Compile the kernel library (once per source, jaxlib version and CPU) and return its path."""
    return build_ffi_library("fused_kernels", _SOURCE_PATH.read_text(), ["-O3", "-march=native"],
                             "the fused kernels", libs=("-pthread",), compiler=os.environ.get("CXX", "g++"),
                             key_extra=_cpu_flags(),
                             cache=cache)


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernels are compiled and registered for XLA:CPU, else why not (``GEODITE_FUSED=0``: off)."""
    if os.environ.get("GEODITE_FUSED", "1") == "0":
        return "GEODITE_FUSED=0"
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:  # no compiler, no headers, a failed build
        return str(err).splitlines()[0]
    for symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def available() -> bool:
    """True when the kernels are compiled and registered for XLA:CPU."""
    return unavailable_reason() is None


def enabled() -> bool:
    """Whether the model should use the kernels now: they are :func:`available` and JAX computes on the CPU."""
    return jax.default_backend() == "cpu" and available()


#: Extra memory the fused path may use for its whole-graph edge arrays (kept for the backward pass): the
#: messages keep their sender weights ``[E, F]`` per layer, the edge update its projected inner products
#: ``[E, F_e]`` per refined layer (Geodite-MP: 5.4 KB per edge slot in float32, of which the peak grows by
#: about half, since the chunked path's own temporaries go). Above it the model keeps the chunked XLA path,
#: whose memory grows only with the edge state (see README, "Scale"). The messages come first: most of the
#: gain for a bit more than half the memory. 1 GiB covers MD cells of a few thousand atoms at 6 Å.
FUSED_BUDGET_BYTES = 2**30


def _require() -> None:
    if not available():
        raise RuntimeError(f"the fused kernels are unavailable: {unavailable_reason()}")


def plan(num_edges: int, config: GeoditeConfig, dtype: Any, force: bool = False) -> tuple[bool, bool]:
    """``(fuse the messages, fuse the edge update)`` for a block-layout graph of ``num_edges`` edge slots.

    ``force``: both, or a ``RuntimeError`` naming why the kernels are unavailable.
    """
    if force:
        _require()
        return True, True
    if not enabled():
        return False, False
    size = num_edges * np.dtype(dtype).itemsize
    messages = size * config.num_features * config.num_layers
    edge_update = size * config.edge_features * (config.num_layers - 1)
    return messages <= FUSED_BUDGET_BYTES, messages + edge_update <= FUSED_BUDGET_BYTES


def _ffi(name: str, out: Any, *operands: jax.Array, **attrs: int) -> Any:
    """One kernel call: ``out`` a ``ShapeDtypeStruct`` or a tuple of them; integer attributes as int64."""
    _require()
    attrs = {k: np.int64(v) for k, v in attrs.items()}
    return jax.ffi.ffi_call(_TARGETS[name], out, vmap_method="sequential")(*operands, **attrs)


def _call(name: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, senders: jax.Array, **attrs: int) -> jax.Array:
    """A kernel of the two closed families: operands ``a``, ``b`` (``a`` cast to ``b``'s dtype) and ``senders``."""
    return _ffi(name, jax.ShapeDtypeStruct(shape, b.dtype), a.astype(b.dtype), b, senders.astype(jnp.int32), **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_sum(w: jax.Array, x: jax.Array, senders: jax.Array, block: int) -> jax.Array:
    """``w [E, F], x [N, S, F], senders [E]`` -> ``[E // block, S, F]``: Σ over a receiver's block of ``w ⊙ x[s]``."""
    return _call("gather_sum", (w.shape[0] // block, *x.shape[1:]), w, x, senders, block=block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def edge_dot(g: jax.Array, x: jax.Array, senders: jax.Array, block: int) -> jax.Array:
    """``g [E // block, S, F], x [N, S, F], senders [E]`` -> ``[E, F]``: Σ_s of receiver row ⊙ sender row."""
    return _call("edge_dot", (senders.shape[0], x.shape[-1]), g, x, senders, block=block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def scatter_sum(w: jax.Array, g: jax.Array, senders: jax.Array, block: int, num_nodes: int) -> jax.Array:
    """``w [E, F], g [E // block, S, F], senders [E]`` -> ``[num_nodes, S, F]``: Σ over each sender's edges."""
    return _call("scatter_sum", (num_nodes, *g.shape[1:]), w, g, senders, block=block)


_Fwd = tuple[jax.Array, tuple[jax.Array, ...]]  # (output, residuals)
_Bwd = tuple[jax.Array, jax.Array, np.ndarray]  # cotangents of the two arrays and of the (integer) senders


def _zero_senders(senders: jax.Array) -> np.ndarray:
    return np.zeros(senders.shape, jax.dtypes.float0)


def _gather_sum_fwd(w: jax.Array, x: jax.Array, senders: jax.Array, block: int) -> _Fwd:
    return gather_sum(w, x, senders, block), (w, x, senders)


def _gather_sum_bwd(block: int, res: tuple, u: jax.Array) -> _Bwd:
    w, x, senders = res
    return edge_dot(u, x, senders, block), scatter_sum(w, u, senders, block, x.shape[0]), _zero_senders(senders)


def _edge_dot_fwd(g: jax.Array, x: jax.Array, senders: jax.Array, block: int) -> _Fwd:
    return edge_dot(g, x, senders, block), (g, x, senders)


def _edge_dot_bwd(block: int, res: tuple, v: jax.Array) -> _Bwd:
    g, x, senders = res
    return gather_sum(v, x, senders, block), scatter_sum(v, g, senders, block, x.shape[0]), _zero_senders(senders)


def _scatter_sum_fwd(w: jax.Array, g: jax.Array, senders: jax.Array, block: int, num_nodes: int) -> _Fwd:
    return scatter_sum(w, g, senders, block, num_nodes), (w, g, senders)


def _scatter_sum_bwd(block: int, num_nodes: int, res: tuple, u: jax.Array) -> _Bwd:
    w, g, senders = res
    return edge_dot(g, u, senders, block), gather_sum(w, u, senders, block), _zero_senders(senders)


gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)
edge_dot.defvjp(_edge_dot_fwd, _edge_dot_bwd)
scatter_sum.defvjp(_scatter_sum_fwd, _scatter_sum_bwd)


#: Rows of the steerable arrays below this index have degree L=1, the rest L=2 (see :mod:`geodite_jax.spherical`).
SPLIT = 3
_DEGREE_ROWS = (slice(0, SPLIT), slice(SPLIT, None))


@jax.custom_vjp
def proj(c: jax.Array, x: jax.Array, senders: jax.Array) -> jax.Array:
    """``c [E, S], x [N, S, F], senders [E]`` -> ``[E, 2, F]``: per degree, Σ_{s ∈ L} c_es x_{s(e), s}."""
    return _call("proj", (senders.shape[0], 2, x.shape[-1]), c, x, senders, split=SPLIT)


@jax.custom_vjp
def proj_dc(u: jax.Array, x: jax.Array, senders: jax.Array) -> jax.Array:
    """``u [E, 2, F], x [N, S, F], senders [E]`` -> ``[E, S]``: Σ_f u_{e, L(s)} x_{s(e), s}."""
    return _call("proj_dc", (senders.shape[0], x.shape[1]), u, x, senders, split=SPLIT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def proj_dx(c: jax.Array, u: jax.Array, senders: jax.Array, num_nodes: int) -> jax.Array:
    """``c [E, S], u [E, 2, F], senders [E]`` -> ``[num_nodes, S, F]``: Σ over a sender's edges of c_es u_{e,L(s)}."""
    return _call("proj_dx", (num_nodes, c.shape[1], u.shape[-1]), c, u, senders, split=SPLIT)


# The three partials of Σ_e Σ_{s,f} c_es x_{s(e)sf} u_{e L(s) f}: again closed under differentiation.
def _proj_fwd(c: jax.Array, x: jax.Array, senders: jax.Array) -> _Fwd:
    return proj(c, x, senders), (c, x, senders)


def _proj_bwd(res: tuple, v: jax.Array) -> _Bwd:
    c, x, senders = res
    return proj_dc(v, x, senders), proj_dx(c, v, senders, x.shape[0]), _zero_senders(senders)


def _proj_dc_fwd(u: jax.Array, x: jax.Array, senders: jax.Array) -> _Fwd:
    return proj_dc(u, x, senders), (u, x, senders)


def _proj_dc_bwd(res: tuple, v: jax.Array) -> _Bwd:
    u, x, senders = res
    return proj(v, x, senders), proj_dx(v, u, senders, x.shape[0]), _zero_senders(senders)


def _proj_dx_fwd(c: jax.Array, u: jax.Array, senders: jax.Array, num_nodes: int) -> _Fwd:
    return proj_dx(c, u, senders, num_nodes), (c, u, senders)


def _proj_dx_bwd(num_nodes: int, res: tuple, v: jax.Array) -> _Bwd:
    c, u, senders = res
    return proj_dc(u, v, senders), proj(c, v, senders), _zero_senders(senders)


proj.defvjp(_proj_fwd, _proj_bwd)
proj_dc.defvjp(_proj_dc_fwd, _proj_dc_bwd)
proj_dx.defvjp(_proj_dx_fwd, _proj_dx_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def projected_dot(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array, block: int) -> jax.Array:
    """Q⊥·K⊥ of the edge update: ``q [N, S, F]`` (receivers), ``k [N', S, F]`` (senders), ``y [E, S]``
    (unit harmonics per degree) -> ``[E, F]`` = Σ_s q_r k_s − Σ_L (Y_L·q_r)(Y_L·k_s).

    One kernel pass in the forward and one (two sweeps) in the backward, which recomputes ``Y_L·q`` and
    ``Y_L·k`` (only the inputs are kept); higher derivatives come from the same gradient composed of the
    kernels above, so every order exists.
    """
    return _ffi("projected_dot", jax.ShapeDtypeStruct((senders.shape[0], k.shape[-1]), k.dtype), q, k,
                y.astype(k.dtype), senders.astype(jnp.int32), block=block, split=SPLIT)


def _receiver_proj(y: jax.Array, q: jax.Array, block: int) -> jax.Array:
    """``Y_L·q_r(e)`` per degree, ``[E, 2, F]``: a batched matmul per receiver (no gather)."""
    yb = y.reshape(q.shape[0], block, -1)
    parts = [jnp.einsum("nms,nsf->nmf", yb[..., r], q[:, r]) for r in _DEGREE_ROWS]
    return jnp.stack(parts, axis=2).reshape(y.shape[0], 2, q.shape[-1])


def _projected_dot_fwd(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array, block: int) -> _Fwd:
    return projected_dot(q, k, y, senders, block), (q, k, y, senders)


def _projected_dot_grads(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                         block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dy)`` of :func:`projected_dot` for the cotangent ``v [E, F]``, composed of the other kernels
    (differentiable again): the rule of the second and higher derivatives."""
    n, f = q.shape[0], q.shape[-1]
    yq = _receiver_proj(y, q, block)
    yk = proj(y, k, senders)
    vyq, vyk = v[:, None, :] * yq, v[:, None, :] * yk
    vyk_b = vyk.reshape(n, block, 2, f)
    y_b = y.reshape(n, block, -1)
    # Σ_m y_es (v ⊙ Y_L·k)_e and Σ_f (v ⊙ Y_L·k)_e q_r: the receiver side, batched matmuls per receiver.
    dq_proj = jnp.concatenate([jnp.einsum("nms,nmf->nsf", y_b[..., r], vyk_b[:, :, deg])
                               for deg, r in enumerate(_DEGREE_ROWS)], axis=1)
    dy_q = jnp.concatenate([jnp.einsum("nmf,nsf->nms", vyk_b[:, :, deg], q[:, r])
                            for deg, r in enumerate(_DEGREE_ROWS)], axis=2).reshape(y.shape)
    dq = gather_sum(v, k, senders, block) - dq_proj
    dk = scatter_sum(v, q, senders, block, k.shape[0]) - proj_dx(y, vyq, senders, k.shape[0])
    dy = -(proj_dc(vyq, k, senders) + dy_q)
    return dq, dk, dy.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def projected_dot_grads(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                        block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_projected_dot_grads` in one kernel: no ``[E, 2, F]`` projections in memory (forces)."""
    outs = tuple(jax.ShapeDtypeStruct(a.shape, k.dtype) for a in (q, k, y))
    dq, dk, dy = _ffi("projected_dot_bwd", outs, q, k, y.astype(k.dtype), v, senders.astype(jnp.int32), block=block,
                      split=SPLIT)
    return dq, dk, dy.astype(y.dtype)


def _projected_dot_grads_fwd(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                             block: int) -> _Fwd:
    return projected_dot_grads(q, k, y, v, senders, block), (q, k, y, v, senders)


def _projected_dot_grads_bwd(block: int, res: tuple, cot: tuple) -> tuple:
    q, k, y, v, senders = res
    _, vjp = jax.vjp(lambda *a: _projected_dot_grads(*a, senders, block), q, k, y, v)
    return (*vjp(cot), _zero_senders(senders))


def _projected_dot_bwd(block: int, res: tuple, v: jax.Array) -> tuple:
    q, k, y, senders = res
    return (*projected_dot_grads(q, k, y, v, senders, block), _zero_senders(senders))


projected_dot_grads.defvjp(_projected_dot_grads_fwd, _projected_dot_grads_bwd)
projected_dot.defvjp(_projected_dot_fwd, _projected_dot_bwd)


def reference(name: str, a: jax.Array, b: jax.Array, senders: jax.Array, block: int,
              num_nodes: int | None = None) -> jax.Array:
    """The same operations in plain XLA (materialising ``[E, S, F]``): for tests and other platforms."""
    e = senders.shape[0]
    if name == "gather_sum":
        return (a[:, None, :] * b[senders]).reshape(e // block, block, *b.shape[1:]).sum(1)
    if name == "edge_dot":
        return (jnp.repeat(a, block, axis=0) * b[senders]).sum(1)
    if name == "scatter_sum":
        return jax.ops.segment_sum(a[:, None, :] * jnp.repeat(b, block, axis=0), senders, num_nodes)
    group = jnp.arange(8) >= SPLIT  # degree of each steerable row
    if name == "proj":
        y = a[:, :, None] * b[senders]
        return jnp.stack([jnp.where(~group[:, None], y, 0).sum(1), jnp.where(group[:, None], y, 0).sum(1)], 1)
    if name == "proj_dc":
        return (a[:, group.astype(int)] * b[senders]).sum(-1)
    if name == "proj_dx":
        return jax.ops.segment_sum(a[:, :, None] * b[:, group.astype(int)], senders, num_nodes)
    raise ValueError(f"unknown fused operation {name!r}")


def reference_projected_dot(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array, block: int) -> jax.Array:
    """:func:`projected_dot` in plain XLA."""
    q_r, k_s = jnp.repeat(q, block, axis=0), k[senders]
    yq, yk = y[:, :, None] * q_r, y[:, :, None] * k_s
    return ((q_r * k_s).sum(1) - yq[:, :SPLIT].sum(1) * yk[:, :SPLIT].sum(1)
            - yq[:, SPLIT:].sum(1) * yk[:, SPLIT:].sum(1))
