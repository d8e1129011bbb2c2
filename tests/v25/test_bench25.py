"""The benchmarks on IndexTTS-2.5: `python -m benchmarks.stages` with a 2.0 and a 2.5 export in one run (one
column per version, each on its own recorded inputs, the version's own S_infer stage, the GPT time per second of
audio that shows 2.5's 25 codes a second) and the concurrency benchmark on a 2.5 export."""

from __future__ import annotations

import json

import pytest


def test_stages_measures_2_0_beside_2_5_in_one_run(tiny_ckpt, tiny_export, tiny25_ckpt, tiny25_export, tmp_path,
                                                    capsys) -> None:
    from benchmarks import stages

    texts = tmp_path / "texts.txt"
    texts.write_text("Hello world.\n", encoding="utf-8")
    out = tmp_path / "results"
    code = stages.main(["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt),
                        "--engines", str(tiny25_export[0]), "--checkpoints", str(tiny25_ckpt),
                        "--backends", "ort-cpu", "--texts", str(texts), "--repeats", "1", "--gpt-tokens", "6",
                        "--threads", "2", "--stage-seconds", "0", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads((out / "results.json").read_text())
    assert list(results["backends"]) == ["2.0 ort-cpu", "2.5 ort-cpu"]
    assert [e["version"] for e in results["settings"]["exports"]] == ["2.0", "2.5"]
    v20, v25 = results["backends"]["2.0 ort-cpu"], results["backends"]["2.5 ort-cpu"]
    assert (v20["version"], v20["backend"], v25["version"], v25["backend"]) == ("2.0", "ort-cpu", "2.5", "ort-cpu")
    # each version times its own graph set
    assert {"GPT latent (2.0 S_infer)", "semantic codec", "speaker conditioner"} <= set(v20["stages"])
    assert not {"GPT latent (2.0 S_infer)", "semantic codec", "speaker conditioner"} & set(v25["stages"])
    assert "codec decoder (2.5 S_infer)" in v25["stages"] and "codec decoder (2.5 S_infer)" not in v20["stages"]
    # 2.0: int(N * 1.72) frames per N codes, 2.5: int(2N * 1.72) at 256 samples a frame, 22.05 kHz
    assert v20["codes_per_audio_second"] == pytest.approx(1000 / (1720 * 256 / 22050))
    assert v25["codes_per_audio_second"] == pytest.approx(1000 / (3440 * 256 / 22050))
    for col in (v20, v25):
        loop = next(s for k, s in col["stages"].items() if k.startswith("GPT generate"))
        per_second = col["stages"]["GPT per second of audio (prefill + decode)"]
        assert per_second["median_ms"] == pytest.approx(loop["median_ms"] * col["codes_per_audio_second"] / 6)
    # same 6 codes: 2.5's segment is twice as long (10 vs 20 mel frames)
    assert v20["e2e"][0]["audio_s"] == pytest.approx(2560 / 22050)
    assert v25["e2e"][0]["audio_s"] == pytest.approx(2 * 2560 / 22050)
    md = (out / "results.md").read_text()
    assert "| stage | 2.0 ort-cpu | 2.5 ort-cpu | 2.5 / 2.0 (ort-cpu) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| GPT latent (2.0 S_infer) |"))
    assert row.endswith("| – | – |")
    assert "End to end, 2.5 / 2.0 (ort-cpu)" in md and "| 12 chars |" in md


def test_stages_refuses_unpaired_checkpoints(tiny_ckpt, tiny_export, tiny25_export, tmp_path, capsys) -> None:
    from benchmarks import stages

    code = stages.main(["--engines", str(tiny_export[0]), "--engines", str(tiny25_export[0]), "--checkpoints",
                        str(tiny_ckpt), "--backends", "ort-cpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "2 --engines but 1 --checkpoints" in err and "Traceback" not in err
    code = stages.main(["--engines", str(tiny_export[0]), "--engines", str(tiny_export[0]), "--backends", "ort-cpu",
                        "--speaker", str(tiny_ckpt / "examples" / "speaker.wav"), "--out", str(tmp_path / "r")])
    assert code == 1 and "the same export twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_concurrency_on_a_2_5_export(tiny25_ckpt, tiny25_export, tmp_path, capsys) -> None:
    from benchmarks import concurrency

    out = tmp_path / "results"
    code = concurrency.main(["--engines", str(tiny25_export[0]), "--checkpoints", str(tiny25_ckpt), "--levels", "1,2",
                             "--beams", "1", "--gpt-tokens", "6", "--e2e-tokens", "4", "--gpt-rounds", "1",
                             "--rounds", "1", "--euler-steps", "2", "--threads", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    gpt = {r["level"]: r for r in results["gpt_phase"]}
    assert gpt[2]["tokens"] == 12 and gpt[2]["rows"] == 2
    # one text for all: the codec decoder passes of equal code lengths share a call
    assert 1 <= gpt[2]["latent_calls"] <= 2
    assert [r["requests"] for r in results["end_to_end"]] == [1, 2]
