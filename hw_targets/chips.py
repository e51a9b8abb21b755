"""Published hardware figures for lorafx's compute-in-memory (CIM) targets, each with its source.

Plain dicts, one per preset.  Units and conventions:

* ``tops_per_w``: tera-operations per second per watt as the paper states it.  CIM papers
  count one multiply-accumulate (MAC) as 2 operations (Wan et al. 2022 say so explicitly;
  for the TSMC/NTHU macros the abstracts do not restate it and 2 ops/MAC, their field's
  usual convention, is assumed).  ``joules_per_mac`` = 2 / (tops_per_w·1e12) J.
* GPU figures: FLOP/s at dense BF16 on the tensor cores (one fused multiply-add = 2 FLOPs,
  NVIDIA's convention), ``tdp_w`` the board's maximum power; ``joules_per_flop`` = TDP /
  peak FLOP/s, the energy of a FLOP at full load and peak rate (a lower bound in practice).
* ``seconds_per_read``: latency of one MAC operation of the macro (one array read), in s;
  ``macs_per_second`` = throughput in ops/s / 2.
* ``capacity_mb``: macro capacity in megabits; ``tile_rows``/``tile_cols``: crossbar size.

A key is left out (and a comment says so) when no source found in this work publishes it;
nothing is filled in by guess.  ``"composite_22nm"`` is not one chip: it takes each figure
from the source named for it, because no single source found gives them all.
"""
from __future__ import annotations

from typing import Dict

__all__ = ["RRAM_PRESETS", "SRAM_PRESETS", "DIGITAL_BASELINES", "HOST_PRESETS", "DEFAULT_CHIP", "CHIP_PRESETS",
           "citation_table"]


def _per_mac(tops_per_w: float) -> float:
    """Joules per MAC from TOPS/W counted at 2 ops per MAC."""
    return 2.0 / (tops_per_w * 1e12)


_HUNG2021 = ("Hung, Xue, Kao, et al. (TSMC/NTHU), 'A four-megabit compute-in-memory macro with eight-bit precision "
             "based on CMOS and resistive random-access memory for AI edge devices', Nature Electronics 4, 921-930 "
             "(2021), doi 10.1038/s41928-021-00676-9")
_NEUROSIM = ("DNN+NeuroSim V1.4 default design point (P.-Y. Chen, X. Peng, S. Yu et al.), "
             "github.com/neurosim/DNN_NeuroSim_V1.4 Inference_pytorch/NeuroSIM/Param.cpp (commit 00962bb)")

RRAM_PRESETS: Dict[str, dict] = {
    # Every key the rram target reads is here; each figure names its source in "sources".
    "composite_22nm": {
        "tile_rows": 128, "tile_cols": 128, "adc_bits": 4,
        "bits_per_cell": 1, "dac_bits": 8, "weight_bits": 8,
        "tops_per_w": 15.6, "joules_per_mac": _per_mac(15.6), "seconds_per_read": 15.2e-9,
        "tech_nm": 22,
        "sources": {
            "tile_rows, tile_cols, adc_bits": _NEUROSIM + ": 128x128 subarrays, levelOutput = 16 (4-bit ADC)",
            "bits_per_cell, dac_bits, weight_bits, tops_per_w, seconds_per_read": _HUNG2021
            + ": binary (1 bit/cell) 22 nm ReRAM, 8-bit input x 8-bit weight at 15.6 TOPS/W and 15.2 ns",
        },
        "source": "composite: array geometry and ADC from " + _NEUROSIM + "; device, precision, energy and "
                  "latency from " + _HUNG2021,
        "notes": "Not one chip: no source found gives a published macro's array size, ADC bits and measured energy "
                 "together. The energy and latency are a measured 22 nm macro's; the 128x128/4-bit ADC geometry is "
                 "NeuroSim's default 22 nm design point.",
    },
    "hung2021_4mb": {
        "capacity_mb": 4, "tech_nm": 22, "bits_per_cell": 1, "dac_bits": 8, "weight_bits": 8,
        "tops_per_w": 15.6, "joules_per_mac": _per_mac(15.6), "seconds_per_read": 15.2e-9,
        "tops_per_w_binary": 194.4, "seconds_per_read_binary": 5.2e-9,
        # tile_rows, tile_cols, adc_bits: not in the abstract or any source found; left out.
        "source": _HUNG2021,
        "notes": "Binary ReRAM cells; 15.6 TOPS/W and 15.2 ns at 8-bit input x 8-bit weight, 194.4 TOPS/W and "
                 "5.2 ns for binary operands (abstract).",
    },
    "xue2021_2mb": {
        "capacity_mb": 2, "tech_nm": 22, "bits_per_cell": 1,
        "tops_per_w": 36.61, "joules_per_mac": _per_mac(36.61), "seconds_per_read": 18.3e-9,
        "tops_per_w_binary": 146.21, "seconds_per_read_binary": 9.2e-9,
        # tile_rows, tile_cols, adc_bits, dac_bits, weight_bits: the abstract gives "multibit" without the
        # precisions and no source found gives the array size; left out.
        "source": "Xue et al. (NTHU/TSMC), 'A CMOS-integrated compute-in-memory macro based on resistive "
                  "random-access memory for AI edge devices', Nature Electronics 4, 81-90 (2021), "
                  "doi 10.1038/s41928-020-00505-5",
        "notes": "Single-level-cell ReRAM; 9.2-18.3 ns and 146.21-36.61 TOPS/W from binary to multibit "
                 "input-weight-output (abstract); the multibit figures are used here.",
    },
    "jssc2023_8mb": {
        "capacity_mb": 8, "tech_nm": 22, "dac_bits": 8, "weight_bits": 8, "output_bits": 19,
        "tops_per_w": 21.6, "joules_per_mac": _per_mac(21.6), "seconds_per_read": 14.4e-9,
        # tile_rows, tile_cols, bits_per_cell: not in the abstract; adc_bits: none, the readout is time-domain
        # (voltage-to-time converter); authors not found in the sources searched.
        "source": "'8-b Precision 8-Mb ReRAM Compute-in-Memory Macro Using Direct-Current-Free Time-Domain Readout "
                  "Scheme for AI Edge Devices', IEEE Journal of Solid-State Circuits 58(1), 303-315 (2023)",
        "notes": "8-bit input, 8-bit weight, 19-bit output; 14.4 ns at 21.6 TOPS/W (abstract).",
    },
    "neurram_wan2022": {
        "tile_rows": 256, "tile_cols": 256, "tiles_per_chip": 48, "weight_bits": 4, "rram_devices": 48 * 256 * 256,
        # tops_per_w, adc_bits, dac_bits: the paper gives energy efficiency per input/output precision only as
        # plots (Extended Data Fig. 12e), not transcribed here; inputs/outputs are configurable (outputs 2 bits
        # wider than inputs, Extended Data Fig. 12b caption).
        "source": "Wan, Kubendran, Schaefer, et al., 'A compute-in-memory chip based on resistive random-access "
                  "memory', Nature 608, 504-512 (2022), doi 10.1038/s41586-022-04992-8",
        "notes": "48 CIM cores, each a 256x256 RRAM array (16x16 corelets of 16x16 RRAMs); weights as differential "
                 "conductance of two cells; accuracy comparable to 4-bit-weight software models; one MAC = 2 ops.",
    },
    "neurosim_v14_default": {
        "tile_rows": 128, "tile_cols": 128, "bits_per_cell": 1, "adc_bits": 4, "tech_nm": 22,
        "columns_per_adc": 8, "r_on_ohm": 100e3, "on_off_ratio": 17, "read_voltage_v": 0.5,
        "read_pulse_s": 10e-9, "clock_hz": 1e9,
        # tops_per_w, joules_per_mac: NeuroSim computes them per workload; no default figure to quote.
        "source": _NEUROSIM,
        "notes": "Simulator defaults, not a measured macro: numRowSubArray = numColSubArray = 128, cellBit = 1, "
                 "levelOutput = 16, numColMuxed = 8, technode 22 nm, RRAM Ron 100 kOhm with Roff = 17 Ron, "
                 "0.5 V / 10 ns read (the file's default memcelltype is SRAM; these are its RRAM settings).",
    },
}

SRAM_PRESETS: Dict[str, dict] = {
    "cdcim65_8b": {
        "tech_nm": 65, "input_bits": 8, "weight_bits": 8,
        "tops_per_w": 10.3, "joules_per_mac": _per_mac(10.3), "gops": 51.2, "macs_per_second": 51.2e9 / 2,
        # capacity: not in the abstract.
        "source": "Yin, Zhou, Chen, et al., 'A 65nm 8b-Activation 8b-Weight SRAM-Based Charge-Domain "
                  "Computing-in-Memory Macro Using A Fully-Parallel Analog Adder Network and A Single-ADC Interface', "
                  "arXiv 2212.04320 (2022)",
        "notes": "Analog (charge-domain) SRAM CIM, 8b x 8b in one cycle: 51.2 GOPS at 10.3 TOPS/W (abstract). The "
                 "default because it is the one SRAM source found with both energy and throughput at 8 bits.",
    },
    "chih2021_dcim22": {
        "tech_nm": 22, "tops_per_w": 89.0, "joules_per_mac": _per_mac(89.0), "tops_per_mm2": 16.3,
        # macs_per_second, capacity, precision of the 89 TOPS/W: not in the title, no other source found.
        "source": "Chih, Lee, Fujiwara, et al. (TSMC), 'An 89TOPS/W and 16.3TOPS/mm2 All-Digital SRAM-Based "
                  "Full-Precision Compute-In Memory Macro in 22nm for Machine-Learning Edge Applications', ISSCC 2021, "
                  "paper 16.4, pp. 252-254, doi 10.1109/ISSCC42613.2021.9365766",
        "notes": "All-digital (exact) SRAM CIM: 6T SRAM, bit-serial inputs, adder tree.",
    },
    "tcas2023_32kb28": {
        "tech_nm": 28, "capacity_kb": 32, "input_bits": 4, "weight_bits": 4,
        "tops_per_w": 646.6, "joules_per_mac": _per_mac(646.6), "gops": 1638.4, "macs_per_second": 1638.4e9 / 2,
        "source": "'A 28nm 32Kb SRAM Computing-in-Memory Macro With Hierarchical Capacity Attenuator and Input "
                  "Sparsity-Optimized ADC for 4b MAC Operation', IEEE Trans. Circuits Syst. II 2023 "
                  "(authors not found in the sources searched)",
        "notes": "Analog (charge-domain) 9T1C SRAM CIM: 646.6 TOPS/W average (normalized to 4b/4b), 1638.4 GOPS.",
    },
}

_A100 = {
    "bf16_tflops": 312.0, "tdp_w": 400.0, "hbm_gb_per_s": 2039.0, "memory_gb": 80,
    "flops_per_second": 312e12, "joules_per_flop": 400.0 / 312e12, "bytes_per_second": 2039e9,
    "source": "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): A100 "
              "80GB SXM, BF16 tensor core 312 TFLOPS dense (624 with sparsity), max TDP 400 W, HBM2e 2,039 GB/s",
    "notes": "The GPU HaLoRA compares energy against.",
}
_H100 = {
    "bf16_tflops": 989.5, "tdp_w": 700.0, "hbm_gb_per_s": 3350.0, "memory_gb": 80,
    "flops_per_second": 989.5e12, "joules_per_flop": 700.0 / 989.5e12, "bytes_per_second": 3350e9,
    "source": "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, BF16 tensor core 1,979 TFLOPS with sparsity "
              "('specifications 1/2 lower without sparsity': 989.5 dense), max TDP 700 W, HBM3 3,350 GB/s",
    "notes": "Hopper; dense BF16 as half the datasheet's sparse figure.",
}

DIGITAL_BASELINES: Dict[str, dict] = {"a100_sxm_80gb": dict(_A100), "h100_sxm": dict(_H100)}
HOST_PRESETS: Dict[str, dict] = {"a100_sxm_80gb": dict(_A100), "h100_sxm": dict(_H100)}

DEFAULT_CHIP: Dict[str, str] = {"rram": "composite_22nm", "sram": "cdcim65_8b", "host": "a100_sxm_80gb",
                                "baseline": "a100_sxm_80gb"}

# Whole-chip choices (each part's preset has every figure its target reads).
CHIP_PRESETS: Dict[str, Dict[str, str]] = {
    "default": dict(DEFAULT_CHIP),
    "h100": {"rram": "composite_22nm", "sram": "cdcim65_8b", "host": "h100_sxm", "baseline": "h100_sxm"},
}

_KEY_FIGURES = {
    "rram": ("tile_rows", "tile_cols", "tiles_per_chip", "bits_per_cell", "weight_bits", "adc_bits", "dac_bits",
             "tops_per_w", "seconds_per_read", "capacity_mb", "tech_nm"),
    "sram": ("tops_per_w", "gops", "tops_per_mm2", "input_bits", "weight_bits", "capacity_kb", "tech_nm"),
    "host": ("bf16_tflops", "tdp_w", "hbm_gb_per_s"),
}
_UNITS = {"seconds_per_read": ("ns", 1e9), "tech_nm": ("nm", 1), "capacity_mb": ("Mb", 1), "capacity_kb": ("Kb", 1),
          "hbm_gb_per_s": ("GB/s", 1), "tdp_w": ("W", 1)}


def _fmt(key: str, value) -> str:
    unit, scale = _UNITS.get(key, ("", 1))
    v = value * scale
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return f"{key.replace('_', ' ')} {text}{(' ' + unit) if unit else ''}"


def citation_table() -> str:
    """A Markdown table of every preset: table, name, key figures, source."""
    rows = ["| table | preset | key figures | source |", "| --- | --- | --- | --- |"]
    for table, presets, kind in (("RRAM_PRESETS", RRAM_PRESETS, "rram"), ("SRAM_PRESETS", SRAM_PRESETS, "sram"),
                                 ("DIGITAL_BASELINES", DIGITAL_BASELINES, "host"), ("HOST_PRESETS", HOST_PRESETS, "host")):
        for name, figures in presets.items():
            keys = "; ".join(_fmt(k, figures[k]) for k in _KEY_FIGURES[kind] if k in figures)
            source = figures["source"].replace("|", "/")
            rows.append(f"| {table} | {name} | {keys} | {source} |")
    return "\n".join(rows)
