import torch, time
from hvlab import fused
from tests.test_fused import _inputs
from hvlab.rope import get_nd_rotary_pos_embed
cos, sin = get_nd_rotary_pos_embed([16, 56, 56], [5, 20, 48])
for wdt in (torch.bfloat16, torch.float32):
    for n in (cos.shape[0], 0):
        q, norm = _inputs(torch.bfloat16, L=5000, nh=24, hd=128, device="cuda"); norm.to(wdt)
        f = (cos, sin) if n else None
        out = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=torch.bfloat16, backend="kernel")
        ref = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=torch.bfloat16, backend="eager")
        ad = (out.float() - ref.float()).abs()
        ulp = ref.float().abs().clamp(min=1e-6) * 2 ** -7
        i = ad.argmax()
        print(wdt, n, "differ", (out != ref).float().mean().item(), "max ulps", (ad / ulp).max().item(),
              "rel", (ad.norm() / ref.float().norm()).item(), "at", out.flatten()[i].item(), ref.flatten()[i].item(), flush=True)
# timing at the 720p size, one q tensor
L = 118824
qkv = torch.randn(1, L, 3 * 3072, device="cuda", dtype=torch.bfloat16)
q = qkv.view(1, L, 3, 24, 128)[:, :, 0]
from hvlab.modulation import RMSNorm
norm = RMSNorm(128).cuda().bfloat16()
c, s = get_nd_rotary_pos_embed([16, 56, 56], [33, 45, 80])
for be in ("kernel", "eager"):
    for _ in range(3): fused.norm_rope(q, norm, (c, s), n_rope=118800, backend=be)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): fused.norm_rope(q, norm, (c, s), n_rope=118800, backend=be)
    torch.cuda.synchronize(); print(be, "ms per q at 720p:", (time.perf_counter() - t) / 10 * 1000, flush=True)
