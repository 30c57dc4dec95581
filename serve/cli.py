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
    spec = p.add_argument_group(
        "speculative decoding",
        "a draft proposes --gamma tokens per request and step; the model verifies them in one step and "
        "keeps the longest prefix its own decoding would produce (greedy: the same tokens; sampling: the "
        "same distribution)")
    spec.add_argument("--speculate", choices=["ngram", "self", "model"], default=None,
                      help="ngram: prompt lookup; self: the model's first --draft-layers layers; "
                           "model: --draft-model (same vocabulary)")
    spec.add_argument("--gamma", default=None, metavar="N|auto",
                      help="draft tokens per step (default 4; compiled set 1, 2, 4, 8 plus this value), or auto: "
                           "the roofline tuner drafts, per number of running requests, the gamma of the compiled "
                           "set (or none) it predicts fastest on --hardware for the acceptance measured while "
                           "serving, and sizes the expert cache and prefetch")
    spec.add_argument("--hardware", default=None, metavar="YAML",
                      help="--gamma auto: the hardware (a path or a name from configs/hardware, e.g. "
                           "h100-pcie5.yaml); default: this machine, measured at start (up to a minute)")
    spec.add_argument("--tuner-stats", default=None, metavar="JSON",
                      help="--gamma auto: measured routing statistics and acceptances (the evaluation record of "
                           "python -m jaxsys.serve.moe_offload.moefy); default: independent routing, acceptance "
                           "measured while serving")
    spec.add_argument("--draft-layers", type=int, default=None,
                      help="depth of the self draft (default: half the model's layers)")
    spec.add_argument("--draft-model", default=None, help="the draft of --speculate model (name, folder or .gguf)")
    moe = p.add_argument_group("MoE expert offloading", "keep an MoE model's routed experts in host memory")
    moe.add_argument("--offload-experts", action="store_true",
                     help="experts in host memory behind a per-layer device cache (speculates with ngram only)")
    moe.add_argument("--expert-cache", type=int, default=None,
                     help="device expert slots per layer (>= top-k; default: half the experts)")
    cl = p.add_argument_group(
        "cluster (ARES/STAR)", "several engine instances, each on its own --tensor-parallel devices, behind a "
        "router that dispatches requests and migrates running ones (KV pages and all) between instances")
    cl.add_argument("--instances", type=int, default=1, metavar="N", help="engine instances (default: %(default)s)")
    cl.add_argument("--policy", choices=["round_robin", "least_kv", "llumnix", "ours"], default=None,
                    help="dispatch and rescheduling: ours balances current plus predicted remaining load "
                         "(default: least_kv)")
    cl.add_argument("--length-predictor", default=None, metavar="PATH",
                    help="remaining-length head for --policy ours (saved by `jaxsys length train`); "
                         "without one, ours balances on current load with a warning")
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
    from jaxsys.serve.moe_offload.autotune import AutoTune
    from jaxsys.serve.moe_offload.store import ExpertCacheError
    from jaxsys.serve.moe_offload.tuner import TunerError
    from jaxsys.serve.speculative import DraftError
    from jaxsys.serve.speculative.config import SpeculativeConfig

    try:
        config = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, max_decode_batch=args.max_batch,
                              prefill_chunk=args.prefill_chunk, shared_attention=not args.no_shared_attention)
    except ValueError as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    if args.instances != 1 or args.policy is not None or args.length_predictor is not None:
        return _serve_cluster(args, config)
    try:
        mesh = tensor_mesh(args.tensor_parallel)
    except DeviceError as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    try:
        speculate, auto = None, None
        if (args.hardware is not None or args.tuner_stats is not None) and args.gamma != "auto":
            raise DraftError("--hardware and --tuner-stats tune --gamma auto")
        if args.speculate is not None:
            if args.gamma == "auto":
                speculate = SpeculativeConfig(draft=args.speculate, draft_layers=args.draft_layers)
                auto = AutoTune(hardware=args.hardware, stats=args.tuner_stats)
            else:
                gamma = SpeculativeConfig.gamma if args.gamma is None else _gamma(args.gamma)
                speculate = SpeculativeConfig(draft=args.speculate, gamma=gamma,
                                              gammas=(*SpeculativeConfig.gammas, gamma), draft_layers=args.draft_layers)
        elif args.gamma is not None or args.draft_layers is not None or args.draft_model is not None:
            raise DraftError("--gamma, --draft-layers and --draft-model need --speculate")
        if args.expert_cache is not None and not args.offload_experts:
            raise ExpertCacheError("--expert-cache needs --offload-experts")
        if args.offload_experts and mesh is not None:
            raise ExpertCacheError("--offload-experts runs on one device; leave out --tensor-parallel")
        llm = ServingLLM(args.model, config=config, mesh=mesh, dtype=args.dtype, speculate=speculate, gamma=auto,
                         draft_model=args.draft_model, offload_experts=args.offload_experts,
                         expert_cache=args.expert_cache)
    except (ModelNotFoundError, WeightError, ConfigError, TokenizerError, DraftError, ExpertCacheError,
            TunerError) as e:
        print(f"jaxsys serve: {e}", file=sys.stderr)
        return 2
    if llm.autotune is not None:
        from jaxsys.serve.moe_offload.autotune import describe

        print(f"jaxsys serve: --gamma auto: {describe(llm.autotune)}", flush=True)
    app = create_app(llm, model_name=args.served_name or args.model)
    print(f"jaxsys serve: {llm.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_cluster(args, config) -> int:
    """`--instances N`: a `ClusterLLM` behind the same server."""
    import jax
    import uvicorn

    from jaxsys.models import ConfigError, ModelNotFoundError, TokenizerError, WeightError
    from jaxsys.runtime import cpu_devices_hint
    from jaxsys.serve.api.server import create_app

    def fail(msg: str) -> int:
        print(f"jaxsys serve: {msg}", file=sys.stderr)
        return 2

    if args.instances < 1:
        return fail(f"--instances must be >= 1, got {args.instances}")
    plain = (args.speculate, args.gamma, args.draft_layers, args.draft_model, args.expert_cache)
    if any(v is not None for v in plain) or args.offload_experts:
        return fail("--instances runs plain engines; leave out --speculate, --gamma, --draft-layers, --draft-model, "
                    "--offload-experts and --expert-cache")
    need, have = args.instances * args.tensor_parallel, jax.device_count()
    if need > have:
        hint = f"; {cpu_devices_hint(need)}" if jax.default_backend() == "cpu" else ""
        return fail(f"{args.instances} instances x {args.tensor_parallel} devices need {need} devices, this run "
                    f"has {have} ({jax.default_backend()}){hint}")
    from jaxsys.serve.cluster.serving import ClusterLLM
    from jaxsys.serve.length.predictor import LengthPredictor

    predictor = None
    if args.length_predictor is not None:
        try:
            predictor = LengthPredictor.load(args.length_predictor)
        except (OSError, KeyError, ValueError, SyntaxError) as e:
            return fail(f"cannot read the length predictor {args.length_predictor}: {e}")
    try:
        llm = ClusterLLM(args.model, instances=args.instances, devices_per_instance=args.tensor_parallel,
                         config=config, policy=args.policy or "least_kv", predictor=predictor, dtype=args.dtype)
    except (ModelNotFoundError, WeightError, ConfigError, TokenizerError) as e:
        return fail(str(e))
    app = create_app(llm, model_name=args.served_name or args.model)
    print(f"jaxsys serve: {llm.model} on {args.instances} instances ({llm.cluster.policy_name}) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _gamma(text: str) -> int:
    """--gamma's number (the compiled set then refuses one below 1)."""
    from jaxsys.serve.speculative import DraftError

    try:
        return int(text)
    except ValueError:
        raise DraftError(f"--gamma takes a number of draft tokens or auto, got {text!r}") from None
