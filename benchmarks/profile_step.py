"""Where does a training step go? The adapted model alone (no Lightning): forward + backward + AdamW step,
timed, then one step under torch.profiler (top ops by self time, and how many ops / kernels a step runs).

    .venv/bin/python benchmarks/profile_step.py                               # CPU, 0.1B shape, T=512
    python benchmarks/profile_step.py --device cuda --dtype bf16 --op fla     # GPU

Compare its step time with benchmarks/bench_train.py (the whole `train` command) to see what the
training loop adds.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--op", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true", help="also group the CPU table by input shapes")
    args = ap.parse_args()

    from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
    from rwkv_disha.model.config import ModelConfig
    from rwkv_disha.model.init import init_state_dict
    from rwkv_disha.model.load import build_model, infer_config
    from rwkv_disha.train.build import base_dtype_for
    from rwkv_disha.train.loss import lm_loss

    sd = init_state_dict(args.n_layer, args.n_embd, args.vocab)
    cfg: ModelConfig = infer_config(sd)
    model = build_model(cfg, op=args.op, device="cpu")
    model.load_state_dict(sd)
    # the frozen base's dtype as `train` holds it (bf16 on a GPU, and on a CPU that trains bf16)
    base = base_dtype_for(args.dtype, torch.float32, on_gpu=args.device == "cuda")
    model.to(device=args.device, dtype=base)
    acfg = AdapterConfig.from_cli("disha", f'{{"mode":"bone","r":{args.r}}}', "", ["ln"])
    inject_adapters(model, acfg)
    mark_trainable(model, acfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, args.vocab, (args.B, args.T + 1), device=args.device)
    mask = torch.ones(args.B, args.T, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = lm_loss(model, idx[:, :-1], idx[:, 1:], mask)  # train's loss: chunked head + CE
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.B * args.T / dt
    print(f"step {dt * 1e3:.1f} ms  ({tok_s:,.0f} tokens/s)  {cfg.summary()}", args.device, args.dtype)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts, record_shapes=args.shapes) as prof:
        step()
        sync()
    ka = prof.key_averages()
    n_ops = sum(e.count for e in ka if e.key.startswith("aten::"))
    print(f"aten ops per step: {n_ops}")
    if args.device == "cuda":
        n_kernels = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"CUDA kernels per step: {n_kernels}")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.shapes:
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in by_shape)
        print("self CPU %   ms   calls  op  input shapes")
        for e in by_shape[: args.rows]:
            ms = e.self_cpu_time_total / 1e3
            print(f"{100 * ms * 1e3 / total:5.1f} {ms:8.1f} {e.count:6d}  {e.key}  {e.input_shapes}")


if __name__ == "__main__":
    main()
