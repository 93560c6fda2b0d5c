"""Weight-only int8 / int5 / int4 / FP4 linear layers: y = x dequant(W)^T (+ b).

FP4 (e2m1 codes, weights/fp4.py) is an int4 grid whose nibbles stand for the integers
of weights.e2m1.CODES: qgemv maps them as it unpacks them; elsewhere the layer holds
those integers as its codes.

Kernel choice by device and rows (the measurements behind it are in BENCHMARKS.md).
Decode reads every weight once per step, so with few rows the speed is the speed of
reading the integers:

- CPU, any number of rows (decode steps and prefill chunks): llmopt's qgemv kernel
  (kernels/qgemv.c: integer dot products against int8-quantized activations, faster
  than torch's int4 and int8 kernels, and than dequantizing for a float GEMM). Every
  row goes through the same arithmetic whatever the step holds, so a request's output
  does not depend on what is batched with it. Without a C compiler, torch's packed
  kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) with bf16
  activations, for fewer than UPCAST_MIN_ROWS rows: with fp32 activations they are
  slower than a dense fp32 matmul.
- CPU with AMX-INT8 (Sapphire Rapids and later): the same kernel runs calls of 9 rows
  and more on AMX tiles (kernels/qgemm_amx.c: the same integer products, 16 rows of W
  by 16 rows of x per instruction, and the same float arithmetic after them, so a row's
  bits still do not depend on its step). For long prefill chunks oneDNN's bf16 GEMM
  over a dequantized copy would be faster from about 256 rows on, but its rounding
  differs from decode's, and a request's output would then depend on how its prompt
  was batched.
- CUDA with bf16 activations, int4 with group 32-256: torch's tinygemm kernel
  (`_weight_int4pack_mm`, sm80+) for every row count, checked against the codes once
  at load (a layout torch changed falls back below instead of computing garbage).
- otherwise (fp32 on CUDA, layouts no kernel takes): the weight
  is dequantized into a reused scratch buffer and multiplied densely (on AMX in bf16:
  cpu_gemm_dtype).

Storage stays int8/int4 either way: the dense copy lives only for one call.
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.kernels import qgemv
from llmopt.layers.linear import UPCAST_MIN_ROWS, cpu_has_amx
from llmopt.weights.qweight import CODEBOOKS, QuantizedWeight

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel takes
_QGEMV_DTYPES = (torch.bfloat16, torch.float32)  # activations qgemv reads and writes
_scratch = threading.local()


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(key)
    # A buffer made under inference_mode cannot be written outside it (and scoring,
    # tests or calibration may call in either mode).
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or buf.numel() < numel or stale:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class QuantLinear(nn.Module):
    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,  # the model's activations
        consume: bool = False,
    ) -> None:
        """consume: qw's codes are this layer's to reuse in place (a checkpoint's, just
        loaded): an int8 matrix (a 262,144-row embedding) is then never held twice."""
        super().__init__()
        self.consume = consume
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.codebook = qw.bits, qw.group_size, qw.codebook
        self.device, self.dtype = device, dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)
        # Dequantization operands: (out, in) uint8 codes and the per-group affine terms
        # w = q * scale + offset, offset = -zero * scale; a kernel whose operands give
        # them back drops them (a GGUF file's weights must not be held twice).
        self.register_buffer("q", qw.grid_codes().to(device))
        self.register_buffer("scale", qw.scale.float().to(device))  # (out, G)
        self.register_buffer("offset", (-qw.zero * qw.scale).float().to(device))  # (out, G)
        self.perm = None if qw.perm is None else qw.perm.to(device)
        self.kernel: str | None = None  # read by dequantize(), which the CUDA check calls
        if device.type == "cpu":
            self.kernel = self._pack_cpu_kernel(qw)
        else:
            self.kernel = self._pack_cuda_kernel(qw) if dtype == torch.bfloat16 else None
        # The most rows the row kernels take before the dense path does.
        self.kernel_rows = UPCAST_MIN_ROWS - 1
        if self.kernel == "qgemv":  # one arithmetic for every step (see the top)
            self.kernel_rows = sys.maxsize
        # The dense path's GEMM on the CPU: bf16 on AMX (inputs and outputs rounded to
        # bf16, finer than the row kernel's int8 activations), else fp32. A check of the
        # dequantized weights' exact logits sets fp32.
        self.cpu_gemm_dtype = torch.bfloat16 if cpu_has_amx() else torch.float32

    def _pack_cpu_kernel(self, qw: QuantizedWeight) -> str | None:
        """Prepare the operand of a CPU kernel that takes this weight, and drop the
        plain codes where that operand can give them back."""
        supported = qgemv.supports(self.bits, self.in_features, self.group_size)
        kernel = qgemv.load() if supported else None
        if kernel is not None:
            # 4 and 5 bits packed; int8 as signed q - 128 (kernel_metadata's offsets take
            # the 128 back)
            if self.bits < 8:
                wq = qgemv.pack_codes(qw.q, self.bits)
            else:
                wq = _signed_int8(qw.q, self.consume)
            self.register_buffer("wq", wq)
            if _kquant_fits(qw):  # a K-quant's own factors: a third of fp32's bytes
                kscale, koffset = qgemv.kquant_metadata(*qw.kquant)  # type: ignore[misc]
            else:
                kscale, koffset = qgemv.kernel_metadata(self.scale, qw.zero.float(), self.bits)
            self.register_buffer("kscale", kscale)  # what decode reads: fp16 or fp32
            self.register_buffer("koffset", koffset)  # offsets, or uint8 zero points
            self.q = self.scale = self.offset = None  # qdequant writes the weight from them
            self.kernel_bias = None if self.bias is None else self.bias.float().contiguous()
            self.operands = qgemv.Operands(
                self.wq, self.bits, self.kscale, self.koffset, self.group_size, self.codebook
            )
            self.qgemv = kernel.bind(self.operands, self.kernel_bias, self.perm)
            return "qgemv"
        if self.bits == 8 and qw.group_size == self.in_features and torch.all(qw.zero == 128):
            # Symmetric per-row: w = (q - 128) * s, exactly an int8 matrix and a row scale.
            self.register_buffer("w8", _signed_int8(qw.q, self.consume))
            self.register_buffer("s8", qw.scale[:, 0].to(torch.bfloat16))
            self.q = None
            return "int8"
        if (
            self.bits == 4
            and self.codebook is None
            and qw.group_size in INT4_GROUPS
            and self.in_features % 64 == 0
        ):
            w4 = torch._convert_weight_to_int4pack_for_cpu(qw.q.to(torch.int32), 2)
            self.register_buffer("w4", w4)
            # The kernel computes w = (q - 8) * scale + zero_term.
            zero_term = (8 - qw.zero) * qw.scale  # (out, G)
            sz = torch.stack([qw.scale.T, zero_term.T], dim=-1)  # (G, out, 2)
            self.register_buffer("sz4", sz.to(torch.bfloat16).contiguous())
            if self.out_features % 32 == 0 and torch.equal(_int4pack_codes(w4, *qw.shape), qw.q):
                self.q = None  # half the memory: the dense path unpacks w4 instead
            return "int4"
        return None

    def _pack_cuda_kernel(self, qw: QuantizedWeight) -> str | None:
        """torch's CUDA int4 kernel (tinygemm), where the weight, the GPU and a check of
        the packing against the codes allow; it then holds the only copy of the codes."""
        n_out, k = qw.shape
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if (
            self.bits != 4
            or self.codebook is not None
            or qw.group_size not in INT4_GROUPS
            or tiles is None
            or n_out % 8
            or torch.cuda.get_device_capability(self.q.device)[0] < 8
        ):
            return None
        q = self.q.to(torch.int32)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # even columns: high nibble
        zero_term = (8 - qw.zero.to(q.device)) * self.scale  # w = (q - 8) * scale + zero_term
        sz = torch.stack([self.scale.T, zero_term.T], dim=-1).to(torch.bfloat16).contiguous()
        # A product with random rows against the dequantized weight: a packing this torch
        # reads differently shows as an error of the weight's own size.
        x = torch.randn(16, k, device=q.device).to(torch.bfloat16)
        try:
            w4 = torch._convert_weight_to_int4pack(packed, tiles)
            got = torch._weight_int4pack_mm(x, w4, self.group_size, sz).float()
        except RuntimeError:
            return None
        want = x.float() @ self.dequantize(torch.float32).T  # (16, out)
        if (got - want).norm() > 1e-2 * want.norm():  # bf16 scales: about 2^-8
            return None
        self.register_buffer("w4", w4)
        self.register_buffer("sz4", sz)
        self.q = None
        return "int4-cuda"

    def decode_operands(self) -> list[torch.Tensor]:
        """The tensors a one-row forward reads (for bandwidth accounting)."""
        if self.kernel == "qgemv":
            return [self.wq, self.kscale, self.koffset]
        if self.kernel == "int8":
            return [self.w8, self.s8]
        if self.kernel in ("int4", "int4-cuda"):
            return [self.w4, self.sz4]
        return [self.q, self.scale, self.offset]

    def codes(self) -> torch.Tensor:
        """(out, in) integer codes q with w = (q - zero) * scale."""
        if self.q is not None:
            return self.q
        if self.kernel == "int4":
            return _int4pack_codes(self.w4, self.out_features, self.in_features)
        if self.bits < 8:  # qgemv's packing
            return self._grid(qgemv.unpack_codes(self.wq, self.bits))
        signed = self.wq if self.kernel == "qgemv" else self.w8  # int8 kernels: q - 128
        return signed.to(torch.int16) + 128

    def _grid(self, q: torch.Tensor) -> torch.Tensor:
        """qgemv's 4-bit codes as the grid's integers (through the codebook, if any)."""
        if self.codebook is None:
            return q
        return CODEBOOKS[self.codebook][q.long()]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) of the dense weight, (T, in) in the activations' dtype, decoded
        from qgemv's operands alone: a quantized embedding table's lookups."""
        assert self.kernel == "qgemv", "rows are decoded from qgemv's operands"
        g = self.group_size
        w = self.wq[ids]  # (T, in bits / 8) packed codes, or (T, in) int8 q - 128
        codes = (self._grid(qgemv.unpack_codes(w, self.bits)) if self.bits < 8 else w).float()
        scale, offset = qgemv.metadata_rows(self.kscale, self.koffset, ids, self.bits)  # (T, G)
        w = codes.view(len(ids), -1, g) * scale[..., None] + offset[..., None]
        return w.view(len(ids), -1).to(self.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in `dtype`, written into a per-thread scratch buffer."""
        out, n, g = self.out_features, self.in_features, self.group_size
        # In fp32 unless bf16 is asked of qgemv (another dtype is the fp32 weight rounded
        # once, as qdequant's bf16 is)
        wide = dtype if self.kernel == "qgemv" and dtype == torch.bfloat16 else torch.float32
        if self.kernel == "qgemv":
            kernel = qgemv.load()
            assert kernel is not None  # loaded when this layer chose it
            w = kernel.dequantize(self.operands, _buffer(out * n, wide, self.device).view(out, n))
        else:
            w = _buffer(out * n, torch.float32, self.device).view(out, n // g, g)
            w.copy_(self.codes().view(out, n // g, g))
            w = w.mul_(self.scale[..., None]).add_(self.offset[..., None]).view(out, n)
        if dtype == wide:
            return w
        return _buffer(out * n, dtype, self.device).view(out, n).copy_(w)

    def forward(
        self, x: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:  # (M, in) -> (M, out) in out_dtype (default: x's)
        out_dtype = out_dtype or x.dtype
        if self.kernel == "qgemv" and x.shape[0] <= self.kernel_rows and x.dtype in _QGEMV_DTYPES:
            # act-order's input order is the kernel's to apply, as it quantizes x
            return self.qgemv(x, out_dtype if out_dtype in _QGEMV_DTYPES else None).to(out_dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.kernel == "int4-cuda":  # every row count; the codes live only in w4
            xb = x.to(torch.bfloat16).contiguous()
            y = torch._weight_int4pack_mm(xb, self.w4, self.group_size, self.sz4)
            y = y if self.bias is None else y + self.bias
            return y.to(out_dtype)
        if self.kernel in ("int8", "int4") and x.shape[0] <= self.kernel_rows:
            xb = x.to(torch.bfloat16)
            if self.kernel == "int8":
                y = torch._weight_int8pack_mm(xb, self.w8, self.s8)
            else:
                y = torch._weight_int4pack_mm_for_cpu(xb, self.w4, self.group_size, self.sz4)
            y = y.to(out_dtype)
            return y if self.bias is None else y + self.bias
        if x.device.type != "cpu":
            y = F.linear(x, self.dequantize(x.dtype), self.bias)
            return y.to(out_dtype)
        dtype = self.cpu_gemm_dtype
        y = F.linear(x.to(dtype), self.dequantize(dtype))
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"{'fp4' if self.codebook else f'int{self.bits}'}, "
            f"group={self.group_size}, kernel={self.kernel or 'dequantize'}"
        )


def _kquant_fits(qw: QuantizedWeight) -> bool:
    """Whether qw's K-quant factors (if any) give its scales: they came with its blocks,
    and nothing has scaled it since (a group whose scale is 0 is stored at scale 1)."""
    k = qw.kquant
    if k is None or k.sc.shape != qw.scale.shape or 256 % qw.group_size:
        return False
    scale = k.d.float().repeat_interleave(256 // qw.group_size, dim=1) * k.sc.float()
    return torch.equal(torch.where(scale == 0, 1.0, scale), qw.scale.float())


def use_decode_arithmetic(model: nn.Module) -> int:
    """Make every quantized linear compute any number of rows through its kernel, as
    decode does: already so for qgemv; torch's packed fallback kernels otherwise leave
    calls of UPCAST_MIN_ROWS rows and more to the dense path. For measuring (perplexity
    with decode's arithmetic). Returns how many linears switched."""
    switched = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel is not None:
            m.kernel_rows = sys.maxsize
            switched += 1
    return switched


def use_exact_arithmetic(model: nn.Module) -> None:
    """Make every quantized linear multiply its dequantized weight in fp32 for any number
    of rows: the logits of the dequantized model, for checks of the weights themselves."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_rows, m.cpu_gemm_dtype = 0, torch.float32


def _signed_int8(q: torch.Tensor, in_place: bool) -> torch.Tensor:
    """uint8 codes -> int8 q - 128, what both int8 kernels read: the top bit flipped, in
    q itself where the caller gave its codes away."""
    flipped = q.bitwise_xor_(0x80) if in_place else torch.bitwise_xor(q, 0x80)
    return flipped.view(torch.int8)


def _int4pack_codes(w4: torch.Tensor, out: int, n: int) -> torch.Tensor:
    """Codes (out, in) uint8 back from torch's CPU int4 packing (torch 2.13): blocks of
    32 rows; per input column 16 bytes, byte j holding row j (low nibble) and row
    j + 16 (high). The constructor checks this against the codes before relying on it."""
    v = w4.view(out // 32, n, 16)
    rows = torch.cat([v & 0x0F, v >> 4], dim=2)  # (out / 32, in, 32)
    return rows.permute(0, 2, 1).reshape(out, n)
