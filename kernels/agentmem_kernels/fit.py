"""Tiles that fit the device they run on.

A kernel's tile sizes are chosen by shape (measured on an H100), but how much shared memory a tile
takes depends on the compiler and the GPU: Gemma-3's head size 256 in fp32 once asked an H200 for
320 KB of its 227. `launch_fitted` retries a launch the device refuses (Triton's `OutOfResources`,
raised before anything runs) with fewer pipeline stages, then halved blocks, says so once per
shape, and remembers the fit so that later launches (and captured graphs) go straight to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)
Result = TypeVar("Result")
SMALLEST_BLOCK = 16  # tl.dot's smallest tile side

# (kernel, shape key, preferred config) -> the config found to fit
_fitted: dict[tuple, dict] = {}


def launch_fitted(name: str, launch: Callable[[dict], Result], config: dict, key: tuple) -> Result:
    """`launch(config)`, or `launch` of the largest smaller config the device accepts.

    Args:
        name: the kernel, for the message.
        launch: allocates and launches with a config of BM, BN, num_warps and num_stages.
        config: the preferred config.
        key: what the fit depends on besides the config (device, dtype, head size, ...).
    """
    remembered = (name, key, tuple(sorted(config.items())))
    tried = _fitted.get(remembered, config)
    while True:
        try:
            result = launch(tried)
            break
        except OutOfResources as error:
            smaller = _smaller(tried)
            if smaller is None:
                raise RuntimeError(
                    f"{name} does not fit this GPU even with {tried} ({error}); "
                    "run on the reference kernels (AGENTMEM_KERNELS=reference)"
                ) from error
            logger.warning(
                "agentmem_kernels: %s with %s does not fit this GPU for %s (%s); trying %s",
                name, tried, key, error, smaller,
            )  # fmt: skip
            tried = smaller
    _fitted[remembered] = tried
    return result


def _smaller(config: dict) -> dict | None:
    """One pipeline stage, then the larger of BM and BN halved; None below 16 x 16."""
    if config.get("num_stages", 1) > 1:
        return {**config, "num_stages": 1}
    block_m, block_n = config["BM"], config["BN"]
    if max(block_m, block_n) <= SMALLEST_BLOCK:
        return None
    if block_m >= block_n and block_m > SMALLEST_BLOCK:
        return {**config, "BM": block_m // 2}
    return {**config, "BN": block_n // 2}
