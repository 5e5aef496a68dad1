"""Run megatron-core on CPU (gloo) by redirecting the few CUDA calls it makes.

megatron-core 0.16 allocates parameters on ``torch.cuda.current_device()``, keeps its
model-parallel RNG streams as CUDA generator states, and synchronizes CUDA before
checkpoint I/O. Without a GPU these are the only obstacles: we point the device at the
CPU, keep the RNG streams as CPU generator states (the tracker swaps them in and out of
the CPU default generator exactly as it does with the CUDA one), and make synchronize a
no-op; the default causal mask, which megatron-core builds with ``device="cuda"``, is built
on the CPU. Useful for debugging on a laptop and for CPU tests of real tensor-parallel code.

Its training engine (pipeline schedules, optimizer wrappers, grad scaler, grad clipping)
also creates tensors with ``device="cuda"``, calls ``Tensor.cuda()`` and checks
``param.type()`` against ``torch.cuda.*Tensor`` strings. :func:`cuda_on_cpu` covers those
with a torch function mode; it costs Python work on every torch call, so the training loop
enters it only around the engine's calls and only while CPU execution is on.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


class _DropRngWarning(logging.Filter):
    # The tracker warns when the CPU RNG changes inside a fork; on CPU the forked stream
    # *is* the CPU generator, so that change is the intended behaviour.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _get_rng_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which must stay untouched.
    torch.default_generator.manual_seed(int(seed))


def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def define_moe_names_without_te() -> None:
    """Let megatron-core's MoE router run without Transformer Engine (idempotent).

    megatron-core 0.16.1's ``RouterGatingLinearFunction`` tests ``te_general_gemm is not None``,
    but ``moe_utils`` only binds that name when TE imports (0.19 binds it to None otherwise),
    so without TE every router forward raises NameError. Bind it to None there, and only there
    and only when TE left it unbound: the router then takes its own ``torch.mm`` path.
    Not CPU-specific (a GPU without TE needs it too); CPU execution calls it.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def define_mla_names_without_te() -> None:
    """Let megatron-core build multi-latent attention without Transformer Engine (idempotent).

    Without TE, megatron-core 0.16.1's ``extensions.transformer_engine`` still imports (over a
    MagicMock ``te``), so ``multi_latent_attention`` sets ``HAVE_TE = True`` and binds
    ``TELinear`` to a mock instance; every ``MLASelfAttention`` then fails in
    ``isinstance(self.linear_proj, TELinear)``. Clear that flag, and only when ``TELinear`` is
    not a class (TE absent): the flag only guards TE's fp8 input-saving. Not CPU-specific.
    """
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False


class _CpuStream:
    """What megatron-core asks of the current CUDA stream; CPU ops run in order."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


_CPU_STREAM = _CpuStream()


def enable_cpu_execution() -> None:
    """Make megatron-core place tensors and keep RNG streams on the CPU (idempotent)."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CUDA is available: megatron-core should run on the GPU")
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core 0.19's DDP waits on CUDA-graph events of the current stream at every
    # gradient sync; the CPU executes in order, so there is nothing to wait for.
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed
    torch.cuda.random.get_rng_state = _get_rng_state
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    fused_softmax.get_default_causal_mask = _default_causal_mask
    logging.getLogger(mrandom.__name__).addFilter(_DropRngWarning())
    define_moe_names_without_te()
    define_mla_names_without_te()
    _enabled = True


def _is_cuda(device: object) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


class CudaOnCpu(TorchFunctionMode):
    """Run code written for CUDA tensors on the CPU: ``device=`` arguments naming CUDA become
    the CPU, ``Tensor.cuda()`` returns the tensor, ``Tensor.to("cuda")`` stays on the CPU, and
    ``Tensor.type()`` reports the CUDA type string megatron-core's optimizer checks expect
    (``torch.cuda.FloatTensor`` for a CPU ``torch.FloatTensor``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def cuda_on_cpu() -> contextlib.AbstractContextManager:
    """A :class:`CudaOnCpu` mode while CPU execution is on, else a no-op context."""
    return CudaOnCpu() if _enabled else contextlib.nullcontext()
