"""The process group of a multi-process run (`accelerate launch`): torch.distributed state that a
run creates is destroyed when the run ends, so processes exit cleanly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def process_group_initialized() -> bool:
    """Whether a torch.distributed process group exists (as under `accelerate launch`)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def release_process_group(*, wait: bool = True) -> None:
    """Destroy the process group a run created and forget Accelerate's state, so processes exit cleanly.

    Without this, gloo's threads can outlive the interpreter ("terminate called without an active
    exception"). `wait` first lets every rank arrive (skipped on errors, where a peer may never come).
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    if not process_group_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def owned_process_group() -> Iterator[None]:
    """Destroy, at the end of the block, a process group that did not exist before it (created inside it,
    e.g. by Accelerate); one that existed before belongs to the caller and is left alone."""
    had_group = process_group_initialized()
    try:
        yield
    except BaseException:
        if not had_group:
            release_process_group(wait=False)  # a peer may never arrive at a barrier after an error
        raise
    if not had_group:
        release_process_group()
