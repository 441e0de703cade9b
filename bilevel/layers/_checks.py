"""Input checks shared by the layers: errors name the stage and the argument."""

from __future__ import annotations

from typing import Any

import torch


def check_tensor(t: Any, what: str, ref: torch.Tensor, ref_what: str, stage: str) -> None:
    """``t`` must be a floating tensor with the dtype and device of ``ref``."""
    if not torch.is_tensor(t) or not t.is_floating_point():
        got = f"dtype {t.dtype}" if torch.is_tensor(t) else type(t).__name__
        raise TypeError(f"{stage}: {what} must be a floating-point tensor; got {got}.")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(
            f"{stage}: {what} has dtype {t.dtype} on {t.device} but {ref_what} has {ref.dtype} on "
            f"{ref.device}; all inputs must share dtype and device."
        )
