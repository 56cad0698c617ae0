"""lm-eval-harness on a model: in-process (lm-eval's HF model class on the loaded model, batched, CPU or GPU) or
against a served OpenAI-compatible endpoint (its ``local-completions`` model: loglikelihoods from ``echo`` and
``logprobs`` on ``/v1/completions``).

Tasks are named three ways: a task shipped with llmforge (``evals/tasks/*.yaml``), a path to a task YAML file or a
directory of them (the user's own), or one of lm-eval's own tasks (its datasets are downloaded by lm-eval, so they
run only where the Hugging Face Hub is reachable). ``val_perplexity`` is the validation perplexity of a prepared
dataset (``--data``). Results are ``{task: {metric: value, metric_stderr: value}}``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from llmforge.errors import InputError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
PERPLEXITY = "val_perplexity"
# What lm-eval asks of a model per output type: these need log-likelihoods (echo + logprobs from an endpoint).
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


@dataclass
class Task:
    name: str
    config: dict | None  # a task YAML's content (data paths resolved); None: one of lm-eval's own, by name
    source: str          # "llmforge", a YAML path, or "lm-eval"

    @property
    def output_type(self) -> str | None:
        return self.config.get("output_type", "generate_until") if self.config is not None else None

    @property
    def spec(self) -> dict | str:
        return self.config if self.config is not None else self.name


def shipped_tasks() -> dict[str, Path]:
    """The tasks shipped with llmforge, by name."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _load_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # YAML syntax, a missing include or !function module: lm-eval raises several types
        raise InputError(f"Task file {path} cannot be read: {exc}",
                         fix="check it against lm-eval's task format (docs/evaluation.md#your-own-tasks).") from None
    if "task" not in config:
        raise InputError(f"Task file {path} has no `task:` name.", fix="add `task: NAME` (docs/evaluation.md).")
    # Local data files are relative to the YAML file, not to wherever the job runs.
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        def resolve(value: str) -> str:
            return value if "://" in value or Path(value).is_absolute() else str(path.parent / value)
        if isinstance(files, str):
            kwargs["data_files"] = resolve(files)
        elif isinstance(files, list):
            kwargs["data_files"] = [resolve(v) for v in files]
        else:
            kwargs["data_files"] = {k: (resolve(v) if isinstance(v, str) else [resolve(x) for x in v])
                                    for k, v in files.items()}
        for f in _flat(kwargs["data_files"]):
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).is_file():
                raise InputError(f"Task {config['task']} ({path}) names a data file that does not exist: {f}.",
                                 fix="data_files are relative to the task's YAML file.")
    return config


def _flat(files) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat(v)]
    return [f for v in files for f in _flat(v)]


_LM_EVAL_INDEX: list[str] | None = None


def lm_eval_task_names() -> list[str]:
    """lm-eval's own task, group and tag names (indexing its YAML files takes about 10 s: done once, on demand)."""
    global _LM_EVAL_INDEX
    if _LM_EVAL_INDEX is None:
        from lm_eval.tasks import TaskManager
        _LM_EVAL_INDEX = TaskManager().all_tasks
    return _LM_EVAL_INDEX


def resolve_tasks(specs: list[str]) -> list[Task]:
    """``--tasks`` entries as tasks; an unknown name is an error that lists what there is."""
    shipped = shipped_tasks()
    tasks: list[Task] = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        path = Path(spec).expanduser()
        if spec == PERPLEXITY:
            tasks.append(Task(PERPLEXITY, None, "llmforge"))
        elif spec in shipped:
            tasks.append(Task(spec, _load_yaml(shipped[spec]), "llmforge"))
        elif path.suffix in (".yaml", ".yml") or path.is_dir() or os.sep in spec:
            if path.is_dir():
                files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
                if not files:
                    raise InputError(f"Task directory {path} has no .yaml task files.", fix="put task YAML files in it.")
            elif path.is_file():
                files = [path]
            else:
                raise InputError(f"Task file {path} does not exist.", fix="pass the path of a task YAML file or directory.")
            for file in files:
                config = _load_yaml(file)
                tasks.append(Task(config["task"], config, str(file)))
        elif spec in lm_eval_task_names():
            tasks.append(Task(spec, None, "lm-eval"))
        else:
            close = difflib.get_close_matches(spec, [*shipped, PERPLEXITY, *lm_eval_task_names()], n=5)
            raise InputError(
                f"Unknown task {spec!r}. Tasks shipped with llmforge: {', '.join([*shipped, PERPLEXITY])}"
                + (f"; close names among lm-eval's {len(lm_eval_task_names())} tasks: {', '.join(close)}" if close else "")
                + ".", fix="pass one of those, the path to a task YAML file or directory, or one of lm-eval's task names "
                           "(`lm-eval ls tasks` lists them).")
    if not tasks:
        raise InputError("No tasks given.", fix=f"pass --tasks, e.g. --tasks {','.join(shipped)}.")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"Tasks named twice: {sorted({n for n in names if names.count(n) > 1})}.",
                         fix="give each task once (task YAML files need distinct `task:` names).")
    return tasks


@contextlib.contextmanager
def quiet():
    """lm-eval's and datasets' per-request progress bars and notices off: llmforge logs one line per task."""
    import datasets
    import tqdm
    init = tqdm.tqdm.__init__

    def no_bar(self, *args, **kwargs):  # lm-eval passes disable= itself (rank != 0), so this overrides it
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm.tqdm.__init__ = no_bar
    datasets.disable_progress_bars()
    levels = {name: logging.getLogger(name).level for name in ("lm_eval", "datasets")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init
        datasets.enable_progress_bars()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def metrics_of(raw: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` (``"acc,none": 0.3, "acc_stderr,none": 0.02``) as ``{task: {"acc": .., "acc_stderr": ..}}``;
    a filter other than ``none`` is kept in the name (``exact_match_strict-match``)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in raw.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("none", "") else f"{metric}-{filt}"
            if math.isfinite(float(value)):
                metrics[name] = float(value)
        if metrics:
            out[task] = metrics
    return out


def run_tasks(lm, tasks: list[Task], limit: int | float | None = None, num_fewshot: int | None = None,
              bootstrap_iters: int = 1000, chat: bool = False) -> tuple[dict[str, dict[str, float]], dict]:
    """Run lm-eval tasks on an lm-eval model object; returns (metrics per task, lm-eval's results without samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from datasets.exceptions import DatasetGenerationError

    own = [t for t in tasks if t.config is None]
    with quiet():
        manager = TaskManager(include_defaults=bool(own))
        try:
            raw = lm_eval.simple_evaluate(model=lm, tasks=[t.spec for t in tasks], task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=bootstrap_iters,
                                          apply_chat_template=chat, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
        except ConnectionError as exc:  # datasets' "Couldn't reach 'X' on the Hub"
            raise InputError(f"A task's dataset cannot be downloaded ({exc}); lm-eval's own tasks "
                             f"({', '.join(t.name for t in own) or 'none given'}) fetch theirs from the Hugging Face Hub.",
                             fix="run where the Hub is reachable (or with HF_DATASETS_CACHE holding the dataset), or "
                                 "use local tasks (docs/evaluation.md#tasks).") from None
        except DatasetGenerationError as exc:
            files = [f for t in tasks if t.config for f in _flat((t.config.get("dataset_kwargs") or {}).get("data_files") or [])]
            raise InputError(f"A task's data files cannot be read ({exc.__cause__ or exc}): {', '.join(files)}.",
                             fix="each line must be one JSON object with the fields the task's YAML names.") from None
    if raw is None:  # lm-eval returns None on ranks other than its rank 0
        return {}, {}
    raw.pop("samples", None)
    return metrics_of(raw), raw


def hf_lm(model, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """lm-eval's HF model class around a loaded model (no second copy; on the model's device).

    An item longer than the context is cut from the left. lm-eval scores a window of ``max_length + 1`` tokens
    in-process and of ``context - 1`` against an endpoint (which must leave room for one generated token), so
    in-process it gets ``context - 2``: both score the same tokens, and agree on long items too."""
    from lm_eval.models.huggingface import HFLM
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str": intended
    context = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context - 2)


class TrainingEvaluator:
    """``train.eval_tasks`` on the model being trained, every ``train.eval_every`` steps: lm-eval's HF model class
    around the engine's module (built once, no copy of the weights), in eval mode for the pass and back to train
    mode after. ``active``: whether this rank runs it (rank 0; every rank under ZeRO-3, whose forward passes need
    all ranks: each runs the same requests, so their forward calls line up)."""

    def __init__(self, specs: list[str], tokenizer_dir: str, limit: int | None, active: bool, batch_size: int = 16):
        self.tasks = [t for t in resolve_tasks(specs)]
        self.tokenizer_dir, self.limit, self.active, self.batch_size = tokenizer_dir, limit, active, batch_size
        self.lm = None

    def __call__(self, module) -> dict[str, float]:
        from llmforge.evals.record import metric_names
        if not self.active:
            return {}
        training = module.training  # before HFLM, which puts the module in eval mode when it wraps it
        try:
            if self.lm is None:
                from transformers import AutoTokenizer
                self.lm = hf_lm(module, AutoTokenizer.from_pretrained(self.tokenizer_dir), batch_size=self.batch_size)
            module.eval()
            results, _ = run_tasks(self.lm, self.tasks, limit=self.limit)
        finally:
            module.train(training)
        return metric_names(results)


def check_training_tasks(specs: list[str]) -> list[str]:
    """``train.eval_tasks`` checked on the driver (unknown names fail before any worker starts), paths made absolute
    (workers run elsewhere)."""
    tasks = resolve_tasks(specs)
    if any(t.name == PERPLEXITY for t in tasks):
        raise InputError(f"train.eval_tasks: {PERPLEXITY} is what training logs anyway (val_loss, val_perplexity).",
                         fix=f"drop {PERPLEXITY} from train.eval_tasks.")
    return [spec if spec in shipped_tasks() or not Path(spec).expanduser().exists() else
            str(Path(spec).expanduser().resolve()) for spec in specs]


# ---- the served endpoint ------------------------------------------------------------------------------------
def _api(endpoint: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/completions`` as the API's base ``.../v1``."""
    base = endpoint.rstrip("/")
    for tail in ("/completions", "/chat/completions"):
        if base.endswith("/v1" + tail):
            base = base[: -len(tail)]
    return base if base.endswith("/v1") else base + "/v1"


def _api_key() -> str | None:
    return os.environ.get("LLMFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _with_key(cls):
    """lm-eval's API model class sending llmforge's key (``LLMFORGE_API_KEY``, else ``OPENAI_API_KEY``, read now) as
    its bearer token; lm-eval itself reads only ``OPENAI_API_KEY``, and setting that would leak into the process."""
    key = _api_key() or ""

    class WithKey(cls):
        @property
        def api_key(self):
            return key

    WithKey.__name__ = cls.__name__
    return WithKey


def served_models(endpoint: str, timeout: float = 30) -> list[dict]:
    import requests
    url = _api(endpoint) + "/models"
    key = _api_key()
    try:
        response = requests.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)
    except requests.RequestException as exc:
        raise InputError(f"The endpoint {endpoint} cannot be reached ({type(exc).__name__}: {exc}).",
                         fix="start the server (`llmforge serve`) or check the URL (http://HOST:PORT/v1).") from None
    if response.status_code == 401:
        raise InputError(f"The endpoint {endpoint} refused the API key ({url}: 401).",
                         fix="set LLMFORGE_API_KEY (or OPENAI_API_KEY) to the server's key.")
    if response.status_code != 200:
        raise InputError(f"{url} answered {response.status_code}: {response.text[:300]}",
                         fix="pass the base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    return list(response.json().get("data", []))


def check_endpoint_logprobs(endpoint: str, model: str, tasks: list[Task], timeout: float = 60) -> None:
    """Loglikelihood tasks need ``echo`` with ``logprobs`` on /v1/completions; refuse before running any task when
    the endpoint does not give them, naming the tasks that can run against it."""
    import requests
    needing = [t.name for t in tasks if t.output_type in LOGLIKELIHOOD_TYPES or t.output_type is None]
    if not needing:
        return
    key = _api_key()
    body = {"model": model, "prompt": "Debian is", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    problem = None
    try:
        response = requests.post(_api(endpoint) + "/completions", json=body, timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
        if response.status_code != 200:
            problem = f"/v1/completions with echo and logprobs answered {response.status_code}: {response.text[:200]}"
        else:
            logprobs = (response.json().get("choices") or [{}])[0].get("logprobs") or {}
            if len(logprobs.get("token_logprobs") or []) < 2:
                problem = "/v1/completions with echo=true and logprobs=1 returned no log-probabilities for the prompt"
    except requests.RequestException as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        generative = [t.name for t in tasks if t.name not in needing]
        raise InputError(
            f"The endpoint {endpoint} cannot score loglikelihood tasks ({problem}); {', '.join(needing)} need(s) "
            "the prompt's log-probabilities. "
            + (f"These can run against it: {', '.join(generative)}." if generative else
               "Only generate_until tasks can run against it, and none of the given tasks is one."),
            fix="evaluate those tasks in-process (drop --endpoint), or serve the model with llmforge or vLLM, which "
                "return echo and logprobs.")


def endpoint_lm(endpoint: str, model: str, tokenizer_dir: Path, max_length: int, batch_size: int = 8,
                num_concurrent: int = 2, timeout: int = 300):
    """lm-eval's local-completions model on ``endpoint``: requests as token ids from the model's own tokenizer."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    logging.getLogger("lm_eval.models.api_models").setLevel(logging.ERROR)
    return _with_key(LocalCompletionsAPI)(base_url=_api(endpoint) + "/completions", model=model, tokenizer=str(tokenizer_dir),
                               tokenizer_backend="huggingface", tokenized_requests=True, max_length=max_length,
                               batch_size=batch_size, num_concurrent=num_concurrent, max_retries=3, timeout=timeout,
                               max_gen_toks=256)


def chat_lm(endpoint: str, model: str, max_length: int, num_concurrent: int = 2, timeout: int = 300):
    """lm-eval's local-chat-completions on ``endpoint``: generative tasks as chat messages (the server applies the
    model's chat template); it cannot score log-likelihoods."""
    from lm_eval.models.openai_completions import LocalChatCompletion
    logging.getLogger("lm_eval.models.api_models").setLevel(logging.ERROR)
    return _with_key(LocalChatCompletion)(base_url=_api(endpoint) + "/chat/completions", model=model, tokenizer_backend=None,
                               tokenized_requests=False, max_length=max_length, num_concurrent=num_concurrent,
                               max_retries=3, timeout=timeout, max_gen_toks=256)


# ---- one evaluation -----------------------------------------------------------------------------------------
def _perplexity(model_dir: Path, dataset: str, limit: int | None) -> dict[str, float]:
    from llmforge.evaluate import evaluate_model
    batches = max(1, math.ceil(limit / 8)) if limit else 20
    out = evaluate_model(str(model_dir), dataset, max_batches=batches, prompts=[])
    return {"loss": out["loss"], "perplexity": out["perplexity"], "sequences": float(out["sequences"])}


def evaluate(model_uri: str, task_specs: list[str], endpoint: str | None = None, served_model: str | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
             data: str | None = None, tracking_uri: str | None = None, chat: bool = False) -> dict:
    """Run the tasks on the model (in-process) or its served copy (``endpoint``; ``chat``: through
    /v1/chat/completions, generative tasks only); returns ``{"results", "raw", "model_dir", "served_model", "tasks"}``."""
    from llmforge.train.lora import resolve_base

    tasks = resolve_tasks(task_specs)
    if any(t.name == PERPLEXITY for t in tasks):
        if data is None:
            raise InputError(f"{PERPLEXITY} needs a prepared dataset.", fix="pass --data DATASET_DIR (its val split).")
        if endpoint:
            raise InputError(f"{PERPLEXITY} runs in-process only.", fix=f"drop --endpoint, or {PERPLEXITY} from --tasks.")
    if chat and not endpoint:
        raise InputError("--chat evaluates a served endpoint's chat API.", fix="pass --endpoint URL, or drop --chat.")
    scored = [t.name for t in tasks if t.output_type in LOGLIKELIHOOD_TYPES or t.output_type is None]
    if chat and scored:
        raise InputError(f"Chat completions cannot score log-likelihoods, which {', '.join(scored)} need(s).",
                         fix="evaluate those without --chat (/v1/completions with echo + logprobs), and "
                             "generate_until tasks with it.")
    model_dir = resolve_base(model_uri, tracking_uri)
    harness = [t for t in tasks if t.name != PERPLEXITY]
    results: dict[str, dict[str, float]] = {}
    raw: dict = {}
    served = None
    if harness:
        if endpoint:
            available = {m["id"]: m for m in served_models(endpoint)}
            served = served_model or next(iter(available), None)
            if served not in available:
                raise InputError(f"The endpoint {endpoint} serves {sorted(available)}, not {served!r}.",
                                 fix="pass --served-model with one of those names.")
            if not chat:
                check_endpoint_logprobs(endpoint, served, harness)
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            # What the endpoint takes (llmforge and vLLM say it in /v1/models), else the model's context.
            max_length = min(config.get("max_position_embeddings") or 2048,
                             available[served].get("max_model_len") or 1 << 30)
            lm = (chat_lm(endpoint, served, max_length) if chat else
                  endpoint_lm(endpoint, served, model_dir, max_length, batch_size=8))
        else:
            lm = hf_lm(*_load(model_dir), batch_size=batch_size)
        log.info("evaluating %s%s on %s%s", model_uri, f" served at {endpoint} as {served}{' (chat)' if chat else ''}"
                 if endpoint else " in-process",
                 ", ".join(t.name for t in harness), f" (at most {limit} items each)" if limit else "")
        results, raw = run_tasks(lm, harness, limit=limit, num_fewshot=num_fewshot, chat=chat)
        for name, metrics in results.items():
            log.info("%s: %s", name, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if any(t.name == PERPLEXITY for t in tasks):
        results[PERPLEXITY] = _perplexity(model_dir, data, limit if isinstance(limit, int) else None)
        log.info("%s: %s", PERPLEXITY, " ".join(f"{k} {v:.4g}" for k, v in results[PERPLEXITY].items()))
    return {"results": results, "raw": raw, "model_dir": model_dir, "served_model": served, "tasks": tasks}


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)
