"""Which JPEG decoder a run gets, said aloud on its first lines.

On a GPU, DALI's `mixed` decoder sends `hw_decoder_load` of the JPEGs to the chip's hardware JPEG
engine (nvJPEG's A100/H100-class NVJPG) and the rest through nvJPEG's hybrid path (Huffman decoding
on the CPU threads, the rest in CUDA). A GPU without such an engine gets the hybrid path for all of
them, without a word from DALI: on 4 vCPUs that can halve the loader's rate. Whether an L4 has one
DALI uses is not settled in NVIDIA's documents, so it is measured, not assumed: one probe decode
through nvImageCodec (the library DALI 2.x decodes with) restricted to its hardware-only backend,
which returns no image where there is no hardware decoder.
"""
from __future__ import annotations

import io

import torch

PROBE_SIDE = 256  # px: a 4:2:0 baseline JPEG, the kind the hardware engine takes


def _probe_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (PROBE_SIDE, PROBE_SIDE), (120, 30, 200)).save(buffer, "JPEG", quality=90, subsampling=2)
    return buffer.getvalue()


def hardware_decoder_answers(device_index: int) -> tuple[bool, str]:
    """(whether the GPU's hardware JPEG decoder decoded the probe, what was seen)."""
    try:
        import nvidia.nvimgcodec as nvimgcodec
    except ImportError as error:
        return False, f"nvImageCodec is not installed ({error})"
    try:
        decoder = nvimgcodec.Decoder(device_id=device_index,
                                     backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        image = decoder.decode(nvimgcodec.CodeStream(_probe_jpeg()))
    except Exception as error:  # noqa: BLE001 - no such backend here raises, in the library's own words
        return False, f"nvImageCodec's hardware-only backend refused ({' '.join(str(error).split())[:160]})"
    if image is None:
        return False, "nvImageCodec's hardware-only backend decoded nothing"
    return True, "nvImageCodec's hardware-only backend decoded the probe"


def describe(backend: str, device: torch.device, hw_decoder_load: float) -> dict:
    """What decodes this run's JPEGs: {"jpeg_decoder", "jpeg_hardware_decoder", "hw_decoder_load",
    "jpeg_decoder_found_by"}
    for the console, the machine record in metrics.jsonl, the report and the benchmarks' rows."""
    if backend == "torchvision":
        return {"jpeg_decoder": "torchvision.io.decode_jpeg (libjpeg-turbo) on the CPU", "jpeg_hardware_decoder": False,
                "hw_decoder_load": None, "jpeg_decoder_found_by": "the loader asked for (no --dali)"}
    if device.type != "cuda":
        return {
            "jpeg_decoder": "DALI on the CPU (libjpeg-turbo)",
            "jpeg_hardware_decoder": False,
            "hw_decoder_load": None,
            "jpeg_decoder_found_by": "no GPU: DALI's CPU graph",
        }
    if hw_decoder_load == 0:
        return {
            "jpeg_decoder": "DALI mixed: nvJPEG hybrid (Huffman on the CPU threads, the rest in CUDA)",
            "jpeg_hardware_decoder": False,
            "hw_decoder_load": 0.0,
            "jpeg_decoder_found_by": "hw_decoder_load 0 asks for it",
        }
    answered, seen = hardware_decoder_answers(device.index or 0)
    name = torch.cuda.get_device_name(device)
    if answered:
        decoder = (f"DALI mixed: the {name}'s hardware JPEG decoder for {hw_decoder_load:.0%} of the JPEGs, "
                   f"nvJPEG hybrid for the rest")
    else:
        decoder = (f"DALI mixed: nvJPEG hybrid for every JPEG (Huffman on the CPU threads): the {name} has no "
                   f"hardware JPEG decoder DALI can use, so hw_decoder_load {hw_decoder_load:g} does nothing")
    return {"jpeg_decoder": decoder, "jpeg_hardware_decoder": answered, "hw_decoder_load": hw_decoder_load,
            "jpeg_decoder_found_by": f"a probe decode: {seen}"}


def line(description: dict) -> str:
    """The console's line."""
    return f"JPEG decoder: {description['jpeg_decoder']} ({description['jpeg_decoder_found_by']})"


def short(description: dict) -> str:
    """A table cell: "hardware 70% + hybrid", "hybrid", "CPU"."""
    if description["hw_decoder_load"] is None:
        return "CPU"
    return (f"hardware {description['hw_decoder_load']:.0%} + hybrid" if description["jpeg_hardware_decoder"]
            else "hybrid")
