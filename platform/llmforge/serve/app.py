"""The Ray Serve application: one deployment whose replicas each hold the model, an engine and the HTTP API.

Three ways in, one builder:
- ``llmforge serve`` / ``jobs/serve.py`` → :func:`serve_forever` (starts Serve's HTTP proxy, blocks, drains on Ctrl-C);
- ``serve run llmforge.serve.app:build_app model=DIR [adapters=a=DIR,b=DIR] [config=FILE] [serve.x=...]``;
- a RayService's ``serveConfigV2`` with ``import_path: llmforge.serve.app:build_app`` and the same ``args``.
The API key comes from ``LLMFORGE_API_KEY`` on the replicas (a Kubernetes Secret there) or from the job's flag.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from llmforge import storage
from llmforge.config import Config, ServeConfig, load_config
from llmforge.errors import ConfigError, InputError
from llmforge.tracking import local_dir

log = logging.getLogger("llmforge.serve")

API_KEY_ENV = "LLMFORGE_API_KEY"
DEPLOYMENT = "LLMServer"
APP_NAME = "llmforge"


def check_model_dir(path: Path, uri: str) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"Model {uri} is not a Hugging Face model dir (no config.json).",
                         fix="pass the model/ dir written by `llmforge pretrain`, its s3:// copy or models:/NAME/VERSION.")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise InputError(f"Model {uri} has no tokenizer files.", fix="export the model with its tokenizer (llmforge pretrain does).")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / name).is_file() for name in weights):
        raise InputError(f"Model {uri} has a config.json but no weights ({', '.join(weights)}): a half-copied or "
                         "half-written model dir?", fix="point at a complete export (llmforge writes them whole).")


def check_adapter_dir(path: Path, name: str, uri: str) -> None:
    """A peft adapter dir whose config parses and whose weights open (header and tensor index read, nothing
    loaded): checked when the app starts, so one broken adapter fails the start, not a request mid-serving."""
    import json

    from safetensors import safe_open
    config = path / "adapter_config.json"
    if not config.is_file():
        raise InputError(f"Adapter {name}={uri} is not a peft adapter dir (no adapter_config.json).",
                         fix="pass the adapter/ dir written by `llmforge finetune`.")
    fix = "export the adapter again with `llmforge finetune` (its adapter/ dir)."
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"Adapter {name}={uri}: adapter_config.json is not valid JSON ({exc}).", fix=fix) from None
    if not isinstance(settings, dict) or not settings.get("target_modules") or not settings.get("r"):
        raise InputError(f"Adapter {name}={uri}: adapter_config.json names no target_modules or rank r.", fix=fix)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"Adapter {name}={uri} has no adapter_model.safetensors.", fix=fix)
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise InputError(f"Adapter {name}={uri}: adapter_model.safetensors holds no tensors.", fix=fix)
    except InputError:
        raise
    except Exception as exc:  # safetensors' own error types vary by version: a truncated or foreign file
        raise InputError(f"Adapter {name}={uri}: adapter_model.safetensors does not open ({exc}).", fix=fix) from None


def resolve_spec(cfg: ServeConfig) -> ServeConfig:
    """Check the model and adapter locations before anything starts; local paths made absolute (replicas
    do not share the driver's working directory)."""
    if not cfg.model:
        raise ConfigError("No model given.", fix="pass --model DIR (or serve.model), an s3:// prefix or models:/NAME/VERSION.")
    spec = cfg.model_copy(deep=True)
    if not storage.is_s3(cfg.model) and not cfg.model.startswith(("models:/", "runs:/")):
        path = Path(cfg.model).expanduser().resolve()
        check_model_dir(path, cfg.model)
        spec.model = str(path)
    adapters = {}
    for name, uri in cfg.adapters.items():
        if storage.is_s3(uri):
            adapters[name] = uri
            continue
        path = Path(uri).expanduser().resolve()
        check_adapter_dir(path, name, uri)
        adapters[name] = str(path)
    spec.adapters = adapters
    if cfg.model_name and cfg.model_name in adapters:
        raise ConfigError(f"Adapter name {cfg.model_name!r} is also the model name.", fix="rename the adapter.")
    if cfg.quantize == "int8" and adapters:
        raise ConfigError("serve.quantize=int8 cannot be combined with LoRA adapters yet.",
                          fix="serve adapters unquantized, or merge the adapter (llmforge finetune --merge) and quantize that.")
    return spec


def default_model_name(uri: str) -> str:
    if uri.startswith("models:/"):
        return uri.removeprefix("models:/").replace("/", "-")
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name or "llmforge"


class ServeMetrics:
    """The app's own Prometheus metrics (exported with Ray Serve's, per replica)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram
        self.tokens = Counter("llmforge_generated_tokens", description="tokens generated")
        self.requests = Counter("llmforge_finished_requests", description="requests finished")
        self.ttft = Histogram("llmforge_time_to_first_token_s", description="time from arrival to first token",
                              boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        self.latency = Histogram("llmforge_request_latency_s", description="time from arrival to last token",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.batch = Gauge("llmforge_batch_size", description="sequences in the last decode step")
        self.queue = Gauge("llmforge_queue_depth", description="requests waiting for a batch row")
        self._steps = 0

    def on_step(self, batch_size: int, queued: int) -> None:
        self.tokens.inc(batch_size)
        self._steps += 1
        if self._steps % 8 == 0:  # gauges need no per-step precision
            self.batch.set(batch_size)
            self.queue.set(queued)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, seconds: float, completion_tokens: int) -> None:
        self.requests.inc()
        self.latency.observe(seconds)


def key_from_env() -> str | None:
    """The API key from ``LLMFORGE_API_KEY``; set but empty is an error, never a silent "no key"."""
    value = os.environ.get(API_KEY_ENV)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{API_KEY_ENV} is set but empty, which would turn authentication off.",
                          fix=f"give it a key (for example `openssl rand -hex 24`), or unset {API_KEY_ENV} to serve "
                              "without one on 127.0.0.1.")
    return value.strip()


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve on a non-loopback address without a key unless that is asked for by name."""
    import ipaddress
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if api_key is None and not loopback and not allow_unauthenticated:
        raise ConfigError(f"serve.host {host} is reachable from other machines and no API key is set.",
                          fix=f"set {API_KEY_ENV} (or --api-key-file FILE), or set serve.allow_unauthenticated=true "
                              "if the network in front of it does the authentication.")


def local_sources(cfg: ServeConfig) -> tuple[Path, dict[str, Path], int]:
    """The replica's local copies of the model and adapters (``s3://`` and ``models:/`` ones fetched), checked,
    and the context it serves: ``serve.max_model_len``, at most the model's."""
    from transformers import AutoConfig
    model_dir = local_dir(cfg.model, "model")
    check_model_dir(model_dir, cfg.model)
    adapters = {name: local_dir(uri, f"adapter {name}") for name, uri in cfg.adapters.items()}
    for name, path in adapters.items():  # s3:// ones too, now that they are local
        check_adapter_dir(path, name, cfg.adapters[name])
    context = int(getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 2048))
    return model_dir, adapters, min(cfg.max_model_len or context, context)


def server_for(cfg: ServeConfig, model_dir: Path, max_model_len: int, api_key: str | None, make_engine,
               engine_info: dict):
    """The :class:`ModelServer` the HTTP API serves: the tokenizer, the limits, and the engine that
    ``make_engine(EngineSettings)`` starts (llmforge's or vLLM's)."""
    from transformers import AutoTokenizer

    from llmforge.serve.engine import EngineSettings
    from llmforge.serve.openai_api import ModelServer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = EngineSettings(max_batch_size=cfg.max_batch_size, max_model_len=max_model_len,
                              max_waiting_sequences=cfg.max_ongoing_requests, max_loaded_adapters=cfg.max_loaded_adapters,
                              blocked_terms=tuple(cfg.blocked_terms), fast_decode=cfg.fast_decode)
    engine = make_engine(settings)
    name = cfg.model_name or default_model_name(cfg.model)
    log.info("serving %s (%s) with adapters %s, context %d, batch %d, engine %s (%s); loaded in %.1fs", name,
             model_dir, sorted(cfg.adapters) or "none", max_model_len, cfg.max_batch_size, engine_info["engine"],
             engine_info["engine_reason"], time.time() - started)
    return ModelServer(engine=engine, tokenizer=tokenizer, model_name=name, adapters=sorted(cfg.adapters),
                       max_model_len=max_model_len, default_max_tokens=cfg.default_max_tokens,
                       max_body_bytes=cfg.max_body_bytes, body_read_timeout_s=cfg.request_read_timeout_s,
                       api_key=api_key, blocked_terms=tuple(cfg.blocked_terms),
                       log_prompts=cfg.log_prompts, stream_interval_s=cfg.stream_interval_s, engine_info=engine_info)


def create_server(cfg: ServeConfig, api_key: str | None, metrics, engine_info: dict):
    """Load the model into llmforge's engine: the :class:`ModelServer` the HTTP API serves (Ray or not)."""
    from llmforge.serve.engine_process import EngineProcess

    model_dir, adapter_dirs, max_model_len = local_sources(cfg)
    adapters = {name: str(path) for name, path in adapter_dirs.items()}
    # The model runs in a child process (see engine_process): the replica's HTTP side and the generation loop
    # then never wait on each other's Python. On CPU its torch thread pool is sized from the replica's CPUs.
    return server_for(cfg, model_dir, max_model_len, api_key,
                      lambda settings: EngineProcess(model_dir, settings, adapters, dtype=cfg.dtype, quantize=cfg.quantize,
                                                     threads=max(1, int(cfg.num_cpus)) if cfg.num_gpus == 0 else None,
                                                     metrics=metrics),
                      engine_info)


def _deployment_class():
    from ray import serve

    @serve.ingress()
    class LLMServer:
        def __init__(self, spec: dict, api_key: str | None, engine_reason: str = "serve.engine=llmforge"):
            from llmforge.runtime import setup_logging
            setup_logging()
            cfg = ServeConfig.model_validate(spec)
            self.server = create_server(cfg, api_key or key_from_env(), ServeMetrics(),
                                        {"engine": "llmforge", "engine_reason": engine_reason})
            self.drain_timeout = cfg.graceful_shutdown_timeout_s

        def __serve_build_asgi_app__(self):
            from llmforge.serve.openai_api import build_api
            return build_api(self.server)

        def check_health(self):
            if not self.server.engine.alive:
                raise RuntimeError("the generation thread has stopped")

        def __del__(self):
            self.server.engine.shutdown(self.drain_timeout)

    return LLMServer


def choose_engine(cfg: ServeConfig) -> tuple[str, str]:
    """``(engine, reason)`` for ``serve.engine`` on a checked spec (see vllm_engine.choose); logged."""
    from llmforge.serve import vllm_engine
    remote = storage.is_s3(cfg.model) or cfg.model.startswith(("models:/", "runs:/"))
    adapters = {n: Path(p) for n, p in cfg.adapters.items() if not storage.is_s3(p)}
    engine, reason = vllm_engine.choose(cfg.engine, None if remote else Path(cfg.model), adapters, cfg.num_gpus > 0)
    if engine == "vllm" and cfg.quantize != "none":
        raise ConfigError("serve.quantize=int8 is llmforge's engine's; vLLM has its own quantization.",
                          fix="drop serve.quantize, or pass vLLM's `quantization` in serve.vllm_engine_kwargs.")
    log.info("engine: %s (%s)", engine, reason)
    return engine, reason


def build_deployment(cfg: ServeConfig, api_key: str | None = None):
    """The bound Serve application for ``cfg`` (model and adapters checked, the engine chosen, first)."""
    spec = resolve_spec(cfg)
    return bind_deployment(spec, choose_engine(spec), api_key)


def bind_deployment(spec: ServeConfig, engine: tuple[str, str], api_key: str | None):
    """The Serve application for a checked spec and its engine (with vLLM: Ray must be connected already, as
    Ray Serve LLM reads the job's runtime environment)."""
    from ray import serve

    engine, reason = engine
    cfg = spec
    scale = cfg.autoscaling
    autoscaling = None
    if scale.max_replicas > 1 or scale.min_replicas != 1:
        autoscaling = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                       "initial_replicas": max(1, scale.min_replicas),
                       "target_ongoing_requests": scale.target_ongoing_requests,
                       "upscale_delay_s": scale.upscale_delay_s, "downscale_delay_s": scale.downscale_delay_s,
                       "metrics_interval_s": scale.metrics_interval_s,
                       "look_back_period_s": max(2 * scale.metrics_interval_s, 4.0)}
    options = {
        "name": DEPLOYMENT,
        # The replica sizes its torch thread pool from num_cpus itself (create_server).
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = 1
    if engine == "vllm":
        from ray.serve.llm import build_llm_deployment

        from llmforge.serve import vllm_engine
        name = options.pop("name")
        del options["ray_actor_options"]  # vllm_engine.llm_config places the replica and its engine
        llm = vllm_engine.build_llm_config(spec, options, vllm_engine.engine_kwargs(spec, None, {}, spec.num_gpus > 0),
                                     spec.model)
        return build_llm_deployment(llm, deployment_cls=vllm_engine.server_class(), name_prefix="",
                                    override_serve_options={"name": name},
                                    bind_kwargs={"spec": spec.model_dump(mode="json"), "api_key": api_key,
                                                 "engine_reason": reason})
    deployment = serve.deployment(_deployment_class(), **options)
    return deployment.bind(spec.model_dump(mode="json"), api_key, reason)


def _args_to_config(args: dict) -> Config:
    """``serve run`` / RayService args: ``model``, ``adapters`` (``a=DIR,b=DIR`` or a mapping), ``config`` (a YAML
    file), ``api_key``, and any dotted field (``serve.max_batch_size``)."""
    args = dict(args)
    overrides: dict = {}
    if "model" in args:
        overrides["serve.model"] = args.pop("model")
    adapters = args.pop("adapters", None)
    if isinstance(adapters, str):
        adapters = parse_adapters([a for a in adapters.split(",") if a])
    if adapters:
        overrides["serve.adapters"] = adapters
    config_file = args.pop("config", None)
    args.pop("api_key", None)
    import yaml
    for key, value in args.items():
        overrides[key] = yaml.safe_load(value) if isinstance(value, str) else value
    return load_config(config_file, overrides)


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"Adapter {item!r} is not NAME=DIR.", fix="write --adapter support-bot=runs/ft/adapter.")
        if name in adapters:
            raise ConfigError(f"Adapter name {name!r} is given twice.")
        adapters[name] = path
    return adapters


def build_app(args: dict):
    """Serve's application builder (``serve run`` and RayService ``serveConfigV2``)."""
    cfg = _args_to_config(args)
    return build_deployment(cfg.serve, args.get("api_key"))


def start(cfg: Config, api_key: str | None, blocking: bool = False):
    """Deploy the app on the Ray cluster (started or joined per ``cfg.ray``) with Serve's proxy on host:port."""
    from ray import serve

    from llmforge.runtime import ensure_ray

    check_exposure(cfg.serve.host, api_key, cfg.serve.allow_unauthenticated)
    spec = resolve_spec(cfg.serve)
    engine = choose_engine(spec)  # a model or adapter vLLM cannot serve fails here, before Ray starts
    ensure_ray(cfg.ray)
    app = bind_deployment(spec, engine, api_key)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def serve_forever(cfg: Config, api_key: str | None) -> dict:
    """``llmforge serve``: deploy, print where, block until SIGINT/SIGTERM, then drain and shut down."""
    from ray import serve

    url = start(cfg, api_key)
    name = cfg.serve.model_name or default_model_name(cfg.serve.model)
    log.info("serving model %r at %s/v1 (OpenAI-compatible%s); Ctrl-C stops", name, url,
             ", API key required" if api_key else "")
    print(f"READY {url}/v1 model={name}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("shutting down: in-flight requests may take up to %.0fs to finish", cfg.serve.graceful_shutdown_timeout_s)
    serve.delete(APP_NAME)
    serve.shutdown()
    return {"event": "serve_stopped", "url": url, "model": name}
