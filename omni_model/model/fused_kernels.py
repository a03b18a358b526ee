"""Two fused Triton kernels (forward + backward) for the per-token elementwise work of the language model's layers,
where torch runs a chain of separate kernels with fp32 intermediates between them (no TransformerEngine here):

* `rms_norm(x, weight, eps)`: HF's `Qwen3OmniMoeThinkerTextRMSNorm` (normalise in fp32, cast to the input dtype,
  times the weight) in one pass over each row; torch's version is ~7 kernels forward and ~10 backward, reading and
  writing fp32 copies of the activations. Per layer and micro-batch it runs over the input and pre-MLP norms'
  [tokens, hidden] and the query / key norms' [tokens x heads, head_dim].
* `swiglu_with_probs(fc1_output, probs)`: silu(gate) * up * routing prob of every expert row (rows = [gate | up]
  halves of fc1's output), the roundings of experts.swiglu_with_probs' torch ops kept (silu and the product in the
  input dtype, the prob product in fp32, cast back); torch's version is 4 kernels forward with an fp32
  intermediate and ~8 backward.
* `rotary(x, cos, sin_signed)`: rotate-half RoPE from rope.RotaryTables (x*cos + roll(x, d/2)*sin_signed, each
  product rounded to the input dtype as torch's ops round them); torch's version is 4 kernels each way.

Each kernel reads its input once and writes its output once; the backward recomputes what torch would have saved
(only the inputs and the per-row 1/rms are kept for it). The bench's H100 profile (bench/RESULTS.md, session 14):
`mul` 27.0 ms and casts ~14 ms of a 248 ms text step were these chains.

Used on CUDA tensors when their PerfOptions switch is on (fused_rms_norm: norm.RMSNorm; fused_swiglu:
experts.GroupedGemmExperts; fused_rope: rope.RotaryTables); the CPU path is torch's. Under `TRITON_INTERPRET=1` (set before this module is imported) the kernels also run on CPU tensors:
the tests check them there against the torch ops (tests/test_fused_kernels.py), and on the GPU (`-m gpu`).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the torch path only (available() is False)
    triton = None


def available() -> bool:
    return triton is not None


TILE = 4096  # elements of one program's tile: 16 per thread and array at 8 warps (a hidden row of 2048 -> 2 rows a
# tile, a head row of 128 -> 32, an expert row of 768 -> 4 rows of 1024 lanes)
NUM_WARPS = 8
NORM_BACKWARD_PROGRAMS = 512  # the norm's backward programs, each looping over tiles and summing its weight grad in
# registers: 512 partial rows to add instead of one per tile (a [tiles, hidden] fp32 buffer ~ the activations' size)


def _tile(columns: int) -> dict:
    block = triton.next_power_of_2(columns)
    return dict(ROWS=max(1, TILE // block), BLOCK=block, num_warps=NUM_WARPS)


if triton is not None:
    # `rows` changes with every batch: not specialised on (Triton would compile a variant for a multiple of 16 and
    # one for the rest, the second possibly inside timed steps)

    @triton.jit(do_not_specialize=["rows"])
    def _rms_norm_forward(X, W, Y, RSTD, rows, columns, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        each = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # offsets past 2^31 elements
        row, col = each[:, None], tl.arange(0, BLOCK)[None, :]
        mask = (row < rows) & (col < columns)
        x = tl.load(X + row * columns + col, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / columns + eps)
        tl.store(RSTD + each, rstd, mask=each < rows)
        normed = (x * rstd[:, None]).to(Y.dtype.element_ty)  # HF: back to the input dtype before the weight
        w = tl.load(W + col, mask=col < columns, other=0.0)
        tl.store(Y + row * columns + col, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty),
                 mask=mask)

    @triton.jit(do_not_specialize=["rows", "tiles"])
    def _rms_norm_backward(DY, X, W, RSTD, DX, DW_PARTIAL, rows, columns, tiles, programs, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr):
        """dx = rstd * (dy*w - xhat * mean(dy*w * xhat)), xhat = x * rstd, for the tiles program, program + programs,
        ...; the sum of dy * xhat (cast like the forward's) over those rows, the weight's gradient, into this
        program's row of DW_PARTIAL."""
        program = tl.program_id(0)
        col = tl.arange(0, BLOCK)[None, :]
        w = tl.load(W + col, mask=col < columns, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for tile in range(program, tiles, programs):
            each = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
            row = each[:, None]
            mask = (row < rows) & (col < columns)
            x = tl.load(X + row * columns + col, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * columns + col, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + each, mask=each < rows, other=0.0)[:, None]
            xhat = x * rstd
            dnormed = dy * w
            dx = rstd * (dnormed - xhat * (tl.sum(dnormed * xhat, axis=1)[:, None] / columns))
            tl.store(DX + row * columns + col, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat.to(DX.dtype.element_ty).to(tl.float32), axis=0)
        tl.store(DW_PARTIAL + program * columns + col, dw[None, :], mask=col < columns)

    @triton.jit
    def _swiglu_tile(FC1, P, rows, columns, dtype: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """One program's rows of fc1's [gate | up] and probs: the tile's indices, its inputs in fp32, sigmoid(gate),
        and silu(gate) and silu * up rounded to `dtype` as torch's ops round them (forward and backward alike)."""
        each = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # offsets past 2^31 elements
        row, col = each[:, None], tl.arange(0, BLOCK)[None, :]
        mask = (row < rows) & (col < columns)
        gate = tl.load(FC1 + row * 2 * columns + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(FC1 + row * 2 * columns + columns + col, mask=mask, other=0.0).to(tl.float32)
        prob = tl.load(P + row, mask=row < rows, other=0.0).to(tl.float32)
        sigmoid = 1.0 / (1.0 + tl.exp(-gate))
        silu = (gate * sigmoid).to(dtype).to(tl.float32)
        product = (silu * up).to(dtype).to(tl.float32)
        return each, row, col, mask, gate, up, prob, sigmoid, silu, product

    @triton.jit(do_not_specialize=["rows"])
    def _swiglu_probs_forward(FC1, P, OUT, rows, columns, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        dtype = OUT.dtype.element_ty
        _, row, col, mask, _, _, prob, _, _, product = _swiglu_tile(FC1, P, rows, columns, dtype, ROWS, BLOCK)
        tl.store(OUT + row * columns + col, (product * prob).to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["rows"])
    def _swiglu_probs_backward(DOUT, FC1, P, DFC1, DP, rows, columns, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        dtype = DFC1.dtype.element_ty
        each, row, col, mask, gate, up, prob, sigmoid, silu, product = _swiglu_tile(FC1, P, rows, columns, dtype,
                                                                                    ROWS, BLOCK)
        dout = tl.load(DOUT + row * columns + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(DP + each, tl.sum(dout * product, axis=1), mask=each < rows)
        dproduct = (dout * prob).to(dtype).to(tl.float32)
        dsilu = (dproduct * up).to(dtype).to(tl.float32)
        dgate = dsilu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        tl.store(DFC1 + row * 2 * columns + col, dgate.to(dtype), mask=mask)
        tl.store(DFC1 + row * 2 * columns + columns + col, (dproduct * silu).to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["rows"])
    def _rotary_forward(X, COS, SIN, Y, rows, heads, columns, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """y = x*cos + roll(x, d/2)*sin_signed over rows of one head each; the tables have one row per token
        (x's rows are token-major, `heads` rows a token). roll(x, d/2)[i] = x[(i + d/2) % d]."""
        each = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # offsets past 2^31 elements
        row, col = each[:, None], tl.arange(0, BLOCK)[None, :]
        mask = (row < rows) & (col < columns)
        rolled = (col + columns // 2) % columns
        token = row // heads
        dtype = Y.dtype.element_ty
        x = tl.load(X + row * columns + col, mask=mask, other=0.0).to(tl.float32)
        x_rolled = tl.load(X + row * columns + rolled, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(COS + token * columns + col, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + token * columns + col, mask=mask, other=0.0).to(tl.float32)
        y = (x * cos).to(dtype).to(tl.float32) + (x_rolled * sin).to(dtype).to(tl.float32)
        tl.store(Y + row * columns + col, y.to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["rows"])
    def _rotary_backward(DY, COS, SIN, DX, rows, heads, columns, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """dx = dy*cos + roll(dy*sin_signed, d/2): x[j] reaches y[j] through cos[j] and y[j + d/2] through
        sin_signed[j + d/2]."""
        each = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # offsets past 2^31 elements
        row, col = each[:, None], tl.arange(0, BLOCK)[None, :]
        mask = (row < rows) & (col < columns)
        rolled = (col + columns // 2) % columns
        token = row // heads
        dy = tl.load(DY + row * columns + col, mask=mask, other=0.0).to(tl.float32)
        dy_rolled = tl.load(DY + row * columns + rolled, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(COS + token * columns + col, mask=mask, other=0.0).to(tl.float32)
        sin_rolled = tl.load(SIN + token * columns + rolled, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * columns + col, (dy * cos + dy_rolled * sin_rolled).to(DX.dtype.element_ty), mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, columns = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            meta = _tile(columns)
            _rms_norm_forward[(triton.cdiv(rows, meta["ROWS"]),)](x2, weight, y, rstd, rows, columns, eps, **meta)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, columns = x2.shape
        dy2 = dy.reshape(rows, columns).contiguous()
        dx = torch.empty_like(x2)
        meta = _tile(columns)
        tiles = triton.cdiv(rows, meta["ROWS"])
        programs = max(1, min(tiles, NORM_BACKWARD_PROGRAMS))
        partial = torch.empty(programs, columns, dtype=torch.float32, device=x2.device)
        _rms_norm_backward[(programs,)](dy2, x2, weight, rstd, dx, partial, rows, columns, tiles, programs, **meta)
        dweight = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.reshape(ctx.shape), dweight, None


class _SwigluWithProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_output, probs):
        rows, columns = fc1_output.shape[0], fc1_output.shape[-1] // 2
        fc1 = fc1_output.contiguous()
        ctx.probs_shape = probs.shape  # [rows] or [rows, 1]: its gradient comes back in that shape
        probs = probs.reshape(rows).contiguous()
        out = fc1.new_empty(rows, columns)
        if rows:
            meta = _tile(columns)
            _swiglu_probs_forward[(triton.cdiv(rows, meta["ROWS"]),)](fc1, probs, out, rows, columns, **meta)
        ctx.save_for_backward(fc1, probs)
        return out

    @staticmethod
    def backward(ctx, dout):
        fc1, probs = ctx.saved_tensors
        rows, columns = fc1.shape[0], fc1.shape[-1] // 2
        dfc1 = torch.empty_like(fc1)
        dprobs = torch.empty(rows, dtype=torch.float32, device=fc1.device)
        if rows:
            meta = _tile(columns)
            _swiglu_probs_backward[(triton.cdiv(rows, meta["ROWS"]),)](dout.contiguous(), fc1, probs, dfc1, dprobs,
                                                                        rows, columns, **meta)
        return dfc1, dprobs.to(probs.dtype).reshape(ctx.probs_shape)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin_signed):
        columns = x.shape[-1]
        tokens = cos.numel() // columns
        if x.numel() % (tokens * columns) or cos.shape != sin_signed.shape:
            raise ValueError(f"RoPE tables {tuple(cos.shape)} / {tuple(sin_signed.shape)} do not cover the rows of "
                             f"{tuple(x.shape)} token by token")
        x2 = x.contiguous()
        cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
        rows, heads = x.numel() // columns, x.numel() // (tokens * columns)
        y = torch.empty_like(x2)
        if rows:
            meta = _tile(columns)
            _rotary_forward[(triton.cdiv(rows, meta["ROWS"]),)](x2, cos, sin_signed, y, rows, heads, columns, **meta)
        ctx.save_for_backward(cos, sin_signed)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin_signed = ctx.saved_tensors
        columns = dy.shape[-1]
        dy2 = dy.contiguous()
        rows = dy.numel() // columns
        dx = torch.empty_like(dy2)
        if rows:
            meta = _tile(columns)
            _rotary_backward[(triton.cdiv(rows, meta["ROWS"]),)](dy2, cos, sin_signed, dx, rows, ctx.heads, columns,
                                                                 **meta)
        return dx, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)).to(x.dtype) over the last dim, HF's RMSNorm, in one fused kernel each way."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu_with_probs(fc1_output: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * prob per row of fc1_output [rows, 2F] ([gate | up]), probs [rows]: [rows, F], in one fused
    kernel each way."""
    return _SwigluWithProbs.apply(fc1_output, probs)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + roll(x, d/2) * sin_signed for x [tokens, ..., heads, d] (token-major) and tables with one [d] row per
    token (rope.RotaryTables), in one fused kernel each way."""
    return _Rotary.apply(x, cos, sin_signed)
