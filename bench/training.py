"""Full fine-tuning against LoRA on a mid-size BLIP captioner: samples per second and peak memory, each
configuration in a child process of its own (peak memory is the child's maximum resident set on CPU, or
torch's peak allocation on CUDA), in the same run.

    python bench/training.py                       # BLIP base shapes (random init, fp32), batch 8, 3 steps
    python bench/training.py --steps 5 --image-size 384 --device cuda

The model is ``BlipForConditionalGeneration`` built from BLIP base's configuration (ViT-B/16 vision
encoder and a 12-layer BERT-base text decoder, ~250M parameters) with random weights; inputs are random
pixels and token ids. LoRA uses the caption adapter's default targets and rank (``mmdemo.finetune.lora``).
The first step is a warm-up and not timed. The issue's target: LoRA's peak memory at most half of full
training's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RATIO_TARGET = 0.5


def child(args: argparse.Namespace) -> dict:
    """One configuration: build, train ``args.steps`` steps, report speed and peak memory."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    from mmdemo.finetune import FinetuneConfig, adapter_for

    torch.manual_seed(0)
    config = BlipConfig()
    config.vision_config.image_size = args.image_size
    model = BlipForConditionalGeneration(config).to(args.device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if args.mode == "lora":
        from mmdemo.finetune.lora import add_lora

        run = FinetuneConfig("image-to-text", base="bench", name="bench", lora=True, lora_rank=args.rank)
        model = add_lora(model, adapter_for("image-to-text"), "blip", run)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    ids = torch.randint(1000, config.text_config.vocab_size, (args.batch, args.tokens), device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = None
    for step in range(args.steps + 1):  # 1. one warm-up step, then the timed ones
        if step == 1:
            started = time.perf_counter()
        loss = model(pixel_values=pixels, input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"mode": args.mode, "params_m": round(params_m, 1),
            "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
            "samples_per_s": round(args.batch * args.steps / seconds, 3), "peak_gib": round(peak / 1024**3, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="BLIP base uses 384; 224 keeps CPU runs short")
    parser.add_argument("--tokens", type=int, default=24, help="caption length in tokens")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # a child's configuration
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for mode in ("full", "lora"):
        argv = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        ran = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if ran.returncode:
            print(ran.stderr[-3000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(ran.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    full, lora = results["full"], results["lora"]
    memory = lora["peak_gib"] / full["peak_gib"]
    print(f"BLIP base shapes ({full['params_m']}M parameters, {lora['trainable_m']}M trained by LoRA r={args.rank}), "
          f"batch {args.batch}, {args.image_size}px, {args.device}: LoRA/full samples/s "
          f"{lora['samples_per_s'] / full['samples_per_s']:.2f}x, peak memory {memory:.2f}x "
          f"({lora['peak_gib']:.2f} / {full['peak_gib']:.2f} GiB; target <= {RATIO_TARGET}x: "
          f"{'met' if memory <= RATIO_TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
