"""The Geodite network (Flax): edge vectors and species in, per-atom energies out.

No Clebsch-Gordan tensor product: steerable features X [N, 8, F] (L=1 rows 0-2, L=2 rows 3-7) are only
gated by invariants, mixed across channels identically on every row of a degree, added to invariant
multiples of the edge harmonics, projected off the edge direction and contracted by inner products.
All dense maps are bias-free, which the vacuum prior and the smoothness at the cutoff rely on.
Symbols follow the design note (``docs/geodite_paper.md``), §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import fused as fused_kernels
from .config import GeoditeConfig
from .edges import SAVED_MATMUL, Edges, chunk_nodes, default_chunk_edges, pad_vector
from .elements import COVALENT_RADII
from .priors import ZBL_CODE, ZBL_UNIVERSAL, soft_neighbour_terms, zbl_pair_energy
from .radial import bessel_basis, distance_weighting, polynomial_envelope
from .spherical import L1, L2, spherical_harmonics

# Initialisers draw in float32 explicitly: the same seed gives the same weights with or without x64.
xavier = nn.initializers.xavier_uniform(dtype=jnp.float32)
# Degree weights 1/(2L+1) of the joint RMS norm, rounded to float32 (also in float64 mode): the reference
# implementation holds them in a float32 buffer, so converted checkpoints reproduce it exactly.
_INV_3 = float(np.float32(1.0 / 3.0))
_INV_5 = float(np.float32(1.0 / 5.0))
#: The most memory the chunks of one evaluation may spend keeping their per-edge matmul outputs for the backward
#: pass (:func:`saved_matmul_bytes`) instead of recomputing them. Recomputing them is ~20 % of a chunked E+F+S
#: call with the fused kernels: keeping them made Cu-256 (19,968 edge slots, 383 MB kept) and Si-1000 1.18x
#: faster, the same numbers to the bit. 512 MiB takes in graphs up to ~28,000 edge slots of Geodite-MP in
#: float32, so Si-1000 (0.9 GB) and larger cells keep their bounded memory. Counted at float32 size: a float64
#: evaluation, all of whose arrays are twice as large, keeps the same graphs' outputs (Cu-256 in float64: 1.23x
#: faster for 0.77 GB), so the two precisions run the same program.
SAVED_MATMUL_BUDGET_BYTES = 2**29


def saved_matmul_bytes(num_slots: int, config: GeoditeConfig, dtype: Any) -> int:
    """Bytes of the per-edge matmul outputs that :func:`_saved` tags, over ``num_slots`` edge slots: per layer
    the attention pre-activation and the three filter parts (4F; 3F in the first layer), and the edge update's two
    MLP pre-activations and its gated projection (F_m + 2F) on every layer but the last."""
    f, layers = config.num_features, config.num_layers
    per_slot = (4 * layers - 1) * f + (layers - 1) * (config.edge_mlp_features + 2 * f)
    return num_slots * per_slot * jnp.dtype(dtype).itemsize


def _saved(x: jnp.ndarray) -> jnp.ndarray:
    """A chunk's per-edge matmul output ``[C·M, ...]``, kept for the backward pass where
    :attr:`Edges.save_matmuls` (recomputed with the rest of the chunk otherwise)."""
    return checkpoint_name(x, SAVED_MATMUL)


def _block_outer_sum(o: jnp.ndarray, sh: jnp.ndarray, num_nodes: int, block: int) -> jnp.ndarray:
    """Σ_j o_j ⊗ Y_j over each receiver's block of ``block`` edge slots, as a batched matmul:
    ``o [C·M, F], sh [C·M, 8]`` -> ``[C, 8, F]`` (no ``[C·M, 8, F]`` array is formed)."""
    return jnp.einsum("cjf,cjs->csf", o.reshape(num_nodes, block, o.shape[-1]),
                      sh.reshape(num_nodes, block, sh.shape[-1]))


def _attend(v: jnp.ndarray, alpha: jnp.ndarray, width: int) -> jnp.ndarray:
    """Attended values: ``v [E, P·W']`` (the first channels of the 3F values; head h owns the contiguous channels
    ``[h·width, (h+1)·width)``), ``alpha [E, H]`` -> ``v`` times each channel's head weight."""
    n_e, heads = alpha.shape
    if v.shape[1] == heads * width:
        return (v.reshape(n_e, heads, width) * alpha[:, :, None]).reshape(v.shape)
    return v * jnp.repeat(alpha, width, axis=1)[:, :v.shape[1]]


class EdgeGeometry(nn.Module):
    """Edge harmonics and radial embedding φ = Bessel(r) · s(r/ρ0) · u_p(r/r_c)."""

    config: GeoditeConfig

    @nn.compact
    def __call__(self, vectors: jnp.ndarray, species: jnp.ndarray, edges: Edges) -> tuple[jnp.ndarray, ...]:
        """``vectors [E, 3]`` (r_j − r_i, all > 0 in length) -> ``(r [E], sh [E, 8], phi [E, K], rcov_sum [E])``."""
        cfg = self.config
        r = jnp.sqrt(jnp.sum(vectors**2, axis=-1))
        sh = spherical_harmonics(vectors / r[:, None])
        radii = jnp.asarray(COVALENT_RADII, dtype=vectors.dtype)[species]
        rcov_sum = edges.at_receivers(radii) + edges.at_senders(radii)
        radial = polynomial_envelope(r / cfg.cutoff, cfg.envelope_p)
        if cfg.distance_weighting:
            theta_kappa = self.param("theta_kappa", nn.initializers.constant(-15.2013, dtype=jnp.float32), ())
            theta_lambda = self.param("theta_lambda", nn.initializers.constant(3.2139, dtype=jnp.float32), ())
            radial = radial * distance_weighting(r / rcov_sum, theta_kappa, theta_lambda)
        phi = bessel_basis(r, cfg.cutoff, cfg.num_rbf) * radial[:, None]
        return r, sh, phi, rcov_sum


class NodeInit(nn.Module):
    """Neighbour-aware initial invariants h0 [N, F] and edge features t0 [E, F] (§3.4-3.5)."""

    config: GeoditeConfig

    @nn.compact
    def __call__(self, species: jnp.ndarray, phi: jnp.ndarray, edges: Edges) -> tuple[jnp.ndarray, jnp.ndarray]:
        cfg = self.config
        f, k = cfg.num_features, cfg.num_rbf

        def embed_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
            return jax.random.normal(key, shape, dtype).at[0].set(0.0)  # row 0 is padding

        embed_self = self.param("embed_self", embed_init, (cfg.num_elements, f))
        embed_nbr = self.param("embed_nbr", nn.initializers.normal(1.0, dtype=jnp.float32), (cfg.num_elements, f))
        w_phi = self.param("W_phi", xavier, (k, f))
        w_density = self.param("w_density", xavier, (k, 1))[:, 0]
        w_1 = self.param("W_1", xavier, (2 * f, f))
        w_2 = self.param("W_2", xavier, (f, f))
        w_e = self.param("W_e", xavier, (k, f))
        dtype = phi.dtype

        nbr = embed_nbr.astype(dtype)[species]

        def neighbour_sums(ec: Edges, phi_c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
            return (ec.aggregate(ec.at_senders(nbr) * (phi_c @ w_phi)),
                    ec.aggregate(soft_neighbour_terms(phi_c, w_density)))

        m, rho = edges.map_chunks(neighbour_sums, (), (phi,))
        x = jnp.concatenate([embed_self.astype(dtype)[species], m / (1.0 + rho)[:, None]], axis=-1)
        h = edges.sync(jax.nn.silu(x @ w_1) @ w_2)

        def edge_features(ec: Edges, h_c: jnp.ndarray, phi_c: jnp.ndarray) -> tuple[jnp.ndarray]:
            return ((ec.at_receivers(h_c) + ec.at_senders(h)) * (phi_c @ w_e),)

        (t,) = edges.map_chunks(edge_features, (h,), (phi,))
        return h, t


class Interaction(nn.Module):
    """Joint RMS norm, attention + spatial filter messages, density-normalised update, edge refinement.

    §3.6-3.7. ``last`` layers have no edge refinement (and no such weights). ``first``: the layer's steerable
    input is zero (the first layer's), so the part of the messages that multiplies the senders' steerables
    (``o_x``) is skipped: the same numbers and parameters, a quarter fewer message matmuls in that layer.
    """

    config: GeoditeConfig
    last: bool
    first: bool = False

    @nn.compact
    def __call__(self, h: jnp.ndarray, x_st: jnp.ndarray, t: jnp.ndarray, sh: jnp.ndarray, phi: jnp.ndarray,
                 edges: Edges, deterministic: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """``h [N, F], x_st [N, 8, F], t [E, F], sh [E, 8], phi [E, K]`` -> updated ``(h, x_st, t)``."""
        cfg = self.config
        f, heads, e = cfg.num_features, cfg.num_heads, t.shape[0]
        p = lambda name, shape: self.param(name, xavier, shape)  # noqa: E731
        norm_scale = self.param("norm_scale", nn.initializers.ones, (3, f))  # γ0, γ1, γ2
        w_q, w_k, w_x1, w_v1 = p("W_q", (f, f)), p("W_k", (f, f)), p("W_x1", (f, f)), p("W_v1", (f, f))
        w_x2, w_v2 = p("W_x2", (f, 3 * f)), p("W_v2", (f, 3 * f))
        w_a, w_f = p("W_a", (f, f)), p("W_f", (f, 3 * f))
        w_density = p("w_density", (cfg.num_rbf, 1))[:, 0]

        # 1. Joint RMS norm of (h, X); the residual stream continues from the normalised features.
        nu = h**2 + (x_st[:, L1] ** 2).sum(1) * _INV_3 + (x_st[:, L2] ** 2).sum(1) * _INV_5
        g = jax.lax.rsqrt(nu.mean(-1, keepdims=True) + cfg.norm_eps)
        h = norm_scale[0] * g * h
        x_st = jnp.concatenate([(norm_scale[1] * g)[:, None] * x_st[:, L1],
                                (norm_scale[2] * g)[:, None] * x_st[:, L2]], axis=1)

        # 2-3. Node projections, fused into one matmul; edge projections per chunk.
        q, k, hx, hv = jnp.split(h @ jnp.concatenate([w_q, w_k, w_x1, w_v1], 1), 4, axis=-1)
        # The first layer's steerable input is zero: its messages need no o_x part, and a part computed but unused
        # would leave a zero cotangent times a weight (constant-folded when jitted over fixed parameters, as
        # jax-md's energy is).
        parts = 2 if self.first else 3
        # [N, P·F] values and invariant filters of the message parts this layer uses.
        v_nodes = jax.nn.silu(hv) @ w_v2[:, :parts * f]
        x_nodes = jax.nn.silu(hx) @ w_x2[:, :parts * f]
        keep = None
        if cfg.attention_dropout and not deterministic:  # the mask is drawn whole: numbers don't depend on chunks
            keep = nn.Dropout(cfg.attention_dropout)(jnp.ones((e, heads), t.dtype), deterministic=False)

        def messages(ec: Edges, q_c: jnp.ndarray, t_c: jnp.ndarray, sh_c: jnp.ndarray,
                     *keep_c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
            """One chunk's aggregated invariant ``[C, F]`` and steerable ``[C, 8, F]`` messages (unnormalised)."""
            n_e = t_c.shape[0]
            te = t_c @ w_edge
            a, filt = jax.nn.silu(te[:, :f]), te[:, f:]
            # 4. Attention without softmax: a neighbour crossing r_c changes no other weight.
            qka = (ec.at_receivers(q_c) * ec.at_senders(k) * a).reshape(n_e, heads, f // heads).sum(-1)
            alpha = jax.nn.silu(qka) / math.sqrt(f)
            if keep_c:
                alpha = alpha * keep_c[0]
            # 5-6. Values attended per head (contiguous 3F/H blocks), plus the spatial filter.
            vx_j = ec.at_senders(vx)
            o = _attend(vx_j[:, :parts * f], alpha, 3 * f // heads) + filt * vx_j[:, parts * f:]
            if ec.block:
                # Materialise o and the sender rows once: otherwise XLA fuses their producers into the
                # [C·M, 8, F] message loop and recomputes them for every one of the 8 rows (measured 15-20 %).
                o = jax.lax.optimization_barrier(o)
            o_s, o_d = o[:, :f], o[:, f:2 * f]
            # 7. Messages, summed per receiver.
            if ec.block:  # Σ_j o_d Y as a batched matmul; no [C·M, 8, F] message array is formed
                c, m = ec.num_nodes, ec.block
                sum_x = _block_outer_sum(o_d, sh_c, c, m)
                if not self.first:
                    x_j = jax.lax.optimization_barrier(ec.at_senders(x_st))
                    sum_x = sum_x + (o[:, 2 * f:].reshape(c, m, 1, f) * x_j.reshape(c, m, 8, f)).sum(1)
                return ec.aggregate(o_s), sum_x
            msg = o_d[:, None, :] * sh_c[:, :, None]
            if not self.first:
                msg = msg + o[:, None, 2 * f:] * ec.at_senders(x_st)
            return ec.aggregate(o_s), ec.aggregate(msg)

        def scalar_messages(ec: Edges, q_c: jnp.ndarray, t_c: jnp.ndarray, sh_c: jnp.ndarray,
                            *keep_c: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
            """The fused path's chunk: ``Σ o_s [C, F]``, ``Σ o_d Y [C, 8, F]`` and the sender weights ``o_x [C·M, F]``
            (not in the first layer).

            The same numbers as ``messages``, with every edge array computed in its own piece: slices of
            edge arrays would become zero-padded ``[C·M, 6F]`` cotangents in the backward pass.
            """
            n_e = t_c.shape[0]
            a = jax.nn.silu(_saved(t_c @ w_a))
            qka = (ec.at_receivers(q_c) * ec.at_senders(k) * a).reshape(n_e, heads, f // heads).sum(-1)
            alpha = jax.nn.silu(qka) / math.sqrt(f)
            if keep_c:
                alpha = alpha * keep_c[0]
            # Part p of o = v_j (attention of the head that owns each channel) + filter ⊙ x_j.
            o_parts = [ec.at_senders(v_parts[p]) * (alpha @ head_of[p])
                       + _saved(t_c @ w_f_parts[p]) * ec.at_senders(x_parts[p]) for p in range(parts)]
            o_s, o_d = o_parts[:2]
            if ec.block:
                sum_d = _block_outer_sum(o_d, sh_c, ec.num_nodes, ec.block)
            else:  # Σ_j o_d ⊗ Y by a kernel too: XLA would form it as an [E, 8, F] array
                sum_d = fused_kernels.outer_sum(o_d, sh_c, ec.kernel_receivers, ec.num_nodes)
            return (ec.aggregate(o_s), sum_d, *o_parts[2:])

        edge_local = (t, sh) if keep is None else (t, sh, keep)
        if edges.fused_messages:  # Σ_j o_x X_j by the kernel over the whole graph: no [E, 8, F] gather or scatter
            v_parts, x_parts = jnp.split(v_nodes, parts, axis=1), jnp.split(x_nodes, parts, axis=1)  # [N, F] each
            w_f_parts = jnp.split(w_f, 3, axis=1)
            # head_of[p] [H, F]: one-hot of the head that owns channel p·F + c of the 3F attended values.
            owner = np.arange(3 * f) // (3 * f // heads)
            head_of = [jnp.asarray(np.arange(heads)[:, None] == owner[None, p * f:(p + 1) * f], t.dtype)
                       for p in range(3)]
            sum_s, sum_x, *o_x = edges.map_chunks(scalar_messages, (q,), edge_local)
            if o_x:
                with jax.named_scope("fused_kernels"):
                    sum_x = sum_x + fused_kernels.gather_sum(o_x[0], x_st, edges.senders, edges.kernel_receivers,
                                                             edges.num_nodes)
        else:
            w_edge = jnp.concatenate([w_a, w_f[:, :parts * f]], axis=1)
            vx = jnp.concatenate([v_nodes, x_nodes], axis=-1)  # [N, 2·P·F]: one sender gather for both
            sum_s, sum_x = edges.map_chunks(messages, (q,), edge_local)
        # 8. Density-normalised aggregation.
        inv_density = 1.0 / (1.0 + edges.aggregate(soft_neighbour_terms(phi / cfg.num_rbf, w_density)))
        h = h + sum_s * inv_density[:, None]
        x_st = x_st + sum_x * inv_density[:, None, None]

        if not self.last:
            x_st = edges.sync(x_st)  # the edge update reads the senders' updated steerables
            t = self._edge_update(x_st, t, sh, edges)
        return h, x_st, t

    def _edge_update(self, x_st: jnp.ndarray, t: jnp.ndarray, sh: jnp.ndarray, edges: Edges) -> jnp.ndarray:
        """t + Δt_ij, from inner products of receiver and sender steerables with the edge direction projected out.

        ``x_st [N, 8, F], t [E, F], sh [E, 8]`` -> ``[E, F]``.
        """
        cfg = self.config
        f, fe = cfg.num_features, cfg.edge_features
        p = lambda name, shape: self.param(name, xavier, shape)  # noqa: E731
        w_t1 = p("W_t1", (f, cfg.edge_mlp_features))
        w_t2 = p("W_t2", (cfg.edge_mlp_features, f))
        w_qv, w_k1, w_k2 = p("W_Q", (f, fe)), p("W_K1", (f, fe)), p("W_K2", (f, fe))
        ln_scale = self.param("ln_scale", nn.initializers.ones, (fe,))
        ln_bias = self.param("ln_bias", nn.initializers.zeros, (fe,))
        w_w = p("W_w", (fe, f))
        q_nodes = x_st @ w_qv  # [N, 8, Fe]
        k_nodes = jnp.concatenate([x_st[:, L1] @ w_k1, x_st[:, L2] @ w_k2], axis=1)

        def finish(t_c: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
            """Layer norm of the inner products ``w [C·M, Fe]``, gated by the MLP of ``t_c``: the new ``t``."""
            mean = w.mean(-1, keepdims=True)
            var = ((w - mean) ** 2).mean(-1, keepdims=True)
            w = (w - mean) * jax.lax.rsqrt(var + 1e-5) * ln_scale + ln_bias
            return t_c + jax.nn.silu(_saved(jax.nn.silu(_saved(t_c @ w_t1)) @ w_t2)) * _saved(w @ w_w)

        def edge_update(ec: Edges, q_c: jnp.ndarray, t_c: jnp.ndarray, sh_c: jnp.ndarray) -> tuple[jnp.ndarray]:
            q_i = ec.at_receivers(q_c)  # [C·M, 8, Fe]
            k_j = ec.at_senders(k_nodes)
            # Q⊥·K⊥ = Q·K − (Y·Q)(Y·K) per degree, since |Y^l| = 1.
            s_q = sh_c[:, :, None] * q_i
            s_k = sh_c[:, :, None] * k_j
            w = ((q_i * k_j).sum(1) - s_q[:, L1].sum(1) * s_k[:, L1].sum(1) - s_q[:, L2].sum(1) * s_k[:, L2].sum(1))
            return (finish(t_c, w),)

        def edge_update_fused(ec: Edges, t_c: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray]:
            return (finish(t_c, w),)

        if edges.fused_edge_update:  # Q⊥·K⊥ by the kernel over the whole graph: only its [E, Fe] result is kept
            with jax.named_scope("fused_kernels"):
                w = fused_kernels.projected_dot(q_nodes, k_nodes, sh, edges.senders, edges.kernel_receivers,
                                                edges.block)
            return edges.map_chunks(edge_update_fused, (), (t, w))[0]
        (t,) = edges.map_chunks(edge_update, (q_nodes,), (t, sh))
        return t


class Coupling(nn.Module):
    """Equivariant coupling: steerable norms feed the invariants, invariants gate the steerables (§3.8)."""

    config: GeoditeConfig

    @nn.compact
    def __call__(self, h: jnp.ndarray, x_st: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        f = self.config.num_features
        w_u = self.param("W_u", xavier, (f, f))
        w_c1 = self.param("W_c1", xavier, (2 * f, f))
        w_c2 = self.param("W_c2", xavier, (f, 2 * f))
        x_mixed = x_st @ w_u
        sq_norm = (x_mixed**2).sum(1)  # no square root: smooth (and NaN-free) at X = 0
        dh, dg = jnp.split(jax.nn.silu(jnp.concatenate([h, sq_norm], -1) @ w_c1) @ w_c2, 2, axis=-1)
        return h + dh, x_st + dg[:, None, :] * x_mixed


class Layer(nn.Module):
    """One interaction followed by its coupling block."""

    config: GeoditeConfig
    last: bool
    first: bool = False

    @nn.compact
    def __call__(self, h: jnp.ndarray, x_st: jnp.ndarray, t: jnp.ndarray, sh: jnp.ndarray, phi: jnp.ndarray,
                 edges: Edges, deterministic: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        h, x_st, t = Interaction(self.config, self.last, self.first, name="interaction")(
            h, x_st, t, sh, phi, edges, deterministic)
        h, x_st = Coupling(self.config, name="coupling")(h, x_st)
        return h, x_st, t


class Geodite(nn.Module):
    """Per-atom energies (before E0 and the energy scale) from edge vectors.

    Call: ``model.apply(params, vectors [E, 3], species [N], senders [E], receivers [E])`` returns
    ``{"nn": [N], "zbl": [N], "nn_per_layer": [N, T]}``; the atom energy is
    ``E0[Z] + s_E (nn + zbl)``. Edge j -> i carries ``vectors = r_j + shift·cell − r_i``; every vector
    must have a positive length (pad with vectors longer than the cutoff: they contribute exactly 0).

    ``chunk_edges``: in the neighbour-block layout every layer runs over chunks of receiver nodes holding
    about this many edge slots each (``None``: :func:`default_chunk_edges`, larger with the fused kernels;
    ``0``: one pass over the whole graph).
    Memory then grows only with the node state and the per-layer edge state ``[E, F]``; the numbers are the
    same for any chunk size. Graphs whose chunks' matmul outputs fit :data:`SAVED_MATMUL_BUDGET_BYTES` (at
    float32 size) keep them instead of recomputing them in the backward pass (with the fused kernels; the same
    numbers).

    ``fused``: contract the sender gathers with the CPU kernels of :mod:`geodite_jax.fused` (receiver-sorted
    edges: the block layout, or the sparse layout with ``sorted_receivers``). ``None``: where they are
    available and, in the block layout, their extra edge state fits
    :data:`~geodite_jax.fused.FUSED_BUDGET_BYTES`; ``True``: always (an error if they are unavailable or the
    receivers are not sorted); ``False``: never. The numbers are the same either way.
    """

    config: GeoditeConfig
    chunk_edges: int | None = None
    fused: bool | None = None

    def setup(self) -> None:
        cfg = self.config
        self.geometry = EdgeGeometry(cfg)
        self.node_init = NodeInit(cfg)
        layer_cls = nn.remat(Layer, static_argnums=(7,)) if cfg.remat else Layer  # argnum 7 (with self): deterministic
        # Layer 0 reads the zero steerables that _encode starts from (its ``first`` skips their messages).
        self.layers = [layer_cls(cfg, last=(i == cfg.num_layers - 1), first=(i == 0)) for i in range(cfg.num_layers)]
        # One bias-free Linear(F, 1) per layer, Xavier-uniform as in the reference (fan_in F, fan_out 1).
        readout_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-1, out_axis=-2,
                                                        dtype=jnp.float32)
        self.readout = self.param("readout", readout_init, (cfg.num_layers, cfg.num_features))
        if cfg.zbl:
            init = ZBL_UNIVERSAL if cfg.zbl_init == "universal" else ZBL_CODE
            const = lambda v: (lambda key, shape=(), dtype=jnp.float32: jnp.asarray(v, dtype))  # noqa: E731
            self.zbl_alpha = self.param("zbl_alpha", const(init["alpha"]))
            self.zbl_beta = self.param("zbl_beta", const(init["beta"]))
            self.zbl_coefs = self.param("zbl_coefs", const(init["coefs"]))
            self.zbl_exps = self.param("zbl_exps", const(init["exps"]))

    def _encode(self, species: jnp.ndarray, sh: jnp.ndarray, phi: jnp.ndarray, edges: Edges,
                deterministic: bool) -> jnp.ndarray:
        """Per-layer readout energies ``[N, T]`` (a_ℓ · h_i^(ℓ))."""
        cfg = self.config
        h, t = self.node_init(species, phi, edges)
        x_st = jnp.zeros((h.shape[0], 8, cfg.num_features), h.dtype)
        per_layer = []
        for i, layer in enumerate(self.layers):
            if i:  # ghost rows computed here saw an incomplete neighbourhood: take their owners' features
                h, x_st = edges.sync(h), edges.sync(x_st)
            h, x_st, t = layer(h, x_st, t, sh, phi, edges, deterministic)
            per_layer.append(h @ self.readout[i].astype(h.dtype))
        return jnp.stack(per_layer, axis=-1)

    def vacuum_energies(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        """Per-layer readout of every element as an isolated atom, ``[num_elements, T]``.

        The same layers run on an edgeless graph; subtracting this makes E_i = E0(Z_i) for an atom
        with no neighbour, whatever the weights.
        """
        cfg = self.config
        species = jnp.arange(cfg.num_elements, dtype=jnp.int32)
        none = jnp.zeros((0,), jnp.int32)
        edges = Edges(none, none, cfg.num_elements, None, True)
        return self._encode(species, jnp.zeros((0, 8), dtype), jnp.zeros((0, cfg.num_rbf), dtype), edges, True)

    def __call__(self, vectors: jnp.ndarray, species: jnp.ndarray, senders: jnp.ndarray, receivers: jnp.ndarray,
                 *, vacuum: jnp.ndarray | None = None, sorted_receivers: bool = False,
                 neighbours_per_node: int | None = None, deterministic: bool = True,
                 exchange: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> dict[str, jnp.ndarray]:
        """See the class docstring. ``vacuum``: a precomputed :meth:`vacuum_energies` table (inference).

        ``neighbours_per_node=M``: the edges are laid out in blocks, edge e has receiver e // M (see
        :class:`Edges`); ``sorted_receivers``: receivers are non-decreasing (a hint for the sparse layout).

        ``exchange`` (spatial decomposition: LAMMPS domains, device grids): ``exchange(x [N, ...]) -> x`` with
        every ghost row replaced by its owner's row. It is applied to the node features wherever a layer
        reads them at senders (after node init, before every later layer, before every edge update), so
        with a one-cutoff ghost shell the energies of owned atoms equal those of the whole system.
        """
        cfg = self.config
        n = species.shape[0]
        if neighbours_per_node is not None and vectors.shape[0] != n * neighbours_per_node:
            raise ValueError(f"neighbours_per_node={neighbours_per_node} needs {n} x {neighbours_per_node} edges, "
                             f"got {vectors.shape[0]}")
        plan = (False, False)
        if self.fused and not (neighbours_per_node or sorted_receivers):
            raise ValueError("fused=True needs receiver-sorted edges (neighbours_per_node or sorted_receivers)")
        if (neighbours_per_node or sorted_receivers) and self.fused is not False:
            # Budgeted on the graph's own edge slots (chunk padding below adds less than one chunk).
            plan = fused_kernels.plan(senders.shape[0], cfg, vectors.dtype, force=bool(self.fused),
                                      chunked=bool(neighbours_per_node))
        chunk_edges = self.chunk_edges
        if chunk_edges is None:
            chunk_edges = default_chunk_edges(cfg.num_features, vectors.dtype, fused=plan[0])
        chunk = chunk_nodes(n, neighbours_per_node, chunk_edges)
        if chunk and n % chunk:
            # Pad once to whole chunks: padding nodes (species 0) own self-loop edges beyond the cutoff, so they
            # change nothing and are cut off the outputs; the chunked layers then split by reshaping (no copies).
            m, extra = neighbours_per_node, chunk - n % chunk
            pad = jnp.asarray(pad_vector(cfg.cutoff), vectors.dtype)
            loops = jnp.repeat(jnp.arange(n, n + extra, dtype=senders.dtype), m)
            vectors = jnp.concatenate([vectors, jnp.broadcast_to(pad, (extra * m, 3))])
            species = jnp.concatenate([species, jnp.zeros((extra,), species.dtype)])
            senders, receivers = jnp.concatenate([senders, loops]), jnp.concatenate([receivers, loops])
        if exchange is not None and species.shape[0] > n:  # chunk padding rows are nobody's ghosts
            inner = exchange
            exchange = lambda x: jnp.concatenate([inner(x[:n]), x[n:]])  # noqa: E731
        edges = Edges(senders, receivers, species.shape[0], neighbours_per_node,
                      sorted_receivers or bool(neighbours_per_node), chunk, exchange, *plan,
                      save_matmuls=bool(chunk and plan[0] and saved_matmul_bytes(
                          senders.shape[0], cfg, jnp.float32) <= SAVED_MATMUL_BUDGET_BYTES))
        r, sh, phi, rcov_sum = self.geometry(vectors, species, edges)
        per_layer = self._encode(species, sh, phi, edges, deterministic)
        if cfg.vacuum:
            if vacuum is None:
                vacuum = self.vacuum_energies(vectors.dtype)
            per_layer = per_layer - vacuum.astype(per_layer.dtype)[species]
        out = {"nn_per_layer": per_layer, "nn": per_layer.sum(-1)}
        if cfg.zbl:
            z = species.astype(vectors.dtype)
            z = jnp.where(z > 0, z, 1.0)  # padding nodes: keep Z^β differentiable
            pair = zbl_pair_energy(r, edges.at_receivers(z), edges.at_senders(z), rcov_sum, self.zbl_alpha,
                                   self.zbl_beta, self.zbl_coefs, self.zbl_exps)
            out["zbl"] = 0.5 * edges.aggregate(pair)
        else:
            out["zbl"] = jnp.zeros(species.shape, vectors.dtype)
        return {key: value[:n] for key, value in out.items()}  # padding nodes of the chunks cut off


def init_params(config: GeoditeConfig, seed: int = 0) -> dict[str, Any]:
    """Fresh parameters (float32) for ``config``, initialised as the authors' code does."""
    model = Geodite(config)
    vectors = jnp.asarray(np.array([[1.5, 0.0, 0.0], [-1.5, 0.0, 0.0]]), jnp.float32)
    species = jnp.asarray([1, 1], jnp.int32)
    idx = jnp.asarray([0, 1], jnp.int32)
    return model.init(jax.random.PRNGKey(seed), vectors, species, idx, idx[::-1])


def count_params(params: Any) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
