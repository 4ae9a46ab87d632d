"""A rank of tests/test_loop.py's compile + DDP + checkpointing check (run by torchrun): one training step of a
ViT3D with gradient checkpointing through ctlib.train's build path, DDP over gloo, compiled with the
aot_eager backend (no C++ compiler needed). The model's parameters span several DDP buckets, so compile's
DDP graph splitting meets the checkpoints."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ctlib.models import ViT3D
from ctlib.profiles import get_profile
from ctlib.train import compile_model

torch.set_num_threads(1)
dist.init_process_group("gloo")
real_compile = torch.compile
torch.compile = lambda model, **kw: real_compile(model, backend="aot_eager", **kw)
torch.manual_seed(0)
net = ViT3D(image_size=16, patch_size=8, max_slices=3, dim=512, spatial_depth=2, slice_depth=2, heads=8,
            dim_head=64, mlp_dim=2048, gradient_checkpointing=True)
ddp = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=5)  # ~50 MB of parameters: several buckets
model = compile_model(ddp, get_profile("smoke", compile=True, gradient_checkpointing=True), dist.get_world_size())
model(torch.rand(2, 3, 16, 16) + dist.get_rank()).sum().backward()
grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
gathered = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, grads)
assert torch.equal(gathered[0], gathered[1]), "ranks hold different gradients after the DDP all-reduce"
print(f"rank {dist.get_rank()} ok optimize_ddp={torch._dynamo.config.optimize_ddp}", flush=True)
dist.destroy_process_group()
sys.exit(0)
