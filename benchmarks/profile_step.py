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
    args = ap.parse_args()

    from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
    from rwkv_disha.model.config import ModelConfig
    from rwkv_disha.model.init import init_state_dict
    from rwkv_disha.model.load import build_model, infer_config

    sd = init_state_dict(args.n_layer, args.n_embd, args.vocab)
    cfg: ModelConfig = infer_config(sd)
    model = build_model(cfg, op=args.op, device="cpu")
    model.load_state_dict(sd)
    low = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(device=args.device, dtype=low if args.device != "cpu" else torch.float32)
    acfg = AdapterConfig.from_cli("disha", f'{{"mode":"bone","r":{args.r}}}', "", ["ln"])
    inject_adapters(model, acfg)
    mark_trainable(model, acfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, args.vocab, (args.B, args.T + 1), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            logits = model(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
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
    with profile(activities=acts) as prof:
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


if __name__ == "__main__":
    main()
