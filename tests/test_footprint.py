"""The training footprint: the estimate's arithmetic on a fake clock, RAPL counters (and their wraparound) from a
fake powercap folder, the model-card summary, totals across a resume, and a CLI run that writes the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stablekit.train.footprint import Footprint, FootprintSettings, Meter, RaplCounters, markdown


class Fake:
    """A clock or CPU-time counter that moves only when told."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def estimate_meter(settings: FootprintSettings, wall: Fake, cpu: Fake, tmp_path: Path) -> Meter:
    return Meter(settings, powercap=tmp_path / "no-powercap", gpu=False, clock=wall, cpu_time=cpu)


def zone(root: Path, name: str, energy: int, span: int) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "energy_uj").write_text(f"{energy}\n")
    (root / name / "max_energy_range_uj").write_text(f"{span}\n")
    return root / name / "energy_uj"


def test_estimate_is_cpu_time_times_watts(tmp_path: Path) -> None:
    wall, cpu = Fake(50.0), Fake(7.0)
    settings = FootprintSettings(carbon_intensity=400.0, power_watts=12.0, region="eu-west", cloud_provider="AWS")
    fp = Footprint(tmp_path, estimate_meter(settings, wall, cpu, tmp_path))
    fp.start(resume=False)
    wall.t, cpu.t = 50.0 + 7200.0, 7.0 + 3 * 3600.0  # 2 h wall, 3 CPU-hours (several busy cores)
    s = fp.current()
    # 3 CPU-h × 12 W = 36 Wh = 0.036 kWh; × 400 g/kWh = 14.4 g = 0.0144 kg
    assert s["energy_kwh"] == pytest.approx(0.036)
    assert s["carbon_emitted_kg"] == pytest.approx(0.0144)
    assert s["hours_used"] == pytest.approx(2.0) and s["cpu_hours"] == pytest.approx(3.0)
    assert s["method"] == "estimate: CPU time x 12 W per busy core"
    assert (s["cloud_provider"], s["compute_region"], s["sessions"]) == ("AWS", "eu-west", 1)


def test_summary_has_the_model_card_fields_and_form(tmp_path: Path) -> None:
    wall, cpu = Fake(0.0), Fake(0.0)
    fp = Footprint(tmp_path, estimate_meter(FootprintSettings(region="Iowa"), wall, cpu, tmp_path))
    fp.start(resume=False)
    wall.t, cpu.t = 1800.0, 360.0  # 0.5 h; 0.1 CPU-h × 10 W = 1 Wh = 0.001 kWh; × 480 g = 0.48 g
    written = fp.write()
    s = json.loads((tmp_path / "footprint.json").read_text())
    assert s == written
    for key in ("hardware_type", "hours_used", "cloud_provider", "compute_region", "carbon_emitted_kg"):
        assert key in s
    assert s["carbon_emitted_kg"] == pytest.approx(0.00048)
    md = (tmp_path / "footprint.md").read_text()
    assert md == markdown(s)
    assert "- **Hours used:** 0.5\n" in md and "- **Compute Region:** Iowa\n" in md
    assert "- **Cloud Provider:** unknown\n" in md and f"- **Hardware Type:** {s['hardware_type']}\n" in md
    assert "0.00048 kg CO2 eq. (estimated)" in md


def test_totals_accumulate_over_a_resume_and_a_fresh_run_starts_from_zero(tmp_path: Path) -> None:
    wall, cpu = Fake(0.0), Fake(0.0)
    first = Footprint(tmp_path, estimate_meter(FootprintSettings(), wall, cpu, tmp_path))
    first.start(resume=False)
    wall.t, cpu.t = 3600.0, 720.0
    first.write()
    wall.t, cpu.t = 9999.0, 9999.0  # the second session's meter starts here
    second = Footprint(tmp_path, estimate_meter(FootprintSettings(), wall, cpu, tmp_path))
    second.start(resume=True)
    wall.t, cpu.t = 9999.0 + 1800.0, 9999.0 + 360.0
    s = second.write()
    assert s["hours_used"] == pytest.approx(1.5) and s["cpu_hours"] == pytest.approx(0.3)
    assert s["energy_kwh"] == pytest.approx(0.003) and s["sessions"] == 2  # 0.3 CPU-h × 10 W
    fresh = Footprint(tmp_path, estimate_meter(FootprintSettings(), wall, cpu, tmp_path))
    fresh.start(resume=False)
    assert fresh.current()["hours_used"] == 0.0 and fresh.current()["sessions"] == 1


def test_rapl_adds_packages_skips_subzones_and_wraps(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    pkg0 = zone(root, "intel-rapl:0", 900_000, 1_000_000)
    pkg1 = zone(root, "intel-rapl:1", 10, 1_000_000)
    core = zone(root, "intel-rapl:0:0", 5, 1_000_000)  # part of package 0: not counted again
    rapl = RaplCounters(root)
    assert len(rapl.zones) == 2
    pkg0.write_text("100000\n")  # wrapped: 100 000 to the end of the range, then 100 000 more
    pkg1.write_text("500010\n")
    core.write_text("999999\n")
    assert rapl.poll() == pytest.approx(0.2 + 0.5)
    pkg0.write_text("150000\n")
    assert rapl.poll() == pytest.approx(0.75)


def test_measured_energy_replaces_the_estimate(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    counter = zone(root, "intel-rapl:0", 0, 2**32)
    wall, cpu = Fake(0.0), Fake(0.0)
    meter = Meter(FootprintSettings(), powercap=root, gpu=False, clock=wall, cpu_time=cpu)
    wall.t, cpu.t = 3600.0, 3600.0
    counter.write_text(f"{360_000 * 10**6}\n")  # 360 kJ = 0.1 kWh
    fp = Footprint(tmp_path, meter)
    assert fp.current()["energy_kwh"] == pytest.approx(0.1)
    assert fp.current()["method"] == "measured: RAPL (1 packages)"
    unmeasured = Meter(FootprintSettings(measure=False), powercap=root, gpu=False, clock=wall, cpu_time=cpu)
    assert unmeasured.rapl is None and "estimate" in unmeasured.method()


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        FootprintSettings(power_watts=0)
    with pytest.raises(ValueError):
        FootprintSettings(carbon_intensity=float("nan"))


def test_cli_run_writes_the_footprint_and_resume_adds_to_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stablekit.cli import main
    from stablekit.config import DEMO
    from stablekit.train.demo_data import write_demo_dataset

    data = str(write_demo_dataset(tmp_path / "data", 4, size=DEMO.default_size))
    out = tmp_path / "vae"
    common = ["train", "vae", "--out", str(out), "--data", data, "--batch-size", "2", "--no-progress"]
    flags = ["--carbon-intensity", "300", "--region", "us-central1", "--cloud-provider", "GCP", "--power-watts", "8"]
    assert main([*common, "--steps", "1", *flags]) == 0
    first = json.loads((out / "footprint.json").read_text())
    assert first["carbon_intensity_g_per_kwh"] == 300 and first["sessions"] == 1
    assert (first["compute_region"], first["cloud_provider"]) == ("us-central1", "GCP")
    assert first["energy_kwh"] > 0 and first["hours_used"] > 0
    assert first["carbon_emitted_kg"] == pytest.approx(first["energy_kwh"] * 0.3)
    assert "- **Cloud Provider:** GCP" in (out / "footprint.md").read_text()
    assert "footprint: " in capsys.readouterr().err
    assert main([*common, "--steps", "2", "--resume", *flags]) == 0
    second = json.loads((out / "footprint.json").read_text())
    assert second["sessions"] == 2 and second["hours_used"] > first["hours_used"]
    assert main([*common, "--steps", "2", "--power-watts", "0"]) == 1
    assert "power figure" in capsys.readouterr().err


def test_an_old_run_is_estimated_from_its_wall_time() -> None:
    from stablekit.train.footprint import from_wall_time

    s = from_wall_time(5400.0, 2, FootprintSettings(power_watts=10.0), hardware="2-core CPU")
    # 1.5 h × 2 cores × 10 W = 30 Wh = 0.03 kWh; × 480 g/kWh = 14.4 g
    assert s["hours_used"] == pytest.approx(1.5) and s["energy_kwh"] == pytest.approx(0.03)
    assert s["carbon_emitted_kg"] == pytest.approx(0.0144) and "estimate" in s["method"]


def test_cli_lora_run_takes_the_footprint_flags(tiny_model_file: Path, tmp_path: Path) -> None:
    from stablekit.cli import main
    from stablekit.train.demo_data import write_demo_dataset

    data = str(write_demo_dataset(tmp_path / "data", 4, size=32))
    out = tmp_path / "lora"
    argv = [
        "train",
        "lora",
        "--model",
        str(tiny_model_file),
        "--data",
        data,
        "--out",
        str(out),
        "--no-progress",
        "--size",
        "32",
    ]
    assert main([*argv, "--steps", "1", "--batch-size", "2", "--carbon-intensity", "100", "--region", "r1"]) == 0
    s = json.loads((out / "footprint.json").read_text())
    assert (s["carbon_intensity_g_per_kwh"], s["compute_region"], s["cloud_provider"]) == (100, "r1", "unknown")


def test_nvml_energy_adds_to_the_cpu_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML's counter (mJ, per GPU) through a stand-in module: no GPU is needed to check the arithmetic."""
    import sys
    import types

    energy = {0: 1_000_000, 1: 5_000}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetTotalEnergyConsumption=lambda h: energy[h],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    wall, cpu = Fake(0.0), Fake(0.0)
    meter = Meter(FootprintSettings(power_watts=10.0), powercap=tmp_path / "none", clock=wall, cpu_time=cpu)
    energy[0], energy[1] = 1_000_000 + 3_600_000, 5_000 + 1_800_000  # 3600 J + 1800 J
    cpu.t = 180.0  # 180 CPU-s × 10 W = 1800 J
    s = Footprint(tmp_path, meter).current()
    assert s["energy_kwh"] == pytest.approx((3600 + 1800 + 1800) / 3.6e6)
    assert s["hardware_type"] == "2 x NVIDIA H200" and "measured: NVML (2 GPUs)" in s["method"]
