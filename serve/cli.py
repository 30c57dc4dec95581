"""`jaxsys serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys

from jaxsys.serve.cli_devices import DeviceError, add_device_args, request_devices, tensor_mesh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsys serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions with streaming, /v1/models, /health, /metrics).",
        epilog="example: jaxsys serve --model smollm2-135m-instruct --port 8000\n"
               "then:    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' "
               "-d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", "
               "\"content\": \"Hi\"}]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf file")
    p.add_argument("--served-name", default=None, help="model id clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--num-pages", type=int, default=4096, help="KV-cache pages (incl. one scratch page)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64, help="max running requests")
    p.add_argument("--prefill-chunk", type=int, default=512, help="max prompt tokens per request per step")
    p.add_argument("--no-shared-attention", action="store_true",
                   help="plain split-KV paged decode attention (no sharing) instead of shared-prefix attention")
    add_device_args(p)
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        request_devices(args)
    except DeviceError as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import uvicorn

    from jaxsys.models import ConfigError, ModelNotFoundError, TokenizerError, WeightError
    from jaxsys.serve.api.server import create_app
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.serve.llm import ServingLLM

    try:
        config = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, max_decode_batch=args.max_batch,
                              prefill_chunk=args.prefill_chunk, shared_attention=not args.no_shared_attention)
    except ValueError as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    try:
        mesh = tensor_mesh(args.tensor_parallel)
    except DeviceError as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    try:
        llm = ServingLLM(args.model, config=config, mesh=mesh, dtype=args.dtype)
    except (ModelNotFoundError, WeightError, ConfigError, TokenizerError) as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    app = create_app(llm, model_name=args.served_name or args.model)
    print(f"jaxsys serve: {llm.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
