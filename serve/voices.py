"""The voice registry: uploaded reference audio under server-made ids, persisted so a restart keeps them.

- An id is made from the audio's content (`voice-` + 24 hex digits of its SHA-256): the same audio uploaded
  twice is the same voice; an id is never a path, and a client never names a file.
- An upload is checked from memory, in this order: its size (before anything is decoded), that it decodes,
  its duration, then the runtime prepares it (the speaker's features, latent and style: a bad reference —
  silent, too short, NaN samples — fails at upload, not at the first synthesis). The prepared state lives
  in the synthesizer's LRU (by content, `--voice-cache` entries); the registry keeps only the audio.
- With `--voices-dir`, each voice is two files there: `<id>.audio` (the bytes as uploaded) and `<id>.json`
  (name, hash, size, duration, time of upload), written through a `.part` file renamed into place (a
  crash leaves no half voice; stray `.part` files are removed at start). At start every voice is read
  back and its hash checked (a mismatch is skipped with a warning). Without it, voices live in memory.
- At most `max_voices`; beyond that an upload is refused (nothing is evicted silently: a client's voice
  id must not vanish while it is in use).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import soundfile as sf

from runtime.errors import InputError
from runtime.frontend.audio import AudioBytes
from serve.config import Limits
from serve.errors import NotFound, TooLarge

log = logging.getLogger(__name__)

ID_PREFIX = "voice-"
MAX_NAME = 128


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    sha256: str
    bytes: int
    duration_s: float
    created: float

    def public(self) -> dict:
        """What the API shows (no paths)."""
        return {"id": self.id, "name": self.name, "bytes": self.bytes, "duration_s": round(self.duration_s, 3),
                "created": int(self.created)}


def voice_id(data: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(data).hexdigest()
    return ID_PREFIX + digest[:24], digest


def probe_duration(audio: AudioBytes, limits: Limits) -> float:
    """Decode the header from memory: the duration, refused beyond `max_audio_seconds`."""
    try:
        info = sf.info(io.BytesIO(audio.data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"{audio}: cannot decode the audio ({err}); send WAV, FLAC or OGG") from err
    duration = float(info.frames) / float(info.samplerate) if info.samplerate else 0.0
    if duration > limits.max_audio_seconds:
        raise TooLarge(f"{audio}: {duration:.1f} s of audio, more than the limit max_audio_seconds = "
                       f"{limits.max_audio_seconds:g}")
    return duration


class VoiceRegistry:
    """Voices by id (and by name, when one voice has it); thread-safe."""

    def __init__(self, limits: Limits, directory: Path | None = None,
                 prepare: Callable[[AudioBytes], object] | None = None) -> None:
        self.limits, self.directory, self._prepare = limits, directory, prepare
        self._voices: dict[str, Voice] = {}
        self._audio: dict[str, bytes] = {}          # memory-only registry: the bytes
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._load()

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._voices)

    def list(self) -> list[Voice]:
        with self._lock:
            return sorted(self._voices.values(), key=lambda v: v.created)

    def get(self, key: str) -> Voice:
        """A voice by id, or by name when exactly one voice has that name."""
        with self._lock:
            if key in self._voices:
                return self._voices[key]
            named = [v for v in self._voices.values() if v.name == key]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise InputError(f"voice name {key!r} is ambiguous ({len(named)} voices have it); use its id")
        raise NotFound(f"voice {key!r} not found; GET /v1/audio/voices lists the {len(self)} voice(s) here")

    def audio(self, voice: Voice) -> AudioBytes:
        """The voice's reference audio (in memory; from its file when persisted)."""
        if self.directory is None:
            data = self._audio[voice.id]
        else:
            try:
                data = (self.directory / f"{voice.id}.audio").read_bytes()
            except OSError as err:
                raise NotFound(f"voice {voice.id}: its audio is gone from the voices directory ({err})") from err
        return AudioBytes(data, f"voice {voice.id}")

    # -- writing --------------------------------------------------------------------------------
    def add(self, data: bytes, name: str = "") -> tuple[Voice, bool]:
        """Register `data` (checked: size, decoding, duration, preparation) -> (voice, newly made)."""
        name = (name or "").strip()
        if len(name) > MAX_NAME:
            raise InputError(f"voice name has {len(name)} characters, more than {MAX_NAME}")
        if len(data) > self.limits.max_upload_bytes:
            raise TooLarge(f"the upload has {len(data)} bytes, more than the limit max_upload_bytes = "
                           f"{self.limits.max_upload_bytes}")
        if not data:
            raise InputError("the upload is empty (0 bytes): send the reference audio in the `audio` field")
        vid, digest = voice_id(data)
        with self._lock:
            if vid in self._voices:
                return self._voices[vid], False
            if len(self._voices) >= self.limits.max_voices:
                raise InputError(f"the registry holds {len(self._voices)} voices, the limit max_voices; "
                                 "delete some (DELETE /v1/audio/voices/{id}) first")
        audio = AudioBytes(data, f"the uploaded audio '{name or vid}'")
        duration = probe_duration(audio, self.limits)
        if self._prepare is not None:
            self._prepare(audio)                       # InputError for a reference the model cannot use
        voice = Voice(vid, name or vid, digest, len(data), duration, time.time())
        with self._lock:
            if vid in self._voices:                    # the same audio, uploaded meanwhile
                return self._voices[vid], False
            self._store(voice, data)
            self._voices[vid] = voice
        log.info("voice %s (%r) registered: %d bytes, %.1f s", vid, voice.name, len(data), duration)
        return voice, True

    def add_file(self, name: str, path: Path) -> Voice:
        """An operator's voice at start (`--voice NAME=FILE`)."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise InputError(f"--voice {name}={path}: cannot read the file ({err})") from err
        return self.add(data, name)[0]

    def remove(self, vid: str) -> Voice:
        with self._lock:
            voice = self._voices.pop(vid, None)
            if voice is None:
                raise NotFound(f"voice {vid!r} not found")
            self._audio.pop(vid, None)
            if self.directory is not None:
                for suffix in (".json", ".audio"):
                    (self.directory / f"{vid}{suffix}").unlink(missing_ok=True)
        log.info("voice %s removed", vid)
        return voice

    # -- files ------------------------------------------------------------------------------------
    def _store(self, voice: Voice, data: bytes) -> None:
        if self.directory is None:
            self._audio[voice.id] = data
            return
        for suffix, payload in ((".audio", data), (".json", json.dumps(asdict(voice), indent=1).encode())):
            final = self.directory / f"{voice.id}{suffix}"
            part = final.with_name(final.name + ".part")
            try:
                part.write_bytes(payload)
                os.replace(part, final)
            finally:
                part.unlink(missing_ok=True)

    def _load(self) -> None:
        assert self.directory is not None
        for part in self.directory.glob("*.part"):
            part.unlink(missing_ok=True)
        for meta in sorted(self.directory.glob(f"{ID_PREFIX}*.json")):
            try:
                voice = Voice(**json.loads(meta.read_text()))
                data = (self.directory / f"{voice.id}.audio").read_bytes()
            except (OSError, ValueError, TypeError) as err:
                log.warning("voices: %s skipped (%s)", meta.name, err)
                continue
            if voice_id(data) != (voice.id, voice.sha256):
                log.warning("voices: %s skipped (its audio does not match its hash)", voice.id)
                continue
            self._voices[voice.id] = voice
        log.info("voices: %d read from %s", len(self._voices), self.directory)
