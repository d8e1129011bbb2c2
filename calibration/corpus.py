"""The calibration set: which texts and reference voices the collector synthesizes.

A calibration set should exercise what production sees: both languages, short and long segments (the
GPT's prompt length and the DiT's frame count vary with them), and several voices (the speaker graphs'
inputs and the conditioning they produce). The default set is small on purpose — six texts, three voices —
so a full-size collection finishes in minutes on a CPU; users extend it with `--texts FILE` (one text per
line, `en:` / `zh:` prefixes optional) and `--reference WAV` (repeatable).

The default voices are generated (there is no speech to ship here): harmonic glides at three pitches and
lengths, written as WAV files into the calibration directory so the run is reproducible from its record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InputError

#: (language, text): short, medium and long in each language; the long ones split into two segments.
DEFAULT_TEXTS: tuple[tuple[str, str], ...] = (
    ("en", "Good morning."),
    ("en", "The quick brown fox jumps over the lazy dog near the quiet river bank."),
    ("en", "After the concert the audience stood up and applauded for five minutes, and then everyone walked "
           "out into the warm summer night, talking about the music, the lights and the long drive home."),
    ("zh", "你好。"),
    ("zh", "今天天气很好，我们一起去公园散步吧。"),
    ("zh", "春天来了，花园里开满了红色和黄色的花。音乐会结束以后，观众们起立鼓掌，然后大家在温暖的夜晚里一边散步一边聊天，"
           "谈论着音乐、灯光和回家的路。"),
)

#: (file name, sample rate, seconds, pitch in Hz, seed) of the generated reference voices.
DEFAULT_VOICES: tuple[tuple[str, int, float, float, int], ...] = (
    ("voice_low_24k.wav", 24000, 4.0, 105.0, 1),
    ("voice_mid_22k.wav", 22050, 2.5, 170.0, 2),
    ("voice_high_16k.wav", 16000, 6.0, 240.0, 3),
)

_LANG_PREFIX = re.compile(r"^(en|zh)\s*:\s*", re.IGNORECASE)
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class CalibrationText:
    lang: str
    text: str


def guess_lang(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def read_texts(path: str | Path) -> list[CalibrationText]:
    """One text per non-empty line; an `en:` / `zh:` prefix names the language, else it is guessed."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise InputError(f"calibration texts {path}: file not found") from err
    except UnicodeDecodeError as err:
        raise InputError(f"calibration texts {path}: not UTF-8 text ({err})") from err
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LANG_PREFIX.match(line)
        text = line[m.end():].strip() if m else line
        if text:
            out.append(CalibrationText(m.group(1).lower() if m else guess_lang(text), text))
    if not out:
        raise InputError(f"calibration texts {path}: no text in it (one text per line)")
    return out


def default_texts() -> list[CalibrationText]:
    return [CalibrationText(lang, text) for lang, text in DEFAULT_TEXTS]


def write_default_voices(out_dir: Path) -> list[Path]:
    """Generate the default reference voices into `out_dir` (kept if already there)."""
    import soundfile as sf

    from export.demo import synthetic_voice

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sr, seconds, f0, seed in DEFAULT_VOICES:
        path = out_dir / name
        if not path.is_file():
            sf.write(path, synthetic_voice(sr=sr, seconds=seconds, seed=seed, f0=f0), sr, subtype="PCM_16")
        paths.append(path)
    return paths
