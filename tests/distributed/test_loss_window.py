"""The logged loss window a checkpoint carries, resumed at another world size (issue 28): two gloo ranks sum
different losses for two steps and save; one rank resumes mid-window and logs the mean of all four global step
losses, as the uninterrupted run would, not its own sums nor a restarted window. About 15 s."""

from __future__ import annotations

import pytest
import torch

from launcher.train.metrics import LossWindow

pytestmark = pytest.mark.dist

# Each rank's loss at steps 1 and 2 (the global step losses: their means, 1.5 and 4.5); rank 0 keeps its state.
TWO_RANKS_SAVE = """
import sys, torch, torch.distributed as dist
from launcher.train.metrics import LossWindow
dist.init_process_group("gloo")
window = LossWindow(torch.device("cpu"))
for loss in ([1.0, 3.0], [2.0, 6.0])[dist.get_rank()]:
    window.add(torch.tensor([loss, 0.0]))
state = window.state_dict(dist.get_world_size())
if dist.get_rank() == 0:
    torch.save(state, sys.argv[1])
dist.destroy_process_group()
"""


def test_a_window_saved_on_two_ranks_resumes_on_one_with_the_global_sums(tmp_path, torchrun_workers):
    script, saved = tmp_path / "save.py", tmp_path / "window.pt"
    script.write_text(TWO_RANKS_SAVE)
    torchrun_workers(script, str(saved))
    resumed = LossWindow(torch.device("cpu"))
    resumed.load_state_dict(torch.load(saved), world=1)
    for loss in (1.0, 1.0):  # steps 3 and 4 on the one rank
        resumed.add(torch.tensor([loss, 0.0]))
    assert resumed.take()[0].item() == pytest.approx((1.5 + 4.5 + 1.0 + 1.0) / 4)
    same_world = LossWindow(torch.device("cpu"))  # at the world it was saved at, a rank takes its own sums back
    same_world.load_state_dict(torch.load(saved), world=2)
    assert (same_world.sum[0].item(), same_world.steps) == (1.0 + 3.0, 2)
