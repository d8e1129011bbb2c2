"""BigVGAN v2 generator (22 kHz, 80 band, 256x) as IndexTTS2 runs it: mel (B,80,T) -> wav (B,1,256T).

upstream: indextts/s2mel/modules/bigvgan/bigvgan.py:BigVGAN, AMPBlock1 (+ `from_pretrained`,
`remove_weight_norm`), torch activation path (UPSTREAM §1.3, §3.5, §6 item 13).

Only what IndexTTS2 ships is supported: resblock "1" (AMPBlock1), SnakeBeta with log-scale parameters,
no tanh at the end (output clamped to [-1, 1]) and no bias on `conv_post`. Any other config is refused
with a CheckpointError instead of being computed differently.

Loading: `bigvgan_generator.pt` is `{'generator': state_dict}` with legacy weight norm
(`weight_g`/`weight_v`), folded once at load as upstream's `remove_weight_norm()` does; the anti-alias
filters stored in the file are loaded (not recomputed), and the derived constants of every
anti-aliased activation are rebuilt from them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from export.checkpoint import as_state_dict, fold_weight_norm, load_into, read_torch_file, unfold_weight_norm
from export.config import BigVGANConfig, load_bigvgan_config
from runtime.errors import CheckpointError

from .alias_free import Activation1d, refresh_derived

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATOR_FILE = "bigvgan_generator.pt"


def check_supported(cfg: BigVGANConfig, source: str) -> None:
    """Refuse configs IndexTTS2 does not ship (they would need code paths we do not implement)."""
    problems = []
    if cfg.resblock != "1":
        problems.append(f"resblock {cfg.resblock!r} (only '1')")
    if cfg.activation != "snakebeta":
        problems.append(f"activation {cfg.activation!r} (only 'snakebeta')")
    if not cfg.snake_logscale:
        problems.append("snake_logscale false (only true)")
    if cfg.use_tanh_at_final:
        problems.append("use_tanh_at_final true (only false: clamp to [-1, 1])")
    if cfg.use_bias_at_final:
        problems.append("use_bias_at_final true (only false: conv_post without bias)")
    if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        problems.append("upsample_rates and upsample_kernel_sizes differ in length")
    elif any((k - u) % 2 or k < u for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        problems.append("an upsample kernel k with (k - rate) odd or negative (output would not be rate x T)")
    if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    if cfg.upsample_initial_channel % (2 ** len(cfg.upsample_rates)):
        problems.append(f"upsample_initial_channel {cfg.upsample_initial_channel} not divisible by "
                        f"2^{len(cfg.upsample_rates)}")
    if problems:
        raise CheckpointError(f"{source}: unsupported BigVGAN config (IndexTTS2 ships BigVGAN v2 with resblock "
                              "'1', log-scale SnakeBeta, clamp output, no final bias): " + "; ".join(problems))


def _conv_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class AMPBlock1(nn.Module):
    """Residual block: for each dilation d, `x += conv2(A(conv1_d(A(x))))` with anti-aliased SnakeBeta A."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_conv_padding(kernel, d)) for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=_conv_padding(kernel, 1)) for _ in dilations)
        # activations[2m] precedes convs1[m], activations[2m+1] precedes convs2[m] (upstream order).
        self.activations = nn.ModuleList(Activation1d(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            xt = self.activations[2 * m](x)
            xt = c1(xt)
            xt = self.activations[2 * m + 1](xt)
            xt = c2(xt)
            x = xt + x
        return x


class BigVGAN(nn.Module):
    """The generator with plain (folded) conv weights. Parameter names are the checkpoint's minus the
    weight-norm split, so a folded `generator` state dict loads strictly."""

    def __init__(self, cfg: BigVGANConfig) -> None:
        super().__init__()
        check_supported(cfg, "BigVGAN config")
        self.cfg = cfg
        ch0 = cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch0, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = ch0
        for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            # Inner ModuleList mirrors upstream's key `ups.i.0`.
            self.ups.append(nn.ModuleList([nn.ConvTranspose1d(ch, ch // 2, k, u, padding=(k - u) // 2)]))
            ch //= 2
            for kernel, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock1(ch, kernel, tuple(dilations)))
        self.activation_post = Activation1d(ch)
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=False)

    @property
    def hop_length(self) -> int:
        hop = 1
        for u in self.cfg.upsample_rates:
            hop *= u
        return hop

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, num_mels, T) float32 -> wav (B, 1, hop*T) in [-1, 1]."""
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.activation_post(x)
        x = self.conv_post(x)
        return torch.clamp(x, min=-1.0, max=1.0)


def weight_norm_names(model: BigVGAN) -> list[str]:
    """Names of the weights the original checkpoint stores as weight_g / weight_v."""
    names = ["conv_pre.weight", "conv_post.weight"]
    names += [f"ups.{i}.0.weight" for i in range(len(model.ups))]
    for n, block in enumerate(model.resblocks):
        for group in ("convs1", "convs2"):
            names += [f"resblocks.{n}.{group}.{m}.weight" for m in range(len(getattr(block, group)))]
    return names


def load_bigvgan(directory: str | Path) -> BigVGAN:
    """Build BigVGAN from `directory/config.json` + `directory/bigvgan_generator.pt`, eval mode.

    upstream: BigVGAN.from_pretrained(dir, use_cuda_kernel=False) (strict load of `['generator']`),
    then remove_weight_norm(). No keys are ignored: upstream loads strictly.
    """
    directory = Path(directory)
    cfg = load_bigvgan_config(directory / CONFIG_FILE)
    check_supported(cfg, str(directory / CONFIG_FILE))
    path = directory / GENERATOR_FILE
    obj = read_torch_file(path)
    if not isinstance(obj, dict) or "generator" not in obj:
        found = sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'generator' state dict, found {found}")
    state = fold_weight_norm(as_state_dict(obj["generator"], path, "['generator']"))
    model = BigVGAN(cfg)
    load_into(model, state, f"{path} ['generator']")
    refresh_derived(model)
    log.info("loaded BigVGAN from %s (%d upsample stages, %d channels)", directory, len(cfg.upsample_rates),
             cfg.upsample_initial_channel)
    return model.eval()


def config_json(cfg: BigVGANConfig) -> dict:
    """The generator and audio keys of NVIDIA's `config.json` for `cfg`."""
    return {
        "resblock": cfg.resblock,
        "upsample_rates": list(cfg.upsample_rates),
        "upsample_kernel_sizes": list(cfg.upsample_kernel_sizes),
        "upsample_initial_channel": cfg.upsample_initial_channel,
        "resblock_kernel_sizes": list(cfg.resblock_kernel_sizes),
        "resblock_dilation_sizes": [list(d) for d in cfg.resblock_dilation_sizes],
        "use_tanh_at_final": cfg.use_tanh_at_final,
        "use_bias_at_final": cfg.use_bias_at_final,
        "activation": cfg.activation,
        "snake_logscale": cfg.snake_logscale,
        "num_mels": cfg.num_mels,
        "n_fft": cfg.n_fft,
        "hop_size": cfg.hop_size,
        "win_size": cfg.win_size,
        "sampling_rate": cfg.sampling_rate,
        "fmin": 0,
        "fmax": None,
    }


# weight_g scales of the demo weights (the same rescale the golden fixture used): keep activations O(1)
# through the stack, so that only a few % of the output samples reach the final clamp.
_DEMO_G_SCALE = {"conv_pre": 0.3, "resblocks": 0.35, "ups": 0.8, "conv_post": 1.0}


@torch.no_grad()
def demo_state_dict(cfg: BigVGANConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random generator weights in the original layout (weight_g / weight_v, filters included)."""
    model = BigVGAN(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wn = weight_norm_names(model)
    for name, value in state.items():
        if name.endswith(".filter"):
            continue  # the Kaiser-sinc constants computed at construction
        if name in wn:
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) / fan_in ** 0.5)
        elif name.endswith(".bias"):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
        elif name.endswith((".alpha", ".beta")):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.3)
        else:
            raise AssertionError(f"demo BigVGAN: unhandled tensor {name}")
    state = unfold_weight_norm(state, wn)
    for name in wn:
        g = state[name[: -len("weight")] + "weight_g"]
        scale = _DEMO_G_SCALE[name.split(".")[0]]
        g.copy_(torch.empty(g.shape).uniform_(0.6, 1.4, generator=generator) * scale)
    return state


def write_demo_bigvgan(directory: str | Path, cfg: BigVGANConfig, generator: torch.Generator) -> None:
    """Write `config.json` + `bigvgan_generator.pt` ({'generator': sd}) with seeded random weights."""
    check_supported(cfg, "demo BigVGAN config")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = demo_state_dict(cfg, generator)
    (directory / CONFIG_FILE).write_text(json.dumps(config_json(cfg), indent=2) + "\n", encoding="utf-8")
    torch.save({"generator": state}, directory / GENERATOR_FILE)
    log.info("wrote demo BigVGAN to %s", directory)
