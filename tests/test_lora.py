"""LoRA adapters served by the registry on their base's loaded copy (mmdemo.lora), without peft: peft's and
diffusers' formats, the budget (only the adapter's bytes), the base held during adapter calls and dropped with
its adapters, clear load errors, and four threads interleaving base and LoRA calls on one copy, each getting
exactly the answer it gets alone."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdemo.catalog import MODEL_ENTRY_FILE
from mmdemo.config import Settings
from mmdemo.errors import ModelLoadError
from mmdemo.finetune import adapter_for
from mmdemo.lora import DIFFUSERS_WEIGHTS_FILE
from mmdemo.placement import Placement
from mmdemo.tasks import open_registry, run

from finetune_util import counting_registry
from test_task_concurrency import THREADS, assert_same, comparable, meeting_in, pictures

CAPTION, CLIP, SD = "tiny-blip-caption", "tiny-clip", "tiny-stable-diffusion"


@pytest.fixture(scope="module")
def settings(tiny_data_dir, tmp_path_factory) -> Settings:
    """The session's tiny checkpoints, with a models folder of this module's own adapters."""
    data_dir = tmp_path_factory.mktemp("lora-data")
    (data_dir / "tiny-models").symlink_to(Settings(profile="tiny", data_dir=tiny_data_dir).tiny_dir,
                                          target_is_directory=True)
    settings = Settings(profile="tiny", data_dir=data_dir, device="cpu")
    registry = open_registry(settings)
    make_peft_adapter(settings, registry, CAPTION, "blip-lora", ["qkv", "query", "value", "dense"])
    make_peft_adapter(settings, registry, CLIP, "clip-lora", ["q_proj", "v_proj", "fc1"])
    make_diffusers_adapter(settings, registry, "sd-lora")
    return settings


def entry(folder: Path, base_spec, params_m: float) -> None:
    (folder / MODEL_ENTRY_FILE).write_text(json.dumps({"task": base_spec.task, "kind": base_spec.kind,
                                                       "params_m": params_m, "adapter_of": base_spec.id}))


def make_peft_adapter(settings, registry, base: str, name: str, targets: list[str]) -> Path:
    """A peft LoRA with random (non-zero) matrices on ``base``, saved as a fine-tuning job saves one."""
    from peft import LoraConfig, get_peft_model

    spec = registry.catalog.get(base)
    model, processor = adapter_for(spec.task).load(spec, registry.resolve_location(spec), Placement("cpu", "float32"))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    folder = settings.models_dir / name
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    entry(folder, spec, 0.01)
    return folder


def make_diffusers_adapter(settings, registry, name: str) -> Path:
    """A UNet LoRA saved by diffusers (``pytorch_lora_weights.safetensors``), as text-to-image fine-tuning does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    spec = registry.catalog.get(SD)
    pipeline = StableDiffusionPipeline.from_pretrained(registry.resolve_location(spec))
    torch.manual_seed(0)
    pipeline.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                         init_lora_weights=False))
    folder = settings.models_dir / name
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet))
    entry(folder, spec, 0.01)
    return folder


def caption(i: int) -> dict:
    return dict(image=pictures()[i], max_new_tokens=8)


def test_an_adapter_is_served_on_the_base_copy_for_its_own_bytes(settings):
    registry, loads = counting_registry(settings)
    base_answer = run(registry, "image-to-text", CAPTION, **caption(0))
    lora_answer = run(registry, "image-to-text", "blip-lora", **caption(0))
    assert loads == [CAPTION] and lora_answer["text"] != base_answer["text"]
    loaded = {m["id"]: m for m in registry.status()["loaded"]}
    adapter_bytes = sum(f.stat().st_size for f in (settings.models_dir / "blip-lora").glob("*.safetensors"))
    assert 0 < loaded["blip-lora"]["memory_bytes"] <= adapter_bytes < loaded[CAPTION]["memory_bytes"] / 3
    assert registry.used_bytes() == loaded["blip-lora"]["memory_bytes"] + loaded[CAPTION]["memory_bytes"]
    # the base's own calls are untouched by the adapter hooked on its copy
    assert comparable(run(registry, "image-to-text", CAPTION, **caption(0))) == comparable(base_answer)


def test_the_base_is_held_during_an_adapter_call_and_dropped_with_its_adapters(settings):
    registry, loads = counting_registry(settings)

    def during_call(bundle):
        held = {m["id"]: m["in_use"] for m in registry.status()["loaded"]}
        evicted = registry._evict_idle(keep=None, needed=None)  # what a full budget would do now
        return held, evicted

    held, evicted = registry.call("blip-lora", during_call)
    assert held == {CAPTION: 1, "blip-lora": 1} and evicted == []
    first = run(registry, "image-to-text", "blip-lora", **caption(1))
    # eviction of the idle base takes the adapter with it; the next adapter call loads the base again
    assert sorted(registry._evict_idle(keep=None, needed=None)) == ["blip-lora", CAPTION]
    assert registry.status()["loaded"] == []
    assert comparable(run(registry, "image-to-text", "blip-lora", **caption(1))) == comparable(first)
    assert loads == [CAPTION, CAPTION]
    # unloading the adapter alone takes its hooks off the base
    assert registry.unload("blip-lora") and [m["id"] for m in registry.status()["loaded"]] == [CAPTION]
    base = registry.call(CAPTION, lambda bundle: bundle.model)
    assert not any(module._forward_hooks for module in base.modules())
    assert registry.unload(CAPTION) is True


def test_a_diffusers_lora_gives_the_image_diffusers_gives(settings):
    """The registry's hooked UNet LoRA against diffusers' own ``load_lora_weights`` on the same seed."""
    from diffusers import StableDiffusionPipeline

    registry = open_registry(settings)
    request = dict(prompt="a red bicycle", steps=3, guidance=2.0, seed=7, width=64, height=64)
    served = np.asarray(run(registry, "text-to-image", "sd-lora", **request)["images"][0])
    base = np.asarray(run(registry, "text-to-image", SD, **request)["images"][0])
    pipeline = StableDiffusionPipeline.from_pretrained(registry.resolve_location(registry.catalog.get(SD)),
                                                       safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(str(settings.models_dir / "sd-lora"), weight_name=DIFFUSERS_WEIGHTS_FILE)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline("a red bicycle", num_inference_steps=3, guidance_scale=2.0, width=64, height=64,
                        generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(served.astype(int) - base.astype(int)).max() > 5


@pytest.mark.parametrize("task, base, adapter, requests, forward", [
    ("image-to-text", CAPTION, "blip-lora", [caption(i) for i in range(THREADS)],
     lambda bundle: bundle.model.vision_model),
    ("zero-shot-image-classification", CLIP, "clip-lora",
     [dict(image=pictures()[i], labels="cat, dog, car", template=f"picture {i}: {{}}") for i in range(THREADS)],
     lambda bundle: bundle.model.vision_model),
    ("text-to-image", SD, "sd-lora",
     [dict(prompt=f"a red bicycle number {i}", steps=2 + i, guidance=2.0, seed=10 + i, width=64, height=64)
      for i in range(THREADS)], lambda bundle: bundle.pipeline.unet),
])
def test_base_and_lora_calls_interleaved_on_four_threads_match_single_calls(settings, task, base, adapter, requests,
                                                                           forward):
    """Threads 0 and 2 call the base, 1 and 3 its adapter, all four inside the one shared copy at once."""
    registry, loads = counting_registry(settings)
    models = [base if i % 2 == 0 else adapter for i in range(THREADS)]
    alone = [comparable(run(registry, task, model, **request)) for model, request in zip(models, requests)]
    crossed = [comparable(run(registry, task, models[i + 1 - 2 * (i % 2)], **request))
               for i, request in enumerate(requests)]  # the same requests on the other model
    assert any(json.dumps(a, default=str) != json.dumps(c, default=str) for a, c in zip(alone, crossed)) or \
        any(not np.array_equal(x, y) for a, c in zip(alone, crossed) for x, y in zip(a.get("images", []),
                                                                                    c.get("images", [])))
    bundle = registry.call(base, lambda loaded: loaded)
    with meeting_in(forward(bundle)) as meeting, ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(lambda pair: comparable(run(registry, task, pair[0], **pair[1])),
                                 zip(models, requests)))
    assert meeting.met == THREADS  # base and adapter calls were inside the shared model at the same time
    for one, other in zip(alone, together):
        assert_same(one, other)
    assert loads == [base]


def test_adapters_that_cannot_be_served_fail_with_a_clear_message(settings, tmp_path):
    broken = settings.models_dir / "broken-lora"
    shutil.copytree(settings.models_dir / "blip-lora", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    orphan = settings.models_dir / "orphan-lora"
    shutil.copytree(settings.models_dir / "blip-lora", orphan)
    (orphan / MODEL_ENTRY_FILE).write_text(json.dumps({"task": "image-to-text", "kind": "blip",
                                                       "adapter_of": "no-such-base"}))
    mismatched = settings.models_dir / "wrong-base-lora"  # matrices of another model's width
    shutil.copytree(settings.models_dir / "clip-lora", mismatched)
    weights = load_file(mismatched / "adapter_model.safetensors")
    key = sorted(k for k in weights if "lora_A" in k)[0]
    weights[key] = torch.zeros(4, 7)
    save_file(weights, mismatched / "adapter_model.safetensors")
    try:
        registry = open_registry(settings)
        with pytest.raises(ModelLoadError, match="broken-lora.*LoRA adapter cannot be read"):
            run(registry, "image-to-text", "broken-lora", **caption(0))
        with pytest.raises(ModelLoadError, match="adapter of 'no-such-base', which is not a image-to-text model"):
            run(registry, "image-to-text", "orphan-lora", **caption(0))
        with pytest.raises(ModelLoadError, match="wrong-base-lora.*do not fit the base model"):
            run(registry, "zero-shot-image-classification", "wrong-base-lora", image=pictures()[0], labels="a, b")
        # the failed adapter left no hooks behind: the base answers as before, and so does a good adapter
        clean = open_registry(settings)
        for model_id in (CLIP, "clip-lora"):
            request = dict(image=pictures()[0], labels="a, b")
            assert comparable(run(registry, "zero-shot-image-classification", model_id, **request)) == \
                comparable(run(clean, "zero-shot-image-classification", model_id, **request))
    finally:
        for folder in (broken, orphan, mismatched):
            shutil.rmtree(folder)


def test_the_web_server_serves_adapters_without_importing_peft(settings):
    """The serving side reads the adapter files itself: no peft, no training code. (accelerate is not checked
    here: transformers' ``from_pretrained`` imports it for any model, a base as much as an adapter's.)"""
    import subprocess
    import sys

    script = f"""
import json, sys
from mmdemo.config import Settings
from mmdemo.tasks import open_registry, run
from PIL import Image
registry = open_registry(Settings(profile="tiny", data_dir={str(settings.data_dir)!r}, device="cpu"))
answer = run(registry, "image-to-text", "blip-lora", image=Image.new("RGB", (32, 32), "red"), max_new_tokens=4)
print(json.dumps({{"model": answer["model"]["id"], "loaded": [m["id"] for m in registry.status()["loaded"]],
                  "imported": [m for m in ("peft", "mmdemo.finetune.lora", "mmdemo.finetune.train",
                                         "mmdemo.finetune.jobs")
                               if m in sys.modules]}}))
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen == {"model": "blip-lora", "loaded": ["blip-lora", CAPTION], "imported": []}
