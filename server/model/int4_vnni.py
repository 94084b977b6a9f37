"""4-bit weights times 8-bit activations on the CPU's integer dot products (VNNI), compiled at start by numba.

torch's int4 kernel turns every weight into a float and multiplies in float32: on CPUs without AMX that is bound
by arithmetic, not by memory (docs/performance.md: on an AMD Zen 4 it decodes at half llama.cpp's Q4_0 speed).
Here a token's activations are quantized to int8 in groups of 32 along K (one scale each, as llama.cpp's Q8_0),
and one VNNI instruction (vpdpbusd) multiplies 16 rows x 4 k of unsigned 4-bit weights by 4 signed activations
and adds them up: about half the instructions per weight. Nothing ships such a kernel for x86 in a wheel
(torch's `_dyn_quant_matmul_4bit` is a reference loop there, torchao's are built from source only), so it is
written here as LLVM IR that numba compiles for this CPU: the AVX512-VNNI form (Intel Xeon since Ice Lake, AMD
Zen 4 and later) or the AVX-VNNI one (Intel Core 12th gen and later, 256-bit). Other CPUs keep torch's kernel.

The weights come from the cache's torch int4 layout and are repacked once at load (PackedInt4):
- `weights` uint8 [N/16, K/8, 64]: for 16 output rows and 8 k, byte 4j + i holds row j's k = 8c + i in its
  low nibble and k = 8c + 4 + i in its high one (values 0..15, w = (q - 8) * scale + zero, as cpu_quant's);
- `scales` int16 [N/16, K/32, 2, 16]: the bfloat16 bits of each group's scale, then its zero, for the 16 rows.
Per group: y += scale * (dx * sum(q * xq) - 8 * sum(x)) + zero * sum(x), sum(x) from the unquantized activations.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cpu_quant

log = logging.getLogger(__name__)

ROWS = 16  # output rows per block: one 512-bit vector of int32 sums
GROUP = cpu_quant.GROUP  # 32: weights per scale/zero pair, and activations per int8 scale
CHUNK = 64  # bytes of weights per 16 rows x 8 k
# Decoding reads the weights from memory once per token: the hardware's prefetchers alone left one core at ~11
# GB/s on an Emerald Rapids, asking for the lines 4 KB ahead reached ~16 (2 cores: 22 -> 30 GB/s, what a plain
# float32 sum reads there; 2-16 KB ahead measured alike)
PREFETCH_BYTES = 4096
# Activation rows multiplied together per pass over a block (a prompt's, a batch's): the sums of 4 rows take 4
# of AVX512's 32 vector registers; AVX-VNNI's 16 hold two halves per row, so 2 rows
ROWS_TOGETHER = {"avx512": 4, "avx2": 2}
# ISA caps that emulate another CPU (as cpu_kernels.ISA_CAPS): oneDNN's name what the CPU may use
NO_VNNI_CAPS = ("AVX2", "AVX512_CORE")  # ONEDNN_MAX_CPU_ISA values that stand for CPUs without VNNI


def vnni_isa(features: dict[str, bool], environ: os._Environ | dict) -> str | None:
    """Which form of the kernel this process runs: "avx512" (16 lanes), "avx2" (AVX-VNNI, 8 lanes) or None.

    `features` are the CPU's (llvmlite's names). The ISA caps the project's benchmarks use to emulate other CPUs
    narrow it: ONEDNN_MAX_CPU_ISA=AVX2 or AVX512_CORE stand for a CPU without VNNI, AVX2_VNNI* for a Core 12th
    gen and later; ATEN_CPU_CAPABILITY=avx2 keeps it to 256 bits."""
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in NO_VNNI_CAPS:
        return None
    wide = features.get("avx512vnni") and features.get("avx512bw") and features.get("avx512vl")
    narrow_only = cap.startswith("AVX2") or environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default")
    if wide and not narrow_only:
        return "avx512"
    if features.get("avxvnni") or wide:  # (an AVX512-VNNI CPU runs the 256-bit form too)
        return "avx2"
    return None


@functools.cache
def isa() -> str | None:
    """vnni_isa for this CPU and environment; None also where numba is not installed or cannot start."""
    try:
        import llvmlite.binding as llvm
        import numba  # noqa: F401
    except Exception as exc:  # (ImportError, or a runtime library that does not load: the kernel is optional)
        log.info("4-bit VNNI kernel unavailable: numba does not load (%s)", exc)
        return None
    if cpu_quant.int4_block_rows() is None:  # the cache's int4 layout is not one this module reads
        return None
    return vnni_isa(dict(llvm.get_host_cpu_features()), os.environ)


def available() -> bool:
    return isa() is not None


# -- the kernel ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels:
    """The compiled functions for one form (numba's dispatchers, called with numpy arrays)."""

    quantize: Callable  # (x f32 [M, K], q i8 [M, K], scale f32 [M, K/G], sums f32 [M, K/G]): the activations
    matmul: Callable  # (weights, scales, x f32 [M, K], out f32 [M, N]): out = x W^T, x quantized on the way
    expand: Callable  # (weights, scales, out [K, N] f32 or bfloat16 bits as int16): out = W^T
    repack: Callable  # (torch's packed [N / tb, K, tb / 2], position [tb], out weights): see repack()
    numba: object


@functools.cache
def kernels(form: str) -> Kernels:
    """The kernel compiled for `form` ("avx512" or "avx2"); each function compiles at its first call (~2 s in
    all, once per process)."""
    import numba
    import numpy as np
    from numba import njit, prange

    lanes = 16 if form == "avx512" else 8
    together = ROWS_TOGETHER[form]
    dot_rows, dot_row = block_dot(lanes, together), block_dot(lanes, 1)
    expand_rows = block_expand()

    @njit(nogil=True)
    def quantize(x, q, scale, sums):  # per group of GROUP: int8 steps of max|x| / 127 (torch ops cost more calls)
        for m in range(x.shape[0]):
            for g in range(x.shape[1] // GROUP):
                top, total = np.float32(0), np.float32(0)
                for i in range(g * GROUP, (g + 1) * GROUP):
                    top = max(top, abs(x[m, i]))
                    total += x[m, i]
                step = max(top, np.float32(1e-30)) / np.float32(127)
                scale[m, g], sums[m, g] = step, total
                for i in range(g * GROUP, (g + 1) * GROUP):
                    q[m, i] = np.int8(np.round(x[m, i] / step))

    @njit(parallel=True, nogil=True)
    def matmul(weights, scales, x, out):
        q = np.empty(x.shape, np.int8)
        scale = np.empty((x.shape[0], x.shape[1] // GROUP), np.float32)
        sums = np.empty_like(scale)
        quantize(x, q, scale, sums)
        whole = x.shape[0] - x.shape[0] % together
        for block in prange(weights.shape[0]):
            for m in range(0, whole, together):
                dot_rows(weights[block], scales[block], q, scale, sums, out, block * ROWS, m)
            for m in range(whole, x.shape[0]):
                dot_row(weights[block], scales[block], q, scale, sums, out, block * ROWS, m)

    @njit(parallel=True, nogil=True)
    def expand(weights, scales, out):
        for block in prange(weights.shape[0]):
            expand_rows(weights[block], scales[block], out, block * ROWS)

    @njit(parallel=True, nogil=True)
    def repack_weights(packed, position, out):
        tb = position.shape[0]  # torch's blocks of tb rows; position[r]: the nibble that holds row r of a block
        for block in prange(out.shape[0]):
            for j in range(ROWS):
                row = block * ROWS + j
                p = position[row % tb]
                source = packed[row // tb, :, p >> 1]
                shift = 4 * (p & 1)
                for c in range(out.shape[1] // CHUNK):
                    for i in range(4):
                        low = (source[8 * c + i] >> shift) & 15
                        high = (source[8 * c + 4 + i] >> shift) & 15
                        out[block, c * CHUNK + 4 * j + i] = low | (high << 4)

    return Kernels(quantize, matmul, expand, repack_weights, numba)


def block_dot(lanes: int, rows: int):
    """A numba intrinsic: out[m + r, first:first + 16] for r < `rows` = the 16 weight rows of one block times
    `rows` rows of activations from m on. Each chunk of weights is loaded and unpacked once for all of them (a
    prompt's rows, a batch's streams): per row, what remains is two broadcasts and two dot products."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
    bytes_t, ints_t, floats_t = ir.VectorType(i8, 4 * lanes), ir.VectorType(i32, lanes), ir.VectorType(f32, lanes)
    parts = ROWS // lanes
    name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"

    @intrinsic
    def dot_rows(typingctx, weights, scales, xq, dx, xsum, out, first, m):
        # for g in range(K / 32):          one group: 16 rows x 32 k = 256 bytes of weights
        #     sums = 0                     int32 per weight row and activation row
        #     for each 64-byte chunk (8 k), low nibbles then high: sums = vpdpbusd(sums, nibbles, 4 x_q broadcast)
        #     total += scale * (dx * sums - 8 * xsum) + zero * xsum
        # out[m + r, first:first + 16] = total
        def codegen(context, builder, signature, args):
            w, s = (context.make_array(t)(context, builder, a).data for t, a in zip(signature.args, args[:2]))
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[2:6], args[2:6])]
            x, d, xs, o = (array.data for array in arrays)
            k = cgutils.unpack_tuple(builder, arrays[0].shape, 2)[1]
            groups = cgutils.unpack_tuple(builder, arrays[1].shape, 2)[1]  # K / GROUP
            width = cgutils.unpack_tuple(builder, arrays[3].shape, 2)[1]  # N
            first, m = args[6], args[7]
            index = first.type

            def n(value: int):
                return ir.Constant(index, value)

            x_rows = [builder.mul(builder.add(m, n(r)), k) for r in range(rows)]  # where each row starts
            g_rows = [builder.mul(builder.add(m, n(r)), groups) for r in range(rows)]
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ints_t, [ints_t] * 3), name)
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
            start = builder.block
            g, end_group = group_loop(builder, groups)
            totals = [[builder.phi(floats_t) for _ in range(parts)] for _ in range(rows)]
            for total in (t for row in totals for t in row):
                total.add_incoming(ir.Constant(floats_t, [0.0] * lanes), start)
            sums = [[ir.Constant(ints_t, [0] * lanes)] * parts for _ in range(rows)]
            low_bits, shift = ir.Constant(bytes_t, [15] * 4 * lanes), ir.Constant(bytes_t, [4] * 4 * lanes)
            group_bytes = builder.mul(g, n(GROUP // 8 * CHUNK))
            for line in range(GROUP // 8 * CHUNK // 64):  # (a prefetch never faults, past the end neither)
                ahead = builder.gep(w, [builder.add(group_bytes, n(PREFETCH_BYTES + 64 * line))])
                builder.call(prefetch, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            for chunk in range(GROUP // 8):
                nibbles = []
                for part in range(parts):  # (AVX-VNNI: two vectors of 8 rows)
                    at = builder.add(group_bytes, n(chunk * CHUNK + part * 4 * lanes))
                    v = builder.load(builder.bitcast(builder.gep(w, [at]), bytes_t.as_pointer()), align=1)
                    nibbles.append((builder.bitcast(builder.and_(v, low_bits), ints_t),
                                    builder.bitcast(builder.lshr(v, shift), ints_t)))
                for half in (0, 1):  # low nibbles: k 8c..8c+3; high: 8c+4..8c+7
                    xk = builder.add(builder.mul(g, n(GROUP)), n(8 * chunk + 4 * half))
                    for r in range(rows):
                        x4 = builder.load(builder.bitcast(builder.gep(x, [builder.add(x_rows[r], xk)]),
                                                          i32.as_pointer()), align=1)
                        xb = splat(builder, x4, ints_t, lanes)
                        for part in range(parts):
                            sums[r][part] = builder.call(dpbusd, [sums[r][part], nibbles[part][half], xb])
            ends = []
            for r in range(rows):
                at_g = builder.add(g_rows[r], g)
                dx_v = splat(builder, builder.load(builder.gep(d, [at_g])), floats_t, lanes)
                xs_v = splat(builder, builder.load(builder.gep(xs, [at_g])), floats_t, lanes)
                eight_xs = builder.fmul(xs_v, splat(builder, ir.Constant(f32, 8.0), floats_t, lanes))
                row_ends = []
                for part, total in enumerate(totals[r]):
                    t = builder.fsub(builder.fmul(builder.sitofp(sums[r][part], floats_t), dx_v), eight_xs)
                    at = builder.add(builder.mul(g, n(2 * ROWS)), n(part * lanes))
                    scale = bfloat16s(builder, s, at, lanes)
                    zero = bfloat16s(builder, s, builder.add(at, n(ROWS)), lanes)
                    row_ends.append(builder.fadd(builder.fadd(total, builder.fmul(scale, t)), builder.fmul(zero, xs_v)))
                ends.append(row_ends)
            for row_totals, row_ends in zip(totals, ends):
                for total, end in zip(row_totals, row_ends):
                    total.add_incoming(end, builder.block)
            end_group()
            for r, row_ends in enumerate(ends):
                for part, end in enumerate(row_ends):
                    at = builder.add(builder.mul(builder.add(m, n(r)), width), builder.add(first, n(part * lanes)))
                    builder.store(end, builder.bitcast(builder.gep(o, [at]), floats_t.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(weights, scales, xq, dx, xsum, out, first, m), codegen

    return dot_rows


def block_expand():
    """A numba intrinsic: W^T[:, first:first + 16] (out [K, N], float32 or bfloat16 bits as int16) from one block."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    chunk_t, ints_t, floats_t = ir.VectorType(i8, CHUNK), ir.VectorType(i32, ROWS), ir.VectorType(f32, ROWS)

    @intrinsic
    def expand_rows(typingctx, weights, scales, out, first):
        # for g in range(K / 32): for each of its 32 k: out[k, first:first + 16] = (q - 8) * scale + zero
        to_bfloat16 = out.dtype == types.int16

        def codegen(context, builder, signature, args):
            w, s = (context.make_array(t)(context, builder, a).data for t, a in zip(signature.args, args[:2]))
            out_array = context.make_array(signature.args[2])(context, builder, args[2])
            o, first = out_array.data, args[3]
            k_total, width = cgutils.unpack_tuple(builder, out_array.shape, 2)
            index = first.type

            def n(value: int):
                return ir.Constant(index, value)

            def lanes(value: int, vector_t=ints_t):
                return ir.Constant(vector_t, [value] * ROWS)

            g, end_group = group_loop(builder, builder.sdiv(k_total, n(GROUP)))
            at = builder.mul(g, n(2 * ROWS))
            scale = bfloat16s(builder, s, at, ROWS)
            base = builder.fsub(bfloat16s(builder, s, builder.add(at, n(ROWS)), ROWS),  # zero - 8 scale
                                builder.fmul(scale, splat(builder, ir.Constant(f32, 8.0), floats_t, ROWS)))
            for chunk in range(GROUP // 8):
                offset = builder.add(builder.mul(g, n(GROUP // 8 * CHUNK)), n(chunk * CHUNK))
                v = builder.load(builder.bitcast(builder.gep(w, [offset]), chunk_t.as_pointer()), align=1)
                for half in (0, 1):
                    nibbles = (builder.and_(v, ir.Constant(chunk_t, [15] * CHUNK)) if half == 0
                               else builder.lshr(v, ir.Constant(chunk_t, [4] * CHUNK)))
                    for i in range(4):  # k = 8 chunk + 4 half + i: byte 4j + i of each row j
                        q = builder.shuffle_vector(nibbles, ir.Constant(chunk_t, ir.Undefined),
                                                   ir.Constant(ints_t, [4 * j + i for j in range(ROWS)]))
                        value = builder.fadd(base, builder.fmul(scale, builder.uitofp(q, floats_t)))
                        k = builder.add(builder.mul(g, n(GROUP)), n(8 * chunk + 4 * half + i))
                        target = builder.gep(o, [builder.add(builder.mul(k, width), first)])
                        if to_bfloat16:  # round to the nearest even, as torch does
                            bits = builder.bitcast(value, ints_t)
                            odd = builder.and_(builder.lshr(bits, lanes(16)), lanes(1))
                            bits = builder.add(bits, builder.add(odd, lanes(0x7FFF)))
                            value = builder.trunc(builder.lshr(bits, lanes(16)), ir.VectorType(i16, ROWS))
                        builder.store(value, builder.bitcast(target, value.type.as_pointer()), align=2)
            end_group()
            return context.get_dummy_value()

        return types.void(weights, scales, out, first), codegen

    return expand_rows


def group_loop(builder, count):
    """Opens `for g in range(count)` (count >= 1) in the IR being built: returns g and the function that closes the
    loop's body (the builder then continues after the loop)."""
    from llvmlite import ir

    start, body, done = builder.block, builder.append_basic_block("group"), builder.append_basic_block("end")
    builder.branch(body)
    builder.position_at_end(body)
    g = builder.phi(count.type)
    g.add_incoming(ir.Constant(count.type, 0), start)

    def end_group():
        g_next = builder.add(g, ir.Constant(count.type, 1))
        g.add_incoming(g_next, builder.block)
        builder.cbranch(builder.icmp_signed("<", g_next, count), body, done)
        builder.position_at_end(done)

    return g, end_group


def splat(builder, value, vector_t, lanes: int):
    """`value` in every lane of a `vector_t`."""
    from llvmlite import ir

    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vector_t, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_t, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))


def bfloat16s(builder, pointer, at, lanes: int):
    """`lanes` bfloat16 values stored as int16 at pointer[at:], as float32."""
    from llvmlite import ir

    halves = ir.VectorType(ir.IntType(16), lanes)
    bits = builder.load(builder.bitcast(builder.gep(pointer, [at]), halves.as_pointer()), align=2)
    wide = builder.shl(builder.zext(bits, ir.VectorType(ir.IntType(32), lanes)),
                       ir.Constant(ir.VectorType(ir.IntType(32), lanes), [16] * lanes))
    return builder.bitcast(wide, ir.VectorType(ir.FloatType(), lanes))


# -- weights in this layout ---------------------------------------------------------------------------------------
def repack(packed: torch.Tensor, scales_zeros: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 layout (cpu_quant.quantize_int4) -> (weights uint8 [N/16, K/8 * 64], scales int16
    [N/16, K/32 * 32]) as the module doc lays them out (a compiled loop: the nibble shuffles in torch ops took
    ~0.7 s for one 6B gate/up matrix, ~30 s for the model at every start)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    order = cpu_quant.int4_block_rows()  # the row each nibble of a torch block holds
    tb = len(order)
    weights = torch.empty(n // ROWS, k // 8 * CHUNK, dtype=torch.uint8)
    compiled = kernels(form)
    with_threads(compiled.numba)
    compiled.repack(packed.view(n // tb, k, tb // 2).numpy(), order.argsort().numpy(), weights.numpy())
    scales = scales_zeros.view(k // GROUP, n // ROWS, ROWS, 2).permute(1, 0, 3, 2).contiguous()
    return weights, scales.view(torch.int16).view(n // ROWS, -1)


class PackedInt4:
    """One int4 weight in this module's layout: called on activations [M, K], returns bfloat16 [M, N]."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, form: str | None = None):
        self.form = form or isa()
        if self.form is None:
            raise ValueError("the 4-bit VNNI kernel does not run on this CPU (or numba is not installed)")
        self.n, self.k = packed.shape[0], packed.shape[1] * 2
        self.weights, self.scales = repack(packed, scales_zeros, self.form)

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + self.scales.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        compiled = kernels(self.form)
        out = torch.empty(x.shape[0], self.n)
        with_threads(compiled.numba)
        compiled.matmul(self.weights.numpy(), self.scales.numpy(), x.detach().float().numpy(), out.numpy())
        return out.to(torch.bfloat16)

    def dense(self, dtype: torch.dtype = torch.bfloat16, reuse: bool = False) -> torch.Tensor:
        """W [N, K] in `dtype` (float32 or bfloat16), as the transposed view of W^T (see cpu_quant.dequantize_int4)."""
        compiled = kernels(self.form)
        w_t = cpu_quant.expansion_memory(self.n * self.k, dtype, reuse).view(self.k, self.n)
        with_threads(compiled.numba)
        compiled.expand(self.weights.numpy(), self.scales.numpy(),
                        (w_t.view(torch.int16) if dtype == torch.bfloat16 else w_t).numpy())
        return w_t.t()


def with_threads(numba) -> None:
    """numba's thread count is per calling thread: as many as torch computes with (cpu_threads.py chose them)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
