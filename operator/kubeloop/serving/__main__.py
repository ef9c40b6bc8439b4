"""``python -m kubeloop.serving``: serve one model directory with kserve's ModelServer.

    python -m kubeloop.serving --model-dir DIR --model-name NAME --model-version VERSION \\
        --http-port P [--grpc-port G] [--max-batch-size N] [--max-latency-ms M] \\
        [--cache-size N] [--cache-ttl S] [--workers 1]

Exits with status 2 and a one-line reason when the artifact cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_BAD_ARTIFACT = 2


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return n


def _non_negative(value: str) -> float:
    x = float(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a number >= 0")
    return x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kubeloop.serving",
        description="Serve a kubeloop model artifact over KServe's V1/V2 protocols.",
    )
    parser.add_argument("--model-dir", required=True, help="artifact directory (model.pt2, ...)")
    parser.add_argument("--model-name", required=True, help="deployment name (URL and label)")
    parser.add_argument("--model-version", required=True, help="ModelVersion name (label)")
    parser.add_argument("--http-port", required=True, type=int)
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC off when not given")
    parser.add_argument(
        "--max-batch-size", type=_positive_int, default=1, help="rows per model call; 1 = off"
    )
    parser.add_argument("--max-latency-ms", type=_non_negative, default=5.0)
    parser.add_argument("--cache-size", type=int, default=0, help="cached answers; 0 = off")
    parser.add_argument("--cache-ttl", type=float, default=300.0, help="seconds")
    parser.add_argument("--workers", type=_positive_int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # kserve parses sys.argv when it is imported: hide our flags from it.
    sys.argv = sys.argv[:1]
    import kserve  # type: ignore[import-untyped]

    from kubeloop.serving.artifact import ArtifactError
    from kubeloop.serving.model_server import KubeloopModel

    model = KubeloopModel(
        args.model_name,
        model_dir=args.model_dir,
        version=args.model_version,
        max_batch_size=args.max_batch_size,
        max_latency_ms=args.max_latency_ms,
        cache_size=max(args.cache_size, 0),
        cache_ttl_s=args.cache_ttl,
    )
    try:
        model.load()
    except ArtifactError as exc:
        print(f"kubeloop.serving: cannot load --model-dir {args.model_dir}: {exc}", file=sys.stderr)
        return EXIT_BAD_ARTIFACT
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port or 0,
        enable_grpc=args.grpc_port is not None,
        workers=args.workers,
        # Our own request metrics replace kserve's per-request latency log line.
        enable_latency_logging=False,
    )
    # kserve's per-request trace log line is noise next to our metrics; access logs stay.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
