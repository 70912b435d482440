"""Time and peak memory of utils.rerank.re_ranking at Q=2,000 x G=10,000.

Usage (from the repository root):
    python bench/rerank_speed.py [--device cpu|cuda] [--queries 2000]
        [--gallery 10000] [--dim 512] [--k1 20] [--k2 6] [--chunk-size 1024]
        [--repeat 3] [--threads 0]

Every measurement runs in a fresh subprocess.  On CPU the peak memory is the
growth of the process's peak resident set size (resource.getrusage
ru_maxrss) across the call, so it counts everything torch allocates, not just
Python objects.  On CUDA it is torch.cuda.max_memory_allocated() above the
memory held before the call.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _current_rss_kib():
    """Resident set size right now (Linux /proc), in KiB; -1 if unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _child(args):
    import resource

    import torch

    from utils.rerank import re_ranking

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.queries, args.dim, generator=gen)
    g = torch.randn(args.gallery, args.dim, generator=gen)
    q = torch.nn.functional.normalize(q, dim=1).to(device)
    g = torch.nn.functional.normalize(g, dim=1).to(device)

    # warm-up on a tiny problem so one-off library initialisation is not
    # billed to the measured call
    re_ranking(q[:8], g[:32], k1=args.k1, k2=args.k2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_gpu = torch.cuda.memory_allocated()
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    current_rss = _current_rss_kib()

    seconds = []
    for run in range(args.repeat):
        start = time.perf_counter()
        out = re_ranking(q, g, k1=args.k1, k2=args.k2, lambda_value=0.3,
                         chunk_size=args.chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if run == 0:
            after_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if device.type == "cuda":
                cuda_peak = torch.cuda.max_memory_allocated() - before_gpu
        if run + 1 < args.repeat:
            del out

    result = {
        "seconds": seconds,
        "rss_before_mb": current_rss / 1024.0,
        "rss_peak_before_mb": before_rss / 1024.0,  # ru_maxrss is KiB on Linux
        "rss_peak_after_mb": after_rss / 1024.0,
        "rss_peak_delta_mb": (after_rss - before_rss) / 1024.0,
        "output_mb": out.numel() * out.element_size() / 2 ** 20,
        "threads": torch.get_num_threads(),
        "finite": bool(torch.isfinite(out).all()),
    }
    if device.type == "cuda":
        result["cuda_peak_delta_mb"] = cuda_peak / 2 ** 20
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--gallery", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls (memory is taken from the first)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    cmd = [sys.executable, os.path.abspath(__file__), "--child"]
    for name in ("device", "queries", "gallery", "dim", "k1", "k2", "chunk_size",
                 "repeat", "threads"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(proc.returncode)
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"re_ranking  Q={args.queries}  G={args.gallery}  dim={args.dim}  "
          f"k1={args.k1}  k2={args.k2}  chunk_size={args.chunk_size}  "
          f"device={args.device}  torch threads={res['threads']}")
    times = sorted(res["seconds"])
    print(f"  time per call    : {times[0]:.2f} s best, "
          f"{times[len(times) // 2]:.2f} s median of {len(times)} "
          f"({', '.join(f'{t:.2f}' for t in res['seconds'])})")
    print(f"  peak memory      : {res['rss_peak_after_mb'] - res['rss_before_mb']:.1f} MB "
          f"above the resident set before the call "
          f"(RSS {res['rss_before_mb']:.1f} MB -> peak {res['rss_peak_after_mb']:.1f} MB)")
    print(f"  ru_maxrss growth : {res['rss_peak_delta_mb']:.1f} MB "
          f"(process peak before the call {res['rss_peak_before_mb']:.1f} MB)")
    if "cuda_peak_delta_mb" in res:
        print(f"  CUDA peak alloc  : {res['cuda_peak_delta_mb']:.1f} MB above pre-call")
    print(f"  output Q x G     : {res['output_mb']:.1f} MB, "
          f"all finite: {res['finite']}")


if __name__ == "__main__":
    main()
