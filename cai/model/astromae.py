"""pcm-AstroMAE, the redshift model CAI serves (see docs/astromae.md).

Three branches read one galaxy: a ViTAE encoder (MAE-pretrained and frozen in
the paper) and an Inception network over the 5-band 32x32 image, and an MLP
over the five magnitudes. Their features are concatenated and regressed to a
redshift. Module names follow the authors' checkpoint exactly, so official
weights load with ``strict=True``. Written from the specification without
timm: timm's releases import torchvision, and ViTAE cells are not in timm.

Shapes: image ``[B, 5, 32, 32]`` float32 (u, g, r, i, z, fed raw),
magnitude ``[B, 5]`` (cast to float32), output ``[B, 1]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

EMBED_DIM = 192
DEPTH = 12
HEADS = 3
MLP_RATIO = 4
PATCH = 8
IMAGE_SIZE = 32
BANDS = 5
PCM_GROUPS = 48
FEATURES = 1096  # width of the encoder's and the Inception branch's outputs
MAG_WIDTH = 1024
PARAMETERS = 15_902_889


def sincos_position_table(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions, ``[1 + grid*grid, dim]``, row 0 (cls) zero, as in MAE."""
    coords = np.arange(grid, dtype=np.float64)
    ww, hh = np.meshgrid(coords, coords)  # MAE puts w first

    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(ww, dim // 2), one_axis(hh, dim // 2)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


class PatchEmbed(nn.Module):
    """8x8 patches of the 32x32 image to 16 tokens of 192."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(BANDS, EMBED_DIM, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with learned q and v biases (the k bias is zero)."""

    def __init__(self, dim=EMBED_DIM, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim=EMBED_DIM, hidden=EMBED_DIM * MLP_RATIO):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NormalCell(nn.Module):
    """A ViTAE cell: attention and MLP, plus a parallel convolution module (PCM) on the patch tokens."""

    def __init__(self, dim=EMBED_DIM):
        super().__init__()
        hidden = dim * MLP_RATIO
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, groups=PCM_GROUPS),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, dim, 1, groups=PCM_GROUPS),
        )

    def forward(self, x):
        b, n, c = x.shape
        side = int(round((n - 1) ** 0.5))

        # the PCM reads the cell's input patch tokens, before any norm
        grid = x[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)
        conv = self.PCM(grid).permute(0, 2, 3, 1).reshape(b, n - 1, c)

        x = x + self.attn(self.norm1(x))
        # added to the patch tokens only; the cls token is left as attention made it
        x = torch.cat((x[:, :1], x[:, 1:] + conv), dim=1)
        return x + self.mlp(self.norm2(x))


class ConvBlock(nn.Module):
    """Conv -> BatchNorm -> ReLU."""

    def __init__(self, cin, cout, kernel, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four branches, concatenated: 1x1; 1x1->3x3; 1x1->5x5; maxpool->1x1.

    ``skip_5x5`` reproduces the authors' last block, which keeps its 5x5
    weights in the checkpoint but leaves that branch out of the forward pass.
    """

    def __init__(self, cin, width, skip_5x5=False):
        super().__init__()
        self.skip_5x5 = skip_5x5
        self.branch1 = ConvBlock(cin, width, 1)
        self.branch2 = nn.Sequential(ConvBlock(cin, width, 1), ConvBlock(width, width, 3, padding=1))
        self.branch3 = nn.Sequential(ConvBlock(cin, width, 1), ConvBlock(width, width, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBlock(cin, width, 1))

    def forward(self, x):
        branches = [self.branch1(x), self.branch2(x)]
        if not self.skip_5x5:
            branches.append(self.branch3(x))
        branches.append(self.branch4(x))
        return torch.cat(branches, dim=1)


class InputMixModel(nn.Module):
    """The Inception branch over the image and the MLP over the magnitudes."""

    def __init__(self):
        super().__init__()
        self.conv2d_init = nn.Conv2d(BANDS, 32, 1)
        self.vis_inception = nn.Sequential(
            self.conv2d_init,  # one module under two names, as in the checkpoint
            nn.AvgPool2d(2),
            InceptionBlock(32, 16),
            InceptionBlock(64, 16),
            nn.AvgPool2d(2),
            InceptionBlock(64, 8),
            InceptionBlock(32, 8),
            nn.AvgPool2d(2),
            InceptionBlock(32, 4, skip_5x5=True),
            nn.Flatten(),
            nn.Linear(12 * 4 * 4, FEATURES),
            nn.ReLU(),
            nn.Linear(FEATURES, FEATURES),
        )
        layers = [nn.Linear(BANDS, MAG_WIDTH), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(MAG_WIDTH, MAG_WIDTH), nn.ReLU()]
        layers.append(nn.Linear(MAG_WIDTH, MAG_WIDTH))
        self.magnitude_block = nn.Sequential(*layers)


class AstroMAE(nn.Module):
    """pcm-AstroMAE: ``forward(image [B,5,32,32], magnitude [B,5]) -> redshift [B,1]``."""

    def __init__(self):
        super().__init__()
        tokens = (IMAGE_SIZE // PATCH) ** 2
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        table = torch.from_numpy(sincos_position_table(EMBED_DIM, IMAGE_SIZE // PATCH))
        self.pos_embed = nn.Parameter(table.reshape(1, tokens + 1, EMBED_DIM), requires_grad=False)
        self.blocks = nn.ModuleList(NormalCell() for _ in range(DEPTH))
        self.fc_norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.head = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.vit_block = nn.Sequential(nn.Linear(EMBED_DIM, FEATURES), nn.ReLU(), nn.Linear(FEATURES, FEATURES))
        self.inception_model = InputMixModel()
        self.concat_block = nn.Sequential(
            nn.Linear(2 * FEATURES + MAG_WIDTH, 1024), nn.ReLU(), nn.Linear(1024, 1))
        self._init_weights()

    def _init_weights(self):
        # MAE's choices for the encoder; the remaining layers keep torch's defaults
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encoder_parameters(self):
        """The MAE encoder the paper freezes: patch embedding, cls token, positions and the 12 cells."""
        yield self.cls_token
        yield self.pos_embed
        yield from self.patch_embed.parameters()
        yield from self.blocks.parameters()

    def encode(self, image):
        """The frozen encoder: mean of the 16 patch tokens after the 12 cells, ``[B, 192]``."""
        x = self.patch_embed(image) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for cell in self.blocks:
            x = cell(x)
        return x[:, 1:].mean(dim=1)

    def forward_from_encoding(self, encoding, image, magnitude):
        """Everything after the frozen encoder; lets training cache the encodings."""
        vit = self.vit_block(self.head(self.fc_norm(encoding)))
        inception = self.inception_model.vis_inception(image)
        mags = self.inception_model.magnitude_block(magnitude.to(torch.float32))
        return self.concat_block(torch.cat((vit, inception, mags), dim=1))

    def forward(self, image, magnitude):
        return self.forward_from_encoding(self.encode(image), image, magnitude)
