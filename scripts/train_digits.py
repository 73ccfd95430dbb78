"""Train the tiny class-conditioned Flux DiT on scikit-learn's digits and save it as the package's
diffusers folder (cachedit_fx/digits/model). Rectified flow, FlowMatchEulerDiscreteScheduler's
convention: x_t = (1 - sigma) x0 + sigma noise, the model predicts noise - x0 from timestep sigma.
The condition is a one-hot label (10 digits + a null class, dropped 10% of the time for classifier-free
guidance) fed as encoder_hidden_states and pooled_projections, so the transformer's own context and
pooled-text embedders are the learned label embedding.

Same seed, same thread count -> the same weights, bit for bit (the script prints their SHA-256; the
shipped ones: seed 0, 2 threads, 2500 steps, ea9160ee...). 434 s on 2 CPU cores shared with other jobs
(load average 2-3); not run in CI.

    python scripts/train_digits.py [--steps 2500] [--seed 0] [--out cachedit_fx/digits/model]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import time

import torch

from cachedit_fx.digits import data
from cachedit_fx.digits.pipeline import DigitsPipeline, build_scheduler, build_transformer


def train(steps: int, seed: int, batch: int, lr: float, label_dropout: float, ema_decay: float, log_every: int):
    torch.manual_seed(seed)
    images, labels = data.load_dataset()
    x0_all = data.pack(torch.from_numpy(images))
    labels_all = torch.from_numpy(labels)
    model = build_transformer().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    img_ids, txt_ids = data.image_ids(), data.text_ids()
    g = torch.Generator().manual_seed(seed)
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0, y = x0_all[idx], labels_all[idx]
        y = torch.where(torch.rand(batch, generator=g) < label_dropout, torch.full_like(y, data.NULL_CLASS), y)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, SD3's sampling of sigma
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        cond = data.condition(y)
        pred = model(hidden_states=xt, encoder_hidden_states=cond[:, None], pooled_projections=cond,
                     timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {running / log_every:.4f}  {time.time() - start:.0f}s", flush=True)
            running = 0.0
    return ema


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the result depends on it)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "cachedit_fx", "digits", "model"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = train(args.steps, args.seed, args.batch, args.lr, args.label_dropout, args.ema_decay, args.log_every)
    model = model.to(torch.float16)
    pipe = DigitsPipeline(transformer=model, scheduler=build_scheduler())
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {os.path.normpath(args.out)}; fp16 weights sha256 {weights_sha256(model)}")


if __name__ == "__main__":
    main()
