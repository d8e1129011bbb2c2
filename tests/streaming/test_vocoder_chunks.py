"""Chunked vocoding (runtime/streaming/vocoder.py): the receptive field computed from the manifest's vocoder
layout, the chunk plan, and whole-segment equality of the concatenated chunks.

- geometry: the context of the IndexTTS2 BigVGAN, interior windows = chunk + context, plans tile the segment;
- exactness of the cone in float64 (eager model): the gradient of an output sample is nonzero exactly on
  its computed frames, and a frame's forward-mode derivative exactly on its computed samples, for the
  IndexTTS2 geometry and another one (so the interval algebra is not fitted to one network). In float32 a
  window one frame narrower than computed is NOT detectably different (the outer frames reach the chunk
  through products of the anti-alias filters' smallest taps, ~1e-160), so tightness is shown here;
- float32 equality of concatenated chunks vs one whole run (max |difference| <= 1e-5): ONNX Runtime on the
  tiny export for several lengths and chunk settings, the eager full-size model (and its ONNX graph, slow);
- settings validation, the manifest record (round trip, export writes it, an older manifest without it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.build import (BIGVGAN_CONV_POST_KERNEL, BIGVGAN_CONV_PRE_KERNEL, BIGVGAN_RESAMPLE_RATIO,
                          BIGVGAN_RESAMPLE_TAPS, BuildOptions, build, vocoder_layout)
from export.checkpoint import fold_weight_norm, load_into
from export.config import BigVGANConfig
from export.models.alias_free import FILTER_TAPS, DownSample2x, UpSample2x, refresh_derived
from export.models.bigvgan import BigVGAN, demo_state_dict
from runtime.contracts import ModelDims, build_contracts
from runtime.errors import ContractError, InputError
from runtime.manifest import read_manifest, write_manifest
from runtime.streaming.vocoder import (Context, VocoderChunking, VocoderPlanner, Window, backward_frames, context,
                                       forward_samples, run_window)

TOL = 1e-5
FULL = BigVGANConfig()                                           # the real IndexTTS2 BigVGAN (1536 channels)
TINY = BigVGANConfig(upsample_initial_channel=64)                # the same geometry, 64 channels
#: another geometry (BigVGAN v1-like 8x8x2x2 stages, two resblock kernels): the interval algebra must hold
#: for any layout, not only the one it was written against
OTHER = BigVGANConfig(upsample_rates=(8, 8, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4), upsample_initial_channel=32,
                      resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 2), (2, 6)))
SETTINGS = [VocoderChunking(8, 8), VocoderChunking(8, 64), VocoderChunking(16, 16), VocoderChunking(16, 128),
            VocoderChunking(32, 256)]


def eager_bigvgan(cfg: BigVGANConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> BigVGAN:
    """BigVGAN with the demo checkpoint's seeded random weights (every tap nonzero, activations O(1))."""
    model = BigVGAN(cfg)
    load_into(model, fold_weight_norm(demo_state_dict(cfg, torch.Generator().manual_seed(seed))), "demo BigVGAN")
    model = model.to(dtype)
    refresh_derived(model)
    return model.eval()


def random_mel(rng: np.random.Generator, frames: int, dtype=np.float32) -> np.ndarray:
    """Log-mel-like values (as export/wrappers/audio.py feeds the graph)."""
    return (rng.standard_normal((1, 80, frames)) * 2.0 - 5.0).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# Geometry and plans (no model)


def test_context_of_the_indextts2_vocoder():
    """Tiny and full-size demo BigVGAN differ only in channels: the same 38 + 38 frames of context."""
    full, tiny = context(vocoder_layout(FULL)), context(vocoder_layout(TINY))
    assert full == tiny == Context(38, 38)
    # the first and last sample of one frame: the cone ends are reached at opposite ends of the frame
    layout = vocoder_layout(FULL)
    assert backward_frames(layout, 100 * 256, 100 * 256 + 1) == (62, 138)
    assert backward_frames(layout, 100 * 256 + 255, 100 * 256 + 256) == (63, 139)


@pytest.mark.parametrize("cfg", [FULL, OTHER], ids=["indextts2", "other"])
def test_windows_are_the_chunk_plus_context_clamped_to_the_segment(cfg):
    layout = vocoder_layout(cfg)
    ctx = context(layout)
    for frames in (1, 7, 33, 150, 1000):
        for chunking in SETTINGS:
            windows = VocoderPlanner(layout, chunking, 10_000).plan(frames)
            assert [w.start for w in windows] == [0] + [w.end for w in windows[:-1]] and windows[-1].end == frames
            for w in windows:
                assert (w.win_start, w.win_end) == (max(0, w.start - ctx.left), min(frames, w.end + ctx.right))
                assert (w.crop_start, w.crop_end) == (256 * (w.start - w.win_start), 256 * (w.end - w.win_start))


def test_chunks_start_small_and_double_up_to_the_maximum():
    assert VocoderChunking(32, 256).sizes(1000) == [32, 64, 128, 256, 256, 256, 8]
    assert VocoderChunking(16, 16).sizes(40) == [16, 16, 8]
    assert VocoderChunking(32, 256).sizes(20) == [20]                      # shorter than one chunk: one window
    planner = VocoderPlanner(vocoder_layout(FULL), VocoderChunking(), 3200)
    assert planner.plan(20) == [Window(0, 20, 0, 20, 0, 20 * 256)]
    assert planner.plan(0) == []
    # chunks [0, 32) and [32, 64) of a 69-frame segment both need all of it (38 frames of context): one run
    assert planner.plan(69) == [Window(0, 69, 0, 69, 0, 69 * 256)]
    assert [(w.start, w.end, w.win_start, w.win_end) for w in planner.plan(100)] == [(0, 32, 0, 70), (32, 96, 0, 100),
                                                                                 (96, 100, 58, 100)]
    whole = VocoderPlanner(vocoder_layout(FULL), None, 3200)
    assert not whole.chunked and whole.plan(700) == [Window(0, 700, 0, 700, 0, 700 * 256)]


def test_forward_span_is_the_inverse_of_the_backward_cones():
    """Sample s is in frame j's forward span iff j is in s's cone (brute force on a short segment)."""
    layout, frames = vocoder_layout(FULL), 80
    cones = [backward_frames(layout, s, s + 1, frames) for s in range(frames * 256)]
    for j in (0, 1, 30, 40, 79):
        inside = [s for s, (lo, hi) in enumerate(cones) if lo <= j < hi]
        assert forward_samples(layout, j, j + 1, frames) == (inside[0], inside[-1] + 1)
        assert len(inside) == inside[-1] + 1 - inside[0]


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("first, most, match", [
    (0, 256, "first_frames must be a positive number of mel frames, got 0"),
    (32, -1, "max_frames must be a positive number of mel frames, got -1"),
    (64, 32, "max_frames 32 < first_frames 64"),
])
def test_bad_chunk_settings_are_refused(first, most, match):
    with pytest.raises(InputError, match=match):
        VocoderChunking(first, most)


def test_a_window_over_the_profile_maximum_is_refused_before_any_work():
    layout = vocoder_layout(FULL)
    with pytest.raises(InputError, match=r"a 3200-frame chunk needs a window of 3276 mel frames \(38 left \+ 38 "
                                         r"right context\), more than the bigvgan graph's mel_len maximum 3200; "
                                         r"use max_frames <= 3124"):
        VocoderPlanner(layout, VocoderChunking(32, 3200), 3200)
    VocoderPlanner(layout, VocoderChunking(32, 3124), 3200)               # the largest that fits
    with pytest.raises(InputError, match="a segment of 3201 mel frames is longer than the bigvgan graph's mel_len "
                                         "maximum 3200"):
        VocoderPlanner(layout, None, 3200).plan(3201)


def test_a_malformed_layout_is_refused():
    good = vocoder_layout(FULL)
    with pytest.raises(ValueError, match="hop_length 255 != prod"):
        dataclasses.replace(good, hop_length=255)
    with pytest.raises(ValueError, match="odd"):
        dataclasses.replace(good, upsample_kernel_sizes=(7, 8, 4, 4, 4, 4))


# ---------------------------------------------------------------------------------------------------
# The manifest record


def test_layout_is_the_models_geometry():
    """export.build's literals for what config.json does not carry agree with the modules they describe."""
    model = BigVGAN(TINY)
    layout = vocoder_layout(TINY)
    assert layout.conv_pre_kernel == model.conv_pre.kernel_size[0] == BIGVGAN_CONV_PRE_KERNEL
    assert layout.conv_post_kernel == model.conv_post.kernel_size[0] == BIGVGAN_CONV_POST_KERNEL
    assert model.conv_pre.padding[0] == model.conv_post.padding[0] == 3
    for up, u, k in zip(model.ups, layout.upsample_rates, layout.upsample_kernel_sizes):
        assert (up[0].stride[0], up[0].kernel_size[0], up[0].padding[0]) == (u, k, (k - u) // 2)
    for block, k, dils in zip(model.resblocks, layout.resblock_kernel_sizes, layout.resblock_dilation_sizes):
        geometry = [[(c.kernel_size[0], c.dilation[0], c.padding[0]) for c in convs]
                    for convs in (block.convs1, block.convs2)]
        assert geometry == [[(k, d, d * (k - 1) // 2) for d in dils], [(k, 1, (k - 1) // 2)] * len(dils)]
    assert BIGVGAN_RESAMPLE_TAPS == FILTER_TAPS == model.activation_post.upsample.filter.shape[-1]
    assert model.activation_post.downsample.weight.shape[-1] == FILTER_TAPS
    assert (UpSample2x.PAD, DownSample2x.PAD_LEFT, DownSample2x.PAD_RIGHT) == (3, 5, 6)
    up = UpSample2x(4)(torch.zeros(1, 4, 10))                              # the ratio: 2x up, 2x down
    assert up.shape[-1] == BIGVGAN_RESAMPLE_RATIO * 10 and DownSample2x(4)(up).shape[-1] == 10
    assert layout.hop_length == 256


def test_layout_round_trips_through_the_manifest(tmp_path, tiny_export):
    out, report = tiny_export
    assert report.manifest.vocoder == vocoder_layout(TINY)                # the tiny demo's BigVGAN geometry
    manifest = read_manifest(out)
    assert manifest.vocoder == vocoder_layout(TINY)
    other = dataclasses.replace(manifest, vocoder=vocoder_layout(OTHER))
    write_manifest(other, tmp_path)
    assert read_manifest(tmp_path, check_files=False).vocoder == vocoder_layout(OTHER)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["vocoder"]["resblock_dilation_sizes"] == [[1, 2], [2, 6]]
    data["vocoder"]["hop_length"] = 128
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ContractError, match="malformed manifest.*hop_length 128"):
        read_manifest(tmp_path, check_files=False)


def _old_manifest(tiny_export, where: Path) -> Path:
    """The tiny export's manifest as written before the layout existed (no `vocoder` key)."""
    data = json.loads((tiny_export[0] / "manifest.json").read_text())
    del data["vocoder"]
    path = where / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_an_older_manifest_reads_and_vocodes_whole_segments_with_a_warning(tiny_export, tmp_path, caplog):
    manifest = read_manifest(_old_manifest(tiny_export, tmp_path), check_files=False)
    assert manifest.vocoder is None
    write_manifest(manifest, tmp_path)
    assert "vocoder" not in json.loads((tmp_path / "manifest.json").read_text())     # written as it was read
    with caplog.at_level(logging.WARNING, logger="runtime.streaming.vocoder"):
        planner = VocoderPlanner.from_manifest(manifest, VocoderChunking(), where="demo_engines")
    assert not planner.chunked and planner.plan(300) == [Window(0, 300, 0, 300, 0, 300 * 256)]
    assert "no vocoder layout" in caplog.text and "python -m export.build --checkpoints CKPT --out demo_engines" \
        in caplog.text
    caplog.clear()
    VocoderPlanner.from_manifest(manifest, None)
    assert not caplog.text                                                  # whole segments asked for: nothing to say


def test_rebuilding_an_older_export_records_the_layout_without_export_work(tiny_export, tiny_ckpt, tmp_path):
    """What the warning promises: export.build over an older export reuses every graph, adds the layout."""
    out = Path(shutil.copytree(tiny_export[0], tmp_path / "out"))
    _old_manifest(tiny_export, out)
    report = build(BuildOptions(tiny_ckpt, out, "fp16"))
    assert not report.exported and report.reused == list(tiny_export[1].manifest.graphs)
    assert read_manifest(out).vocoder == vocoder_layout(TINY)


# ---------------------------------------------------------------------------------------------------
# The cone is exact: float64 derivatives of the eager model


def _unclamped(model: BigVGAN) -> BigVGAN:
    """conv_post scaled down so no output reaches the final clamp, whose zero gradient would hide
    dependencies (the dependency structure is unchanged)."""
    with torch.no_grad():
        model.conv_post.weight.mul_(1e-3)
    return model


@pytest.mark.parametrize("cfg", [TINY, OTHER], ids=["indextts2", "other"])
def test_float64_derivatives_are_nonzero_exactly_on_the_computed_cones(cfg):
    """Backward: d out[s] / d mel is nonzero on exactly the frames backward_frames gives, for samples at
    both segment ends (clamped cones), near one end and inside. Forward: d out / d mel[:, j] (forward mode)
    is nonzero on exactly the samples forward_samples gives. Every tap of the random weights is nonzero, so
    a frame outside the computed cone that mattered, or one inside that did not, would show. float64:
    the outermost frames contribute ~1e-160 (below float32's range)."""
    layout = vocoder_layout(cfg)
    ctx = context(layout)
    frames = ctx.left + ctx.right + 4
    mid = ctx.left + 2
    model = _unclamped(eager_bigvgan(cfg, torch.float64))
    mel = torch.from_numpy(random_mel(np.random.default_rng(3), frames, np.float64))

    samples = [0, 256 * 3 + 100, 256 * mid + 128, 256 * frames - 1]
    batch = mel.repeat(len(samples), 1, 1).requires_grad_(True)
    out = model(batch)[:, 0]                                                 # (B, 256 T)
    assert out.abs().max() < 0.9
    out[torch.arange(len(samples)), torch.tensor(samples)].sum().backward()
    depends = (batch.grad.abs().amax(dim=1) > 0).numpy()                    # (B, T): d out[s_b] / d frame != 0
    for b, s in enumerate(samples):
        lo, hi = backward_frames(layout, s, s + 1, frames)
        assert np.flatnonzero(depends[b]).tolist() == list(range(lo, hi)), f"sample {s}"
    lo, hi = backward_frames(layout, 256 * mid + 128, 256 * mid + 129, frames)
    assert 0 < lo and hi < frames                                             # one cone clamped nowhere

    js = [0, mid, frames - 1]
    tangent = torch.zeros(len(js), 80, frames, dtype=torch.float64)
    for b, j in enumerate(js):
        tangent[b, :, j] = torch.from_numpy(np.random.default_rng(b).standard_normal(80))
    with torch.no_grad():
        _, d_out = torch.func.jvp(model, (mel.repeat(len(js), 1, 1),), (tangent,))   # (B, 1, 256 T)
    for b, j in enumerate(js):
        s0, s1 = forward_samples(layout, j, j + 1, frames)
        assert np.flatnonzero(d_out[b, 0].numpy() != 0).tolist() == list(range(s0, s1)), f"frame {j}"


# ---------------------------------------------------------------------------------------------------
# Whole-segment equality in float32


@pytest.fixture(scope="module")
def tiny_bigvgan(tiny_export):
    from runtime.executors import open_executor

    out, _ = tiny_export
    manifest = read_manifest(out)
    return manifest, open_executor(manifest, out, "bigvgan", "ort-cpu")


def _max_chunk_error(executor, mel: np.ndarray, planner: VocoderPlanner) -> float:
    whole = executor.run({"mel": mel})["wav"].copy()                        # (1, 256 T)
    chunks = [run_window(executor, mel, w) for w in planner.plan(mel.shape[2])]
    joined = np.concatenate(chunks, axis=1)                                  # (1, 256 T)
    assert joined.shape == whole.shape and joined.dtype == np.float32
    return float(np.abs(joined - whole).max())


@pytest.mark.parametrize("frames", [5, 37, 100, 203])
def test_tiny_onnx_chunks_equal_the_whole_segment(tiny_bigvgan, frames):
    """5 frames: shorter than any chunk; 37, 203: not a multiple of any chunk size; 203: interior windows."""
    manifest, executor = tiny_bigvgan
    mel = random_mel(np.random.default_rng(frames), frames)
    errors = {f"{c.first_frames}/{c.max_frames}": _max_chunk_error(executor, mel,
                                                                   VocoderPlanner.from_manifest(manifest, c))
              for c in SETTINGS}
    print(f"tiny ONNX, {frames} frames, max |chunks - whole| per first/max chunk frames: {errors}")
    assert max(errors.values()) <= TOL, errors


def test_tiny_onnx_context_is_needed(tiny_bigvgan):
    """The comparison can fail: the same chunks without context differ grossly from the whole segment."""
    manifest, executor = tiny_bigvgan
    mel = random_mel(np.random.default_rng(7), 120)
    whole = executor.run({"mel": mel})["wav"].copy()
    windows = [Window(w.start, w.end, w.start, w.end, 0, 256 * w.frames)
               for w in VocoderPlanner.from_manifest(manifest, VocoderChunking(16, 32)).plan(120)]
    joined = np.concatenate([run_window(executor, mel, w) for w in windows], axis=1)
    assert np.abs(joined - whole).max() > 1e-2


def test_tiny_onnx_perturbed_frame_changes_only_its_forward_span(tiny_bigvgan):
    manifest, executor = tiny_bigvgan
    frames, j = 120, 61
    rng = np.random.default_rng(8)
    mel = random_mel(rng, frames)
    base = executor.run({"mel": mel})["wav"][0].copy()
    mel[0, :, j] += rng.standard_normal(80).astype(np.float32)
    changed = np.flatnonzero(executor.run({"mel": mel})["wav"][0] != base)
    s0, s1 = forward_samples(manifest.vocoder, j, j + 1, frames)
    assert changed.size and s0 <= changed[0] and changed[-1] < s1


def test_run_window_returns_a_copy_and_checks_its_window(tiny_bigvgan):
    manifest, executor = tiny_bigvgan
    mel = random_mel(np.random.default_rng(9), 120)
    window = VocoderPlanner.from_manifest(manifest, VocoderChunking(16, 16)).plan(120)[1]
    chunk = run_window(executor, mel, window)
    assert chunk.shape == (1, 16 * 256) and chunk.flags.owndata
    with pytest.raises(ContractError, match="does not fit a mel"):
        run_window(executor, mel[:, :, :40], Window(0, 16, 0, 54, 0, 4096))


def _torch_executor(model: BigVGAN):
    """The eager model behind the runtime's executor interface (the same feed checks as ONNX Runtime)."""
    from export.torch_executor import TorchExecutor
    from export.wrappers.audio import BigVGANGraph
    from runtime.manifest import graph_entry

    dims = ModelDims()
    entry = graph_entry(build_contracts(dims)["bigvgan"], dims, file="eager", sha256="", opset=18,
                        exporter="eager", fingerprint="")
    return TorchExecutor(entry, BigVGANGraph(model))


def test_full_size_eager_chunks_equal_the_whole_segment():
    """The full-size BigVGAN (1536 channels), eager on the CPU through run_window, on the windows of the
    full-size config's layout: 120 frames in 16-, 32-, 32-, 32-, 8-frame chunks. Run: the first window (at
    the segment's start), one with context on both sides, the last (at its end); each chunk against the
    same samples of the whole run (the ONNX tests above join every chunk of many plans; full-size BigVGAN
    is slow on a CPU, so here only the three kinds of window run)."""
    executor = _torch_executor(eager_bigvgan(FULL))
    frames = 120
    mel = random_mel(np.random.default_rng(10), frames)
    windows = VocoderPlanner(vocoder_layout(FULL), VocoderChunking(16, 32), 3200).plan(frames)
    interior = [w for w in windows if 0 < w.win_start and w.win_end < frames]
    assert [w.frames for w in windows] == [16, 32, 32, 32, 8] and interior
    whole = executor.run({"mel": mel})["wav"]                               # (1, 256 T)
    errors = [float(np.abs(run_window(executor, mel, w) - whole[:, 256 * w.start:256 * w.end]).max())
              for w in (windows[0], interior[0], windows[-1])]
    print(f"full-size eager, {frames} frames, chunks 16/32 (first, interior, last window): max |chunk - whole| = "
          f"{[f'{e:.3g}' for e in errors]}")
    assert max(errors) <= TOL


@pytest.mark.slow
def test_full_size_onnx_chunks_equal_the_whole_segment(tmp_path):
    """The full-size BigVGAN exported alone (as export.build exports it: phase-separated activations),
    run by ONNX Runtime on the windows of the full-size layout."""
    from export.graph_checks import stamp_metadata
    from export.models.alias_free import phase_separated
    from export.onnx_export import export_onnx
    from export.wrappers.audio import BigVGANGraph
    from runtime.executors.ort import OrtExecutor, OrtOptions
    from runtime.manifest import graph_entry, sha256_file

    dims = ModelDims()
    contract = build_contracts(dims)["bigvgan"]
    model = eager_bigvgan(FULL)
    path = export_onnx(BigVGANGraph(phase_separated(model)), contract,
                       (torch.from_numpy(random_mel(np.random.default_rng(0), 8)).repeat(2, 1, 1),),
                       tmp_path / "onnx" / "bigvgan.onnx")
    stamp_metadata(path, {"indextts2.graph": "bigvgan", "indextts2.fingerprint": "full-size test"})  # executor checks
    entry = graph_entry(contract, dims, file="onnx/bigvgan.onnx", sha256=sha256_file(path), opset=18,
                        exporter="dynamo", fingerprint="full-size test")
    executor = OrtExecutor(entry, tmp_path, "ort-cpu", OrtOptions())
    mel = random_mel(np.random.default_rng(11), 150)
    errors = {f"{c.first_frames}/{c.max_frames}": _max_chunk_error(executor, mel,
                                                                   VocoderPlanner(vocoder_layout(FULL), c, 3200))
              for c in (VocoderChunking(16, 64), VocoderChunking(32, 256))}
    print(f"full-size ONNX, 150 frames: max |chunks - whole| = {errors}")
    assert max(errors.values()) <= TOL, errors
