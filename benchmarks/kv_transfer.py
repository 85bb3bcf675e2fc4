"""KV transfer throughput per backend, each next to a baseline measured in the same run.

Baselines: a plain TCP socket copy over loopback, timed again next to each run (for grpc, tcp and local), plain
NCCL send/recv (nccl, two GPUs), a device-to-device copy (cuda_ipc). nccl and cuda_ipc need the receiver in a
second process: ``kv_transfer_pair.py``.
Compression accuracy (max abs / relative error) is reported for int8 and fp8.

    python benchmarks/kv_transfer.py [--sizes-mb 1 16 256] [--with-1gb] [--out results/kv_transfer.json]
    python benchmarks/kv_transfer.py --nccl [--overlap-prompt 1024 2048]    # two GPUs: see kv_transfer_pair.py
    python benchmarks/kv_transfer.py --cuda-ipc [--overlap-prompt 1024 2048 [--overlap-eager]]  # one GPU, 2 processes
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import torch

from splitserve.bench.kv_timing import PagedKV, time_backend


def time_socket(nbytes: int, repeats: int) -> float:
    """The loopback ceiling: one TCP connection, sendall of the whole buffer, recv_into a preallocated one."""
    payload = memoryview(bytearray(nbytes))
    sink = memoryview(bytearray(nbytes))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        conn, _ = server.accept()
        with conn:
            for _ in range(repeats):
                got = 0
                while got < nbytes:
                    got += conn.recv_into(sink[got:], min(nbytes - got, 4 << 20))
                conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    best = float("inf")
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.sendall(payload)
            client.recv(1)
            best = min(best, time.perf_counter() - t0)
    thread.join()
    server.close()
    return best


def compression_error(src: PagedKV, codec_name: str) -> dict:
    from splitserve.kv_transfer import codec

    pages = src.kv_layers[0]
    shape = tuple(pages.shape)
    back = codec.decode(codec.encode_tensor(pages, codec_name).cpu(), codec_name, pages.dtype, shape).float()
    ref = pages.float().cpu()
    err = (back - ref).abs()
    return {
        "codec": codec_name,
        "max_abs_error": err.max().item(),
        "max_rel_error_vs_block_absmax": (err / ref.abs().amax(dim=(2, 3, 4), keepdim=True)).max().item(),
        "mean_abs_error": err.mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 256])
    ap.add_argument("--with-1gb", action="store_true", help="also move 1 GB (slow on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--nccl", action="store_true", help="the nccl backend between two GPUs vs plain NCCL p2p")
    ap.add_argument("--cuda-ipc", action="store_true", help="cuda_ipc to a second process on one GPU vs a device copy")
    ap.add_argument(
        "--overlap-prompt",
        type=int,
        nargs="+",
        default=[],
        help="with --nccl or --cuda-ipc: prefill+stream overlap for prompts of these lengths (8B)",
    )
    ap.add_argument(
        "--overlap-eager", action="store_true", help="also measure each overlap prompt with prompt graphs off"
    )
    ap.add_argument("--out", default="results/kv_transfer.json")
    args = ap.parse_args()
    sizes = args.sizes_mb + ([1000] if args.with_1gb else [])
    dtype = getattr(torch, args.dtype)
    if args.nccl or args.cuda_ipc:
        import kv_transfer_pair

        backend = "nccl" if args.nccl else "cuda_ipc"
        result = kv_transfer_pair.run(backend, sizes, dtype, args.repeats, args.overlap_prompt, args.overlap_eager)
        _write(args.out, result)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for mb in sizes:
        src, dst = PagedKV.sized(mb, dtype, device), PagedKV.sized(mb, dtype, device)
        n = src.nbytes
        runs = [
            ("local", {}),
            ("grpc", {}),
            ("grpc", {"compression": "int8"}),
            ("grpc", {"checksum": True}),
            ("tcp", {}),
            ("tcp", {"checksum": True}),
        ]
        baseline = "socket"
        for backend, cfg in runs:
            # The socket again next to each run: on a shared box its rate drifts 2x within a minute.
            baseline_s = time_socket(n, args.repeats)
            seconds = time_backend(backend, src, dst, args.repeats, **cfg)
            rows.append(
                {
                    "size_mb": n / 1e6,
                    "backend": backend,
                    "options": cfg,
                    "gb_per_s": n / seconds / 1e9,
                    "baseline": baseline,
                    "baseline_gb_per_s": n / baseline_s / 1e9,
                    "ratio": baseline_s / seconds,
                }
            )
            r = rows[-1]
            opts = ",".join(f"{k}={v}" for k, v in cfg.items()) or "-"
            print(
                f"{r['size_mb']:8.1f} MB  {backend:9s} {opts:18s} {r['gb_per_s']:7.2f} GB/s   "
                f"{baseline} {r['baseline_gb_per_s']:7.2f} GB/s   ratio {r['ratio']:.2f}",
                flush=True,
            )
    accuracy = [compression_error(PagedKV.sized(4, dtype, device), c) for c in ("int8", "fp8")]
    for a in accuracy:
        print(
            f"{a['codec']}: max abs {a['max_abs_error']:.4g}, max rel (to block absmax) "
            f"{a['max_rel_error_vs_block_absmax']:.4g}, mean abs {a['mean_abs_error']:.4g}"
        )
    _write(args.out, {"device": device, "dtype": args.dtype, "rows": rows, "compression": accuracy})


def _write(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
