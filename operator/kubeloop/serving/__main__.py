"""``python -m kubeloop.serving``: serve one model directory over KServe's V1/V2 protocols.

    python -m kubeloop.serving --model-dir DIR --model-name NAME --model-version VERSION \\
        --http-port P [--grpc-port G] [--max-batch-size N] [--max-latency-ms M] \\
        [--cache-size N] [--cache-ttl S] [--device cpu|cuda|auto] [--feedback-ttl S] \\
        [--request-log-uri URI] [--request-log-sample F] [--request-log-max-rows N] \\
        [--request-log-flush-interval S] \\
        [--prediction-edges JSON] [--max-body-bytes N] [--max-batch-rows N] \\
        [--server kubeloop|kserve] [--workers 1]

``--server kubeloop`` (the default) is the runtime's own app (``serving/app.py``);
``--server kserve`` runs kserve's ModelServer with the ``kserve.Model`` adapter, the protocol
reference. Exits with status 2 and a one-line reason when the artifact cannot be loaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kubeloop.serving.protocol import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from kubeloop.serving.predictor import ServingOptions

EXIT_BAD_ARTIFACT = 2


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= 1")
    return n


def _non_negative(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x >= 0 or math.isinf(x):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number >= 0")
    return x


def _positive(value: str) -> float:
    x = _non_negative(value)
    if x == 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number > 0")
    return x


def _share(value: str) -> float:
    x = _non_negative(value)
    if x > 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a share between 0 and 1")
    return x


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0..65535)")
    return n


def _edges(value: str) -> tuple[float, ...]:
    try:
        edges = json.loads(value)
    except ValueError:
        edges = None
    if (
        not isinstance(edges, list)
        or not all(isinstance(e, int | float) and not isinstance(e, bool) for e in edges)
        or any(b <= a for a, b in itertools.pairwise(edges))
    ):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a JSON list of increasing numbers, e.g. [0.1, 0.5, 0.9]"
        )
    return tuple(float(e) for e in edges)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kubeloop.serving",
        description="Serve a kubeloop model artifact over KServe's V1/V2 protocols.",
    )
    parser.add_argument("--model-dir", required=True, help="artifact directory (model.pt2, ...)")
    parser.add_argument("--model-name", required=True, help="deployment name (URL and label)")
    parser.add_argument("--model-version", required=True, help="ModelVersion name (label)")
    parser.add_argument("--http-port", required=True, type=_port)
    parser.add_argument("--grpc-port", type=_port, default=None, help="gRPC off when not given")
    parser.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (kserve: always all addresses)"
    )
    parser.add_argument(
        "--server",
        choices=("kubeloop", "kserve"),
        default="kubeloop",
        help="kubeloop: the runtime's own app; kserve: kserve's ModelServer (the reference)",
    )
    parser.add_argument(
        "--max-batch-size", type=_positive_int, default=1, help="rows per model call; 1 = off"
    )
    parser.add_argument("--max-latency-ms", type=_non_negative, default=5.0)
    parser.add_argument("--cache-size", type=int, default=0, help="cached answers; 0 = off")
    parser.add_argument("--cache-ttl", type=float, default=300.0, help="seconds")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument(
        "--feedback-ttl",
        type=_positive,
        default=3600.0,
        help="seconds a prediction waits for its label (POST .../feedback with its id)",
    )
    parser.add_argument(
        "--request-log-uri", default="", help="where the request log's Parquet goes; '' = off"
    )
    parser.add_argument("--request-log-sample", type=_share, default=1.0, help="share logged")
    parser.add_argument("--request-log-max-rows", type=_positive_int, default=1_000_000)
    parser.add_argument(
        "--request-log-flush-interval",
        type=_positive,
        default=30.0,
        help="seconds at most between a logged row and its file (a retrain reads files only)",
    )
    parser.add_argument(
        "--prediction-edges",
        type=_edges,
        default=(),
        help="JSON list of the prediction-histogram edges all versions share",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are answered 413 (not enforced by --server kserve)",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH_ROWS,
        help="requests with more rows are answered 400",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes; more than 1 only with --server kserve (scale with replicas instead: "
        "the counters in /metrics live in one process)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1 and args.server != "kserve":
        parser.error(
            f"--workers {args.workers}: the kubeloop server runs one process (its /metrics "
            "counters live there); run more replicas, or use --server kserve"
        )
    from kubeloop.serving.artifact import ArtifactError
    from kubeloop.serving.launcher import OptionError
    from kubeloop.serving.predictor import ServingOptions

    options = ServingOptions(
        max_batch_size=args.max_batch_size,
        max_latency_ms=args.max_latency_ms,
        cache_size=max(args.cache_size, 0),
        cache_ttl_s=args.cache_ttl,
        device=args.device,
        feedback_ttl_s=args.feedback_ttl,
        request_log_uri=args.request_log_uri,
        request_log_sample=args.request_log_sample,
        request_log_max_rows=args.request_log_max_rows,
        request_log_flush_s=args.request_log_flush_interval,
        prediction_edges=args.prediction_edges,
    )
    try:
        if args.server == "kserve":
            _serve_kserve(args, options)
        else:
            from kubeloop.serving.launcher import Launch, run

            run(
                Launch(
                    model_dir=Path(args.model_dir),
                    model_name=args.model_name,
                    model_version=args.model_version,
                    options=options,
                    http_port=args.http_port,
                    grpc_port=args.grpc_port,
                    host=args.host,
                    max_body_bytes=args.max_body_bytes,
                    max_batch_rows=args.max_batch_rows,
                )
            )
    except OptionError as exc:
        print(f"kubeloop.serving: {exc}", file=sys.stderr)
        return EXIT_BAD_ARTIFACT
    except ArtifactError as exc:
        if exc.__cause__ is not None and not isinstance(exc.__cause__, ArtifactError):
            # An artifact that broke in a way its checks did not foresee: the traceback helps.
            traceback.print_exception(exc.__cause__)
        # One line, the last: the local backend reports a crashed server's last line.
        print(f"kubeloop.serving: cannot load --model-dir {args.model_dir}: {exc}", file=sys.stderr)
        return EXIT_BAD_ARTIFACT
    return 0


def _serve_kserve(args: argparse.Namespace, options: ServingOptions) -> None:
    # kserve parses sys.argv when it is imported: hide our flags from it.
    sys.argv = sys.argv[:1]
    import kserve  # type: ignore[import-untyped]

    from kubeloop.serving.model_server import KubeloopModel

    model = KubeloopModel(
        args.model_name,
        model_dir=args.model_dir,
        version=args.model_version,
        options=options,
        max_batch_rows=args.max_batch_rows,
    )
    model.load()
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


if __name__ == "__main__":
    raise SystemExit(main())
