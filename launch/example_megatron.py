"""Default MoE in a megatron-core GPT with megatron's DDP, optimizer and schedule (docs/megatron.md recipe).

torchrun --nproc_per_node 2 launch/example_megatron.py     # CPU (gloo, shims) or one GPU per rank
"""

import torch
import torch.distributed as dist

from default_moe.integrations import megatron as dm

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets the environment
rank, world = dist.get_rank(), dist.get_world_size()
if torch.cuda.is_available():
    torch.cuda.set_device(rank % torch.cuda.device_count())
else:
    import megatron_cpu

    megatron_cpu.apply()  # CPU/test-only shims for megatron-core's CUDA assumptions

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world)
model_parallel_cuda_manual_seed(0)  # megatron's RNG tracker (expert weights differ per EP rank)
torch.manual_seed(0)
config = TransformerConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    add_bias_linear=False,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=128,
    moe_token_dispatcher_type="alltoall",
    moe_router_pre_softmax=True,  # Default MoE needs the raw softmax over all experts
    moe_aux_loss_coeff=0.01,
    expert_model_parallel_size=world,
    use_cpu_initialization=True,
)
spec = dm.patch_spec(get_gpt_layer_local_spec(num_experts=4), router="default", beta=0.9)
model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32)
if torch.cuda.is_available():
    model.cuda()
ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
config.finalize_model_grads_func = finalize_model_grads
clip = 1.0 if torch.cuda.is_available() else 0.0  # megatron's clipping kernel needs CUDA
optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=clip), [ddp])
device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(rank)).to(device)
positions = torch.arange(32, device=device).unsqueeze(0).expand(4, 32)


def forward_step(data_iterator, model_chunk):
    output = model_chunk(tokens, positions, None, labels=torch.roll(tokens, -1, 1))  # per-token losses
    return output, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})


for step in range(10):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    result = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ddp],
        num_microbatches=1,
        seq_length=32,
        micro_batch_size=4,
        forward_only=False,
    )
    optimizer.step()
    if rank == 0 and step % 3 == 0:
        print(f"step {step + 1} loss {result[0]['loss'].item():.4f}")
D = [m.defaults.defaults_ED for m in model.modules() if isinstance(m, dm.DefaultMoELayer)]
if rank == 0:
    print(f"default vectors: {len(D)} layers, mean norm {torch.stack([d.norm(dim=1).mean() for d in D]).mean():.3f}")
dist.destroy_process_group()
