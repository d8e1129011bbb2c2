"""`python -m runtime`: synthesis from an export directory, streaming, inspect, torch-free operation, the
effective sampling / Euler settings (the manifest's recorded defaults, overridden by the flags given), and bad
input (clear message, non-zero exit, no output file left behind)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from runtime import cli
from runtime.cli_args import decoder_settings, generation_config
from runtime.gpt.generate import GenerationConfig
from runtime.manifest import read_manifest
from runtime.request import DecoderSettings
from runtime.synthesizer import Synthesizer

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-mel-tokens", "20", "--steps", "3", "--seed", "0"]


def _args(out_dir: Path, ckpt: Path, out: Path, *extra: str, text: str = "Hello world. 今天天气很好。") -> list[str]:
    return ["synthesize", "--engines", str(out_dir), "--speaker", str(ckpt / "examples/speaker.wav"),
            "--text", text, "--out", str(out), *FAST, *extra]


@pytest.fixture()
def export_copy(tiny_export, tmp_path) -> Path:
    """A private copy of the tiny export directory (for tests that damage it)."""
    return Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))


def test_synthesize_writes_a_wav(tiny_export, tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "a.wav"
    assert cli.main(_args(tiny_export[0], tiny_ckpt, out, "--backend", "ort-cpu")) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "backend ort-cpu" in printed
    data, sr = sf.read(out, dtype="int16")
    assert sr == 22050 and data.size > 0 and np.abs(data).max() > 0


def test_stream_writes_the_same_file_and_reports_first_audio(tiny_export, tiny_ckpt, tmp_path, capsys) -> None:
    """--stream (vocoder chunks, quick_streaming_tokens 120 by default) writes the audio the offline run
    with the same quick_streaming_tokens writes, within 1 LSB (the chunked vocoder's float rounding)."""
    text = "The train was late. 今天天气很好。Please read slowly, then pause."
    extra = ("--max-text-tokens-per-segment", "16", "--max-mel-tokens", "60", "--seed", "5")
    whole, streamed = tmp_path / "whole.wav", tmp_path / "streamed.wav"
    assert cli.main(_args(tiny_export[0], tiny_ckpt, whole, *extra, "--quick-streaming-tokens", "120",
                          text=text)) == 0
    capsys.readouterr()
    assert cli.main(_args(tiny_export[0], tiny_ckpt, streamed, "--stream", "--chunk-frames", "16", "-v", *extra,
                          text=text)) == 0
    out = capsys.readouterr().out
    assert "quick_streaming_tokens 120" in out and "  1: " in out      # --verbose shows the segments
    assert "<- first audio" in out and "stream: " in out and "underrun(s)" in out
    assert out.count("ready at") >= 4                                 # several chunks, each reported
    a, _ = sf.read(whole, dtype="int16")
    b, _ = sf.read(streamed, dtype="int16")
    assert a.shape == b.shape
    assert np.abs(a.astype(np.int32) - b).max() <= 1


def test_quick_streaming_tokens_moves_the_segment_boundaries(tiny_export, tiny_ckpt, tmp_path, capsys) -> None:
    text = "The train was late. Please read slowly, then pause. The quick brown fox jumps over the lazy dog."
    counts = {}
    for quick in ("0", "80"):
        out = tmp_path / f"q{quick}.wav"
        assert cli.main(_args(tiny_export[0], tiny_ckpt, out, "-v", "--max-mel-tokens", "8",
                              "--max-text-tokens-per-segment", "40", "--quick-streaming-tokens", quick,
                              text=text)) == 0
        counts[quick] = int(capsys.readouterr().out.split(" segment(s) (at most")[0].split()[-1])
    assert counts["80"] > counts["0"], counts


@pytest.mark.parametrize("flags, message", [
    (("--stream", "--chunk-frames", "0"), "--chunk-frames must be > 0"),
    (("--stream", "--chunk-frames", "64", "--max-chunk-frames", "32"), "max_frames 32 < first_frames 64"),
    (("--stream", "--chunk-frames", "64", "--max-chunk-frames", "5000"), "mel_len maximum"),
    (("--quick-streaming-tokens", "-1"), "quick_streaming_tokens must be >= 0"),
])
def test_bad_streaming_settings_fail_before_any_work(flags, message, tiny_export, tiny_ckpt, tmp_path,
                                                     monkeypatch, capsys) -> None:
    def never(*a, **k):
        raise AssertionError("the synthesizer was loaded")

    monkeypatch.setattr(Synthesizer, "__init__", never)
    out = tmp_path / "x.wav"
    assert cli.main(_args(tiny_export[0], tiny_ckpt, out, *flags)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_failure_while_streaming_leaves_no_file(tiny_export, tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:
    real = Synthesizer.codes_stage
    calls = []

    def failing(self, prep, index, *a, **k):
        calls.append(index)
        if index == 1:
            from runtime.errors import InputError

            raise InputError("injected failure in segment 2")
        return real(self, prep, index, *a, **k)

    monkeypatch.setattr(Synthesizer, "codes_stage", failing)
    out = tmp_path / "partial.wav"
    args = _args(tiny_export[0], tiny_ckpt, out, "--stream", "--max-text-tokens-per-segment", "8",
                 "--max-mel-tokens", "20", text="The train was late. 今天天气很好。Please read slowly, then pause.")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "injected failure" in err and "segment 2/" in err and "chunk(s)" in err
    assert calls == [0, 1] and not out.exists()


def test_text_from_a_file(tiny_export, tiny_ckpt, tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Hello from a file.", encoding="utf-8")
    out = tmp_path / "f.wav"
    args = ["synthesize", "--engines", str(tiny_export[0]), "--speaker", str(tiny_ckpt / "examples/speaker.wav"),
            "--text-file", str(text), "--out", str(out), *FAST]
    assert cli.main(args) == 0 and out.is_file()


def test_inspect_shows_graphs_and_backends(tiny_export, capsys) -> None:
    assert cli.main(["inspect", str(tiny_export[0])]) == 0
    shown = capsys.readouterr().out
    for name in ("gpt_decode", "dit_step", "bigvgan", "kv_cache.0..1"):
        assert name in shown
    assert "ort-cpu   yes" in shown and "trt       no" in shown and "files: all present" in shown


def test_inspect_names_a_missing_file(export_copy, capsys) -> None:
    (export_copy / "onnx/dit_step.onnx").unlink()
    assert cli.main(["inspect", str(export_copy)]) == 1
    assert "graph 'dit_step': file onnx/dit_step.onnx is missing" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Effective settings: the export's recorded defaults, overridden by the flags actually given

#: recorded defaults unlike every class default (GenerationConfig(), DecoderSettings()); fast on the tiny demo
RECORDED_SAMPLING = {"do_sample": False, "num_beams": 2, "top_k": 7, "top_p": 0.5, "temperature": 0.6,
                     "repetition_penalty": 2.0, "length_penalty": 0.5, "max_mel_tokens": 6}
RECORDED_EULER = {"euler_steps": 2, "cfg_rate": 0.3}


@pytest.fixture()
def recorded_export(export_copy) -> Path:
    """The tiny export whose manifest records sampling / Euler defaults different from the classes'."""
    path = export_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["sampling"].update(RECORDED_SAMPLING)
    data["synthesis"].update(RECORDED_EULER)
    path.write_text(json.dumps(data))
    return export_copy


def _parse(*flags: str):
    return cli.build_parser().parse_args(["synthesize", "--engines", "E", "--speaker", "s.wav", "--text", "t",
                                          "--out", "o.wav", *flags])


def test_generation_flags_default_to_not_given() -> None:
    args = _parse()
    for dest in ("greedy", "num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "length_penalty",
                 "max_mel_tokens", "steps", "cfg_rate", "seed"):
        assert getattr(args, dest) is None, dest


def test_given_flags_override_only_themselves() -> None:
    defaults = GenerationConfig(**RECORDED_SAMPLING)
    euler = DecoderSettings(steps=4, cfg_rate=0.2)
    assert generation_config(_parse(), defaults) == defaults
    assert decoder_settings(_parse(), euler) == euler
    args = _parse("--top-k", "3", "--sample", "--steps", "9")
    gen = generation_config(args, defaults)
    assert gen == GenerationConfig(**{**RECORDED_SAMPLING, "top_k": 3, "do_sample": True})
    assert decoder_settings(args, euler) == DecoderSettings(steps=9, cfg_rate=0.2)
    assert generation_config(_parse("--greedy"), GenerationConfig()).do_sample is False
    with pytest.raises(SystemExit):                                     # one mode, not both
        _parse("--greedy", "--sample")


def test_the_eager_cli_uses_the_eager_pipeline_defaults() -> None:
    """export.synthesize has no manifest: its unset flags are GenerationConfig() / DecoderSettings()."""
    from export import synthesize

    args = synthesize.build_parser().parse_args(["--checkpoints", "C", "--speaker", "s.wav", "--text", "t",
                                                 "--out", "o.wav", "--cfg-rate", "0.5"])
    assert generation_config(args, GenerationConfig()) == GenerationConfig()
    assert decoder_settings(args, DecoderSettings()) == DecoderSettings(cfg_rate=0.5)


def test_the_cli_takes_the_manifest_defaults(recorded_export) -> None:
    recorded = read_manifest(recorded_export, check_files=False)
    assert recorded.sampling != GenerationConfig() and recorded.synthesis.euler_steps != DecoderSettings().steps
    gen, dec = cli.effective_settings(_parse_at(recorded_export))
    assert gen == GenerationConfig(**RECORDED_SAMPLING)
    assert dec == DecoderSettings(steps=2, cfg_rate=0.3)
    gen, dec = cli.effective_settings(_parse_at(recorded_export, "--max-mel-tokens", "4", "--cfg-rate", "0.9"))
    assert gen == GenerationConfig(**{**RECORDED_SAMPLING, "max_mel_tokens": 4})
    assert dec == DecoderSettings(steps=2, cfg_rate=0.9)


def _parse_at(engines: Path, *flags: str):
    args = _parse(*flags)
    args.engines = engines
    return args


def test_a_cli_run_synthesizes_with_the_manifest_defaults(recorded_export, tiny_ckpt, tmp_path, monkeypatch,
                                                          capsys) -> None:
    """One real run: what reaches the synthesizer, what is printed, and the codes it produced."""
    seen = []
    real = Synthesizer.synthesize

    def spy(self, request, generation=None, decoder=None, **kw):
        seen.append((generation, decoder))
        return real(self, request, generation, decoder, **kw)

    monkeypatch.setattr(Synthesizer, "synthesize", spy)
    out = tmp_path / "recorded.wav"
    args = ["synthesize", "--engines", str(recorded_export), "--speaker", str(tiny_ckpt / "examples/speaker.wav"),
            "--text", "Hello world.", "--out", str(out), "--seed", "0", "--top-k", "5"]
    assert cli.main(args) == 0
    assert seen == [(GenerationConfig(**{**RECORDED_SAMPLING, "top_k": 5}), DecoderSettings(steps=2, cfg_rate=0.3))]
    printed = capsys.readouterr().out
    assert ("settings: beam search, 2 beam(s), repetition penalty 2.0, length penalty 0.5, at most 6 mel tokens; "
            "2 Euler steps, CFG rate 0.3 (the export's defaults; given: --top-k)") in printed
    codes = int(printed.split(" codes")[0].rsplit(" ", 1)[1])
    assert 0 <= codes <= RECORDED_SAMPLING["max_mel_tokens"] and out.is_file()


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit 1, no output file


def _silent_wav(path: Path) -> Path:
    sf.write(path, np.zeros(22050, np.float32), 22050)
    return path


def _damage(kind: str, root: Path, tmp_path: Path) -> None:
    manifest_path = root / "manifest.json"
    data = json.loads(manifest_path.read_text())
    if kind == "graph_file_missing":
        (root / "onnx/bigvgan.onnx").unlink()
    elif kind == "graph_not_in_manifest":
        del data["graphs"]["bigvgan"]
    elif kind == "contract_version":
        data["contract_version"] = 999
    elif kind == "another_build":
        data["graphs"]["gpt_decode"]["fingerprint"] = "0" * 64     # as if the manifest came from another build
    elif kind == "assets_missing":
        (root / "assets/bpe.model").unlink()
    manifest_path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind, message", [
    ("graph_file_missing", "graph 'bigvgan': file onnx/bigvgan.onnx is missing"),
    ("graph_not_in_manifest", "the manifest has no graph(s) ['bigvgan']"),
    ("contract_version", "contract version 999"),
    ("another_build", "was not produced by the build this manifest describes"),
    ("assets_missing", "runtime asset 'bpe': file assets/bpe.model is missing"),
])
def test_a_broken_export_directory_is_named(kind, message, export_copy, tiny_ckpt, tmp_path, capsys) -> None:
    _damage(kind, export_copy, tmp_path)
    out = tmp_path / "never.wav"
    assert cli.main(_args(export_copy, tiny_ckpt, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case, message", [
    ("missing_engines", "engine directory not found"),
    ("unreadable_speaker", "cannot decode the audio"),
    ("missing_speaker", "audio file not found"),
    ("silent_speaker", "silent"),
    ("empty_text", "the text to synthesize is empty"),
    ("bad_emo_vector", "8"),
    ("negative_emo_vector", "negative"),
    ("negative_first_emo_weight", "negative"),
    ("emo_alpha_past_one", "emo_alpha must be between 0 and 1"),
    ("unknown_backend", "unknown backend 'cuda-magic'"),
    ("trt_here", "backend trt cannot run here"),
    ("missing_out_folder", "does not exist"),
    ("bad_steps", "at least 1 step"),
])
def test_bad_input_is_a_clear_error(case, message, tiny_export, tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "never.wav"
    engines = tiny_export[0]
    args = _args(engines, tiny_ckpt, out)

    def set_flag(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    if case == "missing_engines":
        set_flag("--engines", str(tmp_path / "nowhere"))
    elif case == "unreadable_speaker":
        bad = tmp_path / "speaker.wav"
        bad.write_text("this is not audio")
        set_flag("--speaker", str(bad))
    elif case == "missing_speaker":
        set_flag("--speaker", str(tmp_path / "absent.wav"))
    elif case == "silent_speaker":
        set_flag("--speaker", str(_silent_wav(tmp_path / "silence.wav")))
    elif case == "empty_text":
        set_flag("--text", "   ")
    elif case == "bad_emo_vector":
        args += ["--emo-vector", "0.1,0.2"]
    elif case == "negative_emo_vector":
        args += ["--emo-vector", "0,-0.5,0,0,0,0,0,0"]
    elif case == "negative_first_emo_weight":              # argparse would take "-1,..." for an option
        args += ["--emo-vector", "-1,0,0,0,0,0,0,0"]
    elif case == "emo_alpha_past_one":
        args += ["--emo-vector", "0,0.5,0,0,0,0,0,0", "--emo-alpha", "1e9"]
    elif case == "unknown_backend":
        args += ["--backend", "cuda-magic"]
    elif case == "trt_here":
        args += ["--backend", "trt"]
    elif case == "missing_out_folder":
        out = tmp_path / "no/such/folder/x.wav"
        set_flag("--out", str(out))
    elif case == "bad_steps":
        set_flag("--steps", "0")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists()
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


# ---------------------------------------------------------------------------------------------------
# No torch


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'export'):
            raise ImportError(f'{name} is blocked for this test')
        return None
sys.meta_path.insert(0, Block())
from runtime.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export'))
if leaked:
    print('imported:', leaked, file=sys.stderr)
    sys.exit(3)
sys.exit(code)
"""


def test_runtime_synthesizes_without_torch(tiny_export, tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "no_torch.wav"
    args = _args(tiny_export[0], tiny_ckpt, out, "--emo-vector", "0,0.3,0,0,0,0,0,0.2", "--stream")
    run = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.is_file()
    # and the blocker really blocks: the eager CLI cannot even start
    eager = subprocess.run([sys.executable, "-c", BLOCK_TORCH.replace("from runtime.cli import main",
                                                                      "from export.synthesize import main"),
                            "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert eager.returncode != 0 and "blocked for this test" in eager.stderr


def test_emotion_from_text_without_torch_is_a_clear_error(tiny_export, tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "x.wav"
    args = _args(tiny_export[0], tiny_ckpt, out, "--emo-text", "happy")
    run = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stderr
    assert "needs torch and transformers" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_an_unusable_emotion_answer_exits_non_zero_without_output(stream, tiny_export, tiny_ckpt, tmp_path,
                                                                     monkeypatch, capsys) -> None:
    """The emotion model answering a non-numeric score is an EmotionAnswerError: message, exit 1, no file."""
    from runtime.emotion.llm import QwenEmotion

    monkeypatch.setattr(QwenEmotion, "respond", lambda self, text: '{"高兴": "很高"}')
    out = tmp_path / "emo.wav"
    args = _args(tiny_export[0], tiny_ckpt, out, "--emo-text", "so happy", *(["--stream"] if stream else []))
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "emotion model's answer is unusable" in err and "很高" in err and "--emo-vector" in err
    assert not out.exists() and not list(tmp_path.glob("*emo.wav*"))
