"""Parameter shapes of real architectures, computed layer by layer (nothing is downloaded).

The EMA update only sees a list of tensors, so a workload is fully described by its parameter shapes,
in the order ``model.parameters()`` yields them. The generators follow the reference implementations:
torchvision ``resnet50``, timm ``vit_base_patch16_224``, Hugging Face ``GPT2Model`` (``Conv1D`` weights
are stored ``(in, out)``) and the GPT-3 XL layout (a GPT-2 block scaled to d=2048, 24 layers, 2048
positions) for the 1.3B decoder.
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    """torchvision ``resnet50``: 161 tensors, 25,557,032 parameters."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            # Bottleneck: 1x1 reduce, 3x3, 1x1 expand (x4), each followed by a BatchNorm (weight, bias).
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                # The first block of every stage changes the width, so its shortcut is a 1x1 conv + BN.
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return [*shapes, (1000, 2048), (1000,)]


def vit_b16(num_classes: int = 1000, image_size: int = 224) -> list[Shape]:
    """timm ``vit_base_patch16_224``: 152 tensors, 86,567,656 parameters."""
    dim, depth, mlp, patch = 768, 12, 3072, 16
    tokens = (image_size // patch) ** 2 + 1
    shapes: list[Shape] = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,)]  # norm1
        shapes += [(3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]  # attn.qkv, attn.proj
        shapes += [(dim,), (dim,)]  # norm2
        shapes += [(mlp, dim), (mlp,), (dim, mlp), (dim,)]  # mlp.fc1, mlp.fc2
    return [*shapes, (dim,), (dim,), (num_classes, dim), (num_classes,)]


def gpt2(dim: int = 768, depth: int = 12, n_positions: int = 1024, vocab: int = 50257) -> list[Shape]:
    """Hugging Face ``GPT2Model`` (the LM head is tied to ``wte``): 148 tensors, 124,439,808 parameters."""
    shapes: list[Shape] = [(vocab, dim), (n_positions, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,)]  # ln_1
        shapes += [(dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]  # attn.c_attn, attn.c_proj
        shapes += [(dim,), (dim,)]  # ln_2
        shapes += [(dim, 4 * dim), (4 * dim,), (4 * dim, dim), (dim,)]  # mlp.c_fc, mlp.c_proj
    return [*shapes, (dim,), (dim,)]


def decoder_1p3b() -> list[Shape]:
    """GPT-3 XL layout (d=2048, 24 layers, 2048 positions): 292 tensors, 1,315,723,264 parameters."""
    return gpt2(dim=2048, depth=24, n_positions=2048)


def small3() -> list[Shape]:
    """A 3-tensor toy model (weights of 16x16, 16 and 4x16 elements): 336 parameters, all host overhead."""
    return [(16, 16), (16,), (4, 16)]


def mlp3() -> list[Shape]:
    """A slightly bigger 3-tensor MLP (Linear(64, 256) with bias, Linear(256, 10) without): 19,200 parameters."""
    return [(256, 64), (256,), (10, 256)]


def many5k(blocks: int = 1250) -> list[Shape]:
    """5,000 small tensors, 9,755,000 parameters: a model of many narrow layers (60 to 3,840 elements each).

    Each block is two linear layers with biases, 64 <-> 60 wide, so per-tensor costs (Python, launches,
    table walks) dominate rather than bandwidth.
    """
    shapes: list[Shape] = []
    for _ in range(blocks):
        shapes += [(64, 60), (64,), (60, 64), (60,)]
    return shapes


def tiny() -> list[Shape]:
    """Odd sizes around a typical block size, for smoke tests only (it fits in any cache)."""
    return [(1,), (1023,), (1025,), (33, 17), (3, 5, 7, 2), (4096,)]


ARCHITECTURES = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "gpt2": gpt2,
    "decoder_1p3b": decoder_1p3b,
    "small3": small3,
    "mlp3": mlp3,
    "many5k": many5k,
    "tiny": tiny,
}


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
