"""torch's PipelineStage, holding a receive buffer only while its microbatch needs it.

torch 2.13's PipelineStage allocates, on its first step and for good, a buffer for every microbatch's input
(stages after the model's first) and for every microbatch's output gradient (stages before its last)
(torch/distributed/pipelining/stage.py, _setup_forward_recv_info and _setup_backward_recv_info). A rank of
Llama 3 405B's layout (pp 16 x v 8, 32 microbatches, tp 8 with sequence parallel, 8K tokens) holds 512 of them,
16 GiB, while only the ~141 microbatches in flight need an input and one backward at a time a gradient.
Llama 3 frees stage inputs and outputs as it goes for the same reason (arXiv 2407.21783, sec. 3.3.2).

Here a buffer is allocated when its receive is posted (get_fwd_recv_ops / get_bwd_recv_ops) and the stage lets
go of it once used: a received input lives on as the forward's saved input (fwd_cache) until that microbatch's
backward, a received gradient until its backward ends. The schedules (GPipe, 1F1B, interleaved 1F1B) post each
receive once per microbatch and step, before they read it, so nothing else changes; V-shaped schedules, which
hand tensors between stages on one rank without a receive, are not used by llaunch.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import _make_tensor_from_meta


class OnDemandReceiveStage(PipelineStage):
    def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
        with _buffers_on_meta(self):  # torch's infos, without its buffers
            super()._setup_forward_recv_info(num_microbatches, has_backward)
        for infos in self.args_recv_info.values():
            _release(infos)

    def _setup_backward_recv_info(self, num_microbatches: int) -> None:
        with _buffers_on_meta(self):
            super()._setup_backward_recv_info(num_microbatches)
        for infos in self.grad_recv_info.values():
            _release(infos)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        self._allocate(self.args_recv_info[fwd_chunk_id])
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        if self.has_backward and not self.is_last:
            self._allocate(self.grad_recv_info[bwd_chunk_id])
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def forward_one_chunk(self, fwd_chunk_id: int, args, kwargs=None, save_forward_output: bool = True):
        output = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        if not self.is_first:  # the input stays alive in fwd_cache until this microbatch's backward
            _release(self.args_recv_info[fwd_chunk_id])
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        if not self.is_last:
            _release(self.grad_recv_info[bwd_chunk_id])

    def _allocate(self, infos) -> None:
        for info in infos:
            if not info.is_root_arg and info.tensor_meta is not None and info.buffer is None:
                info.buffer = _make_tensor_from_meta(info.tensor_meta, self.device)


@contextlib.contextmanager
def _buffers_on_meta(stage: PipelineStage):
    """torch sizes each receive buffer on the stage's device (and uses the device for nothing else while it
    sets up its receive infos): on the meta device they take no memory."""
    device, stage.device = stage.device, torch.device("meta")
    try:
        yield
    finally:
        stage.device = device


def _release(infos) -> None:
    """Drop the stage's reference to each received tensor; torch treats a missing buffer as "no tensor" only
    where it has no metadata, and every receive allocates first (OnDemandReceiveStage._allocate)."""
    for info in infos:
        if not info.is_root_arg and info.tensor_meta is not None:
            info.buffer = None
