"""Stage 1 (LoRA on the language model, optionally the vision side in full) on every supported backbone family."""

import pytest
import torch

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import PreferenceCollator, PreferenceExample
from imagegem_hf.preference.tiny_backbones import tiny_idefics2, tiny_idefics3, tiny_qwen2_vl
from imagegem_hf.preference.trainer import (
    PreferencePrototypeTrainer,
    PreferencePrototypeTrainingConfig,
    prepare_stage1,
)
from imagegem_hf.testing import random_images, tiny_vlm

# backbone → (builder, its language model's attribute under `model`, its vision-side attributes under `model`)
BACKBONES = {
    "llava": (tiny_vlm, "language_model", ("vision_tower", "multi_modal_projector")),
    "idefics2": (tiny_idefics2, "text_model", ("vision_model", "connector")),
    "idefics3": (tiny_idefics3, "text_model", ("vision_model", "connector")),
    "qwen2_vl": (tiny_qwen2_vl, "language_model", ("visual",)),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def toy_examples(n: int = 2):
    images = dict(zip([f"im{i}" for i in range(4 * n)], random_images(4 * n, size=16, seed=5), strict=True))
    examples = [
        PreferenceExample(
            f"u{i}", [(f"im{4 * i}", f"im{4 * i + 1}", "a cat")], f"im{4 * i + 2}", f"im{4 * i + 3}", "x", 1
        )
        for i in range(n)
    ]
    return examples, images


@pytest.mark.parametrize("train_vision_tower", [True, False], ids=["vision-trained", "vision-frozen"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_stage1_puts_lora_on_the_language_model_only_and_takes_a_step(name, train_vision_tower, tmp_path):
    make, language_model, vision_names = BACKBONES[name]
    backbone, processor = make(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=0, n_ref=1)
    args = PreferencePrototypeTrainingConfig(
        output_dir=str(tmp_path),
        stage=1,
        n_ref=1,
        train_vision_tower=train_vision_tower,
        lora_dropout=0.0,
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    peft_model = prepare_stage1(model, args)
    prefix = "base_model.model.backbone.model."
    lora_layers = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    layers = backbone.config.get_text_config().num_hidden_layers
    assert len(lora_layers) == layers * len(PROJECTIONS)
    assert all(n.startswith(f"{prefix}{language_model}.") and n.endswith(PROJECTIONS) for n in lora_layers)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    in_vision = [n for n in trainable if n.startswith(tuple(f"{prefix}{v}." for v in vision_names))]
    assert set(trainable) - set(in_vision) == {n for n in trainable if "lora_" in n}  # elsewhere only LoRA
    assert bool(in_vision) == train_vision_tower
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    examples, images = toy_examples()
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=1, shuffle_references=False)
    PreferencePrototypeTrainer(model=peft_model, args=args, train_dataset=examples, data_collator=collator).train()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed)
    assert changed <= set(trainable)  # nothing frozen moved
    assert bool(changed & set(in_vision)) == train_vision_tower
