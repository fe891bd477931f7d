"""``make diffusion-zoo``: the testbed, built reproducibly and cached under runs/diffusion-zoo/.

1. the base ``ConceptPipeline`` trained from scratch (UNet and text encoder together, DDPM noise-prediction loss,
   10% empty prompts for classifier-free guidance) on base scenes: three colours, three shapes, left or right;
2. one LoRA per concept (``cross`` object, ``yellow`` colour, ``striped`` style, ``framed`` background) trained on
   the frozen base with diffusers' ``unet.add_adapter`` and written with ``save_lora_weights``, so each is a
   ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights`` reads;
3. the judge (``judge.py``).

``python -m lorakit.diffusion.zoo [--out DIR]``; a finished build whose settings match is reused.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .files import save_lora
from .judge import train_judge
from .pipeline import LORA_TARGETS, ConceptPipeline, build_pipeline, to_latents
from .shapes import CONCEPTS, batch, sample_scene

DEFAULT_DIR = Path("runs/diffusion-zoo")


@dataclass(frozen=True)
class ZooSettings:
    """Everything the build depends on (a cached build is reused only if these match)."""

    base_steps: int = 800
    base_batch: int = 32
    base_lr: float = 2e-3
    lora_steps: int = 400
    lora_batch: int = 16
    lora_lr: float = 3e-3
    lora_rank: int = 4
    judge_steps: int = 600
    judge_noise: float = 0.8
    seed: int = 0
    version: int = 2


def denoising_loss(pipe: ConceptPipeline, noise_scheduler, scenes, prompts, gen: torch.Generator) -> torch.Tensor:
    """The DDPM loss ||eps - eps_theta(x_t, t, text)||^2 on drawn scenes."""
    x0 = to_latents(torch.from_numpy(batch(scenes)))
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(scenes),), generator=gen)
    states = pipe.text_encoder(pipe.token_ids(prompts))[0]
    pred = pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
    return torch.nn.functional.mse_loss(pred, noise)


def _fit(pipe, params, steps, lr, sample, desc, gen):
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        scenes, prompts = sample()
        loss = denoising_loss(pipe, noise_scheduler, scenes, prompts, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_base(s: ZooSettings) -> ConceptPipeline:
    """The base pipeline trained on base scenes."""
    pipe = build_pipeline(s.seed)
    rng, gen = np.random.default_rng(s.seed), torch.Generator().manual_seed(s.seed)

    def sample():
        scenes = [sample_scene(rng) for _ in range(s.base_batch)]
        return scenes, [sc.prompt if rng.random() > 0.1 else "" for sc in scenes]

    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    _fit(pipe, params, s.base_steps, s.base_lr, sample, "base UNet + text encoder", gen)
    return pipe


def train_lora(pipe: ConceptPipeline, concept: str, s: ZooSettings) -> None:
    """Add and train the adapter ``concept`` on the frozen base (scenes showing it, prompts naming it)."""
    from peft import LoraConfig

    seed = s.seed + 1 + list(CONCEPTS).index(concept)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_rank, init_lora_weights="gaussian",
                                     target_modules=LORA_TARGETS), adapter_name=concept)
    pipe.unet.set_adapters([concept])
    params = [p for p in pipe.unet.parameters() if p.requires_grad]

    def sample():
        scenes = [sample_scene(rng, (concept,)) for _ in range(s.lora_batch)]
        return scenes, [sc.prompt for sc in scenes]

    _fit(pipe, params, s.lora_steps, s.lora_lr, sample, f"LoRA {concept}", gen)


def build(out: Path = DEFAULT_DIR, settings: ZooSettings = ZooSettings()) -> Path:
    """Build the testbed in ``out`` (model/, loras/<concept>/, judge.safetensors, manifest.json) unless cached."""
    from safetensors.torch import save_file

    out = Path(out)
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("settings") == asdict(settings):
        print(f"diffusion zoo: cached in {out} (settings match)")
        return out
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base_key = {k: v for k, v in asdict(settings).items() if k.startswith("base_") or k == "seed"}
    stamp = out / "model" / "lorakit_base.json"
    if stamp.exists() and json.loads(stamp.read_text()) == base_key:
        print(f"diffusion zoo: base model cached in {out / 'model'}")
        pipe = ConceptPipeline.from_pretrained(out / "model")
    else:
        pipe = train_base(settings)
        pipe.save_pretrained(out / "model")
        stamp.write_text(json.dumps(base_key) + "\n")
    lora_key = {**base_key, **{k: v for k, v in asdict(settings).items() if k.startswith("lora_")}}
    lora_stamp = out / "loras" / "lorakit_loras.json"
    if lora_stamp.exists() and json.loads(lora_stamp.read_text()) == lora_key:
        print(f"diffusion zoo: LoRAs cached in {out / 'loras'}")
    else:
        for concept in CONCEPTS:
            train_lora(pipe, concept, settings)
            save_lora(pipe, concept, out / "loras" / concept, overwrite=True)
            pipe.unet.delete_adapters(concept)
        lora_stamp.write_text(json.dumps(lora_key) + "\n")
    judge, accuracy = train_judge(settings.judge_steps, settings.seed, lambda r: tqdm(r, desc="judge"),
                                  settings.judge_noise)
    save_file(judge.state_dict(), str(out / "judge.safetensors"))
    info = {"settings": asdict(settings), "judge_accuracy": accuracy, "build_seconds": round(time.time() - start, 1),
            "concepts": list(CONCEPTS)}
    manifest.write_text(json.dumps(info, indent=2) + "\n")
    print(f"diffusion zoo: built in {out} in {info['build_seconds']} s (judge accuracy {accuracy:.3f})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="build the diffusion testbed (cached)")
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--base-steps", type=int, default=ZooSettings.base_steps)
    p.add_argument("--lora-steps", type=int, default=ZooSettings.lora_steps)
    args = p.parse_args(argv)
    build(Path(args.out), ZooSettings(base_steps=args.base_steps, lora_steps=args.lora_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
