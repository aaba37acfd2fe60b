"""Per-rank bodies of the HF in-place conversion tests (2 gloo processes, CPU, tiny random models)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from default_moe import commit_defaults
from default_moe.integrations import hf

KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
VOCAB, E, K = 64, 4, 2


def tiny(kind: str, seed: int = 0, norm_topk_prob=None):
    import transformers as tr

    base = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        num_experts_per_tok=K,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "mixtral":
        cls, cfg = tr.MixtralForCausalLM, tr.MixtralConfig(**base, intermediate_size=32, num_local_experts=E)
    elif kind == "qwen2_moe":
        cls, cfg = (
            tr.Qwen2MoeForCausalLM,
            tr.Qwen2MoeConfig(
                **base,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                intermediate_size=32,
                num_experts=E,
                decoder_sparse_step=1,
                norm_topk_prob=bool(norm_topk_prob),
            ),
        )
    elif kind == "qwen3_moe":
        cls, cfg = (
            tr.Qwen3MoeForCausalLM,
            tr.Qwen3MoeConfig(
                **base,
                moe_intermediate_size=32,
                intermediate_size=32,
                num_experts=E,
                decoder_sparse_step=1,
                norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob,
            ),
        )
    else:
        cls, cfg = tr.OlmoeForCausalLM, tr.OlmoeConfig(**base, intermediate_size=32, num_experts=E)
    torch.manual_seed(seed)
    return cls(cfg)


def batch(rank: int, step: int, n: int = 2, s: int = 8):
    return torch.randint(3, VOCAB, (n, s), generator=torch.Generator().manual_seed(1000 * step + rank))


def gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def block_reference(block, X, D0, beta, renorm: bool, normalize_topk: bool):
    """float64: pi, the selection, every expert's output, D after this step, and the experts' combine."""
    W = block.gate.weight.detach().double()
    pi = torch.softmax(X @ W.t(), -1)
    top = torch.topk(pi, K, -1)
    C = torch.zeros_like(pi, dtype=torch.bool).scatter(1, top.indices, True)
    gu, dn = block.experts.gate_up_proj.detach().double(), block.experts.down_proj.detach().double()
    Y = []
    for e in range(E):
        g, u = (X @ gu[e].t()).chunk(2, -1)
        Y.append((F.silu(g) * u) @ dn[e].t())
    Y = torch.stack(Y)  # [E, T, H]
    return pi, C, Y


def check_block_against_reference(kind: str, rank: int, normalize_topk) -> None:
    """One converted block's experts output and D equal a float64 dense reference built from the
    block's own weights, the EMA over both ranks' tokens (committed at the step: the forward used
    the D committed before). normalize_topk None: as the model's own block."""
    model = tiny(kind)
    model.train()
    hf.convert(model, router="default", beta=0.5, normalize_topk=normalize_topk)
    block = hf.moe_blocks(model)[0][1]
    cap = {}
    block.register_forward_pre_hook(lambda m, a: cap.update(x=a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
    block.experts.register_forward_hook(lambda m, a, o: cap.update(out=o.detach().clone()))
    with torch.no_grad():
        block.defaults.defaults_ED.normal_(generator=torch.Generator().manual_seed(3))  # same on both ranks
    D0 = block.defaults.defaults_ED.clone()
    ids = batch(rank, 0)
    model(ids, labels=ids).loss.backward()
    commit_defaults(model)
    renorm = kind == "mixtral" or bool(getattr(model.config, "norm_topk_prob", False))
    if normalize_topk is None:
        normalize_topk = renorm
    xs = [x.double() for x in gather(cap["x"])]
    mine = None
    sums, counts = torch.zeros(E, 16, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for r, X in enumerate(xs):
        pi, C, Y = block_reference(block, X, D0, 0.5, renorm, normalize_topk)
        sums += torch.einsum("te,eth->eh", C.double(), Y)
        counts += C.sum(0).double()
        if r == rank:
            mine = (pi, C, Y)
    D_ref = torch.where(counts[:, None] > 0, 0.5 * D0.double() + 0.5 * sums / counts.clamp_min(1)[:, None], D0.double())
    pi, C, Y = mine
    gates = pi * C
    if normalize_topk:
        gates = gates / gates.sum(-1, keepdim=True)
        # Renormalised gates (docs/method.md): the dense mixture over all experts with D_i where
        # expert i did not run: sum_i pi_i E^_i (D0 has no zero row here).
        out_ref = torch.einsum("te,eth->th", pi * C, Y) + (pi * ~C) @ D0.double()
    else:
        out_ref = torch.einsum("te,eth->th", gates, Y) + (pi * ~C) @ D0.double()
    what = f"{kind} (normalize_topk={normalize_topk})"
    torch.testing.assert_close(block.defaults.defaults_ED.double(), D_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: D {m}")
    torch.testing.assert_close(cap["out"].double(), out_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: output {m}")
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0


def train_ddp(model, rank: int, steps: int, gas: int = 1, first: int = 0):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = model if isinstance(model, DDP) else DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    losses = []
    for step in range(first, first + steps):
        for mb in range(gas):
            ids = batch(rank, 10 * step + mb)
            ctx = ddp.no_sync() if mb < gas - 1 else torch.enable_grad()
            with ctx:
                loss = ddp(ids, labels=ids).loss / gas
                loss.backward()
            losses.append(float(loss) * gas)
        opt.step()
        opt.zero_grad()
    return ddp, losses


def same_on_ranks(model, what: str) -> None:
    for name, block in hf.moe_blocks(model):
        D = block.defaults.defaults_ED
        parts = gather(D)
        assert D.abs().sum() > 0, f"{what}: {name} D is zero"
        assert all(torch.equal(p, parts[0]) for p in parts), f"{what}: {name} D differs between ranks"


def ddp_checks(rank, world, tmpdir):
    """Plain DDP: topk is HF exactly; default equals the reference; D identical after training; GAS
    updates D once per micro-batch; gradient checkpointing does not double the updates and gives the
    same D and router gradients; save_pretrained -> from_pretrained + convert(state_from) keeps D."""
    for kind in KINDS:
        plain, conv = tiny(kind), tiny(kind)
        hf.convert(conv, router="topk")
        ids = batch(rank, 0)
        a, b = plain(ids, labels=ids), conv(ids, labels=ids)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss), kind
        for normalize_topk in (None, False, True):
            check_block_against_reference(kind, rank, normalize_topk)
        # Converting a pretrained model keeps its function at D = 0 (the model's own renormalisation).
        plain, conv = tiny(kind), hf.convert(tiny(kind), router="default")
        plain.train(), conv.train()
        torch.testing.assert_close(
            conv(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-6, msg=lambda m, kind=kind: f"{kind} converted at D=0: {m}"
        )
        model = hf.convert(tiny(kind), router="default", beta=0.9)
        ddp, losses = train_ddp(model, rank, steps=3, gas=2)
        same_on_ranks(model, f"{kind} DDP")
        # The torch optimizer's step commits (3 steps, each with 2 micro-batches of statistics).
        assert all(b.defaults.num_updates == 3 and b.defaults.pending == 0 for _, b in hf.moe_blocks(model)), kind
        assert all(torch.isfinite(torch.tensor(losses))), losses
    loops_as_users_run_them(rank)
    padding_is_masked(rank)
    # Qwen2-MoE with norm_topk_prob (renormalised) also matches with normalize_topk.
    # Activation checkpointing (HF's): once per forward, same D and router gradients as without.
    runs = {}
    for gc in (False, True):
        model = hf.convert(tiny("qwen3_moe"), router="default", beta=0.5)
        if gc:
            model.gradient_checkpointing_enable()
        model.train()
        for step in range(2):
            ids = batch(rank, step)
            model(ids, labels=ids).loss.backward()
            commit_defaults(model)
        runs[gc] = model
    for (_, b0), (_, b1) in zip(hf.moe_blocks(runs[False]), hf.moe_blocks(runs[True])):
        assert b1.defaults.num_updates == b0.defaults.num_updates == 2
        assert torch.equal(b0.defaults.defaults_ED, b1.defaults.defaults_ED)
        torch.testing.assert_close(b0.gate.weight.grad, b1.gate.weight.grad, rtol=1e-5, atol=1e-7)
    # save_pretrained / from_pretrained round trip keeps D (rank 0 writes, both read).
    model = runs[False]
    path = f"{tmpdir}/hf_saved"
    if rank == 0:
        model.save_pretrained(path)
    dist.barrier()
    import transformers as tr

    loaded = tr.AutoModelForCausalLM.from_pretrained(path)
    keys = hf.load_defaults(hf.convert(loaded, router="default", beta=0.5), path)
    assert len(keys) == 2
    for (_, b0), (_, b1) in zip(hf.moe_blocks(model), hf.moe_blocks(loaded)):
        assert torch.equal(b0.defaults.defaults_ED, b1.defaults.defaults_ED)
    # A checkpoint saved before conversion has no D: said, not silently zero.
    if rank == 0:
        tiny("qwen3_moe").save_pretrained(f"{tmpdir}/hf_plain")
    dist.barrier()
    try:
        hf.convert(tiny("qwen3_moe"), router="default", state_from=f"{tmpdir}/hf_plain")
    except ValueError as e:
        assert "no default-moe defaults" in str(e)
    else:
        raise AssertionError("a checkpoint without D was accepted silently")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loops_as_users_run_them(rank) -> None:
    """HF gradient checkpointing (reentrant and not) vs none, bit for bit, in the loops of the
    correctness issue: two forwards in one backward, a forward whose backward is skipped, and
    generate() in train mode (different lengths per rank: no collective, no hang) before a step."""
    results = {}
    for mode in (None, "reentrant", "non_reentrant"):
        model = hf.convert(tiny("mixtral"), router="default", beta=0.5)
        if mode:
            model.gradient_checkpointing_enable({"use_reentrant": mode == "reentrant"})
        model.train()
        out = []
        for step in range(2):
            with torch.no_grad():  # RL rollout with the policy in train mode
                model.generate(batch(rank, 50 + step)[:1, :3], max_new_tokens=4 + 3 * rank, do_sample=False, pad_token_id=0)
            skipped = batch(rank, 60 + step)
            _ = model(skipped, labels=skipped).loss  # non-finite loss, say: no backward
            a, b = batch(rank, 70 + step), batch(rank, 80 + step)
            (model(a, labels=a).loss + model(b, labels=b).loss).backward()
            out.append(_grads(model))
            assert all(blk.defaults.pending == 2 for _, blk in hf.moe_blocks(model)), mode
            model.zero_grad()
            commit_defaults(model)
        results[mode] = (out, [blk.defaults.defaults_ED.clone() for _, blk in hf.moe_blocks(model)])
    ref_grads, ref_D = results[None]
    for mode in ("reentrant", "non_reentrant"):
        grads, D = results[mode]
        for step, (a, b) in enumerate(zip(ref_grads, grads)):
            for n in a:
                torch.testing.assert_close(
                    b[n], a[n], rtol=0, atol=0, msg=lambda m, mode=mode, step=step, n=n: f"{mode} step {step} {n}: {m}"
                )
        for a, b in zip(ref_D, D):
            assert torch.equal(a, b), mode


def padding_is_masked(rank) -> None:
    """A right-padded batch with its attention_mask gives the D of its real tokens alone."""
    padded, alone = (hf.convert(tiny("qwen3_moe"), router="default", beta=0.5) for _ in range(2))
    ids = batch(rank, 90)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    padded(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for row, n in ((0, 5), (1, 8)):
        alone(ids[row : row + 1, :n], labels=ids[row : row + 1, :n]).loss.backward()
    commit_defaults([padded, alone])
    for (name, a), (_, b) in zip(hf.moe_blocks(padded), hf.moe_blocks(alone)):
        assert a.defaults.defaults_ED.abs().sum() > 0
        torch.testing.assert_close(
            a.defaults.defaults_ED,
            b.defaults.defaults_ED,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"padded vs real tokens, {name}: {m}",
        )


def deepspeed_checks(rank, world, tmpdir):
    """The "default_moe" section of a DeepSpeed config on an HF model without expert parallelism:
    converted in place at ZeRO 2 and 3; under ZeRO-3 (parameters partitioned) the EMA sees the full
    expert outputs: the statistics of the first micro-batch equal those of an unpartitioned copy;
    D identical on both ranks after training with gradient accumulation 2, committed once per
    optimizer step by the engine."""
    import deepspeed

    import default_moe.deepspeed  # noqa: F401  (the one added line)

    section = {"router": "default", "beta": 0.7}
    for stage in (2, 3):
        model = tiny("qwen3_moe", seed=stage)
        reference = hf.convert(copy.deepcopy(model), router="default", beta=0.7)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10_000,
            "default_moe": section,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        assert all(getattr(b, "_default_moe", None) is not None for _, b in hf.moe_blocks(engine.module))
        reference.train()
        losses = []
        for step in range(3):
            for mb in range(2):
                ids = batch(rank, 10 * step + mb + 1)
                loss = engine(ids, labels=ids).loss
                engine.backward(loss)
                if step == mb == 0:
                    reference(ids, labels=ids).loss.backward()
                    for (name, b), (_, r) in zip(hf.moe_blocks(engine.module), hf.moe_blocks(reference)):
                        torch.testing.assert_close(
                            b.defaults.stats_ED1,
                            r.defaults.stats_ED1,
                            rtol=1e-5,
                            atol=1e-5,
                            msg=lambda m, stage=stage, name=name: f"ZeRO-{stage} {name}: {m}",
                        )
                engine.step()
                losses.append(float(loss))
        same_on_ranks(engine.module, f"ZeRO-{stage}")
        assert all(b.defaults.num_updates == 3 and b.defaults.pending == 0 for _, b in hf.moe_blocks(engine.module))
        assert all(torch.isfinite(torch.tensor(losses)))
