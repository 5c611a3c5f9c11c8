"""Training-step throughput of the preference prototype model: our batched sequence builder (one processor call for
a whole batch, each example's shared references encoded once and its liked and disliked targets run on top of them,
one forward/backward) vs a naive loop that calls the processor and runs the model once per sequence, same tiny
LLaVA, same examples, same loss. Target ≥ 2× examples/s. Batched full sequences (no prefix sharing) are reported too.

On a CUDA machine it also reports steps/s and peak memory of a training step with a real-size random-weight
LLaVA-1.5-7B-shaped backbone (bf16, LoRA on the language model, N_ref = 8 at 336² images).

Run: `python benchmarks/bench_preference.py [--batch 8 --n-ref 8 --repeats 5]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from imagegem_hf.preference import PreferencePrototypeModel
from imagegem_hf.preference.data import (
    PreferenceCollator,
    build_user_splits,
    group_pickapic_records,
    synthetic_pickapic_records,
)
from imagegem_hf.preference.losses import preference_loss
from imagegem_hf.testing import tiny_vlm


def examples_and_images(n_ref: int, image_size: int, seed: int = 0):
    records, images = synthetic_pickapic_records(n_users=12, pairs_per_user=14, image_size=image_size, seed=seed)
    splits = build_user_splits(
        group_pickapic_records(records), n_ref=n_ref, val_users=1, test_users=1, seen_users=0, seed=seed
    )
    return splits["train"], images


def batched_step(model, collator, examples) -> None:
    batch = collator(examples).to(model.device)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    half = labels.shape[0] // 2
    preference_loss(logits[:half], logits[half:])["loss"].backward()


def naive_step(model, collator, examples) -> None:
    """Per example: one processor call and one forward per target; the loss averaged over examples."""
    builder, load = collator.builder, collator.load_image
    for e in examples:
        logits = []
        for target in (e.liked, e.disliked):
            batch = builder([e.query(load, target, collator.n_ref)]).to(model.device)
            logits.append(model(**batch).logits)
        (preference_loss(logits[0], logits[1])["loss"] / len(examples)).backward()


def timed(step, model, collator, examples) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, collator, examples)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def measure(runs: dict, model, examples, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds of each `name: (step, collator)`, the runs interleaved so that a change in machine
    load during the benchmark affects all of them alike."""
    for step, collator in runs.values():  # warm-up
        timed(step, model, collator, examples)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (step, collator) in runs.items():
            best[name] = min(best[name], timed(step, model, collator, examples))
    return best


def tiny_comparison(batch: int, n_ref: int, repeats: int) -> None:
    examples, images = examples_and_images(n_ref, image_size=16)
    backbone, processor = tiny_vlm(seed=0)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=10, n_ref=n_ref)
    model.train()
    collator = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, shuffle_references=False)
    full = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, shuffle_references=False, share_prefix=False)
    work = examples[:batch]
    runs = {"ours": (batched_step, collator), "full": (batched_step, full), "baseline": (naive_step, collator)}
    seconds = measure(runs, model, work, repeats)
    ours, batched_full, baseline = (batch / seconds[name] for name in ("ours", "full", "baseline"))
    ratio = ours / baseline
    print(
        f"tiny LLaVA, {batch} pairs/step, N_ref={n_ref}: shared-prefix batch {ours:.1f} examples/s, "
        f"full-sequence batch {batched_full:.1f}, per-example loop {baseline:.1f}"
    )
    print(
        f"RESULT preference_train_examples_per_s ours={ours:.2f} baseline={baseline:.2f} ratio={ratio:.2f} "
        f"target=2 {'PASS' if ratio >= 2 else 'FAIL'}"
    )


def real_size_cuda(batch: int, n_ref: int, steps: int) -> None:
    """Steps/s and peak memory with a LLaVA-1.5-7B-shaped random backbone (bf16, LoRA r 8, N_ref pairs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, processor = tiny_vlm(seed=0, image_size=336)
    processor.patch_size = 14
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(processor.tokenizer),
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=16384,
            pad_token_id=processor.tokenizer.pad_token_id,
        ),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    with torch.device("cuda"):
        backbone = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model, builder = PreferencePrototypeModel.from_backbone(backbone, processor, num_prototypes=10, n_ref=n_ref)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=r".*language_model.*\.(q|k|v|o)_proj"))
    model.train()
    examples, images = examples_and_images(n_ref, image_size=336)
    work = examples[:batch]
    # The shared-prefix batch needs a KV cache, so with activation checkpointing the trainer scores full sequences.
    for checkpointing in (False, True):
        if checkpointing:
            backbone.gradient_checkpointing_enable()
        collator = PreferenceCollator(builder, images.__getitem__, n_ref=n_ref, share_prefix=not checkpointing)
        torch.cuda.reset_peak_memory_stats()
        seconds = measure({"ours": (batched_step, collator)}, model, work, steps)["ours"]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"LLaVA-1.5-7B-shaped, bf16, LoRA, {batch} pairs/step, N_ref={n_ref}, 336² images, "
            f"{'activation checkpointing, full sequences' if checkpointing else 'shared prefix'}: "
            f"{1 / seconds:.2f} steps/s, {batch / seconds:.2f} examples/s, peak memory {peak:.1f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Pairs (examples) per training step.")
    parser.add_argument("--n-ref", type=int, default=8, help="Reference pairs per example.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats (best is kept).")
    args = parser.parse_args()
    torch.manual_seed(0)
    tiny_comparison(args.batch, args.n_ref, args.repeats)
    if torch.cuda.is_available():
        real_size_cuda(batch=1, n_ref=args.n_ref, steps=2)


if __name__ == "__main__":
    main()
