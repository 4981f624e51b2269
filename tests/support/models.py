"""The 10 KB real upscale model: spandrel's Compact (SRVGGNet) architecture with random weights."""

from __future__ import annotations

from pathlib import Path

UPSCALE_MODEL_NAME = "tiny_compact_x2.safetensors"


def make_upscale_model(path: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(seed)
    net = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path
