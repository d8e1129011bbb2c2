"""Conditional flow matching decoder: one Euler step with classifier-free guidance, and the reference loop.

upstream: indextts/s2mel/modules/flow_matching.py:BASECFM.inference / solve_euler — UPSTREAM.md §3.2.4.

`CFM` holds the DiT as `estimator` (so its state dict is exactly upstream's `net['cfm']`) and its
forward is the `dit_step` graph contract (DESIGN.md §3): the conditional and unconditional branches are
stacked into one batch of 2B inside, guidance is `(1 + cfg) * v_cond - cfg * v_uncond` (upstream's
order; other orders move the result by float32 rounding), the update is `x + dt * v`, and the prompt
frames are zeroed with a mask multiply (upstream assigns `x[..., :P] = 0`; same values, no slicing by
data). The host loop (`cfm_inference` here, runtime/cfm.py in the runtime) owns t, dt and the noise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import S2MelConfig
from .dit import DiT


class CFM(nn.Module):
    """dit_step: `(x, prompt_x (B,80,T), x_lens, prompt_lens (B,) int64, t, dt (B,), style (B,S),
    cond (B,T,C), cfg_rate (1,)) -> x_next (B,80,T)`."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        self.estimator = DiT(cfg)

    def forward(self, x: torch.Tensor, prompt_x: torch.Tensor, x_lens: torch.Tensor, prompt_lens: torch.Tensor,
                t: torch.Tensor, dt: torch.Tensor, style: torch.Tensor, cond: torch.Tensor,
                cfg_rate: torch.Tensor, *, rows_alone: bool = False) -> torch.Tensor:
        """`rows_alone`: every row computed as its own batch-1 call would compute it (the exported dit_step:
        DiT.forward's note); False: upstream's padded-batch numerics (what the s2mel_cfm fixture pins)."""
        B, T = x.shape[0], x.shape[2]
        v = self.estimator(
            torch.cat([x, x], dim=0),                                       # (2B, 80, T)
            torch.cat([prompt_x, torch.zeros_like(prompt_x)], dim=0),       # uncond: no prompt
            torch.cat([x_lens, x_lens], dim=0),                             # (2B,)
            torch.cat([t, t], dim=0),                                       # (2B,)
            torch.cat([style, torch.zeros_like(style)], dim=0),             # uncond: no style
            torch.cat([cond, torch.zeros_like(cond)], dim=0),               # uncond: no content
            rows_alone=rows_alone,
        )                                                                   # (2B, 80, T)
        v_cond, v_uncond = v[:B], v[B:]
        v = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond                 # (B, 80, T)
        x_next = x + dt[:, None, None] * v                                  # (B, 80, T)
        keep = torch.arange(T, device=x.device)[None, :] >= prompt_lens[:, None]   # (B, T)
        return x_next * keep[:, None, :].to(x_next.dtype)


def cfm_inference(step: CFM, mu: torch.Tensor, x_lens: torch.Tensor, prompt: torch.Tensor, style: torch.Tensor,
                  noise: torch.Tensor, n_timesteps: int = 25, cfg_rate: float = 0.7) -> torch.Tensor:
    """Reference Euler solve: mu (B,T,C), x_lens (B|1,), prompt (B,80,P), style (B,S), noise (B,80,T)
    -> mel (B,80,T).

    `noise` is upstream's `randn(B,80,T) * temperature`, passed in so runs are reproducible. t starts at
    0 and is accumulated (`t = t + dt`), not re-read from t_span, as upstream does.
    """
    B, T, P = mu.shape[0], mu.shape[1], prompt.shape[-1]
    x_lens = x_lens.expand(B) if x_lens.numel() == 1 else x_lens            # (B,)
    prompt_lens = torch.full((B,), P, dtype=torch.int64)                    # (B,)
    prompt_x = torch.zeros_like(noise)                                      # (B, 80, T)
    prompt_x[..., :P] = prompt
    keep = (torch.arange(T)[None, :] >= prompt_lens[:, None])[:, None, :]   # (B, 1, T)
    x = noise * keep.to(noise.dtype)                                        # (B, 80, T)
    t_span = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32)     # (n+1,)
    t = t_span[0].expand(B).clone()                                         # (B,)
    cfg = torch.tensor([cfg_rate], dtype=torch.float32)                     # (1,)
    for s in range(1, n_timesteps + 1):
        dt = (t_span[s] - t_span[s - 1]).expand(B)                          # (B,)
        x = step(x, prompt_x, x_lens, prompt_lens, t, dt, style, mu, cfg)   # (B, 80, T)
        t = t + dt                                                          # (B,)
    return x

