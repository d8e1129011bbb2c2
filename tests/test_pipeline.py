"""The eager end-to-end pipeline on the tiny demo checkpoint: every mode, determinism, injected draws,
bad input (clear errors, no partial output file)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from export.demo import write_demo
from export.pipeline import DecoderSettings, EagerIndexTTS2, SynthesisRequest
from runtime.errors import InputError
from runtime.gpt.generate import GenerationConfig
from runtime.gpt.sampling import ReplayDraws, RngDraws

REPO = Path(__file__).resolve().parents[1]
FAST = DecoderSettings(steps=3)
SHORT = GenerationConfig(max_mel_tokens=16)


class RecordingDraws(RngDraws):
    """RngDraws that keeps a copy of every draw, to replay them later."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.record: list[np.ndarray] = []

    def exponential(self, out: np.ndarray) -> np.ndarray:
        super().exponential(out)
        self.record.append(out.copy())
        return out


class ConstantDraws:
    """Every Exp(1) variate equal: the sampler then picks the most probable token(s)."""

    def exponential(self, out: np.ndarray) -> np.ndarray:
        out.fill(1.0)
        return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("pipeline") / "ckpt", "tiny", seed=0)


@pytest.fixture(scope="module")
def tts(ckpt: Path) -> EagerIndexTTS2:
    return EagerIndexTTS2(ckpt, emo_text_max_new_tokens=8)


def _request(ckpt: Path, **kw) -> SynthesisRequest:
    kw.setdefault("text", "Hello world. This is a test!")
    return SynthesisRequest(speaker=ckpt / "examples/speaker.wav", **kw)


@pytest.mark.parametrize("mode", ["voice", "emo_audio", "emo_vector", "emo_text", "multi_segment"])
def test_every_mode_produces_audio(tts: EagerIndexTTS2, ckpt: Path, mode: str) -> None:
    kw: dict = {
        "voice": {},
        "emo_audio": {"emo_audio": ckpt / "examples/emotion.wav", "emo_alpha": 0.6},
        "emo_vector": {"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0), "emo_alpha": 0.8},
        "emo_text": {"use_emo_text": True, "emo_text": "I am so happy"},
        "multi_segment": {"text": "The train was late. 今天天气很好。Please read slowly, then pause.",
                          "max_text_tokens_per_segment": 8},
    }[mode]
    result = tts.synthesize(_request(ckpt, **kw), SHORT, FAST, seed=0)
    expected_source = {"voice": "speaker", "emo_audio": "audio", "emo_vector": "vector", "emo_text": "text",
                       "multi_segment": "speaker"}[mode]
    assert result.emotion.source == expected_source
    assert result.sample_rate == 22050 and result.pcm.dtype == np.int16
    audio = sum(s.pcm.size for s in result.segments)
    silences = 4410 * (len(result.segments) - 1)
    assert result.pcm.size == audio + silences
    if mode == "multi_segment":
        assert len(result.segments) >= 3
    for seg in result.segments:
        assert seg.pcm.size == 256 * int(np.float32(seg.codes.size) * np.float32(1.72))


def test_emotion_modes_change_the_conditioning(tts: EagerIndexTTS2, ckpt: Path) -> None:
    plain = tts.prepare(_request(ckpt), seed=0)
    vector = tts.prepare(_request(ckpt, emo_vector=(0, 0.9, 0, 0, 0, 0, 0, 0)), seed=0)
    audio = tts.prepare(_request(ckpt, emo_audio=ckpt / "examples/emotion.wav", emo_alpha=1.0), seed=0)
    assert not np.allclose(plain.emovec, vector.emovec) and not np.allclose(plain.emovec, audio.emovec)
    np.testing.assert_array_equal(plain.condition["spk_latent"], vector.condition["spk_latent"])


def test_same_seed_same_output_and_different_seed_differs(tts: EagerIndexTTS2, ckpt: Path) -> None:
    request = _request(ckpt, text="Hello world.")
    a = tts.synthesize(request, SHORT, FAST, seed=11)
    b = tts.synthesize(request, SHORT, FAST, seed=11)
    c = tts.synthesize(request, SHORT, FAST, seed=12)
    assert [s.codes.tolist() for s in a.segments] == [s.codes.tolist() for s in b.segments]
    np.testing.assert_array_equal(a.pcm, b.pcm)
    assert [s.codes.tolist() for s in a.segments] != [s.codes.tolist() for s in c.segments]


def test_injected_draws_decide_the_codes(tts: EagerIndexTTS2, ckpt: Path) -> None:
    request = _request(ckpt, text="Hello world.")
    # Equal variates make sampling pick the most probable token each step: the greedy codes
    # (temperature, top-k and top-p never change which token is most probable).
    sampled = GenerationConfig(num_beams=1, max_mel_tokens=16)
    greedy = GenerationConfig(num_beams=1, do_sample=False, max_mel_tokens=16)
    injected = tts.synthesize(request, sampled, FAST, seed=5, gpt_draws=ConstantDraws())
    reference = tts.synthesize(request, greedy, FAST, seed=5)
    assert [s.codes.tolist() for s in injected.segments] == [s.codes.tolist() for s in reference.segments]
    # Beam sampling: replaying recorded draws reproduces the codes of the run that drew them.
    recorder = RecordingDraws(seed=77)
    first = tts.synthesize(request, SHORT, FAST, seed=1, gpt_draws=recorder)
    assert recorder.record
    replayed = tts.synthesize(request, SHORT, FAST, seed=1, gpt_draws=ReplayDraws(recorder.record))
    assert [s.codes.tolist() for s in first.segments] == [s.codes.tolist() for s in replayed.segments]
    np.testing.assert_array_equal(first.pcm, replayed.pcm)


def test_speaker_cache_is_keyed_by_content(tts: EagerIndexTTS2, ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "same_voice.wav"
    shutil.copy(ckpt / "examples/speaker.wav", copy)
    assert tts.speaker(copy) is tts.speaker(ckpt / "examples/speaker.wav")
    other = tmp_path / "other.wav"
    data, sr = sf.read(copy)
    sf.write(other, data[::-1], sr)
    assert tts.speaker(other) is not tts.speaker(copy)


def test_bad_requests_raise_input_errors(tts: EagerIndexTTS2, ckpt: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 20)
    with pytest.raises(InputError, match="empty"):
        tts.synthesize(_request(ckpt, text="   "), SHORT, FAST)
    with pytest.raises(InputError, match="expected 8"):
        tts.synthesize(_request(ckpt, emo_vector=(0.1, 0.2)), SHORT, FAST)
    with pytest.raises(InputError, match="negative"):
        tts.synthesize(_request(ckpt, emo_vector=(0, 0, 0, 0, 0, 0, 0, -0.5)), SHORT, FAST)
    with pytest.raises(InputError, match="cannot decode"):
        tts.synthesize(SynthesisRequest(text="hi", speaker=garbage), SHORT, FAST)
    with pytest.raises(InputError, match="cannot decode"):
        tts.synthesize(_request(ckpt, emo_audio=garbage), SHORT, FAST)


def test_the_eager_pipeline_shares_the_answer_parser(tts: EagerIndexTTS2, ckpt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """export/ reads the emotion model's answer through runtime.emotion.answer (no copy): a label answer is a
    one-hot emotion, a non-numeric score the EmotionAnswerError."""
    from runtime.emotion.llm import QwenEmotion
    from runtime.errors import EmotionAnswerError

    monkeypatch.setattr(QwenEmotion, "respond", lambda self, text: '{"emotion": "angry"}')
    result = tts.synthesize(_request(ckpt, use_emo_text=True, emo_text="x"), SHORT, FAST, seed=0)
    assert result.emotion.source == "text" and result.emotion.emo_vector == (0, 1, 0, 0, 0, 0, 0, 0)
    monkeypatch.setattr(QwenEmotion, "respond", lambda self, text: '{"高兴": "很高"}')
    with pytest.raises(EmotionAnswerError, match="很高"):
        tts.synthesize(_request(ckpt, use_emo_text=True, emo_text="x"), SHORT, FAST, seed=0)


def test_cli_writes_wav_and_fails_cleanly(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    base = [sys.executable, "-m", "export.synthesize", "--checkpoints", str(ckpt),
            "--speaker", str(ckpt / "examples/speaker.wav"), "--out", str(out), "--max-mel-tokens", "12",
            "--steps", "2", "--seed", "0", "-q"]
    ok = subprocess.run(base + ["--text", "Hello world.", "--emo-vector", "0,0,0.5,0,0,0,0,0"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert sf.info(out).samplerate == 22050 and sf.info(out).subtype == "PCM_16"
    out.unlink()
    cases = [
        (["--text", ""], "the text to synthesize is empty"),
        (["--text", "hi", "--emo-vector", "1,2,3"], "expected 8 weights"),
        (["--text", "hi", "--emo-vector", "0,0,0,0,0,0,0,-1"], "negative"),
        (["--text-file", str(tmp_path / "absent.txt")], "cannot read the text file"),
        (["--text", "hi", "--emo-audio", str(tmp_path / "absent.wav")], "audio file not found"),
        (["--text", "hi", "--num-beams", "0"], "num_beams"),
    ]
    for extra, message in cases:
        proc = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.wav.*"))
