"""The Diffusion-DPO objective and the module that computes it for SD 1.5 and SDXL UNets.

Per pair (caption c, winner x_w, loser x_l), with the same noise ε and timestep t for both images:
`mse_* = mean over (C, H, W) of (ε_θ(x_t, t, c) − target)²`, `model_diff = mse_w − mse_l`,
`ref_diff = ref_w − ref_l` (reference model, no gradient), `inside = −½·β·(model_diff − ref_diff)` and
`loss = −log σ(inside)` averaged over pairs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def diffusion_dpo_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Diffusion-DPO loss from per-pair denoising errors.

    Args:
        model_mse_w: Trained model's error on the winners, shape `(B,)`.
        model_mse_l: Trained model's error on the losers, shape `(B,)`.
        ref_mse_w: Reference model's error on the winners, shape `(B,)`.
        ref_mse_l: Reference model's error on the losers, shape `(B,)`.
        beta: β of the loss (5000 for SD 1.5 in the paper).

    Returns:
        `(loss, inside)`: the scalar loss and the per-pair `inside = −½·β·(model_diff − ref_diff)` (positive when
        the model prefers the winner more than the reference does: the implicit accuracy is `mean(inside > 0)`).

    Example:
        ```python
        >>> import torch
        >>> loss, inside = diffusion_dpo_loss(torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]),
        ...                                   torch.tensor([0.2]), beta=10.0)
        >>> round(inside.item(), 3), round(loss.item(), 4)
        (1.0, 0.3133)
        ```
    """
    model_diff = model_mse_w - model_mse_l
    ref_diff = ref_mse_w - ref_mse_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean(), inside


@dataclass
class DiffusionDPOOutput:
    """What `DiffusionDPOModel.forward` returns: the loss and the per-pair terms it is made of (all detached
    except `loss`)."""

    loss: torch.Tensor
    inside: torch.Tensor
    model_mse_w: torch.Tensor
    model_mse_l: torch.Tensor
    ref_mse_w: torch.Tensor
    ref_mse_l: torch.Tensor


class DiffusionDPOModel(nn.Module):
    """A Stable Diffusion UNet with everything needed to compute its Diffusion-DPO loss on a batch of pairs.

    The trainable UNet and the frozen parts (VAE, text encoder(s), reference UNet in full mode) live in one module,
    so that `Trainer`/accelerate place, wrap (DDP/FSDP) and cast them together and the loss runs inside `forward`.
    In LoRA mode (`reference_unet=None`) the reference is the same UNet with its adapters disabled.

    Args:
        unet: The UNet to train (with a peft adapter in LoRA mode).
        vae: The frozen VAE (latents are `vae.encode(x).latent_dist.sample() · scaling_factor`).
        text_encoder: The frozen (first) CLIP text encoder.
        noise_scheduler: A training scheduler (`DDPMScheduler`) defining the forward process and prediction type.
        beta: β of the loss.
        text_encoder_2: SDXL's second text encoder (`CLIPTextModelWithProjection`); its presence selects SDXL.
        reference_unet: Frozen reference UNet (full mode); `None` for LoRA mode.

    Example:
        ```python
        >>> from diffusers import DDPMScheduler
        >>> from imagegem_hf.testing import tiny_sd_components
        >>> c = tiny_sd_components()
        >>> c["unet"].add_adapter(__import__("peft").LoraConfig(r=2, target_modules=["to_q", "to_v"]))
        >>> model = DiffusionDPOModel(c["unet"], c["vae"], c["text_encoder"],
        ...                           DDPMScheduler.from_config(c["scheduler"].config), beta=5000.0)
        ```
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        noise_scheduler,
        beta: float,
        text_encoder_2: nn.Module | None = None,
        reference_unet: nn.Module | None = None,
    ):
        super().__init__()
        if reference_unet is None and not getattr(unet, "_hf_peft_config_loaded", False):
            raise ValueError(
                "LoRA mode needs a UNet with a peft adapter (unet.add_adapter(LoraConfig(...))); "
                "pass reference_unet= for full fine-tuning."
            )
        if text_encoder_2 is not None and getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("Two text encoders (SDXL) but the UNet has no 'text_time' conditioning (not SDXL).")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.reference_unet = reference_unet
        self.noise_scheduler = noise_scheduler
        self.beta = beta
        for frozen in (vae, text_encoder, text_encoder_2, reference_unet):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Called by `Trainer` when `activation_checkpointing=True`: checkpoint the trained UNet's blocks."""
        self.unet.enable_gradient_checkpointing()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Only the trained UNet has gradients; skip walking the frozen parts' parameters every step."""
        self.unet.zero_grad(set_to_none=set_to_none)

    def train(self, mode: bool = True) -> DiffusionDPOModel:
        """Only the trained UNet switches mode; the frozen parts stay in eval mode."""
        self.training = mode
        self.unet.train(mode)
        return self

    @torch.no_grad()
    def encode_prompts(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings as the SD 1.5 / SDXL pipelines compute them: `(encoder_hidden_states, pooled)`.

        SD 1.5: the text encoder's last hidden state. SDXL: the penultimate hidden states of both encoders,
        concatenated, and the second encoder's projected pooled output.
        """
        if not self.is_sdxl:
            return self.text_encoder(input_ids)[0], None
        if input_ids_2 is None:
            raise ValueError("SDXL needs input_ids_2 (the second tokenizer's ids).")
        hidden_1 = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        return torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1), out_2.text_embeds

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        """VAE latents of `(N, 3, H, W)` images in [−1, 1]: the posterior sample `mean + std · sample`, scaled by
        the VAE's scaling factor, in the frozen weights' dtype (the text encoder's: the VAE may run in float32 under
        fp16).

        Args:
            pixel_values: The images.
            sample: Standard normal draws of the latents' shape `(N, C, h, w)`; from the global random state when
                `None`.
        """
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixel_values.to(vae_dtype)).latent_dist
        if sample is None:
            sample = torch.randn_like(posterior.mean)
        latents = posterior.mean + posterior.std * sample.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
        return (latents * self.vae.config.scaling_factor).to(next(self.text_encoder.parameters()).dtype)

    def latent_shape(self, pixel_values: torch.Tensor) -> tuple[int, int, int]:
        """`(C, h, w)` of the latents of `pixel_values` (`(..., 3, H, W)`)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, pixel_values.shape[-2] // factor, pixel_values.shape[-1] // factor

    def pair_draws(self, noise_seeds: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
        """The random draws of `B` pairs, each from a generator seeded with its seed, in this order: the winner's
        posterior sample, the loser's, the noise and the timestep. A pair's draws so depend on its seed only, not
        on the batch or the process it is in.

        Returns:
            `(samples, noise, timesteps)`: `(2B, C, h, w)` (winners then losers), `(B, C, h, w)` and `(B,)`.
        """
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        winners, losers, noise, timesteps = [], [], [], []
        for seed in noise_seeds.tolist():
            generator = torch.Generator().manual_seed(seed)
            winners.append(torch.randn(shape, generator=generator))
            losers.append(torch.randn(shape, generator=generator))
            noise.append(torch.randn(shape, generator=generator))
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        return torch.stack(winners + losers), torch.stack(noise), torch.cat(timesteps)

    def _mse(self, unet: nn.Module, noisy, timesteps, hidden, added_cond, target) -> torch.Tensor:
        pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
        # At least float32 (half-precision predictions are upcast; a float64 model keeps float64).
        dtype = torch.promote_types(pred.dtype, torch.float32)
        return (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=(1, 2, 3))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        input_ids_2: torch.Tensor | None = None,
        add_time_ids: torch.Tensor | None = None,
        noise_seeds: torch.Tensor | None = None,
    ) -> DiffusionDPOOutput:
        """Diffusion-DPO loss of a batch of pairs.

        Args:
            pixel_values: `(B, 2, 3, H, W)` in [−1, 1]; index 0 is the winner, 1 the loser.
            input_ids: `(B, L)` token ids of the captions (first tokenizer).
            input_ids_2: `(B, L)` token ids of the second tokenizer (SDXL).
            add_time_ids: `(B, 6)` SDXL size conditioning (original size, crop top-left, target size).
            noise_seeds: `(B,)` int64 seed of each pair's VAE samples, noise and timestep (what
                [`DiffusionDPOCollator`] adds to its batches): a pair then gets the same draws whatever batch or
                process it is in, so a distributed run trains like one process with the same global batch. When
                `None`, everything is drawn from the global random state.

        Returns:
            A [`DiffusionDPOOutput`].
        """
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"pixel_values must be (batch, 2, 3, H, W), got {tuple(pixel_values.shape)}.")
        batch = pixel_values.shape[0]
        images = torch.cat([pixel_values[:, 0], pixel_values[:, 1]])  # winners then losers: (2B, 3, H, W)
        if noise_seeds is None:
            latents = self.encode_images(images)
            noise = torch.randn_like(latents[:batch])
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch,))
        else:
            if noise_seeds.shape != (batch,):
                raise ValueError(f"noise_seeds must have shape ({batch},), got {tuple(noise_seeds.shape)}.")
            samples, noise, timesteps = self.pair_draws(noise_seeds, self.latent_shape(pixel_values))
            latents = self.encode_images(images, samples)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        timesteps = timesteps.to(latents.device)
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'.")

        hidden, pooled = self.encode_prompts(input_ids, input_ids_2)
        hidden = hidden.repeat(2, 1, 1)
        added_cond = None
        if self.is_sdxl:
            if add_time_ids is None:
                raise ValueError("SDXL needs add_time_ids (original size, crop top-left, target size).")
            added_cond = {"text_embeds": pooled.repeat(2, 1), "time_ids": add_time_ids.to(pooled.dtype).repeat(2, 1)}

        model_mse = self._mse(self.unet, noisy, timesteps, hidden, added_cond, target)
        with torch.no_grad(), self._reference() as reference:
            ref_mse = self._mse(reference, noisy, timesteps, hidden, added_cond, target)
        model_w, model_l = model_mse.chunk(2)
        ref_w, ref_l = ref_mse.chunk(2)
        loss, inside = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, self.beta)
        return DiffusionDPOOutput(
            loss=loss,
            inside=inside.detach(),
            model_mse_w=model_w.detach(),
            model_mse_l=model_l.detach(),
            ref_mse_w=ref_w,
            ref_mse_l=ref_l,
        )

    @contextlib.contextmanager
    def _reference(self):
        """The reference UNet: the frozen copy (full mode) or the trained UNet with adapters disabled (LoRA)."""
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()
