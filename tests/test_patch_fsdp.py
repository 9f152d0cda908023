"""fastsft.patch under FSDP2 (fully_shard), two CPU processes on gloo: the sharded, patched model's loss and
gradients (lm_head and embeddings sharded as DTensors) equal the unpatched model's on the same data."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = str(Path(__file__).resolve().parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, family: str, shard_head: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, TESTS)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from test_patch import make, packed_batch
        from torch.distributed.fsdp import fully_shard

        import fastsft

        torch.manual_seed(0)
        model = fastsft.patch(make(family))
        for layer in model.model.layers:
            fully_shard(layer)
        if shard_head:  # its own FSDP unit: its weight stays sharded unless its forward runs (it does not)
            fully_shard(model.lm_head)
        fully_shard(model)
        ids, position_ids, labels = packed_batch(seed=10 + rank)
        if shard_head:
            try:
                model(input_ids=ids, position_ids=position_ids, labels=labels)
            except RuntimeError as exc:
                if rank == 0:
                    torch.save({"error": str(exc)}, out)
            return
        loss = model(input_ids=ids, position_ids=position_ids, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"losses": torch.stack(losses), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_fsdp2_sharded_patched_model_matches_unpatched(tmp_path, family):
    """Layers as units, lm_head with the root (Gemma-2 ties it to the embeddings; Llama does not)."""
    from test_patch import make, packed_batch

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out, family, False), nprocs=2, join=True)
    result = torch.load(out)

    torch.manual_seed(0)
    ref = make(family)
    losses = []
    for rank in range(2):
        ids, position_ids, labels = packed_batch(seed=10 + rank)
        loss = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        (loss / 2).backward()  # FSDP averages the ranks' gradients
        losses.append(loss.detach())
    torch.testing.assert_close(result["losses"], torch.stack(losses), rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(
            result["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_lm_head_sharded_as_its_own_unit_is_a_clear_error(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out, "llama", True), nprocs=2, join=True)
    message = torch.load(out)["error"]
    assert "fully_shard(model.lm_head)" in message and "cross_entropy=False" in message
