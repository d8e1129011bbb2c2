"""Calibration on an IndexTTS-2.5 export: the feeds of every 2.5 graph (the codec decoder instead of the latent
pass; the prefill's style and language inputs), the FP16 safety analysis over the 2.5 graph set and the
end-to-end effect through the 2.5 synthesis, on the tiny 2.5 demo."""

from __future__ import annotations

import json

from calibration.collect import CollectSettings, collect
from calibration.corpus import CalibrationText, write_default_voices
from runtime.manifest import read_manifest


def test_collect_and_analyze_a_2_5_export(tiny25_ckpt, tiny25_export, tmp_path) -> None:
    from calibration.cli import main as calibration_main

    export = tiny25_export[0]
    calib = tmp_path / "calib"
    refs = write_default_voices(calib / "references")[:1]
    texts = [CalibrationText("en", "The quick brown fox jumps over the lazy dog."),
             CalibrationText("zh", "今天天气很好，我们一起去公园散步吧。")]
    summary = collect(export, calib, texts, refs, CollectSettings(gpt_tokens=8, euler_steps=2), checkpoints=tiny25_ckpt)
    graphs = list(read_manifest(export).graphs)
    assert "semantic_decoder" in graphs and "gpt_latent" not in graphs
    assert set(summary.feeds) == set(graphs), summary.feeds            # every 2.5 graph received feeds
    prefill = next((calib / "feeds" / "gpt_prefill").glob("*.npz"))
    import numpy as np

    with np.load(prefill) as feed:
        assert {"style", "lang_id", "text_ids"} <= set(feed.files) and "spk_latent" not in feed.files
    assert calibration_main(["analyze", "--engines", str(export), "--calib", str(calib), "--max-feeds", "1",
                             "--effect-items", "1", "--effect-variants", "calibrated", "--threads", "2"]) == 0
    analysis = json.loads((calib / "analysis.json").read_text())
    assert [a["graph"] for a in analysis["graphs"]] == graphs
    effect = json.loads((calib / "effect.json").read_text())["variants"][0]
    assert effect["forced_agreement"] >= 0.9 and effect["items"][0]["tokens"] == 8
    report = (calib / "REPORT.md").read_text()
    assert "(IndexTTS2 2.5)" in report and "| semantic_decoder |" in report
