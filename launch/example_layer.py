"""The layer in a plain PyTorch training script (the README's first recipe, verbatim).

torchrun --nproc_per_node 2 launch/example_layer.py
"""

import torch
import torch.distributed as dist

from default_moe import MoEConfig, MoELayer
from default_moe.data_parallel import wrap_ddp

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets the environment
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
torch.manual_seed(0)  # the same seed everywhere: dense weights replicated, experts distinct per EP rank
cfg = MoEConfig(hidden_size=64, num_experts=8, ffn_hidden_size=128, top_k=2, router="default", ep_size=world)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), MoELayer(cfg), torch.nn.Linear(64, 1)).to(device)
ddp = wrap_ddp(model)  # DDP for dense weights; experts reduced over their expert-data-parallel group
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
data = torch.Generator().manual_seed(rank)  # each rank its own batches
for step in range(20):
    x = torch.randn(256, 32, generator=data).to(device)
    y = x[:, :1] * 2 - x[:, 1:2]  # a target to fit
    loss = torch.nn.functional.mse_loss(ddp(x), y)  # the MoE aux losses are already in the graph
    opt.zero_grad()
    loss.backward()
    opt.step()  # also commits D (the step contract): no extra call in a torch-optimizer loop
    if rank == 0 and step % 5 == 4:
        print(f"step {step + 1} loss {loss.item():.4f} load {model[1].tokens_per_expert.tolist()}")
dist.destroy_process_group()
