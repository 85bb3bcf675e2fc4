"""The ``splitserve`` command line: config checks, offline generation, serving, planning."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from splitserve.config import ConfigError, dump_config, load_config

EXIT_USAGE = 2
NOT_BUILT = {
    "submit": "submit CONFIG to a Ray cluster as a Ray job",
    "bench": "run the serving benchmark against a cluster",
    "status": "print the pools, queues and KV use of a running cluster",
    "profile": "measure a performance profile of this GPU for the simulator",
}
PLANNER = {
    "plan": "find the cheapest prefill/decode pool sizes that meet the SLOs",
    "simulate": "simulate one cluster configuration under a workload",
}


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

    from splitserve.engine.engine import Engine, EngineConfig, RequestError
    from splitserve.engine.resolve import resolve_model_path
    from splitserve.engine.runner import RunnerConfig
    from splitserve.engine.sampling_params import SamplingParams

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
    engine = Engine(
        EngineConfig(
            RunnerConfig(
                model_dir=str(resolve_model_path(args.model)),
                device=args.device,
                dtype=args.dtype,
                max_batch_tokens=args.max_batch_tokens,
            )
        )
    )
    try:
        (result,) = engine.generate([prompt], params)
    except RequestError as err:
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
    import logging

    from splitserve.launcher import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        run_server(
            config,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            demo=args.demo,
            drain_timeout_s=args.drain_timeout,
        )
    )


def _not_built(name: str, purpose: str):
    def run(_: argparse.Namespace) -> int:
        print(f"splitserve {name}: not built yet in this version (it will {purpose})", file=sys.stderr)
        return EXIT_USAGE

    return run


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
    gen.add_argument("--output", default="text", choices=["text", "token-ids", "json"])
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="start the prefill/decode pools and the gRPC/HTTP APIs for CONFIG")
    srv.add_argument("config")
    srv.add_argument("--grpc-port", type=int, help="override server.grpc_port")
    srv.add_argument("--http-port", type=int, help="override server.http_port")
    srv.add_argument("--demo", action="store_true", help="send one request through the SDK once ready")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on stop")
    srv.set_defaults(func=_serve)

    unbuilt = dict(NOT_BUILT)
    try:
        from splitserve.simulator.cli import register
    except ImportError:
        unbuilt.update(PLANNER)
    else:
        register(sub)
    for name, purpose in unbuilt.items():
        p = sub.add_parser(name, help=f"{purpose} (not built yet)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(name, purpose))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
