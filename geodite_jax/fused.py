"""Fused sender-gather contractions over receiver-sorted edges, as XLA:CPU FFI kernels.

Three operations on steerable node arrays ``[N, S, F]`` and per-edge weights ``[E, F]``; edge ``e`` goes from
``senders[e]`` to ``receivers[e]``, and the receivers are sorted (the neighbour-block layout, receiver
``e // M``, and the sparse layout of :func:`~geodite_jax.graph.batch_graphs` both are; the kernels refuse
unsorted ones). ``X_j`` is the sender's row, never materialised per edge:

* :func:`gather_sum`  ``A(w, x)[n]  = Σ_{e: r(e) = n} w_e ⊙ x_{s(e)}``                   ``[R, S, F]``
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
            "projected_dot": "GeoditeProjectedDot", "projected_dot_bwd": "GeoditeProjectedDotBwd",
            "outer_sum": "GeoditeOuterSum", "outer_do": "GeoditeOuterDo", "outer_dy": "GeoditeOuterDy"}


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


def unavailable_reason() -> str | None:
    """None when the kernels are compiled and registered for XLA:CPU, else why not (``GEODITE_FUSED=0``: off)."""
    if os.environ.get("GEODITE_FUSED", "1") == "0":
        return "GEODITE_FUSED=0"
    return _load()


@functools.cache
def _load() -> str | None:
    """Build (or find in the cache) and register the kernels, once per process: a second registration of a
    target under another library's addresses is an XLA error."""
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


def plan(num_edges: int, config: GeoditeConfig, dtype: Any, force: bool = False,
         chunked: bool = True) -> tuple[bool, bool]:
    """``(fuse the messages, fuse the edge update)`` for a graph of ``num_edges`` edge slots.

    ``chunked``: the neighbour-block layout, whose chunked XLA path bounds memory, so the kernels' whole-graph
    edge arrays must fit :data:`FUSED_BUDGET_BYTES`. The sparse layout runs in one pass and forms larger
    ``[E, 8, F]`` arrays without the kernels, so there they are used whenever available.
    ``force``: both, or a ``RuntimeError`` naming why the kernels are unavailable.
    """
    if force:
        _require()
        return True, True
    if not enabled():
        return False, False
    if not chunked:
        return True, True
    size = num_edges * np.dtype(dtype).itemsize
    messages = size * config.num_features * config.num_layers
    edge_update = size * config.edge_features * (config.num_layers - 1)
    return messages <= FUSED_BUDGET_BYTES, messages + edge_update <= FUSED_BUDGET_BYTES


def _ffi(name: str, out: Any, *operands: jax.Array, **attrs: int) -> Any:
    """One kernel call: ``out`` a ``ShapeDtypeStruct`` or a tuple of them; integer attributes as int64."""
    _require()
    attrs = {k: np.int64(v) for k, v in attrs.items()}
    return jax.ffi.ffi_call(_TARGETS[name], out, vmap_method="sequential")(*operands, **attrs)


def _call(name: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, *indices: jax.Array,
          **attrs: int) -> jax.Array:
    """A kernel of the two closed families: operands ``a``, ``b`` (``a`` cast to ``b``'s dtype) and the indices."""
    return _ffi(name, jax.ShapeDtypeStruct(shape, b.dtype), a.astype(b.dtype), b,
                *(i.astype(jnp.int32) for i in indices), **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gather_sum(w: jax.Array, x: jax.Array, senders: jax.Array, receivers: jax.Array, num_rows: int) -> jax.Array:
    """``w [E, F], x [N, S, F], senders, receivers [E]`` -> ``[num_rows, S, F]``: Σ over a receiver's edges of
    ``w ⊙ x[s]``."""
    return _call("gather_sum", (num_rows, *x.shape[1:]), w, x, senders, receivers)


@jax.custom_vjp
def edge_dot(g: jax.Array, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    """``g [R, S, F], x [N, S, F], senders, receivers [E]`` -> ``[E, F]``: Σ_s of receiver row ⊙ sender row."""
    return _call("edge_dot", (senders.shape[0], x.shape[-1]), g, x, senders, receivers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def scatter_sum(w: jax.Array, g: jax.Array, senders: jax.Array, receivers: jax.Array, num_nodes: int) -> jax.Array:
    """``w [E, F], g [R, S, F], senders, receivers [E]`` -> ``[num_nodes, S, F]``: Σ over each sender's edges of
    ``w ⊙ g[r]``."""
    return _call("scatter_sum", (num_nodes, *g.shape[1:]), w, g, senders, receivers)


_Fwd = tuple[jax.Array, tuple[jax.Array, ...]]  # (output, residuals)
_Bwd = tuple[jax.Array, ...]  # cotangents of the two arrays, then of the (integer) indices


def _zero(*indices: jax.Array) -> tuple[np.ndarray, ...]:
    return tuple(np.zeros(i.shape, jax.dtypes.float0) for i in indices)


def _gather_sum_fwd(w: jax.Array, x: jax.Array, senders: jax.Array, receivers: jax.Array, num_rows: int) -> _Fwd:
    return gather_sum(w, x, senders, receivers, num_rows), (w, x, senders, receivers)


def _gather_sum_bwd(num_rows: int, res: tuple, u: jax.Array) -> _Bwd:
    w, x, senders, receivers = res
    return (edge_dot(u, x, senders, receivers), scatter_sum(w, u, senders, receivers, x.shape[0]),
            *_zero(senders, receivers))


def _edge_dot_fwd(g: jax.Array, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> _Fwd:
    return edge_dot(g, x, senders, receivers), (g, x, senders, receivers)


def _edge_dot_bwd(res: tuple, v: jax.Array) -> _Bwd:
    g, x, senders, receivers = res
    return (gather_sum(v, x, senders, receivers, g.shape[0]), scatter_sum(v, g, senders, receivers, x.shape[0]),
            *_zero(senders, receivers))


def _scatter_sum_fwd(w: jax.Array, g: jax.Array, senders: jax.Array, receivers: jax.Array, num_nodes: int) -> _Fwd:
    return scatter_sum(w, g, senders, receivers, num_nodes), (w, g, senders, receivers)


def _scatter_sum_bwd(num_nodes: int, res: tuple, u: jax.Array) -> _Bwd:
    w, g, senders, receivers = res
    return (edge_dot(g, u, senders, receivers), gather_sum(w, u, senders, receivers, g.shape[0]),
            *_zero(senders, receivers))


gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)
edge_dot.defvjp(_edge_dot_fwd, _edge_dot_bwd)
scatter_sum.defvjp(_scatter_sum_fwd, _scatter_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def outer_sum(o: jax.Array, y: jax.Array, receivers: jax.Array, num_rows: int) -> jax.Array:
    """``o [E, F], y [E, S], receivers [E]`` -> ``[num_rows, S, F]``: Σ over a receiver's edges of ``y_e ⊗ o_e``
    (the sparse layout's Σ_j o_ij Y_ij, which XLA forms as an ``[E, S, F]`` array first)."""
    return _call("outer_sum", (num_rows, y.shape[-1], o.shape[-1]), o, y, receivers)


@jax.custom_vjp
def outer_do(u: jax.Array, y: jax.Array, receivers: jax.Array) -> jax.Array:
    """``u [R, S, F], y [E, S], receivers [E]`` -> ``[E, F]``: Σ_s y_es u_{r(e), s}."""
    return _call("outer_do", (y.shape[0], u.shape[-1]), u, y, receivers)


@jax.custom_vjp
def outer_dy(u: jax.Array, o: jax.Array, receivers: jax.Array) -> jax.Array:
    """``u [R, S, F], o [E, F], receivers [E]`` -> ``[E, S]``: Σ_f u_{r(e), s, f} o_ef."""
    return _call("outer_dy", (o.shape[0], u.shape[1]), u, o, receivers)


# The three partials of Σ_e Σ_{s,f} o_ef y_es u_{r(e)sf}: closed under differentiation.
def _outer_sum_fwd(o: jax.Array, y: jax.Array, receivers: jax.Array, num_rows: int) -> _Fwd:
    return outer_sum(o, y, receivers, num_rows), (o, y, receivers)


def _outer_sum_bwd(num_rows: int, res: tuple, u: jax.Array) -> _Bwd:
    o, y, receivers = res
    return outer_do(u, y, receivers), outer_dy(u, o, receivers), *_zero(receivers)


def _outer_do_fwd(u: jax.Array, y: jax.Array, receivers: jax.Array) -> _Fwd:
    return outer_do(u, y, receivers), (u, y, receivers)


def _outer_do_bwd(res: tuple, v: jax.Array) -> _Bwd:
    u, y, receivers = res
    return outer_sum(v, y, receivers, u.shape[0]), outer_dy(u, v, receivers), *_zero(receivers)


def _outer_dy_fwd(u: jax.Array, o: jax.Array, receivers: jax.Array) -> _Fwd:
    return outer_dy(u, o, receivers), (u, o, receivers)


def _outer_dy_bwd(res: tuple, c: jax.Array) -> _Bwd:
    u, o, receivers = res
    return outer_sum(o, c, receivers, u.shape[0]), outer_do(u, c, receivers), *_zero(receivers)


outer_sum.defvjp(_outer_sum_fwd, _outer_sum_bwd)
outer_do.defvjp(_outer_do_fwd, _outer_do_bwd)
outer_dy.defvjp(_outer_dy_fwd, _outer_dy_bwd)


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
    return proj_dc(v, x, senders), proj_dx(c, v, senders, x.shape[0]), *_zero(senders)


def _proj_dc_fwd(u: jax.Array, x: jax.Array, senders: jax.Array) -> _Fwd:
    return proj_dc(u, x, senders), (u, x, senders)


def _proj_dc_bwd(res: tuple, v: jax.Array) -> _Bwd:
    u, x, senders = res
    return proj(v, x, senders), proj_dx(v, u, senders, x.shape[0]), *_zero(senders)


def _proj_dx_fwd(c: jax.Array, u: jax.Array, senders: jax.Array, num_nodes: int) -> _Fwd:
    return proj_dx(c, u, senders, num_nodes), (c, u, senders)


def _proj_dx_bwd(num_nodes: int, res: tuple, v: jax.Array) -> _Bwd:
    c, u, senders = res
    return proj_dc(u, v, senders), proj(c, v, senders), *_zero(senders)


proj.defvjp(_proj_fwd, _proj_bwd)
proj_dc.defvjp(_proj_dc_fwd, _proj_dc_bwd)
proj_dx.defvjp(_proj_dx_fwd, _proj_dx_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def projected_dot(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array, receivers: jax.Array,
                  block: int | None = None) -> jax.Array:
    """Q⊥·K⊥ of the edge update: ``q [R, S, F]`` (receivers), ``k [N, S, F]`` (senders), ``y [E, S]``
    (unit harmonics per degree), ``senders, receivers [E]`` -> ``[E, F]`` = Σ_s q_r k_s − Σ_L (Y_L·q_r)(Y_L·k_s).

    One kernel pass in the forward and one (two sweeps) in the backward, which recomputes ``Y_L·q`` and
    ``Y_L·k`` (only the inputs are kept); higher derivatives come from the same gradient composed of the
    kernels above, so every order exists. ``block=M``: the neighbour-block layout (receiver ``e // M``),
    whose receiver side of those higher derivatives is batched matmuls instead of kernels.
    """
    return _ffi("projected_dot", jax.ShapeDtypeStruct((senders.shape[0], k.shape[-1]), k.dtype), q, k,
                y.astype(k.dtype), senders.astype(jnp.int32), receivers.astype(jnp.int32), split=SPLIT)


def _projected_dot_fwd(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array, receivers: jax.Array,
                       block: int | None) -> _Fwd:
    return projected_dot(q, k, y, senders, receivers, block), (q, k, y, senders, receivers)


def _receiver_side(q: jax.Array, y: jax.Array, vyk: jax.Array, receivers: jax.Array,
                   block: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(Y_L·q_r [E, 2, F], Σ_e∈r y_es vyk_{e,L(s)} [R, S, F], Σ_f vyk_{e,L(s)} q_{r,s} [E, S])``: with blocks
    batched matmuls per receiver, else the degree-projection kernels indexed by receiver (no gather)."""
    if not block:
        return proj(y, q, receivers), proj_dx(y, vyk, receivers, q.shape[0]), proj_dc(vyk, q, receivers)
    n, f = q.shape[0], q.shape[-1]
    y_b, vyk_b = y.reshape(n, block, -1), vyk.reshape(n, block, 2, f)
    yq = jnp.stack([jnp.einsum("nms,nsf->nmf", y_b[..., r], q[:, r]) for r in _DEGREE_ROWS], axis=2)
    dq = jnp.concatenate([jnp.einsum("nms,nmf->nsf", y_b[..., r], vyk_b[:, :, deg])
                          for deg, r in enumerate(_DEGREE_ROWS)], axis=1)
    dy = jnp.concatenate([jnp.einsum("nmf,nsf->nms", vyk_b[:, :, deg], q[:, r])
                          for deg, r in enumerate(_DEGREE_ROWS)], axis=2)
    return yq.reshape(y.shape[0], 2, f), dq, dy.reshape(y.shape)


def _projected_dot_grads(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                         receivers: jax.Array, block: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dy)`` of :func:`projected_dot` for the cotangent ``v [E, F]``, composed of the other kernels
    (differentiable again): the rule of the second and higher derivatives."""
    yk = proj(y, k, senders)
    vyk = v[:, None, :] * yk
    yq, dq_proj, dy_q = _receiver_side(q, y, vyk, receivers, block)
    vyq = v[:, None, :] * yq
    dq = gather_sum(v, k, senders, receivers, q.shape[0]) - dq_proj
    dk = scatter_sum(v, q, senders, receivers, k.shape[0]) - proj_dx(y, vyq, senders, k.shape[0])
    dy = -(proj_dc(vyq, k, senders) + dy_q)
    return dq, dk, dy.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def projected_dot_grads(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                        receivers: jax.Array, block: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_projected_dot_grads` in one kernel: no ``[E, 2, F]`` projections in memory (forces)."""
    outs = tuple(jax.ShapeDtypeStruct(a.shape, k.dtype) for a in (q, k, y))
    dq, dk, dy = _ffi("projected_dot_bwd", outs, q, k, y.astype(k.dtype), v, senders.astype(jnp.int32),
                      receivers.astype(jnp.int32), split=SPLIT)
    return dq, dk, dy.astype(y.dtype)


def _projected_dot_grads_fwd(q: jax.Array, k: jax.Array, y: jax.Array, v: jax.Array, senders: jax.Array,
                             receivers: jax.Array, block: int | None) -> _Fwd:
    return projected_dot_grads(q, k, y, v, senders, receivers, block), (q, k, y, v, senders, receivers)


def _projected_dot_grads_bwd(block: int | None, res: tuple, cot: tuple) -> tuple:
    q, k, y, v, senders, receivers = res
    _, vjp = jax.vjp(lambda *a: _projected_dot_grads(*a, senders, receivers, block), q, k, y, v)
    return (*vjp(cot), *_zero(senders, receivers))


def _projected_dot_bwd(block: int | None, res: tuple, v: jax.Array) -> tuple:
    q, k, y, senders, receivers = res
    return (*projected_dot_grads(q, k, y, v, senders, receivers, block), *_zero(senders, receivers))


projected_dot_grads.defvjp(_projected_dot_grads_fwd, _projected_dot_grads_bwd)
projected_dot.defvjp(_projected_dot_fwd, _projected_dot_bwd)


def reference(name: str, a: jax.Array, b: jax.Array, senders: jax.Array, receivers: jax.Array | None = None,
              num_nodes: int | None = None) -> jax.Array:
    """The same operations in plain XLA (materialising ``[E, S, F]``): for tests and other platforms.

    ``num_nodes``: the output rows of ``gather_sum``/``outer_sum`` (receivers) and of ``scatter_sum``/``proj_dx``
    (senders). The ``outer_*`` operations take no senders (pass None).
    """
    if name == "gather_sum":
        return jax.ops.segment_sum(a[:, None, :] * b[senders], receivers, num_nodes)
    if name == "edge_dot":
        return (a[receivers] * b[senders]).sum(1)
    if name == "scatter_sum":
        return jax.ops.segment_sum(a[:, None, :] * b[receivers], senders, num_nodes)
    if name == "outer_sum":
        return jax.ops.segment_sum(b[:, :, None] * a[:, None, :], receivers, num_nodes)
    if name == "outer_do":
        return (a[receivers] * b[:, :, None]).sum(1)
    if name == "outer_dy":
        return (a[receivers] * b[:, None, :]).sum(-1)
    group = jnp.arange(8) >= SPLIT  # degree of each steerable row
    if name == "proj":
        y = a[:, :, None] * b[senders]
        return jnp.stack([jnp.where(~group[:, None], y, 0).sum(1), jnp.where(group[:, None], y, 0).sum(1)], 1)
    if name == "proj_dc":
        return (a[:, group.astype(int)] * b[senders]).sum(-1)
    if name == "proj_dx":
        return jax.ops.segment_sum(a[:, :, None] * b[:, group.astype(int)], senders, num_nodes)
    raise ValueError(f"unknown fused operation {name!r}")


def reference_projected_dot(q: jax.Array, k: jax.Array, y: jax.Array, senders: jax.Array,
                            receivers: jax.Array) -> jax.Array:
    """:func:`projected_dot` in plain XLA."""
    q_r, k_s = q[receivers], k[senders]
    yq, yk = y[:, :, None] * q_r, y[:, :, None] * k_s
    return ((q_r * k_s).sum(1) - yq[:, :SPLIT].sum(1) * yk[:, :SPLIT].sum(1)
            - yq[:, SPLIT:].sum(1) * yk[:, SPLIT:].sum(1))
