"""The ``splitserve`` command line: config checks, offline generation, serving, operating a cluster, planning."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from splitserve.config import ConfigError, dump_config, load_config
from splitserve.roles import Role

if TYPE_CHECKING:
    from splitserve.client import Client

_T = TypeVar("_T")

EXIT_USAGE = 2


def _config_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            load_config(path)
            print(f"{path}: ok")
        except ConfigError as err:
            print(err, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _config_show(args: argparse.Namespace) -> int:
    try:
        print(dump_config(load_config(args.file)), end="")
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from splitserve.engine.engine import EngineConfig, RequestError
    from splitserve.engine.rank_loop import offline_engine
    from splitserve.engine.resolve import resolve_model_path
    from splitserve.engine.runner import RunnerConfig
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.tensor_parallel import TensorParallelError

    if (args.prompt is None) == (args.token_ids is None):
        print("generate: give exactly one of --prompt or --token-ids", file=sys.stderr)
        return EXIT_USAGE
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
            stop_token_ids=(),
            logprobs=False,
        )
    except ValidationError as err:
        first = err.errors()[0]
        print(f"generate: --{first['loc'][0]}: {first['msg']}".replace("_", "-"), file=sys.stderr)
        return EXIT_USAGE
    try:
        prompt: list[int] | str = args.prompt
        if args.token_ids is not None:
            prompt = [int(t) for t in args.token_ids.split(",") if t.strip()]
    except ValueError:
        print("generate: --token-ids must be comma-separated integers, e.g. 1,2,3", file=sys.stderr)
        return EXIT_USAGE
    config = EngineConfig(
        RunnerConfig(
            model_dir=str(resolve_model_path(args.model)),
            device=args.device,
            dtype=args.dtype,
            max_batch_tokens=args.max_batch_tokens,
        )
    )
    try:
        with offline_engine(config, args.tensor_parallel_size) as engine:
            (result,) = engine.generate([prompt], params)
    except (RequestError, TensorParallelError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.output == "text":
        print(result.text)
    elif args.output == "token-ids":
        print(",".join(map(str, result.token_ids)))
    else:
        print(
            json.dumps(
                {
                    "prompt_token_ids": result.prompt_token_ids,
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from splitserve.cluster.ray_init import pin_local_ray_auth
    from splitserve.ops.logs import configure_logging

    configure_logging(args.log_format)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    pin_local_ray_auth(config.cluster, os.environ)
    from splitserve.launcher import run_server  # imports Ray, which reads the auth mode just pinned

    return asyncio.run(
        run_server(
            config,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            demo=args.demo,
            drain_timeout_s=args.drain_timeout,
        )
    )


def _submit(args: argparse.Namespace) -> int:
    from splitserve.ops.submit import SubmitError, build_submission, next_steps, submit

    try:
        submission = build_submission(args.config, args.working_dir, args.drain_timeout)
    except (ConfigError, SubmitError) as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    try:
        job_id = submit(args.address, submission)
    except (ConnectionError, RuntimeError) as err:
        print(f"submit: the Ray dashboard at --address {args.address} refused the job: {err}", file=sys.stderr)
        return 1
    print(next_steps(args.address, job_id, submission))
    return 0


def _admin_call(name: str, args: argparse.Namespace, call: Callable[[Client], _T]) -> _T | None:
    """Run ``call(client)`` against --address; print what went wrong, naming the flag to fix, and return None."""
    from splitserve.client import Client, SplitserveError, Unauthenticated, Unavailable

    root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    try:
        with Client(args.address, token=args.token, root_certificates=root, retries=1) as client:
            return call(client)
    except Unauthenticated:
        print(f"{name}: {args.address} wants a token (fix: --token T, or SPLITSERVE_AUTH_TOKEN)", file=sys.stderr)
    except Unavailable as err:
        print(
            f"{name}: cannot reach a splitserve server at --address {args.address} ({err.message}); "
            "is it running, and is that its gRPC port?",
            file=sys.stderr,
        )
    except SplitserveError as err:
        print(f"{name}: {err.message}", file=sys.stderr)
    return None


def _status(args: argparse.Namespace) -> int:
    from splitserve.ops.status_table import format_status

    status = _admin_call("status", args, lambda client: client.cluster_status())
    if status is None:
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _scale(args: argparse.Namespace) -> int:
    if args.rebalance == (args.role is not None):
        print("scale: give ROLE REPLICAS (e.g. `scale prefill 3`) or --rebalance, not both", file=sys.stderr)
        return EXIT_USAGE
    if not args.rebalance and (args.replicas is None or args.replicas < 1):
        print("scale: REPLICAS must be a whole number ≥ 1, e.g. `splitserve scale decode 2`", file=sys.stderr)
        return EXIT_USAGE
    result = _admin_call(
        "scale",
        args,
        lambda client: client.scale(args.role or "", args.replicas or 0, rebalance=args.rebalance),
    )
    if result is None:
        return 1
    print(result.message)
    return 0


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC HOST:PORT")
    parser.add_argument(
        "--token", default=os.environ.get("SPLITSERVE_AUTH_TOKEN"), help="bearer token (default $SPLITSERVE_AUTH_TOKEN)"
    )
    parser.add_argument("--ca-cert", help="PEM file of the CA that signed the server's TLS certificate (enables TLS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="check or print a cluster config").add_subparsers(
        dest="action", required=True
    )
    validate = config.add_parser("validate", help="check YAML cluster configs")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_config_validate)
    show = config.add_parser("show", help="print a config with every default filled in")
    show.add_argument("file")
    show.set_defaults(func=_config_show)

    gen = sub.add_parser("generate", help="run the engine offline on a checkpoint directory")
    gen.add_argument("--model", default="tiny", help="HF checkpoint directory, or 'tiny'")
    gen.add_argument("--prompt")
    gen.add_argument("--token-ids", help="comma-separated prompt token ids")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--max-batch-tokens", type=int, default=8192)
    gen.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks (one GPU each on CUDA, gloo processes on CPU)"
    )
    gen.add_argument("--output", default="text", choices=["text", "token-ids", "json"])
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="start the prefill/decode pools and the gRPC/HTTP APIs for CONFIG")
    srv.add_argument("config")
    srv.add_argument("--grpc-port", type=int, help="override server.grpc_port")
    srv.add_argument("--http-port", type=int, help="override server.http_port")
    srv.add_argument("--demo", action="store_true", help="send one request through the SDK once ready")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on stop")
    srv.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one JSON object a line")
    srv.set_defaults(func=_serve)

    sbm = sub.add_parser("submit", help="run `serve CONFIG` as a Ray job on a running Ray cluster")
    sbm.add_argument("config")
    sbm.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard (job server) URL")
    sbm.add_argument("--working-dir", default=".", help="uploaded as the job's working dir; must hold CONFIG")
    sbm.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on stop")
    sbm.set_defaults(func=_submit)

    st = sub.add_parser("status", help="print the pools, workers, queues, KV use and request rates of a cluster")
    _admin_arguments(st)
    st.add_argument("--json", action="store_true", help="the raw ClusterStatus answer as JSON")
    st.set_defaults(func=_status)

    sc = sub.add_parser("scale", help="resize a pool at run time (scale prefill 3), or --rebalance the phases")
    sc.add_argument("role", nargs="?", choices=[role.value for role in Role])
    sc.add_argument("replicas", nargs="?", type=int)
    sc.add_argument("--rebalance", action="store_true", help="move one worker to the phase with sustained overload")
    _admin_arguments(sc)
    sc.set_defaults(func=_scale)

    from splitserve.bench.cli import register as register_bench
    from splitserve.simulator.cli import register as register_planner

    register_planner(sub)
    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
