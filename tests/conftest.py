"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run far faster on one thread than with threads competing for 2 shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def crash_on_checkpoint_move(monkeypatch, n: int) -> list[str]:
    """Make the n-th move of a file from `.checkpoint-next/` into a checkpoint raise KeyboardInterrupt
    (a kill while a checkpoint is moved in). Returns the names moved so far, the failing one last;
    `monkeypatch.undo()` restores `os.replace`."""
    real_replace, moves = os.replace, []

    def crashing_replace(src, dst):
        if Path(src).parent.name == ".checkpoint-next" and Path(dst).parent.name != ".checkpoint-next":
            moves.append(Path(src).name)
            if len(moves) == n:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    return moves
