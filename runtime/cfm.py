"""The s2mel stage on the host: target length, prompt + content condition, and THE Euler loop over
`dit_step` (the one place the runtime integrates the flow).

upstream: indextts/infer_v2.py (`target_lengths = (code_lens * 1.72).long()`, `length_regulator`,
`cat_condition = cat([prompt_condition, cond])`, `cfm.inference(...)[:, :, ref_len:]`) and
indextts/s2mel/modules/flow_matching.py:BASECFM.inference / solve_euler — UPSTREAM.md §2.7 step 5,
§3.2.2, §3.2.4. The eager reference is export/models/cfm.py:cfm_inference.

Each Euler step is one `dit_step` call, which does the CFG batch (cond / uncond stacked inside), the
guidance `(1 + cfg) * v_cond - cfg * v_uncond`, the update `x + dt * v` and the prompt re-zeroing. The
host owns t, dt, the noise and two ping-pong x buffers (the output of one step is the input of the next;
nothing is allocated per step).

t schedule: upstream's `torch.linspace(0, 1, steps + 1)` in float32, whose last bits depend on the CPU's
vector width (its vectorized kernel rounds differently from element to element); here each t is the
correctly rounded float32 of i / steps, and t is accumulated `t = t + dt` as upstream does. The two
schedules differ by at most one ulp in a few t values (e.g. 4 of 26 at 25 steps on an AVX-512 CPU).
"""

from __future__ import annotations

import numpy as np

from runtime.executors.base import Executor

MEL_FRAMES_PER_CODE = 1.72    # upstream: target_lengths = (code_lens * 1.72).long(), float32


def mel_length(n_codes: int) -> int:
    """Target mel frames for n codes: upstream's `(code_lens * 1.72).long()` in float32."""
    return int(np.float32(n_codes) * np.float32(MEL_FRAMES_PER_CODE))


def mel_length_25(semantic_frames: int, duration_factor: float = 1.0) -> int:
    """IndexTTS-2.5's target mel frames: `int(S_infer.shape[1] * 1.72 * duration_factor)` in Python floats
    (float64, left to right, truncated), where S_infer has 2 frames per code (infer_v2_5.py:833;
    UPSTREAM-2.5 quirk 7: float32 or an exact rational floor differ for some lengths and factors)."""
    return int(semantic_frames * MEL_FRAMES_PER_CODE * float(duration_factor))


def t_schedule(steps: int) -> np.ndarray:
    """(steps + 1,) float32 time points 0 .. 1 (see the module note on the last bit)."""
    return (np.arange(steps + 1, dtype=np.float64) / steps).astype(np.float32)


def regulate(length_regulator: Executor, s: np.ndarray, frames: int) -> np.ndarray:
    """s (1, N, sem_dim) -> content condition (1, frames, content_dim)."""
    out = length_regulator.run({"s": np.ascontiguousarray(s, np.float32),
                                "ylens": np.array([frames], np.int64)})
    return out["cond"]


def euler_solve(dit_step: Executor, cond: np.ndarray, prompt_mel: np.ndarray, style: np.ndarray,
                noise: np.ndarray, steps: int = 25, cfg_rate: float = 0.7) -> np.ndarray:
    """The flow from noise to mel with classifier-free guidance.

    cond (1, T, C) = prompt condition + generated condition, prompt_mel (1, 80, P) the reference mel,
    style (1, 192), noise (1, 80, T) (upstream's `randn * temperature`). -> mel (1, 80, T), prompt frames 0.
    """
    _, t_frames, _ = cond.shape
    prompt_frames = prompt_mel.shape[-1]
    if noise.shape != (1, prompt_mel.shape[1], t_frames):
        raise ValueError(f"noise {noise.shape} does not match the condition's {t_frames} frames")
    keep = (np.arange(t_frames) >= prompt_frames).astype(np.float32)            # (T,)
    x = np.ascontiguousarray(noise * keep, np.float32)                          # (1, 80, T)
    x_next = np.empty_like(x)
    prompt_x = np.zeros_like(x)
    prompt_x[..., :prompt_frames] = prompt_mel
    t_span = t_schedule(steps)
    t = np.zeros(1, np.float32)
    dt = np.zeros(1, np.float32)
    feed = {"x": x, "prompt_x": prompt_x, "x_lens": np.array([t_frames], np.int64),
            "prompt_lens": np.array([prompt_frames], np.int64), "t": t, "dt": dt,
            "style": np.ascontiguousarray(style, np.float32), "cond": np.ascontiguousarray(cond, np.float32),
            "cfg_rate": np.array([cfg_rate], np.float32)}
    for s in range(1, steps + 1):
        dt[0] = t_span[s] - t_span[s - 1]
        dit_step.run(feed, outputs={"x_next": x_next})
        t += dt
        x, x_next = x_next, x                                                   # ping-pong
        feed["x"] = x
    return x
