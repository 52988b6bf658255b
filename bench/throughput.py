"""Training throughput: plain steps vs pruning steps (masks + Lagrangian) of the same model.

    python bench/throughput.py --shape llama2_7b --layers 4 --seq-len 4096 --batch 4 --steps 20      # GPU
    python bench/throughput.py --shape tiny_gqa --seq-len 64 --batch 8 --steps 5 --device cpu          # smoke

For each attention implementation it times optimizer steps of (i) plain training of the model (one
AdamW group), and (ii) the pruning step: hard-concrete masks sampled every forward, the Lagrangian term
added to the loss, three parameter groups (weights / mask logits / multipliers). It prints tokens/s, the
model FLOPs utilisation (6 N + attention FLOPs per token against the device's peak, when known) and the
pruning overhead ratio (target: <= 1.10x). bf16 autocast on GPU, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from composer.optim import DecoupledAdamW

from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM, flash_attn_available
from shearing.models.shapes import count_params, named_shape
from shearing.pruning.l0 import L0Module

# Dense bf16 peak FLOP/s by device name fragment (vendor data sheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(shape, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 6 L T D_attn (causal attention scores and values)."""
    non_embedding = count_params(shape) - shape.vocab_size * shape.hidden_size * (
        1 if shape.tie_word_embeddings else 2
    )
    lm_head = shape.vocab_size * shape.hidden_size
    attention = 6 * shape.num_hidden_layers * seq_len * shape.num_attention_heads * shape.head_dim
    return 6 * (non_embedding + lm_head) + attention


def time_steps(model, l0, device, args, autocast_dtype) -> float:
    groups = [{"params": list(model.parameters())}]
    if l0 is not None:
        groups += [
            {"params": list(l0.log_alphas.parameters()), "lr": 1.0},
            {"params": list(l0.lambdas.parameters()), "lr": -1.0},
        ]
    opt = DecoupledAdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            masks = l0() if l0 is not None else None
            logits = model(batch, masks=masks)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            if l0 is not None:
                loss = loss + l0.pending_lagrangian
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2_7b")
    parser.add_argument(
        "--target", default="llama2_2.7b", help="named target shape (its widths; layers capped)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn", default="sdpa,flash")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = dataclasses.replace(named_shape(args.shape), num_hidden_layers=args.layers)
    target = shape.with_target(named_shape(args.target).prunable())
    target = dataclasses.replace(target, num_hidden_layers=min(target.num_hidden_layers, args.layers))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.batch * args.seq_len
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; shape {args.shape} with {args.layers} layers ({count_params(shape):,} params); "
        f"batch {args.batch} x seq {args.seq_len}; torch {torch.__version__}"
    )
    print(f"{'attn':<8}{'step':<10}{'tokens/s':>12}{'MFU':>8}{'overhead':>10}")
    for attn in args.attn.split(","):
        if attn == "flash" and not flash_attn_available():
            print(f"{attn:<8}skipped: flash-attn not installed")
            continue
        torch.manual_seed(0)
        model = MaskedLlamaForCausalLM(
            config_from_shape(shape, max_position_embeddings=args.seq_len), attn_impl=attn
        )
        model.to(device).train()
        plain = time_steps(model, None, device, args, autocast_dtype)
        l0 = L0Module(shape, target).to(device).train()
        pruning = time_steps(model, l0, device, args, autocast_dtype)
        for label, seconds in (("plain", plain), ("pruning", pruning)):
            mfu = f"{tokens * flops_per_token(shape, args.seq_len) / seconds / peak:.1%}" if peak else "n/a"
            ratio = f"{seconds / plain:.3f}x" if label == "pruning" else ""
            print(f"{attn:<8}{label:<10}{tokens / seconds:>12,.0f}{mfu:>8}{ratio:>10}")
        del model, l0
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
