"""Count the operations one RobustNorm training step runs per layer, for each hand-written normalisation.

    python benchmarks/count_norm_ops.py

On a GPU a ResNet-20 step at batch 128 is bound by kernel launches, so the number of operations that do work
(one kernel each on a GPU) is what the accelerator layout (``_RangeNormalizeRows``) cuts. Profiled on the CPU:
one forward and backward of a 16-channel layer under bf16 autocast, counting top-level ATen operations other
than views and metadata, and ``to`` only where it copies.
"""

from __future__ import annotations

import torch

from robustnorm import layers

VIEWS = {"aten::as_strided", "aten::view", "aten::reshape", "aten::permute", "aten::expand", "aten::unsqueeze",
         "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::detach", "aten::result_type",
         "aten::flatten", "aten::slice", "aten::narrow", "aten::select", "aten::resize_", "aten::expand_as",
         "aten::t", "aten::transpose", "aten::alias", "aten::unfold", "aten::_unsafe_view", "aten::squeeze"}


def count(normalize: type) -> int:
    cpu_layout = layers._RangeNormalize
    layers._RangeNormalize = normalize  # the layer looks the name up at every training forward on a CPU
    try:
        layer = layers.RobustNorm2d(16, p=0.2).train()
        x = torch.rand(128, 16, 32, 32).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
        upstream = torch.rand_like(x)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            out.backward(upstream)

        step()  # warm-up
        with torch.profiler.profile() as profile:
            step()
    finally:
        layers._RangeNormalize = cpu_layout
    top = [e for e in profile.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return sum(1 for e in top if e.name not in VIEWS and not (e.name == "aten::to" and not e.cpu_children))


def main() -> None:
    for name, normalize in (("wide (CPU)", layers._RangeNormalize),
                            ("rows (accelerators)", layers._RangeNormalizeRows)):
        print(f"{name}: {count(normalize)} operations per layer and step")


if __name__ == "__main__":
    main()
