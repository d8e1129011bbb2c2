"""Audio front-ends (runtime/frontend/audio.py, resample.py, mel.py, features.py): fixture parity, the librosa-style
loader and its errors, and the torch-free import guarantee."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from runtime.errors import InputError
from runtime.frontend.audio import check_not_silent, load_audio
from runtime.frontend.features import campplus_features, kaldi_fbank, seamless_features
from runtime.frontend.mel import s2mel_mel, slaney_mel_basis
from runtime.frontend.resample import resample_sinc, resampled_length
from tests.conftest import REPO, assert_rows_pass, run_fixture_calls


def _tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- golden fixture ------------------------------------------------------------------------------------

def test_frontend_fixture(fixtures_root: Path) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, "frontend"))


# --- resampler -----------------------------------------------------------------------------------------

def test_resample_identity_and_batch_shape() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4410)).astype(np.float32)
    assert resample_sinc(x, 22050, 22050) is x
    y = resample_sinc(x, 22050, 16000)
    assert y.shape == (2, 3, 3200) and y.dtype == np.float32
    np.testing.assert_array_equal(y[1, 2], resample_sinc(x[1, 2], 22050, 16000))


def test_resample_preserves_a_tone() -> None:
    y = resample_sinc(_tone(22050, 1.0)[None], 22050, 16000)[0]
    want = _tone(16000, 1.0)
    assert y.shape == want.shape
    assert np.abs(y[400:-400] - want[400:-400]).max() < 1e-3   # away from the zero-padded edges


def test_resampled_length_keeps_torchaudio_float32_ceil() -> None:
    # 320 * L / 441 just above an integer: torchaudio's float32 ceil drops the fraction, so must we.
    length = next(n for n in range(200_000, 400_000) if (320 * n) % 441 == 1)
    exact = math.ceil(320 * length / 441)
    assert resampled_length(length, 22050, 16000) == exact - 1
    assert resampled_length(22050, 22050, 16000) == 16000


# --- s2mel mel -----------------------------------------------------------------------------------------

def test_s2mel_mel_shape_and_basis() -> None:
    mel = s2mel_mel(_tone(22050, 0.5)[None])
    assert mel.shape == (1, 80, 11025 // 256) and mel.dtype == np.float32
    basis = slaney_mel_basis(22050, 1024, 80, 0.0, None)
    assert basis.shape == (80, 513) and basis.dtype == np.float32
    assert np.all(basis.max(axis=1) > 0)                       # no empty filter
    with pytest.raises(InputError, match="too short"):
        s2mel_mel(np.zeros((1, 300), np.float32))


# --- Kaldi fbank / CAMPPlus ------------------------------------------------------------------------------

def test_kaldi_fbank_shapes() -> None:
    wave = _tone(16000, 0.5)
    fbank = kaldi_fbank(wave[None])
    assert fbank.shape == (1 + (8000 - 400) // 160, 80) and fbank.dtype == np.float32
    feat = campplus_features(wave)
    np.testing.assert_allclose(feat.mean(axis=0), 0.0, atol=1e-5)
    assert kaldi_fbank(wave[:399]).shape == (0, 80)
    with pytest.raises(InputError, match="too short"):
        campplus_features(wave[:399])


# --- SeamlessM4T features --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [16000, 16160, 5123])
def test_seamless_features_match_transformers(n: int) -> None:
    transformers = pytest.importorskip("transformers")
    wave = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    extractor = transformers.SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, sampling_rate=16000,
                                                         padding_value=1.0, stride=2)
    ref = extractor(wave[None], sampling_rate=16000, return_tensors="np")
    features, mask = seamless_features(wave)
    assert features.dtype == np.float32 and mask.dtype == np.int32
    np.testing.assert_allclose(features, ref["input_features"], atol=2e-6, rtol=0)
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    frames = 1 + (n - 400) // 160
    assert mask.shape == (1, (frames + 1) // 2)
    assert mask[0, -1] == (0 if frames % 2 else 1)


def test_seamless_features_too_short() -> None:
    with pytest.raises(InputError, match="too short"):
        seamless_features(np.ones(500, np.float32))


# --- load_audio ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,subtype,atol", [("wav", "FLOAT", 0.0), ("flac", "PCM_24", 2e-7), ("ogg", "VORBIS", 0.05)])
def test_load_audio_formats(tmp_path: Path, ext: str, subtype: str, atol: float) -> None:
    x = _tone(22050, 0.5)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, x, 22050, subtype=subtype)
    audio = load_audio(path, sr=22050)
    assert audio.shape == (1, x.shape[0]) and audio.dtype == np.float32
    assert np.abs(audio[0] - x).max() <= atol


def test_load_audio_stereo_is_channel_mean(tmp_path: Path) -> None:
    left, right = _tone(16000, 0.3, 300.0), _tone(16000, 0.3, 700.0, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio = load_audio(path, sr=16000)
    np.testing.assert_array_equal(audio[0], (left + right) / np.float32(2))


def test_load_audio_resamples_with_soxr_hq(tmp_path: Path) -> None:
    x = _tone(44100, 0.7)
    path = tmp_path / "hi.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    audio = load_audio(path, sr=22050)
    assert audio.shape == (1, math.ceil(x.shape[0] * 22050 / 44100)) and audio.dtype == np.float32
    direct = soxr.resample(x, 44100, 22050, quality="HQ")
    n = min(direct.shape[0], audio.shape[1])
    np.testing.assert_array_equal(audio[0, :n], direct[:n])
    audio16 = load_audio(path, sr=16000)
    assert audio16.shape == (1, math.ceil(x.shape[0] * 16000 / 44100))


def test_load_audio_caps_duration(tmp_path: Path) -> None:
    path = tmp_path / "long.flac"
    sf.write(path, _tone(16000, 20.0), 16000)
    assert load_audio(path, sr=16000).shape == (1, 15 * 16000)
    assert load_audio(path, sr=22050, max_seconds=2.5).shape == (1, int(2.5 * 22050))


def test_load_audio_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(InputError, match="not found") as err:
        load_audio(missing, sr=22050)
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(InputError, match="cannot decode") as err:
        load_audio(garbage, sr=22050)
    assert str(garbage) in str(err.value)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(empty, sr=22050)
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 22050)
    with pytest.raises(InputError, match="no samples"):
        load_audio(no_samples, sr=22050)


def test_check_not_silent(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(22050, np.float32), 22050)
    with pytest.raises(InputError, match="silent") as err:
        check_not_silent(load_audio(path, sr=22050), path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="silent"):
        check_not_silent(np.full((1, 100), 5e-5, np.float32), "quiet.wav")
    check_not_silent(_tone(22050, 0.1)[None], "tone.wav")


# --- torch-free ----------------------------------------------------------------------------------------

_BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is blocked in this test')
        return None
sys.meta_path.insert(0, _NoTorch())
import runtime.frontend.audio, runtime.frontend.resample, runtime.frontend.features, runtime.frontend.mel
import numpy as np
x = np.random.default_rng(0).standard_normal((1, 22050)).astype(np.float32) * 0.1
y = runtime.frontend.resample.resample_sinc(x, 22050, 16000)
runtime.frontend.mel.s2mel_mel(x); runtime.frontend.features.campplus_features(y); runtime.frontend.features.seamless_features(y)
assert 'torch' not in sys.modules
print('ok')
"""


def test_runtime_frontends_import_without_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
