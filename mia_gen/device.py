"""Device selection from config (`device=auto|cpu|cuda|cuda:N`), never hard-coded."""

import torch

from mia_gen.errors import MiaGenError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a config string into a `torch.device`.

    `auto` picks CUDA when available, else CPU. Asking for CUDA on a machine without it is
    an error rather than a silent fallback, so timings and results are never mislabelled.
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MiaGenError(
                f"device={spec} was requested but CUDA is not available on this machine; "
                "use device=cpu or device=auto."
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MiaGenError(
                f"device={spec} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s); pick cuda:0 .. cuda:N-1 or device=auto."
            )
        return device
    raise MiaGenError(f"Unknown device '{spec}'; use auto, cpu, cuda or cuda:N.")
