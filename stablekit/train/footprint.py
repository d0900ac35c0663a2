"""The energy and CO2 of a training run, summarised in the model cards' form (hardware type, hours used, cloud
provider, compute region, carbon emitted; Lacoste et al. 2019, "Quantifying the Carbon Emissions of Machine
Learning").

Energy is measured where the machine allows it: Intel/AMD RAPL package counters under
``/sys/class/powercap`` (``energy_uj``, which wraps at ``max_energy_range_uj``) and NVML's energy counter on
NVIDIA GPUs (with ``nvidia-ml-py`` installed). Otherwise it is an estimate, and labelled one: this process's
CPU time × a stated power per busy core. Carbon is energy × a stated grid intensity (g CO2/kWh).

Totals run over every session of a run: each session adds to what ``footprint.json`` in the run folder held
when it started, and rewrites it (atomically) at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stablekit.atomic import replacing_file

POWERCAP = Path("/sys/class/powercap")
# World average grid intensity (Ember, Global Electricity Review 2024: 480 g CO2/kWh for 2023); a run states its own
# with --carbon-intensity.
DEFAULT_INTENSITY = 480.0
# Power of one fully busy CPU core with its share of package and memory, for the estimate (a server core draws
# roughly 5-15 W under load); a run states its own with --power-watts.
DEFAULT_WATTS_PER_CORE = 10.0
JSON_NAME, MD_NAME = "footprint.json", "footprint.md"


@dataclass(frozen=True)
class FootprintSettings:
    carbon_intensity: float = DEFAULT_INTENSITY  # g CO2 per kWh of the grid that powers the machine
    power_watts: float = DEFAULT_WATTS_PER_CORE  # the estimate's watts per busy CPU core
    region: str = "unknown"
    cloud_provider: str = "unknown"
    measure: bool = True  # False: always the estimate (tests, or counters known to be wrong)

    def __post_init__(self) -> None:
        if not self.carbon_intensity >= 0 or not self.power_watts > 0:
            raise ValueError("carbon intensity must be non-negative and the power figure positive")


class RaplCounters:
    """Top-level RAPL zones (one per CPU package; sub-zones are parts of it and not added again).

    ``energy_uj`` counts up to ``max_energy_range_uj`` and starts again from 0, so a reading smaller than the
    last one adds the range: read more often than one wrap (minutes at full power)."""

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones: list[tuple[Path, int]] = []
        for zone in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            if zone.name.count(":") != 1:
                continue
            try:
                span = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())  # unreadable (root only since 2020) -> no zone
            except (OSError, ValueError):
                continue
            self.zones.append((zone / "energy_uj", span))
        self._last = [self._read(p) for p, _ in self.zones]
        self.joules = 0.0

    @staticmethod
    def _read(path: Path) -> int:
        return int(path.read_text())

    def poll(self) -> float:
        """Add the energy since the last poll; the total in joules."""
        for i, (path, span) in enumerate(self.zones):
            now = self._read(path)
            delta = now - self._last[i]
            self.joules += (delta if delta >= 0 else delta + span) / 1e6
            self._last[i] = now
        return self.joules


class NvmlCounters:
    """NVML's per-GPU energy counter (mJ since the driver loaded; Volta and newer)."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py; ImportError or NVMLError -> no GPU measurement

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.names = [str(pynvml.nvmlDeviceGetName(h)) for h in self.handles]
        self._start = self._total()

    def _total(self) -> int:
        return sum(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles)

    def poll(self) -> float:
        return (self._total() - self._start) / 1e3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class Meter:
    """This session's wall time, CPU time and energy; ``clock``/``cpu_time`` are injectable for tests."""

    def __init__(
        self,
        settings: FootprintSettings,
        *,
        powercap: Path = POWERCAP,
        gpu: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        cpu_time: Callable[[], float] = time.process_time,
    ) -> None:
        self.settings, self.clock, self.cpu_time = settings, clock, cpu_time
        self.rapl = RaplCounters(powercap) if settings.measure else None
        if self.rapl is not None and not self.rapl.zones:
            self.rapl = None
        self.nvml: NvmlCounters | None = None
        if gpu and settings.measure:
            try:
                self.nvml = NvmlCounters()
            except Exception:  # no library, no driver, or a GPU without the counter: measure without it
                self.nvml = None
        self._wall0, self._cpu0 = clock(), cpu_time()

    def poll(self) -> None:
        if self.rapl is not None:
            self.rapl.poll()

    def method(self) -> str:
        parts = [f"measured: RAPL ({len(self.rapl.zones)} packages)"] if self.rapl else []
        if self.nvml is not None:
            parts.append(f"measured: NVML ({len(self.nvml.handles)} GPUs)")
        if not self.rapl:
            parts.append(f"estimate: CPU time x {self.settings.power_watts:g} W per busy core")
        return "; ".join(parts)

    def hardware(self) -> str:
        gpus = self.nvml.names if self.nvml is not None else []
        return ", ".join([f"{len(gpus)} x {gpus[0]}"] if gpus else []) or cpu_model()

    def session(self) -> dict[str, float]:
        """This session so far: wall and CPU seconds and joules (CPU measured or estimated, plus GPU)."""
        cpu = self.cpu_time() - self._cpu0
        if self.rapl is not None:
            joules = self.rapl.poll()
        else:
            joules = cpu * self.settings.power_watts
        if self.nvml is not None:
            joules += self.nvml.poll()
        return {"seconds": self.clock() - self._wall0, "cpu_seconds": cpu, "joules": joules}


def summary(
    totals: dict[str, float], settings: FootprintSettings, *, hardware: str, method: str, sessions: int
) -> dict[str, Any]:
    """The model cards' fields (and what they were computed from) for ``totals`` over all sessions."""
    kwh = totals["joules"] / 3.6e6
    return {
        "hardware_type": hardware,
        "hours_used": totals["seconds"] / 3600,
        "cloud_provider": settings.cloud_provider,
        "compute_region": settings.region,
        "carbon_emitted_kg": kwh * settings.carbon_intensity / 1000,
        "energy_kwh": kwh,
        "carbon_intensity_g_per_kwh": settings.carbon_intensity,
        "method": method,
        "cpu_hours": totals["cpu_seconds"] / 3600,
        "sessions": sessions,
        "totals": dict(totals),
        "settings": asdict(settings),
    }


def markdown(s: dict[str, Any]) -> str:
    estimated = "estimate" in s["method"]
    return (
        "## Environmental impact\n\n"
        f"- **Hardware Type:** {s['hardware_type']}\n"
        f"- **Hours used:** {s['hours_used']:.3g}\n"
        f"- **Cloud Provider:** {s['cloud_provider']}\n"
        f"- **Compute Region:** {s['compute_region']}\n"
        f"- **Carbon Emitted** (energy × grid intensity): {s['carbon_emitted_kg']:.3g} kg CO2 eq."
        f"{' (estimated)' if estimated else ''}\n\n"
        f"Energy {s['energy_kwh']:.3g} kWh ({s['method']}) at {s['carbon_intensity_g_per_kwh']:g} g CO2/kWh, "
        f"over {s['sessions']} session(s).\n"
    )


class Footprint:
    """Running totals of a run folder: what earlier sessions left in ``footprint.json`` plus this session."""

    def __init__(self, out: Path, meter: Meter) -> None:
        self.out, self.meter = Path(out), meter
        self.before = {"seconds": 0.0, "cpu_seconds": 0.0, "joules": 0.0}
        self.sessions_before = 0

    def start(self, *, resume: bool) -> None:
        """Take the totals of earlier sessions (only when resuming: a fresh run starts from zero)."""
        path = self.out / JSON_NAME
        if resume and path.is_file():
            try:
                old = json.loads(path.read_text())
                self.before = {k: float(old["totals"][k]) for k in self.before}
                self.sessions_before = int(old["sessions"])
            except (ValueError, KeyError, TypeError):
                pass  # a hand-edited or foreign file: count from here

    def current(self) -> dict[str, Any]:
        now = self.meter.session()
        totals = {k: self.before[k] + now[k] for k in self.before}
        return summary(
            totals,
            self.meter.settings,
            hardware=self.meter.hardware(),
            method=self.meter.method(),
            sessions=self.sessions_before + 1,
        )

    def write(self) -> dict[str, Any]:
        s = self.current()
        with replacing_file(self.out / JSON_NAME) as tmp:
            tmp.write_text(json.dumps(s, indent=2) + "\n")
        with replacing_file(self.out / MD_NAME) as tmp:
            tmp.write_text(markdown(s))
        return s


def from_wall_time(seconds: float, cores: float, settings: FootprintSettings, *, hardware: str) -> dict[str, Any]:
    """An upper-bound estimate for a run that logged only wall time (runs before this module): every one of
    ``cores`` busy throughout."""
    cpu = seconds * cores
    totals = {"seconds": seconds, "cpu_seconds": cpu, "joules": cpu * settings.power_watts}
    method = f"estimate: wall time x {cores:g} busy cores x {settings.power_watts:g} W (no CPU time was logged)"
    return summary(totals, settings, hardware=hardware, method=method, sessions=1)
