"""UniRepLKNet's dilated branches: torch's dilated depthwise conv vs lknets' kernels on the dense,
zero-filled kernel (f+b, batch 64, H100). An experiment: see benchmarks/RESULTS.md.

    python benchmarks/dilated_branches.py
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from benchmarks.dwconv import timed
from models import layers
torch.backends.cudnn.benchmark = True
print("| shape | dtype | torch f+b ms | ours (dense) f+b ms |")
for n, c, h in [(64, 160, 28), (64, 320, 14), (64, 640, 7)]:
    for k, r in [(5, 1), (7, 2), (3, 3), (3, 4), (3, 5)]:
        for dt in (torch.bfloat16, torch.float16):
            conv = layers.DilatedDepthwiseConv2d(c, k, r).cuda().to(dt)
            x = torch.randn(n, c, h, h, device="cuda", dtype=dt, requires_grad=True)
            dy = torch.randn_like(x)
            res = []
            for impl in ("torch", "cuda"):
                layers.set_lk_impl(impl)
                def fb():
                    torch.autograd.grad(conv(x), [x, conv.weight], dy)
                res.append(timed(fb))
            layers.set_lk_impl("auto")
            print(f"| N{n} C{c} {h}x{h} k{k} d{r} | {str(dt)[6:]} | {res[0]:.3f} | {res[1]:.3f} |")
