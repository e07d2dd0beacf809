"""MAE (He et al. 2022): masked autoencoders. A random 75% of each image's patches are hidden; the ViT encoder sees
only the visible ones (plus its class token), a light transformer decoder fills the hidden positions with a learned
mask token and predicts their pixels, and the loss (fgvc.ssl.losses.mae_loss) is the squared error on the masked
patches' per-patch normalized pixels. The encoder is a timm VisionTransformer, run block by block as its own
forward_features runs, with the paper's fixed 2-D sine-cosine position embeddings (written into its pos_embed,
which then does not train); the decoder is the method's and is not handed on."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from fgvc.errors import OptionError
from fgvc.models.backbone import Backbone, BackboneError
from fgvc.ssl.base import SSLMethod
from fgvc.ssl.losses import mae_loss, patchify, unpatchify


def hidden_count(mask_ratio: float, count: int) -> int:
    """How many of `count` patches MAE hides: round(mask_ratio x count), at least one and at least one left."""
    hidden = round(mask_ratio * count)
    if not 0 < hidden < count:
        raise OptionError("mask_ratio", f"{mask_ratio} hides {hidden} of {count} patches; it must hide at least one "
                                        "and leave at least one")
    return hidden


def random_masking(tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-image random masking of B x N x C tokens: hidden_count(mask_ratio, N) of each image's tokens are
    hidden, the same number in every image, chosen by uniform noise (from `generator`, else torch's global one).
    Returns (the visible tokens, B x K x C in the order the noise ranks them; the mask, B x N, 1 where hidden; the
    permutation that puts the visible tokens then the hidden ones back in their places, B x N)."""
    batch, count, _ = tokens.shape
    kept = count - hidden_count(mask_ratio, count)
    noise = torch.rand(batch, count, generator=generator, device=generator.device if generator else tokens.device)
    shuffle = noise.to(tokens.device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    visible = tokens.gather(1, shuffle[:, :kept, None].expand(-1, -1, tokens.shape[-1]))
    mask = torch.ones(batch, count, device=tokens.device)
    mask[:, :kept] = 0
    return visible, mask.gather(1, restore), restore


def sincos_position_embedding(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(rows x columns) x dim fixed 2-D sine-cosine position embeddings, as MAE's encoder and decoder use: half the
    channels encode the row, half the column, each with sines and cosines of geometrically spaced frequencies."""
    if dim % 4:
        raise OptionError("decoder_dim", f"{dim} must be a multiple of 4 (sines and cosines of rows and columns)")
    frequencies = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, columns = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64),
                                indexing="ij")
    parts = []
    for position in (rows.reshape(-1), columns.reshape(-1)):
        angles = np.outer(position, frequencies)
        parts += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


class MAEDecoder(nn.Module):
    """Encoder width -> `dim`, mask tokens in the hidden places, fixed position embeddings, `depth` transformer
    blocks of `heads` heads, a norm and a linear layer to each patch's p x p x 3 pixels."""

    def __init__(self, encoder_dim: int, patch_pixels: int, grid: tuple[int, int], prefix_tokens: int, *,
                 dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise OptionError("decoder_heads", f"{heads} heads do not divide the decoder's width {dim}")
        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        positions = torch.cat([torch.zeros(prefix_tokens, dim), sincos_position_embedding(dim, grid)])
        self.register_buffer("position_embedding", positions[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)  # MAE's
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(dim)
        self.predict = nn.Linear(dim, patch_pixels)
        for module in self.modules():  # MAE's initialization of its linear layers
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """B x N x p*p*3 predicted pixels of every patch, from the encoder's output on the visible patches (prefix
        tokens first) and the permutation that restores the patches' order."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        hidden = self.mask_token.expand(len(x), restore.shape[1] - visible.shape[1], -1)
        patches = torch.cat([visible, hidden], dim=1).gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, patches], dim=1) + self.position_embedding
        return self.predict(self.norm(self.blocks(x)))[:, self.prefix_tokens :]


class MaskedPass(NamedTuple):
    """One masked forward pass: the encoder's output (prefix tokens and visible patches), the predicted patches
    (B x N x p*p*3; with norm_pix in each target patch's normalized units), the mask (B x N, 1 hidden), the loss."""

    latent: torch.Tensor
    prediction: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor


def vision_transformer(backbone: Backbone, method: str) -> VisionTransformer:
    """The backbone's timm VisionTransformer (ViT, DeiT, ...), whose layers a method runs one by one."""
    model = backbone.model
    if not isinstance(model, VisionTransformer) or model.pos_embed is None:
        raise BackboneError(f"{method} runs a timm VisionTransformer's layers itself (ViT, DeiT), with position "
                            f"embeddings added to the patches; {type(model).__name__} is not one")
    return model


def fix_sincos_positions(model: VisionTransformer) -> None:
    """MAE's encoder positions: the patches' rows of pos_embed become the fixed 2-D sine-cosine embeddings (the
    prefix tokens' rows 0), and pos_embed stops training."""
    width, grid = model.pos_embed.shape[-1], tuple(model.patch_embed.grid_size)
    if width % 4:
        raise BackboneError(f"MAE's sine-cosine positions need a backbone width divisible by 4, not {width}")
    prefix = model.pos_embed.shape[1] - grid[0] * grid[1]
    table = torch.cat([torch.zeros(prefix, width), sincos_position_embedding(width, grid)])
    with torch.no_grad():
        model.pos_embed.copy_(table[None])
    model.pos_embed.requires_grad_(False)


class MAE(SSLMethod):
    """The paper's defaults: mask ratio 0.75, a 512-wide decoder of 8 blocks (16 heads), normalized pixel targets.
    MAE has no collapse to guard against (its loss would show one), so it logs no embedding statistics."""

    needs_tokens = True
    running_statistics = ()

    def __init__(self, backbone: Backbone, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix: bool = True, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        model = vision_transformer(backbone, "MAE")
        patch_h, patch_w = model.patch_embed.patch_size
        if patch_h != patch_w:
            raise BackboneError(f"MAE needs square patches, not {patch_h} x {patch_w}")
        hidden_count(mask_ratio, model.patch_embed.num_patches)
        fix_sincos_positions(model)
        self.patch_size, self.mask_ratio, self.norm_pix = patch_h, mask_ratio, norm_pix
        self.embedding_dim = backbone.num_features
        self.decoder = MAEDecoder(backbone.num_features, patch_h * patch_w * 3, tuple(model.patch_embed.grid_size),
                                  model.num_prefix_tokens, dim=decoder_dim, depth=decoder_depth, heads=decoder_heads)

    def heads(self) -> dict:
        return {"decoder": self.decoder}

    def compiled_modules(self) -> list[nn.Module]:
        return [self.backbone.model.blocks, self.decoder]  # the encoder's layers are called one by one

    @staticmethod
    def batch_statistics(outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def encode_visible(self, images: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(The encoder's output on the prefix tokens and the visible patches, the mask, the restoring
        permutation): the ViT's own layers, with the hidden patches taken out after the position embedding."""
        model = self.backbone.model
        tokens = model._pos_embed(model.patch_embed(images))
        prefix = model.num_prefix_tokens
        visible, mask, restore = random_masking(tokens[:, prefix:], self.mask_ratio, generator)
        x = model.norm_pre(torch.cat([tokens[:, :prefix], visible], dim=1))
        return model.norm(model.blocks(x)), mask, restore

    def masked_pass(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaskedPass:
        """Mask, encode the visible patches, decode every patch, and the loss on the hidden ones."""
        latent, mask, restore = self.encode_visible(images, generator)
        prediction = self.decoder(latent, restore)
        loss = mae_loss(prediction, patchify(images, self.patch_size), mask, self.norm_pix)
        return MaskedPass(latent, prediction, mask, loss)

    @torch.no_grad()
    def reconstructions(self, images: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(The images with their masked patches blanked, the decoder's reconstruction of every patch, the
        reconstruction of the masked patches pasted among the visible ones), in the input's normalized units; with
        norm_pix each predicted patch is given its target patch's mean and variance back, as the paper shows them."""
        result = self.masked_pass(images, generator)
        target = patchify(images, self.patch_size)
        prediction = result.prediction
        if self.norm_pix:
            prediction = prediction * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1,
                                                                                                     keepdim=True)
        hidden = result.mask[..., None]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return tuple(unpatchify(patches, self.patch_size, grid) for patches in
                     (target * (1 - hidden), prediction, target * (1 - hidden) + prediction * hidden))

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        (images,) = views
        return self.masked_pass(images).loss, None
