"""The CPU plan (runtime/cpu_plan.py, benchmarks/cpu_plan.py): its file, its identity checks, `--backend
cpu-auto` running it, the fallback only when asked, the choice rules and the gates."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.cpu_plan import Gates, PlanSettings, choose, decide, make_plan, plan_markdown, slower_calls
from runtime.cpu_plan import (
    Choice,
    CpuIdentity,
    CpuPlan,
    GraphPlan,
    export_identity,
    plan_path,
    read_plan,
    this_cpu,
    write_plan,
)
from runtime.errors import BackendError, CheckpointError, ContractError, EngineMismatchError
from runtime.executors import OrtExecutor, backend_status
from runtime.manifest import read_manifest
from runtime.synthesizer import Synthesizer

from .helpers import fixed_length_synthesis, lsb

pytest.importorskip("openvino", reason="the CPU plan's OpenVINO candidates need the openvino package (the `cpu` extra)")


@pytest.fixture()
def export(tiny_export, tmp_path) -> Path:
    """A copy of the tiny export (plans are written into it)."""
    return Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))


def _plan(manifest, choices: dict[str, Choice], cpu: CpuIdentity | None = None) -> CpuPlan:
    graphs = {g: GraphPlan(choices.get(g, Choice("ort-cpu", "fp32")), {"ort-cpu fp32": 1.0}) for g in manifest.graphs}
    return CpuPlan(cpu or this_cpu(), export_identity(manifest), graphs, threads=2, created="test")


def test_this_cpu_reads_model_and_isa_flags(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 "
                    "amx_tile\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    cpu = this_cpu(info)
    assert cpu.model == "Test CPU 9000" and cpu.flags == ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def test_the_plan_file_round_trips_and_inspect_shows_it(export, capsys) -> None:
    manifest = read_manifest(export)
    plan = _plan(manifest, {"campplus": Choice("ov-cpu", "fp32")})
    write_plan(export, plan)
    back = read_plan(export, manifest)
    assert back.choice("campplus") == Choice("ov-cpu", "fp32") and back.choice("dit_step") == Choice("ort-cpu", "fp32")
    assert back.to_json() == plan.to_json()
    from runtime.cli import main

    assert main(["inspect", str(export)]) == 0
    out = capsys.readouterr().out
    assert "CPU plan (cpu_plan.json, test; valid here)" in out and "campplus" in out
    assert "cpu-auto  yes  CPU plan: campplus ov-cpu fp32; the rest ort-cpu fp32" in out


def test_a_plan_from_another_cpu_is_refused_naming_both(export) -> None:
    manifest = read_manifest(export)
    other = CpuIdentity("Other CPU 1", "x86_64", ("avx2",))
    write_plan(export, _plan(manifest, {}, cpu=other))
    with pytest.raises(EngineMismatchError) as err:
        read_plan(export, manifest)
    assert "Other CPU 1 (x86_64; avx2)" in str(err.value) and this_cpu().describe() in str(err.value)
    with pytest.raises(BackendError, match="measured on another CPU: Other CPU 1"):
        Synthesizer(export, "cpu-auto")


def test_a_plan_of_another_export_is_refused_naming_both(export) -> None:
    manifest = read_manifest(export)
    plan = _plan(manifest, {})
    plan.export = "0" * 64
    write_plan(export, plan)
    with pytest.raises(EngineMismatchError, match=f"another export \\(graphs 000000000000...\\), this directory's "
                                                  f"graphs are {export_identity(manifest)[:12]}"):
        read_plan(export, manifest)


def test_no_plan_says_how_to_make_one_and_fallback_only_when_asked(export, caplog) -> None:
    with pytest.raises(BackendError, match="no CPU plan.*python -m benchmarks.cpu_plan --engines"):
        Synthesizer(export, "cpu-auto")
    with caplog.at_level(logging.WARNING, logger="runtime.backend"):
        with Synthesizer(export, "cpu-auto", cpu_plan_fallback=True) as synth:
            assert synth.backend == "ort-cpu"
    assert "running ONNX Runtime float32 instead" in caplog.text


def test_malformed_plans_are_refused(export) -> None:
    manifest = read_manifest(export)
    plan_path(export).write_text("{not json")
    with pytest.raises(ContractError, match="not a readable CPU plan"):
        read_plan(export, manifest)
    data = _plan(manifest, {}).to_json()
    data["graphs"]["no_such_graph"] = data["graphs"]["campplus"]
    plan_path(export).write_text(json.dumps(data))
    with pytest.raises(ContractError, match="no_such_graph"):
        read_plan(export, manifest)
    with pytest.raises(ContractError, match="not a candidate"):
        Choice("ort-cpu", "bf16")


def test_cpu_auto_runs_each_graph_where_the_plan_says(export, tiny_ckpt) -> None:
    """fp32 choices only (a CI machine may have no bf16): the plan's synthesis equals ONNX Runtime's."""
    from runtime.executors.openvino import OvExecutor

    manifest = read_manifest(export)
    write_plan(export, _plan(manifest, {"dit_step": Choice("ov-cpu", "fp32"), "bigvgan": Choice("ov-cpu", "fp32")}))
    speaker = tiny_ckpt / "examples" / "speaker.wav"
    with Synthesizer(export, "cpu-auto") as plan, Synthesizer(export, "ort-cpu") as ort:
        assert plan.backend == "cpu-auto"
        assert isinstance(plan.graphs["dit_step"], OvExecutor) and isinstance(plan.graphs["bigvgan"], OvExecutor)
        assert isinstance(plan.graphs["gpt_decode"], OrtExecutor)
        codes_plan, pcm_plan = fixed_length_synthesis(plan, speaker)
        codes_ort, pcm_ort = fixed_length_synthesis(ort, speaker)
    assert codes_plan == codes_ort
    assert lsb(pcm_plan, pcm_ort) <= 2


def test_a_plan_using_openvino_needs_openvino(export, monkeypatch) -> None:
    from runtime.executors import openvino as ov_module

    manifest = read_manifest(export)
    write_plan(export, _plan(manifest, {"dit_step": Choice("ov-cpu", "fp32")}))

    def missing():
        raise BackendError("openvino is not installed: pip install openvino (or the project's `cpu` extra)")

    monkeypatch.setattr(ov_module, "import_ov", missing)
    status = backend_status("cpu-auto", export)
    assert not status.ok and "runs graphs on ov-cpu" in status.detail and "pip install openvino" in status.detail


# ---------------------------------------------------------------------------------------------------
# The rules: choice and gates


T = {"ort-cpu fp32": 100.0, "ov-cpu fp32": 99.0, "ov-cpu bf16": 50.0}


B16, I8 = "ov-cpu bf16", "ort-cpu int8w"


@pytest.mark.parametrize("times, verdicts, choice, reason", [
    (T, {B16: (True, "")}, ("ov-cpu", "bf16"), "ov-cpu bf16 2.00x ONNX Runtime fp32, gates passed"),
    (T, {B16: (False, "mel SNR 12.0 dB < 30.0 dB")}, ("ort-cpu", "fp32"),
     "ov-cpu bf16 refused by the gates (mel SNR 12.0 dB"),
    (T, {}, ("ort-cpu", "fp32"), "within the margin"),                      # ungated bf16 is never chosen
    ({**T, "ov-cpu fp32": 80.0}, {B16: (False, "x")}, ("ov-cpu", "fp32"), "ov-cpu fp32 1.25x ONNX Runtime fp32"),
    ({**T, B16: 97.0}, {B16: (True, "")}, ("ort-cpu", "fp32"), "within the margin"),   # 3 % is noise
    ({**T, I8: 40.0}, {B16: (True, ""), I8: (True, "")}, ("ort-cpu", "int8w"), "2.50x ONNX Runtime fp32, gates"),
    ({**T, I8: 40.0}, {B16: (True, ""), I8: (False, "y")}, ("ov-cpu", "bf16"), "ort-cpu int8w refused"),
])
def test_decide(times, verdicts, choice, reason) -> None:
    got, why = decide(times, verdicts, margin=0.05)
    assert got == choice and reason in why


def test_a_candidate_slower_on_one_call_is_not_chosen_whatever_its_total() -> None:
    """The length regulator measured at full size: OpenVINO fp32 faster on the prompt's call, slower on the
    codes' call (the one a service makes per request) -> it stays on ONNX Runtime, and the reason says why."""
    calls = {"ort-cpu fp32": [20.3, 4.7], "ov-cpu fp32": [16.1, 6.4], "ov-cpu bf16": [10.0, 4.2]}
    times = {k: sum(v) for k, v in calls.items()}
    slower = slower_calls(calls, 0.05)
    assert set(slower) == {"ov-cpu fp32"} and "call 2 of 2 (6.4 ms against 4.7 ms)" in slower["ov-cpu fp32"]
    got, why = decide(times, {"ov-cpu bf16": (False, "mel SNR 21.1 dB < 30.0 dB")}, 0.05, slower)
    assert got == ("ort-cpu", "fp32")
    assert "ov-cpu bf16 refused by the gates" in why and "ov-cpu fp32 slower on call 2" in why
    assert decide(times, {"ov-cpu bf16": (False, "x")}, 0.05)[0] == ("ov-cpu", "fp32")    # by the total alone
    assert slower_calls({"ort-cpu fp32": [10.0, 5.0], "ov-cpu fp32": [10.4, 5.2]}, 0.05) == {}   # within the margin


@pytest.mark.parametrize("times, verdicts, reason", [
    (T, {B16: (True, "")}, "GPT weights held once: ov-cpu bf16 measured 2.00x but would hold another copy"),
    (T, {}, "ov-cpu bf16 (not gated) measured 2.00x"),                        # pinned graphs are not gated
    ({**T, I8: 40.0}, {B16: (True, ""), I8: (False, "y")}, "ort-cpu int8w refused by the gates (y); kept in "
                                                             "the shared GPT session, the GPT weights held once: "
                                                             "ov-cpu bf16 measured"),
    ({**T, B16: 97.0}, {}, "ONNX Runtime fp32 is the fastest (or within the margin)"),
])
def test_a_gpt_graph_stays_in_the_shared_session_unless_copies_are_allowed(times, verdicts, reason) -> None:
    """Issue 22 point 4 over the plan: a GPT graph leaving the shared session holds a second copy of the GPT
    weights, so the plan keeps it there and says what it gave up; with copies allowed the rule is `decide`'s."""
    got, why = choose(times, verdicts, 0.05, held_once=True)
    assert got == ("ort-cpu", "fp32") and reason in why
    assert choose(times, verdicts, 0.05, held_once=False) == decide(times, verdicts, 0.05)


def test_gate_verdicts_name_every_failed_threshold() -> None:
    summary = SimpleNamespace(forced_agreement=0.99, free_agreement=0.9, min_mel_snr_db=31.0, min_wav_snr_db=12.5)
    ok, why = Gates().verdict(summary)
    assert not ok and why == "free-running agreement 0.9000 < 0.98; waveform SNR 12.5 dB < 20.0 dB"
    summary.free_agreement, summary.min_wav_snr_db = 0.98, 20.0          # the thresholds themselves pass
    assert Gates().verdict(summary) == (True, "")


def test_make_plan_measures_and_gates_on_the_tiny_export(export, tiny_ckpt) -> None:
    """Two graphs measured with every candidate; the approximate ones (bf16, the decode step's weight-only int8)
    gated even where they are not the fastest, with gates none can pass: no graph may then be approximate, and
    every choice other than ONNX Runtime fp32 was measured faster than it by more than the margin."""
    from runtime.executors.openvino import cpu_capabilities

    items = [{"text": "Hello there.", "lang": "en", "reference": str(tiny_ckpt / "examples" / "speaker.wav")}]
    settings = PlanSettings(export, items, gpt_tokens=12, threads=2, repeats=2, stage_seconds=0.05,
                            graphs=("dit_step", "gpt_decode"), gate_every=True,
                            gates=Gates(forced_agreement=1.01))         # nothing reaches more than 1
    plan = make_plan(settings)
    write_plan(export, plan)
    back = read_plan(export, read_manifest(export))
    has_bf16 = "BF16" in cpu_capabilities()
    for name, g in back.graphs.items():
        if name not in settings.graphs:
            assert g.choice == Choice("ort-cpu", "fp32") and not g.timings_ms
            continue
        assert set(g.timings_ms) == {"ort-cpu fp32", "ov-cpu fp32"} | ({"ov-cpu bf16"} if has_bf16 else set()) \
            | ({"ort-cpu int8w"} if name == "gpt_decode" else set())
        assert g.choice.precision == "fp32" and g.form is None
        if name == "gpt_decode":
            assert g.gate["ort-cpu int8w"]["passed"] is False and "ort-cpu int8w refused by the gates" in g.reason
            # its weights are in the shared GPT session: it stays there whatever was faster
            assert g.choice == Choice("ort-cpu", "fp32")
            if g.timings_ms["ov-cpu fp32"] < 0.95 * g.timings_ms["ort-cpu fp32"]:
                assert "kept in the shared GPT session" in g.reason
        if g.choice != Choice("ort-cpu", "fp32"):
            assert g.timings_ms[g.choice.label] < 0.95 * g.timings_ms["ort-cpu fp32"]
        if has_bf16:
            assert g.gate["ov-cpu bf16"]["passed"] is False and "teacher-forced" in g.gate["ov-cpu bf16"]["why"]
            assert "ov-cpu bf16 refused by the gates" in g.reason
    assert back.cpu == this_cpu()
    md = plan_markdown(back)
    assert "| dit_step |" in md and "| **ort-cpu fp32** |" in md and "| gpt_decode | ort-cpu int8w |" in md


def test_the_weight_only_decode_form_runs_and_is_checked(export, tiny_ckpt) -> None:
    """A plan choosing the decode step's weight-only int8 form runs it (MatMulNBits in a session of its own; the
    other GPT graphs stay on the shared session); a form made from another graph, or missing, is refused."""
    import onnx

    from calibration.weight_only import write_weight_only

    manifest = read_manifest(export)
    form = write_weight_only(manifest.graph("gpt_decode"), export)
    model = onnx.load(str(export / form["file"]))
    assert form["quantized_matmuls"] > 0 and any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert [i.name for i in model.graph.input] == [t.name for t in manifest.graph("gpt_decode").inputs]
    plan = _plan(manifest, {"gpt_decode": Choice("ort-cpu", "int8w")})
    plan.graphs["gpt_decode"].form = form
    write_plan(export, plan)
    speaker = tiny_ckpt / "examples" / "speaker.wav"
    with Synthesizer(export, "cpu-auto") as synth:
        decode = synth.graphs["gpt_decode"]
        assert decode.entry.form_kind == "int8w" and decode._prefix == ""
        assert synth.graphs["gpt_prefill"]._prefix == "gpt_prefill/"
        codes, pcm = fixed_length_synthesis(synth, speaker, tokens=20)
    assert sum(map(len, codes)) >= 20 and pcm.size > 0
    plan.graphs["gpt_decode"].form = {**form, "made_from": "0" * 64}
    write_plan(export, plan)
    with pytest.raises(EngineMismatchError, match="weight-only int8 form of gpt_decode was made from another"):
        read_plan(export, manifest)
    plan.graphs["gpt_decode"].form = form
    write_plan(export, plan)
    (export / form["file"]).unlink()
    with pytest.raises(CheckpointError, match="weight-only int8 form of gpt_decode .* is missing"):
        read_plan(export, manifest)
