"""Evaluation: task resolution and its errors, lm-eval's scores checked by hand on a tiny model, the same scores
through llmforge's OpenAI API on a real socket (uvicorn, no Ray), MLflow records, the model card, `compare`."""

import json
import math
import socket
import threading
import time

import pytest
import torch

from llmforge.cli import main
from llmforge.config import load_config
from llmforge.errors import InputError
from llmforge.evals import harness, record
from serve_api import KEY, server  # noqa: F401  (server: a fixture)

ITEMS = [  # short enough for the test server's 128-token context
    ("Debian is a free", ["operating system.", "brown fox.", "install nginx.", "lazy dog."], 0),
    ("How do I install", ["nginx? Run sudo apt.", "the dog.", "a system.", "many packages."], 0),
    ("The quick brown fox", ["jumps over.", "is free.", "apt install.", "the packages."], 0),
    ("安装软件包的命令", ["是什么？", "狐狸。", "系统。", "很多。"], 0),
    ("Debian is a free operating system with many", ["packages.", "dogs.", "foxes.", "commands."], 0),
    ("Run sudo apt install", ["nginx.", "fox.", "系统。", "free."], 3),
]


def write_tasks(root):
    """A user's task directory: a multiple-choice task and a cloze task, data files relative to their YAML."""
    (root / "data").mkdir(parents=True)
    with open(root / "data" / "mc.jsonl", "w", encoding="utf-8") as f:
        for context, choices, label in ITEMS:
            f.write(json.dumps({"context": context, "choices": choices, "label": label}, ensure_ascii=False) + "\n")
    with open(root / "data" / "cloze.jsonl", "w", encoding="utf-8") as f:
        for context, choices, label in ITEMS:
            f.write(json.dumps({"context": context, "target": choices[label]}, ensure_ascii=False) + "\n")
    common = "dataset_path: json\ntest_split: test\ntarget_delimiter: ' '\nmetadata: {version: 1}\n"
    (root / "mc.yaml").write_text(
        "task: my_mc\ndataset_kwargs: {data_files: {test: data/mc.jsonl}}\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n" + common)
    (root / "cloze.yaml").write_text(
        "task: my_cloze\ndataset_kwargs: {data_files: {test: data/cloze.jsonl}}\noutput_type: loglikelihood\n"
        "doc_to_text: context\ndoc_to_target: \"{{' ' + target}}\"\n"
        "metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false},"
        " {metric: acc, aggregation: mean, higher_is_better: true}]\n" + common)
    return root


def by_hand(model, tok):
    """Each item's choice log-likelihoods from the model's own log-softmax, as lm-eval defines them: the
    continuation's tokens are those of context + " " + choice after the context's own."""
    picks, target_lls, greedy = [], [], []
    for context, choices, label in ITEMS:
        lls = []
        for i, choice in enumerate(choices):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            cont = whole[len(ctx):]
            steps = logprobs[len(ctx) - 1:len(whole) - 1]
            lls.append(sum(steps[j, t].item() for j, t in enumerate(cont)))
            if i == label:
                target_lls.append(lls[-1])
                greedy.append(all(steps[j].argmax().item() == t for j, t in enumerate(cont)))
        picks.append(max(range(len(lls)), key=lls.__getitem__) == label)
    return sum(picks) / len(picks), math.exp(-sum(target_lls) / len(target_lls)), sum(greedy) / len(greedy)


@pytest.fixture(scope="module")
def endpoint(server):  # noqa: F811
    """llmforge's OpenAI API (the engine of serve_api.server) on a real socket, as lm-eval's client needs."""
    import uvicorn

    from llmforge.serve.openai_api import build_api
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(build_api(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    web.should_exit = True
    thread.join(timeout=10)


def test_shipped_tasks_resolve_with_their_data_next_to_them():
    tasks = harness.resolve_tasks(["handbook_ending_en", "handbook_ending_zh", "handbook_lastword_en"])
    assert [t.output_type for t in tasks] == ["multiple_choice", "multiple_choice", "loglikelihood"]
    for t in tasks:
        data = t.config["dataset_kwargs"]["data_files"]["test"]
        with open(data, encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        assert len(items) >= 200 and all(i["context"] for i in items)
        if t.output_type == "multiple_choice":
            assert all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)
            assert len({i["label"] for i in items}) == 4  # the right ending is not always in one place


def test_unknown_tasks_and_bad_files_say_what_there_is(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "_LM_EVAL_INDEX", ["hellaswag", "lambada_openai", "arc_easy"])
    with pytest.raises(InputError, match="Unknown task 'hellaswg'.*handbook_ending_en.*val_perplexity.*hellaswag"):
        harness.resolve_tasks(["hellaswg"])
    assert harness.resolve_tasks(["hellaswag"])[0].source == "lm-eval"
    with pytest.raises(InputError, match="does not exist"):
        harness.resolve_tasks([str(tmp_path / "nope.yaml")])
    (tmp_path / "bad.yaml").write_text("task: bad\ndataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}\n")
    with pytest.raises(InputError, match="data file that does not exist.*gone.jsonl"):
        harness.resolve_tasks([str(tmp_path / "bad.yaml")])
    with pytest.raises(InputError, match="named twice"):
        harness.resolve_tasks(["handbook_ending_en", "handbook_ending_en"])
    with pytest.raises(InputError, match="val_perplexity is what training logs"):
        harness.check_training_tasks(["val_perplexity"])


def test_cli_errors_are_one_paragraph(server, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(harness, "_LM_EVAL_INDEX", [])
    tasks = write_tasks(tmp_path / "tasks")
    with open(tasks / "data" / "mc.jsonl", "a", encoding="utf-8") as f:
        f.write('{"context": "truncated\n')
    assert main(["eval", "--model", server.engine.model.name_or_path, "--tasks", str(tasks / "mc.yaml")]) == 2
    assert "data files cannot be read" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--tasks", "nosuchtask"]) == 2
    assert "Unknown task 'nosuchtask'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "No --tasks given" in capsys.readouterr().err
    assert main(["compare", "abc", "def", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "not an MLflow run ID" in capsys.readouterr().err


def test_in_process_scores_are_the_models_own_and_the_endpoint_gives_the_same(server, endpoint, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """lm-eval's acc and perplexity in-process equal a hand computation; through the API (echo + logprobs, the
    official client's shape, parsed by lm-eval's local-completions) they agree within 1e-4 (float32 both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("LLMFORGE_API_KEY", KEY)
    tasks = write_tasks(tmp_path / "tasks")
    model_dir = server.engine.model.name_or_path
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    acc, perplexity, greedy = by_hand(model, tok)

    local = harness.evaluate(model_dir, [str(tasks)])["results"]
    assert local["my_mc"]["acc"] == pytest.approx(acc, abs=1e-9)
    assert local["my_cloze"]["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert local["my_cloze"]["acc"] == pytest.approx(greedy, abs=1e-9)
    assert "acc_stderr" in local["my_mc"]

    served = harness.evaluate(model_dir, [str(tasks)], endpoint=endpoint)
    assert served["served_model"] == "m"
    for task, metrics in local.items():
        for metric, value in metrics.items():
            assert served["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_training_evaluator_scores_the_live_model_and_leaves_it_training(server, tmp_path):  # noqa: F811
    """train.eval_tasks' evaluator on a model in train mode: the scores of the hand computation, twice (the
    wrapper is built once), and the model back in train mode after each pass (HFLM puts it in eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = server.engine.model.name_or_path
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    acc, _, _ = by_hand(model.eval(), tok)
    model.train()
    evaluator = harness.TrainingEvaluator([str(write_tasks(tmp_path / "tasks"))], model_dir, None, active=True)
    for _ in range(2):
        scores = evaluator(model)
        assert scores["eval/my_mc/acc"] == pytest.approx(acc, abs=1e-9) and model.training
    assert harness.TrainingEvaluator(["handbook_ending_en"], model_dir, 5, active=False)(model) == {}


def test_generative_tasks_in_process_through_completions_and_through_chat(server, endpoint, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """A generate_until task whose targets are the model's own greedy continuations (computed here with
    transformers): exact_match is 1 in-process and through /v1/completions (the engine's greedy decoding and stop
    handling give the same text); through chat (the server's template around the prompt) it runs and scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("LLMFORGE_API_KEY", KEY)
    model_dir = server.engine.model.name_or_path
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    root = tmp_path / "gen"
    root.mkdir()
    with open(root / "gen.jsonl", "w", encoding="utf-8") as f:
        for context, _, _ in ITEMS:
            ids = tok(context, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            target = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
            f.write(json.dumps({"context": context, "target": target}, ensure_ascii=False) + "\n")
    (root / "gen.yaml").write_text(
        "task: my_gen\ndataset_path: json\ndataset_kwargs: {data_files: {test: gen.jsonl}}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: target\n"
        "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 6, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\nmetadata: {version: 1}\n")
    local = harness.evaluate(model_dir, [str(root)])["results"]["my_gen"]
    served = harness.evaluate(model_dir, [str(root)], endpoint=endpoint)["results"]["my_gen"]
    assert local["exact_match"] == 1.0 and served["exact_match"] == 1.0
    chat = harness.evaluate(model_dir, [str(root)], endpoint=endpoint, chat=True)["results"]["my_gen"]
    assert 0 <= chat["exact_match"] <= 1
    with pytest.raises(InputError, match="Chat completions cannot score log-likelihoods, which my_cloze, my_mc"):
        harness.evaluate(model_dir, [str(write_tasks(tmp_path / "tasks"))], endpoint=endpoint, chat=True)


def test_an_endpoint_without_prompt_logprobs_is_refused_naming_what_can_run(tmp_path):
    """A server that answers /v1/models but refuses echo (as OpenAI's own chat models do) gets a clear error."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoEcho(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": "gen-only", "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(400, {"error": {"message": "echo is not supported", "type": "invalid_request_error"}})

    web = ThreadingHTTPServer(("127.0.0.1", 0), NoEcho)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        tasks = write_tasks(tmp_path / "tasks")
        (tasks / "gen.yaml").write_text("task: my_gen\ndataset_path: json\ndataset_kwargs: {data_files: {test: "
                                        "data/cloze.jsonl}}\ntest_split: test\noutput_type: generate_until\n"
                                        "doc_to_text: context\ndoc_to_target: target\n")
        with pytest.raises(InputError, match=r"cannot score loglikelihood tasks .*400.*my_cloze, my_mc need.*"
                                             r"These can run against it: my_gen"):
            harness.check_endpoint_logprobs(f"http://127.0.0.1:{web.server_port}/v1", "gen-only",
                                            harness.resolve_tasks([str(tasks)]))
        with pytest.raises(InputError, match="cannot be reached"):
            harness.served_models("http://127.0.0.1:9/v1", timeout=2)
    finally:
        web.shutdown()


def test_results_go_to_mlflow_and_the_card_then_compare_tables_and_plots_them(server, tmp_path, capsys):  # noqa: F811
    """Two "trained" runs (one registered), an evaluation of each (a child run; the version tagged), then compare."""
    import mlflow
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.create_experiment("llmforge", artifact_location=(tmp_path / "art").as_uri())
    runs = []
    for i, lr in enumerate((1e-3, 3e-3)):
        run = client.create_run(experiment, run_name=f"pretrain-{i}", tags={"llmforge.data": "ds", "job": "pretrain"})
        client.log_param(run.info.run_id, "train.lr", str(lr))
        client.log_param(run.info.run_id, "seed", "0")
        client.log_batch(run.info.run_id, metrics=[Metric("loss", 5.0 - s / (10 + i), 0, s) for s in range(1, 20)])
        runs.append(run.info.run_id)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", source="s3://nowhere/model", run_id=runs[1])

    cfg = load_config(None, {"tracking.tracking_uri": uri})
    results = {"my_mc": {"acc": 0.5, "acc_stderr": 0.2}, "my_cloze": {"perplexity": 120.0, "acc": 0.0}}
    tasks = harness.resolve_tasks([str(write_tasks(tmp_path / "tasks"))])
    card = record.card_with_evaluation("# m\n\nintro\n\n## Data\nds\n", results, "in-process")
    assert card.index("## Evaluation") < card.index("## Data") and "| my_mc | acc | 0.5 | 0.2 |" in card
    assert record.card_with_evaluation(card, {"my_mc": {"acc": 0.75}}, "again").count("## Evaluation") == 1
    eval_id, _ = record.log_evaluation(cfg, "models:/tiny/1", results, {}, endpoint=None, tasks=tasks, limit=None,
                                       card=card)
    child = client.get_run(eval_id)
    assert child.data.tags["mlflow.parentRunId"] == runs[1] and child.data.tags["llmforge.data"] == "ds"
    assert child.data.metrics["eval/my_mc/acc"] == 0.5 and child.data.metrics["eval/my_mc/acc_stderr"] == 0.2
    assert client.get_model_version("tiny", "1").tags["eval.my_mc.acc"] == "0.5"
    assert "model_card/README.md" in {a.path for a in client.list_artifacts(eval_id, "model_card")}
    client.log_metric(runs[0], "eval/my_mc/acc", 0.25, step=19)  # as train.eval_tasks logs it

    assert main(["compare", runs[0], "models:/tiny/1", "--tracking-uri", uri, "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    table, summary = out.rsplit("\n", 2)[0], json.loads(out.strip().splitlines()[-1])
    assert summary["differing_params"] == ["train.lr"] and summary["runs"] == runs
    assert "| train.lr | 0.001 | 0.003 |" in table and "| my_mc/acc | 0.25 | 0.5 |" in table
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {a.path for a in client.list_artifacts(summary["run_id"])} == {"compare.png", "compare.md"}
