"""Torch devices as params.yaml names them, ``auto`` resolved in one place.

A ``device`` key of params.yaml (``extract``, ``sae``, ``metrics``, ``evidence``, ``judge``,
``report``) takes ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``. ``auto`` is ``cuda`` when
torch sees a CUDA device and ``cpu`` otherwise (never ``mps``: that path is untested). Each
config class resolves it when it is built (:func:`resolve_device_field`), so every use site,
the device checks of check-params (``hsae_core.pipeline.params.check_device``) and the memory
limits get a concrete device; a saved config, a checkpoint's config and a store's attributes
record the device that ran. Under ``torchrun`` ``cuda`` then becomes each rank's
``cuda:LOCAL_RANK`` (``hsae_core.common.distributed.rank_device``).
"""

from __future__ import annotations

import re

from hsae_core.common.errors import check_field

DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")
#: What a device key accepts, as error messages say it.
ALLOWED = "auto, cpu, cuda, cuda:N or mps"


def is_device_name(value: object) -> bool:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether this machine has it is checked
    by ``hsae_core.pipeline.params.check_device``)."""
    return isinstance(value, str) and DEVICE.fullmatch(value) is not None


def resolve_device(device: str) -> str:
    """``device`` itself, or for ``auto`` ``cuda`` when torch sees a CUDA device, else ``cpu``.
    torch is imported only for ``auto``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_field(cfg: object, name: str = "device") -> None:
    """Check the device field ``name`` of the frozen config dataclass ``cfg`` (a
    :class:`~hsae_core.common.errors.ConfigError` naming it otherwise) and replace ``auto`` by
    the device it resolves to, in place."""
    value = getattr(cfg, name)
    check_field(cfg, name, is_device_name(value), ALLOWED)
    object.__setattr__(cfg, name, resolve_device(value))


#: What an ``autocast_dtype`` field accepts: None (fp32), ``auto`` (:func:`native_autocast`) or a
#: torch dtype name.
AUTOCAST_DTYPES = (None, "auto", "bfloat16", "float16")


def native_autocast(device: str) -> str | None:
    """``bfloat16`` where ``device`` runs bf16 matmuls natively, else None (fp32): CUDA devices
    of compute capability 8 or more (Ampere and later; ``torch.cuda.is_bf16_supported`` also
    says yes to older ones, where bf16 is emulated) and ROCm devices, CPUs with AVX512-BF16 or
    AMX tiles (oneDNN's bf16 kernels; without them bf16 is emulated and slower than fp32).
    Never on ``mps``."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "bfloat16" if torch.version.hip or major >= 8 else None
    if device == "cpu":
        return "bfloat16" if _cpu_has_native_bf16() else None
    return None


def _cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX512-BF16 or AMX tiles, as torch's CPU probes say (``torch.cpu._is_avx512_bf16_supported``
    in recent torch) or, on a torch without them, as Linux's CPU flags do; False where neither
    answers (fp32: never a slow emulated bf16)."""
    import torch

    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        return any(p() for p in probes)
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_tile" in flags


def resolve_autocast_field(cfg: object, name: str = "autocast_dtype",
                           device: str = "device") -> None:
    """Check the autocast field ``name`` of the frozen config ``cfg`` and replace ``auto`` by
    what its (already resolved) ``device`` runs natively (:func:`native_autocast`), in place: a
    saved config records the precision that trained."""
    value = getattr(cfg, name)
    check_field(cfg, name, value in AUTOCAST_DTYPES,
                "null (fp32), auto (bfloat16 where the device runs it natively), bfloat16 or "
                "float16")
    if value == "auto":
        object.__setattr__(cfg, name, native_autocast(getattr(cfg, device)))


__all__ = ["ALLOWED", "AUTOCAST_DTYPES", "is_device_name", "native_autocast", "resolve_device",
           "resolve_autocast_field", "resolve_device_field"]
